"""Hostile checkpoints: crafted to run code, damaged on disk, or edited with a manifest to match.

Whatever its bytes, reading a checkpoint runs no code: every path that reads one (resume: auto, resume: PATH,
merge, export-peft, chat --adapter) ends in `error: ...` naming it, exit 2, and never a traceback. A damaged
checkpoint is never chosen: resume: PATH refuses it by name; resume: auto reports it, renames it aside and goes on
from the newest intact one.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_runs import assert_refused, copy_run, rewrite_manifest, tailor, train, write_config

# ---------------------------------------------------------------------------------------------------
# Crafted to run code


def payloads(marker: Path) -> dict[str, bytes]:
    """Bytes that create `marker` when unpickled, in the three forms a loader might unpickle."""

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch_file, numpy_file = io.BytesIO(), io.BytesIO()
    torch.save(Exploit(), torch_file)
    np.save(numpy_file, np.array([Exploit()], dtype=object), allow_pickle=True)
    return {"pickle": pickle.dumps(Exploit()), "torch.save": torch_file.getvalue(), "numpy": numpy_file.getvalue()}


def craft(folder: Path, payload: bytes) -> None:
    """Every file that holds numbers becomes the payload, DCP's pickled index and shard (the old layout) are added,
    and the manifest is made to match: the checksums cannot tell, since whoever wrote the files wrote it."""
    for path in [
        folder / "lora.safetensors",
        *folder.glob("state/*.safetensors"),
        folder / "state/.metadata",
        folder / "state/__0_0.distcp",
    ]:
        path.write_bytes(payload)
    rewrite_manifest(folder)


READERS = {
    "resume: auto": lambda cfg, ckpt, model, out: train(cfg),
    "resume: PATH": lambda cfg, ckpt, model, out: train(cfg, f"resume={ckpt}", f"run_dir={out}"),
    "tailor merge": lambda cfg, ckpt, model, out: tailor("merge", "--base", model, "--adapter", ckpt, "--out", out),
    "tailor export-peft": lambda cfg, ckpt, model, out: tailor("export-peft", "--adapter", ckpt, "--out", out),
    "tailor chat --adapter": lambda cfg, ckpt, model, out: tailor("chat", model, "--adapter", ckpt, "--prompt", "hi"),
}


@pytest.mark.parametrize("form", ["pickle", "torch.save", "numpy"])
@pytest.mark.parametrize("reader", READERS)
def test_a_crafted_checkpoint_runs_no_code(reader, form, trained, model_dir, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint_000002"
    marker = tmp_path / "pwned"
    craft(checkpoint, payloads(marker)[form])
    result = READERS[reader](write_config(tmp_path, model_dir, max_steps=3), checkpoint, model_dir, tmp_path / "out")
    assert not marker.exists(), f"{reader} ran the checkpoint's code"
    if reader == "resume: auto":  # damaged, so never chosen: set aside, and the run goes on from the one before
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"skipped {checkpoint}: state/tensors_rank_0.safetensors is not a training state" in result.stdout
        assert f"resuming from {run_dir / 'checkpoints/checkpoint_000001'}" in result.stdout
        assert (checkpoint.parent / "checkpoint_000002.damaged" / "lora.safetensors").read_bytes() == payloads(marker)[
            form
        ]
        return
    assert_refused(result, 2, checkpoint)
    assert not (tmp_path / "out" / "config.yaml").exists()  # a refused run leaves no record of itself


def test_the_old_layout_with_a_pickled_index_is_skipped_unread(trained, model_dir, tmp_path):
    """A checkpoint of the layout before (DCP: a pickled index) has no tensors file: it reads as damaged, without
    its pickle being opened, and the run goes on from the newest intact checkpoint."""
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint_000002"
    marker = tmp_path / "pwned"
    craft(checkpoint, payloads(marker)["pickle"])
    (checkpoint / "state/tensors_rank_0.safetensors").unlink()
    rewrite_manifest(checkpoint)
    result = train(write_config(tmp_path, model_dir, max_steps=3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    assert f"skipped {checkpoint}: state/tensors_rank_0.safetensors is missing" in result.stdout
    assert f"resuming from {run_dir / 'checkpoints/checkpoint_000001'}" in result.stdout
