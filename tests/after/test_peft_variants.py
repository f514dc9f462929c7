"""rsLoRA and DoRA adapters through import-peft, export-peft and merge, against peft on the tiny Mistral (fp32):
the logits after import, the gradients of one step, the merged model, and the files peft reads back."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finetune.after.export_hf import export_hf
from finetune.after.merge import merge_adapter
from finetune.after.peft_format import export_peft, import_peft
from finetune.checkpoints.adapter import read_adapter
from model.hf_format import convert_tensor_to_hf
from model.loading import load_model
from model.lora import lora_state_dict

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_adapter(tiny_folder, tmp_path_factory):
    """`peft_adapter(use_rslora, use_dora)`: (base folder, HF base folder, peft adapter folder) with random B and
    magnitudes moved off their start, saved by peft."""
    made = {}

    def make(use_rslora: bool, use_dora: bool):
        if (use_rslora, use_dora) not in made:
            base = tiny_folder("mistral-7b")
            folder = tmp_path_factory.mktemp("peft")
            hf_base = export_hf(base, folder / "hf")
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
            config = peft.LoraConfig(
                r=4,
                lora_alpha=8,
                use_rslora=use_rslora,
                use_dora=use_dora,
                target_modules=HF_TARGETS,
                init_lora_weights=False,
            )
            torch.manual_seed(0)  # peft draws A and B from the global generator
            model = peft.get_peft_model(model, config)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_magnitude_vector" in name:
                        param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))
            model.save_pretrained(folder / "adapter")
            made[use_rslora, use_dora] = base, hf_base, folder / "adapter"
        return made[use_rslora, use_dora]

    return make


def peft_model(hf_base, adapter):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)


def tokens():
    return torch.randint(0, 32768, (24,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_rslora, use_dora", [(True, False), (False, True), (True, True)])
def test_imported_adapter_gives_peft_logits_and_gradients(use_rslora, use_dora, peft_adapter, tmp_path):
    base, hf_base, adapter = peft_adapter(use_rslora, use_dora)
    checkpoint = import_peft(adapter, tmp_path / "ckpt", base)
    entry = json.loads((checkpoint / "params.json").read_text())["lora"]
    assert (entry["rslora"], entry["dora"], entry["alpha"]) == (use_rslora, use_dora, 8)
    assert entry["scaling"] == (4.0 if use_rslora else 2.0)

    state, lora = read_adapter(checkpoint)
    model = load_model(base, dtype=torch.float32, lora=lora)
    model.load_state_dict(state, strict=False)
    reference = peft_model(hf_base, adapter)
    ids = tokens()
    logits, expected = model(ids, [len(ids)]), reference(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    F.cross_entropy(logits[:-1], ids[1:]).backward()
    F.cross_entropy(expected[:-1], ids[1:]).backward()
    theirs = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    for name in lora_state_dict(model):
        hf_name, grad = convert_tensor_to_hf(name, model.get_parameter(name).grad, model.args)
        hf_name = hf_name.replace("lora_A.weight", "lora_A.default.weight").replace(
            "lora_B.weight", "lora_B.default.weight"
        )
        hf_name = hf_name.replace("lora_magnitude.weight", "lora_magnitude_vector.default.weight")
        torch.testing.assert_close(grad, theirs[f"base_model.model.{hf_name}"], rtol=1e-5, atol=1e-5)
    assert len(theirs) == len(lora_state_dict(model)) == 2 * 7 * (3 if use_dora else 2)


@pytest.mark.parametrize("use_rslora, use_dora", [(True, True), (False, True)])
def test_exported_adapter_is_peft_s_and_merges_to_its_logits(use_rslora, use_dora, peft_adapter, tmp_path):
    base, hf_base, adapter = peft_adapter(use_rslora, use_dora)
    checkpoint = import_peft(adapter, tmp_path / "ckpt", base)
    exported = export_peft(checkpoint, tmp_path / "again")
    config = json.loads((exported / "adapter_config.json").read_text())
    assert (config["use_rslora"], config["use_dora"], config["lora_alpha"]) == (use_rslora, use_dora, 8)
    original, again = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(exported / "adapter_model.safetensors"),
    )
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key

    ids = tokens()
    with torch.no_grad():
        expected = peft_model(hf_base, exported).merge_and_unload().eval()(ids[None]).logits[0]  # peft's merge
        merged = load_model(merge_adapter(base, checkpoint, tmp_path / "merged"), dtype=torch.float32)
        torch.testing.assert_close(merged(ids, [len(ids)]), expected, rtol=1e-5, atol=1e-5)


def test_checkpoints_without_the_variant_keys_read_as_plain_lora(adapter_checkpoint, tmp_path):
    _, checkpoint = adapter_checkpoint("mistral-7b")
    params = json.loads((checkpoint / "params.json").read_text())
    older = tmp_path / "older"
    older.mkdir()
    (older / "lora.safetensors").write_bytes((checkpoint / "lora.safetensors").read_bytes())
    params["lora"] = {k: v for k, v in params["lora"].items() if k not in ("rslora", "dora")}
    (older / "params.json").write_text(json.dumps(params))
    _, lora = read_adapter(older)
    assert (lora.rslora, lora.dora, lora.scaling) == (False, False, 2.0)

    params["lora"]["dora"] = True
    (older / "params.json").write_text(json.dumps(params))
    with pytest.raises(
        ValueError, match=r"layers.0.attention.wk has lora_magnitude None, where params.json's lora.dora is true"
    ):
        read_adapter(older)
