"""What ``recommend`` and ``evaluate`` share: loading the model, the hardware and workload, the evaluation set."""

from __future__ import annotations

import enum
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from kvtune.errors import UserError
from kvtune.io import dump_yaml
from kvtune.kernels.backend import resolve as resolve_kernel_backend
from kvtune.models import DEVICE_CHOICES, LoadedModel, load_model, parse_device
from kvtune.modelspec import ModelSpec
from kvtune.pipeline import HardwareInfo, ModelInfo, WorkloadInfo
from kvtune.measure.multiturn import probe_turns
from kvtune.measure.target import Target, build_target
from kvtune.measure.quality import EvalConfig, EvalSet, build_eval_set

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def emit(data: Any, fmt: OutputFormat) -> None:
    """Machine-readable output on stdout."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(dump_yaml(data))


def needs_attention_sums(method: str) -> bool:
    """Whether a selection method needs the prompt's accumulated attention recorded at prefill (costly)."""
    from kvtune.strategies import SELECTORS, load_plugins

    load_plugins()
    cls = SELECTORS.get(method)
    return cls is not None and "attention_sums" in cls.needs


@dataclass
class Prepared:
    loaded: LoadedModel
    target: ModelSpec
    hardware: Any  # kvtune.profile.schema.HardwareProfile
    workload: Any  # kvtune.profile.schema.WorkloadProfile | None
    eval_config: EvalConfig
    evalset: EvalSet | None  # None: prepare(evalset=False)
    target_model: Target

    def model_info(self) -> ModelInfo:
        t = self.target
        return ModelInfo(name=t.name, source=self.loaded.source if t is self.loaded.spec else f"preset:{t.name}",
                         layers=t.layers, kv_heads=t.kv_heads, q_heads=t.q_heads, head_dim=t.head_dim, dtype=t.dtype)

    def quality_model(self) -> str:
        """The model every quality figure was measured on, for :attr:`Provenance.quality_model`."""
        m = self.loaded
        return f"{m.name} ({m.identity}; ran on {m.device} in {m.compute_dtype})"

    def hardware_info(self) -> HardwareInfo:
        h = self.hardware
        mem = h.gpu_memory_total_bytes if h.accelerator else h.cpu_ram_total_bytes
        return HardwareInfo(name=h.name, source=h.source, accelerator=h.accelerator, memory_bytes=mem)

    def workload_info(self) -> WorkloadInfo | None:
        w = self.workload
        if w is None:
            return None
        return WorkloadInfo(name=w.name, source=w.source, context_p50=int(w.total_tokens.p50),
                            context_p90=int(w.total_tokens.p90), context_p99=int(w.total_tokens.p99),
                            prefix_reuse=w.prefix_reuse_ratio)


def load_hardware(profile: str | None, hardware: str | None) -> tuple[Any, Any]:
    """(HardwareProfile, WorkloadProfile | None) from --profile / --hardware / this machine."""
    from kvtune.profile.hardware import probe_hardware, reference_hardware

    if profile and hardware:
        raise UserError("--profile and --hardware both given; use one (a profile already names its hardware)")
    if profile:
        from kvtune.profile.schema import load_profile

        prof = load_profile(profile)
        return prof.hardware, prof.workload
    if hardware:
        return reference_hardware(hardware), None
    return probe_hardware(quick=True), None


DEVICE_HELP = f"where the model and kernels run: {DEVICE_CHOICES} (auto: the first CUDA GPU if any, else the CPU)"


def parse_run_device(device: str) -> str:
    """``--device`` checked up front, with the kernel backend it implies (a bad KVTUNE_KERNEL_BACKEND fails here,
    not inside a trial)."""
    dev = parse_device(device)
    try:
        resolve_kernel_backend(None, dev)
    except ValueError as exc:
        raise UserError(f"--device {device}: {exc}") from None
    return dev


def prepare(*, model: str | None, trust_remote_code: bool, profile: str | None, hardware: str | None,
            target: str | None, context: int | None, quick: bool, attention_sums: bool, seed: int,
            device: str = "auto", tpot_ms: float | None = None, default_tpot_ms: float | None = None,
            calibration: list[str] | None = None, codecs: tuple[str, ...] = ("fp16",),
            evalset: bool = True) -> Prepared:
    """Load the hardware, workload and model, price the target (``codecs``: the calibration codec keys the run
    may need, see :func:`kvtune.measure.calibration.codec_keys`) and build the evaluation set (``evalset=False``:
    later, by :func:`prefill_evalset`; ``recommend --buckets`` builds one per bucket length instead)."""
    from kvtune.profile.workload import default_workload

    dev = parse_run_device(device)
    hw, workload = load_hardware(profile, hardware)
    if workload is None:
        workload = default_workload()
    with stderr.status("loading model ..."):
        loaded = load_model(model, trust_remote_code=trust_remote_code, device=dev)
    stderr.print(f"model {loaded.name} ({loaded.spec.layers} layers, {loaded.spec.kv_heads} KV heads, head dim "
                 f"{loaded.spec.head_dim}) loaded in {loaded.load_seconds:.1f} s on {loaded.device} "
                 f"({loaded.compute_dtype})")
    with stderr.status("pricing the target ...") as status:
        tgt = build_target(hardware=hw, workload=workload, loaded=loaded, target=target, context=context,
                           tpot_ms=tpot_ms, default_tpot_ms=default_tpot_ms, calibration_files=calibration,
                           codecs=codecs, kernel_device=str(loaded.device), progress=lambda msg: status.update(msg))
    for note in tgt.notes:
        stderr.print(f"note: {note}")
    cfg = EvalConfig.quick() if quick else EvalConfig()
    cfg.seed = seed
    if cfg.multiturn_items:
        cfg.multiturn_turns, why = probe_turns(workload, cfg.multiturn_facts, cfg.multiturn_turns)
        stderr.print(f"multi-turn probe: {cfg.multiturn_turns} turns ({why})")
    return Prepared(loaded=loaded, target=tgt.spec, hardware=hw, workload=workload, eval_config=cfg,
                    evalset=prefill_evalset(loaded, cfg, attention_sums) if evalset else None, target_model=tgt)


def prefill_evalset(loaded: LoadedModel, cfg: EvalConfig, attention_sums: bool) -> EvalSet:
    """Prefill the evaluation set once with the full cache, saying how long it took and which probes count."""
    started = time.perf_counter()
    with stderr.status("prefill once ...") as status:
        evalset = build_eval_set(loaded.model, loaded.tokenizer, cfg, attention_sums=attention_sums,
                                 progress=lambda msg: status.update(msg))
    stderr.print(f"evaluation set: {len(evalset.text)} text prompts, {len(evalset.probes)} probes, prefilled once "
                 f"in {time.perf_counter() - started:.1f} s")
    passing = sum(p.full_correct for p in evalset.probes)
    if evalset.probes:
        stderr.print(f"full cache answers {passing}/{len(evalset.probes)} probe items; only those count")
    return evalset


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fmt_opt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
