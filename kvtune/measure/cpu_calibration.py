"""The serving model's device figures for a CPU target, fitted to the real model's decode steps on this machine.

When the target is this CPU (no ``--hardware``, no accelerator), nothing is assumed: kvtune measures the host's
memory-copy rate and float32 matmul rate, then times the loaded model's real decode step (one new token per
sequence, through kvtune's cache) at a few points and fits the same step model the GPU uses, with one change —
a CPU's threads stream weights and do the arithmetic in turn, so memory and compute add instead of overlapping::

    step(B, c) = fixed + B * per_sequence + B * c * bytes_per_token / (copy rate * kv_efficiency[codec])

Calibration points (each the median of a few steps after a warm-up): batch 1 and batch 8 at 64 tokens fix
``fixed`` and ``per_sequence``; batch 4 at 1,024 tokens, one per codec, fixes that codec's KV efficiency
(relative to the bytes the codec stores, so CPU reference-path overheads such as decoded views land in it).
The fit is cached in ``~/.cache/kvtune`` per machine, model and torch version. ``benchmarks/serving_model.py``
checks its predictions against steps it did not see.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from kvtune.measure.figure import Figure
from kvtune.measure.serving import Device
from kvtune.modelspec import ModelSpec
from kvtune.profile.bandwidth import measure_matmul_gflops
from kvtune.pipeline import Pipeline, Stage
from kvtune.strategies import codec_bytes_per_token

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvtune"
FIT_VERSION = 1
# codec key -> the codec stage calibrated for it
CODEC_STAGES: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}), "fp8": ("fp8", {}), "int8": ("int8", {}), "kivi-4": ("kivi", {"bits": 4}),
    "kivi-2": ("kivi", {"bits": 2}), "lowrank": ("lowrank", {}),
}
SHORT, WIDE_BATCH, KV_BATCH, KV_TOKENS = 64, 8, 4, 1024


@dataclass
class CpuFit:
    copy_gbps: float  # measured: torch tensor copy, 2 x bytes counted
    matmul_gflops: float  # measured: float32 matmul with torch's threads
    fixed_ms: float
    per_sequence_ms: float
    kv_efficiency: dict[str, float]
    points: list[dict[str, Any]]
    machine: str
    weights_bytes: int
    params: int

    def device(self, name: str) -> Device:
        basis = f"fit to the model's decode steps on {self.machine}"
        kv = {k: Figure(v, "calibrated", f"{basis}, batch {KV_BATCH} x {KV_TOKENS} tokens") for k, v in self.kv_efficiency.items()}
        kv.setdefault("bf16", kv["fp16"])
        mem = Figure(self.copy_gbps, "measured", f"{self.machine}: torch tensor copy")
        # weights + fixed costs: what batch 1 at a short context takes, expressed as an efficiency of the copy rate
        weights_eff = self.weights_bytes / (self.copy_gbps * 1e9) * 1e3 / max(self.fixed_ms, 1e-6)
        decode_mfu = 2.0 * self.params / (self.matmul_gflops * 1e9) * 1e3 / max(self.per_sequence_ms, 1e-6)
        return Device(
            name=name, names=(name,), is_gpu=False, mem_gbps=mem,
            peak_flops=Figure(self.matmul_gflops * 1e9, "measured", f"{self.machine}: float32 matmul"),
            weights_eff=Figure(weights_eff, "calibrated", f"{basis}: batch 1 at {SHORT} tokens"),
            overhead_ms=Figure(0.0, "calibrated", f"{basis}: folded into the weights term"),
            prefill_mfu=Figure(1.0, "measured", f"{self.machine}: the measured matmul rate itself"),
            decode_mfu=Figure(decode_mfu, "calibrated", f"{basis}: batch {WIDE_BATCH} vs 1 at {SHORT} tokens"),
            kv_eff=kv, default_kv_eff=kv["fp16"], compute_overlaps=False,
        )


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_copy_gbps(nbytes: int = 256 * 2**20) -> float:
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), repeats=5)
    return 2 * nbytes / (ms / 1e3) / 1e9


def synthetic_cache(spec: ModelSpec, batch: int, tokens: int, codec: tuple[str, dict[str, Any]], seed: int = 0):
    """A cache of ``batch`` sequences of ``tokens`` random K/V, built through the pipeline's codec."""
    import torch

    from kvtune.runtime import KVCache, LayerRecord, PrefillRecord

    gen = torch.Generator().manual_seed(seed)
    shape = (batch, spec.kv_heads, tokens, spec.head_dim)  # (B, H, T, D)
    layers = [LayerRecord(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                          torch.randn(batch, spec.q_heads, 1, spec.head_dim, generator=gen), None, spec.head_dim**-0.5)
              for _ in range(spec.layers)]
    record = PrefillRecord(input_ids=torch.zeros(batch, tokens, dtype=torch.long), last_logits=torch.zeros(batch, 1),
                           layers=layers)
    return KVCache.from_record(record, Pipeline(codec=Stage(method=codec[0], params=codec[1])))


def decode_step_ms(model: Any, spec: ModelSpec, batch: int, tokens: int, codec: tuple[str, dict[str, Any]],
                   repeats: int = 3) -> float:
    """Median time of the real model's decode step at this batch and context, through kvtune's cache."""
    import torch

    cache = synthetic_cache(spec, batch, tokens, codec)
    ids = torch.zeros(batch, 1, dtype=torch.long)

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

    return _median_ms(step, repeats=repeats, warmup=2)


def warm_up(model: Any, spec: ModelSpec, limit: int = 10) -> None:
    """Run short decode steps until two in a row agree within 25%: a process's first forwards are several times
    slower (allocator and thread-pool warm-up), and a fit must not see them."""
    last = None
    for _ in range(limit):
        ms = decode_step_ms(model, spec, 1, SHORT, CODEC_STAGES["fp16"], repeats=1)
        if last is not None and abs(ms - last) <= 0.25 * min(ms, last):
            return
        last = ms


def _key(source: str) -> str:
    import torch

    doc = [FIT_VERSION, source, platform.node(), platform.processor(), torch.__version__, torch.get_num_threads()]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()[:16]


def calibrate(model: Any, spec: ModelSpec, *, source: str, params: int, weights_bytes: int,
              codecs: tuple[str, ...] = tuple(CODEC_STAGES), use_cache: bool = True,
              progress: Callable[[str], None] | None = None) -> CpuFit:
    """Fit the CPU step model for ``model`` (loaded, on the CPU) on this machine, with the KV efficiency of each of
    ``codecs`` (fp16 always). Cached per machine and model; codecs missing from the cache are measured and added."""
    import torch

    say = progress or (lambda msg: None)
    path = CACHE_DIR / f"cpu-step-{_key(source)}.json"
    fit: CpuFit | None = None
    if use_cache and path.is_file():
        try:
            fit = CpuFit(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            fit = None
    wanted = ("fp16", *(k for k in codecs if k != "fp16"))
    if fit is not None and all(k in fit.kv_efficiency for k in wanted):
        return fit
    if fit is None:
        machine = f"this machine ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        say("calibrating the CPU step model: memory and matmul rates")
        copy_gbps, gflops = measure_copy_gbps(), measure_matmul_gflops(torch)
        full = CODEC_STAGES["fp16"]
        say("calibrating the CPU step model: decode steps")
        warm_up(model, spec)
        one = decode_step_ms(model, spec, 1, SHORT, full, repeats=5)
        wide = decode_step_ms(model, spec, WIDE_BATCH, SHORT, full, repeats=5)
        per_seq = max((wide - one) / (WIDE_BATCH - 1), 1e-3)
        fit = CpuFit(copy_gbps=copy_gbps, matmul_gflops=gflops, fixed_ms=max(one - per_seq, 1e-3),
                     per_sequence_ms=per_seq, kv_efficiency={},
                     points=[{"batch": 1, "tokens": SHORT, "codec": "fp16", "ms": one},
                             {"batch": WIDE_BATCH, "tokens": SHORT, "codec": "fp16", "ms": wide}],
                     machine=machine, weights_bytes=weights_bytes, params=params)
    else:
        warm_up(model, spec)
    for key in wanted:
        if key in fit.kv_efficiency:
            continue
        method, params_ = CODEC_STAGES[key]
        say(f"calibrating the CPU step model: {key} KV reads")
        ms = decode_step_ms(model, spec, KV_BATCH, KV_TOKENS, CODEC_STAGES[key], repeats=5)
        kv_ms = max(ms - fit.fixed_ms - KV_BATCH * fit.per_sequence_ms, 1e-3)
        bpt = codec_bytes_per_token(method, params_, spec)
        fit.kv_efficiency[key] = KV_BATCH * KV_TOKENS * bpt / (fit.copy_gbps * 1e9) * 1e3 / kv_ms
        fit.points.append({"batch": KV_BATCH, "tokens": KV_TOKENS, "codec": key, "ms": ms})
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(fit), indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run the calibration again
    return fit
