"""Hostile inputs: data lines, config files and overrides, model folders.

Each case goes through the real entry points in this process (train.run, finetune.cli.main): no traceback, the
documented exit code (finetune/exit_codes.py), and a message naming the place: FILE:LINE for a data line, the key
for a config, the file for a model folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hostile_runs import clean_ending
from safetensors.torch import save_file

import train as train_script
from finetune import exit_codes
from finetune.cli import main as tailor
from model.args import args_to_hf_config, load_model_args
from model.tiny import write_tiny_model
from model.tokenizer_files import tokenizer_path

REPO = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}


def write_config(folder: Path, model_dir: Path, train: Path, **sections) -> Path:
    """A config of a 2-step CPU run on `train`; `sections` replace or extend the top-level keys."""
    cfg = {
        "run_dir": str(folder / "run"),
        "seq_len": 64,
        "max_steps": 2,
        "model": {"path": str(model_dir), "dtype": "fp32", "attention": "sdpa"},
        "data": {"train": str(train), "num_workers": 0, "cache_dir": str(folder / "cache")},
        "lora": {"rank": 2, "alpha": 4, "targets": ["wq"]},
        "eval": {"enabled": False},
        "checkpoint": {"enabled": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------------
# Data lines: each is line 2 of a train file, between good lines. Its fault kind, and words of its message.

DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_LINES = {
    "lone surrogate in a message": (
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}',
        "lone_surrogate",
        "holds \\ud800",
    ),
    "lone low surrogate in text": (b'{"text": "a \\udc00 b"}', "lone_surrogate", "holds \\udc00"),
    "surrogate pair reversed": (b'{"text": "\\ude00\\ud83d"}', "lone_surrogate", "half of a UTF-16 surrogate"),
    "100,000 nested brackets": (b'{"text": ' + DEEP + b"}", "too_deeply_nested", "nested more than 100"),
    "deep objects": (b'{"text": "a", "x": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2001, "too_deeply_nested", "nested"),
    "unclosed 100,000 brackets": (b"[" * 100_000, "too_deeply_nested", "nested"),
    "5,000-digit number": (b'{"text": "a", "n": ' + b"7" * 5000 + b"}", "number_too_long", "4300 digits"),
    "5,000-digit weight": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": '
        + b"1" * 5000
        + b"}]}",
        "number_too_long",
        "4300 digits",
    ),
    "invalid UTF-8": (b'{"text": "caf\xe9"}', "not_utf8", "byte 0xe9"),
    "overlong UTF-8 encoding": (b'{"text": "\xc0\xaf"}', "not_utf8", "byte 0xc0"),
    "UTF-8 encoded surrogate": (b'{"text": "\xed\xa0\x80"}', "not_utf8", "byte 0xed"),
    "raw NUL byte": (b'{"text": "a\x00b"}', "invalid_json", "control character 0x00"),
    "NUL bytes only": (b"\x00\x00\x00\x00", "invalid_json", "invalid JSON"),
    "UTF-16 line": ('{"text": "a"}'.encode("utf-16"), "not_utf8", "not valid UTF-8"),
    "UTF-16-LE line": ('{"text": "a"}'.encode("utf-16-le"), "not_utf8", "the line is UTF-16, not UTF-8"),
    "BOM mid-file": (b'\xef\xbb\xbf{"text": "a"}', "bom", "byte-order mark"),
    "NaN weight": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": NaN}]}',
        "bad_weight",
        "weight nan",
    ),
    "infinite weight": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1e999}]}',
        "bad_weight",
        "weight inf",
    ),
    "truncated line": (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assis', "invalid_json", "column"),
    "a bare string": (b'"just text"', "not_an_object", "got a string"),
    "null": (b"null", "not_an_object", "got null"),
    "tool call arguments nested 100,000 deep": (
        json.dumps(
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                "messages": [
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "abcdefghi", "function": {"name": "f", "arguments": "[" * 100_000}}],
                    },
                ],
            }
        ).encode(),
        "arguments_not_json",
        "arguments are not valid JSON",
    ),
    "a 1 MB line": (b'{"text": "' + b"many words " * 100_000 + b'"}', None, None),  # read, and split by seq_len
    "NUL escapes": (b'{"text": "a\\u0000b\\u0000"}', None, None),  # a NUL character written as JSON allows
    "tool parameters nested 99 deep": (
        json.dumps(
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": json.loads('{"a": ' * 96 + "1" + "}" * 96)},
                    }
                ],
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            }
        ).encode(),
        None,  # accepted: 99 levels is within the limit, and mistral-common reads it
        None,
    ),
}


def data_file(folder: Path, line: bytes) -> Path:
    path = folder / "train.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"\n".join([good, line, good, good]) + b"\n")
    return path


@pytest.mark.parametrize("case", HOSTILE_LINES)
def test_validate_names_a_hostile_line_and_goes_on(case, model_dir, tmp_path, capsys):
    line, kind, words = HOSTILE_LINES[case]
    train = data_file(tmp_path, line)
    code = tailor(["validate", str(write_config(tmp_path, model_dir, train))])
    if kind is None:
        clean_ending(code, capsys, exit_codes.OK, "no faults")
        return
    output = clean_ending(code, capsys, exit_codes.DATA_FAULTS, f"{train}:2: ", words, f"1 bad lines ({kind} 1)")
    faults = "\n".join(line for line in output.splitlines() if ": warning: " not in line)  # GOOD repeats: warnings
    assert f"{train}:1:" not in faults and f"{train}:3:" not in faults  # the good lines around it are read


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in HOSTILE_LINES.items() if kind])
def test_tokenize_names_a_hostile_line(case, model_dir, tmp_path, capsys):
    line, kind, words = HOSTILE_LINES[case]
    train = data_file(tmp_path, line)
    code = tailor(["tokenize", str(train), "--model", str(model_dir)])
    output = clean_ending(code, capsys, exit_codes.DATA_FAULTS)
    records = [json.loads(r) for r in output.splitlines() if r.startswith("{")]
    assert [r["line"] for r in records] == [1, 2, 3, 4] and words in records[1]["error"]
    assert all("tokens" in r for r in records[:1] + records[2:])


@pytest.mark.parametrize("case", ["lone surrogate in a message", "100,000 nested brackets", "5,000-digit number"])
def test_training_refuses_a_hostile_line_before_the_model_loads(case, model_dir, tmp_path, capsys):
    line, kind, words = HOSTILE_LINES[case]
    train = data_file(tmp_path, line)
    code = train_script.run([str(write_config(tmp_path, model_dir, train))])
    clean_ending(code, capsys, exit_codes.DATA_FAULTS, f"error: {train}:2: ", words, "data.on_bad_sample: skip")


def test_skipped_lines_are_counted_before_step_1_in_metrics_and_in_the_summary(model_dir, tmp_path, capsys):
    """The case found: a 60-line file, 49 lines dropped with data.on_bad_sample: skip, and nothing said anywhere."""
    lines = [json.dumps(GOOD).encode()] * 11 + [line for line, kind, _ in HOSTILE_LINES.values() if kind][:21] * 3
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\n".join(lines[:60]) + b"\n")
    config = write_config(tmp_path, model_dir, train, data={"on_bad_sample": "skip"})
    output = clean_ending(train_script.run([str(config)]), capsys, exit_codes.OK, "49 bad lines skipped (")
    before_step_1, _, after = output.partition("\nstep 1")
    assert f"data train {train}: 1 file(s), 60 lines, 11 samples" in before_step_1
    assert "49 bad lines skipped" in before_step_1 and "49 bad lines skipped" in after.split("done: ")[1]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (records[0]["kind"], records[0]["step"], records[0]["bad_lines"]) == ("data", 0, 49)
    assert records[0]["sources"][0]["bad_lines"]["lone_surrogate"] == 9


# ---------------------------------------------------------------------------------------------------
# Config overrides: each is refused as the override's fault, naming it and the key, before anything is read.

HOSTILE_OVERRIDES = {
    "seed=-1": "seed must be in [0, 2**32)",
    f"seed={2**70}": "no setting here takes a number beyond",
    "seed=2**70": "seed must be an integer",
    "optim.lr=.inf": "optim.lr must be a finite number, got inf",
    "optim.lr=.nan": "optim.lr must be a finite number, got nan",
    "optim.lr=-1e-4": "optim.lr must be in (0, 1]",
    "optim.lr=10": "optim.lr must be in (0, 1]",
    "optim.weight_decay=.inf": "optim.weight_decay must be a finite number",
    "optim.weight_decay=-0.1": "optim.weight_decay must be >= 0",
    "optim.weight_decay=1e5": "times optim.lr",
    "optim.min_lr=.nan": "optim.min_lr must be a finite number",
    "optim.eps=0": "optim.eps must be > 0",
    "optim.betas=[.nan, 0.9]": "optim.betas[0] must be a finite number",
    "optim.betas=[0.9, 1.0]": "optim.betas must be two numbers in [0, 1)",
    "optim.max_grad_norm=-.inf": "optim.max_grad_norm must be a finite number",
    "optim.warmup_fraction=2": "optim.warmup_fraction must be in [0, 1]",
    "optim.warmup_steps=-1": "optim.warmup_steps must be >= 0",
    "lora.alpha=.inf": "lora.alpha must be a finite number",
    "lora.rank=0": "rank must be >= 1",
    "lora.dropout=1": "dropout must be in [0, 1)",
    "max_steps=-5": "max_steps must be >= 1",
    "seq_len=0": "seq_len must be >= 1",
    "seq_len=99999999999": "no setting here takes a number beyond",
    "seq_len=1048577": "seq_len must be at most 1,048,576",
    "batch_size=1.5": "batch_size must be an integer",
    "eval.freq=-1": "eval.freq must be >= 0",
    "checkpoint.keep=0": "checkpoint.keep must be >= 1",
    "logging.freq=-1": "logging.freq must be >= 1",
    "data.num_workers=-1": "data.num_workers must be >= 0",
    "model.dtype=fp8": "model.dtype is 'fp8'; expected one of",
    "optim.lrr=1e-4": "did you mean 'optim.lr'?",
    "optim.lr=[": "the value is not valid YAML",
    "optim.lr.peak=1": "optim.lr must be a number, got {'peak': 1}",
    "optim.lr=1e-4 ; optim.lr.peak=1": "lr is not a section",
    "optim.lr": "is not of the form key=value",
    "data.train=a.jsonl:-1": "weights must be > 0",
}


@pytest.mark.parametrize("override", HOSTILE_OVERRIDES)
@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_bad_override_is_named_as_such(command, override, model_dir, tmp_path, capsys):
    config = write_config(tmp_path, model_dir, data_file(tmp_path, json.dumps(GOOD).encode()))
    overrides = override.split(" ; ")  # the last is the bad one
    if command == "train":
        code = train_script.run([str(config), *overrides])
    else:
        code = tailor(["validate", str(config), *overrides])
    output = clean_ending(
        code, capsys, exit_codes.USAGE, f"error: override {overrides[-1]!r}", HOSTILE_OVERRIDES[override]
    )
    assert str(config) not in output  # the file is not at fault
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# Config files: each is refused naming the file (and the line or the key) before anything is read.


def config_text(folder: Path, model_dir: Path) -> str:
    return write_config(folder, model_dir, data_file(folder, json.dumps(GOOD).encode())).read_text()


HOSTILE_CONFIGS = {  # name -> (the file's bytes from a good config's text, words after "error: CONFIG")
    "UTF-16 with a BOM": (lambda text: text.encode("utf-16"), ": the file is UTF-16, not UTF-8"),
    "UTF-16 without a BOM": (lambda text: text.encode("utf-16-le"), ": the file is UTF-16, not UTF-8"),
    "Latin-1": (lambda text: (text + "# café\n").encode("latin-1"), ":21: not valid UTF-8 (byte 0xe9)"),
    "a key twice": (lambda text: (text + "seed: 1\nseed: 2\n").encode(), ":22: not valid YAML: key 'seed' appears"),
    "a nested key twice": (
        lambda text: (text + "optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n").encode(),
        ":23: not valid YAML: key 'lr' appears twice",
    ),
    "a python tag": (
        lambda text: (text + "seed: !!python/object/apply:os.system ['touch pwned']\n").encode(),
        ":21: not valid YAML: could not determine a constructor",
    ),
    "an unclosed bracket": (lambda text: (text + "x: [1, 2\n").encode(), ": not valid YAML"),
    "a tab indent": (lambda text: text.replace("  path", "\tpath", 1).encode(), ": not valid YAML"),
    "10,000 nested brackets": (lambda text: ("x: " + "[" * 10_000 + "]" * 10_000).encode(), ": not valid YAML"),
    "a list at the top": (lambda text: b"- run_dir: x\n", ": the top level must be a mapping"),
    "empty": (lambda text: b"", ": run_dir is required"),
    "NUL bytes": (lambda text: b"\x00" * 16, ": not valid YAML"),
    "seed -1": (lambda text: (text + "seed: -1\n").encode(), ": seed must be in [0, 2**32)"),
    "seed 2**70": (lambda text: (text + f"seed: {2**70}\n").encode(), ": seed is 1180591620717411303424"),
    "lr .inf": (lambda text: (text + "optim:\n  lr: .inf\n").encode(), ": optim.lr must be a finite number, got inf"),
    "weight_decay .inf": (
        lambda text: (text + "optim:\n  weight_decay: .inf\n").encode(),
        ": optim.weight_decay must be a finite number, got inf",
    ),
    "a source weight .nan": (
        lambda text: text.replace("  train: ", "  train:\n  - weight: .nan\n    path: ").encode(),
        "data.train[0].weight must be a finite number",
    ),
    "mistral-finetune's log_freq into a number": (
        lambda text: (text + "logging: 7\nlog_freq: 5\n").encode(),
        ": logging must be a mapping (mistral-finetune's log_freq goes in it), got 7",
    ),
    "mistral-finetune's checkpoint into a string": (
        lambda text: b"model: x\ncheckpoint: true\n",
        ": model must be a mapping (mistral-finetune's checkpoint goes in it), got 'x'",
    ),
    "a section that is a list": (lambda text: (text + "optim: [1, 2]\n").encode(), ": optim must be a mapping"),
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_bad_config_file_is_named(command, case, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bytes, words = HOSTILE_CONFIGS[case]
    config = tmp_path / "hostile.yaml"
    config.write_bytes(make_bytes(config_text(tmp_path, model_dir)))
    code = train_script.run([str(config)]) if command == "train" else tailor(["validate", str(config)])
    clean_ending(code, capsys, exit_codes.USAGE, f"error: {config}", words)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()


def test_a_utf8_bom_is_read_as_utf8(model_dir, tmp_path, capsys):
    config = tmp_path / "bom.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + config_text(tmp_path, model_dir).encode())
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.OK, "no faults")


# ---------------------------------------------------------------------------------------------------
# Model folders: each damage is refused in pre-flight, before any weight is loaded, naming the file.


def edit_params(**changes):
    def damage(folder: Path) -> None:
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps({**params, **changes}))

    return damage


def write_bytes(name: str, data: bytes | Callable[[bytes], bytes]):
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return damage


def add_tensors(name: str, **tensors):
    def damage(folder: Path) -> None:
        save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, folder / name)

    return damage


def remove(name: str):
    return lambda folder: (folder / name).unlink()


def pickled_pth(folder: Path) -> None:
    """A legacy consolidated.00.pth whose pickle would create a file if it were unpickled."""

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {folder.parent / 'pwned'}",))

    (folder / "consolidated.safetensors").unlink()
    torch.save({"tok_embeddings.weight": Exploit()}, folder / "consolidated.00.pth")


HOSTILE_MODEL_FOLDERS = {  # name -> (damage, the file the message names, words of the message)
    "no weights": (remove("consolidated.safetensors"), ".", "no weights (consolidated.safetensors"),
    "truncated weights": (
        write_bytes("consolidated.safetensors", lambda data: data[: len(data) // 2]),
        "consolidated.safetensors",
        "not a complete safetensors file",
    ),
    "empty weights": (write_bytes("consolidated.safetensors", b""), "consolidated.safetensors", "not a complete"),
    "weights that are a pickle": (
        write_bytes("consolidated.safetensors", b"\x80\x04\x95" + b"\x00" * 64),
        "consolidated.safetensors",
        "not a complete safetensors file",
    ),
    "a pickled .pth": (pickled_pth, "consolidated.00.pth", "not a readable weights file"),
    "an extra tensor in a second shard": (
        lambda folder: (
            (folder / "consolidated.safetensors").rename(folder / "consolidated-00001-of-00002.safetensors"),
            add_tensors("consolidated-00002-of-00002.safetensors", extra=(2, 2))(folder),
        ),
        "consolidated-00002-of-00002.safetensors",
        "tensor 'extra' is not a weight of the model",
    ),
    "a tensor in two shards": (
        lambda folder: (
            (folder / "consolidated.safetensors").rename(folder / "consolidated-00001-of-00002.safetensors"),
            add_tensors("consolidated-00002-of-00002.safetensors", **{"norm.weight": (64,)})(folder),
        ),
        "consolidated-00002-of-00002.safetensors",
        "tensor 'norm.weight' is also in consolidated-00001-of-00002.safetensors",
    ),
    "shapes of another model": (edit_params(hidden_dim=96), "consolidated.safetensors", "has shape (128, 64)"),
    "more layers than the weights": (edit_params(n_layers=3), ".", "no tensor for 9 of the model's weights"),
    "params.json not JSON": (write_bytes("params.json", b"{dim: 64"), "params.json", "not valid JSON"),
    "params.json empty": (write_bytes("params.json", b""), "params.json", "not valid JSON"),
    "params.json a list": (write_bytes("params.json", b"[64, 2]"), "params.json", "expected a JSON object"),
    "params.json UTF-16": (
        write_bytes("params.json", lambda data: data.decode().encode("utf-16")),
        "params.json",
        "not valid JSON",
    ),
    "params.json nested 100,000 deep": (
        write_bytes("params.json", b"[" * 100_000 + b"]" * 100_000),
        "params.json",
        "not valid JSON",
    ),
    "params.json 5,000-digit dim": (
        write_bytes("params.json", lambda data: data.replace(b'"dim": 64', b'"dim": ' + b"6" * 5000)),
        "params.json",
        "not valid JSON",
    ),
    "params.json without vocab_size": (
        write_bytes("params.json", lambda data: data.replace(b'"vocab_size"', b'"vocab"')),
        "params.json",
        "vocab_size must be a positive integer, got None",
    ),
    "params.json vocab_size a string": (edit_params(vocab_size="32768"), "params.json", "vocab_size must be a"),
    "params.json dim a string": (edit_params(dim="64"), "params.json", "key 'dim' must be int"),
    "params.json negative dim": (edit_params(dim=-64), "params.json", "key 'dim' must be a finite number > 0"),
    "params.json NaN norm_eps": (
        write_bytes("params.json", lambda data: re.sub(rb'"norm_eps": [^,}]+', b'"norm_eps": NaN', data)),
        "params.json",
        "key 'norm_eps' must be a finite number > 0, got nan",
    ),
    "params.json zero heads": (edit_params(n_kv_heads=0), "params.json", "key 'n_kv_heads' must be a finite"),
    "params.json null heads": (edit_params(n_heads=None), "params.json", "key 'n_heads' must be int, got None"),
    "config.json with 0 heads": (
        lambda folder: (
            (folder / "config.json").write_text(
                json.dumps({**args_to_hf_config(load_model_args(folder)), "num_attention_heads": 0})
            ),
            remove("params.json")(folder),
        ),
        "config.json",
        "key 'num_attention_heads' must be a positive integer, got 0",
    ),
    "params.json unknown key": (edit_params(dimm=64), "params.json", "unknown key(s) ['dimm']"),
    "config.json of llama": (
        lambda folder: (
            remove("params.json")(folder),
            (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32768})),
        ),
        "config.json",
        "model_type 'llama' is not supported",
    ),
    "config.json not JSON": (
        lambda folder: (remove("params.json")(folder), (folder / "config.json").write_text("{")),
        "config.json",
        "not valid JSON",
    ),
    "no tokenizer": (remove("tokenizer.model.v3"), ".", "no mistral-common tokenizer"),
    "truncated tokenizer": (
        write_bytes("tokenizer.model.v3", lambda data: data[:1000]),
        "tokenizer.model.v3",
        "not a tokenizer file mistral-common can read",
    ),
    "a tokenizer of JSON garbage": (
        lambda folder: (remove("tokenizer.model.v3")(folder), (folder / "tekken.json").write_text('{"x": 1}')),
        "tekken.json",
        "not a tokenizer file mistral-common can read",
    ),
    "two tokenizers": (
        lambda folder: shutil.copy(tokenizer_path("v7"), folder / "tokenizer.model.v7"),
        ".",
        "holds several tokenizer files",
    ),
    "a tokenizer of another vocabulary": (
        lambda folder: (remove("tokenizer.model.v3")(folder), shutil.copy(tokenizer_path("v1"), folder)),
        ".",
        "has 32000 tokens but the model's params.json/config.json says vocab_size 32768",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_MODEL_FOLDERS)
def test_a_damaged_model_folder_is_refused_in_preflight_naming_the_file(case, model_dir, tmp_path, capsys):
    damage, file, words = HOSTILE_MODEL_FOLDERS[case]
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    damage(folder)
    config = write_config(tmp_path, folder, data_file(tmp_path, json.dumps(GOOD).encode()))
    code = train_script.run([str(config)])
    clean_ending(code, capsys, exit_codes.USAGE, "error: model.path: ", folder / file if file != "." else folder, words)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists()  # refused before any data was read


@pytest.mark.parametrize(
    "lines",
    [
        [line for line, kind, _ in HOSTILE_LINES.values() if kind][:5],
        [json.dumps({"messages": [GOOD["messages"][0], {**GOOD["messages"][1], "weight": 0}]}).encode()] * 3,
    ],
    ids=["every line bad", "every sample with nothing to train"],
)
def test_a_file_with_no_usable_sample_is_refused_before_the_model_loads(lines, model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\n".join(lines) + b"\n")
    config = write_config(tmp_path, model_dir, train, data={"on_bad_sample": "skip"})
    clean_ending(
        train_script.run([str(config)]),
        capsys,
        exit_codes.DATA_FAULTS,
        f"error: {train}: no usable sample in {len(lines)} lines",
    )


AFTER_TRAINING = {  # tailor commands that read a model folder, given the folder and a scratch folder
    "chat": lambda model, out: ["chat", str(model), "--prompt", "hi", "--max-tokens", "2"],
    "export-hf": lambda model, out: ["export-hf", "--model", str(model), "--out", str(out / "hf")],
}


@pytest.mark.parametrize(
    "case", ["truncated weights", "a pickled .pth", "params.json not JSON", "params.json negative dim", "no weights"]
)
@pytest.mark.parametrize("command", AFTER_TRAINING)
def test_commands_after_training_name_a_damaged_model_folder(command, case, model_dir, tmp_path, capsys):
    damage, file, words = HOSTILE_MODEL_FOLDERS[case]
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    damage(folder)
    code = tailor(AFTER_TRAINING[command](folder, tmp_path))
    clean_ending(code, capsys, exit_codes.USAGE, "error: ", folder / file if file != "." else folder, words)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------------
# Ambiguous lines: used, shown as warnings with FILE:LINE, and the exit code is that of a clean file.

USER, ANSWER = GOOD["messages"]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}
AMBIGUOUS_LINES = {  # line -> words of its warning
    b'{"text": "a", "text": "b"}': "key 'text' appears twice in one JSON object; the last one is used",
    json.dumps({"messages": [USER, ANSWER, ANSWER]}).encode(): "messages 2 and 3 are both from the assistant",
    json.dumps(
        {"tools": TOOLS, "messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "type": "x"}]}]}
    ).encode(): "tool call 1 has type 'x'; it is read as a function call",
    json.dumps(
        {"tools": TOOLS, "messages": [USER, {"role": "assistant", "tool_calls": [CALL]}, USER, ANSWER]}
    ).encode(): "tool call 'abcDEF123' of message 2 has no tool result",
    json.dumps({"messages": [USER, {**ANSWER, "weight": 0}]}).encode(): "no assistant message is trained",
    json.dumps({"messages": [USER, {**ANSWER, "wieght": 0}]}).encode(): "key 'wieght' is not read",
}


def test_ambiguous_lines_are_warnings_with_file_and_line(model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\n".join([json.dumps(GOOD).encode(), *AMBIGUOUS_LINES]) + b"\n")
    config = write_config(tmp_path, model_dir, train)
    output = clean_ending(
        tailor(["validate", str(config)]), capsys, exit_codes.OK, "no faults", "warnings do not change"
    )
    for line, words in enumerate(AMBIGUOUS_LINES.values(), 2):
        assert f"{train}:{line}: warning: " in output and words in output

    dumped = clean_ending(tailor(["tokenize", str(train), "--model", str(model_dir)]), capsys, 0)
    records = [json.loads(r) for r in dumped.splitlines()]
    assert "warnings" not in records[0]
    assert [words in r["warnings"][0] for r, words in zip(records[1:], AMBIGUOUS_LINES.values())] == [True] * 6
    shown = clean_ending(tailor(["tokenize", str(train), "--model", str(model_dir), "--show"]), capsys, 0)
    assert f"{train}:6: warning: no assistant message is trained" in shown

    clean_ending(train_script.run([str(config)]), capsys, exit_codes.OK, "1 samples left out (nothing_to_train 1)")


@pytest.mark.parametrize(
    "case",
    [
        "params.json not JSON",
        "params.json without vocab_size",
        "no tokenizer",
        "truncated tokenizer",
        "a tokenizer of another vocabulary",
        "config.json not JSON",
    ],
)
def test_validate_names_a_damaged_model_folder(case, model_dir, tmp_path, capsys):
    damage, file, words = HOSTILE_MODEL_FOLDERS[case]
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    damage(folder)
    config = write_config(tmp_path, folder, data_file(tmp_path, json.dumps(GOOD).encode()))
    code = tailor(["validate", str(config)])
    clean_ending(code, capsys, exit_codes.USAGE, "error: ", folder / file if file != "." else folder, words)


@pytest.mark.parametrize(
    "case", ["lone surrogate in a message", "100,000 nested brackets", "5,000-digit number", "invalid UTF-8"]
)
def test_chat_input_names_a_hostile_line(case, model_dir, tmp_path, capsys):
    line, kind, words = HOSTILE_LINES[case]
    conversations = data_file(tmp_path, line)
    code = tailor(["chat", str(model_dir), "--input", str(conversations), "--output", str(tmp_path / "out.jsonl")])
    clean_ending(code, capsys, exit_codes.USAGE, f"error: {conversations}:2: ", words)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_hugging_face_folder_with_an_unknown_tensor_is_named(tmp_path, capsys):
    folder = write_tiny_model(tmp_path / "hf", arch="mistral-7b", tokenizer="v3", layout="hf")
    save_file({"model.layers.0.self_attn.rotary.scale": torch.zeros(2)}, folder / "model-extra.safetensors")
    config = write_config(tmp_path, folder, data_file(tmp_path, json.dumps(GOOD).encode()))
    clean_ending(
        train_script.run([str(config)]),
        capsys,
        exit_codes.USAGE,
        f"error: model.path: {folder / 'model-extra.safetensors'}: tensor 'model.layers.0.self_attn.rotary.scale'",
    )
