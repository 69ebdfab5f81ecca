"""Time every kvtune kernel at Llama-3.1-8B shapes: bandwidth, fraction of copy bandwidth, speedup over SDPA.

    python benchmarks/kernels.py [--quick] [--contexts 32768 --batches 1,8] [--reps N --warmup N]
                                 [--device auto|cpu|cuda[:N]]
                                 [--backend auto|torch|triton] [--dtype float16|bfloat16|float32] [--tiny]
                                 [--out results.json] [--calibration-out calibration.yaml]

Shapes (full run): 32 query heads, 8 KV heads, head dim 128 (one layer: decode attention runs per layer),
contexts 4K/32K/128K, batch 1/8/32; ``--contexts``/``--batches`` pick others, ``--quick`` small ones that
finish on a laptop CPU, ``--tiny`` a small head shape (8/2/64) for plumbing checks. Timing is
:mod:`kvtune.measure.timing`: ``triton.testing.do_bench`` medians (CUDA events, L2 flushed) on a GPU,
``perf_counter`` medians on a CPU. Once per run the script measures the device's copy bandwidth (a 1 GiB
device-to-device copy on a GPU, bytes read + written); every op's bandwidth (bytes it must move / time) is reported
as a fraction of it, and every decode attention as a speedup over ``scaled_dot_product_attention`` in the same
dtype on the same shapes. The offload row times one layer's host-to-device copy from pinned memory, and how much of
it the layer prefetcher hides behind decode attention (4 layers, double-buffered; on a GPU only). Combinations
whose tensors would not fit in the device's free memory are skipped and listed as such.

``--calibration-out FILE`` writes the measured decode-attention efficiencies (stored KV bytes read per step /
median time / measured copy bandwidth) in the calibration-table format that :mod:`kvtune.measure.calibration`
reads, at the largest context and batch measured (``--calibration-at CONTEXT,BATCH`` picks another), with the copy
bandwidth as ``hbm_copy_gbps``. On a CPU the file is written too (labelled with the CPU and the backend) so the
writer can be tested; such entries describe no GPU.

The table goes to stdout, progress to stderr, JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

from kvtune.errors import UserError
from kvtune.io import atomic_write_text, dump_yaml
from kvtune.kernels import backend as kb
from kvtune.kernels.compaction import gather_tokens
from kvtune.kernels.decode_attention import decode_attention, decode_attention_fp8, decode_attention_int
from kvtune.kernels.offload import pinned_empty
from kvtune.kernels.quant import dequantize_int, quantize_fp8, quantize_int
from kvtune.measure.timing import prefetch_overlap_ms, time_ms, timer_label
from kvtune.models import parse_device

MODEL = dict(q_heads=32, kv_heads=8, head_dim=128)  # Llama-3.1-8B attention heads
TINY = dict(q_heads=8, kv_heads=2, head_dim=64)
FULL = dict(contexts=[4096, 32768, 131072], batches=[1, 8, 32], reps=50, warmup=10)
QUICK = dict(contexts=[512, 1024], batches=[1, 4], reps=5, warmup=1)
KIVI_GROUP = 32  # keys: groups of 32 tokens per channel
KIVI_RESIDUAL = 128  # most recent tokens kept in the model dtype
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DENSE_CODEC = {torch.float16: "fp16", torch.bfloat16: "bf16"}  # calibration codec names of the dense rows


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:
        return 8 << 30


def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    """Device copy bandwidth counting bytes read plus bytes written (the copy moves each byte twice); always
    warmed up (the first copy also faults the destination's pages in)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=max(3, reps), warmup=2)
    return 2 * nbytes / (ms / 1e3) / 1e9


def bench_shape(b: int, t: int, device, dt, shape, measure, backend, copy_gbps) -> list:
    hq, hkv, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, hq, d, generator=g).to(device, dt)
    k = torch.randn(b, hkv, t, d, generator=g).to(device, dt)
    v = torch.randn(b, hkv, t, d, generator=g).to(device, dt)
    el = k.element_size()
    kv_bytes = 2 * k.numel() * el
    name = str(dt)[6:]
    rows = []

    def add(op, secs, nbytes, **extra):
        rows.append(dict(op=op, batch=b, context=t, ms=secs * 1e3, bytes=nbytes, gbps=nbytes / secs / 1e9,
                         copy_fraction=nbytes / secs / 1e9 / copy_gbps, **extra))

    q4 = q[:, :, None, :]  # (B, Hq, 1, D)
    t_sdpa = measure(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    add(f"SDPA {name} (baseline)", t_sdpa, kv_bytes)

    t_dense = measure(lambda: decode_attention(q, k, v, backend=backend))
    add(f"decode {name}", t_dense, kv_bytes, speedup=t_sdpa / t_dense, codec=DENSE_CODEC.get(dt))
    if device.type == "cuda" and dt == torch.float16:  # the bf16 path (tensor-core dots in bf16) as well
        qb, kb16, vb16 = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
        t_bf = measure(lambda: decode_attention(qb, kb16, vb16, backend=backend))
        add("decode bfloat16", t_bf, kv_bytes, speedup=t_sdpa / t_bf, codec="bf16")
        del qb, kb16, vb16

    kf, vf = quantize_fp8(k, "e4m3", "token", backend=backend), quantize_fp8(v, "e4m3", "token", backend=backend)
    t_fp8 = measure(lambda: decode_attention_fp8(q, kf, vf, backend=backend))
    add("decode fp8 e4m3", t_fp8, kf.nbytes() + vf.nbytes(), speedup=t_sdpa / t_fp8, codec="fp8")

    tq = (t - KIVI_RESIDUAL) // KIVI_GROUP * KIVI_GROUP
    if tq > 0:
        for bits in (4, 2):
            kq = quantize_int(k[:, :, :tq].contiguous(), bits, KIVI_GROUP, "token", backend=backend)
            vq = quantize_int(v[:, :, :tq].contiguous(), bits, d, "channel", backend=backend)
            kr, vr = k[:, :, tq:], v[:, :, tq:]
            ti = measure(lambda: decode_attention_int(q, kq, vq, kr, vr, backend=backend))  # noqa: B023
            nb = kq.nbytes() + vq.nbytes() + 2 * kr.numel() * el
            add(f"decode KIVI int{bits}", ti, nb, speedup=t_sdpa / ti, codec=f"kivi-{bits}")
            del kq, vq

    tk = t // KIVI_GROUP * KIVI_GROUP
    kk = k[:, :, :tk].contiguous()
    tquant = measure(lambda: quantize_int(kk, 4, KIVI_GROUP, "token", backend=backend))
    kq = quantize_int(kk, 4, KIVI_GROUP, "token", backend=backend)
    add("quantize int4 (K)", tquant, kk.numel() * el + kq.nbytes())
    tdq = measure(lambda: dequantize_int(kq, backend=backend))
    add("dequantize int4 (K)", tdq, kk.numel() * el + kq.nbytes())
    tf8 = measure(lambda: quantize_fp8(k, "e4m3", "token", backend=backend))
    add("quantize fp8 (K)", tf8, k.numel() * el + kf.nbytes() // 2)

    keep = torch.stack([torch.randperm(t, generator=g)[: t // 2] for _ in range(b * hkv)]).reshape(b, hkv, t // 2).to(device)
    tg = measure(lambda: gather_tokens(k, keep, backend=backend))
    add("gather 50% tokens (K)", tg, 2 * k.numel() * el // 2)
    return rows


def bench_offload(b: int, t: int, device, dt, shape, reps: int, warmup: int, backend) -> dict:
    """Host->device transfer of one layer's K+V from pinned memory, and how much of it the layer prefetcher hides
    behind one layer's decode attention (4 layers, double-buffered): :func:`kvtune.measure.timing.prefetch_overlap_ms`."""
    hq, hkv, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    n_layers = 4
    layers = []
    for _ in range(n_layers):
        k, v = pinned_empty((b, hkv, t, d), dt), pinned_empty((b, hkv, t, d), dt)
        k.normal_(), v.normal_()
        layers.append([k, v])
    q = torch.randn(b, hq, d, device=device, dtype=dt)
    r = prefetch_overlap_ms(layers, lambda kv: decode_attention(q, kv[0], kv[1], backend=backend), device,
                            repeats=max(reps, 1), warmup=warmup)
    nbytes = r["layer_bytes"]
    return dict(op="offload H2D (K+V, pinned)", batch=b, context=t, ms=r["transfer_ms"] / n_layers, bytes=nbytes,
                gbps=nbytes * n_layers / (r["transfer_ms"] / 1e3) / 1e9, transfer_ms=r["transfer_ms"],
                compute_ms=r["compute_ms"], overlapped_ms=r["overlapped_ms"], exposed_ms=r["exposed_ms"],
                hidden_fraction=r["hidden_fraction"])


def calibration_table(rows, *, hardware: str, copy_gbps: float, at: tuple[int, int], citation: str) -> tuple[dict, list]:
    """The calibration document (see the module docstring) and the rows left out, with why."""
    ctx, batch = at
    entries, left_out = [], []
    for r in rows:
        if r.get("codec") is None or (r["context"], r["batch"]) != (ctx, batch):
            continue
        eff = r["gbps"] / copy_gbps
        if not 0.0 < eff <= 1.0:
            left_out.append(f"{r['op']}: efficiency {eff:.3f} is outside (0, 1]: the working set did not come from "
                            "device memory at the copy's rate (cache-resident or too small a shape)")
            continue
        entries.append(dict(hardware=hardware, op="decode_attention", codec=r["codec"], efficiency=float(f"{eff:.3g}"),
                            source="measured", citation=f"{citation}, {r['op']}, {ctx // 1024 if ctx >= 1024 else ctx}"
                            f"{'K' if ctx >= 1024 else ''} context, batch {batch}"))
    return dict(schema_version=1, hbm_copy_gbps=round(copy_gbps, 2), entries=entries), left_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (runs on a CPU in < 1 minute)")
    ap.add_argument("--contexts", help="comma list of context lengths (overrides the preset)")
    ap.add_argument("--batches", help="comma list of batch sizes (overrides the preset)")
    ap.add_argument("--reps", type=int, help="timed repetitions on a CPU (a GPU uses do_bench's own counts)")
    ap.add_argument("--warmup", type=int, help="warm-up runs on a CPU")
    ap.add_argument("--tiny", action="store_true", help="8 query heads, 2 KV heads, head dim 64 (plumbing checks)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda[:N] (default: the first GPU if any)")
    ap.add_argument("--backend", default=None, help="auto|torch|triton (default: KVTUNE_KERNEL_BACKEND, else auto: "
                    "Triton on CUDA tensors, the PyTorch reference on CPU tensors)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="KV and query dtype (default: float16 on a GPU, float32 "
                    "on a CPU, where half-precision matmuls are emulated)")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--calibration-out", help="write measured decode-attention efficiencies (calibration YAML)")
    ap.add_argument("--calibration-at", help="CONTEXT,BATCH the calibration entries are taken at (default: largest)")
    args = ap.parse_args(argv)
    try:
        device = torch.device(parse_device(args.device))
        backend = kb.resolve(args.backend, device)
        cfg = dict(QUICK if args.quick else FULL)
        if args.contexts:
            cfg["contexts"] = [int(x) for x in args.contexts.split(",")]
        if args.batches:
            cfg["batches"] = [int(x) for x in args.batches.split(",")]
        if args.reps is not None:
            cfg["reps"] = args.reps
        if args.warmup is not None:
            cfg["warmup"] = args.warmup
        at = tuple(int(x) for x in args.calibration_at.split(",")) if args.calibration_at else None
    except (UserError, ValueError) as e:
        print(f"kernels.py: error: {e}", file=sys.stderr)
        return 2
    dt = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    shape = TINY if args.tiny else MODEL
    measure = (lambda fn: time_ms(fn, device, repeats=cfg["reps"], warmup=cfg["warmup"]) / 1e3)  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else timer_label(device).split("(", 1)[1][:-1]
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20 if not args.quick else 16 << 20)
    copy_bytes = min(copy_bytes, free_bytes(device) // 4)
    copy_gbps = copy_bandwidth_gbps(device, copy_bytes, cfg["reps"])
    log(f"device: {name}; backend: {backend.value}; dtype: {str(dt)[6:]}; shapes: {shape}; "
        f"copy bandwidth {copy_gbps:.1f} GB/s ({copy_bytes >> 20} MiB, read + write)")
    el = torch.empty((), dtype=dt).element_size()
    rows, skipped = [], []
    for t in cfg["contexts"]:
        for b in cfg["batches"]:
            need = 2 * b * shape["kv_heads"] * t * shape["head_dim"] * el * 4.5
            if need > 0.8 * free_bytes(device):
                skipped.append(dict(batch=b, context=t, reason=f"needs ~{need / 2**30:.1f} GiB"))
                log(f"skip B={b} T={t}: needs ~{need / 2**30:.1f} GiB")
                continue
            log(f"B={b} T={t} ...")
            rows += bench_shape(b, t, device, dt, shape, measure, backend, copy_gbps)
            if b == cfg["batches"][0]:
                rows.append(bench_offload(b, t, device, dt, shape, cfg["reps"], cfg["warmup"], backend))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, copy_gbps)
    result = dict(device=name, backend=backend.value, dtype=str(dt)[6:], shape=shape, quick=args.quick,
                  torch=torch.__version__, timer=timer_label(device), hbm_copy_gbps=copy_gbps, copy_bytes=copy_bytes,
                  interpreted=bool(device.type == "cpu" and backend is kb.Backend.TRITON), rows=rows, skipped=skipped)
    if args.calibration_out:
        measured = [(r["context"], r["batch"]) for r in rows if r.get("codec")]
        if not measured:
            print("kernels.py: error: no decode-attention row was measured; nothing to calibrate", file=sys.stderr)
            return 2
        at = at or max(measured)
        interp = " (Triton interpreter: a plumbing check, not a speed)" if result["interpreted"] else ""
        citation = (f"benchmarks/kernels.py on {name}{interp}, backend {backend.value}, {str(dt)[6:]}, "
                    f"{datetime.date.today().isoformat()}")
        table, left_out = calibration_table(rows, hardware=name, copy_gbps=copy_gbps, at=at, citation=citation)
        for line in left_out:
            log(f"calibration: left out {line}")
        header = (f"# Measured by benchmarks/kernels.py on {name} ({timer_label(device)}); efficiency = stored KV bytes\n"
                  f"# read per decode step / median time / measured copy bandwidth ({copy_gbps:.1f} GB/s).\n")
        atomic_write_text(args.calibration_out, header + dump_yaml(table))
        result["calibration"] = dict(table, left_out=left_out, at=list(at))
        log(f"wrote {args.calibration_out} ({len(table['entries'])} entries)")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


def print_table(rows, copy_gbps) -> None:
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    print("| op | batch | context | ms | GB/s | of copy BW | vs SDPA |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        frac = f"{r['copy_fraction'] * 100:.0f}%" if "copy_fraction" in r else ""
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        if r.get("hidden_fraction") is not None:
            sp = f"hidden {r['hidden_fraction'] * 100:.0f}%"
        print(f"| {r['op']} | {r['batch']} | {r['context']} | {r['ms']:.3f} | {r['gbps']:.1f} | {frac} | {sp} |")


if __name__ == "__main__":
    raise SystemExit(main())
