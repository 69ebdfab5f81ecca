"""Request traces -> a workload profile: how long requests are, how fast they come, how much they share.

Readers stream the file once, row by row, into constant-memory state (:class:`~kvtune.profile.sketch.LengthSketch`
per length; a capped set of seen prefix blocks; a capped table of sessions), so a trace of any length profiles
in bounded memory. Formats, auto-detected from the file's extension, header or first record:

=========  ===================================================================================================
azure      Azure LLM inference trace CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``
mooncake   Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` (512-token blocks)
burstgpt   BurstGPT CSV: ``Request tokens``, ``Response tokens``, ``Timestamp`` (s), optional ``Session ID``
sharegpt   ShareGPT JSON (array or JSONL) of ``{"conversations": [{"from": "human"|"gpt", "value": ...}]}``
vllm       vLLM custom-dataset JSONL: ``{"prompt": text, "output_tokens": n}``
openai     OpenAI chat-completions logs (JSONL): ``usage.prompt_tokens``/``completion_tokens`` at the top level,
           under ``response`` or under ``response.body`` (Batch API output), ``created`` (s) as arrival time
generic    any CSV/JSONL/JSON array with ``--columns input=COL,output=COL[,time=COL|time_ms=COL][,session=COL]``
           (JSON columns may be dotted paths: ``usage.prompt_tokens``)
=========  ===================================================================================================

A malformed row (wrong field count, a count that is not a non-negative integer, invalid JSON) is counted and
its line number kept (the first :data:`MAX_EXAMPLES`); ``strict=True`` raises :class:`UserError` on the first.
Files ending in ``.gz`` are read through gzip.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from kvtune.errors import UserError
from kvtune.profile.schema import LengthStats, MalformedRow, TraceSource, WorkloadProfile
from kvtune.profile.sketch import RELATIVE_ERROR, LengthSketch

FORMATS = ("azure", "mooncake", "burstgpt", "sharegpt", "vllm", "openai", "generic")
MAX_EXAMPLES = 5
MAX_TRACKED_BLOCKS = 2_000_000  # prefix blocks remembered (~150 MB at the cap); beyond it reuse is a lower bound
MAX_TRACKED_SESSIONS = 1_000_000
MOONCAKE_BLOCK_TOKENS = 512
TEXT_BLOCK_TOKENS = 16  # prefix-cache block for text prompts (vLLM's default block size)
CHARS_PER_TOKEN_ESTIMATE = 4
DEFAULT_WORKLOAD = "mooncake-conversation-sample.jsonl"

_EPOCH = _dt.datetime(1970, 1, 1)


# ----------------------------------------------------------------------------------------------- state


class _PrefixTracker:
    """Remembers prefix-block ids; a request's reusable prefix is its leading run of already-seen blocks.

    Block ids are chained (a block's id depends on every block before it), as in Mooncake's ``hash_ids`` and
    in vLLM's prefix cache, so a seen id means the whole prefix up to it was seen. The memory is an unbounded
    cache until :data:`MAX_TRACKED_BLOCKS`, after which new blocks are no longer remembered.
    """

    def __init__(self, cap: int = MAX_TRACKED_BLOCKS) -> None:
        self.seen: set[int] = set()
        self.cap = cap
        self.full = False

    def observe(self, blocks: list[int]) -> int:
        hit = 0
        seen = self.seen
        for b in blocks:
            if b in seen:
                hit += 1
            else:
                break
        if not self.full:
            seen.update(blocks)
            if len(seen) >= self.cap:
                self.full = True
        return hit


@dataclass
class _Acc:
    """Everything a streaming read accumulates; O(1) memory in the number of rows (caps noted above)."""

    strict: bool
    inputs: LengthSketch = field(default_factory=LengthSketch)
    outputs: LengthSketch = field(default_factory=LengthSketch)
    totals: LengthSketch = field(default_factory=LengthSketch)
    turns: LengthSketch = field(default_factory=LengthSketch)
    session_turns: dict[Any, int] = field(default_factory=dict)
    sessions_overflow: bool = False
    prefix: _PrefixTracker = field(default_factory=_PrefixTracker)
    reused_tokens: int = 0
    reuse_input_tokens: int = 0  # input tokens of the requests that carry prefix information
    reuse_method: str | None = None
    t_min: float | None = None
    t_max: float | None = None
    t_prev: float | None = None
    gap_n: int = 0
    gap_mean: float = 0.0
    gap_m2: float = 0.0
    out_of_order: int = 0
    malformed: int = 0
    examples: list[MalformedRow] = field(default_factory=list)
    token_counts: str = "trace"
    notes: list[str] = field(default_factory=list)
    # per file
    file: str = ""
    file_rows: int = 0
    file_bad: int = 0
    file_t_min: float | None = None
    file_t_max: float | None = None

    def add(self, inp: int, out: int, ts: float | None = None, session: Any = None) -> None:
        self.inputs.add(inp)
        self.outputs.add(out)
        self.totals.add(inp + out)
        self.file_rows += 1
        if ts is not None:
            self._arrival(ts)
        if session is not None:
            turns = self.session_turns.get(session)
            if turns is not None:
                self.session_turns[session] = turns + 1
            elif len(self.session_turns) < MAX_TRACKED_SESSIONS:
                self.session_turns[session] = 1
            else:
                self.sessions_overflow = True

    def _arrival(self, ts: float) -> None:
        if self.file_t_min is None or ts < self.file_t_min:
            self.file_t_min = ts
        if self.file_t_max is None or ts > self.file_t_max:
            self.file_t_max = ts
        prev = self.t_prev
        if prev is not None:
            gap = ts - prev
            if gap < 0:
                self.out_of_order += 1
            else:  # Welford's running mean / variance of inter-arrival gaps
                self.gap_n += 1
                d = gap - self.gap_mean
                self.gap_mean += d / self.gap_n
                self.gap_m2 += d * (gap - self.gap_mean)
        self.t_prev = ts

    def reuse(self, inp: int, blocks: list[int], block_tokens: int) -> None:
        hit = self.prefix.observe(blocks)
        self.reused_tokens += min(inp, hit * block_tokens)
        self.reuse_input_tokens += inp

    def bad(self, line: int, reason: str) -> None:
        if self.strict:
            raise UserError(f"{self.file}:{line}: {reason}")
        self.malformed += 1
        self.file_bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(MalformedRow(file=self.file, line=line, reason=reason))


# ----------------------------------------------------------------------------------------------- helpers


def _count(value: Any) -> int:
    """A token count: a non-negative integer (``"12"``, ``12``, ``12.0``); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a token count")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        n = int(value)
    elif isinstance(value, str):
        s = value.strip()
        try:
            n = int(s)
        except ValueError:
            f = float(s)  # "12.0" is fine, "abc" raises
            if not f.is_integer():
                raise ValueError(f"{value!r} is not a whole number") from None
            n = int(f)
    else:
        raise ValueError(f"{value!r} is not a token count")
    if n < 0:
        raise ValueError(f"{n} is negative")
    return n


def _seconds(value: Any, scale: float = 1.0) -> float:
    """A timestamp in seconds: a number (times ``scale``) or an ISO-8601 date-time (naive = UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a timestamp")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a timestamp")
        return float(value) * scale
    s = str(value).strip()
    try:
        return float(s) * scale
    except ValueError:
        pass
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        head, dot, frac = s.partition(".")  # Python 3.10 takes only 3 or 6 fraction digits
        digits = "".join(ch for ch in frac if ch.isdigit())
        if not dot or not digits:
            raise ValueError(f"{value!r} is not a timestamp") from None
        t = _dt.datetime.fromisoformat(f"{head}.{digits[:6].ljust(6, '0')}{frac[len(digits):]}")
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return (t - _EPOCH).total_seconds()


def _dig(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``path="a.b"``; KeyError when any step is missing."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"input=a,output=b,time=t"`` -> ``{"input": "a", "output": "b", "time": "t"}``."""
    if spec is None or isinstance(spec, dict):
        return spec
    allowed = {"input", "output", "time", "time_ms", "session"}
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, col = part.partition("=")
        key = key.strip()
        if not eq or not col.strip():
            raise UserError(f"--columns: '{part}' is not KEY=COLUMN")
        if key not in allowed:
            raise UserError(f"--columns: unknown key '{key}' (expected {', '.join(sorted(allowed))})")
        out[key] = col.strip()
    if "input" not in out or "output" not in out:
        raise UserError("--columns: needs at least input=COLUMN and output=COLUMN")
    return out


# ----------------------------------------------------------------------------------------------- tokenizer


class _Units:
    """Turns text into countable units: tokenizer ids, or UTF-8 bytes (4 per token) when there is none."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.per_token = 1 if tokenizer is not None else CHARS_PER_TOKEN_ESTIMATE

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        if hasattr(self.tokenizer, "encode"):
            try:
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            except TypeError:
                return list(self.tokenizer.encode(text))
        return list(self.tokenizer(text))

    def tokens(self, units: int) -> int:
        return units if self.per_token == 1 else math.ceil(units / self.per_token)

    def blocks(self, ids: list[int]) -> list[int]:
        """Chained ids of the full prefix blocks of ``ids`` (a block = 16 tokens' worth of units)."""
        size = TEXT_BLOCK_TOKENS * self.per_token
        out, h = [], 0
        for start in range(0, len(ids) - size + 1, size):
            h = hash((h, tuple(ids[start:start + size])))
            out.append(h)
        return out


def load_tokenizer(name_or_path: str) -> Any:
    """A Hugging Face tokenizer from a local folder (or the local HF cache); UserError when none is there."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise UserError("tokenizing needs transformers: pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for a missing tokenizer
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"tokenizer '{name_or_path}': cannot load it locally ({first})") from None


# ----------------------------------------------------------------------------------------------- readers


def _csv_rows(fh, acc: _Acc, delimiter: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    reader = csv.reader(fh, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return [], iter(())
    except csv.Error as exc:
        raise UserError(f"{acc.file}:1: unreadable CSV header ({exc})") from None

    def rows():
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                acc.bad(reader.line_num, f"unreadable CSV row ({exc})")
                continue
            if row:
                yield reader.line_num, row

    return [h.strip() for h in header], rows()


def _col_index(header: list[str], name: str, acc: _Acc) -> int:
    lowered = [h.lower() for h in header]
    if name.lower() not in lowered:
        raise UserError(f"{acc.file}:1: no column '{name}' (columns: {', '.join(header)})")
    return lowered.index(name.lower())


def _read_csv(fh, acc: _Acc, fmt: str, columns: dict[str, str] | None, delimiter: str) -> None:
    header, rows = _csv_rows(fh, acc, delimiter)
    if not header:
        return
    if fmt == "azure":
        cols = {"input": "ContextTokens", "output": "GeneratedTokens", "time": "TIMESTAMP"}
    elif fmt == "burstgpt":
        cols = {"input": "Request tokens", "output": "Response tokens", "time": "Timestamp"}
        if "session id" in (h.lower() for h in header):
            cols["session"] = "Session ID"
    else:
        cols = dict(columns or {})
    i_in = _col_index(header, cols["input"], acc)
    i_out = _col_index(header, cols["output"], acc)
    time_key = "time_ms" if "time_ms" in cols else "time"
    i_t = _col_index(header, cols[time_key], acc) if time_key in cols and (
        fmt == "generic" or cols[time_key].lower() in (h.lower() for h in header)) else None
    scale = 1e-3 if time_key == "time_ms" else 1.0
    i_s = _col_index(header, cols["session"], acc) if "session" in cols else None
    width = len(header)
    add, bad = acc.add, acc.bad
    for line, row in rows:
        if len(row) != width:
            bad(line, f"expected {width} fields, got {len(row)}")
            continue
        try:
            inp = _count(row[i_in])
            out = _count(row[i_out])
            ts = _seconds(row[i_t], scale) if i_t is not None and row[i_t].strip() else None
        except ValueError as exc:
            bad(line, str(exc))
            continue
        session = row[i_s].strip() or None if i_s is not None else None
        add(inp, out, ts, session)


def _json_lines(fh, acc: _Acc) -> Iterator[tuple[int, Any]]:
    for line_no, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            acc.bad(line_no, f"invalid JSON ({exc.msg}, column {exc.colno})")


def _json_array(fh, acc: _Acc, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, decoded one at a time (memory: one element plus one chunk)."""
    decoder = json.JSONDecoder()
    buf = fh.read(chunk)
    pos = len(buf) - len(buf.lstrip())
    if pos >= len(buf) or buf[pos] != "[":
        raise UserError(f"{acc.file}: expected a JSON array")
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
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if not eof:
                more = fh.read(chunk)
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
                eof = True
                continue
            index += 1
            acc.bad(index, f"element {index}: invalid JSON ({exc.msg}); the rest of the array is unreadable")
            return
        index += 1
        yield index, obj
        buf, pos = buf[end:], 0
        if len(buf) < 4096 and not eof:
            more = fh.read(chunk)
            eof = not more
            buf += more


def _mooncake(line: int, obj: dict, acc: _Acc) -> None:
    inp = _count(obj["input_length"])
    out = _count(obj["output_length"])
    ts = _seconds(obj["timestamp"], 1e-3) if obj.get("timestamp") is not None else None
    hashes = obj.get("hash_ids")
    if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, int) for h in hashes)):
        raise ValueError("hash_ids is not a list of integers")
    acc.add(inp, out, ts, obj.get("session_id"))
    if hashes is not None:
        acc.reuse(inp, hashes, MOONCAKE_BLOCK_TOKENS)


_USAGE_PATHS = ("usage", "response.usage", "response.body.usage")


def _openai_usage(obj: dict) -> dict | None:
    for path in _USAGE_PATHS:
        try:
            u = _dig(obj, path)
        except KeyError:
            continue
        if isinstance(u, dict):
            return u
    return None


def _openai(line: int, obj: dict, acc: _Acc) -> None:
    usage = _openai_usage(obj)
    if usage is None:
        raise KeyError("usage")
    inp = _count(usage["prompt_tokens"])
    out = _count(usage["completion_tokens"])
    created = None
    for path in ("created", "response.body.created", "response.created"):
        try:
            created = _dig(obj, path)
            break
        except KeyError:
            pass
    ts = _seconds(created) if created is not None else None
    acc.add(inp, out, ts)


def _generic_json(columns: dict[str, str]) -> Callable[[int, dict, _Acc], None]:
    time_key = "time_ms" if "time_ms" in columns else "time" if "time" in columns else None
    scale = 1e-3 if time_key == "time_ms" else 1.0

    def handle(line: int, obj: dict, acc: _Acc) -> None:
        inp = _count(_dig(obj, columns["input"]))
        out = _count(_dig(obj, columns["output"]))
        ts = None
        if time_key:
            try:
                raw = _dig(obj, columns[time_key])
                ts = _seconds(raw, scale) if raw is not None else None
            except KeyError:
                ts = None
        session = None
        if "session" in columns:
            try:
                session = _dig(obj, columns["session"])
            except KeyError:
                session = None
            if isinstance(session, (list, dict)):
                session = json.dumps(session, sort_keys=True)
        acc.add(inp, out, ts, session)

    return handle


_ASSISTANT = {"gpt", "chatgpt", "assistant", "bard", "bing", "model"}


def _sharegpt(units: _Units) -> Callable[[int, dict, _Acc], None]:
    def handle(line: int, obj: dict, acc: _Acc) -> None:
        conv = obj.get("conversations", obj.get("conversation"))
        if not isinstance(conv, list):
            raise KeyError("conversations")
        context: list[int] = []  # units of everything said so far (the next prompt's prefix)
        pending = False  # a user turn is waiting for its answer
        turns = 0
        for msg in conv:
            if not isinstance(msg, dict):
                raise ValueError("a conversation message is not an object")
            role = str(msg.get("from", msg.get("role", ""))).lower()
            text = msg.get("value", msg.get("content"))
            if not isinstance(text, str):
                raise ValueError(f"message without text (role '{role}')")
            ids = units.ids(text)
            if role in _ASSISTANT:
                if pending:
                    inp = units.tokens(len(context))
                    acc.add(inp, units.tokens(len(ids)))
                    acc.reuse(inp, units.blocks(context), TEXT_BLOCK_TOKENS)
                    turns += 1
                    pending = False
            elif role != "system":  # a user turn (or an unknown role) opens a request
                pending = True
            context.extend(ids)
        if turns:
            acc.turns.add(turns)

    return handle


def _vllm(units: _Units) -> Callable[[int, dict, _Acc], None]:
    def handle(line: int, obj: dict, acc: _Acc) -> None:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("prompt is not a string")
        if "output_tokens" not in obj:
            raise KeyError("output_tokens")
        out = _count(obj["output_tokens"])
        ids = units.ids(prompt)
        inp = units.tokens(len(ids))
        acc.add(inp, out)
        acc.reuse(inp, units.blocks(ids), TEXT_BLOCK_TOKENS)

    return handle


def _detect_json_record(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "input_length" in obj and "output_length" in obj:
        return "mooncake"
    if "conversations" in obj or "conversation" in obj:
        return "sharegpt"
    if _openai_usage(obj) is not None:
        return "openai"
    if "prompt" in obj and "output_tokens" in obj:
        return "vllm"
    return None


def _detect(path: Path, columns: dict[str, str] | None) -> tuple[str, str]:
    """``(format, container)`` where container is ``csv``, ``tsv``, ``jsonl`` or ``json``."""
    with _open_text(path) as fh:
        head = fh.read(256 * 1024)
    stripped = head.lstrip()
    if not stripped:
        return "empty", "empty"
    if stripped[0] == "[":
        container = "json"
        try:
            first = next(_json_array(io.StringIO(head), _Acc(strict=False, file=str(path)), chunk=len(head) + 1))[1]
        except (StopIteration, UserError):
            first = None
    elif stripped[0] == "{":
        container = "jsonl"
        first = None
        for line in head.splitlines()[:50]:
            try:
                first = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    else:
        container = "tsv" if _base_suffix(path) == ".tsv" else "csv"
        header = [h.strip().lower() for h in next(csv.reader(io.StringIO(stripped.splitlines()[0]),
                                                             delimiter="\t" if container == "tsv" else ","))]
        if columns:
            return "generic", container
        if "contexttokens" in header and "generatedtokens" in header:
            return "azure", container
        if "request tokens" in header and "response tokens" in header:
            return "burstgpt", container
        raise UserError(f"{path}: cannot tell the trace format from its header ({', '.join(header[:8])}); "
                        "pass --trace-format or --columns input=COL,output=COL")
    if columns:
        return "generic", container
    found = _detect_json_record(first)
    if found is None:
        keys = ", ".join(list(first)[:8]) if isinstance(first, dict) else "no JSON object found"
        raise UserError(f"{path}: cannot tell the trace format from its first record ({keys}); "
                        "pass --trace-format or --columns input=KEY,output=KEY")
    return found, container


def _read_one(path: Path, acc: _Acc, fmt: str, columns: dict[str, str] | None, units_factory) -> str:
    detected, container = _detect(path, columns)
    if detected == "empty":
        return fmt if fmt != "auto" else "empty"
    if fmt == "auto":
        fmt = detected
    elif fmt == "generic" and not columns:
        raise UserError(f"{path}: --format generic needs --columns input=COL,output=COL")
    if fmt in ("azure", "burstgpt", "generic") and container in ("csv", "tsv"):
        with _open_text(path) as fh:
            _read_csv(fh, acc, fmt, columns, "\t" if container == "tsv" else ",")
        return fmt
    if fmt in ("azure", "burstgpt"):
        raise UserError(f"{path}: format {fmt} is a CSV format, but this file is {container.upper()}")
    if fmt in ("sharegpt", "vllm"):
        units = units_factory()
        acc.token_counts = "tokenizer" if units.tokenizer is not None else "estimated"
        handle = _sharegpt(units) if fmt == "sharegpt" else _vllm(units)
    elif fmt == "mooncake":
        handle = _mooncake
    elif fmt == "openai":
        handle = _openai
    elif fmt == "generic":
        handle = _generic_json(columns or {})
    else:  # pragma: no cover - fmt is validated by read_trace
        raise UserError(f"unknown trace format '{fmt}'")
    if container in ("csv", "tsv"):
        raise UserError(f"{path}: format {fmt} is a JSON format, but this file is {container.upper()}")
    with _open_text(path) as fh:
        records = _json_array(fh, acc) if container == "json" else _json_lines(fh, acc)
        for line, obj in records:
            if not isinstance(obj, dict):
                acc.bad(line, f"expected a JSON object, got {type(obj).__name__}")
                continue
            try:
                handle(line, obj, acc)
            except KeyError as exc:
                acc.bad(line, f"missing field {exc.args[0]!r}")
            except ValueError as exc:
                acc.bad(line, str(exc))
    return fmt


def read_trace(
    path: str | os.PathLike[str] | list[str | os.PathLike[str]],
    *,
    fmt: str = "auto",
    columns: str | dict[str, str] | None = None,
    strict: bool = False,
    tokenizer: Any = None,
    name: str | None = None,
) -> WorkloadProfile:
    """Stream one trace (or several, pooled into one distribution) into a :class:`WorkloadProfile`.

    ``tokenizer``: an object with ``encode(text)``, a callable, or a local tokenizer folder/name; used only by
    text formats (ShareGPT, vLLM custom). Without one, text lengths are estimated at 4 UTF-8 bytes per token and
    the profile says so (``token_counts: estimated``).
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths:
        raise UserError("no trace given")
    if fmt not in ("auto", *FORMATS):
        raise UserError(f"unknown trace format '{fmt}' (expected auto, {', '.join(FORMATS)})")
    cols = parse_columns(columns)
    loaded: dict[str, _Units] = {}

    def units_factory() -> _Units:
        if "u" not in loaded:
            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
            loaded["u"] = _Units(tok)
        return loaded["u"]

    acc = _Acc(strict=strict)
    sources: list[TraceSource] = []
    formats: list[str] = []
    span_total = 0.0
    timed_requests = 0
    for p in paths:
        if not p.exists():
            raise UserError(f"{p}: no such trace file")
        if p.is_dir():
            raise UserError(f"{p}: is a directory, expected a trace file")
        acc.file, acc.file_rows, acc.file_bad = str(p), 0, 0
        acc.file_t_min = acc.file_t_max = None
        acc.t_prev = None
        before = acc.reused_tokens, acc.reuse_input_tokens
        try:
            used = _read_one(p, acc, fmt, cols, units_factory)
        except OSError as exc:
            raise UserError(f"{p}: cannot read ({exc.strerror or exc})") from None
        if used == "empty" or acc.file_rows == 0:
            if acc.file_bad:
                first = next((e for e in acc.examples if e.file == str(p)), None)
                where = f" (first at line {first.line}: {first.reason})" if first else ""
                raise UserError(f"{p}: no valid requests; {acc.file_bad} malformed rows{where}")
            raise UserError(f"{p}: no requests (empty trace)")
        if used == "mooncake" and acc.reuse_input_tokens > before[1]:
            acc.reuse_method = "mooncake hash_ids (512-token blocks, leading run of blocks seen before)"
        elif used in ("sharegpt", "vllm") and acc.reuse_input_tokens > before[1]:
            acc.reuse_method = (f"shared prompt prefixes ({TEXT_BLOCK_TOKENS}-token blocks, leading run of blocks "
                                "seen before, multi-turn history included)")
        span = None
        if acc.file_t_min is not None and acc.file_t_max is not None:
            span = acc.file_t_max - acc.file_t_min
            if span > 0:
                span_total += span
                timed_requests += acc.file_rows
        formats.append(used)
        sources.append(TraceSource(path=str(p), format=used, requests=acc.file_rows, malformed_rows=acc.file_bad,
                                   span_s=round(span, 6) if span is not None else None))

    notes = list(acc.notes)
    # sessions: explicit ids (row-based) and whole conversations (ShareGPT) both land in acc.turns
    for n in acc.session_turns.values():
        acc.turns.add(n)
    if acc.sessions_overflow:
        notes.append(f"more than {MAX_TRACKED_SESSIONS:,} sessions: turns counted for the first ones only")
    if acc.prefix.full:
        notes.append(f"more than {MAX_TRACKED_BLOCKS:,} distinct prefix blocks: later blocks were not remembered, "
                     "so prefix_reuse_ratio is a lower bound")
    if acc.token_counts == "estimated":
        notes.append(f"no tokenizer: text lengths estimated at {CHARS_PER_TOKEN_ESTIMATE} UTF-8 bytes per token "
                     "(pass --tokenizer or a --model folder with a tokenizer for exact counts)")
    cv = None
    if acc.gap_n >= 2 and acc.gap_mean > 0:
        cv = round(math.sqrt(acc.gap_m2 / (acc.gap_n - 1)) / acc.gap_mean, 4)
    if acc.out_of_order:
        notes.append(f"{acc.out_of_order} requests arrive earlier than the row before them (trace not time-ordered); "
                     "inter-arrival figures use the ordered gaps only")
    rate = round((timed_requests - 1) / span_total, 6) if span_total > 0 and timed_requests > 1 else None
    if len(paths) > 1 and rate is not None:
        notes.append("several traces: arrival rate = their requests over their summed time spans (back to back)")
    reuse = round(acc.reused_tokens / acc.reuse_input_tokens, 6) if acc.reuse_input_tokens else None
    uniq = sorted(set(formats))
    return WorkloadProfile(
        name=name or (paths[0].name if len(paths) == 1 else f"{paths[0].name} +{len(paths) - 1}"),
        source=", ".join(str(p) for p in paths),
        format=uniq[0] if len(uniq) == 1 else "mixed",
        requests=acc.inputs.count,
        input_tokens=acc.inputs.stats(),
        output_tokens=acc.outputs.stats(),
        total_tokens=acc.totals.stats(),
        time_span_s=round(span_total, 6) if span_total > 0 else None,
        arrival_rate_per_s=rate,
        interarrival_cv=cv,
        sessions=acc.turns.count or None,
        turns_per_session=acc.turns.stats() if acc.turns.count else None,
        prefix_reuse_ratio=reuse,
        prefix_reuse_method=acc.reuse_method if reuse is not None else None,
        token_counts=acc.token_counts,  # type: ignore[arg-type]
        percentile_relative_error=RELATIVE_ERROR,
        malformed_rows=acc.malformed,
        malformed_examples=acc.examples,
        traces=sources,
        notes=notes,
    )


def bundled_workloads() -> list[str]:
    """Names of the sample traces shipped in ``kvtune.profiles/workloads``."""
    folder = resources.files("kvtune.profiles").joinpath("workloads")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".jsonl", ".csv", ".json")))


def default_workload() -> WorkloadProfile:
    """The bundled sample workload (a slice of the Mooncake FAST'25 conversation trace, Apache-2.0)."""
    ref = resources.files("kvtune.profiles").joinpath("workloads", DEFAULT_WORKLOAD)
    with resources.as_file(ref) as path:
        prof = read_trace(path, name=f"bundled:{DEFAULT_WORKLOAD}")
    prof.source = f"kvtune.profiles/workloads/{DEFAULT_WORKLOAD}"
    prof.traces = [t.model_copy(update={"path": prof.source}) for t in prof.traces]
    return prof


def stats_dict(s: LengthStats) -> dict[str, float]:
    return {"mean": s.mean, "p50": s.p50, "p90": s.p90, "p99": s.p99, "max": s.max}
