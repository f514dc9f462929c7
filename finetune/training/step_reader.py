"""What the loop does with each step's outcome: count it, log it, report a skipped step, stop on divergence.

The host reads a step's outcome one step late. train.py queues step s+1 on the device before this reads step s,
so while the host waits for step s the device already has the next step's work, and it never idles for the host.
Log lines come one step late too. A step that evaluates or saves a checkpoint, and the last one, are read at once
(the progress saved must be theirs), and so is the step queued when a stop was found to be asked for: the run
saves after it and stops.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from finetune.checkpoints.folders import newest_with_training_state
from finetune.config import TrainConfig
from finetune.training.console import Console
from finetune.training.monitoring import MetricsLogger, peak_memory_gib, train_record
from finetune.training.train_state import Progress
from finetune.training.train_step import QueuedStep, raise_if_diverged


class StepReader:
    """Read the queued steps' outcomes into `progress`, a step late, and log them.

    It raises NonFiniteError after too many non-finite steps in a row, and tells the loop when some rank was asked to
    stop (`stop_requested`).

    Args:
        logger: the run's metrics log; None on the ranks other than 0.
        console: where the step lines go (rank 0).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        progress: Progress,
        logger: MetricsLogger | None,
        device: torch.device,
        console: Console | None = None,
    ):
        self.cfg, self.progress, self.logger, self.device, self.console = cfg, progress, logger, device, console
        self.started = time.perf_counter() - progress.elapsed_s  # training time, across resumes
        self.unread: list[tuple[int, float, QueuedStep]] = []  # steps queued on the device, oldest first
        self.stop_requested = False
        self.last_loss: float | None = None

    def add(self, step: int, lr: float, queued: QueuedStep, read_now: bool = False) -> None:
        """Take the step just queued; read the one before it, and this one too if `read_now` or it is the last.

        Raises:
            NonFiniteError: a step read was the optim.max_consecutive_nonfinite-th non-finite one in a row.
        """
        self.unread.append((step, lr, queued))
        keep = 0 if read_now or step == self.cfg.max_steps else 1
        while len(self.unread) > keep:
            self._read(*self.unread.pop(0))
        if self.stop_requested and self.unread:
            self._read(*self.unread.pop(0))

    def _read(self, step: int, lr: float, queued: QueuedStep) -> None:
        progress, outcome = self.progress, queued.outcome()
        progress.count(step, queued.tokens, outcome, elapsed_s=time.perf_counter() - self.started)
        if step % self.cfg.logging.freq == 0 or step in (1, self.cfg.max_steps) or not outcome.finite:
            record = train_record(step, self.cfg.max_steps, lr, outcome, progress, peak_memory_gib(self.device))
            self.last_loss = record["loss"]
            if self.logger:
                self.logger.log(record)
            if self.console:
                self.console.train_step(record)
        if not outcome.finite:
            limit = self.cfg.optim.max_consecutive_nonfinite
            if self.console:
                self.console.print(
                    f"step {step}: the loss or the gradients are not finite, so the step is skipped "
                    f"({progress.nonfinite_in_a_row} in a row; {limit} stop the run)"
                )
            raise_if_diverged(
                step, progress.nonfinite_in_a_row, limit, lr, newest_with_training_state(Path(self.cfg.run_dir))
            )
        self.stop_requested |= outcome.stop_requested
