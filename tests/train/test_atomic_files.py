"""finetune/atomic_files.py: a file or folder appears whole or not at all, under one temporary naming."""

import os

import pytest

from finetune.atomic_files import (
    atomic_folder,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    clear_leftovers,
    is_temporary,
    temporary_path,
)


def test_a_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    target.write_text("old")
    atomic_write_text(target, "new ✓")
    assert target.read_bytes() == "new ✓".encode()
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "config.yaml") as staging:
        staging.write_text("a: 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "status.json"]


@pytest.mark.parametrize("writer", ["file", "path", "folder"])
def test_an_exception_leaves_the_target_as_it_was_and_no_temporary(tmp_path, writer):
    target = tmp_path / "out"
    if writer == "folder":
        target.mkdir()
    else:
        target.write_bytes(b"as it was")
    with pytest.raises(OSError, match="disk full"):
        if writer == "file":
            with atomic_write(target) as f:
                f.write(b"half")
                raise OSError("disk full")
        elif writer == "path":
            with atomic_path(target) as staging:
                staging.write_bytes(b"half")
                raise OSError("disk full")
        else:
            with atomic_folder(target) as staging:
                (staging / "sub").mkdir()
                (staging / "sub" / "part").write_bytes(b"half")
                raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    if writer == "folder":
        assert list(target.iterdir()) == []
    else:
        assert target.read_bytes() == b"as it was"


def test_a_folder_appears_whole_in_place_of_an_empty_one(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    with atomic_folder(target) as staging:
        assert not staging.samefile(target) and list(staging.iterdir()) == []
        (staging / "sub").mkdir()
        (staging / "sub" / "weights").write_bytes(b"w")
        (staging / "params.json").write_text("{}")
        assert list(target.iterdir()) == []  # nothing shows before the block ends
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["params.json", "sub", "sub/weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_the_one_naming_is_hidden_per_process_beside_the_target_and_recognised(tmp_path):
    staging = temporary_path(tmp_path / "metrics.jsonl")
    assert staging == tmp_path / f".metrics.jsonl.tmp-{os.getpid()}"
    assert is_temporary(staging) and is_temporary(".v2-abc.npz.tmp-99")
    for name in ("metrics.jsonl", "checkpoint_000010.tmp", ".hidden", "x.tmp-", ".x.tmp-1a", "v2-abc.tmp-99.npz"):
        assert not is_temporary(tmp_path / name), name


def test_clearing_leftovers_removes_the_targets_temporaries_only(tmp_path):
    target = tmp_path / "entry"
    (tmp_path / ".entry.tmp-12").mkdir()
    (tmp_path / ".entry.tmp-12" / "tokens.bin").write_bytes(b"t")
    (tmp_path / ".entry.tmp-34").write_bytes(b"half")
    kept = [tmp_path / ".other.tmp-12", tmp_path / "entry.tmp-12", tmp_path / ".entry.tmp-x", target]
    for path in kept:
        path.write_bytes(b"k")
    clear_leftovers(target)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    clear_leftovers(tmp_path / "no such folder" / "entry")  # nothing to clear
