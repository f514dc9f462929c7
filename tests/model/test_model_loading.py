import json

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file, save_file

from model.args import load_model_args
from model.loading import load_model, save_model_folder
from model.lora import LoRAArgs, merge_lora
from model.tiny import random_state_dict, write_tiny_model
from model.tokenizer_files import TOKENIZER_FILES

SEQLENS = [9, 14]


def logits_of(model, seed=0):
    tokens = torch.randint(0, model.args.vocab_size, (sum(SEQLENS),), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens, SEQLENS)


@pytest.mark.parametrize("arch", ["mistral-7b-v0.1", "nemo-12b", "mixtral-8x7b"])
def test_every_layout_loads_the_same_model(arch, tiny_folder):
    expected = logits_of(load_model(tiny_folder(arch, "native"), dtype=torch.float32))
    for layout in ("hf", "pth", "sharded"):
        got = logits_of(load_model(tiny_folder(arch, layout), dtype=torch.float32))
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=layout)


def test_dtype_and_lora_options(tiny_folder):
    folder = tiny_folder("mistral-7b")
    model = load_model(folder, dtype=torch.bfloat16, lora=LoRAArgs(rank=4))
    wq = model.layers[0].attention.wq
    assert wq.weight.dtype == torch.bfloat16 and wq.lora_A.weight.dtype == torch.float32
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n
    }
    plain = load_model(folder, dtype=torch.bfloat16)
    torch.testing.assert_close(logits_of(model), logits_of(plain), rtol=0, atol=0)  # B = 0


def rewrite_weights(src, dst, edit):
    """Copy a native folder, editing its state dict."""
    state = load_file(src / "consolidated.safetensors")
    edit(state)
    dst.mkdir()
    (dst / "params.json").write_text((src / "params.json").read_text())
    save_file(state, dst / "consolidated.safetensors")
    return dst


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("layers.1.ffn_norm.weight"), "missing tensor(s) ['layers.1.ffn_norm.weight']"),
        (
            lambda s: s.update({"layers.0.attention.wk.weight": torch.zeros(3, 64)}),
            "tensor 'layers.0.attention.wk.weight' has shape (3, 64), the model's params expect (32, 64)",
        ),
        (
            lambda s: s.update({"layers.2.attention.wk.weight": torch.zeros(32, 64)}),
            "unexpected tensor 'layers.2.attention.wk.weight'",
        ),
        (
            lambda s: s.update({"norm.weight": torch.ones(64, dtype=torch.int8)}),
            "tensor 'norm.weight' is int8, where the model has a float weight",
        ),
    ],
)
def test_bad_checkpoints_name_the_tensor_and_file(edit, words, tiny_folder, tmp_path):
    folder = rewrite_weights(tiny_folder("mistral-7b"), tmp_path / "bad", edit)
    with pytest.raises(ValueError) as err:
        load_model(folder, dtype=torch.float32)
    assert words in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_vision_tower_of_multimodal_checkpoints_is_skipped(layout, tiny_folder, multimodal_folder):
    expected = logits_of(load_model(tiny_folder("mistral-7b", layout), dtype=torch.float32))
    got = logits_of(load_model(multimodal_folder(layout), dtype=torch.float32))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_save_model_folder_round_trip_and_merged_lora(tiny_folder, tmp_path):
    torch.manual_seed(0)  # LoRA A comes from the global generator: fixed here, whatever ran before
    model = load_model(tiny_folder("mixtral-8x7b"), dtype=torch.float32, lora=LoRAArgs(rank=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        save_model_folder(model, model.args, tmp_path / "no")
    expected = logits_of(model)
    merge_lora(model)
    tokenizer = tiny_folder("mixtral-8x7b") / "tokenizer.model.v3"
    folder = save_model_folder(model, model.args, tmp_path / "merged", tokenizer_file=tokenizer)
    assert (folder / "tokenizer.model.v3").read_bytes() == tokenizer.read_bytes()
    assert load_model_args(folder) == model.args
    torch.testing.assert_close(logits_of(load_model(folder, dtype=torch.float32)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TOKENIZER_FILES))
def test_tiny_folder_holds_a_tokenizer_matching_the_vocabulary(name, tiny_folder):
    folder = tiny_folder("mistral-7b", "native", name)
    tokenizer = MistralTokenizer.from_file(str(folder / TOKENIZER_FILES[name].filename))
    assert tokenizer.instruct_tokenizer.tokenizer.n_words == TOKENIZER_FILES[name].vocab_size
    assert json.loads((folder / "params.json").read_text())["vocab_size"] == TOKENIZER_FILES[name].vocab_size


def test_tiny_models_are_deterministic_per_seed(tmp_path):
    a = write_tiny_model(tmp_path / "a", "mixtral-8x22b", seed=3)
    b = write_tiny_model(tmp_path / "b", "mixtral-8x22b", seed=3)
    assert (a / "consolidated.safetensors").read_bytes() == (b / "consolidated.safetensors").read_bytes()
    args = load_model_args(a)
    other = random_state_dict(args, seed=4)
    assert not torch.equal(
        other["layers.0.attention.wq.weight"], load_file(a / "consolidated.safetensors")["layers.0.attention.wq.weight"]
    )


@pytest.mark.parametrize("arch", ["mistral-7b-v0.1", "nemo-12b", "codestral-22b", "mixtral-8x7b"])
def test_logits_equal_transformers_on_the_same_weights(arch, tiny_folder):
    """Names, the q/k rotary permutation, GQA, sliding window, RMSNorm and MoE routing, all against HF."""
    transformers = pytest.importorskip("transformers")
    folder = tiny_folder(arch, "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    expected_class = "MixtralForCausalLM" if "mixtral" in arch else "MistralForCausalLM"
    assert type(reference).__name__ == expected_class
    model = load_model(folder, dtype=torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (sum(SEQLENS),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # HF runs each document alone; ours runs them packed
        expected = torch.cat([reference(doc[None]).logits[0] for doc in tokens.split(SEQLENS)])
        torch.testing.assert_close(model(tokens, SEQLENS), expected, rtol=1e-4, atol=1e-4)
