"""The one base of every error a user can cause and fix (a setting, a file, a directory, the disk): the command
line catches it once and prints `error: <message>`, exit status 1. Any other exception is a bug and keeps its
traceback."""


class MgrpoError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class DataError(MgrpoError, ValueError):
    """The dataset or a prompt cannot be used; the message says what is wrong and how to fix it."""


class TrainingError(MgrpoError, RuntimeError):
    """Training cannot go on as configured; the message says why and what to change."""
