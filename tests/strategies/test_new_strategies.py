"""Per-strategy contracts of the selectors and codecs beyond the shared suite: each mechanism against a
reference computed by hand on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from kvtune.strategies import Stages
from kvtune.runtime import KVCache, prefill_record
from kvtune.strategies import ScoreInputs, build
from kvtune.strategies.pyramidkv import pyramid_allocation

from test_conformance import _inputs, _pipeline, _run, held_bytes


def test_knorm_keeps_the_smallest_key_norms():
    inputs = _inputs(t=30)
    idx = build("selection", "knorm", {"budget": 10}).select(inputs)
    norms = inputs.keys.norm(dim=-1)
    expected = norms.argsort(dim=-1)[..., :10].sort(dim=-1).values
    assert torch.equal(idx, expected)


def test_sliding_window_keeps_the_newest_tokens():
    idx = build("selection", "sliding_window", {"budget": 0.25}).select(_inputs(t=40))
    assert idx.tolist() == [[list(range(30, 40))] * 2] * 2


def test_random_depends_on_seed_and_layer_only():
    a = build("selection", "random", {"budget": 0.5, "seed": 1})
    b = build("selection", "random", {"budget": 0.5, "seed": 2})
    x = _inputs(seed=0)
    assert torch.equal(a.select(x), a.select(_inputs(seed=9)))  # not the data
    assert not torch.equal(a.select(x), b.select(x))
    assert not torch.equal(a.select(x), a.select(_inputs(layer=2)))


def test_tova_scores_are_the_latest_query_head_averaged():
    x = _inputs(t=20)
    tova = build("selection", "tova", {"budget": 8, "sinks": 0})
    s = tova.score(x)
    q = x.window_queries[:, :, -1]  # (B, Hq, D)
    probs = torch.einsum("bqd,bhtd->bqht", q, x.keys).mul(x.scaling)
    # query head i reads KV head i // 3
    per_head = torch.stack([probs[:, i, i // 3].softmax(-1) for i in range(6)], dim=1)  # (B, Hq, T)
    assert torch.allclose(s[:, 0], per_head.mean(dim=1), atol=1e-6)
    assert torch.equal(s[:, 0], s[:, 1])  # one set per layer
    new = torch.rand(2, 2, 20)
    assert torch.allclose(tova.update_scores(s, new), new.mean(dim=1, keepdim=True).expand(2, 2, 20))  # forgets s
    h2o = build("selection", "h2o", {"budget": 8})
    assert torch.equal(h2o.update_scores(s, new), s + new)  # accumulates


@pytest.mark.parametrize("total, layers, tokens, floor, beta", [(4620, 30, 1536, 32, 20), (41490, 30, 1536, 32, 20),
                                                              (30, 3, 60, 8, 5), (9, 3, 5, 2, 20)])
def test_pyramid_allocation_sums_exactly_and_shrinks_with_depth(total, layers, tokens, floor, beta):
    alloc = pyramid_allocation(total, layers, tokens, floor, beta)
    assert sum(alloc) == total
    assert all(floor <= a <= tokens for a in alloc)
    assert list(alloc) == sorted(alloc, reverse=True)


def test_pyramid_beta_one_is_snapkv():
    x = _inputs(t=60)
    pyr = build("selection", "pyramidkv", {"budget": 0.3, "beta": 1, "window": 8})
    snap = build("selection", "snapkv", {"budget": 0.3, "window": 8})
    assert torch.equal(pyr.select(x), snap.select(x))


def test_ada_kv_gives_diffuse_heads_more_tokens():
    x = _inputs(b=1, t=64)
    ada = build("selection", "ada_kv", {"budget": 16, "window": 8, "recent": 8, "sinks": 0, "alpha_safeguard": 0.0,
                                         "kernel": 1})
    scores = torch.zeros(1, 2, 64)
    scores[0, 0, :] = 1.0 / 64  # head 0: flat (diffuse)
    scores[0, 1, 10] = 1.0  # head 1: one token
    ada.score = lambda _inputs: scores  # type: ignore[method-assign]
    per_head = ada.select_ragged(x)
    lengths = [len(ix) for ix in per_head[0]]
    assert sum(lengths) == 32 and lengths[0] > lengths[1] >= 8 + 1
    assert 10 in per_head[0][1].tolist()


def test_ada_kv_with_full_safeguard_equals_snapkv_through_the_ragged_runtime(tiny, tiny_ids):
    """alpha 1.0 gives every head exactly the uniform budget, so the ragged store + masked attention must give
    SnapKV's logits; with alpha 0.2 the per-head lengths differ and bytes shrink with the tokens really held."""
    params = {"budget": 0.5, "window": 8, "recent": 8, "kernel": 1}  # max-pooling ties would break top-k ties apart
    snap, _ = _run(tiny, tiny_ids, _pipeline(sel=("snapkv", params)))
    ada, cache = _run(tiny, tiny_ids, _pipeline(sel=("ada_kv", {**params, "alpha_safeguard": 1.0})))
    assert (snap - ada).abs().max().item() <= 1e-5
    _, ragged = _run(tiny, tiny_ids, _pipeline(sel=("ada_kv", {**params, "alpha_safeguard": 0.0}),
                                               codec=("int8", {"group_size": 32})))
    codec = build("codec", "int8", {"group_size": 32})
    for layer in ragged.layers:
        lengths = layer.store.lengths()
        assert layer.store.nbytes() == held_bytes(layer.store) == sum(
            codec.analytic_nbytes(1, 1, int(n), 8, torch.float32) for n in lengths.flatten())
    assert any(len(set(layer.store.lengths().flatten().tolist())) > 1 for layer in ragged.layers)


def test_ragged_store_attend_matches_dense_per_head():
    from kvtune.kernels.decode_attention import decode_attention
    from kvtune.strategies.ragged import RaggedStore

    store = RaggedStore(build("codec", "fp16", {}))
    g = torch.Generator().manual_seed(0)
    keys = [[torch.randn(n, 8, generator=g) for n in (5, 9)]]
    vals = [[torch.randn(n, 8, generator=g) for n in (5, 9)]]
    store.append_ragged(keys, vals)
    q = torch.randn(1, 6, 8, generator=g)
    out, _ = store.attend(q, 8**-0.5)
    for h in range(2):
        ref, _ = decode_attention(q[:, 3 * h : 3 * h + 3], keys[0][h][None, None], vals[0][h][None, None], scale=8**-0.5)
        assert torch.allclose(out[:, 3 * h : 3 * h + 3], ref, atol=1e-6)


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "knorm", "sliding_window"])
def test_recompress_every_keeps_the_budget_while_decoding(tiny, tiny_ids, name):
    once = _pipeline(sel=(name, {"budget": 0.5}))
    every = _pipeline(sel=(name, {"budget": 0.5, "recompress_every": 3}))
    _, c_once = _run(tiny, tiny_ids, once, chunks=(1,) * 7)
    _, c_every = _run(tiny, tiny_ids, every, chunks=(1,) * 7)
    assert c_once.stored_tokens() == [21 + 7] * 3
    # re-selected after decoded tokens 3 and 6 (to ceil(0.5 * 44) and ceil(0.5 * 47)), then one more token
    assert c_every.stored_tokens() == [24 + 1] * 3


def test_recompress_is_rejected_for_decode_time_and_ragged_selectors():
    from kvtune.errors import UserError

    for name in ("h2o", "tova", "ada_kv"):
        with pytest.raises(UserError, match="recompress_every"):
            build("selection", name, {"recompress_every": 8})


def test_lowrank_full_rank_is_lossless_and_low_rank_is_exact_on_low_rank_keys():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    full = build("codec", "lowrank", {"rank": 16}).new_store()
    full.append(k, v)
    assert torch.allclose(full.decoded()[0], k, atol=1e-5) and torch.equal(full.decoded()[1], v)
    basis = torch.linalg.qr(torch.randn(2, 3, 16, 4, generator=g)).Q  # keys living in a 4-dim subspace
    k4 = torch.randn(2, 3, 40, 4, generator=g) @ basis.transpose(-1, -2)
    low = build("codec", "lowrank", {"rank": 4}).new_store()
    low.append(k4[:, :, :30], v[:, :, :30])
    low.append(k4[:, :, 30:], v[:, :, 30:])  # decoded tokens reuse the prompt's basis
    assert torch.allclose(low.decoded()[0], k4, atol=1e-4)
    assert low.nbytes() < full.nbytes()


@pytest.mark.parametrize("tokens", [5, 64, 3000])
def test_lowrank_basis_never_asks_for_a_tokens_by_tokens_u(tokens, monkeypatch):
    """The basis is the top right singular vectors, the same as the full SVD's, but a prompt at least head_dim long
    must not request full matrices: U would be tokens x tokens per head (16 GB at 22K tokens x 8 heads; the cost
    pre-check of a 22,731-token bucket was killed by the OOM killer)."""
    keys = torch.randn(1, 2, tokens, 32, generator=torch.Generator().manual_seed(tokens))
    asked: list[bool] = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda x, full_matrices=True: asked.append(full_matrices) or real(x, full_matrices=full_matrices))
    store = build("codec", "lowrank", {"rank": 8}).new_store()
    store.append(keys, keys)
    assert asked == [tokens < 32]
    vh = real(keys, full_matrices=True)[2]
    assert torch.equal(store.basis, vh[..., :8, :].transpose(-1, -2))


def test_mixed_uses_the_edge_codec_on_first_and_last_layers():
    mixed = build("codec", "mixed", {"edge": "fp16", "middle": "kivi2", "edge_layers": 2})
    kinds = [type(mixed.layer_store(i, 8)).__name__ for i in range(8)]
    assert kinds == ["PlainStore"] * 2 + ["KiviStore"] * 4 + ["PlainStore"] * 2
    from kvtune.strategies import codec_bytes_per_token
    from kvtune.modelspec import preset

    spec = preset("llama-3.1-8b")
    per_layer = {m: codec_bytes_per_token(m, p, spec) / spec.layers for m, p in
                 (("fp16", {}), ("kivi", {"bits": 2, "group_size": 32, "residual": 128}))}
    got = codec_bytes_per_token("mixed", {"edge": "fp16", "middle": "kivi2", "edge_layers": 2}, spec)
    assert got == pytest.approx(4 * per_layer["fp16"] + (spec.layers - 4) * per_layer["kivi"])


def test_real_model_ragged_and_decode_time_selectors(smol):
    """The bundled GQA model (9 query / 3 KV heads): Ada-KV at alpha 1 == SnapKV; TOVA and PyramidKV run."""
    ids = smol.tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[:, :160]
    record = prefill_record(smol.model, ids[:, :150])
    params = {"budget": 0.4, "window": 16, "kernel": 1}  # no max-pool ties

    def logits(sel, extra):
        cache = KVCache.from_record(record, Stages.of(_pipeline(sel=(sel, {**params, **extra}))))
        out = smol.model(input_ids=ids[:, 150:], cache=cache, use_cache=True).logits
        return out, cache

    snap, _ = logits("snapkv", {})
    ada, _ = logits("ada_kv", {"alpha_safeguard": 1.0})
    assert (snap - ada).abs().max().item() <= 1e-4
    for sel, p in (("tova", {"budget": 0.4}), ("pyramidkv", params)):
        cache = KVCache.from_record(record, Stages.of(_pipeline(sel=(sel, p))))
        out = smol.model(input_ids=ids[:, 150:], cache=cache, use_cache=True).logits
        assert torch.isfinite(out).all()
        assert sum(cache.stored_tokens()) <= 30 * (60 + 10)
