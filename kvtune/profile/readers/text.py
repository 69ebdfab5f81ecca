"""Text traces (ShareGPT, vLLM custom datasets) carry prompts, not token counts: :class:`Units` turns text into
countable units, tokenizer ids when a tokenizer is given, else UTF-8 bytes at 4 per token (an estimate the
profile labels as such), and into chained prefix-block ids for prefix reuse."""

from __future__ import annotations

import math
from typing import Any

from kvtune.errors import UserError, printable

BLOCK_TOKENS = 16  # prefix-cache block for text prompts (vLLM's default block size)
CHARS_PER_TOKEN_ESTIMATE = 4


class Units:
    """Text -> units: tokenizer ids, or UTF-8 bytes (:data:`CHARS_PER_TOKEN_ESTIMATE` per token) without one."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.per_token = 1 if tokenizer is not None else CHARS_PER_TOKEN_ESTIMATE

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8", errors="replace"))
        if hasattr(self.tokenizer, "encode"):
            try:
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            except TypeError:
                return list(self.tokenizer.encode(text))
        return list(self.tokenizer(text))

    def tokens(self, units: int) -> int:
        return units if self.per_token == 1 else math.ceil(units / self.per_token)

    def blocks(self, ids: list[int]) -> tuple[int, ...]:
        """Chained ids of the full prefix blocks of ``ids`` (a block = 16 tokens' worth of units). Python's hash
        of a tuple of ints, so the same text gives the same ids in every run."""
        size = BLOCK_TOKENS * self.per_token
        out, h = [], 0
        for start in range(0, len(ids) - size + 1, size):
            h = hash((h, tuple(ids[start:start + size])))
            out.append(h)
        return tuple(out)


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
        raise UserError(f"tokenizer '{printable(name_or_path)}': cannot load it locally ({printable(first, 120)})") \
            from None
