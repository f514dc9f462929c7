"""How a run stops to be resumed: SIGTERM or Ctrl-C noted, and the command that resumes it."""

from __future__ import annotations

import os
import shlex
import signal


class StopSignal:
    """A noted SIGTERM or SIGINT: the run finishes the step in flight, saves a checkpoint and exits 0.

    SIGTERM is a scheduler's preemption (torchrun forwards it to its workers), SIGINT Ctrl-C. The handler only notes
    the signal; train_step lets the ranks agree on it, so that they all stop after the same step (with several ranks
    the agreement is read a step late, finetune/training/step_reader.py, so the step queued behind finishes too).
    """

    def __init__(self) -> None:
        self.name: str | None = None

    @classmethod
    def install(cls) -> StopSignal:
        """A StopSignal noting this process's SIGTERM and SIGINT from now on."""
        stop = cls()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, stop._note)
        return stop

    @property
    def requested(self) -> bool:
        """Whether a signal to stop came to this process."""
        return self.name is not None

    def _note(self, number: int, frame) -> None:
        self.name = self.name or signal.Signals(number).name


def resume_command(command: list[str]) -> str:
    """How to resume, in words: the command that started this run (`resume: auto`, the default, does the rest).

    Args:
        command: [train.py, CONFIG, ...] or [tailor, train, CONFIG, ...].
    """
    by_tailor = command[:2] == ["tailor", "train"]
    words = " ".join(shlex.quote(a) for a in (command[2:] if by_tailor else command))
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun, whose options this process cannot see
        return (
            f"the same command (tailor train ... {words})"
            if by_tailor
            else f"the same torchrun command (torchrun ... {words})"
        )
    return f"tailor train {words}" if by_tailor else f"python {words}"
