"""`tailor validate CONFIG`: every fault of every train and eval file, repeated samples and eval samples that train
has, statistics, epochs and an ETA.

Validation tokenizes through the same cache as training, so a clean `tailor validate` also means the
first training step starts without tokenizing anything.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from finetune import exit_codes
from finetune.data.cache import open_tokenized_files
from finetune.data.cache_entry import TokenizedFile
from finetune.data.config import DataSource
from finetune.data.duplicates import eval_lines_in_train, find_repeats
from finetune.data.epochs import describe_epochs, resolve_epochs, tokens_per_step
from finetune.data.errors import LEFT_OUT, DataError, SampleFault
from finetune.data.jsonl import BOM, parse_line, read_lines
from finetune.data.model_tokenizer import check_tokenizer_vocab, load_tokenizer, read_vocab_size
from finetune.data.repair import repair_sample
from finetune.data.sources import TokenizedSource, bad_shares_above, check_holds_none_of, source_files
from finetune.data.tokenize import tokenize_sample_spans

if TYPE_CHECKING:  # the config names the model's settings; the data path reads it, never imports it
    from finetune.config import TrainConfig


Throughput = Callable[[str], tuple[float, str]]  # model folder -> (tokens / s / GPU, where it comes from)


def validate(
    cfg: TrainConfig,
    *,
    cache_dir: Path,
    throughput: Throughput | None,
    device: str,
    gpus: int = 1,
    fix_dir: Path | None = None,
    max_per_kind: int = 10,
    price: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Print faults, statistics, epochs and an ETA on `gpus` x `device` (none without `throughput`: a CPU); write
    fixed files to fix_dir; with `price` (per GPU-hour), the ETA's cost. Returns the exit status
    (finetune/exit_codes.py): 1 when training would refuse the data or skip lines of it, 2 when the model folder's
    tokenizer cannot be read.

    `cache_dir` (finetune.config.resolve_cache_dir) and `throughput` (finetune.training.eta's
    tokens_per_second_per_gpu for the device) are passed in: they need the config and the model's shape, which the
    data path never imports."""
    out = out or sys.stdout
    try:
        tokenizer = load_tokenizer(cfg.model.path)
        check_tokenizer_vocab(tokenizer, read_vocab_size(cfg.model.path), cfg.model.path)
    except (OSError, ValueError) as e:
        print(f"error: model.path: {e}", file=sys.stderr)
        return exit_codes.USAGE
    try:
        written = {"run_dir": Path(cfg.run_dir), "data.cache_dir": cache_dir}  # what training refuses to read
        splits = {
            split: _split_files(split, sources, written)
            for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval))
        }
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    paths = list(dict.fromkeys(splits["train"] + splits["eval"]))
    files = dict(zip(paths, open_tokenized_files(paths, tokenizer, cfg.data.train_on, cache_dir, cfg.data.num_workers)))
    faults = print_faults(files, max_per_kind, out, fixing=fix_dir is not None)
    print_warnings(files, max_per_kind, out)
    train, eval_ = (
        [TokenizedSource(s.path, s.weight, [files[p] for p in source_files(s)]) for s in sources]
        for sources in (cfg.data.train, cfg.data.eval)
    )
    print_repeats(train, eval_, max_per_kind, out)
    print_statistics(splits, files, cfg.seq_len, out)
    refused = print_sources_training_refuses(cfg, files, gpus, out)
    if cfg.data.on_bad_sample == "skip":  # with `error`, training refuses any bad line: the faults above say so
        print_bad_shares_training_refuses(train + eval_, cfg.data.max_bad_fraction, out)
    print_epochs_and_eta(cfg, files, gpus, device, throughput, out, price)
    if fix_dir is not None:
        write_fixed_files(cfg, files, tokenizer, fix_dir, out, eval_lines_in_train(train, eval_))
        return exit_codes.DATA_FAULTS if refused else exit_codes.OK
    return exit_codes.DATA_FAULTS if faults or refused else exit_codes.OK


def _split_files(split: str, sources: list[DataSource], written: dict[str, Path]) -> list[Path]:
    """The files of a split's sources; a missing path, or a folder holding one of the `written` folders, is named by
    its key, as training's pre-flight names it."""
    files = []
    for i, source in enumerate(sources):
        try:
            check_holds_none_of(source, written)
            files += source_files(source)
        except DataError as error:
            raise DataError(f"data.{split}[{i}]: {error}") from None
    return files


def print_sources_training_refuses(cfg: TrainConfig, files: dict[Path, TokenizedFile], ranks: int, out: TextIO) -> int:
    """Train sources with fewer usable samples than ranks (an empty file, one whose every line is bad), and eval
    sources without one while eval is on: training stops on them before its first step, so validation fails on them
    too. Returns how many."""
    refused = 0
    for source in cfg.data.train:
        samples = sum(files[p].meta["n_samples"] for p in source_files(source))
        if samples < ranks:
            refused += 1
            print(
                f"{source.path}: {samples} usable samples cannot be shared by {ranks} rank(s): training refuses "
                "this train source",
                file=out,
            )
    for source in cfg.data.eval if cfg.eval.enabled else []:
        if not sum(files[p].meta["n_samples"] for p in source_files(source)):
            refused += 1
            print(f"{source.path}: no usable sample to evaluate on: training refuses this eval source", file=out)
    if refused:
        print(file=out)
    return refused


def print_bad_shares_training_refuses(sources: list[TokenizedSource], max_bad_fraction: float, out: TextIO) -> None:
    """Sources whose share of bad lines is above data.max_bad_fraction: training stops on them before its first step
    (exit 1, as validation's for their faults); --fix writes them without bad lines."""
    refused = bad_shares_above(sources, max_bad_fraction)
    for line in refused:
        print(f"{line}: training refuses this source", file=out)
    if refused:
        print(file=out)


def print_repeats(train: list[TokenizedSource], eval_: list[TokenizedSource], max_per_kind: int, out: TextIO) -> None:
    """Train samples that repeat an earlier one and eval samples that train has (finetune/data/duplicates.py), each
    as `FILE:LINE: warning: ...` naming the one it repeats (the first max_per_kind of each kind per source), then
    the counts per source. Warnings: they leave the exit status as is."""
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
    """Each bad line (at most max_per_kind per kind) and the counts; `fixing`: --fix is about to write the files."""
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
    """Lines that are used but perhaps not as meant (errors.py's SampleWarning); they leave the exit status as is."""
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


def print_epochs_and_eta(
    cfg: TrainConfig,
    files: dict[Path, TokenizedFile],
    gpus: int,
    device: str,
    throughput: Throughput | None,
    out: TextIO,
    price: float | None = None,
) -> None:
    epoch_tokens = sum(files[p].meta["n_tokens"] for source in cfg.data.train for p in source_files(source))
    if cfg.epochs is not None:
        if not epoch_tokens:
            print(f"epochs: {cfg.epochs:g} of data.train, which has no usable tokens: training refuses it", file=out)
            return
        cfg = resolve_epochs(cfg, epoch_tokens, gpus)  # the max_steps training will run, on `gpus` ranks
        print(describe_epochs(cfg, epoch_tokens, gpus), file=out)
    total = tokens_per_step(cfg, gpus) * cfg.max_steps
    print(
        f"max_steps {cfg.max_steps} x {gpus} rank(s) x batch_size {cfg.batch_size} x grad_accumulation "
        f"{cfg.grad_accumulation} x seq_len {cfg.seq_len} = {total:,} tokens",
        file=out,
    )
    weight_sum = sum(s.weight for s in cfg.data.train)
    for source in cfg.data.train:
        tokens = sum(files[p].meta["n_tokens"] for p in source_files(source))
        share = source.weight / weight_sum
        epochs = f"{total * share / tokens:.2f} epochs" if tokens else "no usable samples"
        print(f"  {source.path} (weight {source.weight:g}, {share:.0%} of tokens): {epochs}", file=out)
    if throughput is None:
        print(
            f"ETA on {gpus} x {device}: not estimated, tailor has no figures for the {device}; --device h100, h200 "
            "or a100 gives the ETA on one of those GPUs",
            file=out,
        )
        if price is not None:
            print("cost: not estimated without an ETA", file=out)
        return
    try:
        rate, origin = throughput(cfg.model.path)
    except (OSError, KeyError, ValueError) as e:
        print(f"ETA: unknown ({e})", file=out)
        return
    seconds = total / (rate * gpus)
    print(f"ETA on {gpus} x {device}: {format_eta(seconds)} at {rate:,.0f} tokens/s per GPU ({origin})", file=out)
    if price is not None:
        gpu_hours = seconds / 3600 * gpus
        print(f"cost: {gpu_hours * price:,.2f} ({gpu_hours:,.2f} GPU-hours at {price:g} per GPU-hour)", file=out)


def format_eta(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(minutes, 1)} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours / 24:.1f} days"


# ---------------------------------------------------------------------------------------------------
# --fix


def fixed_layout(sources: list[DataSource], split: str, fix_dir: Path) -> list[tuple[DataSource, dict[Path, Path]]]:
    """Where --fix writes a split's sources: source k at OUT/<split>/<k>-<its name>, a file, or a folder with the
    source folder's .jsonl files at their places below it. Each with the source that reads it there (same weight)
    and {original file: repaired file}."""
    layout = []
    for k, source in enumerate(sources):
        path = Path(source.path).expanduser()
        target = (Path(fix_dir) / split / f"{k}-{path.name}").absolute()
        files = {path: target} if path.is_file() else {f: target / f.relative_to(path) for f in source_files(source)}
        layout.append((DataSource(str(target), source.weight), files))
    return layout


def write_fixed_files(
    cfg: TrainConfig,
    files: dict[Path, TokenizedFile],
    tokenizer,
    fix_dir: Path,
    out: TextIO,
    in_train: dict[Path, set[int]],
) -> None:
    """Write every train and eval file where fixed_layout says, bad lines repaired or removed, and eval lines whose
    sample train has (in_train: eval file -> lines) removed."""
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        for _, targets in fixed_layout(sources, split, fix_dir):
            for path, target in targets.items():
                also_in_train = in_train.get(path, set()) if split == "eval" else set()
                write_fixed_file(path, files[path], tokenizer, cfg.data.train_on, target, out, also_in_train)


def write_fixed_file(
    path: Path, file: TokenizedFile, tokenizer, train_on: str, target: Path, out: TextIO, also_in_train: set[int]
) -> None:
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
