"""Exact distributions of non-negative integers (token counts, turns) for streaming trace reading.

:class:`LengthCounts` keeps one counter per distinct value (a dict value -> count), so its memory is bounded by
the number of distinct values, not of rows: token counts are capped at 2^24 by the readers, and real traces
hold a few tens of thousands of distinct lengths however long they are. Every statistic is exact.

Percentiles use the nearest-rank definition, with no interpolation: the p-th percentile of n values is the
smallest value v with ``count(x <= v) >= ceil(p * n / 100)``, i.e. the value at 1-based rank
``max(1, ceil(p * n / 100))`` of the sorted values (numpy's ``method="inverted_cdf"``). The rank is computed
in integers, so p99 of 100 values is the 99th value, not a floating-point neighbour. A percentile is always a
value that occurs in the data.
"""

from __future__ import annotations

from kvtune.profile.schema import HistogramBucket, LengthStats


def nearest_rank(p: int, n: int) -> int:
    """1-based rank of the p-th percentile (``p`` an integer in [0, 100]) among ``n`` sorted values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside [0, 100]")
    return max(1, -(-p * n // 100))


class LengthCounts:
    """Exact counts of non-negative integers; percentiles by nearest rank, a power-of-two histogram."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, value: int) -> None:
        counts = self.counts
        counts[value] = counts.get(value, 0) + 1

    def merge(self, other: "LengthCounts") -> None:
        counts = self.counts
        for v, c in other.counts.items():
            counts[v] = counts.get(v, 0) + c

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def percentiles(self, ps: tuple[int, ...]) -> list[int]:
        """Nearest-rank percentiles for integer ``ps`` (any order), in one pass over the sorted distinct values."""
        n = self.count
        if n == 0:
            raise ValueError("percentile of an empty distribution")
        wanted = sorted((nearest_rank(p, n), i) for i, p in enumerate(ps))
        out = [0] * len(ps)
        seen, k = 0, 0
        for v in sorted(self.counts):
            seen += self.counts[v]
            while k < len(wanted) and wanted[k][0] <= seen:
                out[wanted[k][1]] = v
                k += 1
            if k == len(wanted):
                break
        return out

    def histogram(self) -> list[HistogramBucket]:
        """Power-of-two buckets ``[2**(b-1), 2**b)`` (bucket 0 holds 0), empty ones left out."""
        pow2: dict[int, int] = {}
        for v, c in self.counts.items():
            b = v.bit_length()
            pow2[b] = pow2.get(b, 0) + c
        return [HistogramBucket(lo=0 if b == 0 else 1 << (b - 1), hi=1 if b == 0 else 1 << b, count=pow2[b])
                for b in sorted(pow2)]

    def stats(self) -> LengthStats:
        n = self.count
        if n == 0:
            raise ValueError("stats of an empty distribution")
        p50, p90, p99 = self.percentiles((50, 90, 99))
        total = sum(v * c for v, c in self.counts.items())
        return LengthStats(count=n, mean=round(total / n, 3), min=min(self.counts), p50=p50, p90=p90, p99=p99,
                           max=max(self.counts), histogram=self.histogram())
