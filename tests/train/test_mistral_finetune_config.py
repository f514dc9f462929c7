"""mistral-finetune's YAML files run unchanged, with its own defaults and meanings: every key of its TrainArgs
(finetune/args.py, finetune/data/args.py, model/args.py) is read as it was there, or refused with the reason."""

import subprocess
import sys

import pytest
import yaml
from launching import REPO, records, subprocess_env

from finetune.config import ConfigError, DataSource, load_config

# mistral-finetune's example/7B.yaml, key for key and value for value, with its paths filled in
EXAMPLE_7B = """
# data
data:
  instruct_data: "{train}"  # Fill
  data: ""  # Optionally fill with pretraining data
  eval_instruct_data: "{eval}"  # Optionally fill

# model
model_id_or_path: "{model}"  # Change to downloaded path
lora:
  rank: 64

# optim
seq_len: 32768
batch_size: 1
max_steps: 300
optim:
  lr: 6.e-5
  weight_decay: 0.1
  pct_start: 0.05

# other
seed: 0
log_freq: 1
eval_freq: 100
no_eval: False
ckpt_freq: 100

save_adapters: True  # save only trained LoRA adapters (its comment goes on: False merges them)

run_dir: "{run_dir}"  # Fill

wandb:
  project: "" # your wandb project name
  run_name: "" # your wandb run name
  offline: False
"""


def example_7b(tmp_path, model="/models/mistral_7b") -> str:
    text = EXAMPLE_7B.format(
        train=REPO / "data/demo/train.jsonl", eval=REPO / "data/demo/eval.jsonl", model=model, run_dir=tmp_path / "run"
    )
    path = tmp_path / "7B.yaml"
    path.write_text(text)
    return path


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_example_7b_yaml_key_for_key(tmp_path):
    cfg = load_config(example_7b(tmp_path))
    assert cfg.data.train == [DataSource(str(REPO / "data/demo/train.jsonl"), 1.0)]  # data: "" adds nothing
    assert cfg.data.eval == [DataSource(str(REPO / "data/demo/eval.jsonl"), 1.0)]
    assert cfg.data.shuffle is True  # its data.instruct.shuffle default
    assert cfg.model.path == "/models/mistral_7b"
    assert (cfg.lora.rank, cfg.lora.alpha) == (64, 128.0)  # its lora.scaling default 2.0 = alpha / rank
    assert (cfg.seq_len, cfg.batch_size, cfg.max_steps) == (32768, 1, 300)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_fraction) == (6e-5, 0.1, 0.05)
    assert (cfg.seed, cfg.logging.freq) == (0, 1)
    assert (cfg.eval.enabled, cfg.eval.freq) == (True, 100)
    assert (cfg.checkpoint.enabled, cfg.checkpoint.freq, cfg.checkpoint.save_adapters) == (True, 100, True)
    assert (cfg.logging.wandb.project, cfg.logging.wandb.run_name, cfg.logging.wandb.offline) == ("", "", False)
    # the TrainArgs defaults of the keys it leaves out
    assert (cfg.grad_accumulation, cfg.optim.max_grad_norm, cfg.checkpoint.keep) == (1, 1.0, 3)
    assert cfg.model.activation_checkpointing is True and cfg.logging.mlflow.tracking_uri == ""


def test_the_defaults_are_mistral_finetunes(tmp_path):
    cfg = load_config(write(tmp_path, 'model_id_or_path: /m\nrun_dir: /r\ndata:\n  instruct_data: "a.jsonl"\n'))
    assert cfg.eval.enabled is False  # no_eval: True
    assert cfg.eval.freq == 0 and cfg.checkpoint.freq == 0  # eval_freq, ckpt_freq 0: only at the end
    assert (cfg.optim.lr, cfg.optim.warmup_fraction, cfg.optim.weight_decay) == (3e-4, 0.3, 0.1)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.0)
    assert (cfg.seq_len, cfg.batch_size, cfg.max_steps, cfg.seed) == (2048, 1, 100, 0)
    assert cfg.data.shuffle is True
    # tailor's own keys in such a config win over mistral-finetune's defaults for the same setting
    mixed = load_config(
        write(
            tmp_path,
            "model_id_or_path: /m\nrun_dir: /r\ndata: {instruct_data: a.jsonl, eval: b.jsonl}\n"
            "lora: {rank: 8, alpha: 4}\noptim: {warmup_steps: 3}\neval: {enabled: true, freq: 7}\n",
        )
    )
    assert (mixed.lora.alpha, mixed.optim.warmup_steps, mixed.optim.warmup_fraction) == (4.0, 3, 0.05)
    assert (mixed.eval.enabled, mixed.eval.freq, mixed.checkpoint.freq) == (True, 7, 0)
    # a tailor config keeps tailor's defaults
    tailor = load_config(write(tmp_path, "model: {path: /m}\nrun_dir: /r\ndata: {train: a.jsonl, eval: b.jsonl}\n"))
    assert (tailor.eval.enabled, tailor.eval.freq, tailor.optim.lr, tailor.lora.rank) == (True, 100, 1e-4, 64)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("ckpt_freq: -1\neval_freq: 0\nno_eval: false\n", dict(ckpt=0, eval=0)),  # below 1: only at the end
        ("num_ckpt_keep: 5\nno_ckpt: true\nmax_norm: 0.5\nnum_microbatches: 4\n", dict(keep=5, ckpt_on=False)),
        ("checkpoint: false\n", dict(activation_checkpointing=False)),
        ("world_size: 8\n", {}),  # set from the environment there; torchrun decides here
        ("lora: {enable: true, rank: 8, dropout: 0.1, scaling: 0.5}\n", dict(rank=8, alpha=4.0, dropout=0.1)),
        ("data: {instruct_data: a.jsonl, instruct: {shuffle: false, dynamic_chunk_fn_call: false}}\n", {}),
        ("data: {data: p.jsonl}\n", dict(shuffle=False)),  # pretrain data alone: its data.shuffle, default false
        ("data: {data: p.jsonl, shuffle: true, instruct_data: a.jsonl}\n", dict(shuffle=True)),
        (
            "wandb: {project: null, run_name: null, key: null}\nmlflow: {tracking_uri: null, experiment_name: null}\n",
            {},
        ),
    ],
)
def test_each_key_means_what_it_meant(tmp_path, extra, expected):
    base = "model_id_or_path: /m\nrun_dir: /r\n"
    if "data:" not in extra:
        base += "data: {instruct_data: a.jsonl, eval_instruct_data: b.jsonl}\n"
    if "dynamic_chunk_fn_call: false" in extra:
        with pytest.raises(ConfigError, match="dynamic_chunk_fn_call: false is not supported"):
            load_config(write(tmp_path, base + extra))
        return
    cfg = load_config(write(tmp_path, base + extra))
    actual = dict(
        ckpt=cfg.checkpoint.freq,
        eval=cfg.eval.freq,
        keep=cfg.checkpoint.keep,
        ckpt_on=cfg.checkpoint.enabled,
        activation_checkpointing=cfg.model.activation_checkpointing,
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        shuffle=cfg.data.shuffle,
    )
    assert {k: actual[k] for k in expected} == expected
    if "num_microbatches" in extra:
        assert (cfg.grad_accumulation, cfg.optim.max_grad_norm) == (4, 0.5)
    if "wandb" in extra:
        assert (cfg.logging.wandb.project, cfg.logging.mlflow.tracking_uri) == ("", "")
        assert cfg.logging.mlflow.experiment_name == "tailor"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("lora: {enable: false}\n", "lora.enable: false (full fine-tuning) is not supported"),
        ("num_ckpt_keep: null\n", "num_ckpt_keep: null (keep every checkpoint) is not supported"),
        ("wandb: {project: p, key: 0123abcd}\n", "logging.wandb.key: an API key is not read from a config"),
        (
            "data: {data: p.jsonl, instruct_data: a.jsonl}\n",
            "data.instruct.shuffle: true and data.shuffle (pretrain data): false differ",
        ),
    ],
)
def test_what_cannot_mean_the_same_is_refused_with_the_reason(tmp_path, extra, message):
    base = "model_id_or_path: /m\nrun_dir: /r\n" + ("" if "data:" in extra else "data: {instruct_data: a.jsonl}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, base + extra))


def test_example_7b_yaml_trains(tmp_path, tiny_model_dir):
    """The file as it is, on the tiny model: only the sizes a CPU needs are overridden. With max_steps below its
    eval_freq and ckpt_freq of 100, it evaluates and saves once, at the end, as mistral-finetune does."""
    config = example_7b(tmp_path, model=tiny_model_dir)
    overrides = ["seq_len=128", "max_steps=3", "model.dtype=fp32", f"data.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(
        [sys.executable, "train.py", str(config), *overrides],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3]
    assert [r["step"] for r in records(run_dir, "eval")] == [0, 3]  # the base model's, then at the end
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_000003"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["lora"]["rank"] == 64 and saved["optim"]["lr"] == 6e-5
