"""File helpers: atomic writes, safe YAML reads.

Nothing is written in place: output goes to a temporary file in the target's folder and is renamed over the
target only once complete, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kvtune.errors import UserError


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically; refuse to replace an existing file unless ``overwrite``."""
    target = Path(path)
    if target.exists() and target.is_dir():
        raise UserError(f"{target}: is a directory, expected a file path")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists (pass --force to overwrite)")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.exists():
        raise UserError(f"{target}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(f"{target}: cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Fail early (before minutes of work) if ``path`` cannot be written later."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.exists() and target.is_dir():
        raise UserError(f"{target}: is a directory, expected a file path")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists (pass --force to overwrite)")
    if not folder.is_dir():
        raise UserError(f"{target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{target}: folder {folder} is not writable")
    return target


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML document with ``yaml.safe_load``; one-line errors with the file and line."""
    source = Path(path)
    if not source.exists():
        raise UserError(f"{source}: no such file")
    if source.is_dir():
        raise UserError(f"{source}: is a directory, expected a YAML file")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: cannot read ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}:{where}: invalid YAML ({problem})") from None


def dump_yaml(data: Any) -> str:
    """The one YAML style kvtune writes: block style, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
