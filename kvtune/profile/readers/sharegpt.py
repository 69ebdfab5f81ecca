"""ShareGPT (a JSON array or JSONL) of ``{"conversations": [{"from": "human"|"gpt", "value": text}, ...]}``.

Each assistant answer that follows a user turn is one request: its input is everything said before it in the
conversation (system prompt and history included, as a chat server re-sends it), its output the answer. The
conversation is the session (its ``id`` when it has one, else its position in the file).
"""

from __future__ import annotations

from typing import Callable, Iterable

from kvtune.profile.readers.base import Context, Reader, RowError, TraceRequest, quote, session_id
from kvtune.profile.readers.text import BLOCK_TOKENS

ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bard", "bing", "model"})


def _rows(ctx: Context) -> Callable[[int, dict], Iterable[TraceRequest]]:
    units = ctx.units

    def parse(line: int, obj: dict) -> Iterable[TraceRequest]:
        conv = obj.get("conversations", obj.get("conversation"))
        if not isinstance(conv, list):
            raise KeyError("conversations")
        sid = obj.get("id")
        session = session_id(sid) if isinstance(sid, (str, int)) and not isinstance(sid, bool) else None
        session = session or f"conversation-{line}"
        out: list[TraceRequest] = []
        context: list[int] = []  # units of everything said so far (the next prompt's prefix)
        pending = False  # a user turn is waiting for its answer
        for msg in conv:
            if not isinstance(msg, dict):
                raise RowError("a conversation message is not an object")
            role = msg.get("from", msg.get("role", ""))
            role = role.lower() if isinstance(role, str) else ""
            text = msg.get("value", msg.get("content"))
            if not isinstance(text, str):
                raise RowError(f"message without text (role {quote(role)})")
            ids = units.ids(text)
            if role in ASSISTANT_ROLES:
                if pending:
                    out.append(TraceRequest(None, units.tokens(len(context)), units.tokens(len(ids)), session,
                                            units.blocks(context), BLOCK_TOKENS))
                    pending = False
            elif role != "system":  # a user turn (or an unknown role) opens a request
                pending = True
            context.extend(ids)
        return out

    return parse


READER = Reader(
    name="sharegpt",
    summary='ShareGPT JSON (array or JSONL) of ``{"conversations": [{"from": "human"|"gpt", "value": ...}]}``',
    json_rows=_rows,
    detect_record=lambda obj: "conversations" in obj or "conversation" in obj,
    text=True,
)
