"""Any CSV, JSONL or JSON array, with the columns named by ``--columns input=COL,output=COL[,time=COL |
time_ms=COL][,session=COL]``; JSON columns may be dotted paths (``usage.prompt_tokens``)."""

from __future__ import annotations

from typing import Callable, Iterable

from kvtune.errors import UserError, printable
from kvtune.profile.readers.base import Context, Reader, TraceRequest, count, dig, seconds, session_id

KEYS = ("input", "output", "time", "time_ms", "session")


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"input=a,output=b,time=t"`` -> ``{"input": "a", "output": "b", "time": "t"}``; UserError when malformed."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        parts = [f"{k}={v}" for k, v in spec.items()]
    else:
        parts = [p.strip() for p in spec.split(",")]
    out: dict[str, str] = {}
    for part in filter(None, parts):
        key, eq, col = part.partition("=")
        key = key.strip()
        if not eq or not col.strip():
            raise UserError(f"--columns: '{printable(part, 40)}' is not KEY=COLUMN")
        if key not in KEYS:
            raise UserError(f"--columns: unknown key '{printable(key, 40)}' (expected {', '.join(sorted(KEYS))})")
        out[key] = col.strip()
    if "input" not in out or "output" not in out:
        raise UserError("--columns: needs at least input=COLUMN and output=COLUMN")
    if "time" in out and "time_ms" in out:
        raise UserError("--columns: give time= or time_ms=, not both")
    return out


def _csv_columns(header: list[str], columns: dict[str, str] | None) -> dict[str, str]:
    return dict(columns or {})


def _rows(ctx: Context) -> Callable[[int, dict], Iterable[TraceRequest]]:
    columns = ctx.columns or {}
    time_key = "time_ms" if "time_ms" in columns else "time" if "time" in columns else None
    scale = 1e-3 if time_key == "time_ms" else 1.0

    def parse(line: int, obj: dict) -> Iterable[TraceRequest]:
        inp = count(dig(obj, columns["input"]))
        out = count(dig(obj, columns["output"]))
        ts = None
        if time_key:
            try:
                raw = dig(obj, columns[time_key])
            except KeyError:
                raw = None
            ts = seconds(raw, scale) if raw is not None else None
        session = None
        if "session" in columns:
            try:
                session = session_id(dig(obj, columns["session"]))
            except KeyError:
                session = None
        return (TraceRequest(ts, inp, out, session),)

    return parse


READER = Reader(
    name="generic",
    summary="any CSV/JSONL/JSON array with ``--columns input=COL,output=COL[,time=COL|time_ms=COL][,session=COL]`` "
            "(JSON columns may be dotted paths: ``usage.prompt_tokens``)",
    csv_columns=_csv_columns,
    json_rows=_rows,
)
