"""The README's demo command: a tiny model learns the shipped skill and answers held-out prompts."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_learns_and_answers_held_out_prompts(tmp_path):
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"model.path={tmp_path / 'tiny-mistral'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "demo", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "making a tiny random Mistral" in result.stdout
    assert "the adapters learned the skill" in result.stdout
    right, total = map(int, re.search(r"(\d+) of (\d+) exactly right", result.stdout).groups())
    assert total == 32 and right >= 28, result.stdout[-2000:]
