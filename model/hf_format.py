"""Conversion between Mistral's native layout and Hugging Face's Mistral / Mixtral layout.

Two things differ. Names: `layers.0.attention.wq.weight` is `model.layers.0.self_attn.q_proj.weight`, and
Mixtral's experts keep the hub's `block_sparse_moe.experts.{e}.w{1,2,3}` names (transformers 5 fuses them in
memory but reads and writes these). Rotary layout: native checkpoints rotate interleaved pairs of each head's
dimensions, HF rotates the first half against the second, so the output rows of wq and wk are permuted per head.
Any tensor whose rows are wq/wk output rows takes the same permutation, e.g. a LoRA B matrix or DoRA's magnitudes;
names with a `lora_A` / `lora_B` / `lora_magnitude` part convert like their weight, which is what exporting adapters
to PEFT needs.
config.json itself is read and written by model/args.py, with params.json.
"""

from __future__ import annotations

import re

import torch

from model.args import ModelArgs

_TOP_LEVEL = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_IN_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "block_sparse_moe.gate",
}
_TOP_LEVEL_FROM_HF = {hf: native for native, hf in _TOP_LEVEL.items()}
_IN_LAYER_FROM_HF = {hf: native for native, hf in _IN_LAYER.items()}
_NATIVE_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])")
_HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")
_PARAM = re.compile(r"(?P<module>.+?)\.(?P<suffix>(?:lora_[AB]\.|lora_magnitude\.)?weight)")


def _split(name: str) -> tuple[str, str]:
    m = _PARAM.fullmatch(name)
    if m is None:
        raise ValueError(f"tensor {name!r} is not a weight of a Mistral/Mixtral model")
    return m["module"], m["suffix"]


def native_to_hf_name(name: str) -> str:
    """Return the Hugging Face name of a native tensor name (`norm.weight` -> `model.norm.weight`).

    Raises:
        ValueError: `name` is not a weight of a Mistral/Mixtral model, or has no Hugging Face equivalent.
    """
    module, suffix = _split(name)
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{suffix}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if m is not None:
        layer, rest = m.groups()
        if rest in _IN_LAYER:
            return f"model.layers.{layer}.{_IN_LAYER[rest]}.{suffix}"
        if expert := _NATIVE_EXPERT.fullmatch(rest):
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert[1]}.{expert[2]}.{suffix}"
    raise ValueError(f"tensor {name!r} has no Hugging Face equivalent")


def hf_to_native_name(name: str) -> str:
    """Return the native name of a Hugging Face tensor name (`model.embed_tokens.weight` -> `tok_embeddings.weight`).

    Raises:
        ValueError: `name` is not a Mistral/Mixtral weight this converter knows.
    """
    module, suffix = _split(name)
    if module in _TOP_LEVEL_FROM_HF:
        return f"{_TOP_LEVEL_FROM_HF[module]}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m is not None:
        layer, rest = m.groups()
        if rest in _IN_LAYER_FROM_HF:
            return f"layers.{layer}.{_IN_LAYER_FROM_HF[rest]}.{suffix}"
        if expert := _HF_EXPERT.fullmatch(rest):
            return f"layers.{layer}.feed_forward.experts.{expert[1]}.{expert[2]}.{suffix}"
    raise ValueError(f"tensor {name!r} is not a Mistral/Mixtral weight this converter knows")


def permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs (r0, i0, r1, i1, ...) to halves (r0, r1, ..., i0, i1, ...)."""
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_to_native(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`."""
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rotary_heads(native_name: str, args: ModelArgs) -> int | None:
    """Number of heads whose rows a tensor carries, when those rows feed the rotary embedding."""
    module, suffix = _split(native_name)
    if suffix == "lora_A.weight":  # A maps the input; its rows are rank, not head dimensions
        return None
    if module.endswith("attention.wq"):
        return args.n_heads
    if module.endswith("attention.wk"):
        return args.n_kv_heads
    return None


def convert_tensor_to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """Rename a native tensor to Hugging Face's name, permuting rows that feed the rotary embedding.

    Raises:
        ValueError: the name has no Hugging Face equivalent (see `native_to_hf_name`).
    """
    heads = _rotary_heads(name, args)
    if heads is not None:
        tensor = permute_to_hf(tensor, heads, args.head_dim)
    return native_to_hf_name(name), tensor


def convert_tensor_to_native(hf_name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """Rename a Hugging Face tensor to the native name, permuting rows that feed the rotary embedding back.

    Raises:
        ValueError: the name is not one this converter knows (see `hf_to_native_name`).
    """
    name = hf_to_native_name(hf_name)
    heads = _rotary_heads(name, args)
    if heads is not None:
        tensor = permute_to_native(tensor, heads, args.head_dim)
    return name, tensor
