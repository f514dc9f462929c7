"""`tailor export-gguf`, read back with gguf's own reader: every tensor against the merged weights (Q8_0 within its
quantisation step), the tokenizer and the chat template against mistral-common. llama.cpp itself runs the file in
tests/serving/test_llama_cpp.py, where llama-cpp-python is installed."""

import re

import pytest
import torch

from finetune.after.merge import merge_adapter
from finetune.cli import main
from finetune.data.model_tokenizer import find_tokenizer_file, load_tokenizer
from model.weights import read_weights

gguf = pytest.importorskip("gguf")
jinja2 = pytest.importorskip("jinja2")

from finetune.after.export_gguf import export_gguf  # noqa: E402  (needs gguf only when it runs; imported after the skip)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "system", "content": "Use French."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?\nSay it in words."},
    {"role": "assistant", "content": "quatre"},
]


def expected_tensors(merged_folder) -> dict[str, torch.Tensor]:
    """The merged model's weights under llama.cpp's names, Mixtral's experts stacked per layer."""
    native = dict(read_weights(merged_folder))
    renames = [
        (r"^tok_embeddings", "token_embd"),
        (r"^norm\.", "output_norm."),
        (r"^layers\.(\d+)\.attention\.w([qkv])\.", r"blk.\1.attn_\2."),
        (r"^layers\.(\d+)\.attention\.wo\.", r"blk.\1.attn_output."),
        (r"^layers\.(\d+)\.attention_norm", r"blk.\1.attn_norm"),
        (r"^layers\.(\d+)\.ffn_norm", r"blk.\1.ffn_norm"),
        (r"^layers\.(\d+)\.feed_forward\.gate\.", r"blk.\1.ffn_gate_inp."),
        (r"^layers\.(\d+)\.feed_forward\.w1\.", r"blk.\1.ffn_gate."),
        (r"^layers\.(\d+)\.feed_forward\.w2\.", r"blk.\1.ffn_down."),
        (r"^layers\.(\d+)\.feed_forward\.w3\.", r"blk.\1.ffn_up."),
    ]
    expected, experts = {}, {}
    for name, tensor in native.items():
        if match := re.match(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$", name):
            layer, expert, w = match.groups()
            experts.setdefault((layer, w), {})[int(expert)] = tensor
            continue
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        expected[name] = tensor.float()
    for (layer, w), by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in sorted(by_expert)]).float()
        expected[f"blk.{layer}.ffn_{dict(w1='gate', w2='down', w3='up')[w]}_exps.weight"] = stacked
    return expected


def read_back(path) -> tuple[dict[str, tuple[str, torch.Tensor]], dict]:
    """(name -> (ggml type, dequantised fp32 tensor in PyTorch's shape)), and the metadata's values."""
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = (t.tensor_type.name, torch.from_numpy(values.copy()).float().reshape(shape))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, fields


@pytest.mark.parametrize("arch, weight_type", [("mistral-7b", "q8_0"), ("mixtral-8x7b", "f16"), ("mistral-7b", "bf16")])
def test_gguf_tensors_are_the_merged_weights(arch, weight_type, adapter_checkpoint, tmp_path):
    base, checkpoint = adapter_checkpoint(arch)
    out = export_gguf(base, tmp_path / "model.gguf", checkpoint, weight_type)
    expected = expected_tensors(merge_adapter(base, checkpoint, tmp_path / "merged"))
    tensors, fields = read_back(out)

    assert sorted(tensors) == sorted(expected)
    for name, (ggml_type, value) in tensors.items():
        want = expected[name]
        assert value.shape == want.shape, name
        if want.dim() == 1 or name.endswith("ffn_gate_inp.weight"):  # norms and the router stay exact
            assert ggml_type == "F32" and torch.equal(value, want), name
        elif weight_type == "q8_0":
            assert ggml_type == "Q8_0", name
            # each block of 32 weights is rounded to a step of its absmax / 127, that step stored in fp16 (relative
            # error 2^-11, times up to 127 steps)
            step = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
            error = (value - want).reshape(-1, 32).abs()
            assert bool((error <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), name
            assert float(error.max() / step.max()) > 0.25  # it is quantised, not stored exactly
        else:
            assert ggml_type == weight_type.upper(), name
            dtype = torch.float16 if weight_type == "f16" else torch.bfloat16
            assert torch.equal(value, want.to(dtype).float()), name

    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields.get("llama.expert_count") == (4 if arch == "mixtral-8x7b" else None)
    assert (tmp_path / "model.Modelfile").read_text().startswith("FROM ./model.gguf\n")


def tokens_of_rendered_text(text: str, tokenizer) -> list[int]:
    """The tokens llama.cpp makes of a rendered chat: control tokens by name, and each stretch of text between them
    encoded alone (llama.cpp's SentencePiece tokenizer starts each such stretch with its space prefix, as
    mistral-common encodes each message)."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    controls = {raw.id_to_piece(i): i for i in (raw.bos_id, raw.eos_id)}
    controls |= {name: raw.get_special_token(name) for name in ("[INST]", "[/INST]")}
    pattern = "(" + "|".join(re.escape(name) for name in controls) + ")"
    tokens = []
    for part in re.split(pattern, text):
        if part in controls:
            tokens.append(controls[part])
        elif part:
            tokens += raw.encode(part, bos=False, eos=False)
    return tokens


@pytest.mark.parametrize("tokenizer_name", ["v3", "tekken"])
def test_gguf_vocabulary_and_chat_template_give_mistral_commons_tokens(tokenizer_name, tiny_folder, tmp_path):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    base = tiny_folder("mistral-7b", tokenizer=tokenizer_name)
    tokenizer = load_tokenizer(base)
    raw = tokenizer.instruct_tokenizer.tokenizer
    _, fields = read_back(export_gguf(base, tmp_path / "model.gguf"))

    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == raw.n_words
    assert fields["tokenizer.ggml.model"] == ("gpt2" if tokenizer_name == "tekken" else "llama")
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (raw.bos_id, raw.eos_id)
    assert tokens[raw.get_special_token("[INST]")] == "[INST]"
    if tokenizer_name == "tekken":
        assert fields["tokenizer.ggml.pre"] == "tekken" and len(fields["tokenizer.ggml.merges"]) > 100_000
    else:
        assert tokens[1000] == raw.id_to_piece(1000)

    # The template renders a whole chat into the tokens training makes of it, and the chat up to its last user
    # message into the prompt mistral-common makes for it.
    template = jinja2.Environment().from_string(fields["tokenizer.chat_template"])
    names = {"bos_token": raw.id_to_piece(raw.bos_id), "eos_token": raw.id_to_piece(raw.eos_id)}
    rendered = template.render(messages=CHAT, **names)
    assert (
        tokens_of_rendered_text(rendered, tokenizer)
        == tokenizer.encode_chat_completion(ChatCompletionRequest(messages=CHAT)).tokens
    )
    prompt = template.render(messages=CHAT[:-1], **names)
    serving = MistralTokenizer.from_file(str(find_tokenizer_file(base)))
    expected = serving.encode_chat_completion(ChatCompletionRequest(messages=CHAT[:-1])).tokens
    assert tokens_of_rendered_text(prompt, tokenizer) == expected
    assert "Answer briefly.\n\nUse French.\n\nWhat is 2 + 2?" in prompt  # both system prompts, before the last user


def test_export_gguf_command(adapter_checkpoint, tmp_path, capsys):
    base, checkpoint = adapter_checkpoint("mistral-7b")
    out = tmp_path / "tiny.gguf"
    assert main(["export-gguf", "--model", str(base), "--adapter", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"GGUF model written to {out}" in printed
    assert f"ollama create NAME -f {out.with_suffix('.Modelfile')}" in printed
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert 'PARAMETER stop "</s>"' in modelfile and "[INST]" in modelfile and "[/INST]" in modelfile

    # an existing file is never overwritten; an adapter of another model is refused before anything is written
    assert main(["export-gguf", "--model", str(base), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    mixtral_base, _ = adapter_checkpoint("mixtral-8x7b")
    other = tmp_path / "other.gguf"
    assert main(["export-gguf", "--model", str(mixtral_base), "--adapter", str(checkpoint), "--out", str(other)]) == 2
    assert "adapters for weights" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.Modelfile", "tiny.gguf"]


def test_sliding_window_models_are_told_llama_cpp_has_none(tiny_folder, tmp_path, capsys):
    folder = tiny_folder("mistral-7b-v0.1")
    assert main(["export-gguf", "--model", str(folder), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert "sliding window of 8 tokens" in capsys.readouterr().err
