"""Checkpoints appear whole or not at all, and only the newest are kept."""

import json

import pytest
import torch
from safetensors.torch import load_file

import finetune.checkpoints.folders as checkpoint
from finetune.checkpoints.folders import list_checkpoints, save_adapter_checkpoint, save_merged_checkpoint
from finetune.checkpoints.streaming import TensorSpec
from model.lora import LoRAArgs

PARAMS = {"dim": 8, "n_layers": 1, "vocab_size": 32}
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq"]}


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.model.v3"
    path.write_bytes(b"tokenizer")
    return path


def save(run_dir, step, tokenizer_file, keep=3):
    state = {
        "layers.0.attention.wq.lora_A.weight": torch.full((4, 8), float(step)),
        "layers.0.attention.wq.lora_B.weight": torch.zeros(8, 4),
    }
    return save_adapter_checkpoint(run_dir, step, state, PARAMS, LoRAArgs(**LORA), tokenizer_file, keep=keep)


def test_adapter_checkpoint_contents(tmp_path, tokenizer_file):
    folder = save(tmp_path / "run", 100, tokenizer_file)
    assert folder == tmp_path / "run" / "checkpoints" / "checkpoint_000100"
    assert sorted(p.name for p in folder.iterdir()) == [
        "lora.safetensors",
        "manifest.json",
        "params.json",
        "tokenizer.model.v3",
    ]
    weights = load_file(folder / "lora.safetensors")
    assert weights["layers.0.attention.wq.lora_A.weight"].dtype == torch.float32
    assert weights["layers.0.attention.wq.lora_A.weight"][0, 0].item() == 100.0
    params = json.loads((folder / "params.json").read_text())
    assert params == dict(PARAMS, lora=dict(LORA, scaling=2.0))


def test_rotation_keeps_the_newest(tmp_path, tokenizer_file):
    for step in (10, 20, 30, 40):
        save(tmp_path / "run", step, tokenizer_file, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint_000030", "checkpoint_000040"]


def test_rotation_keeps_the_newest_intact_and_sets_a_damaged_one_aside(tmp_path, tokenizer_file, capsys):
    run_dir = tmp_path / "run"
    for step in (10, 20, 30):
        save(run_dir, step, tokenizer_file, keep=3)
    damaged = run_dir / "checkpoints" / "checkpoint_000030"
    (damaged / "params.json").write_text("{}")
    save(run_dir, 40, tokenizer_file, keep=2)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000020", "checkpoint_000040"]
    assert (run_dir / "checkpoints" / "checkpoint_000030.damaged" / "params.json").read_text() == "{}"
    out = capsys.readouterr().out
    assert f"{damaged}: params.json has 2 bytes, the manifest says" in out
    assert "; renamed to checkpoint_000030.damaged, which tailor never uses, counts or deletes" in out
    damaged_again = run_dir / "checkpoints" / "checkpoint_000040"
    (damaged_again / "lora.safetensors").unlink()
    save(run_dir, 30, tokenizer_file, keep=1)  # a resumed run saving step 30 again
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_000030"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint_000030",
        "checkpoint_000030.damaged",
        "checkpoint_000040.damaged",
    ]


def test_a_failed_write_leaves_no_checkpoint(tmp_path, tokenizer_file, monkeypatch):
    save(tmp_path / "run", 10, tokenizer_file)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_params", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "run", 20, tokenizer_file)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint_000010"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint_000010"]


def test_a_leftover_temp_folder_is_never_listed_and_is_replaced(tmp_path, tokenizer_file):
    torn = tmp_path / "run" / "checkpoints" / "checkpoint_000020.tmp"
    torn.mkdir(parents=True)
    (torn / "lora.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path / "run") == []
    save(tmp_path / "run", 20, tokenizer_file)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint_000020"]
    assert not torn.exists()


def test_leftovers_of_killed_writes_and_deletions_are_cleared_by_the_next_save(tmp_path, tokenizer_file):
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("checkpoint_000010.tmp", "checkpoint_000005.old"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "lora.safetensors").write_bytes(b"half")
    save(tmp_path / "run", 20, tokenizer_file)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_000020"]


def test_merged_checkpoint_streams_the_weights_into_a_model_folder(tmp_path, tokenizer_file):
    weights = {
        "tok_embeddings.weight": torch.arange(32 * 8, dtype=torch.float32).reshape(32, 8).to(torch.bfloat16),
        "norm.weight": torch.ones(8),
    }
    specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in weights.items()}
    handed_out = []

    def stream():
        for name, tensor in weights.items():
            handed_out.append(name)
            yield name, tensor

    params = dict(PARAMS, lora=dict(LORA, scaling=2.0))
    folder = save_merged_checkpoint(tmp_path / "run", 7, specs, stream(), params, tokenizer_file, keep=1)
    assert handed_out == ["tok_embeddings.weight", "norm.weight"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "consolidated.safetensors",
        "manifest.json",
        "params.json",
        "tokenizer.model.v3",
    ]
    written = load_file(folder / "consolidated.safetensors")
    assert written["tok_embeddings.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(written, weights, rtol=0, atol=0)
    assert json.loads((folder / "params.json").read_text()) == PARAMS  # no lora entry: a plain model
