"""`python -m finetune ...` is `tailor ...`."""

from finetune.cli import command_line

command_line()
