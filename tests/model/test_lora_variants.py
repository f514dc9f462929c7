"""rsLoRA and DoRA layers against peft's implementation of the same (fp32, 1e-5), and LoRA targets by their
Hugging Face names."""

import pytest
import torch
from torch import nn

from model.hf_format import native_to_hf_name
from model.loading import load_model
from model.lora import LoRALinear, inject_lora, lora_state_dict, merge_lora, merged_state_dict
from model.settings import HF_LORA_TARGETS, LoRAArgs

peft = pytest.importorskip("peft")


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def peft_and_tailor_layers(rank=4, alpha=8.0, dropout=0.0, rslora=False, dora=False, seed=0):
    """The same adapted layer twice, peft's and tailor's, with random A, B and (DoRA) magnitudes moved off the
    row norms, so that every part of the formula shows."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 16, generator=generator)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, use_dora=dora, target_modules=["proj"]
    )
    reference = peft.get_peft_model(OneLayer(weight), config)
    layer = reference.base_model.model.proj
    ours = LoRALinear(nn.Linear(16, 24, bias=False), rank, alpha, dropout, rslora=rslora, dora=dora)
    with torch.no_grad():
        ours.weight.copy_(weight)
        for mine, theirs in ((ours.lora_A, layer.lora_A["default"]), (ours.lora_B, layer.lora_B["default"])):
            theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=generator))
            mine.weight.copy_(theirs.weight)
        if dora:
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=generator))
            ours.lora_magnitude.weight.copy_(magnitude)
    return reference, layer, ours


def trained_parameters(layer, ours, dora):
    pairs = [(ours.lora_A.weight, layer.lora_A["default"].weight), (ours.lora_B.weight, layer.lora_B["default"].weight)]
    if dora:
        pairs.append((ours.lora_magnitude.weight, layer.lora_magnitude_vector["default"].weight))
    return pairs


@pytest.mark.parametrize(
    "variant",
    [dict(rslora=True), dict(dora=True), dict(dora=True, rslora=True), dict(dora=True, dropout=0.3)],
    ids=["rslora", "dora", "dora-rslora", "dora-dropout"],
)
def test_layer_output_and_gradients_equal_peft(variant):
    reference, layer, ours = peft_and_tailor_layers(**variant)
    reference.train(), ours.train()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)  # with dropout: the same mask, drawn once by each
    expected = reference(x)
    torch.manual_seed(3)
    got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ((expected - target) ** 2).sum().backward()
    ((got - target) ** 2).sum().backward()
    for mine, theirs in trained_parameters(layer, ours, variant.get("dora", False)):
        assert theirs.grad is not None and theirs.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_the_square_root_of_the_rank():
    assert LoRAArgs(rank=16, alpha=32.0, rslora=True).scaling == 8.0
    assert LoRAArgs(rank=16, alpha=32.0).scaling == 2.0
    _, layer, ours = peft_and_tailor_layers(rank=16, alpha=32.0, rslora=True)
    assert ours.scaling == layer.scaling["default"] == 8.0


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_peft_merge_and_the_unmerged_layer(dora):
    reference, layer, ours = peft_and_tailor_layers(rslora=True, dora=dora)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    ours.eval()
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge()
        merged = reference.merge_and_unload()
        torch.testing.assert_close(ours.weight, merged.proj.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-5)


def test_dora_starts_as_an_exact_no_op_and_merges_in_a_state_dict(make_model, random_tokens):
    model = make_model("mistral-7b")
    tokens = random_tokens(12)
    with torch.no_grad():
        before = model(tokens, [12])
    inject_lora(model, LoRAArgs(rank=4, dora=True, targets=("all-linear",)))
    state = lora_state_dict(model)
    magnitudes = [k for k in state if k.endswith(".lora_magnitude.weight")]
    assert len(magnitudes) == 2 * 7 and state["layers.0.attention.wq.lora_magnitude.weight"].shape == (64,)
    torch.testing.assert_close(
        state["layers.0.attention.wq.lora_magnitude.weight"], model.layers[0].attention.wq.weight.norm(dim=1)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, [12]), before, rtol=1e-6, atol=1e-6)
        for name, tensor in lora_state_dict(model).items():  # move every part off its start
            model.get_parameter(name).add_(0.05 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(5)))
        adapted = model(tokens, [12])
        merged = merged_state_dict(model)
        merge_lora(model)
        torch.testing.assert_close(model(tokens, [12]), adapted, rtol=1e-5, atol=1e-5)
    assert not any(".lora_" in k for k in merged)
    torch.testing.assert_close(merged["layers.1.feed_forward.w2.weight"], model.layers[1].feed_forward.w2.weight)


def test_targets_by_hugging_face_names_and_all_linear():
    assert LoRAArgs(targets=("q_proj", "down_proj", "lm_head", "wq")).targets == ("wq", "w2", "output")
    assert LoRAArgs(targets=("all-linear",)).targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    assert LoRAArgs(targets=("all-linear", "lm_head")).targets[-1] == "output"
    with pytest.raises(ValueError, match="'qproj'; expected some of wq .* q_proj .* all-linear"):
        LoRAArgs(targets=("qproj",))
    for hf, native in HF_LORA_TARGETS.items():  # the same names as model/hf_format.py's conversion
        section = "attention" if native in ("wq", "wk", "wv", "wo") else "feed_forward"
        weight = "output.weight" if native == "output" else f"layers.0.{section}.{native}.weight"
        assert native_to_hf_name(weight).rpartition(".weight")[0].rpartition(".")[2] == hf


def test_a_dora_adapter_is_refused_on_nf4_weights(tiny_folder):
    with pytest.raises(ValueError, match="a DoRA adapter does not run on NF4 weights"):
        load_model(tiny_folder("mistral-7b"), lora=LoRAArgs(rank=4, dora=True), quantize="nf4")
