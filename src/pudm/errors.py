"""pudm's own user-facing error, defined at the bottom of the package so every module can raise it.

A :class:`UsageError` says what the user must fix (a missing folder, beta outside [0, 1), a
checkpoint of another configuration); the command line prints its message as one line and exits
with code 2. Every other exception is a defect and keeps its traceback. It derives from
``ValueError`` so that library callers who catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""
