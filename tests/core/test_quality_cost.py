"""Quality and cost measurement on the real model, with small settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtune.measure.kernels_cost import CostSetup, measure_cost
from kvtune.pipeline import Pipeline, Stage
from kvtune.measure.quality import EvalConfig, build_eval_set, evaluate_quality, passkey_prompt
from kvtune.strategies import Stages

CFG = EvalConfig(text_prompts=1, context_tokens=256, continuation_tokens=24, chunk=8, passkey_items=2,
                 passkey_tokens=300, kv_items=0, multiturn_items=0)


@pytest.fixture(scope="module")
def evalset(smol):
    return build_eval_set(smol.model, smol.tokenizer, CFG, attention_sums=True)


def test_full_cache_has_zero_loss_and_answers_its_probes(smol, evalset):
    q = evaluate_quality(smol.model, evalset, Pipeline(), CFG)
    assert q.kl_mean == 0.0 and q.top1_agreement == 1.0 and q.quality_loss == 0.0
    assert q.perplexity == q.perplexity_full
    assert q.passkey_full_accuracy == 1.0  # the default model answers a passkey at this length
    assert q.eval_tokens == 24


def test_lossy_pipelines_rank_as_expected(smol, evalset):
    kivi4 = evaluate_quality(smol.model, evalset, Pipeline(codec=Stage(method="kivi", params={"bits": 4})), CFG)
    kivi2 = evaluate_quality(smol.model, evalset, Pipeline(codec=Stage(method="kivi", params={"bits": 2})), CFG)
    tiny = evaluate_quality(smol.model, evalset,
                            Pipeline(selection=Stage(method="streaming_llm", params={"budget": 16, "sinks": 4})), CFG)
    assert 0.0 < kivi4.kl_mean < kivi2.kl_mean
    assert kivi4.kl_mean < tiny.kl_mean
    # a 16-token StreamingLLM cache cannot hold a passkey from the middle of the prompt
    assert tiny.passkey_accuracy == 0.0 and tiny.probe_retention == 0.0
    assert tiny.quality_loss == pytest.approx(tiny.kl_mean + 1.0, abs=1e-6)


def test_passkey_prompt_places_the_key(smol):
    ids, answer = passkey_prompt(smol.tokenizer, 400, 0.5, "71432")
    assert abs(len(ids) - 400) < 40
    assert smol.tokenizer.decode(answer).strip() == "71432"
    text = smol.tokenizer.decode(ids)
    assert text.index("pass key") < text.index("71432")  # the question comes before the context


def _setup(ctx=2048, host_gib=1.0):
    from kvtune.measure.tiers import Tiers
    from kvtune.modelspec import ModelSpec
    from kvtune.profile.hardware import reference_hardware

    spec = ModelSpec("m", layers=4, kv_heads=2, q_heads=8, head_dim=64)
    hw = reference_hardware("h100-sxm", fill_host=False).model_copy(update={
        "gpu_memory_total_bytes": int((64 * 2**20) / 0.9) + 1, "cpu_ram_total_bytes": 2**34,
        "cpu_ram_available_bytes": int(host_gib * 2**30 / 0.9) + 1})
    tiers = Tiers.from_hardware(hw, 0)
    assert tiers.device.capacity.value == 64 * 2**20
    return CostSetup(spec=spec, context_tokens=ctx, tiers=tiers, repeats=2, warmup=1)


def test_cost_bytes_and_capacity_in_the_tiers():
    setup = _setup()
    full = measure_cost(Stages.of(Pipeline()), setup)
    assert full.bytes_per_token == full.bytes_per_token_full == 2 * 4 * 2 * 64 * 2  # fp16
    assert full.capacity_full_seqs == full.capacity_seqs == (64 * 2**20) // (2048 * 2048)
    half = measure_cost(Stages.of(Pipeline(selection=Stage(method="snapkv", params={"budget": 0.5}))), setup)
    assert half.bytes_per_token == full.bytes_per_token / 2 and half.capacity_seqs == 2 * full.capacity_seqs
    kivi = measure_cost(Stages.of(Pipeline(codec=Stage(method="kivi", params={"bits": 4, "group_size": 32,
                                                                               "residual": 128}))), setup)
    assert kivi.compression_ratio > 3.0
    off = measure_cost(Stages.of(Pipeline(placement=Stage(method="offload", params={"gpu_fraction": 0.25}))), setup)
    assert off.capacity_seqs == 4 * full.capacity_seqs  # the 1 GiB host tier holds the other 75% of 64 of them
    seq = 2048 * full.bytes_per_token  # bytes of one full sequence
    small_host = measure_cost(Stages.of(Pipeline(placement=Stage(
        method="offload", params={"gpu_fraction": 0.25, "host_bytes": int(3 * 0.75 * seq)}))), setup)
    assert small_host.capacity_seqs == 3  # the host tier holds the offloaded 75% of only three sequences
    tiny_host = measure_cost(Stages.of(Pipeline(placement=Stage(method="offload", params={"gpu_fraction": 0.25}))),
                             _setup(host_gib=3 * 0.75 * seq / 2**30))
    assert tiny_host.capacity_seqs == 3  # the profile's available RAM bounds it the same way
    # no timing unless the kernels run on the target itself (never a CPU timing for a GPU target)
    assert all(c.decode_latency_ms is None and c.transfer_ms is None for c in (full, half, kivi, off))
    timed = measure_cost(Stages.of(Pipeline(codec=Stage(method="int8"))), dataclasses.replace(setup, time_kernels=True))
    assert timed.decode_latency_ms > 0 and timed.decode_latency_full_ms > 0


def test_cost_sums_layers_that_differ():
    """Per-layer codecs (mixed) and per-layer budgets (PyramidKV) are priced layer by layer."""
    setup = _setup()
    full = measure_cost(Stages.of(Pipeline()), setup)
    kivi = measure_cost(Stages.of(Pipeline(codec=Stage(method="kivi", params={"bits": 4}))), setup)
    mixed = measure_cost(Stages.of(Pipeline(codec=Stage(
        method="mixed", params={"edge": "fp16", "middle": "kivi4", "edge_layers": 1}))), setup)
    # 4 layers: the first and the last uncompressed, the two in between KIVI-4
    assert mixed.bytes_per_token == pytest.approx((2 * full.bytes_per_token + 2 * kivi.bytes_per_token) / 4)
    snap = measure_cost(Stages.of(Pipeline(selection=Stage(method="snapkv", params={"budget": 0.25}))), setup)
    pyramid = measure_cost(Stages.of(Pipeline(selection=Stage(method="pyramidkv", params={"budget": 0.25}))), setup)
    assert pyramid.bytes_per_token == pytest.approx(snap.bytes_per_token)  # same total, redistributed
