"""The benchmark scripts keep running (their numbers go to benchmarks/RESULTS.md; nothing here is timed)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_throughput_runs_tailor_and_the_hf_baseline_on_a_tiny_model():
    result = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--arch", "tiny", "--steps", "1",
                             "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FLOPs per token = 4 N + 12 x layers x heads x head_dim x mean context" in result.stdout
    assert re.search(r"tailor: [\d,]+ tokens/s per GPU", result.stdout)
    assert re.search(r"transformers\+peft: [\d,]+ tokens/s per GPU", result.stdout)
    assert re.search(r"tailor / HF: \d+\.\d+x tokens/s", result.stdout)
