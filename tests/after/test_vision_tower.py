"""A checkpoint with a vision tower, through every reader of weights: training builds text-only LoRA on it, chat
loads it, merge keeps the tower unchanged and says so, export-hf leaves it out and says so."""

import torch
from multimodal import VISION_TOWER
from safetensors import safe_open

from finetune.cli import main
from finetune.config import config_from_dict
from finetune.training.distributed import DistInfo
from finetune.training.model_setup import build_training_model
from model.args import load_model_args
from model.loading import load_model
from model.weights import read_weights


def training_model(model_dir):
    cfg = config_from_dict(
        {
            "run_dir": "unused",
            "model": {"path": str(model_dir), "dtype": "fp32"},
            "data": {"train": "unused.jsonl"},
            "eval": {"enabled": False},
            "lora": {"rank": 4, "alpha": 8},
        }
    )
    return build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, torch.device("cpu")))


def test_training_builds_text_only_lora_on_a_multimodal_checkpoint(tiny_folder, multimodal_folder, capsys):
    model = training_model(multimodal_folder())
    assert "vision tower (4 tensors) is not loaded" in capsys.readouterr().out
    plain = training_model(tiny_folder("mistral-7b"))
    assert list(model.state_dict()) == list(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


def test_chat_loads_the_decoder_and_says_the_tower_is_not_loaded(multimodal_folder, capsys):
    code = main(["chat", str(multimodal_folder()), "--prompt", "Hi", "--max-tokens", "2"])
    assert code == 0
    assert "vision tower (4 tensors) is not loaded" in capsys.readouterr().err


def test_merge_keeps_the_tower_and_export_leaves_it_out(adapter_checkpoint, multimodal_folder, tmp_path, capsys):
    _, checkpoint = adapter_checkpoint("mistral-7b")  # an adapter of the same decoder
    base = multimodal_folder()
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(checkpoint), "--out", str(merged)]) == 0
    assert "vision tower (4 tensors) is copied unchanged" in capsys.readouterr().out
    kept = dict(read_weights(merged, vision_tower=True))
    for name, tensor in read_weights(base, vision_tower=True):
        if name in VISION_TOWER["native"]:
            assert torch.equal(kept[name], tensor), name
    assert not torch.equal(
        kept["layers.0.attention.wq.weight"], dict(read_weights(base))["layers.0.attention.wq.weight"]
    )

    hf = tmp_path / "hf"
    assert main(["export-hf", "--model", str(merged), "--out", str(hf)]) == 0
    assert "left out the vision tower (4 tensors)" in capsys.readouterr().out
    with safe_open(hf / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert not any(name.startswith(("vision", "pre_mm")) for name in names)
    reloaded, merged_model = load_model(hf, dtype=torch.float32), load_model(merged, dtype=torch.float32)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), merged_model.state_dict().items()):
        assert torch.equal(a, b), name
