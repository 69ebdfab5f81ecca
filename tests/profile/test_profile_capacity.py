"""Capacity planning: KV bytes per codec (from kvtune.strategies) and concurrent sequences in the budget."""

import pytest

from kvtune.modelspec import preset
from kvtune.profile import reference_hardware
from kvtune.profile.models import CODEC_CANDIDATES, capacity_table, codec_bytes, max_single_sequence, model_record
from kvtune.profile.schema import HistogramBucket, LengthStats, WorkloadProfile

GiB = 1 << 30


def stats(values):
    s = sorted(values)
    n = len(s)
    pick = lambda q: s[max(1, -(-q * n // 100)) - 1]  # noqa: E731 - nearest rank
    hist = {}
    for v in s:
        b = v.bit_length()
        hist[b] = hist.get(b, 0) + 1
    return LengthStats(count=n, mean=sum(s) / n, min=s[0], p50=pick(50), p90=pick(90), p99=pick(99), max=s[-1],
                       histogram=[HistogramBucket(lo=1 << (b - 1), hi=1 << b, count=c) for b, c in sorted(hist.items())])


def workload(totals):
    st = stats(totals)
    return WorkloadProfile(name="w", source="test", format="generic", requests=st.count, input_tokens=st,
                           output_tokens=stats([1] * st.count), total_tokens=st)


def test_codec_bytes_for_llama_8b():
    spec = preset("llama-3.1-8b")
    by = {label: codec_bytes(m, p, spec) for label, m, p in CODEC_CANDIDATES}
    assert by["fp16"] == by["bf16"] == 128 * 1024
    assert by["fp8-e4m3/head"] == pytest.approx(64 * 1024, rel=0.01)
    assert by["int8/g64"] == pytest.approx(64 * 1024 * (1 + 4 / 64), rel=0.01)  # scale + zero per 64 channels
    assert by["kivi-2b/g32"] < by["kivi-4b/g32"] < by["fp8-e4m3/head"]


def test_capacity_numbers_on_h100_for_llama_8b():
    spec = preset("llama-3.1-8b")
    hw = reference_hardware("h100-sxm")
    w = workload([1000, 2000, 3000, 4000])
    t = capacity_table(spec, hw, w)
    budget = int(80 * GiB * 0.9) - 8_030_000_000 * 2
    assert t.kv_budget_bytes == budget and t.budget_basis == "gpu" and t.weights_bytes == 16_060_000_000
    fp16 = t.rows[0]
    assert fp16.codec == "fp16" and fp16.bytes_per_sequence_mean == pytest.approx(131072 * 2500)
    assert fp16.sequences_at_mean == budget // (131072 * 2500)
    assert fp16.sequences_at_p50 == budget // (131072 * 2000)
    assert fp16.sequences_at_p99 == budget // (131072 * 4000)
    assert fp16.max_tokens_one_sequence == budget // 131072
    kivi2 = t.rows[-1]
    assert kivi2.sequences_at_mean > 4 * fp16.sequences_at_mean


def test_capacity_weights_do_not_fit():
    t = capacity_table(preset("llama-3.1-405b"), reference_hardware("h100-sxm"), workload([1000]))
    assert t.kv_budget_bytes == 0 and all(r.sequences_at_mean == 0 for r in t.rows)
    assert any("weights alone exceed" in n for n in t.notes)


def test_capacity_mla_halves_the_codec_figure():
    ds = preset("deepseek-v3")
    assert codec_bytes("bf16", {}, ds) == pytest.approx(ds.kv_bytes_per_token())
    rec = model_record(ds)
    assert rec.kv_lora_rank == 512 and rec.kv_bytes_per_token == 70_272


def test_capacity_sliding_window_model():
    g = preset("gemma-2-9b")
    rate = g.kv_bytes_per_token()
    budget = 10 * GiB
    n = max_single_sequence(g, rate, budget)
    assert g.kv_bytes_at(n, rate) <= budget < g.kv_bytes_at(n + 2, rate)
    assert max_single_sequence(g, rate, 1000 * rate) == 1000  # below the window every layer grows
    t = capacity_table(g, reference_hardware("l40s"), workload([100_000] * 4))
    dense = t.kv_budget_bytes // (rate * 100_000)
    assert t.rows[0].sequences_at_mean > 1.5 * dense  # half the layers stop at 4,096 tokens


def test_capacity_cpu_only_budget_is_ram():
    from kvtune.profile.schema import HardwareProfile

    box = HardwareProfile(name="box", source="this-machine", cpu_ram_total_bytes=64 * GiB,
                          cpu_ram_available_bytes=32 * GiB)
    t = capacity_table(preset("smollm2-135m"), box, workload([512]))
    assert t.budget_basis == "cpu-ram" and t.kv_budget_bytes == int(32 * GiB * 0.9) - 134_500_000 * 2
