"""run_dir/status.json: how the run's last process ended, written by rank 0 as it ends (`tailor runs` reads it).

Removed when a run is accepted (a launch refused before that leaves the folder as it was), written (aside, then
renamed) when it finishes, stops on a signal or fails; so a folder whose lock is free and which has no status.json
ended without a word (killed, or its machine lost).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from finetune.atomic_files import atomic_write_text
from finetune.data.errors import first_line

STATUS_FILE = "status.json"
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"


def write_run_status(run_dir: Path, state: str, step: int | None, error: str | None = None) -> None:
    """Write status.json, whole or not at all.

    Args:
        state: FINISHED, STOPPED or FAILED.
        step: the step the run ended at; None when a failure's step is not known.
        error: the failure's first line.
    """
    record = {"state": state, "step": step, "error": error, "ended": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(record) + "\n")


class RunRecord:
    """How this launch will be recorded: nothing until the run is accepted, then how it ends.

    A refused launch leaves the folder as it was, its last status included; an accepted one removes the last run's
    status, and its failure is recorded (recording_failure).
    """

    def __init__(self, run_dir: Path, is_main: bool):
        self.run_dir, self.is_main, self.is_accepted = Path(run_dir), is_main, False

    def accept(self) -> None:
        """The run is accepted (its config recorded): from here on, how it ends is this run's status."""
        if self.is_main:
            (self.run_dir / STATUS_FILE).unlink(missing_ok=True)
        self.is_accepted = True


@contextlib.contextmanager
def recording_failure(run_dir: Path, is_main: bool) -> Iterator[RunRecord]:
    """Record in status.json how the block ends if it raises after the run was accepted; before that, nothing.

    An exception leaves FAILED with its first line (rank 0's; another rank's failure stops rank 0 too, which records
    its own), Ctrl-C STOPPED. The exception goes on up.

    Yields:
        The launch's RunRecord, to `accept()` once the run's settings are on record.
    """
    record = RunRecord(run_dir, is_main)
    try:
        yield record
    except BaseException as error:
        if is_main and record.is_accepted:
            with contextlib.suppress(OSError):  # a full disk: the error itself is what the user must see
                state = STOPPED if isinstance(error, KeyboardInterrupt) else FAILED
                write_run_status(run_dir, state, None, first_line(error))
        raise
