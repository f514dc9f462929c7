"""The loop reads each step's outcome one step late, except where it needs it now, and stops as the steps say."""

import pytest
import torch

from finetune.config import TrainConfig
from finetune.training.step_reader import StepReader
from finetune.training.train_state import Progress
from finetune.training.train_step import HostCopy, NonFiniteError, QueuedStep


class Outcome(HostCopy):
    """A step's outcome that notes when it is read."""

    def __init__(self, step: int, nonfinite: bool, stop: bool, reads: list[int]):
        values = [float(nonfinite), float(stop), 10.0 * step, float("nan") if nonfinite else 2.0, 1.0]
        super().__init__(torch.tensor(values, dtype=torch.float64))
        self.step, self.reads = step, reads

    def read(self) -> list:
        assert self.step not in self.reads, f"step {self.step} read twice"
        self.reads.append(self.step)
        return super().read()


def queued_step(step: int, reads: list[int], nonfinite=False, stop=False) -> QueuedStep:
    return QueuedStep(tokens=100, pending=Outcome(step, nonfinite, stop, reads))


def step_reader(**optim) -> StepReader:
    cfg = TrainConfig(max_steps=20)
    cfg.logging.freq = 5
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    return StepReader(cfg, Progress(), logger=None, device=torch.device("cpu"))


def test_a_step_is_read_once_the_next_is_queued_unless_it_is_needed_now():
    reads, log = [], step_reader()
    log.add(1, 1e-4, queued_step(1, reads))
    assert reads == [] and log.progress.step == 0  # step 1 is left to run on the device, though it logs
    log.add(2, 1e-4, queued_step(2, reads))
    assert reads == [1] and log.progress.step == 1 and log.last_loss == pytest.approx(2.0)
    log.add(3, 1e-4, queued_step(3, reads))
    assert reads == [1, 2] and log.progress.step == 2
    log.add(4, 1e-4, queued_step(4, reads), read_now=True)  # say, a checkpoint step
    assert reads == [1, 2, 3, 4] and log.progress.step == 4
    for step in range(5, 21):
        log.add(step, 1e-4, queued_step(step, reads))
    assert reads == list(range(1, 21))  # max_steps is 20: the last step is read at once
    assert log.progress.tokens == 2000 and log.progress.trained_tokens == 10 * sum(range(1, 21))


def test_a_stop_found_one_step_late_reads_the_queued_step_too_so_the_run_saves_after_it():
    reads, log = [], step_reader()
    for step in (1, 2):
        log.add(step, 1e-4, queued_step(step, reads, stop=step == 2))
    assert not log.stop_requested  # step 2's outcome is still on its way
    log.add(3, 1e-4, queued_step(3, reads))
    assert log.stop_requested and reads == [1, 2, 3] and log.progress.step == 3


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_the_run():
    reads, log = [], step_reader(max_consecutive_nonfinite=2)
    log.add(1, 1e-4, queued_step(1, reads))
    log.add(2, 1e-4, queued_step(2, reads, nonfinite=True))
    log.add(3, 1e-4, queued_step(3, reads))
    assert log.progress.nonfinite_in_a_row == 1 and log.progress.nonfinite_skipped == 1
    log.add(4, 1e-4, queued_step(4, reads, nonfinite=True))  # step 3 was fine: the count in a row starts again
    assert log.progress.nonfinite_in_a_row == 0
    log.add(5, 1e-4, queued_step(5, reads))
    assert log.progress.nonfinite_skipped == 2 and log.progress.nonfinite_in_a_row == 1
    log.add(6, 1e-4, queued_step(6, reads, nonfinite=True))
    assert log.progress.nonfinite_in_a_row == 0
    with pytest.raises(NonFiniteError, match=r"step 7: .* in 2 steps in a row \(steps 6 to 7"):
        log.add(7, 1e-4, queued_step(7, reads, nonfinite=True), read_now=True)
