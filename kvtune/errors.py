"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, a malformed document.

    The CLI prints ``kvtune: error: <message>`` on stderr and exits with code 2, without a traceback.
    The message must say what is wrong and where (file, field, flag).
    """

    exit_code = 2
