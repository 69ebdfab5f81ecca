"""The serving model: roofline against hand-computed cases, tier bounds, trace replay, provenance, regressions."""

from __future__ import annotations

import math

import pytest

from kvtune.measure.calibration import Calibration, codec_key
from kvtune.measure.figure import Figure, weakest
from kvtune.measure.replay import Replay, simulate, stack_distance_hits
from kvtune.measure.serving import Candidate, Device, ServingModel, WorkloadMix
from kvtune.measure.tiers import DISK_FRACTION, HOST_FRACTION, Tiers, exposed_copy_ms
from kvtune.modelspec import preset
from kvtune.pipeline import Pipeline, Stage
from kvtune.profile.hardware import reference_hardware
from kvtune.profile.readers.base import TraceRequest
from kvtune.profile.workload import bundled_trace_path
from kvtune.strategies import Stages, build

GiB = 2**30


def _h100(**host):
    hw = reference_hardware("h100-sxm", fill_host=False)
    fields = {"cpu_ram_total_bytes": 256 * GiB, "cpu_ram_available_bytes": 200 * GiB}
    fields.update(host)
    return hw.model_copy(update=fields)


def _device(**over) -> Device:
    """A made-up GPU with round figures, so every step time below can be computed by hand."""
    one = Figure(1.0, "assumed", "test")
    fields = dict(name="gpu", names=("gpu",), is_gpu=True, mem_gbps=Figure(1000.0, "assumed", "test"),
                  peak_flops=Figure(100e12, "assumed", "test"), weights_eff=one, overhead_ms=Figure(1.0, "assumed", "t"),
                  prefill_mfu=Figure(0.5, "assumed", "t"), decode_mfu=one, kv_eff={"fp16": one},
                  default_kv_eff=Figure(0.5, "assumed", "t"))
    fields.update(over)
    return Device(**fields)


def _mix(ctx: float = 1000.0) -> WorkloadMix:
    return WorkloadMix(requests=1, input_mean=ctx, output_mean=100.0, input_p50=int(ctx), decode_context=ctx,
                       basis="test", exact=True)


def _cand(pipeline: Pipeline, bpt: float) -> Candidate:
    return Candidate.of(Stages.of(pipeline), pipeline, bpt)


def _model(tiers: Tiers, *, params=1_000_000_000, weights=2_000_000_000, tpot=None, device=None, mix=None, replay=None):
    spec = preset("llama-3.1-8b")
    return ServingModel(spec, params=params, weights_bytes=weights, device=device or _device(), tiers=tiers,
                        mix=mix or _mix(), tpot_ms=tpot, replay=replay)


# ------------------------------------------------------------------------------------------------ roofline


def test_decode_step_matches_hand_computation():
    tiers = Tiers.from_hardware(_h100(), 2_000_000_000)
    m = _model(tiers)
    full = _cand(Pipeline(), 100_000.0)
    s = m.step(4, full)
    # weights 2 GB / 1000 GB/s = 2 ms; KV 4 seqs x 1000 tokens x 100 kB = 0.4 GB at 1000 GB/s x 1.0 = 0.4 ms
    # compute 4 x 2 x 1e9 / 100e12 = 0.08 ms < memory; + 1 ms overhead
    assert s.weights_ms == pytest.approx(2.0) and s.kv_ms == pytest.approx(0.4)
    assert s.compute_ms == pytest.approx(0.08) and s.total_ms == pytest.approx(3.4)
    kivi = _cand(Pipeline(codec=Stage(method="kivi", params={"bits": 4})), 25_000.0)  # default efficiency 0.5 here
    assert m.step(4, kivi).kv_ms == pytest.approx(0.1 / 0.5)


def test_compute_bound_step_and_cpu_style_addition():
    tiers = Tiers.from_hardware(_h100(), 2_000_000_000)
    full = _cand(Pipeline(), 100_000.0)
    m = _model(tiers)
    big = m.step(2000, full)  # compute 2000 x 2e9 / 1e14 = 40 ms > memory 2 + 200 ms? no: KV 200 ms dominates
    assert big.total_ms == pytest.approx(1.0 + 2.0 + 200.0)
    fat = _model(tiers, params=100_000_000_000)  # compute 2000 x 2e11 / 1e14 = 4000 ms dominates
    assert fat.step(2000, full).total_ms == pytest.approx(1.0 + 4000.0)
    cpu = _model(tiers, device=_device(compute_overlaps=False))
    assert cpu.step(4, full).total_ms == pytest.approx(1.0 + 2.0 + 0.4 + 0.08)


def test_offload_copy_is_exposed_only_beyond_the_step():
    hw = _h100()
    tiers = Tiers.from_hardware(hw, 2_000_000_000)
    m = _model(tiers)
    off = _cand(Pipeline(placement=Stage(method="offload", params={"gpu_fraction": 0.5})), 100_000.0)
    s = m.step(4, off)
    link = hw.host_link_theoretical_gbps  # datasheet profile: the theoretical link
    assert s.copy_ms == pytest.approx(0.2e9 / (link * 1e9) * 1e3)  # half of 0.4 GB
    assert s.exposed_ms == pytest.approx(max(0.0, s.copy_ms - (s.weights_ms + s.kv_ms)))
    assert exposed_copy_ms(5.0, 3.0) == 2.0 and exposed_copy_ms(1.0, 3.0) == 0.0


def test_prefill_flops_over_peak():
    tiers = Tiers.from_hardware(_h100(), 2_000_000_000)
    m = _model(tiers)
    s = m.spec
    n = 4096
    flops = 2 * 1e9 * n + 2 * s.layers * s.q_heads * s.head_dim * n * n
    assert m.prefill_ms(n, _cand(Pipeline(), 1.0)) == pytest.approx(flops / (100e12 * 0.5) * 1e3)
    sums = Pipeline(selection=Stage(method="h2o", params={"budget": 0.5}))
    assert m.prefill_ms(n, _cand(sums, 1.0)) > m.prefill_ms(n, _cand(Pipeline(), 1.0))


def test_batch_at_target_is_the_largest_meeting_it():
    tiers = Tiers.from_hardware(_h100(), 2_000_000_000)
    m = _model(tiers, tpot=10.0)
    full = _cand(Pipeline(), 100_000.0)
    b = m.batch_at_target(full, 10_000)
    assert m.step(b, full).total_ms <= 10.0 < m.step(b + 1, full).total_ms  # (10 - 3) / 0.1 = 70
    assert b == 70
    assert _model(tiers, tpot=2.5).batch_at_target(full, 100) == 0  # 3.1 ms at batch 1


def test_llama_8b_on_h100_full_cache_is_physically_plausible():
    """The issue's yardstick: weights 16 GB / HBM 3.35 TB/s ~ 5 ms at batch 1, not CPU seconds."""
    hw = _h100()
    spec = preset("llama-3.1-8b")
    weights = spec.params * 2
    tiers = Tiers.from_hardware(hw, weights)
    dev = Device.for_gpu(hw, Calibration(user_folder=None))
    m = ServingModel(spec, params=spec.params, weights_bytes=weights, device=dev, tiers=tiers, mix=_mix(8735),
                     tpot_ms=50.0)
    full = _cand(Pipeline(), spec.kv_bytes_per_token())
    one = m.step(1, full).total_ms
    assert 4.8 < one < 9.0
    res = m.evaluate(full)
    assert res.batch >= 1 and res.tpot_ms <= 50.0 and res.tokens_per_s > 0
    assert res.provenance["tpot_ms"].startswith("assumed")  # datasheet + seed calibration


# ------------------------------------------------------------------------------------------------ tiers


def test_tiers_are_bounded_by_the_profile():
    hw = _h100(disk_free_bytes=100 * GiB, disk_read_gbps=3.0, offload_dir="/x")
    tiers = Tiers.from_hardware(hw, 16 * GiB)
    assert tiers.device.capacity.value == int(hw.gpu_memory_total_bytes * 0.9) - 16 * GiB
    assert tiers.host.capacity.value == int(200 * GiB * HOST_FRACTION)
    assert tiers.disk.capacity.value == int(100 * GiB * DISK_FRACTION)
    assert tiers.disk.read_gbps.value == 3.0 and tiers.disk.read_gbps.source == "measured"
    disk = build("placement", "offload", {"tier": "disk", "gpu_fraction": 0.5})
    assert "disk tier" in tiers.check(disk, 1 * GiB, 95 * GiB)
    assert tiers.check(disk, 1 * GiB, 80 * GiB) is None
    capped = build("placement", "offload", {"tier": "cpu", "gpu_fraction": 0.5, "host_bytes": 4 * GiB})
    assert tiers.lower_capacity(capped) == 4 * GiB and "host tier" in tiers.check(capped, 1 * GiB, 5 * GiB)


def test_unmeasured_disk_is_no_tier_at_all():
    """Regression: the disk tier's capacity was never bounded."""
    tiers = Tiers.from_hardware(_h100(), 16 * GiB)  # a datasheet profile measures no disk
    disk = build("placement", "offload", {"tier": "disk", "gpu_fraction": 0.5})
    assert not tiers.disk.available
    assert "free disk not measured" in tiers.check(disk, 1 * GiB, 1)


def test_measured_disk_rate_is_not_overridden():
    """Regression: the 7 GB/s class default silently replaced the profile's measured disk rate."""
    assert "disk_gbps" not in build("placement", "offload", {}).param_names()
    cpu_host = _h100(accelerator=None, gpu_memory_total_bytes=None, disk_free_bytes=50 * GiB, disk_read_gbps=1.6,
                     source="this-machine")
    tiers = Tiers.from_hardware(cpu_host, 1 * GiB)
    off = build("placement", "offload", {"tier": "cpu", "gpu_fraction": 0.5})
    assert tiers.lower(off) is tiers.disk  # no accelerator: below host RAM is the disk
    assert tiers.disk.read_gbps.value == 1.6


def test_offload_is_priced_against_the_target_step_not_a_cpu_timing():
    """Regression: a PCIe copy was judged hidden behind the CPU's attention time. On an H100 the copy of 30% of
    Llama-3.1-8B's KV over PCIe (about 5 ms per sequence) hides behind the weights at batch 1 only; at batch 8
    it is far longer than the step it would hide behind."""
    hw = _h100()
    spec = preset("llama-3.1-8b")
    weights = spec.params * 2
    m = ServingModel(spec, params=spec.params, weights_bytes=weights, device=Device.for_gpu(hw, Calibration(user_folder=None)),
                     tiers=Tiers.from_hardware(hw, weights), mix=_mix(8735), tpot_ms=50.0)
    off = _cand(Pipeline(placement=Stage(method="offload", params={"gpu_fraction": 0.7})), spec.kv_bytes_per_token())
    one, eight = m.step(1, off), m.step(8, off)
    assert one.copy_ms == pytest.approx(8735 * spec.kv_bytes_per_token() * 0.3 / 63.015e9 * 1e3)
    assert one.exposed_ms == 0.0  # the weights read (5.6 ms) covers one sequence's copy
    assert eight.copy_ms > 2 * (eight.weights_ms + eight.kv_ms) and eight.exposed_ms > eight.busy_ms
    full = m.evaluate(_cand(Pipeline(), spec.kv_bytes_per_token()))
    assert m.evaluate(off).tokens_per_s < full.tokens_per_s


# ------------------------------------------------------------------------------------------------ replay


def _req(blocks, tokens=None, bt=4):
    return TraceRequest(timestamp_s=None, input_tokens=tokens or len(blocks) * bt, output_tokens=1,
                        blocks=tuple(blocks), block_tokens=bt)


def test_replay_no_reuse_is_zero():
    reqs = [_req([i * 10 + j for j in range(3)]) for i in range(50)]
    r = simulate(reqs, 1000, 1000)
    assert r.device_hit_tokens == r.lower_hit_tokens == 0 and r.prompt_tokens == 50 * 12


def test_replay_known_answers():
    # a conversation: turn 2 extends turn 1's prefix, turn 3 extends turn 2's
    reqs = [_req([1, 2]), _req([1, 2, 3]), _req([1, 2, 3, 4])]
    r = simulate(reqs, 100, 0)
    assert r.device_hit_tokens == 8 + 12 and r.prompt_tokens == 8 + 12 + 16
    # a device tier of 2 blocks: turn 2 finds 1, 2; after it the cache holds 1, 2 (3 evicted, tail first)
    r = simulate(reqs, 2, 0)
    assert r.device_hit_tokens == 8 + 8
    # with a lower tier the evicted tail block waits below and is found there
    r = simulate(reqs, 2, 10)
    assert (r.device_hit_tokens, r.lower_hit_tokens) == (16, 4)


def test_replay_partial_last_block_counts_only_its_tokens():
    reqs = [_req([7, 8], tokens=6), _req([7, 8], tokens=6)]  # 4 + 2 tokens
    assert simulate(reqs, 10, 0).device_hit_tokens == 6


@pytest.mark.parametrize("dev,low", [(0, 0), (50, 0), (400, 0), (100, 300), (2000, 5000)])
def test_replay_equals_stack_distances_on_the_bundled_trace(dev, low):
    replay = Replay.from_trace(bundled_trace_path())
    got = replay.run(dev * 512, low * 512)
    want = stack_distance_hits(replay.requests, dev, low)
    assert (got.device_hit_tokens, got.lower_hit_tokens) == want


def test_workload_mix_weights_context_by_output_length():
    mix = WorkloadMix.from_requests([(1000, 100), (3000, 300)], "t")
    assert mix.decode_context == pytest.approx((100 * 1050 + 300 * 3150) / 400)
    assert mix.input_p50 == 1000 and mix.output_mean == 200


# ------------------------------------------------------------------------------------------------ provenance


def test_every_figure_has_a_provenance_label():
    hw = _h100()
    spec = preset("llama-3.1-8b")
    weights = spec.params * 2
    replay = Replay([_req([1, 2]), _req([1, 2, 3])], "t")
    m = ServingModel(spec, params=spec.params, weights_bytes=weights, device=Device.for_gpu(hw, Calibration(user_folder=None)),
                     tiers=Tiers.from_hardware(hw, weights), mix=_mix(), tpot_ms=50.0, replay=replay)
    res = m.evaluate(_cand(Pipeline(), spec.kv_bytes_per_token()))
    for key in ("bytes_per_token", "max_batch", "tpot_ms", "ttft_ms", "tokens_per_s", "hit_rates", "decode_context"):
        assert res.provenance[key].split(":")[0] in ("measured", "calibrated", "assumed"), key
    assert res.provenance["max_batch"].startswith("assumed")  # datasheet GPU memory
    assert weakest("measured", "calibrated") == "calibrated" and weakest("measured", "assumed", "calibrated") == "assumed"
    with pytest.raises(ValueError):
        Figure(1.0, "guessed", "x")


def test_calibration_lookup_prefers_specific_and_measured(tmp_path):
    f = tmp_path / "h200.yaml"
    f.write_text("schema_version: 1\nentries:\n- {hardware: 'NVIDIA H200', op: decode_attention, codec: kivi-4, "
                 "efficiency: 0.8, source: measured, citation: bench}\n")
    cal = Calibration([f], user_folder=None)
    assert cal.factor("decode_attention", ("h200", "NVIDIA H200"), "kivi-4").source == "measured"
    assert cal.factor("decode_attention", ("h100-sxm", "NVIDIA H100"), "kivi-4").source == "assumed"
    assert codec_key("kivi", {"bits": 2}) == "kivi-2" and codec_key("mixed", {"middle": "kivi4"}) == "kivi-4"
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nentries:\n- {hardware: x, op: decode_attention, codec: fp16, efficiency: 7, "
                   "source: measured, citation: c}\n")
    from kvtune.errors import UserError

    with pytest.raises(UserError, match="not a kvtune calibration table"):
        Calibration([bad], user_folder=None)


def test_tokens_per_s_counts_prefill_of_missed_prompt_tokens():
    tiers = Tiers.from_hardware(_h100(), 2_000_000_000)
    m = _model(tiers, tpot=10.0)
    full = _cand(Pipeline(), 100_000.0)
    res = m.evaluate(full)
    step = m.step(res.batch, full).total_ms
    per_req = m.prefill_ms(1000.0, full) + 100.0 * step / res.batch
    assert res.tokens_per_s == pytest.approx(100.0 / per_req * 1e3, rel=1e-3)
    assert math.isclose(res.prompt_recomputed, 1.0)


def test_batch_leaves_room_for_the_prefix_cache_when_that_pays():
    """Multi-turn traffic with long shared prefixes: running fewer sequences keeps the conversations' earlier
    turns cached, which saves more prefill than the extra sequences would decode."""
    hw = _h100(gpu_memory_total_bytes=int(24 * GiB / 0.9))  # a 24 GiB pool before weights
    tiers = Tiers.from_hardware(hw, 2 * GiB)
    convs = [[_req([c * 1000 + j for j in range(t + 1)], bt=512) for t in range(8)] for c in range(30)]
    trace = [r for turn in range(8) for c in range(30) for r in [convs[c][turn]]]
    replay = Replay(trace, "synthetic")
    mix = WorkloadMix.from_requests(replay.mix(), "synthetic")
    m = _model(tiers, tpot=1000.0, mix=mix, replay=replay)
    full = _cand(Pipeline(), 100_000.0)
    limit, _ = m.max_batch(full)
    res = m.evaluate(full)
    at_max = m._at_batch(limit, full)
    assert res.batch < limit and res.tokens_per_s > at_max["tokens_s"]
    assert res.hit_rate_device > at_max["hit_dev"]


def test_spill_and_recall_holds_every_token_on_the_host_and_pays_the_recall():
    """spill_recall: the GPU holds the resident pages, the host a copy of every token; the host tier bounds the
    batch and each new turn recalls the resident set over the link."""
    hw = _h100(cpu_ram_available_bytes=int(10 * GiB / HOST_FRACTION) + 1)  # a 10 GiB host tier
    tiers = Tiers.from_hardware(hw, 2_000_000_000)
    m = _model(tiers, tpot=1000.0)
    p = Pipeline(selection=Stage(method="spill_recall", params={"budget": 0.25, "host_codec": "fp16"}))
    stages = Stages.of(p)
    spill = Candidate.of(stages, p, 25_000.0, 100_000.0)
    limit, bound = m.max_batch(spill)
    assert bound.startswith("host tier") and limit == int(10 * GiB // (1000 * 100_000.0))
    plain = Candidate.of(stages, p, 25_000.0)
    assert m._at_batch(4, spill)["ttft"] > m._at_batch(4, plain)["ttft"]  # the recall over PCIe
    cpu_only = Tiers.from_hardware(_h100(accelerator=None, gpu_memory_total_bytes=None, source="this-machine"), 0)
    n, why = cpu_only.sequences(stages.placement, 1000 * 25_000.0, 1000 * 100_000.0)
    assert why == "device pool" and n == int(cpu_only.device.capacity.value // (1000 * 125_000.0))
