"""The two ways data goes wrong: one bad sample (SampleFault) and a run that must stop (DataError)."""

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
