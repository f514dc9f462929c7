"""The loop reads each step's outcome one step late, except where it needs it now, and stops as the steps say."""

import pytest
import torch

from finetune.config import TrainConfig
from finetune.resume import Progress
from finetune.step_log import StepLog
from finetune.train_step import HostCopy, NonFiniteError, StepSums


class Outcome(HostCopy):
    """A step's outcome that notes when it is read."""

    def __init__(self, step: int, nonfinite: bool, stop: bool, trained: int, reads: list[int]):
        super().__init__(torch.tensor([float(nonfinite), float(stop), float(trained)], dtype=torch.float64))
        self.step, self.reads = step, reads

    def read(self) -> list:
        if self.step not in self.reads:
            self.reads.append(self.step)
        return super().read()


def step_sums(step: int, reads: list[int], nonfinite=False, stop=False) -> StepSums:
    loss = torch.tensor(float("nan") if nonfinite else 2.0)
    return StepSums(loss_sum=loss * 10, weight_sum=torch.tensor(10.0), tokens=100, grad_norm=torch.tensor(1.0),
                    outcome=Outcome(step, nonfinite, stop, trained=10 * step, reads=reads))


def step_log(**optim) -> StepLog:
    cfg = TrainConfig(max_steps=20)
    cfg.logging.freq = 5
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    return StepLog(cfg, Progress(), logger=None, device=torch.device("cpu"))


def test_a_step_is_read_once_the_next_is_queued_unless_it_logs_or_is_needed_now():
    reads, log = [], step_log()
    log.add(1, 1e-4, step_sums(1, reads))  # step 1 logs: read at once
    assert reads == [1] and log.progress.step == 1
    log.add(2, 1e-4, step_sums(2, reads))
    assert reads == [1] and log.progress.step == 1  # step 2 is left to run on the device
    log.add(3, 1e-4, step_sums(3, reads))
    assert reads == [1, 2] and log.progress.step == 2
    log.add(4, 1e-4, step_sums(4, reads), read_now=True)  # say, a checkpoint step
    assert reads == [1, 2, 3, 4] and log.progress.step == 4
    log.add(5, 1e-4, step_sums(5, reads))  # logging.freq is 5
    assert reads == [1, 2, 3, 4, 5]
    assert log.progress.tokens == 500 and log.progress.trained_tokens == 10 + 20 + 30 + 40 + 50
    assert log.last_loss == pytest.approx(2.0)


def test_a_stop_found_one_step_late_reads_the_queued_step_too_so_the_run_saves_after_it():
    reads, log = [], step_log()
    for step in (1, 2):
        log.add(step, 1e-4, step_sums(step, reads, stop=step == 2))
    assert not log.stop_requested  # step 2's outcome is still on its way
    log.add(3, 1e-4, step_sums(3, reads))
    assert log.stop_requested and reads == [1, 2, 3] and log.progress.step == 3


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_the_run():
    reads, log = [], step_log(max_consecutive_nonfinite=2)
    log.add(1, 1e-4, step_sums(1, reads))
    log.add(2, 1e-4, step_sums(2, reads, nonfinite=True))
    log.add(3, 1e-4, step_sums(3, reads))
    assert log.progress.nonfinite_in_a_row == 1 and log.progress.nonfinite_skipped == 1
    log.add(4, 1e-4, step_sums(4, reads, nonfinite=True))  # step 3 was fine: the count in a row starts again
    assert log.progress.nonfinite_in_a_row == 0
    log.add(5, 1e-4, step_sums(5, reads))  # reads 4 and 5 (a log step)
    assert log.progress.nonfinite_skipped == 2 and log.progress.nonfinite_in_a_row == 0
    log.add(6, 1e-4, step_sums(6, reads, nonfinite=True))
    with pytest.raises(NonFiniteError, match=r"step 7: .* in 2 steps in a row \(steps 6 to 7"):
        log.add(7, 1e-4, step_sums(7, reads, nonfinite=True), read_now=True)
