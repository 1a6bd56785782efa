"""Errors raised for bad user input (the CLI turns them into one-line messages, exit 2)."""


class UsageError(ValueError):
    """A value the user gave is not allowed; the message names it and what is allowed."""


class DamagedFileError(ValueError):
    """A file the user's earlier work left (adapter weights, checkpoint) cannot be read; ``path`` names it."""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = path
