"""Each selector keeps exactly its budget, its sinks and its recent window; the shared top-k is exact."""

from __future__ import annotations

import math

import pytest
import torch

from kvtune.strategies import H2O, SnapKV, ScoreInputs, StreamingLLM
from kvtune.strategies.base import budget_tokens, protected_topk


def _inputs(b=2, hq=9, h=3, t=97, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g)
    v = torch.randn(b, h, t, d, generator=g)
    q = torch.randn(b, hq, 64, d, generator=g)
    sums = torch.rand(b, h, t, generator=g)
    return ScoreInputs(k, v, layer_idx=0, num_layers=2, scaling=d**-0.5, window_queries=q, attention_sums=sums)


@pytest.mark.parametrize("budget, t, expected", [(0.25, 97, 25), (0.5, 10, 5), (1.0, 7, 7), (40, 97, 40), (400, 97, 97), (0.01, 50, 1)])
def test_budget_tokens(budget, t, expected):
    assert budget_tokens(budget, t) == expected


def test_protected_topk_exact_sets():
    scores = torch.tensor([[[9.0, 0, 5, 1, 7, 2, 0, 3, 8, 6]]])  # (1, 1, 10)
    idx = protected_topk(scores, keep=6, sinks=1, recent=2)
    # sinks {0}, recent {8, 9}, the 3 best of positions 1..7 by score: 4 (7), 2 (5), 7 (3)
    assert idx.tolist() == [[[0, 2, 4, 7, 8, 9]]]
    # recent shrinks first, then sinks, when they exceed the budget
    assert protected_topk(scores, keep=2, sinks=1, recent=5).tolist() == [[[0, 9]]]
    assert protected_topk(scores, keep=1, sinks=3, recent=5).tolist() == [[[0]]]


@pytest.mark.parametrize("cls, extra", [(StreamingLLM, {"sinks": 4}), (SnapKV, {"window": 16, "sinks": 2}),
                                         (H2O, {"recent": 8, "sinks": 1})])
@pytest.mark.parametrize("budget", [0.2, 0.5, 30])
def test_keeps_exactly_budget_sinks_and_recent(cls, extra, budget):
    inp = _inputs()
    sel = cls(budget=budget, **extra)
    t = inp.keys.shape[2]
    idx = sel.select(inp)
    keep = budget_tokens(budget, t)
    assert idx.shape == (2, 3, keep)
    sinks = min(sel.sinks, keep)
    recent = min(sel.recent, keep - sinks)  # the recent window gives way first when the budget is small
    for row in idx.reshape(-1, keep).tolist():
        assert row == sorted(set(row)), "indices sorted and unique"
        assert set(range(sinks)) <= set(row)
        assert set(range(t - recent, t)) <= set(row)


def test_streaming_llm_keeps_sinks_plus_newest():
    inp = _inputs(t=50)
    idx = StreamingLLM(budget=10, sinks=4).select(inp)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 44, 45, 46, 47, 48, 49]


def test_snapkv_scores_match_naive_computation():
    inp = _inputs(b=1, t=40, d=8)
    sel = SnapKV(budget=0.5, window=8, kernel=3, pooling="avg", sinks=0)
    got = sel.score(inp)  # (1, 3, 40)
    q = inp.window_queries[:, :, -8:]
    t = 40
    expected = torch.zeros(1, 3, t)
    for h in range(3):
        per_q = []
        for qh in range(3 * h, 3 * h + 3):
            votes = torch.zeros(t)
            for i in range(8):
                pos = t - 8 + i
                logits = (q[0, qh, i] @ inp.keys[0, h, : pos + 1].T) * inp.scaling
                votes[: pos + 1] += logits.softmax(-1)
            # the paper's code and kvpress: pool the keys before the window only, zero padding counted
            prefix = torch.cat([torch.zeros(1), votes[: t - 8], torch.zeros(1)])
            per_q.append(torch.stack([prefix[j : j + 3].sum() / 3 for j in range(t - 8)]))
        scored = torch.stack(per_q).mean(0)
        expected[0, h] = torch.cat([scored, scored.max().expand(8)])  # the window ranks with the best prefix key
    torch.testing.assert_close(got[..., :-8], expected[..., :-8], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[..., -8:], expected[..., -8:], rtol=1e-4, atol=1e-6)
    # ... just above it, newest first and without ties (so top-k does not depend on the batch around a row)
    window = got[0, :, -8:]
    assert (window.diff(dim=-1) > 0).all() and (window[:, 0] > got[0, :, :-8].amax(dim=-1)).all()


def test_snapkv_defaults_are_the_papers_code_and_kvpress():
    sel = SnapKV()
    assert (sel.window, sel.kernel, sel.pooling) == (64, 5, "avg")


def test_h2o_uses_accumulated_attention():
    inp = _inputs(b=1, t=20)
    inp.attention_sums = torch.zeros(1, 3, 20)
    inp.attention_sums[:, :, 5] = 10.0
    inp.attention_sums[:, :, 11] = 9.0
    idx = H2O(budget=4, recent=2, sinks=0).select(inp)
    assert idx[0, 0].tolist() == [5, 11, 18, 19]


def test_h2o_normalizes_by_the_queries_that_see_each_key():
    inp = _inputs(b=1, t=20)
    inp.attention_sums = torch.zeros(1, 3, 20)
    inp.attention_sums[:, :, 2] = 9.0  # seen by 18 prompt queries: 0.5 per query
    inp.attention_sums[:, :, 15] = 4.0  # seen by 5: 0.8 per query
    inp.attention_sums[:, :, 10] = 6.0  # seen by 10: 0.6 per query
    assert H2O(budget=4, recent=2, sinks=0).select(inp)[0, 0].tolist() == [10, 15, 18, 19]
    assert H2O(budget=4, recent=2, sinks=0, normalize=False).select(inp)[0, 0].tolist() == [2, 10, 18, 19]


@pytest.mark.parametrize("bad", [0.0, 1.5, -3, 0, True, "half"])
def test_invalid_budgets_rejected(bad):
    with pytest.raises(ValueError, match="budget"):
        StreamingLLM(budget=bad)


def test_snapkv_parameter_ranges():
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(kernel=4)
    with pytest.raises(ValueError, match="window"):
        SnapKV(window=100)
    assert math.isclose(SnapKV(window=32, recent=0).recent, 32)
