"""How data goes wrong: one bad sample (SampleFault), one usable but doubtful sample (SampleWarning), and a run
that must stop (DataError; DataFaults when the data itself has faults); and how a library's error is quoted in a
one-line report."""

from __future__ import annotations

from typing import NamedTuple

from finetune import exit_codes


class SampleFault(ValueError):
    """One sample (one line) is unusable.

    Args:
        kind: names the fault, for counting.
        message: says it in words.
        fixable: `tailor validate --fix` can repair it safely.
    """

    def __init__(self, kind: str, message: str, fixable: bool = False):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fixable = fixable  # `tailor validate --fix` can repair it safely

    def kept(self) -> SampleFault:
        """Return this fault without its traceback and the exception it was raised from, to keep as a line's result.

        Their frames would hold the whole batch of lines in a reference cycle that only the cyclic garbage collector
        frees (and a build pauses the collector).
        """
        self.__traceback__ = self.__context__ = self.__cause__ = None
        return self


class SampleWarning(NamedTuple):
    """A line that is used, but perhaps not as its author meant (a duplicate key, two assistant turns in a row).

    Shown with FILE:LINE by `tailor validate` and counted, never an error. `nothing_to_train` also leaves the sample
    out of training (LEFT_OUT).
    """

    kind: str
    message: str


NOTHING_TO_TRAIN = SampleWarning(
    "nothing_to_train",
    "no assistant message is trained (all weights are 0, or train_on: last and the last one has weight 0): "
    "left out of training",
)
LEFT_OUT = frozenset({NOTHING_TO_TRAIN.kind})  # warnings whose sample is not trained


class DataError(ValueError):
    """Training data that cannot be used as configured; the message reads `FILE:LINE: fault`."""

    exit_code = exit_codes.USAGE


class DataFaults(DataError):
    """The data has faults: a bad line while `data.on_bad_sample` is `error`, or a source with too few usable samples.

    What `tailor validate` reports with exit code 1, and training refuses with the same code.
    """

    exit_code = exit_codes.DATA_FAULTS


class TooManyBadLines(DataFaults):
    """A source whose share of bad lines is above data.max_bad_fraction."""


def first_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no message: what a one-line report quotes."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
