"""Sharding, mixing, resumption, eval batches and the tokenized cache."""

from __future__ import annotations

import gc
import json
import multiprocessing
import time

import numpy as np
import pytest

from finetune.data import (
    DataError,
    build_eval_batches,
    build_train_loader,
    cache_build,
    tokenize_sample,
    word_memo_file,
)
from finetune.data.cache import open_tokenized_files
from finetune.data.config import DataConfig, DataSource
from finetune.data.sources import open_run_data
from finetune.data.text_encoders import pack
from finetune.data.tokenize import word_memo


def documents_of(batch, seq_len, known: dict) -> list[int]:
    """The sample index of each document in a batch (padding left out), from its input tokens."""
    found, position = [], 0
    for n in batch.seqlens:
        window = batch.tokens[position : position + n]
        if batch.weights[position : position + n].any():
            found.append(known[tuple(window.tolist())])
        position += n
    return found


@pytest.fixture
def chat_file(tmp_path, write_jsonl, chat):
    return write_jsonl(tmp_path / "train.jsonl", [chat(i, turns=1 + i % 3) for i in range(40)])


def inputs_to_sample(path, tokenizer) -> dict:
    """Each line's inputs (its tokens but the last), as tokenize_sample makes them -> the line's index."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return {tuple(tokenize_sample(json.loads(line), tokenizer).tokens[:-1]): i for i, line in enumerate(lines)}


def loader(path, tokenizer, cache_dir, rank=0, world_size=1, seed=0, **data):
    cfg = DataConfig(train=[DataSource(str(path))], **data)
    return build_train_loader(
        open_run_data(cfg, tokenizer, cache_dir=cache_dir),
        seq_len=128,
        batch_size=2,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def test_two_ranks_read_disjoint_shares_that_cover_the_data(tmp_path, tokenizers, chat_file):
    tokenizer, cache_dir = tokenizers["v3"], tmp_path / "cache"
    known = inputs_to_sample(chat_file, tokenizer)
    per_rank = []
    for rank in (0, 1):
        rank_loader = loader(chat_file, tokenizer, cache_dir, rank=rank, world_size=2)
        docs = []
        while rank_loader.report()["epochs_begun"][str(chat_file)] < 3:
            docs += documents_of(next(rank_loader), 128, known)
        per_rank.append(docs)
    for epoch in (0, 1):  # the global permutation changes every epoch; its rank shares are disjoint
        shares = [set(docs[20 * epoch : 20 * (epoch + 1)]) for docs in per_rank]
        assert len(shares[0]) == len(shares[1]) == 20
        assert not shares[0] & shares[1]
        assert shares[0] | shares[1] == set(range(40))


def test_every_epoch_is_reshuffled_and_training_never_ends(tmp_path, tokenizers, chat_file):
    train = loader(chat_file, tokenizers["v3"], tmp_path / "cache")
    order = train.feeds[0].order
    assert sorted(order(0)) == sorted(order(1)) == list(range(40))
    assert order(0).tolist() != order(1).tolist()
    for _ in range(60):
        next(train)
    assert train.report()["epochs_begun"][str(chat_file)] >= 3


def test_resumed_loader_continues_with_the_next_batch(tmp_path, tokenizers, chat_file):
    first = loader(chat_file, tokenizers["v3"], tmp_path / "cache", rank=1, world_size=2, seed=7, overlong="split")
    for _ in range(13):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain types only
    resumed = loader(chat_file, tokenizers["v3"], tmp_path / "cache", rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    for _ in range(15):
        a, b = next(first), next(resumed)
        assert a.tokens.tolist() == b.tokens.tolist()
        assert a.weights.tolist() == b.weights.tolist()
        assert a.seqlens == b.seqlens
    assert resumed.report() == first.report()


def test_sources_are_mixed_by_weight(tmp_path, tokenizers, write_jsonl):
    alpha = write_jsonl(tmp_path / "alpha.jsonl", [{"text": f"alpha {i}"} for i in range(30)])
    write_jsonl(tmp_path / "beta" / "b.jsonl", [{"text": f"beta {i}"} for i in range(30)])  # a folder source
    cfg = DataConfig(train=[DataSource(str(alpha), 3.0), DataSource(str(tmp_path / "beta"), 1.0)])
    train = build_train_loader(
        open_run_data(cfg, tokenizers["tekken"], cache_dir=tmp_path / "cache"),
        seq_len=16,
        batch_size=50,
        rank=0,
        world_size=1,
        seed=0,
    )
    alpha_first = tokenizers["tekken"].instruct_tokenizer.tokenizer.encode("alpha", bos=False, eos=False)[0]
    firsts = np.concatenate([next(train).tokens.view(-1, 16)[:, 1].numpy() for _ in range(20)])
    assert abs((firsts == alpha_first).mean() - 0.75) < 0.05


def test_an_eval_source_without_a_usable_sample_is_named(tmp_path, tokenizers, write_jsonl, chat):
    empty, good = tmp_path / "empty.jsonl", write_jsonl(tmp_path / "eval.jsonl", [chat(0)])
    empty.write_text("")
    cfg = DataConfig(eval=[DataSource(str(good)), DataSource(str(empty))])
    with pytest.raises(DataError, match=f"{empty}: no usable sample to evaluate on; remove it from data.eval"):
        build_eval_batches(
            open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache"),
            seq_len=64,
            batch_size=1,
            rank=0,
            world_size=1,
        )


def test_eval_is_the_same_for_any_number_of_ranks(tmp_path, tokenizers, write_jsonl, chat):
    data = write_jsonl(tmp_path / "eval.jsonl", [chat(i, turns=1 + i % 4, words=3 + i) for i in range(23)])
    cfg = DataConfig(eval=[DataSource(str(data))])
    data = open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache")
    single = build_eval_batches(data, seq_len=128, batch_size=1, rank=0, world_size=1)
    for world_size in (2, 3):
        per_rank = [
            build_eval_batches(data, seq_len=128, batch_size=2, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        assert len({len(batches) for batches in per_rank}) == 1  # the same number of forward calls everywhere
        sequences = [(r, b, s) for r in range(world_size) for b in range(len(per_rank[r])) for s in range(2)]
        merged = {}
        for r, b, s in sequences:
            batch = per_rank[r][b]
            index = (b * 2 + s) * world_size + r  # global sequence index of this slot
            merged[index] = (batch.tokens[s * 128 : (s + 1) * 128], batch.weights[s * 128 : (s + 1) * 128])
        for i, batch in enumerate(single):
            assert merged[i][0].tolist() == batch.tokens.tolist()
            assert merged[i][1].tolist() == batch.weights.tolist()
        assert all(merged[i][1].sum() == 0 for i in merged if i >= len(single))  # padding sequences


def test_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path, tokenizers, chat_file, monkeypatch, chat):
    (first,) = open_tokenized_files([chat_file], tokenizers["v3"], "all", tmp_path / "cache")
    monkeypatch.setattr(cache_build, "_tokenize_range", lambda *a: pytest.fail("tokenized again"))
    (again,) = open_tokenized_files([chat_file], tokenizers["v3"], "all", tmp_path / "cache")
    assert again.entry == first.entry and len(again) == 40
    monkeypatch.undo()
    (other_tokenizer,) = open_tokenized_files([chat_file], tokenizers["tekken"], "all", tmp_path / "cache")
    (last_only,) = open_tokenized_files([chat_file], tokenizers["v3"], "last", tmp_path / "cache")
    with open(chat_file, "a") as f:
        f.write(json.dumps(chat(99)) + "\n")
    (edited,) = open_tokenized_files([chat_file], tokenizers["v3"], "all", tmp_path / "cache")
    assert len({first.entry, other_tokenizer.entry, last_only.entry, edited.entry}) == 4
    assert len(edited) == 41


def test_tokenizing_pauses_the_cyclic_collector_and_collects_once_per_collect_bytes(
    tmp_path, tokenizers, write_jsonl, chat, monkeypatch
):
    # a bad line's SampleFault holds its batch in a reference cycle: the garbage a paused collector leaves
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) if i % 3 else "{bad json" for i in range(600)])
    collections = []  # whether the collector was on, for each collection

    def record(phase, info):
        if phase == "stop":
            collections.append(gc.isenabled())

    gc.callbacks.append(record)
    try:
        monkeypatch.setattr(cache_build, "COLLECT_BYTES", 1)  # a collection after every batch of BATCH_LINES (256)
        (built,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "a", num_workers=0)
        assert gc.isenabled() and collections.count(False) == 3  # 600 lines: 3 batches, and no other collection
        monkeypatch.undo()
        gc.disable()  # a caller that turned the collector off finds it off
        collections.clear()
        (again,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "b", num_workers=0)
        assert not gc.isenabled() and collections == []
    finally:
        gc.enable()
        gc.callbacks.remove(record)
    assert built.meta["n_samples"] == again.meta["n_samples"] == 400
    assert built.tokens.tolist() == again.tokens.tolist()


def test_parallel_build_equals_in_process_build(tmp_path, tokenizers, write_jsonl, chat, monkeypatch, capsys):
    samples = [chat(i, turns=1 + i % 3) if i % 7 else "{bad json" for i in range(120)]
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    (serial,) = open_tokenized_files([data], tokenizers["v3"], "all", tmp_path / "serial", num_workers=0)
    monkeypatch.setattr(cache_build, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(cache_build, "PART_BYTES", 2000)  # about 5 lines per worker task
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 4)  # workers, whatever cores the test machine gives
    (parallel,) = open_tokenized_files([data], tokenizers["v3"], "all", tmp_path / "parallel", num_workers=2)
    assert "into the cache, in 2 worker processes\n" in capsys.readouterr().out
    for name in ("sample_starts", "span_starts", "spans"):
        assert getattr(parallel, name).tolist() == getattr(serial, name).tolist()
    assert parallel.tokens.tolist() == serial.tokens.tolist()
    assert [f.line for f in parallel.faults()] == [i + 1 for i in range(0, 120, 7)]
    assert parallel.meta["n_lines"] == 120 and parallel.meta["errors_by_kind"] == {"invalid_json": 18}


def test_worker_processes_only_where_they_can_pay(tmp_path, tokenizers, write_jsonl, chat, monkeypatch, capsys):
    # SentencePiece's memo encodes on every core already: a worker per two cores; Tekken: a worker per core
    assert [cache_build.worker_processes(2, cores, threaded=True) for cores in (1, 2, 3, 4, 16)] == [0, 0, 0, 2, 2]
    assert [cache_build.worker_processes(workers, 8, threaded=True) for workers in (0, 1, 2, 3, 8)] == [0, 0, 2, 3, 4]
    assert [cache_build.worker_processes(2, cores, threaded=False) for cores in (1, 2, 3, 16)] == [0, 2, 2, 2]
    assert [cache_build.worker_processes(workers, 3, threaded=False) for workers in (0, 1, 2, 8)] == [0, 0, 2, 3]
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i, turns=1 + i % 3) for i in range(60)])
    (serial,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "serial", num_workers=0)
    assert "into the cache, in this process\n" in capsys.readouterr().out
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 4)
    (small,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "small", num_workers=2)
    assert "in this process (under 2 MiB: starting workers would cost more than they save)" in capsys.readouterr().out
    monkeypatch.setattr(cache_build, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 1)
    (one_core,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "one", num_workers=2)
    assert "in this process (1 usable core: a worker process could only wait its turn)" in capsys.readouterr().out
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 3)
    (capped,) = open_tokenized_files([data], tokenizers["tekken"], "all", tmp_path / "capped", num_workers=5)
    assert "in 3 worker processes (5 asked for, 3 usable cores)" in capsys.readouterr().out
    for built in (small, one_core, capped):  # nothing lost, nothing changed: the same cache wherever it was built
        assert built.tokens.tolist() == serial.tokens.tolist() and built.spans.tolist() == serial.spans.tolist()
        assert built.meta["n_samples"] == 60
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 2)  # SentencePiece v3 on 2 cores: this process
    (v3_serial,) = open_tokenized_files([data], tokenizers["v3"], "all", tmp_path / "v3-0", num_workers=0)
    capsys.readouterr()
    (v3,) = open_tokenized_files([data], tokenizers["v3"], "all", tmp_path / "v3-2", num_workers=2)
    expected = "in this process (2 usable cores: with this tokenizer, worker processes pay from 4 cores on, and this"
    assert expected in capsys.readouterr().out
    assert v3.tokens.tolist() == v3_serial.tokens.tolist() and v3.spans.tolist() == v3_serial.spans.tolist()


def test_a_file_worth_splitting_gives_every_worker_several_parts(tmp_path, write_jsonl, chat, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i, turns=1 + i % 3) for i in range(200)])
    size = data.stat().st_size
    assert cache_build.part_ranges(data, num_workers=2) == [(0, size)]  # small: in-process
    monkeypatch.setattr(cache_build, "MIN_SPLIT_BYTES", size // 2)
    assert cache_build.part_ranges(data, num_workers=0) == [(0, size)]
    ranges = cache_build.part_ranges(data, num_workers=2)
    assert len(ranges) == 2 * cache_build.PARTS_PER_WORKER  # a file under PART_BYTES still gives each worker 4 parts
    assert ranges[0][0] == 0 and ranges[-1][1] == size and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    raw = data.read_bytes()
    assert all(raw[start - 1 : start] == b"\n" for start, _ in ranges[1:])  # each starts a line
    assert max(end - start for start, end in ranges) < 2 * size / len(ranges)  # about equal shares


def test_the_word_memo_is_kept_with_the_cache_and_gives_the_same_tokens(
    tmp_path, model_dirs, write_jsonl, chat, monkeypatch, capsys
):
    """A later build (another file, a new process's tokenizer) starts with the words earlier builds encoded, whether
    a worker or the process itself encoded them; the tokens are those of a cold build; a damaged memo is rebuilt."""
    from finetune.data import load_tokenizer

    first = write_jsonl(tmp_path / "a.jsonl", [chat(i, turns=2) for i in range(60)])
    second = write_jsonl(tmp_path / "b.jsonl", [chat(i + 1000, turns=2) for i in range(60)])
    monkeypatch.setattr(cache_build, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(cache_build, "PART_BYTES", 3000)
    monkeypatch.setattr(cache_build, "usable_cores", lambda: 4)  # the words of worker processes too
    open_tokenized_files([first], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cache", num_workers=2)
    (memo_file,) = (tmp_path / "cache" / "word_memo").iterdir()
    saved = word_memo_file.read_words(memo_file, 32768)
    assert len(saved) > 100 and saved == {w: pack(word_memo(load_tokenizer(model_dirs["v3"]))(w)) for w in saved}

    fresh = load_tokenizer(model_dirs["v3"])  # a new run: its memo starts empty, then reads the file
    (warm,) = open_tokenized_files([second], fresh, "all", tmp_path / "cache", num_workers=0)
    assert set(saved) <= set(word_memo(fresh).words())
    (cold,) = open_tokenized_files([second], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cold", num_workers=0)
    assert warm.tokens.tolist() == cold.tokens.tolist() and warm.spans.tolist() == cold.spans.tolist()
    assert len(word_memo_file.read_words(memo_file, 32768)) > len(saved)  # the second file's new words were added

    word_memo_file.write_words(memo_file, {"the": pack([10**9])})  # an id outside the vocabulary
    other = write_jsonl(tmp_path / "c.jsonl", [chat(i + 2000) for i in range(5)])
    capsys.readouterr()
    open_tokenized_files([other], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cache", num_workers=0)
    assert "not a word memo this tokenizer wrote; it is rebuilt" in capsys.readouterr().out
    assert all(ids != pack([10**9]) for ids in word_memo_file.read_words(memo_file, 32768).values())
    memo_file.write_bytes(b"not an npz")
    assert word_memo_file.read_words(memo_file, 32768) is None


def _build_in_child(path, cache_dir, log):
    """Run in a child process: build the cache, noting each real build in `log`."""
    from finetune.data import load_tokenizer

    build = cache_build._build

    def logged_build(*args):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # hold the lock long enough for the other process to wait on it
        build(*args)

    cache_build._build = logged_build
    tokenizer = load_tokenizer(path.parent / "model")
    open_tokenized_files([path], tokenizer, "all", cache_dir, num_workers=0)


def test_ranks_starting_together_tokenize_each_file_once(tmp_path, model_dirs, chat_file):
    (tmp_path / "model").symlink_to(model_dirs["v3"])
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_build_in_child, args=(chat_file, tmp_path / "cache", tmp_path / "log"))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert (tmp_path / "log").read_text() == "built\n"
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_loader_refuses_impossible_setups(tmp_path, tokenizers, write_jsonl, chat):
    small = write_jsonl(tmp_path / "small.jsonl", [chat(0)])
    with pytest.raises(DataError, match="1 usable samples cannot be shared by 2 ranks"):
        loader(small, tokenizers["v3"], tmp_path / "cache", rank=0, world_size=2)
    long = write_jsonl(tmp_path / "long.jsonl", [chat(0, words=200)])
    with pytest.raises(DataError, match=r"every sample \(of rank 0\) is longer than seq_len 128 and overlong is drop"):
        loader(long, tokenizers["v3"], tmp_path / "cache", overlong="drop")
    with pytest.raises(DataError, match="no such file or folder"):
        loader(tmp_path / "missing.jsonl", tokenizers["v3"], tmp_path / "cache")
