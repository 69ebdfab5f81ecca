"""The profile document: YAML round trip, one-line errors, reference profiles, budget arithmetic."""

import pytest
import yaml

from kvtune.errors import UserError
from kvtune.io import atomic_write_text
from kvtune.profile import (
    HardwareProfile, Profile, default_workload, dump_profile, list_reference_hardware, load_profile,
    reference_hardware,
)
from kvtune.profile.schema import now_iso

GiB = 1 << 30
REFERENCE = ["a100-80gb", "gh200", "h100-pcie", "h100-sxm", "h200", "l4", "l40s", "rtx-4090"]


def cpu_only(**kw):
    base = dict(name="box", source="this-machine", cpu_ram_total_bytes=64 * GiB, cpu_ram_available_bytes=40 * GiB)
    return HardwareProfile(**{**base, **kw})


def full_profile():
    return Profile(kvtune_version="0.1.0", created=now_iso(), hardware=reference_hardware("h100-sxm"),
                   workload=default_workload())


def test_yaml_round_trip(tmp_path):
    p = full_profile()
    path = atomic_write_text(tmp_path / "p.yaml", dump_profile(p))
    back = load_profile(path)
    assert back == p
    assert dump_profile(back) == dump_profile(p)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(schema_version=2), "schema_version 2 is newer"),
    (lambda d: d["hardware"].update(colour="red"), "field hardware.colour: Extra inputs are not permitted"),
    (lambda d: d["hardware"].update(cpu_ram_total_bytes="lots"), "field hardware.cpu_ram_total_bytes"),
    (lambda d: d.pop("hardware"), "no 'hardware' section"),
    (lambda d: d["workload"]["input_tokens"].pop("p99"), "field workload.input_tokens.p99: Field required"),
])
def test_load_profile_errors_are_one_line(tmp_path, mutate, message):
    data = full_profile().model_dump(mode="json")
    mutate(data)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        load_profile(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_profile_missing_and_malformed(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_profile(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("hardware: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_profile(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_profile(tmp_path / "list.yaml")


def test_reference_profiles_ship_with_sources():
    assert list_reference_hardware() == REFERENCE
    for name in REFERENCE:
        hp = reference_hardware(name)
        assert hp.source == "datasheet" and hp.accelerator
        for field in ("gpu_memory_total_bytes", "hbm_bandwidth_gbps", "host_link_theoretical_gbps", "sm_count",
                      "compute_capability"):
            assert getattr(hp, field), (name, field)
            assert "datasheet" in hp.sources[field] or "whitepaper" in hp.sources[field] or "cuda-gpus" in \
                hp.sources[field], (name, field)
        assert hp.cpu_ram_total_bytes > 0  # filled from this machine (or the Grace datasheet for GH200)
    assert reference_hardware("H100-SXM").hbm_bandwidth_gbps == 3350
    assert reference_hardware("h200").gpu_memory_total_bytes == 141 * GiB
    assert reference_hardware("gh200").host_link == "NVLink-C2C"


def test_unknown_reference_lists_known_names():
    with pytest.raises(UserError, match="unknown hardware 'b200' \\(known: a100-80gb, gh200"):
        reference_hardware("b200")


def test_kv_memory_budget_and_host_link():
    h100 = reference_hardware("h100-sxm")
    assert h100.kv_memory_budget(16 * 10**9) == int(80 * GiB * 0.9) - 16 * 10**9
    assert h100.kv_memory_budget(10**12) == 0
    assert h100.kv_memory_budget(0, memory_fraction=0.5) == 40 * GiB
    assert h100.host_link_gbps() == pytest.approx(63.015)  # datasheet: the link's theoretical rate
    box = cpu_only()
    assert box.kv_memory_budget(4 * GiB) == int(40 * GiB * 0.9) - 4 * GiB
    assert box.host_link_gbps() is None
    assert cpu_only(source="measured", gpu_memory_total_bytes=24 * GiB, h2d_pinned_gbps=24.5).host_link_gbps() == 24.5
    with pytest.raises(UserError, match="memory fraction"):
        box.kv_memory_budget(0, memory_fraction=1.5)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["hardware"].update(hbm_bandwidth_gbps=float("inf")), "field hardware.hbm_bandwidth_gbps: Input should be a finite number"),
    (lambda d: d["hardware"].update(hbm_bandwidth_gbps=float("nan")), "field hardware.hbm_bandwidth_gbps: Input should be a finite number"),
    (lambda d: d["hardware"].update(hbm_bandwidth_gbps=0.0), "field hardware.hbm_bandwidth_gbps: Input should be greater than 0"),
    (lambda d: d["hardware"].update(peak_bf16_tflops=-1.0), "field hardware.peak_bf16_tflops: Input should be greater than 0"),
    (lambda d: d["hardware"].update(cpu_matmul_gflops=1e300), "field hardware.cpu_matmul_gflops: Input should be less than"),
    (lambda d: d["hardware"].update(gpu_memory_total_bytes=-5), "field hardware.gpu_memory_total_bytes: Input should be greater than or equal to 0"),
    (lambda d: d["hardware"].update(cpu_ram_total_bytes=1 << 70), "field hardware.cpu_ram_total_bytes: Input should be less than"),
    (lambda d: d["hardware"].update(sm_count=1.5), "field hardware.sm_count: Input should be a valid integer"),
    (lambda d: d["hardware"].update(schema_version=0), "field hardware.schema_version: Input should be greater than or equal to 1"),
    (lambda d: d["workload"].update(arrival_rate_per_s=0.0), "field workload.arrival_rate_per_s: Input should be greater than 0"),
    (lambda d: d["workload"].update(prefix_reuse_ratio=1.5), "field workload.prefix_reuse_ratio: Input should be less than or equal to 1"),
    (lambda d: d["workload"].update(time_span_s=-1.0), "field workload.time_span_s: Input should be greater than or equal to 0"),
    (lambda d: d["workload"].update(requests=0), "field workload.requests: Input should be greater than or equal to 1"),
    (lambda d: d["workload"]["input_tokens"].update(p50=10**9), "field workload.input_tokens: Value error, statistics out of order"),
    (lambda d: d["workload"]["input_tokens"].update(mean=-1.0), "field workload.input_tokens.mean: Input should be greater"),
    (lambda d: d["workload"]["input_tokens"]["histogram"][0].update(count=10**6), "histogram counts sum to"),
    (lambda d: d["workload"]["input_tokens"]["histogram"][0].update(hi=0), "is empty (hi must be above lo)"),
    (lambda d: d["hardware"].update({"colour\x1b[31m": 1}), "field hardware.colour\\x1b[31m: Extra inputs"),
])
def test_numbers_are_finite_and_in_range(tmp_path, mutate, message):
    data = full_profile().model_dump(mode="json")
    data["hardware"].update(cpu_matmul_gflops=50.0)
    mutate(data)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        load_profile(path)
    text = str(info.value)
    assert message in text and "\n" not in text and "\x1b" not in text, text


def test_every_reference_profile_satisfies_the_constraints():
    for name in REFERENCE:
        hw = reference_hardware(name)
        assert hw.hbm_bandwidth_gbps > 0 and hw.peak_bf16_tflops > 0  # what the serving model divides by
        HardwareProfile.model_validate(hw.model_dump(mode="json"))  # round trip through the constraints
