"""Errors raised for bad user input (the CLI turns them into one-line messages, exit 2)."""


class UsageError(ValueError):
    """A value the user gave is not allowed; the message names it and what is allowed."""
