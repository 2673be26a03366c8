"""One exception type for every data problem a user can fix (missing files, bad options, corrupt archives).

Callers (CLI, experiments) catch ``DataError`` to print the message without a traceback.
"""

from __future__ import annotations


class DataError(Exception):
    """A dataset could not be found, fetched, parsed or configured; the message says how to fix it."""
