"""Request-trace readers, one module per format, and the one path every consumer reads a trace through.

:data:`READERS` is the registry (the order is the detection order); :func:`file_events` detects a file's
format (from its header or first record) and streams its events: a
:class:`~kvtune.profile.readers.base.TraceRequest` per valid request, a
:class:`~kvtune.profile.readers.base.Malformed` per skipped row. ``kvtune.profile.workload`` builds both the
workload profile (``read_trace``) and the replay iterator (``iter_requests``) on it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable, Iterator

from kvtune.errors import UserError, printable
from kvtune.profile.readers import azure, burstgpt, generic, mooncake, openai, sharegpt, vllm
from kvtune.profile.readers.base import (
    MAX_CSV_LINE_CHARS,
    MAX_LINE_CHARS,
    Context,
    Event,
    Malformed,
    Reader,
    RowError,
    TimeKind,
    TraceRequest,
    base_suffix,
    bounded_lines,
    check_regular,
    csv_requests,
    csv_table,
    guarded,
    json_array,
    json_lines,
    json_value,
    open_text,
    quote,
)
from kvtune.profile.readers.generic import parse_columns
from kvtune.profile.readers.text import Units, load_tokenizer

READERS: dict[str, Reader] = {m.READER.name: m.READER for m in (azure, mooncake, burstgpt, sharegpt, vllm, openai,
                                                                 generic)}
FORMATS: tuple[str, ...] = tuple(READERS)
DETECT_JSONL_LINES = 50  # JSONL: the first record that parses among this many lines decides the format

__all__ = ["FORMATS", "READERS", "Malformed", "TraceRequest", "Units", "check_regular", "detect", "file_events",
           "load_tokenizer", "parse_columns"]


def _first_line(path: Path) -> tuple[int, str | None]:
    with open_text(path) as fh:
        for line_no, line in bounded_lines(fh, MAX_LINE_CHARS):
            if line is None or line.strip():
                return line_no, line
    return 0, ""


def _first_json_record(path: Path, container: str) -> tuple[Any, str]:
    """The first decodable record (JSONL: among the first :data:`DETECT_JSONL_LINES` lines), or ``None`` and why."""
    with open_text(path) as fh:
        if container == "json":
            for item in json_array(fh, printable(path)):
                return (None, item.reason) if isinstance(item, Malformed) else (item[1], "")
            return None, "an empty array"
        seen, first_reason = 0, ""
        for line_no, line in bounded_lines(fh, MAX_LINE_CHARS):
            if line is None or not line.strip():
                continue
            seen += 1
            try:
                return json_value(line), ""
            except RowError as exc:
                first_reason = first_reason or f"line {line_no}: {exc}"
                if seen >= DETECT_JSONL_LINES:
                    break
    return None, first_reason


def detect(path: Path, columns: dict[str, str] | None) -> tuple[str, str]:
    """``(format, container)``; container is ``csv``, ``tsv``, ``jsonl``, ``json`` (an array) or ``empty``."""
    where = printable(path)
    with guarded(path):
        line_no, first = _first_line(path)
        if first is None:
            raise UserError(f"{where}:{line_no}: line longer than {MAX_LINE_CHARS >> 20} Mi characters; "
                            "cannot tell the trace format")
        stripped = first.lstrip()
        if not stripped:
            return "empty", "empty"
        if stripped[0] in "[{":
            container = "json" if stripped[0] == "[" else "jsonl"
            if columns:
                return "generic", container
            record, why = _first_json_record(path, container)
            for name, reader in READERS.items():
                if reader.detect_record is not None and isinstance(record, dict) and reader.detect_record(record):
                    return name, container
            keys = (", ".join(printable(k, 40) for k in list(record)[:8]) if isinstance(record, dict)
                    else why or f"a JSON {type(record).__name__}, not an object")
            raise UserError(f"{where}: cannot tell the trace format from its first record ({keys}); "
                            "pass --trace-format or --columns input=KEY,output=KEY")
        container = "tsv" if base_suffix(path) == ".tsv" else "csv"
        if len(first) > MAX_CSV_LINE_CHARS:
            raise UserError(f"{where}:{line_no}: header line longer than {MAX_CSV_LINE_CHARS >> 20} Mi characters")
        try:
            header = next(csv.reader(io.StringIO(first), delimiter="\t" if container == "tsv" else ","), [])
        except csv.Error as exc:
            raise UserError(f"{where}:{line_no}: unreadable CSV header ({printable(exc, 80)})") from None
        header = [h.strip().lower() for h in header]
        if columns:
            return "generic", container
        for name, reader in READERS.items():
            if reader.detect_header is not None and reader.detect_header(header):
                return name, container
        shown = ", ".join(printable(h, 40) for h in header[:8])
        raise UserError(f"{where}: cannot tell the trace format from its header ({shown}); "
                        "pass --trace-format or --columns input=COL,output=COL")


def _csv_events(path: Path, reader: Reader, columns: dict[str, str] | None, delimiter: str) -> Iterator[Event]:
    where = printable(path)
    with guarded(path), open_text(path) as fh:
        header, rows = csv_table(fh, where, delimiter)
        if header:
            yield from csv_requests(header, rows, reader.csv_columns(header, columns), where)


def _json_events(path: Path, reader: Reader, ctx: Context, container: str) -> Iterator[Event]:
    parse = reader.json_rows(ctx)
    kind = TimeKind()
    with guarded(path), open_text(path) as fh:
        records = json_array(fh, printable(path)) if container == "json" else json_lines(fh)
        for item in records:
            if isinstance(item, Malformed):
                yield item
                continue
            line, obj = item
            if not isinstance(obj, dict):
                yield Malformed(line, f"expected a JSON object, got {type(obj).__name__}")
                continue
            try:
                requests = parse(line, obj)
                for r in requests:
                    kind.check(r.timestamp_s)
            except KeyError as exc:
                yield Malformed(line, f"missing field {quote(exc.args[0] if exc.args else '')}")
                continue
            except RowError as exc:
                yield Malformed(line, str(exc))
                continue
            yield from requests


def file_events(path: Path, fmt: str, columns: dict[str, str] | None,
                units: Callable[[], Units]) -> tuple[str, Iterator[Event]]:
    """``(format used, events)`` for one trace file; ``fmt`` is ``auto`` or a name in :data:`FORMATS`.

    Raises :class:`UserError` for what makes the whole file unusable (not a regular file, unknown layout, a
    format that does not match the container, a truncated gzip: the latter while iterating). ``units`` is
    called only for text formats.
    """
    check_regular(path)
    detected, container = detect(path, columns)
    if detected == "empty":
        return (fmt if fmt != "auto" else "empty"), iter(())
    if fmt == "auto":
        fmt = detected
    elif fmt == "generic" and not columns:
        raise UserError(f"{printable(path)}: --trace-format generic needs --columns input=COL,output=COL")
    reader = READERS[fmt]
    if container in ("csv", "tsv"):
        if reader.csv_columns is None:
            raise UserError(f"{printable(path)}: format {fmt} is a JSON format, but this file is {container.upper()}")
        return fmt, _csv_events(path, reader, columns, "\t" if container == "tsv" else ",")
    if reader.json_rows is None:
        raise UserError(f"{printable(path)}: format {fmt} is a CSV format, but this file is {container.upper()}")
    return fmt, _json_events(path, reader, Context(columns, units() if reader.text else None), container)
