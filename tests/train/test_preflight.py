"""Pre-flight checks: each mistake in a config is found before any heavy work, with a message naming what and where."""

import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors.torch import load_file

import finetune.training.preflight as preflight
from finetune.config import load_config
from finetune.training.preflight import PreflightError, checkpoint_bytes, run_preflight_checks
from model.args import args_to_hf_config, load_model_args

REPO = Path(__file__).resolve().parents[2]


def check(config: Path):
    return run_preflight_checks(load_config(config))


def fails(config: Path, message: str) -> None:
    with pytest.raises(PreflightError, match=re.escape(message)):
        check(config)


def model_copy(tiny_model_dir: Path, folder: Path, tokenizer: bool = True, **params) -> Path:
    """The tiny model's params.json (with `params` changed), weights and tokenizer: all that pre-flight reads."""
    folder.mkdir()
    (folder / "params.json").write_text(
        json.dumps({**json.loads((tiny_model_dir / "params.json").read_text()), **params})
    )
    shutil.copy(tiny_model_dir / "consolidated.safetensors", folder)
    if tokenizer:
        shutil.copy(tiny_model_dir / "tokenizer.model.v3", folder)
    return folder


def test_a_sound_config_passes_and_hands_back_the_tokenizer_and_the_model_args(write_config, tiny_model_dir):
    tokenizer, args = check(write_config())
    assert tokenizer.instruct_tokenizer.tokenizer.n_words == 32768
    assert args == load_model_args(tiny_model_dir)


def test_model_folder_that_does_not_exist(write_config, tmp_path):
    fails(write_config(model__path=str(tmp_path / "nowhere")), f"model.path: {tmp_path / 'nowhere'} is not a folder")


def test_model_folder_without_params(write_config, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(
        write_config(model__path=str(tmp_path / "empty")),
        f"model.path: {tmp_path / 'empty'} has neither params.json nor config.json",
    )


def test_train_data_that_does_not_exist(write_config, tmp_path):
    missing = tmp_path / "missing.jsonl"
    fails(write_config(data__train=str(missing)), f"data.train[0]: {missing}: no such file or folder")


def test_train_folder_without_jsonl(write_config, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    fails(
        write_config(data__train=str(tmp_path / "data")),
        f"data.train[0]: {tmp_path / 'data'}: folder has no .jsonl files",
    )


def test_eval_data_is_needed_only_when_eval_is_on(write_config, tmp_path):
    missing = str(tmp_path / "eval.jsonl")
    fails(write_config(data__eval=missing), f"data.eval[0]: {missing}: no such file or folder")
    check(write_config(data__eval=missing, eval__enabled=False))


def test_tokenizer_that_does_not_match_the_model_vocab(write_config, tiny_model_dir, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model", vocab_size=32000)
    fails(
        write_config(model__path=str(model)),
        f"model.path: {model}: the tokenizer tokenizer.model.v3 has 32768 tokens but the model's "
        "params.json/config.json says vocab_size 32000",
    )


def test_model_folder_without_tokenizer(write_config, tiny_model_dir, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model", tokenizer=False)
    fails(write_config(model__path=str(model)), f"model.path: no mistral-common tokenizer in {model}")


def test_seq_len_longer_than_the_model_declares(write_config, tiny_model_dir, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model", max_seq_len=64)
    fails(
        write_config(model__path=str(model)),
        f"seq_len 128 is longer than the max_seq_len 64 that {model / 'params.json'} declares; "
        "set seq_len to 64 or less",
    )
    check(write_config(model__path=str(model), seq_len=64))


def test_seq_len_longer_than_a_hugging_face_folder_declares(write_config, tiny_model_dir, tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    hf_config = dict(args_to_hf_config(load_model_args(tiny_model_dir)), max_position_embeddings=96)
    (model / "config.json").write_text(json.dumps(hf_config))
    shutil.copy(tiny_model_dir / "tokenizer.model.v3", model)
    fails(
        write_config(model__path=str(model)),
        f"seq_len 128 is longer than the max_position_embeddings 96 that {model / 'config.json'} declares",
    )


def test_seq_len_may_pass_the_sliding_window(write_config, tiny_model_dir, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model", sliding_window=32)
    check(write_config(model__path=str(model)))


def test_run_dir_that_is_a_file(write_config, tmp_path):
    (tmp_path / "taken").write_text("")
    fails(write_config(run_dir=str(tmp_path / "taken")), f"run_dir: {tmp_path / 'taken'} is a file, not a folder")


def test_too_little_disk_for_the_checkpoints(write_config, tmp_path, monkeypatch):
    config = write_config(checkpoint__keep=3)
    needed = 4 * checkpoint_bytes(load_config(config), load_model_args(load_config(config).model.path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(2 * needed, needed + 1, needed - 1))
    fails(
        config,
        f"run_dir: {tmp_path / 'run'} has 0.0 GiB free, but its checkpoints need about 0.0 GiB more "
        f"(4 of about 0.00 GiB each: checkpoint.keep 3 and the one being written)",
    )
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(2 * needed, needed, needed))
    check(config)


def test_checkpoint_size_counts_every_lora_matrix(write_config):
    cfg = load_config(write_config())  # rank 8 on wq wk wv wo w1 w2 w3 and the output head
    a = load_model_args(cfg.model.path)
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    per_layer = (a.dim + q) * 2 + (a.dim + kv) * 2 + (a.dim + a.hidden_dim) * 3
    lora_parameters = 8 * (a.n_layers * per_layer + a.dim + a.vocab_size)
    assert checkpoint_bytes(cfg, a) == lora_parameters * (4 + 4 + 8)
    cfg.checkpoint.save_adapters = False  # then the merged model too, in model.dtype (fp32 here)
    weights = load_file(Path(cfg.model.path) / "consolidated.safetensors")
    assert checkpoint_bytes(cfg, a) == lora_parameters * 16 + 4 * sum(t.numel() for t in weights.values())


def test_train_py_stops_on_a_preflight_error_before_any_work(write_config, tmp_path):
    config = write_config(data__train=str(tmp_path / "missing.jsonl"))
    result = subprocess.run(
        [sys.executable, "train.py", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: data.train[0]: {tmp_path / 'missing.jsonl'}: no such file or folder"
    assert not (tmp_path / "run").exists()
