"""Rank 0's console during the loop: on a terminal, one tqdm line updated in place (step, epoch, loss, tokens/s,
elapsed and ETA); piped to a file or a notebook, one plain line per logged step, which a log keeps readable.
Other lines of the run (eval, skipped steps) are printed above the bar, never through it."""

from __future__ import annotations

import sys

from tqdm import tqdm

from finetune.training.monitoring import format_train_line


class Console:
    """Rank 0's console during the loop: a tqdm bar on a terminal, else one plain line per logged step.

    Args:
        steps_done: where the bar starts (a resumed run's step).
        data_tokens: the tokens of one pass over the train data, for the epoch shown (tokens trained / it).
    """

    def __init__(self, max_steps: int, steps_done: int, data_tokens: int):
        self.stream = sys.stdout
        self.data_tokens = data_tokens
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=max_steps, initial=steps_done, desc="train", unit="step", file=self.stream)

    def train_step(self, record: dict) -> None:
        """Show a logged train record (monitoring.train_record): the bar moves to its step, or a line is printed."""
        if self.bar is None:
            print(format_train_line(record), file=self.stream, flush=True)
            return
        epoch = f"epoch {record['tokens'] / self.data_tokens:.2f}  " if self.data_tokens else ""
        self.bar.set_postfix_str(
            f"{epoch}loss {record['loss']:.4f}  tok/s {record['tokens_per_s']:,.0f}", refresh=False
        )
        self.bar.update(record["step"] - self.bar.n)

    def print(self, text: str) -> None:
        """Print a line of the run (an eval, a skipped step) above the bar, never through it."""
        if self.bar is None:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        """Close the bar, if there is one."""
        if self.bar is not None:
            self.bar.close()
