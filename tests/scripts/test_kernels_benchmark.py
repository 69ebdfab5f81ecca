"""benchmarks/kernels.py: the calibration-table writer (run in-process on tiny CPU shapes) and its rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("kvtune_bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibration_out_writes_a_loadable_table(tmp_path, capsys):
    bench = _bench()
    cal, out = tmp_path / "cal.yaml", tmp_path / "k.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--backend", "torch", "--dtype", "float16", "--contexts", "256",
                     "--batches", "1,2", "--reps", "1", "--warmup", "0", "--out", str(out), "--calibration-out", str(cal)])
    assert rc == 0
    doc = yaml.safe_load(cal.read_text())
    assert doc["schema_version"] == 1 and doc["hbm_copy_gbps"] > 0
    written = {e["codec"] for e in doc["entries"]}
    left = yaml.safe_load(out.read_text())["calibration"]["left_out"]
    assert len(written) + len(left) == 4  # fp16, fp8, kivi-4, kivi-2: each written or left out with a reason
    for e in doc["entries"]:
        assert "batch 2" in e["citation"]  # the largest batch measured
    from kvtune.measure.calibration import load_table

    assert len(load_table(cal).entries) == len(doc["entries"])


def test_efficiencies_outside_zero_one_are_left_out_with_the_reason():
    bench = _bench()
    rows = [dict(op="decode float16", codec="fp16", context=1024, batch=8, gbps=500.0),
            dict(op="decode fp8 e4m3", codec="fp8", context=1024, batch=8, gbps=2500.0),  # above the copy rate
            dict(op="decode KIVI int4", codec="kivi-4", context=1024, batch=1, gbps=100.0),  # another shape
            dict(op="gather", context=1024, batch=8, gbps=10.0)]  # not a decode row
    table, left = bench.calibration_table(rows, hardware="NVIDIA H200", copy_gbps=2000.0, at=(1024, 8), citation="c")
    assert table["hbm_copy_gbps"] == 2000.0
    assert [(e["codec"], e["efficiency"]) for e in table["entries"]] == [("fp16", 0.25)]
    assert table["entries"][0]["citation"] == "c, decode float16, 1K context, batch 8"
    assert len(left) == 1 and left[0].startswith("decode fp8 e4m3: efficiency 1.250 is outside (0, 1]")


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    assert _bench().main(["--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("kernels.py: error: --device tpu: expected auto, cpu, cuda or cuda:N")
