"""User-facing errors.

A `UserError` is bad input the user can fix (a missing file, an unknown config key, a malformed
skill bank). The CLI prints its message on one line and exits with status 2, without a traceback.
Messages say what is wrong and where ("skill bank bank.json: general_skills[3].title: expected a
string, got int").
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input; printed as one line by the CLI."""


class ConfigError(UserError):
    """An invalid or inconsistent configuration."""


class DataError(UserError):
    """A dataset, skill bank or other input file that cannot be used as given."""


# how much of a value a message quotes: a value read from a file or a command line can be any size
QUOTE_LIMIT = 200


def shorten(text: object, limit: int = QUOTE_LIMIT) -> str:
    """`str(text)` cut to `limit` characters, saying how many were left out: every message that quotes a
    value the user gave quotes it through this, so a huge value costs one line, not gigabytes."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
