"""run_dir/config.yaml is the record of how the checkpoints were trained: written once a run is accepted, kept
aside when a resume changes settings, and a re-planned schedule is said with its learning rates."""

from pathlib import Path

import yaml
from launching import records

import train
from finetune import exit_codes
from finetune.config import load_config
from finetune.training.optim import lr_at_step


def test_a_resume_with_other_settings_keeps_the_earlier_record_and_says_the_new_schedule(
    write_config, tmp_path, capsys
):
    config = write_config(max_steps=4, eval__enabled=False, checkpoint__freq=2)
    run_dir = tmp_path / "run"
    assert train.run([str(config)]) == 0
    first = (run_dir / "config.yaml").read_text()
    capsys.readouterr()

    # Refused (the checkpoint's LoRA rank is 8): the record stays as it was, and nothing is kept aside.
    assert train.run([str(config), "max_steps=8", "lora.rank=4"]) == exit_codes.USAGE
    assert "does not fit this model" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == first
    assert sorted(p.name for p in run_dir.glob("config*")) == ["config.yaml"]

    assert train.run([str(config), "max_steps=8", "optim.min_lr=0.001"]) == 0
    out = capsys.readouterr().out
    changed = next(line for line in out.splitlines() if line.startswith("settings changed"))
    assert changed.startswith(f"settings changed from {run_dir / 'config.yaml'}: ")
    assert sorted(changed.split(": ", 1)[1].split("; ")) == ["max_steps 4 -> 8", "optim.min_lr 0.0 -> 0.001"]
    old, new = load_config(config), load_config(config, ["max_steps=8", "optim.min_lr=0.001"])
    old_lr, new_lr = lr_at_step(5, old.optim, 4), lr_at_step(5, new.optim, 8)
    assert new_lr == next(r["lr"] for r in records(run_dir, "train") if r["step"] == 5)  # what step 5 trained at
    assert old_lr == old.optim.min_lr != new_lr  # the earlier plan had decayed to its end at step 4
    assert (
        f"the learning rate schedule is re-planned from step 5: its learning rate is {new_lr:.2e}, where the "
        f"earlier plan had {old_lr:.2e}"
    ) in out
    assert out.index("re-planned") < out.index("step 5/8")  # before the first step trained
    kept = run_dir / "config.step_000004.yaml"
    assert f"the earlier settings are kept in {kept}" in out
    assert kept.read_text() == first
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["max_steps"] == 8

    capsys.readouterr()
    assert train.run([str(config), "max_steps=8", "optim.min_lr=0.001"]) == 0  # nothing to train, nothing changed
    out = capsys.readouterr().out
    assert "settings changed" not in out
    assert "is at step 8, and max_steps is 8; a higher max_steps trains on, another run_dir starts afresh" in out
    assert sorted(p.name for p in Path(run_dir).glob("config*")) == ["config.step_000004.yaml", "config.yaml"]
