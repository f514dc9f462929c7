"""`tailor export-gguf`: a base or merged model (an adapter merged on the way) as one GGUF file for llama.cpp and
Ollama, with its tokenizer and Mistral's chat template in the metadata, and an Ollama Modelfile beside it.

The file is llama.cpp's `llama` architecture, as its own converter (convert_hf_to_gguf.py) writes Mistral and
Mixtral: native weights need no rotary permutation (llama.cpp keeps Meta's interleaved q/k layout), Mixtral's experts
are stacked per layer into `ffn_{gate,down,up}_exps`, norms and the router stay F32. The tokenizer is written as
that converter writes a Mistral-format folder (gguf's `MistralVocab`, reading the mistral-common file): SentencePiece
v1/v3/v7 as a `llama` vocabulary with its scores and token types, Tekken as a `gpt2` BPE vocabulary with pre-tokenizer
`tekken` and its merges. Tensors stream one at a time (one layer's experts for Mixtral), as in merge.

llama.cpp's `llama` architecture has no sliding window: a sliding-window model (Mistral 7B v0.1) answers as trained up
to its window and attends to the whole context beyond it; the command says so.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from finetune.after.merge import merged_weights
from finetune.atomic_files import atomic_path, clear_leftovers
from finetune.data.model_tokenizer import check_tokenizer_vocab, find_tokenizer_file, load_tokenizer
from model.args import ModelArgs, load_model_args
from model.lora import is_lora_name
from model.weights import TensorSpec, read_weights, weight_specs

WEIGHT_TYPES = ("f16", "bf16", "q8_0")  # --type: the 2-D weights' type; norms and the router stay f32
INSTALL_HINT = 'pip install -e ".[gguf]" (or pip install gguf)'
# llama.cpp's n_ctx_train: params.json does not say it; 32768 is Mistral 7B v0.3's and Mixtral's
CONTEXT_LENGTH = 32768

# Native name (layer number as {}) -> llama.cpp's; Mixtral's experts are stacked separately (`_EXPERT`).
_GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.feed_forward.gate.weight": "blk.{}.ffn_gate_inp.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$")
_EXPERT_GGUF = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}

# Mistral's plain-chat templates in Jinja, with no spaces around the text: llama.cpp's SentencePiece tokenizer
# prefixes text after a control token with one space, as mistral-common's encoding of each message does.
_SYSTEM_BEFORE_LAST_USER = (  # v2, v3 (Tekken's too): system messages joined by a blank line before the last user
    "{{- bos_token -}}"
    '{%- set ns = namespace(system="", last_user=-1) -%}'
    "{%- for m in messages -%}"
    '{%- if m.role == "system" -%}{%- set ns.system = ns.system + ("\\n\\n" if ns.system else "") + m.content -%}'
    '{%- elif m.role == "user" -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}'
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    '{%- if m.role == "user" -%}[INST]{%- if loop.index0 == ns.last_user and ns.system -%}'
    '{{- ns.system + "\\n\\n" -}}{%- endif -%}{{- m.content -}}[/INST]'
    '{%- elif m.role == "assistant" -%}{{- m.content -}}{{- eos_token -}}{%- endif -%}'
    "{%- endfor -%}"
)
_SYSTEM_IN_PLACE = (  # v7 and later: each system message in place
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    '{%- if m.role == "system" -%}[SYSTEM_PROMPT]{{- m.content -}}[/SYSTEM_PROMPT]'
    '{%- elif m.role == "user" -%}[INST]{{- m.content -}}[/INST]'
    '{%- elif m.role == "assistant" -%}{{- m.content -}}{{- eos_token -}}{%- endif -%}'
    "{%- endfor -%}"
)
# The same two templates in Ollama's Go template language, for the Modelfile (Ollama adds BOS itself).
_OLLAMA_SYSTEM_BEFORE_LAST_USER = (
    "{{- range $i, $m := .Messages }}"
    '{{- if eq $m.Role "user" }}[INST]{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n'
    "{{ end }}{{ $m.Content }}[/INST]"
    '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{- end }}'
    "{{- end }}"
)
_OLLAMA_SYSTEM_IN_PLACE = (
    "{{- range .Messages }}"
    '{{- if eq .Role "system" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]'
    '{{- else if eq .Role "user" }}[INST]{{ .Content }}[/INST]'
    '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}'
    "{{- end }}"
)
CHAT_TEMPLATES = {  # tokenizer version -> (Jinja chat template, Ollama template); v1 has no control tokens: none
    "v2": (_SYSTEM_BEFORE_LAST_USER, _OLLAMA_SYSTEM_BEFORE_LAST_USER),
    "v3": (_SYSTEM_BEFORE_LAST_USER, _OLLAMA_SYSTEM_BEFORE_LAST_USER),
    "v7": (_SYSTEM_IN_PLACE, _OLLAMA_SYSTEM_IN_PLACE),
}


class GGUFTensor(NamedTuple):
    """One tensor of the GGUF file, and the native tensors it is made of."""

    name: str  # llama.cpp's name
    sources: tuple[str, ...]  # the native tensors it is made of (Mixtral's experts of one layer: several)
    shape: tuple[int, ...]  # PyTorch's order (the writer reverses it into ggml's)
    weight_type: str  # "f32", or the --type of a 2-D weight


def export_gguf(
    model_dir: str | Path, out_file: str | Path, adapter_dir: str | Path | None = None, weight_type: str = "f16"
) -> Path:
    """Write `model_dir` (with `adapter_dir`'s adapter merged in) as one GGUF file, and an Ollama Modelfile beside it.

    The Modelfile is `out_file` with the suffix `.Modelfile`. Both appear whole or not at all.

    Args:
        weight_type: the 2-D weights' type, one of WEIGHT_TYPES; norms and the router stay f32.

    Returns:
        `out_file`.

    Raises:
        ValueError: the gguf package is missing, an unknown `weight_type`, no model folder, an output that exists
            or whose folder does not, a folder holding LoRA tensors, a tensor llama.cpp has no place for, or an
            adapter that does not fit the model.
        FileNotFoundError: no params.json / config.json, tokenizer file or weights in the model folder.
    """
    gguf = _import_gguf()
    model_dir, out_file = Path(model_dir), Path(out_file)
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"--type {weight_type!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    if not model_dir.is_dir():
        raise ValueError(f"model folder not found: {model_dir}")
    modelfile = out_file.with_suffix(".Modelfile")
    for path in (out_file, modelfile):
        if path.exists():
            raise ValueError(f"{path} already exists; choose a new --out")
    if not out_file.parent.is_dir():
        raise ValueError(f"{out_file.parent}: no such folder for --out")
    args = load_model_args(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_vocab(tokenizer, args.vocab_size, model_dir)
    version = tokenizer.instruct_tokenizer.tokenizer.version.value
    templates = CHAT_TEMPLATES.get(version) or (CHAT_TEMPLATES["v7"] if version != "v1" else None)
    specs = weight_specs(model_dir)
    if any(is_lora_name(name) for name in specs):
        raise ValueError(f"{model_dir} holds LoRA tensors: give the base folder and --adapter, or merge first")
    plan = gguf_plan(specs, args, weight_type)
    tensors = read_weights(model_dir) if adapter_dir is None else merged_weights(model_dir, adapter_dir)

    clear_leftovers(out_file)  # of an export to the same file cut short
    with atomic_path(out_file) as partial:
        writer = gguf.GGUFWriter(partial, "llama")
        try:
            _add_model_metadata(writer, gguf, args, model_dir, weight_type)
            _add_tokenizer(writer, gguf, model_dir, args.vocab_size, templates[0] if templates else None)
            for tensor in plan:
                qtype = _ggml_type(gguf, tensor.weight_type)
                nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(tensor.shape, qtype)))
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor, data in gguf_tensors(tensors, plan):
                writer.write_tensor_data(gguf.quants.quantize(data, _ggml_type(gguf, tensor.weight_type)))
        finally:
            writer.close()
    modelfile.write_text(ollama_modelfile(out_file.name, templates[1] if templates else None))
    return out_file


def gguf_plan(specs: dict[str, TensorSpec], args: ModelArgs, weight_type: str) -> list[GGUFTensor]:
    """The GGUF tensors in the order they complete when the native tensors arrive in `specs`' order.

    That is the order `read_weights` yields them: a stacked expert tensor completes with its last expert.

    Raises:
        ValueError: a tensor with no place in llama.cpp's llama architecture, or experts missing.
    """
    plan, experts = [], {}
    for name, spec in specs.items():
        if match := _EXPERT.match(name):
            layer, _, w = match.groups()
            key = (int(layer), w)
            experts.setdefault(key, []).append(name)
            if len(experts[key]) == args.moe.num_experts:
                sources = tuple(sorted(experts[key], key=lambda n: int(_EXPERT.match(n).group(2))))
                shape = (args.moe.num_experts, *spec.shape)
                plan.append(GGUFTensor(f"blk.{layer}.{_EXPERT_GGUF[w]}.weight", sources, shape, weight_type))
            continue
        layer = _LAYER.match(name)
        pattern = _LAYER.sub("layers.{}.", name) if layer else name
        if pattern not in _GGUF_NAMES:
            raise ValueError(f"tensor {name!r} has no place in llama.cpp's llama architecture")
        gguf_name = _GGUF_NAMES[pattern].format(layer.group(1) if layer else "")
        # llama.cpp keeps 1-D tensors and the router in F32; Q8_0 needs rows of whole 32-weight blocks
        small = len(spec.shape) == 1 or gguf_name.endswith("ffn_gate_inp.weight")
        kind = "f32" if small else ("f16" if weight_type == "q8_0" and spec.shape[-1] % 32 else weight_type)
        plan.append(GGUFTensor(gguf_name, (name,), spec.shape, kind))
    if missing := [key for key, names in experts.items() if len(names) != args.moe.num_experts]:
        raise ValueError(f"experts missing for (layer, weight) {missing[:4]}")
    return plan


def gguf_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], plan: list[GGUFTensor]
) -> Iterator[tuple[GGUFTensor, np.ndarray]]:
    """Each planned tensor as fp32 numpy, in the plan's order.

    Holds only the native tensors not yet used (one layer's experts, when they arrive in the planned order).

    Raises:
        ValueError: the stream ended before a planned tensor's data came.
    """
    pending: dict[str, torch.Tensor] = {}
    position = 0
    for name, tensor in tensors:
        pending[name] = tensor
        while position < len(plan) and all(source in pending for source in plan[position].sources):
            planned = plan[position]
            parts = [pending.pop(source).float() for source in planned.sources]
            data = parts[0] if len(parts) == 1 else torch.stack(parts)
            yield planned, data.contiguous().numpy()
            position += 1
    if position < len(plan):
        raise ValueError(f"no data came for {plan[position].name} (from {plan[position].sources[0]})")


def ollama_modelfile(gguf_name: str, template: str | None) -> str:
    """An Ollama Modelfile for the GGUF file beside it: the chat template, and EOS as the stop token."""
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += ['PARAMETER stop "</s>"', "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def _add_model_metadata(writer, gguf, args: ModelArgs, model_dir: Path, weight_type: str) -> None:
    writer.add_name(model_dir.resolve().name)
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[weight_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    if args.moe:
        writer.add_expert_count(args.moe.num_experts)
        writer.add_expert_used_count(args.moe.num_experts_per_tok)


def _add_tokenizer(writer, gguf, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    """The tokenizer as llama.cpp's converter writes a Mistral-format folder's (gguf's MistralVocab)."""
    vocab = gguf.vocab.MistralVocab(find_tokenizer_file(model_dir).parent)
    tokens, scores, types = zip(*vocab.all_tokens())
    if len(tokens) != vocab_size:
        raise ValueError(f"{vocab.fname_tokenizer}: {len(tokens)} tokens for a model of vocab_size {vocab_size}")
    writer.add_tokenizer_model(vocab.gguf_tokenizer_model)
    if vocab.tokenizer_type == gguf.vocab.MistralTokenizerType.tekken:
        writer.add_tokenizer_pre("tekken")
        writer.add_token_merges(vocab.extract_vocab_merges_from_model())
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _ggml_type(gguf, weight_type: str):
    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[weight_type]


def _import_gguf():
    try:
        import gguf
        import gguf.vocab
    except ImportError:
        raise ValueError(f"export-gguf needs the gguf package (llama.cpp's writer): {INSTALL_HINT}") from None
    return gguf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor export-gguf`'s arguments to its parser."""
    parser.add_argument("--model", required=True, type=Path, help="a base or merged model folder")
    parser.add_argument("--adapter", type=Path, help="a checkpoint folder whose adapter is merged in on the way")
    parser.add_argument("--out", required=True, type=Path, help="the GGUF file to write (FILE.Modelfile beside it)")
    parser.add_argument(
        "--type",
        choices=WEIGHT_TYPES,
        default="f16",
        help="the weights' type: f16 (default), bf16, or q8_0 (8-bit, about half of f16's size); norms stay f32",
    )


def run(args: argparse.Namespace) -> int:
    """Run `tailor export-gguf`; return the exit code."""
    model_args = load_model_args(args.model)
    if model_args.sliding_window:
        print(
            f"note: {args.model} has a sliding window of {model_args.sliding_window} tokens, which llama.cpp's llama "
            "architecture does not have: its answers equal tailor's up to that many tokens of context",
            file=sys.stderr,
        )
    out = export_gguf(args.model, args.out, args.adapter, args.type)
    modelfile = out.with_suffix(".Modelfile")
    print(f"GGUF model written to {out} ({out.stat().st_size / 2**20:.1f} MiB, weights {args.type})")
    print(f"Ollama Modelfile written to {modelfile}: ollama create NAME -f {modelfile}")
    return 0
