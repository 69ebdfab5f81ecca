"""Per-length-bucket pipelines: the split, the aggregate over the workload mix, the schema, routing, exports."""

from __future__ import annotations

import math

import pytest

from kvtune.buckets import (LengthBucket, aggregate, auto_count, bucket_eval_config, parse_buckets,
                            preference_key, split)
from kvtune.errors import UserError
from kvtune.export import TARGETS, render_pipeline
from kvtune.measure.quality import EvalConfig
from kvtune.pipeline import (Bucket, CostResult, Measured, Pipeline, QualityResult, ServingResult, Stage,
                             validate_pipeline)
from kvtune.runtime import KVCache
from kvtune.scenarios import get_scenario


def _mix(lengths: list[int], out: int = 100) -> list[tuple[int, int]]:
    return [(n, out) for n in lengths]


def test_auto_count_follows_the_spread() -> None:
    assert auto_count([1000] * 50) == 1
    assert auto_count([1000] * 25 + [8000] * 25) == 2  # 8x between p10 and p90
    assert auto_count([500] * 20 + [5000] * 20 + [50000] * 20) == 3  # 100x


def test_split_quantiles_cover_every_request_once() -> None:
    lengths = [100 * (i + 1) for i in range(90)]  # 100 .. 9000
    parts = split(_mix(lengths), 3, cap=4096, cap_reason="cap")
    assert [len(b.requests) for b in parts] == [30, 30, 30]
    assert [b.max_input_tokens for b in parts] == [3000, 6000, None]
    assert math.isclose(sum(b.share for b in parts), 1.0)
    assert parts[0].representative == 1550  # median of 100..3000
    assert parts[0].measured_at == 1550 and parts[0].cap_reason is None
    assert parts[2].representative == 7550 and parts[2].measured_at == 4096 and parts[2].cap_reason == "cap"


def test_split_never_straddles_equal_lengths() -> None:
    parts = split(_mix([1000] * 80 + [9000] * 20), 3, cap=4096, cap_reason="cap")
    assert [(b.max_input_tokens, len(b.requests)) for b in parts] == [(1000, 80), (None, 20)]


def test_parse_buckets() -> None:
    assert parse_buckets("auto") is None and parse_buckets("3") == 3
    for bad in ("0", "17", "x", "2.5"):
        with pytest.raises(UserError, match="--buckets"):
            parse_buckets(bad)


def test_bucket_eval_config_sets_every_context() -> None:
    cfg = bucket_eval_config(EvalConfig.quick(), 777)
    assert (cfg.context_tokens, cfg.passkey_tokens, cfg.kv_tokens, cfg.multiturn_tokens) == (777, 777, 777, 777)
    assert cfg.passkey_items == EvalConfig.quick().passkey_items


def _measured(loss: float, tps: float, bpt: float, ttft: float = 10.0) -> Measured:
    q = QualityResult(quality_loss=loss, kl_mean=loss, kl_max=loss, top1_agreement=1.0, perplexity=1.0,
                      perplexity_full=1.0, eval_tokens=1)
    c = CostResult.model_construct(bytes_per_token=bpt)
    sv = ServingResult.model_construct(tokens_per_s=tps, ttft_ms=ttft, batch=8, exposed_copy_ms=0.0, tpot_ms=10.0)
    return Measured.model_construct(quality=q, cost=c, serving=sv)


def _p(loss: float, tps: float, bpt: float) -> Pipeline:
    return Pipeline.model_construct(selection=Stage(method="none"), codec=Stage(method="fp16"),
                                    placement=Stage(method="gpu"), measured=_measured(loss, tps, bpt))


def test_aggregate_is_time_weighted_throughput_and_share_weighted_means() -> None:
    b = [LengthBucket(0, 1000, ((500, 100),) * 3, 0.75, 500, 500, None),
         LengthBucket(1, None, ((9000, 300),), 0.25, 9000, 4096, "cap")]
    a = aggregate([_p(0.0, 1000.0, 100.0), _p(0.08, 300.0, 40.0)], b, get_scenario("datacenter"))
    # 300 output tokens at 1000 tok/s + 300 at 300 tok/s: 600 tokens in 1.3 s
    assert a.tokens_per_s == pytest.approx(600 / 1.3)
    assert a.quality_loss == pytest.approx(0.25 * 0.08)
    assert a.bytes_per_token == pytest.approx(0.75 * 100 + 0.25 * 40)
    assert a.feasible
    worse = aggregate([_p(0.0, 900.0, 100.0), _p(0.2, 300.0, 40.0)], b, get_scenario("datacenter"))
    assert not worse.feasible  # 0.2 > datacenter's 0.1 ceiling in one bucket
    assert preference_key(a, "throughput") < preference_key(worse, "throughput")


def _bucketed() -> Pipeline:
    return Pipeline(schema_version=2, codec=Stage(method="int8"), buckets=[
        Bucket(max_input_tokens=2048, selection=Stage(method="none"), codec=Stage(method="fp16"),
               placement=Stage(method="gpu"), share=0.6),
        Bucket(selection=Stage(method="snapkv", params={"budget": 0.3}), codec=Stage(method="kivi", params={"bits": 4}),
               placement=Stage(method="gpu"), share=0.4),
    ])


def test_buckets_schema_round_trips_and_routes() -> None:
    p = _bucketed()
    again = Pipeline.from_dict(p.to_dict())
    assert again == p and again.schema_version == 2
    validate_pipeline(again)
    assert again.route(2048).label() == "none + fp16 @ gpu"
    assert again.route(2049).label() == "snapkv(budget=0.3) + kivi(bits=4) @ gpu"
    assert Pipeline().route(10**6).label() == Pipeline().label()  # no buckets: its own stages
    assert Pipeline.from_dict({"schema_version": 1}).schema_version == 1  # old files still load


@pytest.mark.parametrize("change, message", [
    ({"schema_version": 1}, "needs schema_version 2"),
    ({"buckets": [{"max_input_tokens": 10, "selection": {"method": "none"}, "codec": {"method": "fp16"},
                   "placement": {"method": "gpu"}}]}, "only the last bucket"),
    ({"buckets": [{"max_input_tokens": 10, "selection": {"method": "none"}, "codec": {"method": "fp16"},
                   "placement": {"method": "gpu"}},
                  {"max_input_tokens": 5, "selection": {"method": "none"}, "codec": {"method": "fp16"},
                   "placement": {"method": "gpu"}},
                  {"selection": {"method": "none"}, "codec": {"method": "fp16"}, "placement": {"method": "gpu"}}]},
     "must increase"),
])
def test_bad_buckets_are_one_line_errors(change: dict, message: str) -> None:
    data = {**_bucketed().to_dict(), **change}
    with pytest.raises(UserError, match=message):
        Pipeline.from_dict(data)


def test_bucket_stage_parameters_are_validated() -> None:
    data = _bucketed().to_dict()
    data["buckets"][1]["codec"]["params"]["bits"] = 3
    with pytest.raises(UserError, match="buckets.1.*bits"):
        validate_pipeline(Pipeline.from_dict(data))


def test_runtime_applies_the_bucket_by_prompt_length() -> None:
    p = _bucketed()
    short, long = KVCache.for_prompt(p, 100, 2), KVCache.for_prompt(p, 5000, 2)
    assert short.stages.selector is None and short.stages.codec.name == "fp16"
    assert long.stages.selector.name == "snapkv" and long.stages.codec.name == "kivi"


def test_every_exporter_says_it_cannot_switch_by_length() -> None:
    said = {t for t, r in render_pipeline(_bucketed(), ["all"]) if "cannot switch the KV pipeline by prompt length" in r.text}
    assert said == set(TARGETS)
    assert not any("prompt length" in r.text for _t, r in render_pipeline(Pipeline(), ["all"]))


# -- each bucket priced at its own length; quality measured once per evaluation set --------------------------

@pytest.fixture(scope="module")
def h100_ctx():
    """datacenter on h100-sxm for llama-3.1-8b over the bundled trace; no model is loaded (the serving model needs
    only the target's shapes, and these tests hand the bucket contexts their evaluation sets)."""
    from types import SimpleNamespace

    from kvtune.commands.common import load_hardware
    from kvtune.measure.quality import EvalSet
    from kvtune.measure.target import build_target
    from kvtune.modelspec import preset
    from kvtune.profile.workload import default_workload
    from kvtune.search import SearchContext

    hw, _ = load_hardware(None, "h100-sxm")
    loaded = SimpleNamespace(spec=preset("smollm2-135m"), model=SimpleNamespace(parameters=lambda: iter(())))
    target = build_target(hardware=hw, workload=default_workload(), loaded=loaded, target="llama-3.1-8b",
                          context=None, tpot_ms=None, default_tpot_ms=100.0)
    return SearchContext(model=None, evalset=EvalSet(), eval_config=EvalConfig(), target=target,
                         scenario=get_scenario("datacenter"))


def _bucket_contexts(ctx):
    from kvtune.buckets import bucket_context
    from kvtune.measure.quality import EvalSet

    parts = split(ctx.target.serving.replay.mix(), None, 4096, "cap")
    shared = {n: (EvalSet(), bucket_eval_config(ctx.eval_config, n), {}) for n in {b.measured_at for b in parts}}
    return parts, [bucket_context(ctx, b, None, False, None, shared) for b in parts]


def test_each_bucket_is_priced_at_its_own_length_over_its_own_requests(h100_ctx) -> None:
    parts, ctxs = _bucket_contexts(h100_ctx)
    assert [b.representative for b in parts] == [1609, 8431, 22731]  # the bundled trace's three bucket medians
    assert [b.measured_at for b in parts] == [1609, 4096, 4096]
    for b, c in zip(parts, ctxs):
        assert c.target.cost.context_tokens == b.representative  # cost (and the pre-check) at the bucket's median
        assert c.eval_config.context_tokens == c.eval_config.passkey_tokens == b.measured_at
        # the serving model's decode context over exactly the bucket's requests, by hand
        ins_outs = list(b.requests)
        by_hand = sum(o * (i + o / 2) for i, o in ins_outs) / sum(o for _i, o in ins_outs)
        assert c.target.serving.mix.decode_context == pytest.approx(by_hand)
        assert c.target.serving.mix.requests == len(ins_outs)
        assert len(c.target.serving.replay.requests) == len(ins_outs)  # the replay keeps only them
    assert h100_ctx.target.cost.context_tokens == int(h100_ctx.target.workload.total_tokens.p50)  # untouched
    # buckets measured at the same (capped) length share the evaluation set and the quality memo; others do not
    assert ctxs[1].evalset is ctxs[2].evalset and ctxs[1].quality_memo is ctxs[2].quality_memo
    assert ctxs[0].evalset is not ctxs[1].evalset and ctxs[0].quality_memo is not ctxs[1].quality_memo


def test_quality_is_measured_once_per_evaluation_set_and_priced_per_bucket(h100_ctx, monkeypatch) -> None:
    import kvtune.search as search

    calls = []
    q = QualityResult(quality_loss=0.01, kl_mean=0.01, kl_max=0.02, top1_agreement=1.0, perplexity=1.0,
                      perplexity_full=1.0, eval_tokens=64)

    def fake_quality(model, evalset, stages, config, seed, *rest):
        calls.append(evalset)
        return q

    def fake_cost(stages, setup, seed):  # the stored form's bytes at the target's shapes, without the tensors
        full = setup.spec.kv_bytes_per_token()
        return CostResult(bytes_per_token=full / 2, bytes_per_token_full=full, compression_ratio=2.0,
                          context_tokens=setup.context_tokens, capacity_seqs=1, capacity_full_seqs=1,
                          memory_budget_bytes=1, backend="test", device="cpu")

    monkeypatch.setattr(search, "evaluate_quality", fake_quality)
    monkeypatch.setattr(search, "measure_cost", fake_cost)
    _parts, ctxs = _bucket_contexts(h100_ctx)
    fp8 = Pipeline(codec=Stage(method="fp8", params={"fmt": "e4m3", "scale": "head"}))
    m = [search.measure(c, fp8).measured for c in ctxs]
    assert calls == [ctxs[0].evalset, ctxs[1].evalset]  # bucket 3 reuses bucket 2's measurement (same set)
    assert m[1].quality == m[2].quality == q
    assert [x.cost.context_tokens for x in m] == [1609, 8431, 22731]
    # a longer bucket decodes over a longer context: fewer tokens/s for the same pipeline
    assert m[0].serving.tokens_per_s > m[1].serving.tokens_per_s > m[2].serving.tokens_per_s
    assert [x.serving.decode_context for x in m] == [round(c.target.serving.mix.decode_context, 1) for c in ctxs]


def test_probe_slice_runs_once_per_pipeline_across_buckets_sharing_a_memo(monkeypatch):
    """Buckets measured on one evaluation set share the quality memo: a pipeline's probe slice runs once there; a
    stopped pipeline reuses its bound and a fully measured one skips the slice (measure() reads its quality)."""
    from types import SimpleNamespace

    import kvtune.search as search

    calls: list[str] = []
    monkeypatch.setattr(search, "probe_outcomes", lambda _m, _e, stages, _c, _s: calls.append(stages) or [[False]])
    monkeypatch.setattr(search, "probe_loss_bound", lambda *a, outcomes: 0.5 if a[2] == "bad" else 0.0)
    memo: dict = {}
    ctx = SimpleNamespace(multi_fidelity=True, quality_memo=memo, model=None, evalset=None, eval_config=None, seed=0,
                          scenario=SimpleNamespace(max_quality_loss=0.1))
    assert search.stop_early(ctx, "bad", "A") == (0.5, [[False]])
    assert search.stop_early(ctx, "bad", "A") == (0.5, [[False]]) and calls == ["bad"]  # the other bucket: reused
    assert search.stop_early(ctx, "good", "B") == (None, [[False]]) and calls == ["bad", "good"]
    memo["B"] = object()  # measured in full by measure()
    assert search.stop_early(ctx, "good", "B") == (None, None) and calls == ["bad", "good"]
    alone = SimpleNamespace(**{**ctx.__dict__, "quality_memo": None})  # no shared memo: the slice runs every time
    search.stop_early(alone, "bad", "A")
    assert calls == ["bad", "good", "bad"]
