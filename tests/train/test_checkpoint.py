"""Checkpoints appear whole or not at all, and only the newest are kept: training's own save
(save_training_checkpoint) on the tiny model, in one process (tests/train/conftest.py's save_checkpoint)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import finetune.checkpoints.folders as checkpoint
from finetune.checkpoints.folders import CheckpointWriteError, list_checkpoints
from model.args import load_model_args
from model.lora import lora_state_dict, merged_state_dict

LORA_ENTRY = {"rank": 8, "alpha": 16.0, "scaling": 2.0, "dropout": 0.0, "rslora": False, "dora": False}  # conftest.py


def test_adapter_checkpoint_contents(tmp_path, save_checkpoint, tiny_model_dir, tiny_lora_model):
    folder = save_checkpoint(100)
    assert folder == tmp_path / "run" / "checkpoints" / "checkpoint_000100"
    assert sorted(p.name for p in folder.iterdir()) == [
        "lora.safetensors",
        "manifest.json",
        "params.json",
        "tokenizer.model.v3",
    ]
    weights = load_file(folder / "lora.safetensors")
    assert weights.keys() == lora_state_dict(tiny_lora_model).keys()
    assert weights["layers.0.attention.wq.lora_A.weight"].dtype == torch.float32
    assert (weights["layers.0.attention.wq.lora_A.weight"] == 100.0).all()
    params = json.loads((folder / "params.json").read_text())
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
    assert params == dict(load_model_args(tiny_model_dir).to_dict(), lora=dict(LORA_ENTRY, targets=targets))


def test_rotation_keeps_the_newest(tmp_path, save_checkpoint):
    for step in (10, 20, 30, 40):
        save_checkpoint(step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint_000030", "checkpoint_000040"]


def test_rotation_keeps_the_newest_intact_and_sets_a_damaged_one_aside(tmp_path, save_checkpoint, capsys):
    run_dir = tmp_path / "run"
    for step in (10, 20, 30):
        save_checkpoint(step, keep=3)
    damaged = run_dir / "checkpoints" / "checkpoint_000030"
    (damaged / "params.json").write_text("{}")
    save_checkpoint(40, keep=2)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000020", "checkpoint_000040"]
    assert (run_dir / "checkpoints" / "checkpoint_000030.damaged" / "params.json").read_text() == "{}"
    out = capsys.readouterr().out
    assert f"{damaged}: params.json has 2 bytes, the manifest says" in out
    assert "; renamed to checkpoint_000030.damaged, which tailor never uses, counts or deletes" in out
    damaged_again = run_dir / "checkpoints" / "checkpoint_000040"
    (damaged_again / "lora.safetensors").unlink()
    save_checkpoint(30, keep=1)  # a resumed run saving step 30 again
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000030"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint_000030",
        "checkpoint_000030.damaged",
        "checkpoint_000040.damaged",
    ]


def test_a_failed_write_leaves_no_checkpoint(tmp_path, save_checkpoint, monkeypatch):
    save_checkpoint(10)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_params", crash)
    with pytest.raises(CheckpointWriteError, match="disk full"):
        save_checkpoint(20)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint_000010"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint_000010"]


def test_a_leftover_temp_folder_is_never_listed_and_is_replaced(tmp_path, save_checkpoint):
    torn = tmp_path / "run" / "checkpoints" / "checkpoint_000020.tmp"
    torn.mkdir(parents=True)
    (torn / "lora.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path / "run") == []
    save_checkpoint(20)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint_000020"]
    assert not torn.exists()


def test_leftovers_of_killed_writes_and_deletions_are_cleared_by_the_next_save(tmp_path, save_checkpoint):
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("checkpoint_000010.tmp", "checkpoint_000005.old"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "lora.safetensors").write_bytes(b"half")
    save_checkpoint(20)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_000020"]


def test_merged_checkpoint_is_a_model_folder_of_the_merged_weights(tmp_path, save_checkpoint, tiny_lora_model):
    folder = save_checkpoint(7, checkpoint__save_adapters=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "consolidated.safetensors",
        "manifest.json",
        "params.json",
        "tokenizer.model.v3",
    ]
    merged = merged_state_dict(tiny_lora_model)
    torch.testing.assert_close(load_file(folder / "consolidated.safetensors"), merged, rtol=0, atol=0)
    assert not any(".lora_" in name for name in merged)
    assert "lora" not in json.loads((folder / "params.json").read_text())  # a plain model
