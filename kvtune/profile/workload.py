"""Request traces -> a workload profile (how long requests are, how fast they come, how much they share), and
the same traces as a stream of requests for replay.

Both read a file through one path, :func:`kvtune.profile.readers.file_events` (one module per format under
``kvtune/profile/readers/``), so a row is valid or malformed for the same reasons everywhere:

* :func:`read_trace` streams one or several files into a :class:`WorkloadProfile`: exact length distributions
  (:class:`~kvtune.profile.counts.LengthCounts`, memory bounded by distinct values), arrival rate and
  burstiness, sessions and turns, prefix reuse from chained block ids (a capped set of seen blocks, a capped
  table of sessions), so a trace of any length profiles in bounded memory.
* :func:`iter_requests` yields one file's :class:`TraceRequest` records one at a time (memory: one row).

A malformed row (wrong field count, a count that is not a whole number in [0, 2^24], an implausible timestamp,
invalid or too deeply nested JSON, an overlong line; ``kvtune.profile.readers.base`` lists every limit) is
skipped and counted, its line number and reason kept (the first :data:`MAX_EXAMPLES`); ``strict=True`` raises
:class:`UserError` on the first. Files ending in ``.gz`` are read through gzip; a truncated one is an error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from kvtune.errors import UserError, printable
from kvtune.profile.counts import LengthCounts
from kvtune.profile.readers import FORMATS, Malformed, TraceRequest, Units, file_events, load_tokenizer, parse_columns
from kvtune.profile.readers.base import check_regular
from kvtune.profile.readers.text import BLOCK_TOKENS as TEXT_BLOCK_TOKENS
from kvtune.profile.readers.text import CHARS_PER_TOKEN_ESTIMATE
from kvtune.profile.schema import MAX_RATE_PER_S, MalformedRow, TraceSource, WorkloadProfile

__all__ = ["DEFAULT_WORKLOAD", "FORMATS", "TraceRequest", "bundled_trace_path", "bundled_workloads",
           "default_workload", "iter_requests", "read_trace"]

MAX_EXAMPLES = 5
MAX_TRACKED_BLOCKS = 2_000_000  # prefix blocks remembered (~150 MB at the cap); beyond it reuse is a lower bound
MAX_TRACKED_SESSIONS = 1_000_000
DEFAULT_WORKLOAD = "mooncake-conversation-sample.jsonl"


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

    def observe(self, blocks: tuple[int, ...]) -> int:
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
    """Everything a streaming read accumulates; memory bounded by distinct lengths and the caps above."""

    strict: bool
    inputs: LengthCounts = field(default_factory=LengthCounts)
    outputs: LengthCounts = field(default_factory=LengthCounts)
    totals: LengthCounts = field(default_factory=LengthCounts)
    session_turns: dict[str, int] = field(default_factory=dict)
    sessions_overflow: bool = False
    prefix: _PrefixTracker = field(default_factory=_PrefixTracker)
    reused_tokens: int = 0
    reuse_input_tokens: int = 0  # input tokens of the requests that carry prefix information
    t_prev: float | None = None
    gap_n: int = 0
    gap_mean: float = 0.0
    gap_m2: float = 0.0
    out_of_order: int = 0
    malformed: int = 0
    examples: list[MalformedRow] = field(default_factory=list)
    # per file
    file: str = ""
    file_rows: int = 0
    file_bad: int = 0
    file_t_min: float | None = None
    file_t_max: float | None = None

    def start_file(self, path: Path) -> None:
        self.file, self.file_rows, self.file_bad = printable(path), 0, 0
        self.file_t_min = self.file_t_max = self.t_prev = None

    def add(self, r: TraceRequest) -> None:
        self.inputs.add(r.input_tokens)
        self.outputs.add(r.output_tokens)
        self.totals.add(r.input_tokens + r.output_tokens)
        self.file_rows += 1
        if r.timestamp_s is not None:
            self._arrival(r.timestamp_s)
        if r.session is not None:
            turns = self.session_turns.get(r.session)
            if turns is not None:
                self.session_turns[r.session] = turns + 1
            elif len(self.session_turns) < MAX_TRACKED_SESSIONS:
                self.session_turns[r.session] = 1
            else:
                self.sessions_overflow = True
        if r.blocks is not None and r.block_tokens:
            hit = self.prefix.observe(r.blocks)
            self.reused_tokens += min(r.input_tokens, hit * r.block_tokens)
            self.reuse_input_tokens += r.input_tokens

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

    def bad(self, row: Malformed) -> None:
        if self.strict:
            raise UserError(f"{self.file}:{row.line}: {row.reason}")
        self.malformed += 1
        self.file_bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(MalformedRow(file=self.file, line=row.line, reason=row.reason))


def _units_factory(tokenizer: Any) -> Callable[[], Units]:
    """Loads the tokenizer once, on first use (only text formats need it)."""
    loaded: list[Units] = []

    def units() -> Units:
        if not loaded:
            tok = load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
            loaded.append(Units(tok))
        return loaded[0]

    return units


def _check_format(fmt: str | None) -> str:
    fmt = fmt or "auto"
    if fmt not in ("auto", *FORMATS):
        raise UserError(f"unknown trace format '{printable(fmt, 40)}' (expected auto, {', '.join(FORMATS)})")
    return fmt


def _no_requests(path: Path, bad: int, first: Malformed | None) -> UserError:
    if bad:
        where = f" (first at line {first.line}: {first.reason})" if first else ""
        return UserError(f"{printable(path)}: no valid requests; {bad} malformed rows{where}")
    return UserError(f"{printable(path)}: no requests (empty trace)")


# ----------------------------------------------------------------------------------------------- public


def iter_requests(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    columns: str | dict[str, str] | None = None,
    tokenizer: Any = None,
    strict: bool = False,
    on_malformed: Callable[[Malformed], None] | None = None,
) -> Iterator[TraceRequest]:
    """The requests of one trace file in file order, streamed (memory: one row, whatever the file's length).

    ``fmt``: a name in :data:`FORMATS`, or ``None``/``"auto"`` to detect it as :func:`read_trace` does;
    ``columns``: as ``--columns`` (generic traces); ``tokenizer``: for text formats, as in :func:`read_trace`.
    Malformed rows are skipped; ``on_malformed`` receives each (``line``, ``reason``); ``strict=True`` raises
    :class:`UserError` on the first. The format, the columns and the file are checked before this returns;
    a file with no valid request raises :class:`UserError` when the iteration reaches its end.
    """
    p = Path(path)
    _, events = file_events(p, _check_format(fmt), parse_columns(columns), _units_factory(tokenizer))

    def stream() -> Iterator[TraceRequest]:
        good = bad = 0
        first: Malformed | None = None
        for ev in events:
            if type(ev) is TraceRequest:
                good += 1
                yield ev
                continue
            bad += 1
            first = first or ev
            if strict:
                raise UserError(f"{printable(p)}:{ev.line}: {ev.reason}")
            if on_malformed is not None:
                on_malformed(ev)
        if good == 0:
            raise _no_requests(p, bad, first)

    return stream()


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
    fmt = _check_format(fmt)
    cols = parse_columns(columns)
    units = _units_factory(tokenizer)
    for p in paths:  # every file is checked before the first is read
        check_regular(p)

    acc = _Acc(strict=strict)
    sources: list[TraceSource] = []
    formats: list[str] = []
    token_counts = "trace"
    reuse_method: str | None = None
    span_total = 0.0
    timed_requests = 0
    for p in paths:
        acc.start_file(p)
        reuse_before = acc.reuse_input_tokens
        used, events = file_events(p, fmt, cols, units)
        add, bad = acc.add, acc.bad
        first_bad: Malformed | None = None
        for ev in events:
            if type(ev) is TraceRequest:
                add(ev)
            else:
                first_bad = first_bad or ev
                bad(ev)
        if used == "empty" or acc.file_rows == 0:
            raise _no_requests(p, acc.file_bad, first_bad)
        if used in ("sharegpt", "vllm"):
            token_counts = "tokenizer" if units().tokenizer is not None else "estimated"
        if acc.reuse_input_tokens > reuse_before:
            reuse_method = ("mooncake hash_ids (512-token blocks, leading run of blocks seen before)" if used == "mooncake"
                            else f"shared prompt prefixes ({TEXT_BLOCK_TOKENS}-token blocks, leading run of blocks "
                                 "seen before, multi-turn history included)")
        span = None
        if acc.file_t_min is not None and acc.file_t_max is not None:
            span = acc.file_t_max - acc.file_t_min
            if span > 0:
                span_total += span
                timed_requests += acc.file_rows
        formats.append(used)
        sources.append(TraceSource(path=acc.file, format=used, requests=acc.file_rows, malformed_rows=acc.file_bad,
                                   span_s=round(span, 6) if span is not None else None))

    notes: list[str] = []
    turns = LengthCounts()
    for n in acc.session_turns.values():
        turns.add(n)
    if acc.sessions_overflow:
        notes.append(f"more than {MAX_TRACKED_SESSIONS:,} sessions: turns counted for the first ones only")
    if acc.prefix.full:
        notes.append(f"more than {MAX_TRACKED_BLOCKS:,} distinct prefix blocks: later blocks were not remembered, "
                     "so prefix_reuse_ratio is a lower bound")
    if token_counts == "estimated":
        notes.append(f"no tokenizer: text lengths estimated at {CHARS_PER_TOKEN_ESTIMATE} UTF-8 bytes per token "
                     "(pass --tokenizer or a --model folder with a tokenizer for exact counts)")
    cv = None
    if acc.gap_n >= 2 and acc.gap_mean > 0:
        cv = round(math.sqrt(acc.gap_m2 / (acc.gap_n - 1)) / acc.gap_mean, 4)
        cv = cv if math.isfinite(cv) and cv <= 1e9 else None  # gaps of a few subnormal seconds: no meaningful CV
    if acc.out_of_order:
        notes.append(f"{acc.out_of_order} requests arrive earlier than the row before them (trace not time-ordered); "
                     "inter-arrival figures use the ordered gaps only")
    rate = float(f"{(timed_requests - 1) / span_total:.6g}") if span_total > 0 and timed_requests > 1 else None
    if rate is not None and rate > MAX_RATE_PER_S:  # timestamps finer than any trace resolves
        notes.append(f"time span of {span_total:.3g} s is too short for an arrival rate")
        rate = None
    if len(paths) > 1 and rate is not None:
        notes.append("several traces: arrival rate = their requests over their summed time spans (back to back)")
    reuse = round(acc.reused_tokens / acc.reuse_input_tokens, 6) if acc.reuse_input_tokens else None
    uniq = sorted(set(formats))
    shown = [printable(p) for p in paths]
    return WorkloadProfile(
        name=name or (printable(paths[0].name) if len(paths) == 1 else f"{printable(paths[0].name)} +{len(paths) - 1}"),
        source=", ".join(shown),
        format=uniq[0] if len(uniq) == 1 else "mixed",
        requests=acc.inputs.count,
        input_tokens=acc.inputs.stats(),
        output_tokens=acc.outputs.stats(),
        total_tokens=acc.totals.stats(),
        time_span_s=round(span_total, 6) if span_total > 0 else None,
        arrival_rate_per_s=rate,
        interarrival_cv=cv,
        sessions=turns.count or None,
        turns_per_session=turns.stats() if turns.count else None,
        prefix_reuse_ratio=reuse,
        prefix_reuse_method=reuse_method if reuse is not None else None,
        token_counts=token_counts,  # type: ignore[arg-type]
        percentile_relative_error=0.0,
        malformed_rows=acc.malformed,
        malformed_examples=acc.examples,
        traces=sources,
        notes=notes,
    )


def bundled_workloads() -> list[str]:
    """Names of the sample traces shipped in ``kvtune.profiles/workloads``."""
    folder = resources.files("kvtune.profiles").joinpath("workloads")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".jsonl", ".csv", ".json")))


def bundled_trace_path(name: str | None = None) -> Path:
    """Path of a bundled sample trace (default: the one :func:`default_workload` reads); UserError for an
    unknown name. The package is installed as files, so the path stays valid."""
    name = name or DEFAULT_WORKLOAD
    if name not in bundled_workloads():
        raise UserError(f"no bundled workload '{printable(name, 60)}' (bundled: {', '.join(bundled_workloads())})")
    return Path(str(resources.files("kvtune.profiles").joinpath("workloads", name)))


def default_workload() -> WorkloadProfile:
    """The bundled sample workload (a slice of the Mooncake FAST'25 conversation trace, Apache-2.0)."""
    prof = read_trace(bundled_trace_path(), name=f"bundled:{DEFAULT_WORKLOAD}")
    prof.source = f"kvtune.profiles/workloads/{DEFAULT_WORKLOAD}"
    prof.traces = [t.model_copy(update={"path": prof.source}) for t in prof.traces]
    return prof
