"""OpenAI chat-completions logs (JSONL): ``usage.prompt_tokens`` / ``completion_tokens`` at the top level, under
``response`` or under ``response.body`` (Batch API output); ``created`` (epoch seconds) as the arrival time."""

from __future__ import annotations

from typing import Callable, Iterable

from kvtune.profile.readers.base import Context, Reader, TraceRequest, count, dig, seconds

USAGE_PATHS = ("usage", "response.usage", "response.body.usage")
CREATED_PATHS = ("created", "response.body.created", "response.created")


def usage(obj: dict) -> dict | None:
    for path in USAGE_PATHS:
        try:
            u = dig(obj, path)
        except KeyError:
            continue
        if isinstance(u, dict):
            return u
    return None


def _rows(ctx: Context) -> Callable[[int, dict], Iterable[TraceRequest]]:
    def parse(line: int, obj: dict) -> Iterable[TraceRequest]:
        u = usage(obj)
        if u is None:
            raise KeyError("usage")
        inp = count(u["prompt_tokens"])
        out = count(u["completion_tokens"])
        created = None
        for path in CREATED_PATHS:
            try:
                created = dig(obj, path)
                break
            except KeyError:
                pass
        return (TraceRequest(seconds(created) if created is not None else None, inp, out),)

    return parse


READER = Reader(
    name="openai",
    summary="OpenAI chat-completions logs (JSONL): ``usage.prompt_tokens``/``completion_tokens`` at the top level, "
            "under ``response`` or ``response.body`` (Batch API output), ``created`` (s) as arrival time",
    json_rows=_rows,
    detect_record=lambda obj: usage(obj) is not None,
)
