"""Does the serving model predict what it claims? Predicted vs measured, on this machine.

1. **Decode step** — the CPU step model is fitted (:mod:`kvtune.measure.cpu_calibration`: batch 1 and 8 at 64
   tokens, one batch-4 x 1,024-token step per codec), then the real bundled model's decode step is measured
   through kvtune's cache for the full cache and int8 at batch 1, 4 and 16 and several context lengths, and
   compared with the step model's prediction. Target: median error <= 25%.
2. **Trace replay** — prefix-cache hit rates of the LRU replay (:func:`kvtune.measure.replay.simulate`) against
   an independent offline computation from LRU stack distances, at several tier sizes, on the bundled trace and
   (when ``../shared/traces`` is present) the full Mooncake conversation trace. Target: identical.
3. **On a GPU** (CUDA present): the serving model's KV-read time of a 32K-token decode step per codec against the
   kernels' measured time (kvtune.measure.kernels_cost), i.e. how far the calibration table's figures are off.

    python benchmarks/serving_model.py [--quick] [--out benchmarks/results/serving_model.json]

Prints tables and writes JSON. Timings are wall-clock medians on this machine (name in the output); another busy
process on the machine inflates both sides of a comparison but not alike, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvtune.measure import cpu_calibration as cc
from kvtune.measure.replay import Replay, stack_distance_hits
from kvtune.measure.serving import Candidate, ServingModel, WorkloadMix
from kvtune.measure.tiers import Tiers
from kvtune.models import load_model
from kvtune.pipeline import Pipeline, Stage
from kvtune.profile.hardware import probe_hardware
from kvtune.profile.workload import bundled_trace_path
from kvtune.strategies import Stages, codec_bytes_per_token

HERE = Path(__file__).resolve().parent
SHARED_TRACE = HERE.parent.parent / "shared" / "traces" / "mooncake-fast25-conversation.jsonl"
CODECS = {"fp16": ("fp16", {}), "int8": ("int8", {})}


def step_table(quick: bool) -> dict:
    loaded = load_model(None)
    spec = loaded.spec
    params = sum(p.numel() for p in loaded.model.parameters())
    t0 = time.perf_counter()
    fit = cc.calibrate(loaded.model, spec, source=loaded.source, params=params, weights_bytes=params * 4,
                       codecs=tuple(CODECS), use_cache=False, progress=lambda m: print(m, file=sys.stderr))
    calib_s = time.perf_counter() - t0
    device = fit.device("this machine")
    hw = probe_hardware(quick=True)
    tiers = Tiers.from_hardware(hw, params * 4)
    batches = (1, 4) if quick else (1, 4, 16)
    contexts = (256, 1024) if quick else (256, 1024, 2048)
    rows = []
    for key, (method, cparams) in CODECS.items():
        p = Pipeline(codec=Stage(method=method, params=cparams))
        bpt = codec_bytes_per_token(method, cparams, spec)
        cand = Candidate.of(Stages.of(p), p, bpt)
        for b in batches:
            for t in contexts:
                model = ServingModel(spec, params=params, weights_bytes=params * 4, device=device, tiers=tiers,
                                     mix=WorkloadMix(1, t, 1, t, float(t), "benchmark point", True), tpot_ms=None)
                pred = model.step(b, cand).total_ms
                meas = cc.decode_step_ms(loaded.model, spec, b, t, (method, cparams), repeats=3 if quick else 5)
                calib = (b, t) == (cc.KV_BATCH, cc.KV_TOKENS)
                rows.append({"codec": key, "batch": b, "context": t, "measured_ms": round(meas, 2),
                             "predicted_ms": round(pred, 2), "error": round(abs(pred - meas) / meas, 4),
                             "calibration_point": calib})
                print(f"  {key:5} B={b:<3} T={t:<5} measured {meas:8.1f} ms  predicted {pred:8.1f} ms  "
                      f"error {abs(pred - meas) / meas:6.1%}{'  (calibration point)' if calib else ''}", file=sys.stderr)
    held_out = [r["error"] for r in rows if not r["calibration_point"]]
    return {"machine": fit.machine, "calibration_seconds": round(calib_s, 1), "fit": {
                "copy_gbps": round(fit.copy_gbps, 2), "matmul_gflops": round(fit.matmul_gflops, 1),
                "fixed_ms": round(fit.fixed_ms, 2), "per_sequence_ms": round(fit.per_sequence_ms, 3),
                "kv_efficiency": {k: round(v, 4) for k, v in fit.kv_efficiency.items()}},
            "rows": rows, "median_error": round(statistics.median(r["error"] for r in rows), 4),
            "median_error_held_out": round(statistics.median(held_out), 4) if held_out else None,
            "max_error": round(max(r["error"] for r in rows), 4)}


def replay_table() -> dict:
    traces = [("bundled", bundled_trace_path())]
    if SHARED_TRACE.is_file():
        traces.append(("mooncake-conversation (full)", SHARED_TRACE))
    out = []
    for name, path in traces:
        replay = Replay.from_trace(path, name=name)
        for dev, low in ((0, 0), (100, 0), (1000, 0), (1000, 4000), (20000, 0), (5000, 50000)):
            t0 = time.perf_counter()
            got = replay.run(dev * replay.block_tokens, low * replay.block_tokens)
            sim_s = time.perf_counter() - t0
            want_dev, want_low = stack_distance_hits(replay.requests, dev, low)
            total = got.prompt_tokens
            out.append({"trace": name, "requests": got.requests, "device_blocks": dev, "lower_blocks": low,
                        "device_hit_rate": round(got.device_hit_rate, 5), "lower_hit_rate": round(got.lower_hit_rate, 5),
                        "offline_device_hit_rate": round(want_dev / total, 5),
                        "offline_lower_hit_rate": round(want_low / total, 5),
                        "identical": (got.device_hit_tokens, got.lower_hit_tokens) == (want_dev, want_low),
                        "replay_seconds": round(sim_s, 3)})
    return {"rows": out, "all_identical": all(r["identical"] for r in out)}


def gpu_table() -> dict | None:
    if not torch.cuda.is_available():
        return None
    from kvtune.measure.calibration import Calibration
    from kvtune.measure.kernels_cost import CostSetup, measure_cost
    from kvtune.measure.serving import Device
    from kvtune.modelspec import preset

    hw = probe_hardware(quick=True)
    spec = preset("llama-3.1-8b")
    tiers = Tiers.from_hardware(hw, spec.params * 2)
    device = Device.for_gpu(hw, Calibration())
    rows = []
    for label, p in (("fp16", Pipeline()), ("fp8", Pipeline(codec=Stage(method="fp8"))),
                     ("int8", Pipeline(codec=Stage(method="int8"))),
                     ("kivi-4", Pipeline(codec=Stage(method="kivi", params={"bits": 4}))),
                     ("kivi-2", Pipeline(codec=Stage(method="kivi", params={"bits": 2})))):
        setup = CostSetup(spec=spec, context_tokens=32768, tiers=tiers, device="cuda", time_kernels=True)
        cost = measure_cost(Stages.of(p), setup)
        model = ServingModel(spec, params=spec.params, weights_bytes=spec.params * 2, device=device, tiers=tiers,
                             mix=WorkloadMix(1, 32768, 1, 32768, 32768.0, "benchmark point", True), tpot_ms=None)
        pred = model.step(1, Candidate.of(Stages.of(p), p, cost.bytes_per_token)).kv_ms
        rows.append({"codec": label, "measured_attention_ms": cost.decode_latency_ms, "predicted_kv_ms": round(pred, 4),
                     "error": round(abs(pred - cost.decode_latency_ms) / cost.decode_latency_ms, 4)})
    return {"device": torch.cuda.get_device_name(), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points (for a smoke run)")
    ap.add_argument("--skip-step", action="store_true", help="replay only (no model load)")
    ap.add_argument("--out", default=str(HERE / "results" / "serving_model.json"))
    args = ap.parse_args()
    result = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads)", "torch": torch.__version__}
    if not args.skip_step:
        print("decode step: predicted vs measured (bundled SmolLM2-135M on this CPU)", file=sys.stderr)
        result["step"] = step_table(args.quick)
    result["replay"] = replay_table()
    result["gpu"] = gpu_table()
    if "step" in result:
        s = result["step"]
        print(f"\nDecode step, {s['machine']} (fit in {s['calibration_seconds']} s)")
        print("| codec | batch | context | measured ms | predicted ms | error |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in s["rows"]:
            mark = " (fit)" if r["calibration_point"] else ""
            print(f"| {r['codec']} | {r['batch']} | {r['context']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | "
                  f"{r['error']:.1%}{mark} |")
        print(f"median error {s['median_error']:.1%} (held-out points {s['median_error_held_out']:.1%}), "
              f"max {s['max_error']:.1%}; target <= 25% median")
    print("\nTrace replay: LRU simulation vs offline stack distances")
    print("| trace | device blocks | lower blocks | device hits | lower hits | offline device | offline lower | same |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in result["replay"]["rows"]:
        print(f"| {r['trace']} | {r['device_blocks']:,} | {r['lower_blocks']:,} | {r['device_hit_rate']:.2%} | "
              f"{r['lower_hit_rate']:.2%} | {r['offline_device_hit_rate']:.2%} | {r['offline_lower_hit_rate']:.2%} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    if result["gpu"] is None:
        print("\nGPU comparison: no CUDA device here (owed: run this script on the GPU)")
    else:
        print(f"\nKV read at 32K tokens, batch 1, on {result['gpu']['device']}")
        for r in result["gpu"]["rows"]:
            print(f"  {r['codec']:7} measured {r['measured_attention_ms']:.3f} ms, predicted {r['predicted_kv_ms']:.3f} ms, "
                  f"error {r['error']:.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    ok = result["replay"]["all_identical"] and ("step" not in result or result["step"]["median_error"] <= 0.25)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
