"""What every trace reader shares: the request record, the reader contract, safe opening and bounded parsing.

A reader turns one file into a stream of *events*: a :class:`TraceRequest` for each valid request, a
:class:`Malformed` (line, reason) for each row it cannot use. Nothing here aggregates; ``read_trace`` (the
workload profile) and ``iter_requests`` (trace replay) both consume the same event stream, so a row is valid or
malformed for the same reason everywhere.

Limits (each a malformed row, or for the file as a whole a :class:`~kvtune.errors.UserError`, never a crash):

* the file must be a regular file (a FIFO, a device or a directory is refused before it is opened);
* a ``.gz`` file that is truncated or corrupt is an error for the whole file (its rows cannot be trusted);
* text is UTF-8 (a UTF-8 BOM is skipped) or UTF-16/UTF-32 announced by a BOM; UTF-16 without a BOM is
  recognised when the first two characters are ASCII; undecodable bytes become U+FFFD;
* a JSONL line (or a JSON array element) may be up to :data:`MAX_LINE_CHARS` (64 Mi characters: a 10 MB
  record fits), a CSV line up to :data:`MAX_CSV_LINE_CHARS` (1 Mi) with fields up to 128 KiB (Python's csv
  default); JSON may nest up to :data:`MAX_JSON_DEPTH` levels; ``NaN``/``Infinity`` are not JSON numbers;
* a token count is a whole number in ``[0, MAX_TOKENS_PER_REQUEST]`` (2^24 = 16,777,216 tokens: beyond the
  context of any model), written with at most :data:`MAX_NUMBER_CHARS` characters;
* a timestamp is finite and plausible: seconds since the Unix epoch between 2000-01-01 and 2100-01-01, or an
  offset from the trace start between 0 and 10 years (:data:`MAX_RELATIVE_S`); the file's first timestamp
  decides which, and a later row of the other kind is malformed (:class:`TimeKind`: one stray offset in an epoch
  trace would make its span decades long).

Every reason quotes input through :func:`kvtune.errors.printable` (control characters escaped, cut at 40).
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import gzip
import io
import json
import math
import os
import stat
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from kvtune.errors import UserError, printable

MAX_TOKENS_PER_REQUEST = 1 << 24
MAX_NUMBER_CHARS = 32  # "12", "1700000000.123456", "2.5e3": a number written longer than this is not a count
MAX_LINE_CHARS = 64 << 20
MAX_CSV_LINE_CHARS = 1 << 20
MAX_JSON_DEPTH = 64
EPOCH_MIN_S = 946_684_800.0  # 2000-01-01T00:00:00Z
EPOCH_MAX_S = 4_102_444_800.0  # 2100-01-01T00:00:00Z
MAX_RELATIVE_S = 10 * 365.25 * 86_400  # ten years after the trace's start
QUOTE_CHARS = 40

_EPOCH = _dt.datetime(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace, as a replay needs it.

    ``timestamp_s``: arrival in seconds (epoch or offset from the trace start, as the trace has it), ``None``
    when the format has no time. ``session``: conversation/session id where the format has one. ``blocks``:
    chained prefix-block ids (a block's id stands for the whole prefix up to it): Mooncake's ``hash_ids``
    (``block_tokens`` 512), or for text formats ids hashed from the prompt's tokens (``block_tokens`` 16);
    ``None`` when the trace carries no prefix information.
    """

    timestamp_s: float | None
    input_tokens: int
    output_tokens: int
    session: str | None = None
    blocks: tuple[int, ...] | None = None
    block_tokens: int | None = None


class Malformed(NamedTuple):
    """A row the reader skipped: its 1-based line (element index for a JSON array) and why."""

    line: int
    reason: str


Event = TraceRequest | Malformed


class RowError(ValueError):
    """Raised by a row parser for a malformed row; the message is the reason, already safe to print."""


@dataclass(frozen=True)
class Reader:
    """One trace format.

    ``csv_columns(header, columns)`` (CSV formats) maps the header to ``{"input", "output"[, "time" |
    "time_ms"][, "session"]}`` column names; ``json_rows(ctx)`` (JSON formats) builds a function turning one
    decoded record (a dict) into zero or more :class:`TraceRequest`, raising :class:`RowError` (or
    ``KeyError`` for a missing field) for a malformed record. ``detect_header`` / ``detect_record`` say
    whether a file's CSV header (lower-cased names) or first JSON record is in this format.
    """

    name: str
    summary: str
    csv_columns: Callable[[list[str], dict[str, str] | None], dict[str, str]] | None = None
    json_rows: Callable[["Context"], Callable[[int, dict], Iterable[TraceRequest]]] | None = None
    detect_header: Callable[[list[str]], bool] | None = None
    detect_record: Callable[[dict], bool] | None = None
    text: bool = False  # lengths come from text (needs a tokenizer for exact counts)


@dataclass
class Context:
    """What a JSON row parser may need besides the record: ``--columns`` and the text units (tokenizer)."""

    columns: dict[str, str] | None
    units: Any = None  # kvtune.profile.readers.text.Units for text formats


# ----------------------------------------------------------------------------------------------- quoting


def quote(value: Any) -> str:
    """A value from the input, safe and short enough for a message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 70:
        return f"a {int(value.bit_length() * 0.30103) + 1}-digit integer"
    if isinstance(value, str):
        return "'" + printable(value, QUOTE_CHARS) + "'"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return printable(repr(value), QUOTE_CHARS)


# ----------------------------------------------------------------------------------------------- values


def count(value: Any) -> int:
    """A token count: a whole number in [0, MAX_TOKENS_PER_REQUEST] (``12``, ``"12"``, ``12.0``)."""
    if isinstance(value, bool):
        raise RowError(f"{quote(value)} is not a token count")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise RowError(f"{quote(value)} is not a whole number")
        n = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if len(s) > MAX_NUMBER_CHARS:
            raise RowError(f"{quote(value)} is not a token count (over {MAX_NUMBER_CHARS} characters)")
        try:
            n = int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                raise RowError(f"{quote(value)} is not a token count") from None
            if not math.isfinite(f) or not f.is_integer():
                raise RowError(f"{quote(value)} is not a whole number") from None
            n = int(f)
    else:
        raise RowError(f"{quote(value)} is not a token count")
    if n < 0:
        raise RowError(f"{quote(n)} is negative")
    if n > MAX_TOKENS_PER_REQUEST:
        raise RowError(f"{quote(n)} tokens is above the ceiling of {MAX_TOKENS_PER_REQUEST:,} tokens per request")
    return n


def seconds(value: Any, scale: float = 1.0) -> float:
    """A timestamp in seconds: a number (times ``scale``) or an ISO-8601 date-time (naive = UTC), checked to be
    finite and plausible (epoch seconds in [2000, 2100) or an offset in [0, 10 years])."""
    if isinstance(value, bool) or isinstance(value, (dict, list)) or value is None:
        raise RowError(f"{quote(value)} is not a timestamp")
    try:
        if isinstance(value, int):
            if value.bit_length() > 70:
                raise RowError(f"timestamp is {quote(value)}: out of range")
            ts = float(value) * scale
        elif isinstance(value, float):
            ts = value * scale
        else:
            s = str(value).strip()
            if len(s) > 64:
                raise RowError(f"{quote(value)} is not a timestamp (over 64 characters)")
            try:
                ts = float(s) * scale
            except ValueError:
                ts = _iso_seconds(s, value)
    except OverflowError:
        raise RowError(f"timestamp {quote(value)} is out of range") from None
    if not math.isfinite(ts):
        raise RowError(f"timestamp {quote(value)} is not finite")
    if not (0.0 <= ts <= MAX_RELATIVE_S or EPOCH_MIN_S <= ts < EPOCH_MAX_S):
        raise RowError(f"timestamp {quote(value)} is implausible ({ts:.6g} s: neither an epoch time in 2000-2099 "
                       "nor an offset of 0 to 10 years" + ("; milliseconds? use time_ms=" if ts > EPOCH_MAX_S
                                                           and scale == 1.0 else "") + ")")
    return ts


class TimeKind:
    """Per file: the first timestamp says whether the trace counts epoch seconds or offsets from its start; a later
    timestamp of the other kind raises :class:`RowError`."""

    __slots__ = ("epoch",)

    def __init__(self) -> None:
        self.epoch: bool | None = None

    def check(self, ts: float | None) -> None:
        if ts is None:
            return
        epoch = ts >= EPOCH_MIN_S
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            raise RowError(f"timestamp {ts:.6g} s is {'an epoch time' if epoch else 'an offset from the trace start'}"
                           f", but the file's first timestamp is {'an epoch time' if self.epoch else 'an offset'}")


def _iso_seconds(s: str, raw: Any) -> float:
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        head, dot, frac = s.partition(".")  # Python 3.10 takes only 3 or 6 fraction digits
        digits = "".join(ch for ch in frac if ch.isdigit())
        if not dot or not digits:
            raise RowError(f"{quote(raw)} is not a timestamp") from None
        try:
            t = _dt.datetime.fromisoformat(f"{head}.{digits[:6].ljust(6, '0')}{frac[len(digits):]}")
        except ValueError:
            raise RowError(f"{quote(raw)} is not a timestamp") from None
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return (t - _EPOCH).total_seconds()


def session_id(value: Any) -> str | None:
    """A session id as text (``None`` or ``""``: no session); objects and arrays as canonical JSON."""
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    s = str(value).strip()
    return s or None


def dig(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``path="a.b"``; KeyError(path) when any step is missing."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


# ----------------------------------------------------------------------------------------------- files


def check_regular(path: Path) -> None:
    """UserError unless ``path`` is an existing regular file (checked with stat, before anything opens it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{printable(path)}: no such trace file") from None
    except OSError as exc:
        raise UserError(f"{printable(path)}: cannot read ({printable(exc.strerror or exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{printable(path)}: is a directory, expected a trace file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise UserError(f"{printable(path)}: is {kind}, not a regular file (trace files are read twice: "
                        "save the stream to a file first)")


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def sniff_encoding(head: bytes) -> str:
    """The text encoding of a file from its first bytes: a BOM, or UTF-16 by its zero bytes, else UTF-8."""
    for bom, enc in _BOMS:
        if head.startswith(bom):
            return enc
    if len(head) >= 4:
        if head[0] and not head[1] and head[2] and not head[3]:
            return "utf-16-le"
        if not head[0] and head[1] and not head[2] and head[3]:
            return "utf-16-be"
    return "utf-8"


@contextmanager
def guarded(path: Path) -> Iterator[None]:
    """Turn read failures of ``path`` into one-line UserErrors (a truncated gzip is not an interrupt)."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"{printable(path)}: truncated or corrupt gzip ({printable(exc, 80)})") from None
    except OSError as exc:
        raise UserError(f"{printable(path)}: cannot read ({printable(exc.strerror or exc, 80)})") from None


def open_text(path: Path) -> io.TextIOWrapper:
    """The file as text (``.gz`` decompressed), encoding sniffed from its first bytes, newlines untranslated."""
    binary: Any = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115
    try:
        head = binary.peek(4)[:4]
        return io.TextIOWrapper(binary, encoding=sniff_encoding(head), errors="replace", newline="")
    except BaseException:
        binary.close()
        raise


def base_suffix(path: Path) -> str:
    return Path(path.stem).suffix.lower() if path.suffix.lower() == ".gz" else path.suffix.lower()


def bounded_lines(fh: io.TextIOBase, limit: int) -> Iterator[tuple[int, str | None]]:
    """``(line number, text)`` for each line; text is ``None`` for a line longer than ``limit`` characters (its
    rest is read and dropped, so memory stays at ``limit``)."""
    n = 0
    readline = fh.readline
    while True:
        line = readline(limit)
        if not line:
            return
        n += 1
        if len(line) < limit or line[-1] in "\n\r":
            yield n, line
            continue
        more = readline(limit)
        if not more:  # exactly ``limit`` characters, then end of file: a complete line
            yield n, line
            return
        while more and more[-1] not in "\n\r":
            more = readline(limit)
        yield n, None


# ----------------------------------------------------------------------------------------------- JSON


def _no_constant(name: str) -> Any:
    raise RowError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant, strict=False)  # strict=False: raw tabs etc. in strings


def _too_deep(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        children = o.values() if isinstance(o, dict) else o
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _check_depth(obj: Any, text: str) -> None:
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and isinstance(obj, (dict, list)) \
            and _too_deep(obj, MAX_JSON_DEPTH):
        raise RowError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")


def json_value(text: str) -> Any:
    """One JSON document, bounded: RowError for invalid JSON, NaN/Infinity, huge integers, deep nesting."""
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"invalid JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise RowError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except RowError:
        raise
    except ValueError:  # an integer literal beyond Python's int/str digit limit (4300 digits)
        raise RowError(f"invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)") from None
    _check_depth(obj, text)
    return obj


def json_lines(fh: io.TextIOBase) -> Iterator[tuple[int, Any] | Malformed]:
    """``(line, value)`` per non-blank JSONL line, or a :class:`Malformed` for a line that is not JSON."""
    for line_no, line in bounded_lines(fh, MAX_LINE_CHARS):
        if line is None:
            yield Malformed(line_no, f"line longer than {MAX_LINE_CHARS >> 20} Mi characters")
            continue
        if not line.strip():
            continue
        try:
            yield line_no, json_value(line)
        except RowError as exc:
            yield Malformed(line_no, str(exc))


def json_array(fh: io.TextIOBase, where: str, chunk: int = 1 << 20) -> Iterator[tuple[int, Any] | Malformed]:
    """Elements of a top-level JSON array, decoded one at a time (memory: one element plus one chunk, at most
    :data:`MAX_LINE_CHARS`). An element that cannot be decoded ends the array (its end cannot be found)."""
    buf = fh.read(chunk)
    pos = len(buf) - len(buf.lstrip())
    if pos >= len(buf) or buf[pos] != "[":
        raise UserError(f"{where}: expected a JSON array")
    pos += 1
    eof = False
    index = 0
    while True:
        while True:  # skip whitespace and the separating comma
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof:
                break
            buf, pos = fh.read(chunk), 0
            eof = not buf
        if pos >= len(buf) or buf[pos] == "]":
            return
        try:
            obj, end = _DECODER.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if not eof and len(buf) - pos <= MAX_LINE_CHARS:
                more = fh.read(max(chunk, len(buf) - pos))  # grow geometrically: a big element costs O(n log n)
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
                eof = True
                continue
            index += 1
            reason = (f"element longer than {MAX_LINE_CHARS >> 20} Mi characters" if not eof
                      else f"invalid JSON ({exc.msg})")
            yield Malformed(index, f"element {index}: {reason}; the rest of the array is unreadable")
            return
        except (RecursionError, RowError, ValueError) as exc:
            index += 1
            reason = (f"JSON nested deeper than {MAX_JSON_DEPTH} levels" if isinstance(exc, RecursionError)
                      else str(exc) if isinstance(exc, RowError)
                      else f"invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)")
            yield Malformed(index, f"element {index}: {reason}; the rest of the array is unreadable")
            return
        after = end  # a value is complete only when a ',' or ']' follows: "12" or "0." of a cut "123" decodes too
        while after < len(buf) and buf[after] in " \t\r\n":
            after += 1
        cut = after == len(buf) or (after == end and buf[after] not in ",]")  # may continue past the buffer
        if cut and not eof and len(buf) - pos <= MAX_LINE_CHARS:
            more = fh.read(max(chunk, len(buf) - pos))
            if more:
                buf, pos = buf[pos:] + more, 0
            else:
                eof = True
            continue
        if after < len(buf) and buf[after] not in ",]":
            index += 1
            yield Malformed(index, f"element {index}: invalid JSON ({quote(buf[after])} after a value); the rest of "
                                   "the array is unreadable")
            return
        index += 1
        try:
            _check_depth(obj, buf[pos:end])
        except RowError as exc:
            yield Malformed(index, str(exc))
        else:
            yield index, obj
        buf, pos = buf[end:], 0
        if len(buf) < 4096 and not eof:
            more = fh.read(chunk)
            eof = not more
            buf += more


# ----------------------------------------------------------------------------------------------- CSV


def csv_table(fh: io.TextIOBase, where: str, delimiter: str) -> tuple[list[str], Iterator[tuple[int, list[str]] | Malformed]]:
    """The stripped header and an iterator of ``(line, fields)`` or :class:`Malformed` rows (overlong lines,
    fields over the csv limit, unreadable quoting). Blank rows are skipped."""
    overlong: list[int] = []

    def lines() -> Iterator[str]:
        for line_no, line in bounded_lines(fh, MAX_CSV_LINE_CHARS):
            if line is None:
                overlong.append(line_no)
                yield "\n"  # keeps the reader's line count; reported below
            else:
                yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return [], iter(())
    except csv.Error as exc:
        raise UserError(f"{where}:1: unreadable CSV header ({printable(exc, 80)})") from None
    if overlong:
        raise UserError(f"{where}:1: header line longer than {MAX_CSV_LINE_CHARS >> 20} Mi characters")

    def rows() -> Iterator[tuple[int, list[str]] | Malformed]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Malformed(reader.line_num, f"unreadable CSV row ({printable(exc, 80)})")
                continue
            if overlong:
                yield Malformed(overlong.pop(), f"line longer than {MAX_CSV_LINE_CHARS >> 20} Mi characters")
                continue
            if row:
                yield reader.line_num, row

    return [h.strip() for h in header], rows()


def column_index(header: list[str], name: str, where: str) -> int:
    lowered = [h.lower() for h in header]
    if name.lower() not in lowered:
        shown = ", ".join(printable(h, QUOTE_CHARS) for h in header[:12])
        raise UserError(f"{where}:1: no column '{printable(name)}' (columns: {shown})")
    return lowered.index(name.lower())


def csv_requests(header: list[str], rows: Iterator[tuple[int, list[str]] | Malformed], cols: dict[str, str],
                 where: str) -> Iterator[Event]:
    """Events of a CSV trace whose columns ``cols`` names (``input``, ``output``, optional ``time``/``time_ms``
    and ``session``)."""
    i_in = column_index(header, cols["input"], where)
    i_out = column_index(header, cols["output"], where)
    time_key = "time_ms" if "time_ms" in cols else "time" if "time" in cols else None
    i_t = column_index(header, cols[time_key], where) if time_key else None
    scale = 1e-3 if time_key == "time_ms" else 1.0
    i_s = column_index(header, cols["session"], where) if "session" in cols else None
    width = len(header)
    kind = TimeKind()
    for item in rows:
        if isinstance(item, Malformed):
            yield item
            continue
        line, row = item
        if len(row) != width:
            yield Malformed(line, f"expected {width} fields, got {len(row)}")
            continue
        try:
            inp = count(row[i_in])
            out = count(row[i_out])
            ts = seconds(row[i_t], scale) if i_t is not None and row[i_t].strip() else None
            kind.check(ts)
        except RowError as exc:
            yield Malformed(line, str(exc))
            continue
        yield TraceRequest(ts, inp, out, session_id(row[i_s]) if i_s is not None else None)
