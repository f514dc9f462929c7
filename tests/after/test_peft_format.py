import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.after.export_hf import export_hf
from finetune.after.peft_format import export_peft, import_peft
from finetune.cli import main
from model.hf_format import permute_to_hf
from model.loading import load_model
from model.lora import LoRAArgs, load_lora_state_dict

MIXTRAL_TARGETS = ("wq", "wv", "w1", "w2", "w3", "output")


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, [len(tokens)])


@pytest.mark.parametrize("arch, targets", [("mistral-7b", None), ("mixtral-8x7b", MIXTRAL_TARGETS)])
def test_export_then_import_is_exact(arch, targets, adapter_checkpoint, tmp_path):
    base, checkpoint = adapter_checkpoint(arch, **({"targets": targets} if targets else {}))
    peft_dir = export_peft(checkpoint, tmp_path / "peft")
    back = import_peft(peft_dir, tmp_path / "back", base)

    original, imported = load_file(checkpoint / "lora.safetensors"), load_file(back / "lora.safetensors")
    assert original.keys() == imported.keys()
    for name in original:
        assert torch.equal(original[name], imported[name]), name
    assert json.loads((back / "params.json").read_text()) == json.loads((checkpoint / "params.json").read_text())
    assert (back / "tokenizer.model.v3").is_file()


def test_peft_files_follow_peft_naming_and_rotary_layout(adapter_checkpoint, tmp_path):
    _, checkpoint = adapter_checkpoint("mistral-7b")
    out = export_peft(checkpoint, tmp_path / "peft", base_model_name_or_path="mistralai/Mistral-7B-v0.3")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    assert config["base_model_name_or_path"] == "mistralai/Mistral-7B-v0.3"

    peft, native = load_file(out / "adapter_model.safetensors"), load_file(checkpoint / "lora.safetensors")
    assert len(peft) == len(native)
    prefix = "base_model.model.model.layers.1"
    q_b = native["layers.1.attention.wq.lora_B.weight"]
    assert torch.equal(peft[f"{prefix}.self_attn.q_proj.lora_B.weight"], permute_to_hf(q_b, 4, 16))
    assert torch.equal(peft[f"{prefix}.self_attn.k_proj.lora_A.weight"], native["layers.1.attention.wk.lora_A.weight"])
    assert torch.equal(peft[f"{prefix}.mlp.down_proj.lora_B.weight"], native["layers.1.feed_forward.w2.lora_B.weight"])
    assert "base_model.model.lm_head.lora_A.weight" in peft


@pytest.mark.parametrize("arch, targets", [("mistral-7b", None), ("mixtral-8x7b", MIXTRAL_TARGETS)])
def test_transformers_with_exported_peft_adapter_equals_tailor(
    arch, targets, adapter_checkpoint, adapted_model, tmp_path
):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, checkpoint = adapter_checkpoint(arch, **({"targets": targets} if targets else {}))
    hf_base = export_hf(base, tmp_path / "hf")
    peft_dir = export_peft(checkpoint, tmp_path / "peft")
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(reference, peft_dir).eval()

    model = adapted_model(base, checkpoint)
    tokens = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens[None]).logits[0]
        with reference.disable_adapter():
            without_adapter = reference(tokens[None]).logits[0]
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-4, atol=1e-4)
    assert (expected - without_adapter).abs().max() > 0.1  # the adapter matters


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_made_with_peft_imports_to_the_same_model(use_rslora, tiny_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_folder("mistral-7b")
    hf_base = export_hf(base, tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=use_rslora, target_modules=targets, init_lora_weights=False
    )  # random B, not zeros
    reference = peft.get_peft_model(reference, config).eval()
    reference.save_pretrained(tmp_path / "peft")

    checkpoint = import_peft(tmp_path / "peft", tmp_path / "ckpt", base)
    params = json.loads((checkpoint / "params.json").read_text())["lora"]
    assert params["targets"] == ["wq", "wk", "wv", "wo", "w2", "w3"] and params["rank"] == 4
    state = load_file(checkpoint / "lora.safetensors")
    lora = LoRAArgs(rank=4, alpha=params["alpha"], targets=params["targets"], rslora=params["rslora"])
    model = load_model(base, dtype=torch.float32, lora=lora)
    load_lora_state_dict(model, state)
    tokens = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(tokens[None]).logits[0]
    torch.testing.assert_close(logits(model.eval(), tokens), expected, rtol=1e-4, atol=1e-4)


def write_peft(folder, config: dict, state: dict):
    folder.mkdir()
    base_config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps({**base_config, **config}))
    save_file(state, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    "config, message",
    [
        ({"bias": "all"}, "bias 'all' is not supported"),
        ({"target_parameters": ["gate_up_proj"]}, "transformers 5's fused Mixtral experts"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ],
)
def test_import_refuses_what_tailor_cannot_express(config, message, tiny_folder, tmp_path):
    peft_dir = write_peft(tmp_path / "peft", config, {})
    with pytest.raises(ValueError, match=message) as error:
        import_peft(peft_dir, tmp_path / "out", tiny_folder("mistral-7b"))
    assert str(peft_dir / "adapter_config.json") in str(error.value)


def test_import_refuses_unsupported_modules_and_incomplete_adapters(tiny_folder, tmp_path):
    base = tiny_folder("mistral-7b")
    prefix = "base_model.model.model"
    embed = {f"{prefix}.embed_tokens.lora_embedding_A": torch.zeros(2, 32768)}
    with pytest.raises(ValueError, match="modules tailor cannot adapt: .*embed_tokens"):
        import_peft(write_peft(tmp_path / "embed", {}, embed), tmp_path / "out", base)
    one_layer = {
        f"{prefix}.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        f"{prefix}.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
    }
    with pytest.raises(ValueError, match="does not fit the model of .*missing .*layers.1.attention.wq.lora_A"):
        import_peft(write_peft(tmp_path / "partial", {}, one_layer), tmp_path / "out", base)


def test_cli_commands(adapter_checkpoint, tmp_path, capsys):
    base, checkpoint = adapter_checkpoint("mistral-7b")
    assert main(["export-peft", "--adapter", str(checkpoint), "--out", str(tmp_path / "p")]) == 0
    args = ["--peft", str(tmp_path / "p"), "--base", str(base), "--out", str(tmp_path / "c")]
    assert main(["import-peft", *args]) == 0
    assert main(["export-peft", "--adapter", str(base), "--out", str(tmp_path / "q")]) == 2
    assert f"error: {base}: no lora.safetensors" in capsys.readouterr().err


def test_export_peft_says_before_writing_that_servers_refuse_an_output_head_adapter(
    adapter_checkpoint, tmp_path, capsys, monkeypatch
):
    """vLLM refuses LoRA on lm_head (tests/serving/test_vllm.py shows it): the user hears it at export, not serving."""
    import finetune.after.peft_format as peft_format

    told_before_writing = []
    original = peft_format.export_peft

    def export_peft(*args):
        told_before_writing.append(capsys.readouterr().err)
        return original(*args)

    monkeypatch.setattr(peft_format, "export_peft", export_peft)
    _, with_head = adapter_checkpoint("mistral-7b")
    assert main(["export-peft", "--adapter", str(with_head), "--out", str(tmp_path / "with_head")]) == 0
    assert told_before_writing[0].startswith("warning: LoRA on the output head (lora.targets has 'output'): vLLM")
    assert "merge it (tailor merge, then export-hf or export-gguf), or train without 'output'" in told_before_writing[0]

    _, projections = adapter_checkpoint("mistral-7b", targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    assert main(["export-peft", "--adapter", str(projections), "--out", str(tmp_path / "projections")]) == 0
    assert "output head" not in told_before_writing[1] + capsys.readouterr().err
