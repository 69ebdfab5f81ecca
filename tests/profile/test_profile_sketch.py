"""Streaming percentiles checked against an independent exact computation (sorted list, nearest rank) and numpy."""

import math
import random

import numpy as np
import pytest

from kvtune.profile.sketch import EXACT_BELOW, RELATIVE_ERROR, LengthSketch


def exact_nearest_rank(values, q):
    """The textbook definition, independent of the sketch: sort, take rank ceil(q*n)."""
    s = sorted(values)
    return s[max(1, math.ceil(q * len(s))) - 1]


def within(reported, exact):
    # stated bound: exact below EXACT_BELOW; relative 0.5% above (+1 for integer rounding at a bucket edge)
    if exact < EXACT_BELOW:
        return reported == exact
    return abs(reported - exact) <= RELATIVE_ERROR * exact + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_match_exact_on_heavy_tailed_lengths(seed):
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(7.5, 1.6)) for _ in range(50_000)] + [0, 1, 3_000_000]
    sk = LengthSketch()
    for v in values:
        sk.add(v)
    arr = np.array(values)
    for q in (0.01, 0.25, 0.5, 0.9, 0.99, 0.999):
        exact = exact_nearest_rank(values, q)
        assert exact == int(np.percentile(arr, q * 100, method="inverted_cdf"))
        got = sk.quantile(q)
        assert within(got, exact), (q, got, exact)
    st = sk.stats()
    assert st.count == len(values) and st.max == 3_000_000 and st.min == 0
    assert st.mean == pytest.approx(sum(values) / len(values), abs=1e-3)


def test_small_values_are_exact_and_histogram_counts_every_value():
    sk = LengthSketch()
    values = [0, 1, 1, 2, 3, 4, 7, 8, 1023, 1024, 2047, 2048]
    for v in values:
        sk.add(v)
    assert sk.quantile(0.5) == exact_nearest_rank(values, 0.5) == 4
    hist = {(b.lo, b.hi): b.count for b in sk.histogram()}
    assert hist == {(0, 1): 1, (1, 2): 2, (2, 4): 2, (4, 8): 2, (8, 16): 1, (512, 1024): 1, (1024, 2048): 2,
                    (2048, 4096): 1}
    assert sum(hist.values()) == len(values)


def test_bucket_count_is_bounded():
    sk = LengthSketch()
    for v in range(1, 10_000_000, 97):
        sk.add(v)
    assert len(sk.large) < 1_500  # constant memory: ~1,000 buckets up to 10M whatever the row count


def test_merge_equals_single_stream():
    rng = random.Random(5)
    vals = [rng.randrange(0, 200_000) for _ in range(20_000)]
    a, b, both = LengthSketch(), LengthSketch(), LengthSketch()
    for i, v in enumerate(vals):
        (a if i % 2 else b).add(v)
        both.add(v)
    a.merge(b)
    for q in (0.5, 0.9, 0.99):
        assert a.quantile(q) == both.quantile(q)
    assert a.stats() == both.stats()


def test_empty_sketch_raises():
    with pytest.raises(ValueError):
        LengthSketch().quantile(0.5)
