"""vLLM custom-dataset JSONL (``vllm bench serve --dataset-name custom``): ``{"prompt": text, "output_tokens": n}``."""

from __future__ import annotations

from typing import Callable, Iterable

from kvtune.profile.readers.base import Context, Reader, RowError, TraceRequest, count
from kvtune.profile.readers.text import BLOCK_TOKENS


def _rows(ctx: Context) -> Callable[[int, dict], Iterable[TraceRequest]]:
    units = ctx.units

    def parse(line: int, obj: dict) -> Iterable[TraceRequest]:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise RowError("prompt is not a string")
        out = count(obj["output_tokens"])
        ids = units.ids(prompt)
        return (TraceRequest(None, units.tokens(len(ids)), out, None, units.blocks(ids), BLOCK_TOKENS),)

    return parse


READER = Reader(
    name="vllm",
    summary='vLLM custom-dataset JSONL: ``{"prompt": text, "output_tokens": n}``',
    json_rows=_rows,
    detect_record=lambda obj: "prompt" in obj and "output_tokens" in obj,
    text=True,
)
