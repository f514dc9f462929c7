"""What the data of a run is, per source, before step 1: files, samples, tokens, and every line or sample that is
not trained as written (bad lines skipped, samples left out, samples longer than seq_len split, truncated or dropped);
and, as warnings, train samples that repeat others and eval samples that train has (finetune/data/duplicates.py).

Nothing is dropped without being counted and shown: train.py prints `DataReport.lines()` before step 1, writes
`DataReport.record()` to metrics.jsonl (`{"kind": "data", ...}`), and repeats `DataReport.summary()` in the final
summary. The counts come from the tokenized cache (whole files, the same on every rank).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from finetune.data.duplicates import COUNTED, EVAL_KINDS, TRAIN_KINDS, Repeat, find_repeats
from finetune.data.errors import LEFT_OUT
from finetune.data.sources import RunData, TokenizedSource

REPORTED_PAIRS = 3  # FILE:LINE pairs shown per kind of repeat; `tailor validate` shows more
OVERLONG_DONE = {"split": "split into pieces of seq_len", "truncate": "truncated to seq_len", "drop": "dropped"}


@dataclass
class SourceReport:
    """One source's counts, as the report shows them."""

    split: str  # "train", "eval" or "retain"
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
    # kind -> samples: train samples that repeat an earlier one, eval samples that train has (duplicates.py's kinds)
    repeats: dict[str, int] = field(default_factory=dict)
    repeat_examples: list[Repeat] = field(default_factory=list)  # the first REPORTED_PAIRS of each kind


@dataclass
class DataReport:
    """What the data of a run is, per source, before step 1."""

    seq_len: int
    overlong: str  # data.overlong
    sources: list[SourceReport]

    @property
    def train_tokens(self) -> int:
        """Tokens of one pass over every train source: one epoch (finetune/planning/epochs.py)."""
        return sum(s.tokens for s in self.sources if s.split == "train")

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
            out += [f"  {line}" for line in _repeats(s)]
        return out

    def summary(self, met: dict[str, int] | None = None) -> list[str]:
        """The counts again, for the end of the run: what of the data was not trained as written.

        Args:
            met: the train loader's counts of what packing did to the overlong samples it drew (TrainLoader.counts,
                this rank's).
        """
        losses = [
            f"{s.split} {s.path}: {line}" for s in self.sources for line in _losses(s, self.seq_len, self.overlong)
        ]
        if met:
            losses.append(f"while training, this rank's packing: {_kinds(met)}")
        return losses or ["data: every line trained as written"]

    @classmethod
    def from_record(cls, record: dict) -> DataReport:
        """The report a metrics.jsonl record holds (`record`'s inverse).

        Raises:
            KeyError, TypeError: the record holds no report.
        """
        sources = []
        for source in record["sources"]:
            examples = [Repeat(**repeat) for repeat in source.get("repeat_examples", [])]
            sources.append(SourceReport(**{**source, "repeat_examples": examples}))
        return cls(seq_len=record["seq_len"], overlong=record["overlong_policy"], sources=sources)

    def record(self, step: int) -> dict:
        """The metrics.jsonl record: totals at the top (trackers plot numbers), each source in full."""
        return {
            "kind": "data",
            "step": step,
            "bad_lines": sum(sum(s.bad_lines.values()) for s in self.sources),
            "left_out": sum(sum(s.left_out.values()) for s in self.sources),
            "overlong": sum(s.overlong for s in self.sources),
            "overlong_policy": self.overlong,
            "repeats": sum(n for s in self.sources for kind, n in s.repeats.items() if kind in TRAIN_KINDS),
            "eval_in_train": sum(n for s in self.sources for kind, n in s.repeats.items() if kind in EVAL_KINDS),
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


def _repeats(s: SourceReport) -> list[str]:
    out = []
    for kind, n in s.repeats.items():
        pairs = ", ".join(f"{r.where} repeats {r.first}" for r in s.repeat_examples if r.kind == kind)
        more = ", ... (`tailor validate` lists them all)" if n > REPORTED_PAIRS else ""
        fix = "; `tailor validate --fix OUT_DIR` writes eval files without them" if kind in EVAL_KINDS else ""
        out.append(f"warning: {n:,} {COUNTED[kind]}: {pairs}{more}{fix}")
    return out


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in Counter(counts).most_common())


def source_report(split: str, source: TokenizedSource, seq_len: int) -> SourceReport:
    """Count one opened source from its cache entries' metadata (`split`: "train", "eval" or "retain")."""
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


def data_report(data: RunData, *, seq_len: int) -> DataReport:
    """The report of the run's opened sources: data.train's, data.eval's and data.retain's."""
    opened = {"train": data.train, "eval": data.eval, "retain": data.retain}
    reports = [source_report(split, source, seq_len) for split, sources in opened.items() for source in sources]
    repeats = find_repeats(opened["train"], opened["eval"], REPORTED_PAIRS)  # train's sources, then eval's
    for report, found in zip(reports[: len(repeats)], repeats, strict=True):
        report.repeats, report.repeat_examples = found.counts, found.examples
    return DataReport(seq_len=seq_len, overlong=data.config.overlong, sources=reports)
