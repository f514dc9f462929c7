import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model.lora import (
    LoRAArgs,
    LoRALinear,
    init_lora_weights,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    lora_switched_off,
    mark_only_lora_trainable,
    merge_lora,
    merged_state_dict,
)
from model.transformer import Transformer

SEQLENS = [7, 9]


def randomize_lora_b(model, seed=1):
    """B starts at zero, which would make every adapter test trivially pass."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)


def test_lora_linear_computes_the_formula():
    layer = LoRALinear(nn.Linear(12, 10, bias=False), rank=3, alpha=6.0)
    randomize_lora_b(layer)
    x = torch.randn(5, 12)
    a, b, w = layer.lora_A.weight, layer.lora_B.weight, layer.weight
    torch.testing.assert_close(layer(x), x @ w.T + (6.0 / 3) * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-6)


def test_initialisation_b_zero_a_kaiming_uniform():
    layer = LoRALinear(nn.Linear(64, 32, bias=False), rank=8, alpha=16.0)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3


def test_b_zero_equals_base_model(make_model, random_tokens):
    model = make_model("mixtral-8x7b")
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        base = model(tokens, SEQLENS)
        inject_lora(model, LoRAArgs(rank=4, alpha=8.0))
        torch.testing.assert_close(model(tokens, SEQLENS), base, rtol=0, atol=0)


def test_switched_off_the_adapters_give_the_base_model_and_come_back_after(make_model, random_tokens):
    model = make_model("mixtral-8x7b")
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        base = model(tokens, SEQLENS)
        inject_lora(model, LoRAArgs(rank=4, alpha=8.0, targets=("wq", "wo", "w1", "output")))
        randomize_lora_b(model)
        adapted = model(tokens, SEQLENS)
        assert not torch.allclose(adapted, base)
        with lora_switched_off(model):
            torch.testing.assert_close(model(tokens, SEQLENS), base, rtol=0, atol=0)
        torch.testing.assert_close(model(tokens, SEQLENS), adapted, rtol=0, atol=0)
        with pytest.raises(RuntimeError), lora_switched_off(model):
            raise RuntimeError("an eval that fails")
        assert {m.scaling for m in model.modules() if isinstance(m, LoRALinear)} == {2.0}  # restored all the same
        merge_lora(model)
        with pytest.raises(ValueError, match="merged"), lora_switched_off(model):
            pass


def test_targets_cover_every_expert_and_optionally_the_output_head(make_model):
    model = make_model("mixtral-8x7b")
    inject_lora(model, LoRAArgs(rank=2))
    n_layers, n_experts = model.args.n_layers, model.args.moe.num_experts
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == n_layers * (4 + 3 * n_experts)
    assert isinstance(model.layers[1].feed_forward.experts[3].w2, LoRALinear)
    assert type(model.layers[0].feed_forward.gate) is nn.Linear and type(model.output) is nn.Linear
    head = make_model("mistral-7b")
    inject_lora(head, LoRAArgs(rank=2, targets=("wq", "output")))
    assert isinstance(head.output, LoRALinear) and type(head.layers[0].attention.wk) is nn.Linear
    with pytest.raises(ValueError, match="targets has 'wx'; expected some of wq wk wv wo w1 w2 w3 output"):
        LoRAArgs(targets=("wx",))
    with pytest.raises(ValueError, match="targets must name at least one module"):
        LoRAArgs(targets=())
    for bad, words in [
        (dict(rank=0), "rank must be >= 1, got 0"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(plus_ratio=0.0), "plus_ratio must be > 0, got 0.0"),
    ]:
        with pytest.raises(ValueError, match=words):
            LoRAArgs(**bad)


def test_merged_equals_unmerged(make_model, random_tokens):
    model = make_model("mixtral-8x7b")
    inject_lora(model, LoRAArgs(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")))
    randomize_lora_b(model)
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        unmerged = model(tokens, SEQLENS)
        merge_lora(model)
        merge_lora(model)  # idempotent: the second call must not add the update twice
        torch.testing.assert_close(model(tokens, SEQLENS), unmerged, rtol=1e-4, atol=1e-4)


def test_merged_state_dict_leaves_the_model_unmerged(make_model):
    model = make_model("mixtral-8x7b").to(torch.bfloat16)
    inject_lora(model, LoRAArgs(rank=4, alpha=8.0))
    randomize_lora_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    merge_lora(model)
    expected = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert merged.keys() == expected.keys() and merged["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(merged_state_dict(model), expected, rtol=0, atol=0)  # already merged: as stored


def test_only_lora_parameters_train(make_model, random_tokens):
    model = make_model("mixtral-8x7b").train()
    inject_lora(model, LoRAArgs(rank=4))
    mark_only_lora_trainable(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == list(lora_state_dict(model)) and trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model(random_tokens(sum(SEQLENS)), SEQLENS).float().logsumexp(-1).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable)
    wq = "layers.0.attention.wq"  # with B = 0, only B gets a gradient at the first step
    assert grads[f"{wq}.lora_B.weight"].abs().sum() > 0 and grads[f"{wq}.lora_A.weight"].abs().sum() == 0


def test_lora_stays_fp32_on_a_bf16_base(make_model, random_tokens):
    model = make_model("mistral-7b").to(torch.bfloat16)
    inject_lora(model, LoRAArgs(rank=4))
    randomize_lora_b(model)
    wq = model.layers[0].attention.wq
    assert wq.weight.dtype == torch.bfloat16 and wq.lora_A.weight.dtype == wq.lora_B.weight.dtype == torch.float32
    logits = model(random_tokens(sum(SEQLENS)), SEQLENS)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_on_a_bf16_base_the_adapter_computes_in_bf16_and_its_gradients_are_fp32():
    """No fp32 copy of the activations (what made one GPU slower than FSDP's mixed precision on several)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False).to(torch.bfloat16), rank=8, alpha=16.0)
    randomize_lora_b(layer)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default:
                casts.append((tuple(args[0].shape), out.dtype))
            return out

    with Casts():
        y = layer(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert (32, 64) not in [shape for shape, _ in casts]  # the activations are never cast
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32
    a, b = layer.lora_A.weight, layer.lora_B.weight
    exact = x.double() @ layer.weight.double().T + 2.0 * (x.double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(y.double(), exact, rtol=2e-2, atol=2e-2)


def test_dropout_only_in_training(make_model, random_tokens):
    model = make_model("mistral-7b")
    inject_lora(model, LoRAArgs(rank=4, dropout=0.5))
    randomize_lora_b(model)
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        eval_a, eval_b = model(tokens, SEQLENS), model(tokens, SEQLENS)
        train = model.train()(tokens, SEQLENS)
    torch.testing.assert_close(eval_a, eval_b, rtol=0, atol=0)
    assert (train - eval_a).abs().amax() > 1e-3


def test_adapter_state_dict_round_trip_with_native_names(make_model, random_tokens):
    lora = LoRAArgs(rank=4, alpha=8.0)
    source = make_model("mistral-7b")
    inject_lora(source, lora)
    randomize_lora_b(source)
    sd = lora_state_dict(source)
    assert sd["layers.0.attention.wq.lora_A.weight"].shape == (4, source.args.dim)
    assert sd["layers.0.attention.wq.lora_B.weight"].shape == (source.args.n_heads * source.args.head_dim, 4)
    assert len(sd) == 2 * 7 * source.args.n_layers and all(t.dtype == torch.float32 for t in sd.values())
    target = make_model("mistral-7b")
    inject_lora(target, lora)
    load_lora_state_dict(target, sd)
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        torch.testing.assert_close(target(tokens, SEQLENS), source(tokens, SEQLENS), rtol=0, atol=0)


def test_adapter_errors_name_the_keys(make_model):
    model = make_model("mistral-7b")
    inject_lora(model, LoRAArgs(rank=4))
    sd = lora_state_dict(model)
    bad = dict(sd)
    bad.pop("layers.1.feed_forward.w2.lora_A.weight")
    bad["layers.0.attention.wq.lora_B.weight"] = torch.zeros(3, 3)
    bad["layers.9.attention.wq.lora_A.weight"] = torch.zeros(4, 64)
    with pytest.raises(ValueError) as err:
        load_lora_state_dict(model, bad)
    message = str(err.value)
    assert "missing ['layers.1.feed_forward.w2.lora_A.weight']" in message
    assert "unexpected ['layers.9.attention.wq.lora_A.weight']" in message
    assert "layers.0.attention.wq.lora_B.weight: adapter (3, 3) vs model (64, 4)" in message
    del bad["layers.0.attention.wq.lora_B.weight"]
    load_lora_state_dict(model, bad, strict=False)  # missing / unexpected tolerated, shapes never


def test_meta_injection_then_to_empty_and_init(make_model):
    args = make_model("mistral-7b").args
    with torch.device("meta"):
        model = Transformer(args)
    inject_lora(model, LoRAArgs(rank=4))
    assert model.layers[0].attention.wq.lora_A.weight.is_meta
    model.to_empty(device="cpu")
    init_lora_weights(model)
    lora = model.layers[0].attention.wq
    assert torch.count_nonzero(lora.lora_B.weight) == 0 and lora.lora_A.weight.abs().max() <= 1 / math.sqrt(64)
