"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a missing file, a bad config key, ...). The CLI
prints its message as one line and exits with status 2; any other exception is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A user's mistake: the message names the thing (file, key, value) and what is expected.

    The message is always one line: a newline in it (a value the user typed, quoted back) reads ``\\n``.
    """

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class StorageError(Exception):
    """Writing failed for a reason outside lmforge (a full disk, a quota, a file-size limit, an I/O
    error): the message names the path, the operation and the free space. The CLI prints it as one
    line and exits with status 1; what was written before (the previous checkpoint) is intact."""


class TrainingHalted(Exception):
    """Training stopped because a step's loss or gradients were not finite (NaN or Inf), before that
    step reached the optimizer: the last checkpoint holds the last good weights. The CLI prints the
    message as one line and exits with status 3."""


class TrainingInterrupted(Exception):
    """Training stopped at a signal (Ctrl-C, SIGTERM) after saving a checkpoint of the step it reached;
    the message says how to resume. The CLI prints it as one line and exits with status 130."""
