"""The data report before step 1: per source, what is trained, and every line or sample that is not as written."""

from __future__ import annotations

import json

from finetune.data import tokenize_sample
from finetune.data.config import DataConfig, DataSource
from finetune.data.data_report import data_report
from finetune.data.sources import open_run_data

USER = {"role": "user", "content": "Hi"}


def test_bad_lines_left_out_samples_and_overlong_samples_are_counted_per_source(
    tmp_path, tokenizers, write_jsonl, chat
):
    unweighted = {"messages": [USER, {"role": "assistant", "content": "Yo", "weight": 0}]}
    noisy = write_jsonl(
        tmp_path / "noisy.jsonl",
        [chat(0), "{oops", "", unweighted, chat(1, words=80), "[1]", "{oops", {"text": "a", "text ": "b"}, chat(2)],
    )
    clean = write_jsonl(tmp_path / "clean" / "a.jsonl", [chat(3), chat(4)])
    write_jsonl(tmp_path / "clean" / "b.jsonl", [chat(5)])
    cfg = DataConfig(
        train=[DataSource(str(noisy)), DataSource(str(tmp_path / "clean"))],
        eval=[DataSource(str(clean))],
        retain=[DataSource(str(noisy))],
        on_bad_sample="skip",
        overlong="truncate",
    )
    report = data_report(open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache", with_eval=True), seq_len=64)

    noisy_report, folder_report, eval_report, retain_report = report.sources
    assert (noisy_report.split, noisy_report.files, noisy_report.lines, noisy_report.samples) == ("train", 1, 9, 4)
    assert noisy_report.bad_lines == {"invalid_json": 2, "blank_line": 1, "not_an_object": 1}
    assert noisy_report.left_out == {"nothing_to_train": 1}
    assert noisy_report.warnings == 2  # the left-out sample and the unread key "text "
    assert noisy_report.overlong == 1  # chat(1, words=80) is about 180 tokens
    assert (folder_report.files, folder_report.samples, folder_report.bad_lines) == (2, 3, {})
    assert (eval_report.split, eval_report.samples) == ("eval", 2)
    assert (retain_report.split, retain_report.bad_lines) == ("retain", noisy_report.bad_lines)  # counted there too
    tokenized = [tokenize_sample(chat(i), tokenizers["v3"]) for i in (3, 4, 5)]
    assert folder_report.tokens == sum(len(t.tokens) for t in tokenized)
    assert folder_report.trained_tokens == sum(sum(w > 0 for w in t.weights) for t in tokenized)

    lines = report.lines()
    assert lines[0].startswith(f"data train {noisy}: 1 file(s), 9 lines, 4 samples, ")
    assert "  4 bad lines skipped (invalid_json 2, blank_line 1, not_an_object 1)" in lines
    assert "  1 samples left out (nothing_to_train 1)" in lines
    assert "  1 samples longer than seq_len 64: truncated to seq_len" in lines
    assert "  2 warnings (`tailor validate` lists them with FILE:LINE)" in lines
    assert report.summary() == [
        f"{split} {noisy}: {line}"
        for split in ("train", "retain")
        for line in (
            "4 bad lines skipped (invalid_json 2, blank_line 1, not_an_object 1)",
            "1 samples left out (nothing_to_train 1)",
            "1 samples longer than seq_len 64: truncated to seq_len",
        )
    ]
    assert report.summary({"overlong_truncated": 3})[-1] == "while training, this rank's packing: overlong_truncated 3"
    record = report.record(step=0)
    assert (record["kind"], record["bad_lines"], record["left_out"], record["overlong"]) == ("data", 8, 2, 2)
    assert record["sources"][0]["bad_lines"] == noisy_report.bad_lines
    assert json.loads(json.dumps(record)) == record


def test_clean_data_says_so(tmp_path, tokenizers, write_jsonl, chat):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(0), chat(1)])
    cfg = DataConfig(train=[DataSource(str(data))])
    report = data_report(
        open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache", with_eval=False), seq_len=256
    )
    assert [s.split for s in report.sources] == ["train"]
    assert report.summary() == ["data: every line trained as written"]
