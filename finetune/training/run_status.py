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
    """status.json, whole or not at all: `state` is FINISHED, STOPPED or FAILED; `error` the failure's first line."""
    record = {"state": state, "step": step, "error": error, "ended": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(record) + "\n")


class RunRecord:
    """How this launch will be recorded: nothing until the run is accepted (a refused launch leaves the folder as it
    was, its last status included), then the last run's status removed and a failure recorded."""

    def __init__(self, run_dir: Path, is_main: bool):
        self.run_dir, self.is_main, self.is_accepted = Path(run_dir), is_main, False

    def accept(self) -> None:
        """The run is accepted (its config recorded): from here on, how it ends is this run's status."""
        if self.is_main:
            (self.run_dir / STATUS_FILE).unlink(missing_ok=True)
        self.is_accepted = True


@contextlib.contextmanager
def recording_failure(run_dir: Path, is_main: bool) -> Iterator[RunRecord]:
    """Within: an exception after the run was accepted leaves FAILED with its first line (rank 0's; another rank's
    failure stops rank 0 too, which records its own), Ctrl-C STOPPED; before it, nothing is written."""
    record = RunRecord(run_dir, is_main)
    try:
        yield record
    except BaseException as error:
        if is_main and record.is_accepted:
            with contextlib.suppress(OSError):  # a full disk: the error itself is what the user must see
                state = STOPPED if isinstance(error, KeyboardInterrupt) else FAILED
                write_run_status(run_dir, state, None, first_line(error))
        raise
