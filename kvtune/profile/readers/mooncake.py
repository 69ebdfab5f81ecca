"""Mooncake (Qin et al., FAST 2025) JSONL: ``timestamp`` (ms from the trace start), ``input_length``,
``output_length``, ``hash_ids`` (one chained id per 512-token prefix block: equal ids = equal prefixes)."""

from __future__ import annotations

from typing import Callable, Iterable

from kvtune.profile.readers.base import Context, Reader, RowError, TraceRequest, count, seconds, session_id

BLOCK_TOKENS = 512


def _rows(ctx: Context) -> Callable[[int, dict], Iterable[TraceRequest]]:
    def parse(line: int, obj: dict) -> Iterable[TraceRequest]:
        inp = count(obj["input_length"])
        out = count(obj["output_length"])
        raw_ts = obj.get("timestamp")
        ts = seconds(raw_ts, 1e-3) if raw_ts is not None else None
        hashes = obj.get("hash_ids")
        blocks = None
        if hashes is not None:
            if not isinstance(hashes, list) or not all(type(h) is int for h in hashes):
                raise RowError("hash_ids is not a list of integers")
            blocks = tuple(hashes)
        return (TraceRequest(ts, inp, out, session_id(obj.get("session_id")), blocks,
                             BLOCK_TOKENS if blocks is not None else None),)

    return parse


READER = Reader(
    name="mooncake",
    summary="Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` (512-token blocks)",
    json_rows=_rows,
    detect_record=lambda obj: "input_length" in obj and "output_length" in obj,
)
