"""Metrics out: metrics.jsonl always; TensorBoard, W&B and MLflow when configured and installed; console lines."""

from __future__ import annotations

import json
import math
import resource
import shlex
import warnings
from pathlib import Path

import torch

from finetune.config import TrainConfig

EXTRA_HINT = "pip install 'tailor[logging]'"
METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """One JSON record per logged step in run_dir/metrics.jsonl, mirrored to the configured trackers.

    Open it on rank 0 only. A tracker whose package is missing is skipped with one warning: a run never
    fails for want of a dashboard.
    """

    def __init__(self, run_dir: Path, cfg: TrainConfig):
        self.path = Path(run_dir) / METRICS_FILE
        self.file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = self.wandb = self.mlflow = None
        log = cfg.logging
        if log.tensorboard:
            writer = _optional_import("torch.utils.tensorboard", "tensorboard")
            self.tensorboard = writer and writer.SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if log.wandb.project:
            self.wandb = _optional_import("wandb", "wandb")
            if self.wandb:  # it reads its API key from WANDB_API_KEY or `wandb login`, never from the config
                self.wandb.init(
                    project=log.wandb.project,
                    name=log.wandb.run_name or None,
                    dir=str(run_dir),
                    mode="offline" if log.wandb.offline else "online",
                    config=_flat_config(cfg),
                )
        if log.mlflow.tracking_uri:
            self.mlflow = _optional_import("mlflow", "mlflow")
            if self.mlflow:
                self.mlflow.set_tracking_uri(log.mlflow.tracking_uri)
                self.mlflow.set_experiment(log.mlflow.experiment_name)
                self.mlflow.start_run()
                self.mlflow.log_params(_flat_config(cfg))

    def log(self, record: dict) -> None:
        """Append a record to metrics.jsonl (flushed), and its numbers to each tracker under `kind/name`.

        Raises:
            OSError: metrics.jsonl could not be written (a full disk), naming it.
        """
        try:
            self.file.write(json.dumps(standard_json(record), allow_nan=False) + "\n")
            self.file.flush()
        except OSError as error:  # a full disk: name the file, which a write error does not
            raise OSError(error.errno, error.strerror, str(self.path)) from None
        step = record["step"]
        numbers = {k: v for k, v in flat_numbers(record).items() if k != "step"}
        prefix = record.get("kind", "train")
        if self.tensorboard:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)
        if self.mlflow:
            self.mlflow.log_metrics({f"{prefix}_{k}": v for k, v in numbers.items()}, step=step)

    def log_table(self, name: str, step: int, rows: list[dict]) -> None:
        """Rows of one step (eval generations) as a table, in the trackers that have tables: W&B and MLflow."""
        if not rows:
            return
        columns = list(rows[0])
        if self.wandb:
            table = self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({name: table}, step=step)
        if self.mlflow:
            self.mlflow.log_table(
                data={c: [row[c] for row in rows] for c in columns}, artifact_file=f"{name}/step_{step:06d}.json"
            )

    def close(self) -> None:
        """Close metrics.jsonl and end each tracker's run."""
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()


def flat_numbers(record: dict, prefix: str = "") -> dict[str, int | float]:
    """The numbers of a record at any depth, as the trackers take them.

    Nested keys are joined by "/" (`scores/eval/data/eval.jsonl/exact_match`).
    """
    numbers = {}
    for key, value in record.items():
        if isinstance(value, dict):
            numbers.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            numbers[f"{prefix}{key}"] = value
    return numbers


def standard_json(value):
    """`value` with each non-finite number (a skipped step's loss or gradient norm) as null, at any depth.

    JSON has no NaN or Infinity, and readers other than Python's reject them.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


def _optional_import(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        warnings.warn(f"{package} is not installed, so it is skipped; install it with {EXTRA_HINT}", stacklevel=3)
        return None


def _flat_config(cfg: TrainConfig) -> dict:
    from finetune.config import config_to_dict

    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix.rstrip(".")] = str(value)

    walk("", config_to_dict(cfg))
    return flat


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def train_record(step: int, max_steps: int, lr: float, outcome, progress, peak_memory: float) -> dict:
    """The metrics.jsonl record of a train step, from its StepOutcome and the Progress counted up to it."""
    elapsed = progress.elapsed_s
    return dict(
        kind="train",
        step=step,
        loss=outcome.loss,
        lr=lr,
        grad_norm=outcome.grad_norm,
        tokens=progress.tokens,
        trained_tokens=progress.trained_tokens,
        tokens_per_s=progress.tokens / elapsed,
        trained_tokens_per_s=progress.trained_tokens / elapsed,
        elapsed_s=elapsed,
        skipped=not outcome.finite,
        peak_memory_gib=peak_memory,
        max_steps=max_steps,
    )


def format_duration(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_train_line(record: dict) -> str:
    """A train record (train_record) as the log's line: step, loss, lr, gradient norm, tokens/s, peak memory, ETA."""
    step, max_steps = record["step"], record["max_steps"]
    eta = record["elapsed_s"] / step * (max_steps - step)
    return (
        f"step {step:>{len(str(max_steps))}}/{max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"grad norm {record['grad_norm']:.3f}  tok/s {record['tokens_per_s']:,.0f} "
        f"(trained {record['trained_tokens_per_s']:,.0f})  peak mem {record['peak_memory_gib']:.1f} GiB  "
        f"ETA {format_duration(eta)}"
    )


def format_eval_line(record: dict, base: dict | None = None) -> str:
    """An eval record in a few lines: the eval (and retain) loss, then the scores of each source's generations.

    Args:
        base: the base model's eval record, whose figures are shown beside each.
    """
    head = "base model (adapters off), before step 1" if record.get("base") else f"eval at step {record['step']}"
    lines = [f"{head}: {_loss_figures(record, 'eval', base)}"]
    if "retain_loss" in record:
        lines.append(f"  retain: {_loss_figures(record, 'retain', base)}")
    lines += [f"  {line}" for line in score_lines(record, base)]
    return "\n".join(lines)


def _loss_figures(record: dict, prefix: str, base: dict | None) -> str:
    loss, accuracy = record[f"{prefix}_loss"], record[f"{prefix}_token_accuracy"]
    base_loss, base_accuracy = (base or {}).get(f"{prefix}_loss"), (base or {}).get(f"{prefix}_token_accuracy")
    shown_loss = f"loss {loss:.4f}"
    if base_loss and not record.get("base"):
        shown_loss += f" (base {base_loss:.4f}, {loss / base_loss - 1:+.1%})"
    shown_accuracy = f"token accuracy {accuracy:.1%}"
    if base_accuracy is not None and not record.get("base"):
        shown_accuracy += f" (base {base_accuracy:.1%})"
    return f"{shown_loss}  perplexity {record[f'{prefix}_perplexity']:.2f}  {shown_accuracy}"


SCORE_LABELS = {
    "exact_match": "exact match",
    "normalised_match": "normalised match",
    "tool_call_parses": "parses",
    "tool_call_known_function": "known function",
    "tool_call_arguments_valid": "arguments valid",
    "tool_call_name_match": "name match",
    "tool_call_arguments_match": "arguments match",
}


def score_lines(record: dict, base: dict | None = None) -> list[str]:
    """One line per source with generations: its rates, each with the base model's beside it when known."""
    lines = []
    for group, sources in (record.get("scores") or {}).items():
        for source, rates in sources.items():
            base_rates = ((base or {}).get("scores") or {}).get(group, {}).get(source) or {}
            parts = []
            for counted, label in (("answers", "text answers"), ("tool_call_answers", "tool calls")):
                names = [n for n in SCORE_LABELS if n in rates and n.startswith("tool_call") == (counted != "answers")]
                if not names:
                    continue
                figures = []
                for name in names:
                    figure = f"{SCORE_LABELS[name]} {rates[name]:.1%}"
                    if name in base_rates and not record.get("base"):
                        figure += f" (base {base_rates[name]:.1%})"
                    figures.append(figure)
                parts.append(f"{rates[counted]} {label}: " + ", ".join(figures))
            where = source if group == "eval" else f"{group} {source}"
            lines.append(f"{where}: " + "; ".join(parts or ["no answerable chat"]))
    return lines


def format_summary(
    steps: int,
    tokens: int,
    seconds: float,
    train_loss: float | None,
    eval_metrics: dict | None,
    checkpoint: Path | None,
    run_dir: Path | None = None,
    model_dir: Path | None = None,
    base: dict | None = None,
) -> str:
    """The end of a run in a few lines: steps, tokens and time, the final losses and scores, the last checkpoint.

    Args:
        eval_metrics: the last eval record.
        run_dir: the run folder, for the plot command shown.
        model_dir: the base of an adapter checkpoint, for the chat command shown.
        base: the base model's eval record, whose figures are shown beside the final ones.
    """
    lines = [f"done: {steps} steps, {tokens:,} tokens in {format_duration(seconds)}"]
    if train_loss is not None:
        lines.append(f"  final train loss {train_loss:.4f}")
    if eval_metrics:
        lines.append(
            f"  final eval loss {eval_metrics['eval_loss']:.4f} (perplexity {eval_metrics['eval_perplexity']:.2f},"
            f" token accuracy {eval_metrics['eval_token_accuracy']:.1%})"
        )
        if base:
            lines[-1] += f"; the base model's: {base['eval_loss']:.4f}"
        if "retain_loss" in eval_metrics:
            lines.append(f"  final retain {_loss_figures(eval_metrics, 'retain', base)}")
        lines += [f"  final {line}" for line in score_lines(eval_metrics, base)]
    if checkpoint:
        lines.append(f"  last checkpoint: {checkpoint}")
    if run_dir:
        lines.append(f"  plot the curves: tailor plot {shlex.quote(str(run_dir))}")
    if model_dir and checkpoint:
        lines.append(
            f"  chat with it: tailor chat {shlex.quote(str(model_dir))} --adapter {shlex.quote(str(checkpoint))}"
        )
    return "\n".join(lines)
