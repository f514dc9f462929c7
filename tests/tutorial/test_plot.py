"""`tailor plot`: a run's metrics.jsonl becomes one PNG of loss, eval loss, learning rate and tokens/s."""

import builtins
import json
import math

import numpy as np
import pytest

from finetune.after.plot import INSTALL_HINT, PlotError, loss_scale, plain_number, read_curves
from finetune.cli import main
from finetune.training.monitoring import format_summary

COLORS = {"train loss": "#1f77b4", "eval loss": "#ff7f0e", "learning rate": "#2ca02c", "tokens/s": "#9467bd"}


def write_metrics(run_dir, steps=60, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lr = 1e-4 * min(1.0, step / 5) * (0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = float("nan") if step == 7 else 3.0 * math.exp(-step / 20) + 0.5  # step 7 was skipped: not finite
        lines.append(
            json.dumps(
                dict(
                    kind="train",
                    step=step,
                    loss=loss,
                    lr=lr,
                    tokens_per_s=1000.0 + 10 * step,
                    grad_norm=1.0,
                    skipped=step == 7,
                )
            )
        )
        if step % 20 == 0:
            lines.append(
                json.dumps(
                    dict(
                        kind="eval",
                        step=step,
                        eval_loss=3.0 * math.exp(-step / 25) + 0.7,
                        eval_perplexity=2.0,
                        eval_token_accuracy=0.5,
                    )
                )
            )
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def test_curves_are_read_per_kind_and_skip_non_finite_values(tmp_path):
    write_metrics(tmp_path, steps=60, tail='{"kind": "train", "step": 61, "lo')  # a line being written
    curves = read_curves(tmp_path)
    assert [step for step, _ in curves["loss"]] == [s for s in range(1, 61) if s != 7]
    assert len(curves["lr"]) == len(curves["tokens_per_s"]) == 60
    assert curves["eval_loss"] == [(s, pytest.approx(3.0 * math.exp(-s / 25) + 0.7)) for s in (20, 40, 60)]


def test_a_broken_line_before_the_last_is_an_error(tmp_path):
    write_metrics(tmp_path, steps=3)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: not valid JSON"):
        read_curves(tmp_path)


def test_plot_draws_every_curve_into_one_png(tmp_path, capsys):
    import matplotlib.image

    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    assert main(["plot", str(run_dir)]) == 0
    out = run_dir / "loss.png"
    assert f"plot written to {out}" in capsys.readouterr().out
    pixels = matplotlib.image.imread(out)[..., :3]
    assert pixels.shape[:2] == (900, 900)
    for curve, color in COLORS.items():
        rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        drawn = (np.abs(pixels - rgb).max(axis=-1) < 0.05).sum()
        assert drawn > 200, f"the {curve} curve is missing from the plot"

    custom = tmp_path / "plots" / "elsewhere.png"  # its folder is made
    assert main(["plot", str(run_dir), "-o", str(custom)]) == 0
    assert custom.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("no folder", "run folder not found"),
        ("no metrics", "metrics.jsonl not found"),
        ("no train step", "holds no train step yet"),
    ],
)
def test_nothing_to_plot_is_a_clear_error(tmp_path, capsys, case, message):
    run_dir = tmp_path / "run"
    if case != "no folder":
        run_dir.mkdir()
    if case == "no train step":
        (run_dir / "metrics.jsonl").write_text(json.dumps(dict(kind="eval", step=1, eval_loss=1.0)) + "\n")
    assert main(["plot", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "loss.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    write_metrics(tmp_path)
    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    assert main(["plot", str(tmp_path)]) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    assert INSTALL_HINT == "pip install 'tailor[logging]'"


def test_the_training_summary_names_the_plot_command():
    summary = format_summary(
        steps=10, tokens=100, seconds=5, train_loss=1.0, eval_metrics=None, checkpoint=None, run_dir="runs/my run"
    )
    assert summary.splitlines()[-1] == "  plot the curves: tailor plot 'runs/my run'"


def test_loss_goes_on_a_log_scale_when_it_spans_more_than_a_decade():
    falling = [10.4 * math.exp(-step / 10) + 0.02 for step in range(200)]  # 10.4 down to 0.02: flat at 0 if linear
    assert loss_scale(falling) == "log"
    assert loss_scale([3.5, 2.9, 2.1, 1.8]) == "linear"  # within a decade: linear reads better
    assert loss_scale([0.0, 2.0]) == "linear"  # a zero has no logarithm


def test_learning_rate_ticks_are_plain_numbers():
    assert [plain_number(v) for v in (0.0, 1e-4, 1.5e-4, 2e-5, 0.01, 1.0)] == [
        "0",
        "0.0001",
        "0.00015",
        "0.00002",
        "0.01",
        "1",
    ]


def test_scores_and_retain_loss_get_their_curves_and_a_fourth_panel(tmp_path):
    import matplotlib.image

    write_metrics(tmp_path, steps=40)
    evals = []
    for step, exact, calls in ((0, 0.0, 0.0), (20, 0.5, 0.25), (40, 0.9375, 0.75)):
        scores = {
            "eval": {"data/eval.jsonl": {"answers": 32, "exact_match": exact}},
            "retain": {
                "data/tools.jsonl": {
                    "tool_call_answers": 4,
                    "tool_call_parses": 1.0,
                    "tool_call_arguments_match": calls,
                }
            },
        }
        evals.append(dict(kind="eval", step=step, eval_loss=2.0, retain_loss=1.0 + step / 100, scores=scores))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in evals)
    curves = read_curves(tmp_path)
    assert curves["retain_loss"] == [(0, 1.0), (20, 1.2), (40, 1.4)]
    assert curves["data/eval.jsonl: exact match"] == [(0, 0.0), (20, 0.5), (40, 0.9375)]
    assert curves["retain data/tools.jsonl: tool call arguments match"] == [(0, 0.0), (20, 0.25), (40, 0.75)]
    assert len(curves["retain data/tools.jsonl: tool call parses"]) == 3
    assert main(["plot", str(tmp_path)]) == 0
    assert matplotlib.image.imread(tmp_path / "loss.png").shape[:2] == (1200, 900)  # four panels
