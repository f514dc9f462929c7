"""The training loop's state: the counters it keeps (`Progress`), one rank's resumable state (`TrainState`: the
counters, the data position, the random generators, fp16's loss scale) and the checkpoint a run starts from
(`ResumePoint`). A leaf: it imports nothing of the repository, so every module of the loop can name these without an
import circle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class CountedStep(Protocol):
    """What `Progress.count` reads of a step's outcome (finetune.training.train_step.StepOutcome)."""

    trained_tokens: int
    finite: bool


@dataclass
class Progress:
    """What the training loop counts, saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # all tokens of all ranks so far
    trained_tokens: int = 0
    nonfinite_in_a_row: int = 0  # steps skipped for a non-finite loss or gradient, up to this one
    nonfinite_skipped: int = 0  # all such steps
    elapsed_s: float = 0.0  # training time, across resumes
    loss_scale: float = 0.0  # fp16's dynamic loss scale as saved (0: the run does not scale its loss)
    loss_scale_good_steps: int = 0  # finite steps in a row since the loss scale last changed, as saved

    def count(self, step: int, tokens: int, outcome: CountedStep, elapsed_s: float) -> None:
        """Count a read step: its tokens, its trained tokens, and whether it was skipped as non-finite.

        Args:
            tokens: all tokens of the step, all ranks.
            elapsed_s: training time up to the end of this step, across resumes.
        """
        self.step, self.elapsed_s = step, elapsed_s
        self.tokens += tokens
        self.trained_tokens += outcome.trained_tokens
        self.nonfinite_in_a_row = 0 if outcome.finite else self.nonfinite_in_a_row + 1
        self.nonfinite_skipped += not outcome.finite


@dataclass
class ResumePoint:
    """The checkpoint a run starts from, as its state/progress.json says."""

    folder: Path  # the checkpoint
    step: int
    world_size: int  # of the run that saved it


@dataclass
class TrainState:
    """One rank's resumable state beside the LoRA weights and AdamW's, as a checkpoint's state/ folder holds it."""

    progress: Progress  # the counters, fp16's loss scale among them (state/progress.json, with the world size)
    data: dict  # the data loader's position (state/rank_R.json)
    rng: dict  # the random generators' states, finetune/training/rng.py's (state/rank_R.json)
