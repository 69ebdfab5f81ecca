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
