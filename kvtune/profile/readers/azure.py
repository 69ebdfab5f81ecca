"""Azure LLM inference trace (Azure Public Dataset, 2023/2024): CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``.

``TIMESTAMP`` is a date-time with 7 fraction digits (``2023-11-16 18:15:46.6805900``), read as UTC.
"""

from __future__ import annotations

from kvtune.profile.readers.base import Reader

COLUMNS = {"input": "ContextTokens", "output": "GeneratedTokens", "time": "TIMESTAMP"}


def _columns(header: list[str], columns: dict[str, str] | None) -> dict[str, str]:
    lowered = {h.lower() for h in header}
    return {k: v for k, v in COLUMNS.items() if k != "time" or v.lower() in lowered}


READER = Reader(
    name="azure",
    summary="Azure LLM inference trace CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``",
    csv_columns=_columns,
    detect_header=lambda header: "contexttokens" in header and "generatedtokens" in header,
)
