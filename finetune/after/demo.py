"""`tailor demo`: the whole path on a CPU in a few minutes (benchmarks/RESULTS.md: the figures measured).

Makes a tiny random Mistral on first use (artifacts/tiny-mistral, with mistral-common's v3 tokenizer), trains
LoRA adapters with `train.py configs/demo.yaml` on the shipped greetings (data/demo), then reports how far the
loss fell and what the fine-tuned model answered to held-out prompts at its last eval (`eval.generate`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

DEMO_CONFIG = Path("configs/demo.yaml")
SHOWN_EVERY = 4  # the eval file holds each held-out (name, time) pair in 4 phrasings: show one of each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor demo`'s arguments to its parser."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/demo.yaml")


def run(args: argparse.Namespace) -> int:
    """Run `tailor demo`: make the tiny model if needed, train it, report; return the exit code."""
    from finetune.config import load_config
    from model.tiny import write_tiny_model

    if not DEMO_CONFIG.is_file() or not Path("train.py").is_file():
        print(
            f"error: run the demo from the tailor repository root ({DEMO_CONFIG} and train.py not found here)",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(DEMO_CONFIG, args.overrides)
    model_dir, run_dir = Path(cfg.model.path), Path(cfg.run_dir)
    if run_dir.exists() and not _is_demo_run(run_dir, model_dir):
        print(
            f"error: run_dir: {run_dir} holds something other than a demo run, and the demo starts its run_dir "
            "afresh: give another run_dir",
            file=sys.stderr,
        )
        return 2
    if not model_dir.exists():
        print(f"making a tiny random Mistral in {model_dir} (first use only)")
        write_tiny_model(model_dir, arch="mistral-7b", tokenizer="v3", seed=0)
    if run_dir.exists():
        print(f"removing the previous demo run {run_dir}")
        shutil.rmtree(run_dir)

    training = subprocess.run([sys.executable, "train.py", str(DEMO_CONFIG), *args.overrides])
    if training.returncode != 0:
        return training.returncode
    return report(run_dir, model_dir, Path(cfg.data.eval[0].path))


def _is_demo_run(run_dir: Path, model_dir: Path) -> bool:
    """An empty folder, or a run of the demo's model: what the demo may delete to start again."""
    from finetune.config import ConfigError, load_config

    if run_dir.is_dir() and not any(run_dir.iterdir()):
        return True
    try:
        return Path(load_config(run_dir / "config.yaml").model.path) == model_dir
    except ConfigError:
        return False


def report(run_dir: Path, model_dir: Path, eval_file: Path) -> int:
    """Print how far the loss fell and what the fine-tuned model answered to the held-out prompts.

    Returns:
        The exit code: 0 when the last eval loss is under a quarter of the first training loss, else 1.
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and not r.get("base")]
    first, last = train[0]["loss"], evals[-1]["eval_loss"]
    learned = last < 0.25 * first
    print(
        f"\nThe loss fell from {first:.2f} (step {train[0]['step']}) to an eval loss of {last:.2f} at step "
        f"{evals[-1]['step']}, token accuracy {evals[-1]['eval_token_accuracy']:.0%}: "
        + ("the adapters learned the skill." if learned else "less than expected; see metrics.jsonl.")
    )

    from finetune.checkpoints.folders import list_checkpoints

    checkpoint = list_checkpoints(run_dir)[-1]
    # the answers of the last eval (eval.generate), which training wrote to eval_generations.jsonl
    generations = [json.loads(line) for line in (run_dir / "eval_generations.jsonl").read_text().splitlines()]
    answers = [g for g in generations if g["step"] == evals[-1]["step"] and g["file"] == str(eval_file)]
    right = sum(g["scores"]["exact_match"] for g in answers)
    base_right = sum(g["scores"]["exact_match"] for g in generations if g["base"] and g["file"] == str(eval_file))
    print(
        f"\nHeld-out prompts (never seen in training), answered by the fine-tuned model at step {evals[-1]['step']}: "
        f"{right} of {len(answers)} exactly right (the base model, before step 1: {base_right}). Some of them:"
    )
    for answer in answers[::SHOWN_EVERY]:
        mark = "ok" if answer["scores"]["exact_match"] else f"expected {answer['reference']!r}"
        print(f"  {answer['prompt'][-1]['content']!r} -> {answer['generated']!r}  [{mark}]")
    print(f"\nChat with it: tailor chat {model_dir} --adapter {checkpoint}")
    return 0 if learned else 1
