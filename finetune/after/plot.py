"""`tailor plot RUN_DIR [-o loss.png]`: a run's curves in one PNG, read from run_dir/metrics.jsonl.

Three panels against the step: train, eval and retain loss (on a log scale when it spans more than a decade, so the end
of a run is not flattened against zero by its first steps), the learning rate (tick labels written out, 0.0001 not
1e-4 above the axis), and the throughput. It works on a finished run and on one still training (metrics.jsonl is
appended to a line at a time). matplotlib is an optional extra, imported only here, with the Agg backend: no
display is needed, on a server or in a notebook. A run with eval generations (`eval.generate`) gets a fourth panel:
each source's exact match and tool-call rates (docs/evaluation.md), the base model's at step 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'tailor[logging]'"
PLOTTED_SCORES = {
    "exact_match": "exact match",
    "tool_call_parses": "tool call parses",
    "tool_call_arguments_match": "tool call arguments match",
}
LOG_SCALE_SPAN = 10  # loss panel on a log scale when its largest value is more than this many times its smallest


class PlotError(ValueError):
    """Nothing to plot: the message says what is missing."""


def read_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read a run's curves from its metrics.jsonl; non-finite values are left out.

    Returns:
        (step, value) pairs of train loss, eval and retain loss, learning rate and tokens/s, and of each source's
        scores as "SOURCE: LABEL" (retain sources as "retain SOURCE: LABEL").

    Raises:
        PlotError: no run folder or metrics.jsonl, a line that is not a record tailor writes, or no train step yet.
    """
    if not Path(run_dir).is_dir():
        raise PlotError(f"run folder not found: {run_dir}")
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists() and not path.is_file():
        raise PlotError(f"{path} is not a regular file (a folder, a FIFO or a device): not a run's metrics")
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} a run folder, and has its first step been logged?")
    curves = {"loss": [], "eval_loss": [], "retain_loss": [], "lr": [], "tokens_per_s": []}
    lines = path.read_bytes().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise PlotError(f"{path}:{number}: not UTF-8 text") from None
        except (ValueError, RecursionError):
            if number == len(lines):  # a run writing its next line right now
                break
            raise PlotError(f"{path}:{number}: not valid JSON") from None
        if not (isinstance(record, dict) and type(record.get("step")) is int):
            raise PlotError(f"{path}:{number}: not a record tailor writes (a JSON object with an integer step)")
        keys = {"train": ("loss", "lr", "tokens_per_s"), "eval": ("eval_loss", "retain_loss")}.get(
            record.get("kind"), ()
        )
        values = {key: record.get(key) for key in keys}
        if record.get("kind") == "eval" and isinstance(record.get("scores"), dict):
            values.update(_score_values(record["scores"]))
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(key, []).append((record["step"], value))
    if not curves["loss"]:
        raise PlotError(f"{path} holds no train step yet")
    return curves


def _score_values(scores: dict) -> dict:
    values = {}
    for group, sources in scores.items():
        for source, rates in sources.items() if isinstance(sources, dict) else ():
            where = source if group == "eval" else f"{group} {source}"
            for name, label in PLOTTED_SCORES.items():
                if isinstance(rates, dict) and name in rates:
                    values[f"{where}: {label}"] = rates[name]
    return values


def loss_scale(losses: list[float]) -> str:
    """ "log" when the losses span more than a decade, else "linear".

    On a log scale a falling loss stays readable to its end.
    """
    return "log" if min(losses) > 0 and max(losses) > LOG_SCALE_SPAN * min(losses) else "linear"


def plain_number(value: float, _position=None) -> str:
    """A tick label as a number is written: 0.0001, 0.00015, 0 (matplotlib's FuncFormatter signature)."""
    return f"{value:.12f}".rstrip("0").rstrip(".") if value else "0"


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of run_dir into `out` (default run_dir/loss.png) and return its path.

    Raises:
        PlotError: nothing to plot (see `read_curves`), or matplotlib is not installed.
    """
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
    scores = [key for key in curves if ": " in key]
    panels = 4 if scores else 3
    fig, axes = plt.subplots(
        panels, 1, figsize=(9, 3 * panels), sharex=True, height_ratios=(2, 1, 1, 2)[:panels], squeeze=True
    )
    loss_ax, lr_ax, speed_ax = axes[:3]
    loss_ax.plot(*zip(*curves["loss"]), label="train loss", linewidth=1)
    for key, label in (("eval_loss", "eval loss"), ("retain_loss", "retain loss")):
        if curves[key]:  # a few points: markers show where the evaluations were
            loss_ax.plot(*zip(*curves[key]), "o-", label=label)
    loss_ax.set_yscale(loss_scale([v for key in ("loss", "eval_loss", "retain_loss") for _, v in curves[key]]))
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.set_title(str(run_dir))
    lr_ax.plot(*zip(*curves["lr"]), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(plain_number))
    speed_ax.plot(*zip(*curves["tokens_per_s"]), color="tab:purple")
    speed_ax.set_ylabel("tokens/s\n(all ranks, average)")
    if scores:
        for key in scores:
            axes[3].plot(*zip(*curves[key]), "o-", label=key)
        axes[3].set_ylabel("share of answers\n(step 0: the base model)")
        axes[3].set_ylim(-0.05, 1.05)
        axes[3].legend(fontsize="small")
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor plot`'s arguments to its parser."""
    parser.add_argument("run_dir", type=Path, help="the run folder (holding metrics.jsonl)")
    parser.add_argument("-o", "--output", type=Path, metavar="PNG", help="the PNG to write (default RUN_DIR/loss.png)")


def run(args: argparse.Namespace) -> int:
    """Run `tailor plot`; return the exit code (2 with an `error:` line when there is nothing to plot)."""
    try:
        out = plot_run(args.run_dir, args.output)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"plot written to {out}")
    return 0
