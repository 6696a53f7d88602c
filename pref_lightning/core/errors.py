"""Mistakes a user makes (a wrong path, a bad key value, a file that is not a checkpoint).

`train.py` / `predict.py` print these as one line, `error: <message>`, and exit with status 2 (see
`cli.py`); anything else is a bug and keeps its traceback. `UserError` is a ValueError and
`MissingFileError` also a FileNotFoundError, so code catching the built-in types keeps working.
"""


class UserError(ValueError):
    """A mistake in the command line, the config or the input files; the message says what and where."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks what it should hold)."""
