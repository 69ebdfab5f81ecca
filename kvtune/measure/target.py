"""The deployment being priced: target model shapes, hardware tiers, device figures, workload and serving model.

:func:`build_target` makes every cost-side decision ``recommend`` and ``evaluate`` need, so the commands only
parse and print: which model shapes the cost is measured at, the device pool and the host/disk tiers
(:mod:`kvtune.measure.tiers`), whether decode attention is timed (only when the kernels run on the target
itself), the device's roofline figures (GPU: the calibration table; this CPU: a fit to the loaded model's
decode steps), the workload mix and its trace replay, and the TPOT target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from kvtune.errors import UserError
from kvtune.measure import cpu_calibration
from kvtune.measure.calibration import Calibration
from kvtune.measure.kernels_cost import CostSetup
from kvtune.measure.replay import Replay
from kvtune.measure.serving import Candidate, Device, ServingModel, WorkloadMix
from kvtune.measure.tiers import Tiers
from kvtune.modelspec import ModelSpec, preset
from kvtune.measure.figure import Figure
from kvtune.pipeline import CostResult, Pipeline, ServingResult
from kvtune.profile.workload import DEFAULT_WORKLOAD, bundled_trace_path
from kvtune.strategies import Stages

BUNDLED_PREFIX = "kvtune.profiles/workloads/"


@dataclass
class Target:
    spec: ModelSpec
    hardware: Any  # HardwareProfile
    workload: Any  # WorkloadProfile
    tiers: Tiers
    device: Device
    serving: ServingModel
    cost: CostSetup
    tpot_ms: float | None
    tpot_requested: float | None = None  # --tpot-ms or the scenario's default, before any adjustment
    notes: list[str] = field(default_factory=list)

    def pin_device_pool(self, nbytes: int) -> None:
        """Size the device pool as an earlier run of the same study did (free memory drifts between runs)."""
        cap = self.tiers.device.capacity
        if cap is None or int(cap.value) == nbytes:
            return
        fig = replace(cap, value=nbytes, basis=f"{cap.basis}; kept from the study's first run")
        self.tiers = replace(self.tiers, device=replace(self.tiers.device, capacity=fig))
        self.cost.tiers = self.serving.tiers = self.tiers

    def offload_tiers(self) -> tuple[str, ...]:
        """Where an offload placement may put KV on this target (empty: nowhere)."""
        tiers = []
        if self.tiers.accelerator and self.tiers.host.available:
            tiers.append("cpu")
        if self.tiers.disk.available:
            tiers.append("disk")
        return tuple(tiers)

    def precheck(self, stages: Stages) -> str | None:
        """Why one sequence of the cost context cannot be placed at all (before it costs a trial), or None."""
        spec, ctx = self.spec, self.cost.context_tokens
        sel, codec = stages.selector, stages.codec
        per_seq = 0
        for i in range(spec.layers):
            kept = sel.layer_keep(ctx, i, spec.layers) if sel is not None else ctx
            per_seq += codec.layer_nbytes(i, spec.layers, 1, spec.kv_heads, kept, spec.head_dim, self.cost.dtype)
        share = stages.placement.gpu_fraction_held()
        reason = self.tiers.check(stages.placement, per_seq * share, per_seq * (1.0 - share))
        return f"at {ctx:,} tokens: {reason}" if reason else None

    def price(self, stages: Stages, pipeline: Pipeline, cost: CostResult) -> ServingResult:
        """The serving figures of a measured candidate. When its decode attention was timed on the target GPU,
        that timing gives the codec's kernel efficiency (measured) in place of the calibration table's."""
        self.serving.prefix_caching = pipeline.switches.prefix_caching
        cand = Candidate.of(stages, pipeline, cost.bytes_per_token, cost.host_bytes_per_token)
        if cost.decode_latency_ms and self.device.is_gpu:
            read = cost.bytes_per_token * cost.context_tokens * cand.gpu_fraction
            eff = read / (cost.decode_latency_ms / 1e3) / (self.device.mem_gbps.value * 1e9)
            cand = replace(cand, kv_eff=Figure(eff, "measured", f"this candidate's decode attention timed on {cost.device}"))
        return self.serving.evaluate(cand)


def _trace_path(workload: Any) -> Path | None:
    for t in getattr(workload, "traces", []) or []:
        if t.path.startswith(BUNDLED_PREFIX):
            return bundled_trace_path(t.path[len(BUNDLED_PREFIX):] or DEFAULT_WORKLOAD)
        if Path(t.path).is_file():
            return Path(t.path)
    return None


def full_cache() -> Pipeline:
    return Pipeline()


def build_target(*, hardware: Any, workload: Any, loaded: Any, target: str | None, context: int | None,
                 tpot_ms: float | None, default_tpot_ms: float | None, calibration_files: list[str] | None = None,
                 codecs: tuple[str, ...] = ("fp16",), kernel_device: str = "cpu",
                 progress: Callable[[str], None] | None = None) -> Target:
    """``codecs``: the calibration codec keys the run may price (a CPU target measures each one once)."""
    """Every cost-side decision for one run (see the module docstring)."""
    say = progress or (lambda msg: None)
    notes: list[str] = []
    spec = loaded.spec
    if target:
        try:
            spec = preset(target)
        except UserError:
            raise
        except (KeyError, ValueError) as exc:
            raise UserError(f"--target {target}: {exc}") from None
    loaded_params = sum(p.numel() for p in loaded.model.parameters())
    same_model = spec is loaded.spec
    params = loaded_params if same_model else int(spec.params or 0)
    if params <= 0:
        raise UserError(f"--target {spec.name}: parameter count unknown; the serving model needs it")
    gpu = bool(hardware.accelerator)
    if gpu:
        weights = int(spec.weights_bytes() or params * 2) if not same_model else params * 2
        device = Device.for_gpu(hardware, Calibration(calibration_files))
    else:
        # the model runs here in float32: the CPU step model is fitted to the loaded model's real decode steps
        weights = params * 4
        say("calibrating the CPU step model")
        keys = tuple(k for k in dict.fromkeys(codecs) if k in cpu_calibration.CODEC_STAGES)
        fit = cpu_calibration.calibrate(loaded.model, loaded.spec, source=loaded.source, params=loaded_params,
                                        weights_bytes=loaded_params * 4, codecs=keys, progress=say)
        device = fit.device(hardware.name)
        if not same_model:
            notes.append(f"CPU step model fitted on {loaded.name} and scaled to {spec.name} by bytes and FLOPs")
    tiers = Tiers.from_hardware(hardware, weights)
    trace = _trace_path(workload)
    replay = Replay.from_trace(trace, name=workload.name) if trace is not None else None
    mix = WorkloadMix.from_requests(replay.mix(), workload.name) if replay is not None else WorkloadMix.from_profile(workload)
    if replay is None:
        notes.append("workload trace not found on disk: prefix reuse not replayed, mix from summary statistics")
    ctx = context or int(workload.total_tokens.p50)
    if ctx < 1:
        raise UserError(f"--context {ctx}: must be >= 1 token")
    # decode attention is timed only on the target GPU itself, where it measures the codec's kernel efficiency;
    # on a CPU target the step model is fitted to the whole model's decode steps instead (cpu_calibration)
    here = gpu and kernel_device.startswith("cuda") and hardware.source == "measured"
    cost = CostSetup(spec=spec, context_tokens=ctx, tiers=tiers, device=kernel_device, time_kernels=here)
    serving = ServingModel(spec, params=params, weights_bytes=weights, device=device, tiers=tiers, mix=mix,
                           tpot_ms=None, replay=replay)
    tpot = tpot_ms
    if tpot is None and default_tpot_ms is not None:
        tpot = default_tpot_ms
        full_bpt = spec.kv_bytes_per_token()
        one = serving.step(1, Candidate(full_bpt, "fp16", 1.0, Stages.of(full_cache()).placement)).total_ms
        if one > tpot:
            tpot = float(math.ceil(1.5 * one))
            notes.append(f"the scenario's {default_tpot_ms:g} ms TPOT target is out of reach on {hardware.name} "
                         f"(full cache, batch 1: {one:.1f} ms); using {tpot:g} ms (1.5x that). Set --tpot-ms")
    serving.tpot_ms = tpot
    return Target(spec=spec, hardware=hardware, workload=workload, tiers=tiers, device=device, serving=serving,
                  cost=cost, tpot_ms=tpot, tpot_requested=tpot_ms if tpot_ms is not None else default_tpot_ms,
                  notes=notes)
