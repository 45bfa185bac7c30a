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
