"""Training's evals with generations (eval.generate), the base model before step 1 and retain data, end to end on a
tiny model: 1 process, then 2 ranks with FSDP, then a resume that reads the base model's figures back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import REPO, records, subprocess_env, torchrun

TIMEOUT = 600
GENERATE = 4
TOOLS_EVAL = str(REPO / "data/demo/tools_eval.jsonl")


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def generations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_generations.jsonl").read_text().splitlines()]


def config_with_generations(write_config, **overrides) -> Path:
    """Greetings to learn, 4 held-out ones answered at each eval, and the tools demo set as retain data, which the
    greetings make the model worse at."""
    return write_config(
        eval__generate=GENERATE,
        eval__retain_warn=0.05,  # its loss rises about 1% by step 8 and 8% by step 16
        data__retain=TOOLS_EVAL,
        eval__freq=8,
        eval__max_batches=2,
        **overrides,
    )


@pytest.mark.slow
def test_one_process_answers_at_each_eval_beside_the_base_model_and_resumes_with_its_figures(write_config, tmp_path):
    config = config_with_generations(write_config)
    result = run([sys.executable, "train.py", str(config)])
    run_dir = tmp_path / "run"
    base, *evals = records(run_dir, "eval")
    assert base["step"] == 0 and base["base"] and [r["step"] for r in evals] == [8, 16]
    greetings = str(REPO / "data/demo/eval.jsonl")
    assert base["scores"]["eval"][greetings] == dict(
        answers=4, tool_call_answers=0, exact_match=0.0, normalised_match=0.0
    )
    assert base["scores"]["retain"][TOOLS_EVAL]["tool_call_answers"] == GENERATE
    assert base["scores"]["retain"][TOOLS_EVAL]["tool_call_parses"] == 0.0
    assert evals[-1]["eval_loss"] < 0.3 * base["eval_loss"]
    assert evals[-1]["retain_loss_change"] == pytest.approx(evals[-1]["retain_loss"] / base["retain_loss"] - 1)

    answers = generations(run_dir)
    assert [(a["step"], a["group"]) for a in answers] == [
        (step, group)
        for step in (0, 8, 16)
        for group in ("eval", "eval", "eval", "eval", "retain", "retain", "retain", "retain")
    ]
    first = answers[0]
    assert (first["file"], first["line"], first["reference"]) == (greetings, 1, "Good night, Alice!")
    assert first["prompt"] == [{"role": "user", "content": "Greet Alice in the night."}]
    final = [a for a in answers if a["step"] == 16 and a["group"] == "eval"]
    right = sum(a["generated"] == a["reference"] for a in final)
    assert evals[-1]["scores"]["eval"][greetings]["exact_match"] == right / GENERATE
    assert all(a["generated"].startswith("Good ") for a in final), final  # the skill's form, learnt in 16 steps
    assert answers[4]["reference"] == [{"name": "get_time", "arguments": {"city": "Tokyo"}}]

    out = result.stdout
    assert "eval.generate: eval:" in out and f"{GENERATE} chats answered at each eval" in out
    assert "base model (adapters off), before step 1: loss" in out
    assert f"eval at step 16: loss {evals[-1]['eval_loss']:.4f} (base {base['eval_loss']:.4f}" in out
    assert "e.g. " in out and "'Greet Alice in the night.' -> " in out
    assert evals[0]["retain_loss_change"] < 0.05 < evals[1]["retain_loss_change"]
    warning = (
        f"  warning: the retain loss rose {evals[1]['retain_loss_change']:.1%} over the base model's "
        f"({base['retain_loss']:.4f} -> {evals[1]['retain_loss']:.4f}; eval.retain_warn 5%): the adapters make the "
        "model worse on data.retain"
    )
    # the demo data repeats samples (data-quality warnings); the retain warning is the only other one
    assert [line for line in out.splitlines() if "warning" in line and "repeat" not in line] == [warning]
    assert "final " + greetings in out

    resumed = run([sys.executable, "train.py", str(config), "max_steps=24"])
    assert "base model (adapters off)" not in resumed.stdout  # not measured again: read back
    assert (
        f"eval at step 24: loss {records(run_dir, 'eval')[-1]['eval_loss']:.4f} (base {base['eval_loss']:.4f}"
        in resumed.stdout
    )
    assert [r["step"] for r in records(run_dir, "eval")] == [0, 8, 16, 24]
    assert sorted({a["step"] for a in generations(run_dir)}) == [0, 8, 16, 24]


@pytest.mark.slow
def test_two_ranks_answer_as_one_process_does(write_config, tmp_path):
    one = tmp_path / "one"
    run([sys.executable, "train.py", str(config_with_generations(write_config, run_dir=str(one), max_steps=4))])
    two = tmp_path / "two"
    run(torchrun(config_with_generations(write_config, run_dir=str(two), max_steps=4, batch_size=1)))
    for run_dir in (one, two):
        assert [r["step"] for r in records(run_dir, "eval")] == [0, 4]
    base_one, base_two = records(one, "eval")[0], records(two, "eval")[0]
    assert base_two["eval_loss"] == pytest.approx(base_one["eval_loss"], rel=1e-5)
    assert base_two["scores"] == base_one["scores"]
    fields = ("step", "group", "file", "line", "generated")
    at_base = [[tuple(a[f] for f in fields) for a in generations(d) if a["step"] == 0] for d in (one, two)]
    assert len(at_base[0]) == 2 * GENERATE and at_base[1] == at_base[0]  # the same answers, gathered in order
    assert len([a for a in generations(two) if a["step"] == 4]) == 2 * GENERATE
