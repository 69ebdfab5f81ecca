"""Exact length distributions: every percentile equals the sorted-list nearest rank (and numpy's inverted_cdf)."""

import random

import numpy as np
import pytest

from kvtune.profile.counts import LengthCounts, nearest_rank


def sorted_list_percentile(values, p):
    """The textbook definition, independent of LengthCounts: sort, take 1-based rank ceil(p * n / 100)."""
    s = sorted(values)
    rank = max(1, -(-p * len(s) // 100))
    return s[rank - 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_are_exact_on_heavy_tailed_lengths(seed):
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(7.5, 1.6)) for _ in range(50_000)] + [0, 1, 3_000_000]
    c = LengthCounts()
    for v in values:
        c.add(v)
    ps = (1, 25, 50, 90, 99, 100)
    got = c.percentiles(ps)
    for p, g in zip(ps, got):
        assert g == sorted_list_percentile(values, p) == int(np.percentile(values, p, method="inverted_cdf"))
    st = c.stats()
    assert (st.count, st.min, st.max) == (len(values), 0, 3_000_000)
    assert st.mean == pytest.approx(sum(values) / len(values), abs=1e-3)


def test_integer_rank_has_no_float_rounding():
    # 0.9 * 10 = 9.000000000000002 in floats: a float ceil would pick rank 10
    assert nearest_rank(90, 10) == 9 and nearest_rank(99, 100) == 99 and nearest_rank(0, 5) == 1
    c = LengthCounts()
    for v in range(1, 11):
        c.add(v)
    assert c.percentiles((90, 50, 100)) == [9, 5, 10]
    with pytest.raises(ValueError):
        nearest_rank(101, 10)


def test_histogram_counts_every_value_in_power_of_two_buckets():
    c = LengthCounts()
    values = [0, 1, 1, 2, 3, 4, 7, 8, 1023, 1024, 2047, 2048, 1 << 24]
    for v in values:
        c.add(v)
    hist = {(b.lo, b.hi): b.count for b in c.histogram()}
    assert hist == {(0, 1): 1, (1, 2): 2, (2, 4): 2, (4, 8): 2, (8, 16): 1, (512, 1024): 1, (1024, 2048): 2,
                    (2048, 4096): 1, (1 << 24, 1 << 25): 1}


def test_memory_is_bounded_by_distinct_values():
    c = LengthCounts()
    for i in range(200_000):
        c.add(i % 300)
    assert len(c.counts) == 300 and c.count == 200_000


def test_merge_equals_single_stream():
    rng = random.Random(5)
    vals = [rng.randrange(0, 200_000) for _ in range(20_000)]
    a, b, both = LengthCounts(), LengthCounts(), LengthCounts()
    for i, v in enumerate(vals):
        (a if i % 2 else b).add(v)
        both.add(v)
    a.merge(b)
    assert a.stats() == both.stats()


def test_empty_distribution_raises():
    with pytest.raises(ValueError):
        LengthCounts().stats()
