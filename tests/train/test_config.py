"""The config is strict: every mistake is named before any heavy work; mistral-finetune's keys run unchanged."""

from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, DataSource, load_config, read_yaml_mapping, save_config

REPO = Path(__file__).resolve().parents[2]

MISTRAL_FINETUNE_7B = """
data:
  instruct_data: "ultrachat_chunk_train.jsonl:2,extra.jsonl"
  data: ""
  eval_instruct_data: "ultrachat_chunk_eval.jsonl"
model_id_or_path: "/models/mistral_7b"
lora:
  rank: 64
seq_len: 32768
batch_size: 1
num_microbatches: 2
max_steps: 300
optim:
  lr: 6.e-5
  weight_decay: 0.1
  pct_start: 0.05
seed: 0
log_freq: 1
eval_freq: 100
no_eval: False
ckpt_freq: 100
num_ckpt_keep: 3
save_adapters: True
run_dir: "/tmp/test_ultra"
wandb:
  project: ""
  run_name: ""
  key: ""
  offline: False
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_mistral_finetune_example_config_runs_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, MISTRAL_FINETUNE_7B))
    assert cfg.model.path == "/models/mistral_7b"
    assert cfg.data.train == [DataSource("ultrachat_chunk_train.jsonl", 2.0), DataSource("extra.jsonl", 1.0)]
    assert cfg.data.eval == [DataSource("ultrachat_chunk_eval.jsonl", 1.0)]
    assert cfg.grad_accumulation == 2
    assert cfg.optim.lr == 6e-5 and cfg.optim.warmup_fraction == 0.05
    assert (cfg.logging.freq, cfg.eval.freq, cfg.checkpoint.freq, cfg.checkpoint.keep) == (1, 100, 100, 3)
    assert cfg.eval.enabled and cfg.checkpoint.save_adapters
    assert cfg.lora.rank == 64


def test_command_line_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MISTRAL_FINETUNE_7B), ["optim.lr=3e-5", "max_steps=50", "lora.targets=[wq,wv]"])
    assert (cfg.optim.lr, cfg.max_steps, cfg.lora.targets) == (3e-5, 50, ("wq", "wv"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("seq_lenn=8", "unknown key 'seq_lenn'; did you mean 'seq_len'?"),
        ("max_steps=0", "max_steps must be >= 1, got 0"),
        ("seq_len=long", "seq_len must be an integer, got 'long'"),
        ("model.dtype=fp8", "model.dtype is 'fp8'; expected one of bf16 | fp32 | fp16 | auto"),
        ("lora.rank=1.5", "lora.rank must be an integer, got 1.5"),
        ("lora.targets=[wq,attn]", "lora.targets has 'attn'"),
        ("lora.targets=[]", "lora.targets must name at least one module"),
        ("lora.targets=wq,wv", "lora.targets must be a list in brackets, e.g. [wq,wv], got 'wq,wv'"),
        ("lora.rank=0", "lora.rank must be >= 1, got 0"),
        ("lora.alpha=-1", "lora.alpha must be > 0, got -1.0"),
        ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
        ("model.attention=flash", "model.attention is 'flash'; expected one of auto | sdpa | varlen | flex | xformers"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
        ("optim.min_lr=1.0", "optim.min_lr must be in [0, optim.lr]"),
        ("eval.enabled=maybe", "eval.enabled must be true or false, got 'maybe'"),
        ("data.eval=[]", "eval is on but data.eval is empty"),
        ("eval.generate=-1", "eval.generate must be >= 0 (0: no generations), got -1"),
        ("eval.retain_warn=-0.1", "eval.retain_warn must be >= 0, got -0.1"),
        ("data.train=a.jsonl:0", "weights must be > 0"),
        ("lora=3", "lora must be a mapping"),
        ("nonsense", "is not of the form key=value"),
    ],
)
def test_each_mistake_is_named(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MISTRAL_FINETUNE_7B), [override])
    assert message in str(error.value)
    assert str(tmp_path / "config.yaml") in str(error.value) or "override" in str(error.value)


def test_retain_data_needs_eval_on(tmp_path):
    with pytest.raises(ConfigError, match="data.retain is evaluated at each eval, but eval is off: set eval.enabled"):
        load_config(write(tmp_path, MISTRAL_FINETUNE_7B), ["eval.enabled=false", "data.retain=general.jsonl"])
    cfg = load_config(write(tmp_path, MISTRAL_FINETUNE_7B), ["data.retain=general.jsonl:2,more/"])
    assert [(s.path, s.weight) for s in cfg.data.retain] == [("general.jsonl", 2.0), ("more/", 1.0)]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))


def test_a_key_twice_is_an_error_but_yaml_merge_keys_may_override(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml:3: not valid YAML: key 'lr' appears twice in one mapping"):
        read_yaml_mapping(write(tmp_path, "optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n"))
    merged = "base: &base\n  lr: 1.0e-4\n  eps: 1.0e-8\noptim:\n  <<: *base\n  lr: 3.0e-4\n"
    assert read_yaml_mapping(write(tmp_path, merged))["optim"] == {"lr": 3.0e-4, "eps": 1.0e-8}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.max_steps >= 1
    assert yaml.safe_load(path.read_text())  # and it is plain YAML


@pytest.mark.parametrize("where", ["wandb:\n  key: 0123abcd\n", "logging:\n  wandb:\n    key: 0123abcd\n"])
def test_an_api_key_in_a_config_is_refused(tmp_path, where):
    """A key would be saved in run_dir/config.yaml and sent with the trackers' run settings: W&B reads the
    environment (WANDB_API_KEY) instead."""
    text = MISTRAL_FINETUNE_7B.split("wandb:")[0] + where
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert "logging.wandb.key: an API key is not read from a config" in str(error.value)
    assert "WANDB_API_KEY" in str(error.value) and "0123abcd" not in str(error.value)
    with pytest.raises(ConfigError, match="logging.wandb.key"):
        load_config(write(tmp_path, MISTRAL_FINETUNE_7B), ["logging.wandb.key=0123abcd"])


def test_an_empty_api_key_holds_no_secret_and_is_nowhere_in_the_saved_config(tmp_path):
    cfg = load_config(write(tmp_path, MISTRAL_FINETUNE_7B))  # mistral-finetune's example has `key: ""`
    save_config(cfg, tmp_path / "saved.yaml")
    assert "key" not in yaml.safe_load((tmp_path / "saved.yaml").read_text())["logging"]["wandb"]
