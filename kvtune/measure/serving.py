"""The serving model: what a deployment of a pipeline gets on the target hardware over the workload.

The candidate's stored form is measured (bytes per token, :mod:`kvtune.measure.kernels_cost`); this module turns
it into the figures people who run serving fleets decide on: batch size, time per output token (TPOT),
tokens/s at the scenario's latency target, time to first token (TTFT), prefix-cache hit rates and memory.

**Decode step at batch B** (a roofline, per step, all layers)::

    kv_bytes  = B * c * bytes_per_token                  # every in-flight sequence reads its whole context once
    memory_ms = weights_bytes / (HBM * eff_weights) + kv_bytes / (HBM * eff_codec)
    compute   = B * 2 * params / (peak FLOP/s * decode_mfu)
    copy_ms   = kv_bytes * (1 - gpu_fraction) / link      # offload: the non-resident share crosses the link
    busy      = max(memory_ms, compute)                   # on a GPU; a CPU adds them (see cpu_calibration)
    step(B)   = overhead + busy + max(0, copy_ms - busy)   # prefetch hides the copy behind the step's work

``c`` is the time-averaged context of a decoding sequence, ``sum(out * (in + out / 2)) / sum(out)`` over the
workload's requests (a sequence with more output tokens spends more steps in the batch). ``eff_*`` and the
overhead come from the kernel calibration table (:mod:`kvtune.measure.calibration`: measured on a GPU by
``benchmarks/kernels.py``, assumed seed values until then); on a CPU target they come from a fit to the real
model's decode steps on this machine (:mod:`kvtune.measure.cpu_calibration`).

**Batch and throughput.** The largest batch whose sequences fit the device pool (and the lower tier, for
offload) and whose step meets the TPOT target; tokens/s is then sustained output tokens per second with the
prefill of each request's prompt tokens that the prefix cache does not hold interleaved (chunked prefill)::

    tokens/s = out_mean / (prefill_ms(missed prompt tokens) + load_ms(host hits) + out_mean * step(B) / B) * 1000

**Prefill / TTFT.** ``prefill_ms(n) = (2 * params * n + 2 * layers * q_heads * head_dim * n^2) / (peak * prefill_mfu)``
(weights read once when that is longer), plus what a stage adds at prefill: the attention-sum pass of H2O-style
scoring (another ``n^2`` term) and the quantize/pack pass of a codec (its bytes over HBM). TTFT of the median
request is the prefill of its missed prompt tokens plus loading its host-tier hits over the link.

Every figure carries its provenance (:class:`kvtune.measure.figure.Figure`): measured, calibrated or assumed,
and a figure computed from others takes the weakest label of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvtune.measure.calibration import Calibration, Factor, codec_key
from kvtune.measure.figure import Figure, weakest
from kvtune.measure.tiers import Tiers, copy_ms, exposed_copy_ms
from kvtune.modelspec import ModelSpec
from kvtune.pipeline import ServingResult

MAX_BATCH = 4096  # serving stacks cap concurrent sequences (vLLM's max_num_seqs default is 256-1024)


@dataclass(frozen=True)
class WorkloadMix:
    """What the serving model needs of the workload's requests."""

    requests: int
    input_mean: float
    output_mean: float
    input_p50: int
    decode_context: float  # time-averaged context of a decoding sequence, tokens
    basis: str
    exact: bool  # computed from the requests (True) or from summary statistics (False)

    @classmethod
    def from_profile(cls, w: Any) -> "WorkloadMix":
        """From a WorkloadProfile's summary statistics: ``c = in_mean + out_mean / 2`` (input and output
        lengths taken as independent, which the requests themselves would not need)."""
        inp, out = float(w.input_tokens.mean), float(w.output_tokens.mean)
        return cls(requests=int(w.requests), input_mean=inp, output_mean=max(out, 1.0), input_p50=int(w.input_tokens.p50),
                   decode_context=inp + out / 2, basis=f"{w.name}: mean input + mean output / 2", exact=False)

    @classmethod
    def from_requests(cls, requests: list[tuple[int, int]], name: str) -> "WorkloadMix":
        """From (input, output) token counts of every request."""
        if not requests:
            raise ValueError("no requests")
        n = len(requests)
        ins = sorted(i for i, _ in requests)
        tot_out = sum(o for _, o in requests)
        weighted = sum(o * (i + o / 2) for i, o in requests)
        ctx = weighted / tot_out if tot_out else sum(ins) / n
        return cls(requests=n, input_mean=sum(ins) / n, output_mean=max(tot_out / n, 1.0),
                   input_p50=ins[(n - 1) // 2], decode_context=ctx,
                   basis=f"{name}: sum(out * (in + out/2)) / sum(out) over {n:,} requests", exact=True)


@dataclass(frozen=True)
class Device:
    """The target's roofline inputs, each with its provenance."""

    name: str
    names: tuple[str, ...]  # for calibration look-ups (profile name, accelerator name)
    is_gpu: bool
    mem_gbps: Figure  # HBM (GPU) or host memory (CPU) bandwidth
    peak_flops: Figure  # dense FLOP/s at the deployment's dtype
    weights_eff: Figure
    overhead_ms: Figure
    prefill_mfu: Figure
    decode_mfu: Figure
    kv_eff: dict[str, Figure] = field(default_factory=dict)  # per calibration codec key
    default_kv_eff: Figure | None = None
    compute_overlaps: bool = True  # GPU: memory and compute overlap (roofline max); CPU: they add

    def codec_eff(self, key: str) -> Figure:
        if key in self.kv_eff:
            return self.kv_eff[key]
        if self.default_kv_eff is None:
            raise KeyError(key)
        return self.default_kv_eff

    @classmethod
    def for_gpu(cls, hw: Any, calibration: Calibration, dtype: str = "bfloat16") -> "Device":
        """A GPU target from its hardware profile and the kernel calibration table."""
        names = tuple(n for n in (hw.name, hw.accelerator) if n)
        datasheet = hw.source == "datasheet"
        if hw.hbm_bandwidth_gbps is None:
            raise ValueError(f"hardware '{hw.name}': no HBM bandwidth in the profile")
        mem = Figure(hw.hbm_bandwidth_gbps, "assumed" if datasheet else "measured",
                     f"{hw.name}: {'datasheet HBM bandwidth' if datasheet else 'device-to-device copy (kvtune profile)'}")
        tflops = hw.peak_bf16_tflops if dtype == "bfloat16" else (hw.peak_fp16_tflops or hw.peak_bf16_tflops)
        if tflops is None:
            raise ValueError(f"hardware '{hw.name}': no peak dense FLOP/s in the profile (add peak_bf16_tflops)")
        peak = Figure(tflops * 1e12, "assumed", f"{hw.name}: datasheet peak dense {dtype} tensor FLOP/s")

        def fig(f: Factor) -> Figure:
            return Figure(f.value, f.source, f.citation)

        look = calibration.factor
        kv = {k: fig(look("decode_attention", names, k)) for k in ("fp16", "bf16", "fp8", "int8", "kivi-4", "kivi-2", "lowrank")}
        return cls(name=hw.name, names=names, is_gpu=True, mem_gbps=mem, peak_flops=peak,
                   weights_eff=fig(look("weights_gemv", names)), overhead_ms=fig(look("step_overhead_ms", names)),
                   prefill_mfu=fig(look("prefill_mfu", names)), decode_mfu=fig(look("decode_mfu", names)),
                   kv_eff=kv, default_kv_eff=kv["fp16"])


@dataclass(frozen=True)
class Candidate:
    """What the serving model needs of one measured pipeline."""

    bytes_per_token: float  # stored bytes per context token, all layers (measured)
    codec: str  # calibration codec key (kivi-4, fp8, ...)
    gpu_fraction: float  # share of each sequence's KV resident on the device
    placement: Any  # the Placement strategy
    attention_sums: bool = False  # a selector that scores with the prompt's accumulated attention
    packs: bool = False  # a codec that quantizes/packs at prefill
    kv_eff: Figure | None = None  # this candidate's own measured kernel efficiency (timed on the target GPU)
    host_bytes_per_token: float = 0.0  # a spilling selector's host copy of every token

    @classmethod
    def of(cls, stages: Any, pipeline: Any, bytes_per_token: float, host_bytes_per_token: float = 0.0) -> "Candidate":
        sel = stages.selector
        return cls(bytes_per_token=bytes_per_token, host_bytes_per_token=host_bytes_per_token,
                   codec=codec_key(pipeline.codec.method, pipeline.codec.params),
                   gpu_fraction=stages.placement.gpu_fraction_held(), placement=stages.placement,
                   attention_sums=sel is not None and "attention_sums" in sel.needs,
                   packs=pipeline.codec.method not in ("fp16", "bf16"))


@dataclass
class Step:
    batch: int
    weights_ms: float
    kv_ms: float
    compute_ms: float
    copy_ms: float
    exposed_ms: float
    overhead_ms: float
    overlaps: bool = True

    @property
    def busy_ms(self) -> float:
        memory = self.weights_ms + self.kv_ms
        return max(memory, self.compute_ms) if self.overlaps else memory + self.compute_ms

    @property
    def total_ms(self) -> float:
        return self.overhead_ms + self.busy_ms + self.exposed_ms


class ServingModel:
    """Prices candidates for one target (model shapes, device, tiers) over one workload."""

    def __init__(self, spec: ModelSpec, *, params: int, weights_bytes: int, device: Device, tiers: Tiers,
                 mix: WorkloadMix, tpot_ms: float | None, replay: Any = None, prefix_caching: bool = True) -> None:
        self.spec = spec
        self.params = params
        self.weights_bytes = weights_bytes
        self.device = device
        self.tiers = tiers
        self.mix = mix
        self.tpot_ms = tpot_ms
        self.replay = replay  # kvtune.measure.replay.Replay or None
        self.prefix_caching = prefix_caching

    # -- building blocks -----------------------------------------------------------------------------------
    def kv_eff(self, cand: Candidate) -> Figure:
        return cand.kv_eff if cand.kv_eff is not None else self.device.codec_eff(cand.codec)

    def step(self, batch: int, cand: Candidate) -> Step:
        d = self.device
        bw = d.mem_gbps.value * 1e9
        kv_bytes = batch * self.mix.decode_context * cand.bytes_per_token
        weights_ms = self.weights_bytes / (bw * d.weights_eff.value) * 1e3
        kv_ms = kv_bytes / (bw * self.kv_eff(cand).value) * 1e3
        compute_ms = batch * 2.0 * self.params / (d.peak_flops.value * d.decode_mfu.value) * 1e3
        moved = 0.0
        lower = self.tiers.lower(cand.placement)
        if lower is not None and cand.gpu_fraction < 1.0 and lower.read_gbps is not None:
            moved = copy_ms(kv_bytes * (1.0 - cand.gpu_fraction), lower.read_gbps)
        step = Step(batch=batch, weights_ms=weights_ms, kv_ms=kv_ms, compute_ms=compute_ms, copy_ms=moved,
                    exposed_ms=0.0, overhead_ms=d.overhead_ms.value, overlaps=d.compute_overlaps)
        step.exposed_ms = exposed_copy_ms(moved, step.busy_ms)
        return step

    def prefill_ms(self, tokens: float, cand: Candidate) -> float:
        if tokens <= 0:
            return 0.0
        s, d = self.spec, self.device
        attn = 2.0 * s.layers * s.q_heads * s.head_dim * tokens * tokens  # QK^T + PV: 2 x 2n^2 d per head, halved (causal)
        if cand.attention_sums:
            attn *= 1.5  # the scores are formed once more, in full, to sum each key's attention
        flops = 2.0 * self.params * tokens + attn
        ms = flops / (d.peak_flops.value * d.prefill_mfu.value) * 1e3
        ms = max(ms, self.weights_bytes / (d.mem_gbps.value * 1e9 * d.weights_eff.value) * 1e3)
        if cand.packs:  # read the fresh K/V and write the packed form once
            full_bpt = s.kv_bytes_per_token()
            ms += tokens * (full_bpt + cand.bytes_per_token) / (d.mem_gbps.value * 1e9) * 1e3
        return ms

    def max_batch(self, cand: Candidate) -> tuple[int, str]:
        """Sequences of the workload's decode context that fit the tiers, and what bounds them."""
        c = self.mix.decode_context
        best, why = self.tiers.sequences(cand.placement, c * cand.bytes_per_token, c * cand.host_bytes_per_token)
        if best > MAX_BATCH:
            best, why = MAX_BATCH, f"batch cap {MAX_BATCH}"
        return best, why

    def batch_at_target(self, cand: Candidate, limit: int) -> int:
        """The largest batch <= limit whose step meets the TPOT target (0 when even one sequence misses it)."""
        if limit < 1:
            return 0
        if self.tpot_ms is None:
            return limit
        if self.step(1, cand).total_ms > self.tpot_ms:
            return 0
        lo, hi = 1, limit  # step time grows with batch: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.step(mid, cand).total_ms <= self.tpot_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _at_batch(self, run: int, cand: Candidate) -> dict[str, Any]:
        """Step, prefix-cache hits, tokens/s and TTFT with ``run`` sequences decoding."""
        step = self.step(run, cand)
        hit_dev = hit_low = 0.0
        hit_basis = "prefix caching off"
        lower = self.tiers.lower(cand.placement)
        if self.prefix_caching and self.replay is not None:
            # the prefix cache gets what the running batch leaves of each tier
            per_seq = self.mix.decode_context * cand.bytes_per_token
            dev_free = max(0.0, (self.tiers.device.capacity.value if self.tiers.device.capacity else 0)
                           - run * per_seq * cand.gpu_fraction)
            low_free = 0.0
            if lower is not None and cand.gpu_fraction < 1.0:
                low_free = max(0.0, (self.tiers.lower_capacity(cand.placement) or 0.0)
                               - run * per_seq * (1.0 - cand.gpu_fraction))
            res = self.replay.run(int(dev_free // cand.bytes_per_token), int(low_free // cand.bytes_per_token))
            hit_dev, hit_low, hit_basis = res.device_hit_rate, res.lower_hit_rate, res.basis
        elif self.prefix_caching:
            hit_basis = "no trace with prefix-block ids: prefix reuse not modelled (0%)"
        miss = 1.0 - hit_dev - hit_low
        rate = lower.read_gbps if (lower is not None and lower.read_gbps is not None) else None

        recall = self.tiers.host.read_gbps if (cand.host_bytes_per_token and self.tiers.accelerator) else None

        def load_ms(tokens: float) -> float:
            """Prompt tokens found in the lower tier, copied up; for a spilling selector, its resident set
            recalled from the host at the new turn (upper bound: all of it)."""
            ms = tokens * hit_low * cand.bytes_per_token / (rate.value * 1e9) * 1e3 if rate else 0.0
            if recall is not None:
                ms += tokens * cand.bytes_per_token / (recall.value * 1e9) * 1e3
            return ms

        in_mean, in_p50 = self.mix.input_mean, self.mix.input_p50
        per_req_ms = self.prefill_ms(in_mean * miss, cand) + load_ms(in_mean) + self.mix.output_mean * step.total_ms / run
        return {"run": run, "step": step, "hit_dev": hit_dev, "hit_low": hit_low, "hit_basis": hit_basis, "miss": miss,
                "tokens_s": self.mix.output_mean / per_req_ms * 1e3,
                "ttft": self.prefill_ms(in_p50 * miss, cand) + load_ms(in_p50)}

    # -- the figures ---------------------------------------------------------------------------------------
    def evaluate(self, cand: Candidate) -> ServingResult:
        d = self.device
        limit, bound = self.max_batch(cand)
        batch = self.batch_at_target(cand, limit)
        notes: list[str] = []
        if limit < 1:
            notes.append(f"not one sequence of {self.mix.decode_context:,.0f} tokens fits ({bound})")
        elif batch == 0:
            notes.append(f"misses the {self.tpot_ms:g} ms TPOT target even at batch 1 "
                         f"({self.step(1, cand).total_ms:.2f} ms)")
        # the batch: the one of a few sizes up to the target's that gives the most tokens/s — fewer running
        # sequences leave more of the pool to the prefix cache, which can save more prefill than they cost
        sizes = sorted({max(1, batch), *(max(1, math.ceil(batch * f)) for f in (0.25, 0.5, 0.75, 0.9))})
        figs = max((self._at_batch(n, cand) for n in sizes), key=lambda f: (f["tokens_s"], f["run"]))
        run, step = figs["run"], figs["step"]
        hit_dev, hit_low, hit_basis, miss = figs["hit_dev"], figs["hit_low"], figs["hit_basis"], figs["miss"]
        lower = self.tiers.lower(cand.placement)
        tokens_s = figs["tokens_s"] if batch > 0 else 0.0
        ttft = figs["ttft"]
        if batch > 0 and run < batch:
            notes.append(f"batch {run} of the {batch} that meet the target: the pool left to the prefix cache "
                         "saves more prefill than the extra sequences would decode")

        base = [d.mem_gbps.source, d.weights_eff.source, d.overhead_ms.source, self.kv_eff(cand).source]
        step_src = weakest(*base, d.peak_flops.source, d.decode_mfu.source)
        if step.copy_ms and lower is not None and lower.read_gbps is not None:
            step_src = weakest(step_src, lower.read_gbps.source)
        prefill_src = weakest(d.peak_flops.source, d.prefill_mfu.source, d.mem_gbps.source)
        mem_src = weakest(self.tiers.device.capacity.source if self.tiers.device.capacity else "assumed", "measured")
        provenance = {
            "bytes_per_token": "measured: stored form at the target's shapes (kvtune.measure.kernels_cost)",
            "max_batch": f"{mem_src}: {bound}, {self.tiers.device.capacity.basis if self.tiers.device.capacity else ''}",
            "tpot_ms": f"{step_src}: roofline on {d.name} (HBM {d.mem_gbps.value:,.0f} GB/s {d.mem_gbps.source}, "
                       f"KV read efficiency {self.kv_eff(cand).value:g} {self.kv_eff(cand).source}, "
                       f"overhead {d.overhead_ms.value:g} ms {d.overhead_ms.source})",
            "ttft_ms": f"{prefill_src}: prefill FLOPs over peak x MFU {d.prefill_mfu.value:g} ({d.prefill_mfu.source})",
            "tokens_per_s": f"{weakest(step_src, prefill_src)}: batch x step and prefill of missed prompt tokens",
            "hit_rates": (f"measured: {hit_basis} (an LRU prefix cache, as vLLM's, over the trace's own requests)"
                          if self.replay is not None else f"assumed: {hit_basis}"),
            "decode_context": f"{'measured' if self.mix.exact else 'assumed'}: {self.mix.basis}",
        }
        return ServingResult(
            target=d.name, tpot_target_ms=self.tpot_ms, batch=run if batch > 0 else 0, max_batch=max(0, limit),
            batch_bound=bound,
            tpot_ms=round(step.total_ms, 4), tokens_per_s=round(tokens_s, 3),
            decode_tokens_per_s=round(run * 1e3 / step.total_ms, 3) if batch else 0.0,
            ttft_ms=round(ttft, 3), decode_context=round(self.mix.decode_context, 1),
            weights_ms=round(step.weights_ms, 4), kv_ms=round(step.kv_ms, 4), compute_ms=round(step.compute_ms, 4),
            copy_ms=round(step.copy_ms, 4), exposed_copy_ms=round(step.exposed_ms, 4),
            overhead_ms=round(step.overhead_ms, 4), hit_rate_device=round(hit_dev, 5), hit_rate_lower=round(hit_low, 5),
            prompt_recomputed=round(miss, 5), provenance=provenance, notes=notes,
        )
