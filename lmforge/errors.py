"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a missing file, a bad config key, ...). The CLI
prints its message as one line and exits with status 2; any other exception is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A user's mistake: the message names the thing (file, key, value) and what is expected."""
