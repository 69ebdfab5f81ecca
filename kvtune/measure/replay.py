"""Trace replay of prefix reuse: the workload's requests through a tiered LRU prefix cache.

Multi-turn and shared-prefix traffic is where a bigger effective cache pays: the KV of earlier turns stays
cached, so fewer prompt tokens are prefilled again. A candidate pipeline changes the cache's capacity in tokens
(fewer bytes per token hold more tokens; an offload placement adds a host or disk tier); this module replays
the trace's prefix blocks through a cache of that capacity and counts where each prompt block was found.

The cache is two LRU lists, a device tier above a lower (host/disk) tier, exclusive: a block evicted from the
device moves to the top of the lower tier, a block found below is promoted back to the device, the lower
tier's least recent block is dropped. Each request looks up its chained prefix blocks in order (a block's id
stands for the whole prefix up to it, as Mooncake's ``hash_ids``); the leading run found is its prefix hit,
and the rest are prefilled. Then every block of the prompt is touched, last block first, so a prompt's first
blocks are its most recently used and are evicted last (as vLLM frees a sequence's blocks tail first) — which
keeps every cached block's prefix cached too.

Tiers are sized in blocks (capacity in tokens // block tokens). The trace is read once, streamed, keeping at most
:data:`MAX_REQUESTS` requests (token counts and block ids); a replay of the bundled 1,000-request trace takes
milliseconds. Results are memoized per (device blocks, lower blocks), since many candidates share capacities.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable

from kvtune.profile.readers.base import TraceRequest
from kvtune.profile.workload import iter_requests

MAX_REQUESTS = 200_000  # a replay keeps at most this many requests of a trace (the first ones)


@dataclass(frozen=True)
class ReplayResult:
    device_blocks: int
    lower_blocks: int
    prompt_tokens: int  # all prompt tokens of the replayed requests
    device_hit_tokens: int
    lower_hit_tokens: int
    requests: int
    basis: str

    @property
    def device_hit_rate(self) -> float:
        return self.device_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def lower_hit_rate(self) -> float:
        return self.lower_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def recomputed_tokens(self) -> int:
        return self.prompt_tokens - self.device_hit_tokens - self.lower_hit_tokens


def simulate(requests: Iterable[TraceRequest], device_blocks: int, lower_blocks: int, *,
             name: str = "trace") -> ReplayResult:
    """Replay ``requests`` through a device tier of ``device_blocks`` and a lower tier of ``lower_blocks``."""
    if device_blocks < 0 or lower_blocks < 0:
        raise ValueError("tier sizes must be >= 0 blocks")
    top: OrderedDict[int, None] = OrderedDict()  # most recent last
    low: OrderedDict[int, None] = OrderedDict()
    prompt = hit_top = hit_low = n = 0
    for req in requests:
        n += 1
        prompt += req.input_tokens
        blocks = req.blocks or ()
        size = req.block_tokens or 0
        for i, b in enumerate(blocks):  # the leading run of cached blocks is the prefix hit
            span = min(size, req.input_tokens - i * size)  # the last block may be partial
            if span <= 0:
                break
            if b in top:
                hit_top += span
            elif b in low:
                hit_low += span
            else:
                break
        for b in reversed(blocks):  # touch tail first: the first blocks end up most recent
            if b in top:
                top.move_to_end(b)
                continue
            low.pop(b, None)
            if device_blocks == 0:
                if lower_blocks:
                    low[b] = None
                    if len(low) > lower_blocks:
                        low.popitem(last=False)
                continue
            top[b] = None
            if len(top) > device_blocks:
                old, _ = top.popitem(last=False)
                if lower_blocks:
                    low[old] = None
                    if len(low) > lower_blocks:
                        low.popitem(last=False)
    return ReplayResult(device_blocks, lower_blocks, prompt, hit_top, hit_low, n, name)


def stack_distance_hits(requests: list[TraceRequest], device_blocks: int, lower_blocks: int) -> tuple[int, int]:
    """(device hit tokens, lower hit tokens) computed another way, to check :func:`simulate` against.

    An exclusive two-tier LRU with demotion and promotion holds exactly the most recently used
    ``device_blocks + lower_blocks`` blocks, the first ``device_blocks`` of them in the device tier (Mattson et
    al., 1970: LRU is a stack algorithm). So a lookup hits the device iff fewer than ``device_blocks`` distinct
    blocks were used since the block's last use, and the lower tier iff fewer than both tiers together. The
    distances are counted with a Fenwick tree over use times (one mark per block, at its latest use); no cache
    is simulated.
    """
    size = sum(len(r.blocks or ()) for r in requests) + 1
    tree = [0] * (size + 1)

    def add(i: int, v: int) -> None:
        while i <= size:
            tree[i] += v
            i += i & -i

    def prefix(i: int) -> int:
        total = 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    last_use: dict[int, int] = {}
    clock = hit_dev = hit_low = 0
    for req in requests:
        bt = req.block_tokens or 0
        for i, b in enumerate(req.blocks or ()):
            span = min(bt, req.input_tokens - i * bt)
            if span <= 0 or b not in last_use:
                break
            distance = prefix(clock) - prefix(last_use[b])  # distinct blocks used since b's last use
            if distance < device_blocks:
                hit_dev += span
            elif distance < device_blocks + lower_blocks:
                hit_low += span
            else:
                break
        for b in reversed(req.blocks or ()):
            if b in last_use:
                add(last_use[b], -1)
            clock += 1
            last_use[b] = clock
            add(clock, 1)
    return hit_dev, hit_low


class Replay:
    """A trace's requests held once (token counts and block ids) and replayed for many capacities."""

    def __init__(self, requests: list[TraceRequest], name: str) -> None:
        self.requests = requests
        self.name = name
        sizes = {r.block_tokens for r in requests if r.blocks}
        self.block_tokens = max(sizes) if sizes else 0
        self.has_blocks = bool(sizes)
        self._memo: dict[tuple[int, int], ReplayResult] = {}

    @classmethod
    def from_trace(cls, path: str | Path, name: str | None = None, limit: int = MAX_REQUESTS) -> "Replay":
        """Read a trace (any format ``kvtune profile`` reads) once, streamed, keeping its first ``limit`` requests."""
        reqs = list(islice(iter_requests(path), limit))
        label = name or Path(path).name
        if len(reqs) == limit:
            label += f" (first {limit:,} requests)"
        return cls(reqs, label)

    def run(self, device_tokens: int, lower_tokens: int) -> ReplayResult:
        """Hit rates with tiers of these capacities in tokens."""
        if not self.has_blocks:
            return ReplayResult(0, 0, sum(r.input_tokens for r in self.requests), 0, 0, len(self.requests),
                                f"{self.name}: no prefix-block ids in this trace (no reuse modelled)")
        key = (max(0, device_tokens) // self.block_tokens, max(0, lower_tokens) // self.block_tokens)
        if key not in self._memo:
            res = simulate(self.requests, *key, name=self.name)
            self._memo[key] = ReplayResult(
                res.device_blocks, res.lower_blocks, res.prompt_tokens, res.device_hit_tokens, res.lower_hit_tokens,
                res.requests, f"{self.name}: LRU replay of {res.requests:,} requests, "
                              f"{key[0]:,} device + {key[1]:,} lower blocks of {self.block_tokens} tokens")
        return self._memo[key]

    def mix(self) -> list[tuple[int, int]]:
        return [(r.input_tokens, r.output_tokens) for r in self.requests]
