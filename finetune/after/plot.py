"""`tailor plot RUN_DIR [-o loss.png]`: a run's curves in one PNG, read from run_dir/metrics.jsonl.

Three panels against the step: train and eval loss (on a log scale when it spans more than a decade, so the end
of a run is not flattened against zero by its first steps), the learning rate (tick labels written out, 0.0001 not
1e-4 above the axis), and the throughput. It works on a finished run and on one still training (metrics.jsonl is
appended to a line at a time). matplotlib is an optional extra, imported only here, with the Agg backend: no
display is needed, on a server or in a notebook.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'tailor[logging]'"
LOG_SCALE_SPAN = 10  # loss panel on a log scale when its largest value is more than this many times its smallest


class PlotError(ValueError):
    """Nothing to plot: the message says what is missing."""


def read_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of train loss, eval loss, learning rate and tokens/s; non-finite values left out."""
    if not Path(run_dir).is_dir():
        raise PlotError(f"run folder not found: {run_dir}")
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} a run folder, and has its first step been logged?")
    curves = {"loss": [], "eval_loss": [], "lr": [], "tokens_per_s": []}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run writing its next line right now
                break
            raise PlotError(f"{path}:{number}: not valid JSON") from None
        keys = {"train": ("loss", "lr", "tokens_per_s"), "eval": ("eval_loss",)}.get(record.get("kind"), ())
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves[key].append((record["step"], value))
    if not curves["loss"]:
        raise PlotError(f"{path} holds no train step yet")
    return curves


def loss_scale(losses: list[float]) -> str:
    """ "log" when the losses span more than a decade (a falling loss then stays readable to its end), else
    "linear"."""
    return "log" if min(losses) > 0 and max(losses) > LOG_SCALE_SPAN * min(losses) else "linear"


def plain_number(value: float, _position=None) -> str:
    """A tick label as a number is written: 0.0001, 0.00015, 0 (matplotlib's FuncFormatter signature)."""
    return f"{value:.12f}".rstrip("0").rstrip(".") if value else "0"


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of run_dir into `out` (default run_dir/loss.png) and return its path."""
    curves = read_curves(run_dir)
    try:
        import matplotlib
    except ImportError:
        raise PlotError(f"tailor plot needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(9, 9), sharex=True, height_ratios=(2, 1, 1))
    loss_ax.plot(*zip(*curves["loss"]), label="train loss", linewidth=1)
    if curves["eval_loss"]:  # a few points: markers show where the evaluations were
        loss_ax.plot(*zip(*curves["eval_loss"]), "o-", label="eval loss")
    loss_ax.set_yscale(loss_scale([v for key in ("loss", "eval_loss") for _, v in curves[key]]))
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.set_title(str(run_dir))
    lr_ax.plot(*zip(*curves["lr"]), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(plain_number))
    speed_ax.plot(*zip(*curves["tokens_per_s"]), color="tab:purple")
    speed_ax.set_ylabel("tokens/s\n(all ranks, average)")
    speed_ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run folder (holding metrics.jsonl)")
    parser.add_argument("-o", "--output", type=Path, metavar="PNG", help="the PNG to write (default RUN_DIR/loss.png)")


def run(args: argparse.Namespace) -> int:
    try:
        out = plot_run(args.run_dir, args.output)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"plot written to {out}")
    return 0
