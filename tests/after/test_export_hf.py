import json

import pytest
import torch
from safetensors import safe_open

from finetune.after.export_hf import export_hf
from finetune.after.merge import merge_adapter
from finetune.cli import main
from model.loading import load_model


@pytest.mark.parametrize("arch", ["mistral-7b", "mixtral-8x7b"])
def test_merged_model_exported_to_hf_runs_in_transformers_as_in_tailor(
    arch, adapter_checkpoint, adapted_model, tmp_path
):
    transformers = pytest.importorskip("transformers")
    base, checkpoint = adapter_checkpoint(arch)
    merged = merge_adapter(base, checkpoint, tmp_path / "merged")
    hf = export_hf(merged, tmp_path / "hf")
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model.v3",
        "tokenizer_config.json",
    ]

    reference = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    model = adapted_model(base, checkpoint)
    tokens = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(tokens[None]).logits[0]
        torch.testing.assert_close(model(tokens, [20]), expected, rtol=1e-4, atol=1e-4)


def test_export_round_trips_through_tailor_loading_exactly(tiny_folder, tmp_path):
    base = tiny_folder("mixtral-8x7b")
    hf = export_hf(base, tmp_path / "hf")
    original, reloaded = load_model(base, dtype=torch.float32), load_model(hf, dtype=torch.float32)
    assert original.args == reloaded.args
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    with safe_open(hf / "model.safetensors", "pt") as handle:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in handle.keys()
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["torch_dtype"] == "float32"


def test_export_casts_to_the_requested_dtype(tiny_folder, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export-hf", "--model", str(tiny_folder()), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    as_in_the_config = tmp_path / "hf_fp16"  # model.dtype's names work too
    assert main(["export-hf", "--model", str(tiny_folder()), "--out", str(as_in_the_config), "--dtype", "fp16"]) == 0
    assert json.loads((as_in_the_config / "config.json").read_text())["torch_dtype"] == "float16"
    assert main(["export-hf", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert f"error: model folder not found: {tmp_path / 'nothing'}" in capsys.readouterr().err


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, how are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "Name three colours: été, 東京, ✓."},
]


@pytest.mark.parametrize("tokenizer", ["v3", "tekken"])
def test_the_exported_folder_gives_mistral_commons_ids_through_auto_tokenizer(tokenizer, tiny_folder, tmp_path):
    """SentencePiece v3 and Tekken: plain text and a chat, as training tokenizes them."""
    transformers = pytest.importorskip("transformers")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    hf = export_hf(tiny_folder(tokenizer=tokenizer), tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    (file,) = [p for p in hf.iterdir() if p.name.startswith(("tokenizer.model", "tekken"))]
    reference = MistralTokenizer.from_file(str(file))
    text = "Fine-tuning Mistral: été, 東京, ✓ and 12345 tokens."
    assert auto(text).input_ids == reference.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=CHAT)).tokens
    assert list(auto.apply_chat_template(CHAT, tokenize=True)["input_ids"]) == expected
