"""What the data of a run is, per source, before step 1: files, samples, tokens, and every line or sample that is
not trained as written (bad lines skipped, samples left out, samples longer than seq_len split, truncated or dropped).

Nothing is dropped without being counted and shown: train.py prints `DataReport.lines()` before step 1, writes
`DataReport.record()` to metrics.jsonl (`{"kind": "data", ...}`), and repeats `DataReport.summary()` in the final
summary. The counts come from the tokenized cache (whole files, the same on every rank).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.data.config import DataConfig
from finetune.data.errors import LEFT_OUT
from finetune.data.sources import TokenizedSource, open_sources

OVERLONG_DONE = {"split": "split into pieces of seq_len", "truncate": "truncated to seq_len", "drop": "dropped"}


@dataclass
class SourceReport:
    split: str  # "train" or "eval"
    path: str
    files: int
    lines: int
    samples: int  # trained samples (lines less bad lines and samples left out)
    tokens: int
    trained_tokens: int
    bad_lines: dict[str, int] = field(default_factory=dict)  # fault kind -> lines skipped (data.on_bad_sample: skip)
    left_out: dict[str, int] = field(default_factory=dict)  # warning kind -> usable samples left out (all weights 0)
    warnings: int = 0  # every warning (`tailor validate` lists them), left-out samples included
    overlong: int = 0  # samples longer than seq_len, which data.overlong splits, truncates or drops


@dataclass
class DataReport:
    seq_len: int
    overlong: str  # data.overlong
    sources: list[SourceReport]

    def lines(self) -> list[str]:
        """The report as printed before step 1: one line per source, and one per kind of loss."""
        out = []
        for s in self.sources:
            out.append(
                f"data {s.split} {s.path}: {s.files} file(s), {s.lines:,} lines, {s.samples:,} samples, "
                f"{s.tokens:,} tokens ({s.trained_tokens:,} trained)"
            )
            out += [f"  {line}" for line in _losses(s, self.seq_len, self.overlong)]
            if s.warnings:
                out.append(f"  {s.warnings:,} warnings (`tailor validate` lists them with FILE:LINE)")
        return out

    def summary(self, met: dict[str, int] | None = None) -> list[str]:
        """The counts again, for the end of the run: what of the data was not trained as written. `met`: the train
        loader's counts of what packing did to the overlong samples it drew (TrainLoader.counts, this rank's)."""
        losses = [
            f"{s.split} {s.path}: {line}" for s in self.sources for line in _losses(s, self.seq_len, self.overlong)
        ]
        if met:
            losses.append(f"while training, this rank's packing: {_kinds(met)}")
        return losses or ["data: every line trained as written"]

    def record(self, step: int) -> dict:
        """The metrics.jsonl record: totals at the top (trackers plot numbers), each source in full."""
        return {
            "kind": "data",
            "step": step,
            "bad_lines": sum(sum(s.bad_lines.values()) for s in self.sources),
            "left_out": sum(sum(s.left_out.values()) for s in self.sources),
            "overlong": sum(s.overlong for s in self.sources),
            "overlong_policy": self.overlong,
            "seq_len": self.seq_len,
            "sources": [asdict(s) for s in self.sources],
        }


def _losses(s: SourceReport, seq_len: int, overlong: str) -> list[str]:
    out = []
    if s.bad_lines:
        out.append(f"{sum(s.bad_lines.values()):,} bad lines skipped ({_kinds(s.bad_lines)})")
    if s.left_out:
        out.append(f"{sum(s.left_out.values()):,} samples left out ({_kinds(s.left_out)})")
    if s.overlong:
        out.append(f"{s.overlong:,} samples longer than seq_len {seq_len}: {OVERLONG_DONE[overlong]}")
    return out


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in Counter(counts).most_common())


def source_report(split: str, source: TokenizedSource, seq_len: int) -> SourceReport:
    metas = [f.meta for f in source.files]
    warnings = Counter()
    for meta in metas:
        warnings.update(meta["warnings_by_kind"])
    return SourceReport(
        split=split,
        path=source.name,
        files=len(source.files),
        lines=sum(m["n_lines"] for m in metas),
        samples=len(source),
        tokens=sum(m["n_tokens"] for m in metas),
        trained_tokens=sum(m["n_trained_tokens"] for m in metas),
        bad_lines=dict(source.fault_counts()),
        left_out={kind: n for kind, n in warnings.items() if kind in LEFT_OUT},
        warnings=sum(warnings.values()),
        overlong=int((source.lengths - 1 > seq_len).sum()),
    )


def data_report(cfg: DataConfig, tokenizer, *, seq_len: int, cache_dir: Path, with_eval: bool) -> DataReport:
    """The report of data.train and (with_eval) data.eval, read from the tokenized cache."""
    splits = {"train": cfg.train, "eval": cfg.eval if with_eval else []}
    reports = [
        source_report(split, source, seq_len)
        for split, configured in splits.items()
        for source in open_sources(configured, tokenizer, cfg.train_on, cache_dir, cfg.num_workers)
    ]
    return DataReport(seq_len=seq_len, overlong=cfg.overlong, sources=reports)
