"""Constant-memory distributions of non-negative integers (token counts) for streaming trace reading.

:class:`LengthSketch` keeps exact counts for values below ``EXACT_BELOW`` (1024) and, above it, counts in
logarithmic buckets whose width grows by ``GAMMA`` (a DDSketch-style layout): a bucket holds the values in
``(GAMMA**(i-1), GAMMA**i]`` and reports ``2 * GAMMA**i / (GAMMA + 1)``, which is within ``RELATIVE_ERROR``
(0.5%) of every value in it. So every percentile is exact below 1024 tokens and within 0.5% above, with at
most ~1,000 buckets up to 10 million tokens, however many rows are read. Mean, min and max are exact.

Percentiles use the nearest-rank definition: the p-th percentile of n values is the smallest value v with
``count(x <= v) >= ceil(p/100 * n)`` (numpy's ``method="inverted_cdf"``).
"""

from __future__ import annotations

import math

from kvtune.profile.schema import HistogramBucket, LengthStats

EXACT_BELOW = 1024
RELATIVE_ERROR = 0.005
GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_INV_LOG_GAMMA = 1.0 / math.log(GAMMA)


class LengthSketch:
    """Streaming counts of non-negative integers with bounded-error percentiles and a power-of-two histogram."""

    __slots__ = ("small", "large", "pow2", "count", "total", "lo", "hi")

    def __init__(self) -> None:
        self.small = [0] * EXACT_BELOW
        self.large: dict[int, int] = {}
        self.pow2 = [0] * 64  # bucket b holds [2**(b-1), 2**b); bucket 0 holds 0
        self.count = 0
        self.total = 0
        self.lo: int | None = None
        self.hi: int | None = None

    def add(self, value: int) -> None:
        if value < EXACT_BELOW:
            self.small[value] += 1
        else:
            idx = math.ceil(math.log(value) * _INV_LOG_GAMMA)
            self.large[idx] = self.large.get(idx, 0) + 1
        self.pow2[value.bit_length()] += 1
        self.count += 1
        self.total += value
        if self.lo is None or value < self.lo:
            self.lo = value
        if self.hi is None or value > self.hi:
            self.hi = value

    def merge(self, other: "LengthSketch") -> None:
        for i, c in enumerate(other.small):
            self.small[i] += c
        for k, c in other.large.items():
            self.large[k] = self.large.get(k, 0) + c
        for i, c in enumerate(other.pow2):
            self.pow2[i] += c
        self.count += other.count
        self.total += other.total
        if other.lo is not None:
            self.lo = other.lo if self.lo is None else min(self.lo, other.lo)
            self.hi = other.hi if self.hi is None else max(self.hi, other.hi)

    def buckets(self):
        """``(representative value, count)`` in increasing order; representatives clamped to [min, max]."""
        for v, c in enumerate(self.small):
            if c:
                yield v, c
        for idx in sorted(self.large):
            rep = 2 * GAMMA**idx / (GAMMA + 1)
            yield min(max(rep, self.lo or 0), self.hi or 0), self.large[idx]

    def quantile(self, q: float) -> int:
        """Nearest-rank quantile, ``q`` in [0, 1]; exact below ``EXACT_BELOW``, within ``RELATIVE_ERROR`` above."""
        if self.count == 0:
            raise ValueError("quantile of an empty sketch")
        if q >= 1:
            return int(self.hi)
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for value, c in self.buckets():
            seen += c
            if seen >= rank:
                return int(round(value))
        return int(self.hi)  # pragma: no cover - unreachable: counts sum to self.count

    def mean_of(self, fn) -> float:
        """Mean of ``fn(value)`` over the distribution, evaluated at bucket representatives."""
        if self.count == 0:
            return 0.0
        return sum(fn(v) * c for v, c in self.buckets()) / self.count

    def histogram(self) -> list[HistogramBucket]:
        out = []
        for b, c in enumerate(self.pow2):
            if c:
                lo = 0 if b == 0 else 1 << (b - 1)
                out.append(HistogramBucket(lo=lo, hi=1 if b == 0 else 1 << b, count=c))
        return out

    def stats(self) -> LengthStats:
        if self.count == 0:
            raise ValueError("stats of an empty sketch")
        return LengthStats(
            count=self.count,
            mean=round(self.total / self.count, 3),
            min=int(self.lo),
            p50=self.quantile(0.50),
            p90=self.quantile(0.90),
            p99=self.quantile(0.99),
            max=int(self.hi),
            histogram=self.histogram(),
        )
