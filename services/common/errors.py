"""The one error type a user can cause: its message says what was wrong and what to do."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person (file, argument, refused command): exit 1, one line."""
