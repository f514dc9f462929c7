"""Metrics reach metrics.jsonl intact, the console lines carry the numbers, and a missing tracker never stops a run."""

import builtins
import io
import json
import sys
import types

import pytest

from finetune.config import TrainConfig
from finetune.training.console import Console
from finetune.training.monitoring import MetricsLogger, format_eval_line, format_summary, format_train_line

TRAIN_RECORD = dict(
    kind="train",
    step=20,
    max_steps=100,
    loss=2.34567,
    lr=2e-4,
    grad_norm=0.8123,
    tokens=40960,
    trained_tokens=512,
    tokens_per_s=12345.6,
    trained_tokens_per_s=3210.4,
    elapsed_s=100.0,
    peak_memory_gib=12.34,
)


def test_records_round_trip_through_metrics_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path, TrainConfig())
    eval_record = dict(
        kind="eval", step=20, eval_loss=1.5, eval_perplexity=4.4817, eval_token_accuracy=0.75, eval_tokens=96
    )
    logger.log(TRAIN_RECORD)
    logger.log(eval_record)
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [TRAIN_RECORD, eval_record]


def test_the_train_line_carries_the_numbers():
    line = format_train_line(TRAIN_RECORD)
    for text in (
        "step  20/100",
        "loss 2.3457",
        "lr 2.00e-04",
        "grad norm 0.812",
        "tok/s 12,346",
        "(trained 3,210)",
        "peak mem 12.3 GiB",
        "ETA 0:06:40",
    ):  # 100 s for 20 steps: 80 more steps take 400 s
        assert text in line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_the_console_prints_a_line_per_logged_step(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    console = Console(max_steps=100, steps_done=0, data_tokens=20480)
    console.train_step(TRAIN_RECORD)
    console.print("eval at step 20: ...")
    console.close()
    assert out.getvalue().splitlines() == [format_train_line(TRAIN_RECORD), "eval at step 20: ..."]


def test_on_a_terminal_the_console_is_one_line_updated_in_place(monkeypatch):
    out = Terminal()
    monkeypatch.setattr("sys.stdout", out)
    console = Console(max_steps=100, steps_done=10, data_tokens=20480)  # resumed at step 10
    console.train_step(TRAIN_RECORD)
    console.print("eval at step 20: loss 1.5")
    console.train_step(dict(TRAIN_RECORD, step=21, tokens=43008, loss=2.25))
    console.close()
    text = out.getvalue()
    assert "\n" not in text.split("eval at step 20")[0]  # redrawn with carriage returns, not new lines
    screen = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]  # what a terminal shows of each line
    assert "eval at step 20: loss 1.5" in screen
    last = screen[-1]
    for shown in ("train:", "21/100", "epoch 2.10", "loss 2.2500", "tok/s 12,346", "<"):  # "<": elapsed<ETA
        assert shown in last, last


def test_eval_line_and_summary():
    metrics = dict(eval_loss=1.5, eval_perplexity=4.4817, eval_token_accuracy=0.75)
    assert format_eval_line(dict(step=20, **metrics)) == (
        "eval at step 20: loss 1.5000  perplexity 4.48  token accuracy 75.0%"
    )
    summary = format_summary(
        steps=100,
        tokens=409600,
        seconds=3725,
        train_loss=1.25,
        eval_metrics=metrics,
        checkpoint="runs/x/checkpoints/checkpoint_000100",
    )
    assert summary.splitlines() == [
        "done: 100 steps, 409,600 tokens in 1:02:05",
        "  final train loss 1.2500",
        "  final eval loss 1.5000 (perplexity 4.48, token accuracy 75.0%)",
        "  last checkpoint: runs/x/checkpoints/checkpoint_000100",
    ]
    with_model = format_summary(
        100, 409600, 3725, 1.25, None, "runs/x/checkpoints/checkpoint_000100", None, "my models/7b"
    )
    assert with_model.splitlines()[-1] == (
        "  chat with it: tailor chat 'my models/7b' --adapter runs/x/checkpoints/checkpoint_000100"
    )


def test_missing_trackers_warn_once_each_and_the_run_goes_on(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_trackers(name, *args, **kwargs):
        if name in ("wandb", "mlflow", "torch.utils.tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_trackers)
    cfg = TrainConfig()
    cfg.logging.tensorboard = True
    cfg.logging.wandb.project = "tailor-test"
    cfg.logging.mlflow.tracking_uri = str(tmp_path / "mlruns")
    with pytest.warns(UserWarning) as caught:
        logger = MetricsLogger(tmp_path, cfg)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    for package, message in zip(("tensorboard", "wandb", "mlflow"), messages):
        assert message.startswith(package) and "pip install 'tailor[logging]'" in message
    logger.log(TRAIN_RECORD)
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == TRAIN_RECORD


def test_the_trackers_get_the_settings_and_never_an_api_key(tmp_path, monkeypatch):
    """W&B takes its key from the environment; the run settings it and MLflow record hold none."""
    sent = {}
    fake_wandb = types.SimpleNamespace(init=lambda **kw: sent.update(wandb=kw["config"]), log=print, finish=print)
    fake_mlflow = types.SimpleNamespace(
        set_tracking_uri=print,
        set_experiment=print,
        start_run=lambda: None,
        log_params=lambda params: sent.update(mlflow=params),
        end_run=print,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow)
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd-secret")
    cfg = TrainConfig()
    cfg.logging.wandb.project, cfg.logging.mlflow.tracking_uri = "tailor-test", str(tmp_path / "mlruns")
    MetricsLogger(tmp_path, cfg).close()
    for tracker in ("wandb", "mlflow"):
        assert sent[tracker]["logging.wandb.project"] == "tailor-test"
        assert not [k for k in sent[tracker] if "key" in k]
        assert "0123abcd-secret" not in json.dumps(sent[tracker])


BASE_RECORD = dict(
    kind="eval",
    step=0,
    base=True,
    eval_loss=4.0,
    eval_perplexity=54.6,
    eval_token_accuracy=0.0,
    retain_loss=2.0,
    retain_perplexity=7.39,
    retain_token_accuracy=0.5,
    scores={
        "eval": {"data/eval.jsonl": dict(answers=32, tool_call_answers=0, exact_match=0.0, normalised_match=0.03125)},
        "retain": {"data/tools.jsonl": dict(answers=0, tool_call_answers=4, tool_call_parses=0.0)},
    },
)


def test_eval_lines_set_each_number_beside_the_base_models():
    assert format_eval_line(BASE_RECORD).splitlines() == [
        "base model (adapters off), before step 1: loss 4.0000  perplexity 54.60  token accuracy 0.0%",
        "  retain: loss 2.0000  perplexity 7.39  token accuracy 50.0%",
        "  data/eval.jsonl: 32 text answers: exact match 0.0%, normalised match 3.1%",
        "  retain data/tools.jsonl: 4 tool calls: parses 0.0%",
    ]
    later = dict(
        BASE_RECORD,
        step=50,
        base=False,
        eval_loss=1.0,
        eval_token_accuracy=0.75,
        retain_loss=2.5,
        scores={
            "eval": {
                "data/eval.jsonl": dict(answers=32, tool_call_answers=0, exact_match=0.9375, normalised_match=1.0)
            },
            "retain": {"data/tools.jsonl": dict(answers=0, tool_call_answers=4, tool_call_parses=0.75)},
        },
    )
    assert format_eval_line(later, BASE_RECORD).splitlines() == [
        "eval at step 50: loss 1.0000 (base 4.0000, -75.0%)  perplexity 54.60  token accuracy 75.0% (base 0.0%)",
        "  retain: loss 2.5000 (base 2.0000, +25.0%)  perplexity 7.39  token accuracy 50.0% (base 50.0%)",
        "  data/eval.jsonl: 32 text answers: exact match 93.8% (base 0.0%), normalised match 100.0% (base 3.1%)",
        "  retain data/tools.jsonl: 4 tool calls: parses 75.0% (base 0.0%)",
    ]
    summary = format_summary(50, 1000, 60, 0.9, later, None, base=BASE_RECORD).splitlines()
    assert summary[2:] == [
        "  final eval loss 1.0000 (perplexity 54.60, token accuracy 75.0%); the base model's: 4.0000",
        "  final retain loss 2.5000 (base 2.0000, +25.0%)  perplexity 7.39  token accuracy 50.0% (base 50.0%)",
        "  final data/eval.jsonl: 32 text answers: exact match 93.8% (base 0.0%), normalised match 100.0% (base 3.1%)",
        "  final retain data/tools.jsonl: 4 tool calls: parses 75.0% (base 0.0%)",
    ]


def test_nested_scores_reach_the_trackers_flat_and_generations_as_a_table(tmp_path, monkeypatch):
    logged, tables = [], []

    class FakeTable:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake_wandb = types.SimpleNamespace(
        init=lambda **kw: None, log=lambda d, step: logged.append((d, step)), finish=print
    )
    fake_wandb.Table = FakeTable
    fake_mlflow = types.SimpleNamespace(
        set_tracking_uri=print,
        set_experiment=print,
        start_run=lambda: None,
        log_params=lambda params: None,
        log_metrics=lambda d, step: logged.append((d, step)),
        log_table=lambda data, artifact_file: tables.append((data, artifact_file)),
        end_run=print,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow)
    cfg = TrainConfig()
    cfg.logging.wandb.project, cfg.logging.mlflow.tracking_uri = "tailor-test", str(tmp_path / "mlruns")
    logger = MetricsLogger(tmp_path, cfg)
    logger.log(BASE_RECORD)
    rows = [dict(source="data/eval.jsonl", line=1, prompt="[]", reference='"hi"', generated="hi", right=True)]
    logger.log_table("eval/generations", 0, rows)
    logger.close()
    wandb_numbers, mlflow_numbers = logged[0][0], logged[1][0]
    assert wandb_numbers["eval/scores/eval/data/eval.jsonl/exact_match"] == 0.0
    assert wandb_numbers["eval/scores/retain/data/tools.jsonl/tool_call_parses"] == 0.0
    assert mlflow_numbers["eval_retain_loss"] == 2.0
    table = logged[2][0]["eval/generations"]
    assert table.columns == list(rows[0]) and table.data == [list(rows[0].values())] and logged[2][1] == 0
    assert tables == [({k: [v] for k, v in rows[0].items()}, "eval/generations/step_000000.json")]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == BASE_RECORD
