import torch

from model.args import ModelArgs
from model.hf_format import (
    convert_tensor_to_hf,
    convert_tensor_to_native,
    hf_to_native_name,
    native_to_hf_name,
    permute_to_hf,
    permute_to_native,
)
from model.lora import LoRAArgs, inject_lora
from model.tiny import tiny_args
from model.transformer import Transformer


def test_names_round_trip_for_every_tensor_of_mixtral_with_lora():
    with torch.device("meta"):
        model = Transformer(tiny_args("mixtral-8x7b", 256))
    inject_lora(model, LoRAArgs(rank=2, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")))
    names = list(model.state_dict())
    hf_names = [native_to_hf_name(n) for n in names]
    assert [hf_to_native_name(n) for n in hf_names] == names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hf_names
    assert "model.layers.0.self_attn.q_proj.lora_B.weight" in hf_names
    assert native_to_hf_name("layers.0.feed_forward.w1.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert native_to_hf_name("layers.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"


def test_rotary_permutation_turns_interleaved_pairs_into_halves():
    w = torch.arange(8.0)[:, None]  # one head of head_dim 8: rows r0 i0 r1 i1 r2 i2 r3 i3
    assert permute_to_hf(w, 1, 8).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    x = torch.randn(3 * 16, 5)
    torch.testing.assert_close(permute_to_native(permute_to_hf(x, 3, 16), 3, 16), x, rtol=0, atol=0)


def test_lora_b_takes_the_weight_permutation():
    """Exporting adapters to HF must give the HF weight of the merged model: P(W + B A) = P(W) + P(B) A."""
    args = ModelArgs(
        dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5, vocab_size=10
    )
    for module, rows in (("wq", 32), ("wk", 16)):
        w, b, a = torch.randn(rows, 32), torch.randn(rows, 4), torch.randn(4, 32)
        hf_name, hf_w = convert_tensor_to_hf(f"layers.0.attention.{module}.weight", w, args)
        _, hf_b = convert_tensor_to_hf(f"layers.0.attention.{module}.lora_B.weight", b, args)
        a_name, hf_a = convert_tensor_to_hf(f"layers.0.attention.{module}.lora_A.weight", a, args)
        _, hf_merged = convert_tensor_to_hf(f"layers.0.attention.{module}.weight", w + b @ a, args)
        torch.testing.assert_close(hf_w + hf_b @ hf_a, hf_merged, rtol=1e-5, atol=1e-5)
        assert hf_a is a  # A maps the input: never permuted
        name, back = convert_tensor_to_native(hf_name, hf_w, args)
        assert name == f"layers.0.attention.{module}.weight"
        torch.testing.assert_close(back, w, rtol=0, atol=0)
