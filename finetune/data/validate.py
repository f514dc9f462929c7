"""The data's part of `tailor validate` (finetune/planning/validate.py runs it with the config): every fault and
warning of every train and eval file, repeated samples and eval samples that train has, statistics per file, and
`--fix`'s repaired files.

Validation tokenizes through the same cache as training, so a clean `tailor validate` also means the
first training step starts without tokenizing anything.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TextIO

from finetune.data.cache_entry import TokenizedFile
from finetune.data.config import DataConfig, DataSource
from finetune.data.duplicates import find_repeats
from finetune.data.errors import LEFT_OUT, SampleFault
from finetune.data.jsonl import BOM, parse_line, read_lines
from finetune.data.repair import repair_sample
from finetune.data.sources import TokenizedSource, bad_shares_above, source_files
from finetune.data.tokenize import tokenize_sample_spans


def print_bad_shares_training_refuses(sources: list[TokenizedSource], max_bad_fraction: float, out: TextIO) -> None:
    """Print the sources whose share of bad lines is above data.max_bad_fraction.

    Training stops on them before its first step (exit 1, as validation's for their faults); --fix writes them
    without bad lines.
    """
    refused = bad_shares_above(sources, max_bad_fraction)
    for line in refused:
        print(f"{line}: training refuses this source", file=out)
    if refused:
        print(file=out)


def print_repeats(train: list[TokenizedSource], eval_: list[TokenizedSource], max_per_kind: int, out: TextIO) -> None:
    """Print train samples that repeat an earlier one and eval samples that train has, then the counts per source.

    Each as `FILE:LINE: warning: ...` naming the one it repeats (finetune/data/duplicates.py), the first
    `max_per_kind` of each kind per source. Warnings: they leave the exit status as is.
    """
    found = [source for source in find_repeats(train, eval_, max_per_kind) if source.counts]
    for source in found:
        for repeat in source.examples:
            print(repeat.line(), file=out)
        hidden = sum(source.counts.values()) - len(source.examples)
        if hidden:
            print(f"... and {hidden:,} more in {source.source} (--max-per-kind N shows more)", file=out)
    if not found:
        print("no repeated samples, and no eval sample in train\n", file=out)
        return
    print(file=out)
    for source in found:
        print(f"{source.split} {source.source}: {source.summary()}", file=out)
    if any(source.split == "eval" for source in found):
        print("--fix OUT_DIR writes the eval files without the samples train has", file=out)
    print("repeats do not change the exit status\n", file=out)


def print_faults(files: dict[Path, TokenizedFile], max_per_kind: int, out: TextIO, fixing: bool = False) -> Counter:
    """Print each bad line (at most `max_per_kind` per kind) and the counts.

    Args:
        fixing: --fix is about to write the files (the counts' line says so).

    Returns:
        The bad lines, by kind.
    """
    counts: Counter = Counter()
    fixable = 0
    for path, file in files.items():
        for fault in file.faults():
            counts[fault.kind] += 1
            fixable += fault.fixable
            if counts[fault.kind] <= max_per_kind:
                print(f"{path}:{fault.line}: {fault.message}", file=out)
    if counts:
        hidden = sum(n - max_per_kind for n in counts.values() if n > max_per_kind)
        if hidden:
            print(
                f"... and {hidden} more (at most {max_per_kind} shown per kind; --max-per-kind N shows more)", file=out
            )
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
        outcome = (
            "applied in the files written below, where the others are removed"
            if fixing
            else "(--fix OUT_DIR applies it), the others would be removed"
        )
        print(f"\n{sum(counts.values())} bad lines ({kinds}); {fixable} have a safe repair {outcome}\n", file=out)
    else:
        print("no faults\n", file=out)
    return counts


def print_warnings(files: dict[Path, TokenizedFile], max_per_kind: int, out: TextIO) -> None:
    """Print lines that are used but perhaps not as meant (errors.py's SampleWarning); they leave the exit status."""
    counts: Counter = Counter()
    for path, file in files.items():
        for warning in file.warnings():
            counts[warning.kind] += 1
            if counts[warning.kind] <= max_per_kind:
                print(f"{path}:{warning.line}: warning: {warning.message}", file=out)
    if counts:
        hidden = sum(n - max_per_kind for n in counts.values() if n > max_per_kind)
        more = f"; {hidden} more not shown (--max-per-kind N shows more)" if hidden else ""
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
        left_out = sum(n for kind, n in counts.items() if kind in LEFT_OUT)
        used = f"{left_out} of these lines are left out of training, the others" if left_out else "these lines"
        print(
            f"\n{sum(counts.values())} warnings ({kinds}){more}; {used} are trained as read; warnings do not change "
            "the exit status\n",
            file=out,
        )


def print_statistics(
    splits: dict[str, list[Path]], files: dict[Path, TokenizedFile], seq_len: int, out: TextIO
) -> None:
    """Print a table of each file's lines, bad lines, samples, tokens, trained tokens and samples over seq_len.

    Args:
        splits: split name -> its files, in the table's order.
    """
    header = ("file", "split", "lines", "bad", "samples", "tokens", "trained", f"> seq_len {seq_len}")
    rows = []
    for split, paths in splits.items():
        for path in paths:
            f, meta = files[path], files[path].meta
            overlong = int((f.lengths - 1 > seq_len).sum())
            rows.append(
                (
                    str(path),
                    split,
                    f"{meta['n_lines']:,}",
                    f"{sum(meta['errors_by_kind'].values()):,}",
                    f"{meta['n_samples']:,}",
                    f"{meta['n_tokens']:,}",
                    f"{meta['n_trained_tokens']:,}",
                    f"{overlong:,}",
                )
            )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        print("  ".join(cells), file=out)
    print(file=out)


# ---------------------------------------------------------------------------------------------------
# --fix


def fixed_layout(sources: list[DataSource], split: str, fix_dir: Path) -> list[tuple[DataSource, dict[Path, Path]]]:
    """Where --fix writes a split's sources: source k at OUT/<split>/<k>-<its name>.

    That is a file, or a folder with the source folder's .jsonl files at their places below it.

    Returns:
        For each source, the source that reads it there (same weight) and {original file: repaired file}.
    """
    layout = []
    for k, source in enumerate(sources):
        path = Path(source.path).expanduser()
        target = (Path(fix_dir) / split / f"{k}-{path.name}").absolute()
        files = {path: target} if path.is_file() else {f: target / f.relative_to(path) for f in source_files(source)}
        layout.append((DataSource(str(target), source.weight), files))
    return layout


def write_fixed_files(
    data: DataConfig,
    files: dict[Path, TokenizedFile],
    tokenizer,
    fix_dir: Path,
    out: TextIO,
    in_train: dict[Path, set[int]],
) -> None:
    """Write every train and eval file where `fixed_layout` says, bad lines repaired or removed.

    Args:
        in_train: eval file -> the lines whose sample train has, removed too.
    """
    for split, sources in (("train", data.train), ("eval", data.eval)):
        for _, targets in fixed_layout(sources, split, fix_dir):
            for path, target in targets.items():
                also_in_train = in_train.get(path, set()) if split == "eval" else set()
                write_fixed_file(path, files[path], tokenizer, data.train_on, target, out, also_in_train)


def write_fixed_file(
    path: Path, file: TokenizedFile, tokenizer, train_on: str, target: Path, out: TextIO, also_in_train: set[int]
) -> None:
    """Write one file to `target`, bad lines repaired or removed, and say what was done.

    Args:
        also_in_train: lines to remove too (eval samples that train has).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    bad_lines = {fault.line for fault in file.faults()}
    kept = repaired = removed = 0
    with open(target, "wb") as f:
        for n, raw in enumerate(read_lines(path), 1):
            if n in also_in_train:
                continue
            if n not in bad_lines:
                f.write(raw if raw.endswith(b"\n") else raw + b"\n")
                kept += 1
                continue
            fixed = repair_line(raw, n, tokenizer, train_on)
            if fixed is None:
                removed += 1
            else:
                f.write(fixed)
                repaired += 1
    print(f"wrote {target}: {kept:,} lines kept, {repaired:,} repaired, {removed:,} removed", file=out)
    if also_in_train:
        print(f"  and {len(also_in_train):,} eval samples removed from it because train has them", file=out)


def repair_line(raw: bytes, line: int, tokenizer, train_on: str) -> bytes | None:
    """The repaired line, or None when no safe repair makes it a good sample."""
    raw = raw.removeprefix(BOM)
    try:
        sample, _ = repair_sample(parse_line(raw), salt=f"{line}:{raw.decode('utf-8', 'replace')}")
        tokenize_sample_spans(sample, tokenizer, train_on)
    except SampleFault:
        return None
    return (json.dumps(sample, ensure_ascii=False) + "\n").encode("utf-8")
