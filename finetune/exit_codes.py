"""The exit codes of `train.py` and every `tailor` command, in one table (docs/errors.md).

Every error a user can cause prints one `error: ...` line naming the file and line, or the key, and exits with one
of these; a traceback means a bug in tailor.
"""

OK = 0
DATA_FAULTS = 1  # the data has faults (train.py, validate, tokenize): fix the files named, or data.on_bad_sample: skip
USAGE = 2  # the command, the config, a path, the model folder or a checkpoint is wrong: nothing was trained
RUN_LOCKED = 3  # another process holds the run folder's lock: one run per run_dir
OUT_OF_MEMORY = 4  # the device ran out of memory; the message says what to change first
NOT_FINITE = 5  # the loss or the gradients stayed non-finite; the last good checkpoint is kept
WRITE_FAILED = 6  # a file of the run could not be written (a full disk): the checkpoints saved before are kept
NO_PROCESS_GROUP = 7  # the ranks did not all meet in time (one did not start, or cannot reach the others)
INTERRUPTED = 130  # Ctrl-C where nothing could be saved (a training run saves first and exits 0)
