"""The exit codes of `train.py` and every `tailor` command, and which error gets which (docs/errors.md).

Every error a user can cause prints one `error: ...` line naming the file and line, or the key, and exits with one
of these; a traceback means a bug in tailor. An error class a user can cause says its own code (`exit_code = USAGE`)
where it is defined, so that this module imports none of them: `tailor validate` loads no torch, no training module.
"""

from __future__ import annotations

import errno

OK = 0
DATA_FAULTS = 1  # the data has faults (train.py, validate, tokenize): fix the files named, or data.on_bad_sample: skip
USAGE = 2  # the command, the config, a path, the model folder or a checkpoint is wrong: nothing was trained
RUN_LOCKED = 3  # another process holds the run folder's lock: one run per run_dir
OUT_OF_MEMORY = 4  # the device ran out of memory; the message says what to change first
NOT_FINITE = 5  # the loss or the gradients stayed non-finite; the last good checkpoint is kept
WRITE_FAILED = 6  # a file of the run could not be written (a full disk): the checkpoints saved before are kept
NO_PROCESS_GROUP = 7  # the ranks did not all meet in time (one did not start, or cannot reach the others)
INTERRUPTED = 130  # Ctrl-C where nothing could be saved (a training run saves first and exits 0)


def exit_code_of(error: BaseException) -> int | None:
    """The exit code of an error a user can cause or of the machine's limit; None for any other, a bug.

    The error's class's `exit_code` (DataFaults: DATA_FAULTS, ConfigError: USAGE, ...); a full disk or quota
    (ENOSPC, EDQUOT): WRITE_FAILED; the device out of memory (torch.OutOfMemoryError, told by its name so that
    torch is not imported for it): OUT_OF_MEMORY; Ctrl-C: INTERRUPTED.
    """
    if (code := getattr(type(error), "exit_code", None)) is not None:
        return code
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return WRITE_FAILED
    if any(kind.__module__ == "torch" and kind.__name__ == "OutOfMemoryError" for kind in type(error).__mro__):
        return OUT_OF_MEMORY
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    return None


def command_exit_code(error: BaseException) -> int | None:
    """The exit code of an error ending a `tailor` command: exit_code_of's, else USAGE for a ValueError or OSError.

    Those are the user's mistake there (a bad file, option, config or path). train.py leaves them to a traceback.
    """
    code = exit_code_of(error)
    if code is None and isinstance(error, (ValueError, OSError)):
        return USAGE
    return code
