"""The conformance suite every strategy passes (one parameter list per axis, as Optuna's sampler suite).

Adding a strategy to the registry without adding it here fails ``test_every_registered_strategy_has_a_case``.
Contracts checked, per strategy:

* budget respected exactly: the kept count per head is ``layer_keep`` (per-head counts for Ada-KV sum to the
  layer's total), sinks and the recent window included, indices sorted and unique, layers summing to the
  uniform total;
* ratio 1.0 (nothing to evict) / the identity codec changes nothing: same logits as the full cache;
* seeded determinism: same inputs and seed, same kept tokens and logits;
* YAML round-trip of a pipeline carrying the strategy (parameters from its own search space);
* composition with every stage of the other axes through the runtime, batch 2, GQA (6 query / 2 KV heads);
* bytes reported == bytes the stored tensors hold (walked independently of ``nbytes()``) == the analytic model;
* batch > 1: each row of a batch equals that row run alone.
"""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch

from kvtune.pipeline import Pipeline, Stage
from kvtune.strategies import Stages
from kvtune.runtime import KVCache
from kvtune.scenarios import SCENARIOS
from kvtune.strategies import CODECS, PLACEMENTS, SELECTORS, ScoreInputs, Store, build
from kvtune.strategies.base import budget_tokens

SELECTOR_CASES: dict[str, dict] = {
    "streaming_llm": {"sinks": 4},
    "snapkv": {"window": 8, "kernel": 5, "recent": 8},
    "h2o": {"recent": 4, "sinks": 1},
    "pyramidkv": {"window": 8, "recent": 8, "beta": 5},
    "ada_kv": {"window": 8, "recent": 8, "sinks": 2, "alpha_safeguard": 0.2},
    "tova": {"sinks": 2},
    "knorm": {"recent": 4},
    "sliding_window": {},
    "random": {"seed": 3, "sinks": 1, "recent": 2},
    "snapkv_agnostic": {"window": 8, "kernel": 5, "recent": 8},
    "spill_recall": {"page_size": 8, "window": 8, "sinks": 2, "recent": 4},
}
CODEC_CASES: dict[str, dict] = {
    "fp16": {},
    "bf16": {},
    "fp8": {"fmt": "e4m3", "scale": "head"},
    "int8": {"group_size": 32},
    "kivi": {"bits": 2, "group_size": 16, "residual": 16, "value_window": "paper"},  # key_schedule: test_kivi.py
    "lowrank": {"rank": 4},
    "mixed": {"edge": "fp16", "middle": "kivi2", "edge_layers": 1},
}
PLACEMENT_CASES: dict[str, dict] = {"gpu": {}, "offload": {"gpu_fraction": 0.5, "block_size": 16}}
BUDGETS = [0.3, 13, 0.95]
PROMPT = 41


def test_every_registered_strategy_has_a_case():
    assert set(SELECTOR_CASES) == set(SELECTORS)
    assert set(CODEC_CASES) == set(CODECS)
    assert set(PLACEMENT_CASES) == set(PLACEMENTS)


def _inputs(b=2, h=2, hq=6, t=60, d=8, layer=1, layers=3, seed=0) -> ScoreInputs:
    g = torch.Generator().manual_seed(seed)
    return ScoreInputs(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g), layer, layers,
                       d**-0.5, torch.randn(b, hq, min(t, 64), d, generator=g), torch.rand(b, h, t, generator=g))


def _select(sel, inputs):
    return sel.select_ragged(inputs) if sel.ragged else sel.select(inputs)


# ------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", sorted(SELECTOR_CASES))
def test_budget_respected_exactly(name, budget):
    sel = build("selection", name, {**SELECTOR_CASES[name], "budget": budget})
    t, layers = 60, 3
    for layer in range(layers):
        inputs = _inputs(t=t, layer=layer, layers=layers)
        keep = sel.layer_keep(t, layer, layers)
        out = _select(sel, inputs)
        if keep >= t:  # a layer whose share covers the context (PyramidKV's lower layers) keeps everything
            assert out is None
            continue
        n_sink = min(sel.sinks, keep)
        n_recent = min(sel.recent, keep - n_sink)
        protected = set(range(n_sink)) | set(range(t - n_recent, t))
        heads = [ix for row in out for ix in row] if sel.ragged else list(out.reshape(-1, out.shape[-1]))
        if sel.ragged:
            for row in out:
                assert sum(len(ix) for ix in row) == keep * len(row)  # the layer's total, spread over heads
        else:
            assert out.shape == (2, 2, keep)
        for ix in heads:
            ix = ix.tolist()
            assert ix == sorted(set(ix)) and 0 <= ix[0] and ix[-1] < t
            assert protected <= set(ix)
    # per-layer budgets redistribute, never add: the layers sum to the uniform total
    assert sum(sel.layer_keep(t, i, layers) for i in range(layers)) == layers * budget_tokens(budget, t)


@pytest.mark.parametrize("name", sorted(SELECTOR_CASES))
def test_full_budget_selects_nothing(name):
    sel = build("selection", name, {**SELECTOR_CASES[name], "budget": 1.0})
    assert _select(sel, _inputs()) is None


@pytest.mark.parametrize("name", sorted(SELECTOR_CASES))
def test_selection_is_deterministic(name):
    a = build("selection", name, {**SELECTOR_CASES[name], "budget": 0.4})
    b = build("selection", name, {**SELECTOR_CASES[name], "budget": 0.4})
    x, y = _select(a, _inputs(seed=5)), _select(b, _inputs(seed=5))
    if a.ragged:
        assert all(torch.equal(p, q) for rp, rq in zip(x, y) for p, q in zip(rp, rq))
    else:
        assert torch.equal(x, y)


def _run(model, ids, pipeline, seed=0, prompt=PROMPT, chunks=(3, 1, 3)):
    """Prefill ``prompt`` tokens, then decode the rest in ``chunks``; returns (logits (B, T, V), cache)."""
    stages = pipeline if isinstance(pipeline, Stages) else Stages.of(pipeline)
    cache = KVCache(stages, model.config.num_hidden_layers, seed=seed)
    outs = [model(input_ids=ids[:, :prompt], cache=cache, use_cache=True).logits]
    at = prompt
    for n in chunks:
        outs.append(model(input_ids=ids[:, at : at + n], cache=cache, use_cache=True).logits)
        at += n
    return torch.cat(outs, dim=1), cache


def _pipeline(sel=("none", {}), codec=("fp16", {}), placement=("gpu", {})) -> Pipeline:
    return Pipeline(selection=Stage(method=sel[0], params=sel[1]), codec=Stage(method=codec[0], params=codec[1]),
                    placement=Stage(method=placement[0], params=placement[1]))


@pytest.mark.parametrize("name", sorted(SELECTOR_CASES))
def test_full_budget_changes_no_logits(tiny, tiny_ids, name):
    ref, _ = _run(tiny, tiny_ids, _pipeline())
    got, cache = _run(tiny, tiny_ids, _pipeline(sel=(name, {**SELECTOR_CASES[name], "budget": 1.0})))
    assert (got - ref).abs().max().item() <= 1e-5
    assert cache.stored_tokens() == [tiny_ids.shape[1]] * 3


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_identity_codec_changes_nothing(tiny, tiny_ids, name):
    ref, _ = _run(tiny, tiny_ids, _pipeline())
    got, _ = _run(tiny, tiny_ids, _pipeline(codec=(name, {})))
    assert torch.equal(got, ref)
    store = build("codec", name, {}).new_store()
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    store.append(k, v)
    assert all(torch.equal(a, b) for a, b in zip(store.decoded(), (k, v)))


@pytest.mark.parametrize("name", sorted(SELECTOR_CASES))
def test_pipeline_is_deterministic_given_a_seed(tiny, tiny_ids, name):
    p = _pipeline(sel=(name, {**SELECTOR_CASES[name], "budget": 0.5}), codec=("kivi", CODEC_CASES["kivi"]))
    a, ca = _run(tiny, tiny_ids, p, seed=7)
    b, cb = _run(tiny, tiny_ids, p, seed=7)
    assert torch.equal(a, b) and ca.stored_tokens() == cb.stored_tokens()


# ------------------------------------------------------------------------------------------- YAML
def _sampled_params(cls, seed=0) -> dict:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    return cls.search_space(trial, SCENARIOS["long-context"])


@pytest.mark.parametrize("axis, name", [("selection", n) for n in sorted(SELECTORS)] +
                         [("codec", n) for n in sorted(CODECS)] + [("placement", n) for n in sorted(PLACEMENTS)])
def test_yaml_round_trip_with_search_space_params(axis, name):
    from kvtune.strategies import AXES

    cls = AXES[axis][name]
    for seed in range(3):
        params = _sampled_params(cls, seed)
        assert set(params) <= set(cls.param_names()), "search space names unknown parameters"
        p = _pipeline(**{{"selection": "sel", "codec": "codec", "placement": "placement"}[axis]: (name, params)})
        back = Pipeline.from_dict(__import__("yaml").safe_load(p.to_yaml()))
        assert back == p
        built = build(axis, name, dict(getattr(back, axis).params))
        assert dataclasses.asdict(built) == dataclasses.asdict(build(axis, name, params))
    assert cls.citation and cls.summary and cls.__doc__ and cls.search_space_doc() or not _sampled_params(cls)
    if name not in ("fp16", "bf16", "gpu"):  # baselines have nothing to deviate from
        assert "Deviation" in cls.__doc__


# ------------------------------------------------------------------------------------------- bytes
def held_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a store, walked independently of its nbytes()."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # the encoded tensor types
        return sum(held_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(x, seen) for x in obj)
    if isinstance(obj, Store):  # declared working buffers (memoized decoded views) are not the stored form
        skip = {"codec", *type(obj).working_buffers}
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k not in skip)
    return 0


# codec variants with a store of their own, beside each codec's case above
VARIANT_CASES = {"int8 symmetric": ("int8", {"group_size": 64, "symmetric": True}),
                 "fp8 scale tensor": ("fp8", {"fmt": "e4m3", "scale": "tensor"}),
                 "fp8 scale token": ("fp8", {"fmt": "e5m2", "scale": "token"})}
BYTES_CASES = {**{name: (name, params) for name, params in CODEC_CASES.items()}, **VARIANT_CASES}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [17, 54, 97])
@pytest.mark.parametrize("case", sorted(BYTES_CASES))
def test_bytes_reported_are_bytes_held(case, tokens, dtype):
    name, params = BYTES_CASES[case]
    codec = build("codec", name, params)
    for layer in (0, 1):  # mixed: an edge layer and a middle one
        store = codec.layer_store(layer, 3)
        g = torch.Generator().manual_seed(tokens)
        store.append(torch.randn(2, 3, tokens, 64, generator=g).to(dtype), torch.randn(2, 3, tokens, 64, generator=g).to(dtype))
        assert len(store) == tokens
        assert store.nbytes() == held_bytes(store) == codec.layer_nbytes(layer, 3, 2, 3, tokens, 64, dtype)
        idx = torch.arange(0, tokens, 2).expand(2, 3, -1)
        store.keep(idx)
        assert len(store) == idx.shape[-1]
        assert store.nbytes() == held_bytes(store)


# ------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("placement", sorted(PLACEMENT_CASES))
@pytest.mark.parametrize("codec", sorted(CODEC_CASES))
@pytest.mark.parametrize("sel", ["none"] + sorted(SELECTOR_CASES))
def test_composes_with_every_stage(tiny, tiny_ids, sel, codec, placement):
    sel_params = {} if sel == "none" else {**SELECTOR_CASES[sel], "budget": 0.5}
    p = _pipeline(sel=(sel, sel_params), codec=(codec, CODEC_CASES[codec]), placement=(placement, PLACEMENT_CASES[placement]))
    logits, cache = _run(tiny, tiny_ids, p)
    assert logits.shape == (2, 48, 101) and torch.isfinite(logits).all()
    assert cache.get_seq_length() == 48
    stages = cache.stages
    for i, layer in enumerate(cache.layers):
        store = layer.store
        assert store.nbytes() == held_bytes(store)
        if stages.selector is None:
            assert len(store) == 48
            continue
        keep = stages.selector.layer_keep(PROMPT, i, 3)
        if stages.selector.ragged:
            assert int(store.lengths().sum(dim=1).max()) == 2 * (keep + 7)  # 2 KV heads, 7 decoded tokens each
        elif stages.selector.decode_time:
            assert len(store) <= stages.selector.layer_keep(48, i, 3) + 3  # evicts at each chunk's end
        else:
            assert len(store) == keep + 7


@pytest.mark.parametrize("name", sorted(SELECTOR_CASES))
def test_batch_rows_equal_rows_run_alone(tiny, tiny_ids, name):
    p = _pipeline(sel=(name, {**SELECTOR_CASES[name], "budget": 0.5}), codec=("int8", {"group_size": 32}))
    both, _ = _run(tiny, tiny_ids, p)
    for row in range(2):
        alone, _ = _run(tiny, tiny_ids[row : row + 1], p)
        assert (both[row] - alone[0]).abs().max().item() <= 1e-4
