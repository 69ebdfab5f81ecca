"""Time every kvtune kernel at Llama-3.1-8B shapes and report bandwidth, fraction of copy bandwidth, speedups.

    python benchmarks/kernels.py [--quick] [--out results.json] [--backend auto|torch|triton]

Shapes (full run): 32 layers, 32 query heads, 8 KV heads, head dim 128, fp16; contexts 4K/32K/128K; batch
1/8/32. Each op is timed on one layer (decode attention runs per layer); the median over repetitions after a
warm-up: ``triton.testing.do_bench`` on a GPU, ``time.perf_counter`` on a CPU. In the same run the script
measures a device-to-device copy of the fp16 KV bytes; every op's bandwidth (bytes it must move / time) is
reported as a fraction of that copy bandwidth, and every decode attention as a speedup over fp16
``torch.nn.functional.scaled_dot_product_attention`` on the same shapes. ``--quick`` uses small shapes so it
finishes on a laptop CPU in well under a minute (there it measures the PyTorch reference path). Combinations
whose tensors would not fit in the device's free memory are skipped and listed as such.

The table goes to stdout, progress to stderr, JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kvtune.kernels import backend as kb
from kvtune.kernels.compaction import gather_tokens
from kvtune.kernels.decode_attention import decode_attention, decode_attention_fp8, decode_attention_int
from kvtune.kernels.offload import LayerPrefetcher, pinned_empty
from kvtune.kernels.quant import dequantize_int, quantize_fp8, quantize_int

MODEL = dict(layers=32, q_heads=32, kv_heads=8, head_dim=128)
FULL = dict(contexts=[4096, 32768, 131072], batches=[1, 8, 32], reps=50, warmup=10)
QUICK = dict(contexts=[512, 1024], batches=[1, 4], reps=5, warmup=1)
KIVI_GROUP = 32  # keys: groups of 32 tokens per channel
KIVI_RESIDUAL = 128  # most recent tokens kept in fp16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timer(device: torch.device, reps: int, warmup: int):
    """Returns time(fn) -> median seconds."""
    if device.type == "cuda":
        import triton.testing

        def run(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

        return run

    def run(fn):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return run


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:
        return 8 << 30


def bench_shape(b: int, t: int, device, measure, backend) -> list:
    hq, hkv, d = MODEL["q_heads"], MODEL["kv_heads"], MODEL["head_dim"]
    dt = torch.float16 if device.type == "cuda" else torch.float32  # CPU fp16 matmuls are emulated and slow
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, hq, d, generator=g).to(device, dt)
    k = torch.randn(b, hkv, t, d, generator=g).to(device, dt)
    v = torch.randn(b, hkv, t, d, generator=g).to(device, dt)
    el = k.element_size()
    kv_bytes = 2 * k.numel() * el
    rows = []

    def add(op, secs, nbytes, **extra):
        rows.append(dict(op=op, batch=b, context=t, ms=secs * 1e3, bytes=nbytes, gbps=nbytes / secs / 1e9, **extra))

    # device copy bandwidth: read + write of the K/V bytes
    dst = torch.empty_like(k)
    tc = measure(lambda: (dst.copy_(k), dst.copy_(v)))
    add("device copy (K+V)", tc, 2 * kv_bytes)
    copy_gbps = rows[-1]["gbps"]

    q4 = q[:, :, None, :]  # (B, Hq, 1, D)
    t_sdpa = measure(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    add(f"SDPA {str(dt)[6:]} (baseline)", t_sdpa, kv_bytes)

    t_dense = measure(lambda: decode_attention(q, k, v, backend=backend))
    add(f"decode {str(dt)[6:]}", t_dense, kv_bytes, speedup=t_sdpa / t_dense)

    kf, vf = quantize_fp8(k, "e4m3", "token", backend=backend), quantize_fp8(v, "e4m3", "token", backend=backend)
    t_fp8 = measure(lambda: decode_attention_fp8(q, kf, vf, backend=backend))
    add("decode fp8 e4m3", t_fp8, kf.nbytes() + vf.nbytes(), speedup=t_sdpa / t_fp8)

    tq = (t - KIVI_RESIDUAL) // KIVI_GROUP * KIVI_GROUP
    for bits in (4, 2):
        kq = quantize_int(k[:, :, :tq].contiguous(), bits, KIVI_GROUP, "token", backend=backend)
        vq = quantize_int(v[:, :, :tq].contiguous(), bits, d, "channel", backend=backend)
        kr, vr = k[:, :, tq:], v[:, :, tq:]
        ti = measure(lambda: decode_attention_int(q, kq, vq, kr, vr, backend=backend))
        nb = kq.nbytes() + vq.nbytes() + 2 * kr.numel() * el
        add(f"decode KIVI int{bits}", ti, nb, speedup=t_sdpa / ti)
        del kq, vq

    tquant = measure(lambda: quantize_int(k, 4, KIVI_GROUP, "token", backend=backend))
    kq = quantize_int(k, 4, KIVI_GROUP, "token", backend=backend)
    add("quantize int4 (K)", tquant, k.numel() * el + kq.nbytes())
    tdq = measure(lambda: dequantize_int(kq, backend=backend))
    add("dequantize int4 (K)", tdq, k.numel() * el + kq.nbytes())
    tf8 = measure(lambda: quantize_fp8(k, "e4m3", "token", backend=backend))
    add("quantize fp8 (K)", tf8, k.numel() * el + kf.nbytes() // 2)

    keep = torch.stack([torch.randperm(t, generator=g)[: t // 2] for _ in range(b * hkv)]).reshape(b, hkv, t // 2).to(device)
    tg = measure(lambda: gather_tokens(k, keep, backend=backend))
    add("gather 50% tokens (K)", tg, 2 * k.numel() * el // 2)
    for r in rows:
        r["copy_fraction"] = r["gbps"] / copy_gbps
    return rows


def bench_offload(b: int, t: int, device, measure) -> dict | None:
    """Host->device transfer of one layer's fp16 K+V from pinned memory, and how much of it prefetch hides
    behind one layer's decode attention (4 layers, double-buffered)."""
    hq, hkv, d = MODEL["q_heads"], MODEL["kv_heads"], MODEL["head_dim"]
    n_layers = 4
    dt = torch.float16 if device.type == "cuda" else torch.float32
    shape = (b, hkv, t, d)
    layers = []
    for _ in range(n_layers):
        k, v = pinned_empty(shape, dt), pinned_empty(shape, dt)
        k.normal_(), v.normal_()
        layers.append([k, v])
    nbytes = 2 * layers[0][0].numel() * layers[0][0].element_size()
    q = torch.randn(b, hq, d, device=device, dtype=dt)
    pf = LayerPrefetcher(layers, device)

    def transfer_only():
        for i in range(n_layers):
            pf._holder = [None] * pf.depth  # force a fresh copy
            pf.prefetch(i)
            pf.get(i)
            pf.release(i)

    kd, vd = (x.to(device) for x in layers[0])

    def compute_only():
        for _ in range(n_layers):
            decode_attention(q, kd, vd)

    def overlapped():
        pf._holder = [None] * pf.depth
        pf.prefetch(0)
        for i in range(n_layers):
            kk, vv = pf.get(i)
            if i + 1 < n_layers:
                pf.prefetch(i + 1)
            decode_attention(q, kk, vv)
            pf.release(i)

    tx, tcomp, tov = measure(transfer_only), measure(compute_only), measure(overlapped)
    hidden = None
    if device.type == "cuda":
        hidden = max(0.0, min(1.0, (tx + tcomp - tov) / tx))
    return dict(op="offload H2D (K+V, pinned)", batch=b, context=t, ms=tx / n_layers * 1e3, bytes=nbytes,
                gbps=nbytes * n_layers / tx / 1e9, transfer_ms=tx * 1e3, compute_ms=tcomp * 1e3,
                overlapped_ms=tov * 1e3, hidden_fraction=hidden)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (runs on a CPU in < 1 minute)")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--backend", default=None, help="auto|torch|triton (default: resolved once, KVTUNE_KERNEL_BACKEND)")
    args = ap.parse_args(argv)
    try:
        backend = kb.resolve(args.backend)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = QUICK if args.quick else FULL
    measure = timer(device, cfg["reps"], cfg["warmup"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"device: {name}; backend: {backend.value}; shapes: {MODEL}")
    rows, skipped = [], []
    for t in cfg["contexts"]:
        for b in cfg["batches"]:
            need = 2 * b * MODEL["kv_heads"] * t * MODEL["head_dim"] * (2 if device.type == "cuda" else 4) * 3.5
            if need > 0.8 * free_bytes(device):
                skipped.append(dict(batch=b, context=t, reason=f"needs ~{need / 2**30:.1f} GiB"))
                log(f"skip B={b} T={t}: needs ~{need / 2**30:.1f} GiB")
                continue
            log(f"B={b} T={t} ...")
            rows += bench_shape(b, t, device, measure, backend)
            if b == cfg["batches"][0]:
                rows.append(bench_offload(b, t, device, measure))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, name, backend)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, backend=backend.value, model=MODEL, quick=args.quick, torch=torch.__version__,
                           rows=rows, skipped=skipped), f, indent=1)
    return 0


def print_table(rows, device_name, backend) -> None:
    print(f"| op | batch | context | ms | GB/s | of copy BW | vs SDPA |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        frac = f"{r['copy_fraction'] * 100:.0f}%" if "copy_fraction" in r else ""
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        if r.get("hidden_fraction") is not None:
            sp = f"hidden {r['hidden_fraction'] * 100:.0f}%"
        print(f"| {r['op']} | {r['batch']} | {r['context']} | {r['ms']:.3f} | {r['gbps']:.1f} | {frac} | {sp} |")


if __name__ == "__main__":
    raise SystemExit(main())
