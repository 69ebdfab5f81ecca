"""BurstGPT (Wang et al., 2024): CSV with ``Request tokens``, ``Response tokens``, ``Timestamp`` (seconds from the
trace start) and, in the conversation release, ``Session ID``."""

from __future__ import annotations

from kvtune.profile.readers.base import Reader


def _columns(header: list[str], columns: dict[str, str] | None) -> dict[str, str]:
    lowered = {h.lower() for h in header}
    cols = {"input": "Request tokens", "output": "Response tokens"}
    if "timestamp" in lowered:
        cols["time"] = "Timestamp"
    if "session id" in lowered:
        cols["session"] = "Session ID"
    return cols


READER = Reader(
    name="burstgpt",
    summary="BurstGPT CSV: ``Request tokens``, ``Response tokens``, ``Timestamp`` (s), optional ``Session ID``",
    csv_columns=_columns,
    detect_header=lambda header: "request tokens" in header and "response tokens" in header,
)
