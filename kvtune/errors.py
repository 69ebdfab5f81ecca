"""Errors that reach the user as one line and exit code 2, and the one escaper for text quoted from inputs."""

from __future__ import annotations

import unicodedata

# Unicode categories never shown raw: C0/C1 controls and DEL (Cc), format characters such as bidi overrides and
# zero-width marks (Cf), line/paragraph separators (Zl, Zp), lone surrogates from undecodable bytes (Cs).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, limit: int | None = None) -> str:
    """``text`` safe to print on a terminal: control and invisible characters as escapes, one line.

    NUL, ESC (so no terminal escape sequences), the other C0/C1 controls, DEL, bidi overrides and line
    separators become ``\\x1b``/``\\u202e``-style escapes; newlines, carriage returns and tabs become ``\\n``,
    ``\\r``, ``\\t``. With ``limit``, text longer than that is cut and ends with ``...`` (the escapes count).
    """
    s = str(text)
    if s.isascii() and s.isprintable():
        out = s
    else:
        parts = []
        for ch in s:
            if ch in _ESCAPES:
                parts.append(_ESCAPES[ch])
            elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
                code = ord(ch)
                parts.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
            else:
                parts.append(ch)
        out = "".join(parts)
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - 3)] + "..."
    return out


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, a malformed document.

    The CLI prints ``kvtune: error: <message>`` on stderr and exits with code 2, without a traceback.
    The message must say what is wrong and where (file, field, flag); text quoted from an input goes through
    :func:`printable` first.
    """

    exit_code = 2
