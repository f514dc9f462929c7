"""Data that cannot fool the eval: train samples that repeat others and eval samples that train has, found from the
hashes the cache keeps and shown with FILE:LINE pairs (tailor validate, the report before step 1), eval files
written without them (--fix), and data.max_bad_fraction refusing a source with too many bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import train
from finetune import exit_codes
from finetune.cli import main
from finetune.data import cache_build
from finetune.data.cache import open_tokenized_files
from finetune.data.config import DataConfig, DataSource
from finetune.data.data_report import data_report
from finetune.data.errors import DataError, TooManyBadLines
from finetune.data.fingerprint import sample_fingerprint
from finetune.data.loader import build_eval_batches, build_train_loader
from finetune.data.sources import RunData, open_run_data

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat(i: int, system: str | None = None, question: str = "what is {i} plus {i}?") -> dict:
    messages = [{"role": "user", "content": question.format(i=i)}, {"role": "assistant", "content": f"It is {2 * i}."}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def tool_chat(call_id: str, arguments: str, answer: str = "Sunny in Paris.") -> dict:
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
            {"role": "assistant", "content": answer},
        ],
    }


def test_samples_are_the_same_once_whitespace_ids_and_unread_keys_are_left_out():
    base = sample_fingerprint(chat(1))
    spaced = chat(1, question="  what is {i}\tplus\n\n{i}? ")
    spaced["messages"][1]["weight"] = 0.5  # weights are not what the model reads
    spaced["id"] = "sample-7"
    assert sample_fingerprint(spaced) == base
    assert sample_fingerprint(chat(1, question="what is {i} plus {i} ?")) == base  # whitespace is left out
    assert sample_fingerprint(chat(1, question="What is {i} plus {i}?")) != base  # case is kept
    assert sample_fingerprint(chat(1, question="what is {i} minus {i}?")) != base

    sample, conversation = sample_fingerprint(chat(1, system="Be brief."))
    other_sample, other_conversation = sample_fingerprint(chat(1, system="Answer in French."))
    assert sample != other_sample and sample != base[0]
    assert conversation == other_conversation == base[1]  # the system prompt set aside: the same conversation

    calls = sample_fingerprint(tool_chat("abc123def", '{"city": "Paris", "unit": "C"}'))
    assert sample_fingerprint(tool_chat("zz9yy8xx7", '{ "unit":"C",\n"city":"Paris"}')) == calls  # ids, JSON layout
    assert sample_fingerprint(tool_chat("abc123def", '{"city": "Lyon", "unit": "C"}')) != calls
    assert sample_fingerprint(tool_chat("abc123def", '{"city": "Paris", "unit": "C"}', "Rain.")) != calls

    text = sample_fingerprint({"text": "the cat sat"})
    assert sample_fingerprint({"text": " the  cat\nsat\n"}) == text and text[0] == text[1]
    assert sample_fingerprint({"text": "the cat sits"}) != text


def crafted_data(tmp_path: Path, write_jsonl) -> tuple[Path, Path, Path, Path]:
    """Train: a file and a folder; eval: a file. Each repeat is commented with the line it repeats."""
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            chat(0),
            chat(1),
            tool_chat("abc123def", '{"city": "Paris"}'),
            {"text": "the cat sat"},
            chat(0, question=" what  is {i}\nplus {i}? "),  # a:1, whitespace aside
            "{bad",
            chat(1, system="Be brief."),  # a:2 under a system prompt
            tool_chat("zzz999yyy", '{ "city":"Paris" }'),  # a:3, other call id and JSON layout
            {"text": "the  cat sat\n"},  # a:4, pretrain text
        ],
    )
    b = write_jsonl(
        tmp_path / "more" / "b.jsonl",
        [
            chat(2, system="Be brief."),
            chat(2, system="Answer in French."),  # b:1 under another system prompt
            {"text": "the cat sat"},  # a:4, from the other source
            chat(0),  # a:1
        ],
    )
    eval_ = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            chat(5),
            chat(0, question="what is {i} plus {i}?   "),  # a:1
            chat(1, system="Answer in French."),  # a:2's conversation (the first train sample that has it)
            tool_chat("qqq111www", '{"city":"Paris"}'),  # a:3
            chat(6),
            {"text": "the cat sat"},  # a:4
            chat(2, system="Answer in French."),  # b:2
        ],
    )
    return a, b.parent, b, eval_


def test_repeats_and_eval_samples_in_train_are_counted_per_source_with_file_and_line(tmp_path, tokenizers, write_jsonl):
    a, folder, b, eval_ = crafted_data(tmp_path, write_jsonl)
    cfg = DataConfig(
        train=[DataSource(str(a)), DataSource(str(folder))], eval=[DataSource(str(eval_))], on_bad_sample="skip"
    )
    report = data_report(
        open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache", with_eval=True), seq_len=256
    )

    a_report, folder_report, eval_report = report.sources
    assert a_report.repeats == {"repeat": 3, "repeat_other_system": 1}
    assert [(r.kind, r.where, r.first) for r in a_report.repeat_examples] == [
        ("repeat", f"{a}:5", f"{a}:1"),
        ("repeat", f"{a}:8", f"{a}:3"),
        ("repeat", f"{a}:9", f"{a}:4"),
        ("repeat_other_system", f"{a}:7", f"{a}:2"),
    ]
    assert folder_report.repeats == {"repeat": 2, "repeat_other_system": 1}
    assert [(r.kind, r.where, r.first) for r in folder_report.repeat_examples] == [
        ("repeat", f"{b}:3", f"{a}:4"),
        ("repeat", f"{b}:4", f"{a}:1"),
        ("repeat_other_system", f"{b}:2", f"{b}:1"),
    ]
    assert eval_report.repeats == {"in_train": 4, "in_train_other_system": 1}
    assert [(r.kind, r.where, r.first) for r in eval_report.repeat_examples] == [
        ("in_train", f"{eval_}:2", f"{a}:1"),
        ("in_train", f"{eval_}:4", f"{a}:3"),
        ("in_train", f"{eval_}:6", f"{a}:4"),  # the first 3 of 4: the report shows REPORTED_PAIRS per kind
        ("in_train_other_system", f"{eval_}:3", f"{a}:2"),
    ]

    lines = report.lines()
    assert (
        f"  warning: 3 samples repeat an earlier train sample: {a}:5 repeats {a}:1, {a}:8 repeats {a}:3, "
        f"{a}:9 repeats {a}:4"
    ) in lines
    assert (
        f"  warning: 4 eval samples are also in train: {eval_}:2 repeats {a}:1, {eval_}:4 repeats {a}:3, "
        f"{eval_}:6 repeats {a}:4, ... (`tailor validate` lists them all); `tailor validate --fix OUT_DIR` writes "
        "eval files without them"
    ) in lines
    record = report.record(step=0)
    assert (record["repeats"], record["eval_in_train"]) == (7, 5)
    assert json.loads(json.dumps(record)) == record

    without_eval = data_report(
        open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache", with_eval=False), seq_len=256
    )
    assert [s.repeats for s in without_eval.sources] == [a_report.repeats, folder_report.repeats]


def write_config(tmp_path: Path, model_dir: Path, train_: list[Path], eval_: list[Path], **data) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir)},
        "seq_len": 256,
        "max_steps": 10,
        "batch_size": 2,
        "data": {"train": [str(p) for p in train_], "eval": [str(p) for p in eval_], **data},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_lists_every_pair_and_fix_removes_exactly_the_eval_lines_train_has(
    tmp_path, model_dirs, write_jsonl, capsys
):
    a, folder, b, eval_ = crafted_data(tmp_path, write_jsonl)
    config = write_config(tmp_path, model_dirs["v3"], [a, folder], [eval_], on_bad_sample="skip")
    assert main(["validate", str(config), "--fix", str(tmp_path / "fixed")]) == exit_codes.OK
    out = capsys.readouterr().out
    assert f"{a}:5: warning: the same sample as {a}:1 (whitespace aside): trained twice as often\n" in out
    assert f"{a}:7: warning: the same conversation as {a}:2, under another system prompt\n" in out
    assert f"{b}:3: warning: the same sample as {a}:4 (whitespace aside): trained twice as often\n" in out
    assert f"{eval_}:7: warning: eval sample also in train, at {b}:2\n" in out
    assert f"{eval_}:3: warning: eval conversation also in train, at {a}:2, under another system prompt\n" in out
    assert (
        f"train {a}: 3 samples repeat an earlier train sample; 1 samples repeat an earlier train conversation under "
        "another system prompt\n"
    ) in out
    assert f"eval {eval_}: 4 eval samples are also in train; 1 eval samples are in train under another system" in out
    assert "repeats do not change the exit status" in out

    fixed_eval = tmp_path / "fixed" / "eval" / "0-eval.jsonl"
    assert f"wrote {fixed_eval}: 2 lines kept, 0 repaired, 0 removed\n" in out
    assert "  and 5 eval samples removed from it because train has them\n" in out
    original = eval_.read_text().splitlines(keepends=True)
    assert fixed_eval.read_text().splitlines(keepends=True) == [original[0], original[4]]  # lines 1 and 5
    fixed_a_lines = (tmp_path / "fixed" / "train" / "0-a.jsonl").read_text().splitlines(keepends=True)
    assert fixed_a_lines == [line for n, line in enumerate(a.read_text().splitlines(keepends=True), 1) if n != 6]

    # The fixed config reads eval without train's samples: nothing of eval is found in train any more.
    assert main(["validate", str(tmp_path / "fixed" / "config.yaml")]) == exit_codes.OK
    out = capsys.readouterr().out
    assert "eval sample also in train" not in out and "eval conversation also in train" not in out
    fixed_a = tmp_path / "fixed" / "train" / "0-a.jsonl"
    assert f"train {fixed_a}: 3 samples repeat an earlier train sample" in out  # --fix leaves train as it is
    assert main(["validate", str(config), "--max-per-kind", "1"]) == exit_codes.DATA_FAULTS  # a:6 is bad
    out = capsys.readouterr().out
    assert f"{eval_}:2: warning: eval sample also in train, at {a}:1\n" in out
    assert f"{eval_}:4: warning" not in out
    assert f"... and 3 more in {eval_} (--max-per-kind N shows more)\n" in out


def test_clean_data_says_it_has_no_repeats(tmp_path, model_dirs, write_jsonl, capsys):
    train_ = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(4)])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", [chat(9)])
    assert main(["validate", str(write_config(tmp_path, model_dirs["v3"], [train_], [eval_]))]) == exit_codes.OK
    assert "no repeated samples, and no eval sample in train\n" in capsys.readouterr().out
    write_jsonl(train_, ["{bad", "[1]"])  # no usable train sample to compare eval with
    assert main(["validate", str(write_config(tmp_path, model_dirs["v3"], [train_], [eval_]))]) == 1
    assert "no repeated samples, and no eval sample in train\n" in capsys.readouterr().out


def test_fingerprints_keep_their_line_numbers_in_a_build_split_across_workers(
    tmp_path, tokenizers, write_jsonl, monkeypatch, capsys
):
    samples = [chat(i % 50) if i % 7 else "{bad json" for i in range(150)]
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    (serial,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "serial", num_workers=0)
    monkeypatch.setattr(cache_build, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(cache_build, "PART_BYTES", 1000)
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 2)  # Tekken: a worker per core
    (parallel,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "parallel", num_workers=2)
    assert "in 2 worker processes" in capsys.readouterr().out
    good = [n for n in range(1, 151) if (n - 1) % 7]
    assert parallel.fingerprints["line"].tolist() == serial.fingerprints["line"].tolist() == good
    assert parallel.fingerprints.tolist() == serial.fingerprints.tolist()
    expected = [sample_fingerprint(chat((n - 1) % 50)) for n in good]
    assert [(int(s), int(c)) for _, s, c in parallel.fingerprints.tolist()] == expected


def bad_share_data(tmp_path: Path, write_jsonl) -> tuple[Path, Path]:
    train_ = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(9)] + ["{bad"])  # 1 of 10 lines
    eval_ = write_jsonl(tmp_path / "eval.jsonl", [chat(20), "[1]", chat(21), chat(22)])  # 1 of 4 lines
    return train_, eval_


@pytest.mark.parametrize(
    "split, limit, share",
    [("train", 0.1, "1 of 10 lines are bad (10.00%)"), ("eval", 0.25, "1 of 4 lines are bad (25.00%)")],
)
def test_max_bad_fraction_accepts_a_share_at_the_limit_and_refuses_one_above_it(
    tmp_path, tokenizers, write_jsonl, split, limit, share
):
    train_, eval_ = bad_share_data(tmp_path, write_jsonl)
    source = train_ if split == "train" else eval_
    build = {"train": build_train_loader, "eval": build_eval_batches}[split]
    args = dict(seq_len=64, batch_size=1, rank=0, world_size=1)
    if split == "train":
        args["seed"] = 0

    def opened(**data) -> RunData:
        cfg = DataConfig(train=[DataSource(str(train_))], eval=[DataSource(str(eval_))], **data)
        return open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache")

    build(opened(on_bad_sample="skip", max_bad_fraction=limit), **args)  # at the limit: accepted
    with pytest.raises(TooManyBadLines) as refused:
        build(opened(on_bad_sample="skip", max_bad_fraction=limit - 0.01), **args)
    assert str(refused.value) == (
        f"{source}: {share}, above data.max_bad_fraction {limit - 0.01:g}; `tailor validate` lists the bad lines"
    )
    with pytest.raises(DataError) as first_bad_line:  # `error` stops at the first bad line, whatever the fraction
        build(opened(max_bad_fraction=limit), **args)
    assert not isinstance(first_bad_line.value, TooManyBadLines)


def test_a_run_above_max_bad_fraction_exits_with_the_data_faults_code_before_step_1(
    tmp_path, tiny_folder, model_dirs, write_jsonl, capsys
):
    train_, eval_ = bad_share_data(tmp_path, write_jsonl)
    config = write_config(tmp_path, tiny_folder(), [train_], [eval_], on_bad_sample="skip", max_bad_fraction=0.05)
    assert train.run([str(config)]) == exit_codes.DATA_FAULTS
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: {train_}: 1 of 10 lines are bad (10.00%), above data.max_bad_fraction 0.05; `tailor validate` "
        "lists the bad lines\n"
    )
    assert "step 1" not in captured.out and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert train.run([str(config), "data.max_bad_fraction=1.5"]) == exit_codes.USAGE
    assert "data.max_bad_fraction must be in [0, 1], got 1.5" in capsys.readouterr().err

    config = write_config(tmp_path, model_dirs["v3"], [train_], [eval_], on_bad_sample="skip", max_bad_fraction=0.2)
    assert main(["validate", str(config)]) == exit_codes.DATA_FAULTS  # it has bad lines
    out = capsys.readouterr().out
    assert (
        f"{eval_}: 1 of 4 lines are bad (25.00%), above data.max_bad_fraction 0.2: training refuses this source" in out
    )
    assert f"{train_}: 1 of 10" not in out


@pytest.mark.slow
def test_the_report_before_step_1_shows_repeats_and_eval_samples_in_train(tmp_path, tiny_folder, write_jsonl, capsys):
    train_ = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(6)] + [chat(2, system="Be brief.")])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", [chat(3), chat(30)])
    config = write_config(tmp_path, tiny_folder(), [train_], [eval_])
    assert train.run([str(config), "max_steps=1", "batch_size=1", "seq_len=64"]) == exit_codes.OK
    out = capsys.readouterr().out
    before_step_1 = out[: out.index("step 1/1")].splitlines()
    assert (
        f"  warning: 1 samples repeat an earlier train conversation under another system prompt: {train_}:7 "
        f"repeats {train_}:3"
    ) in before_step_1
    assert (
        f"  warning: 1 eval samples are also in train: {eval_}:1 repeats {train_}:4; `tailor validate --fix "
        "OUT_DIR` writes eval files without them"
    ) in before_step_1
    data = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (data["kind"], data["repeats"], data["eval_in_train"]) == ("data", 1, 1)
    assert data["sources"][1]["repeat_examples"] == [
        {"kind": "in_train", "where": f"{eval_}:1", "first": f"{train_}:4"}
    ]
