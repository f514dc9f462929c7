"""The two ways data goes wrong: one bad sample (SampleFault) and a run that must stop (DataError); and how
a library's error is quoted in a one-line report."""

from __future__ import annotations


class SampleFault(ValueError):
    """One sample (one line) is unusable. `kind` names the fault for counting; `message` says it in words."""

    def __init__(self, kind: str, message: str, fixable: bool = False):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fixable = fixable  # `tailor validate --fix` can repair it safely


class DataError(ValueError):
    """Training data that cannot be used as configured; the message reads `FILE:LINE: fault`."""


def first_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no message: what a one-line report quotes."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
