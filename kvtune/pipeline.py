"""The pipeline document: what to run (three stages) and what was measured for it.

A KV-cache pipeline is at most one stage per axis, applied per layer in this order:

1. ``selection`` — which tokens stay (eviction); ``method: none`` keeps every token.
2. ``codec`` — how the kept tokens are stored; ``method: fp16`` stores them as they are.
3. ``placement`` — where the stored blocks live; ``method: gpu`` keeps them all on the accelerator.

Plus the serving-level ``switches`` that serving stacks own (prefix caching, max model length, memory fraction).

The document is versioned (``schema_version``) and strict (``extra="forbid"``): an unknown field is an error,
never silently ignored. It is written with ``yaml.safe_dump`` and read with ``yaml.safe_load``; a dump followed
by a load gives back an equal object (tested).

Numbers are finite and within range at the schema level (pydantic constraints). Stage ``params`` depend on the
strategy named by ``method`` (third-party strategies may register more), so they are checked by
:func:`validate_pipeline`: the one entry point every command that reads a pipeline calls (``export``,
``evaluate``, ``recommend`` when it resumes a study) before any work, and that shape checks a model needs
(a low-rank ``rank`` above the head dim) when the model is known.
"""

from __future__ import annotations

import math
import os
import types
import typing
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvtune.errors import UserError

from kvtune.modelspec import ModelSpec

if TYPE_CHECKING:  # strategies import torch; validate_pipeline imports them when it runs
    from kvtune.strategies import Stages

SCHEMA_VERSION = 2  # the newest version this kvtune reads; 2 adds ``buckets``
MAX_BUCKETS = 16
MAX_CONTEXT_TOKENS = 1 << 24  # 16,777,216: longer than any model serves; bounds every token count in a document
MAX_TEXT = 512  # characters in a free-text field (name, model source)

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ParamValue = Union[bool, int, FiniteFloat, Annotated[str, Field(max_length=MAX_TEXT)], list[int], list[str]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class Stage(_Strict):
    """One stage of one axis: a registered method name and its parameters."""

    method: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$",
                        description="registered strategy name, e.g. 'snapkv', 'kivi', 'gpu'")
    params: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)], ParamValue] = Field(
        default_factory=dict)

    def label(self) -> str:
        if not self.params:
            return self.method
        inner = ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{self.method}({inner})"


def _fmt(value: ParamValue) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Switches(_Strict):
    """Serving-level settings that are not KV-cache stages but that serving stacks need."""

    prefix_caching: bool = Field(True, description="reuse the KV of shared prompt prefixes across requests")
    max_model_len: int | None = Field(None, ge=1, le=MAX_CONTEXT_TOKENS,
                                      description="longest context (prompt + output) to serve")
    gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False,
                                       description="fraction of GPU memory the server may use")


class QualityResult(_Strict):
    """Quality against the same model with the full cache (see docs/concepts.md for each metric)."""

    quality_loss: float = Field(description="search objective: mean KL + (1 - probe retention) + follow-up weight "
                                "* (1 - follow-up retention)")
    kl_mean: float = Field(description="mean KL(full || candidate) of next-token distributions, nats")
    kl_max: float = Field(description="largest per-token KL seen, nats")
    top1_agreement: float = Field(ge=0.0, le=1.0, description="fraction of positions with the same argmax token")
    perplexity: float = Field(description="candidate perplexity on the continuation tokens")
    perplexity_full: float = Field(description="full-cache perplexity on the same tokens")
    passkey_accuracy: float | None = Field(None, description="candidate accuracy on passkey items")
    passkey_full_accuracy: float | None = Field(None, description="full-cache accuracy on the same items")
    kv_retrieval_accuracy: float | None = None
    kv_retrieval_full_accuracy: float | None = None
    probe_retention: float | None = Field(
        None, description="of the probe items the full cache answers, the fraction the candidate also answers"
    )
    eval_tokens: int = Field(ge=0, description="continuation tokens scored")
    eval_context_tokens: list[int] = Field(default_factory=list, description="context length of each prompt")
    multiturn_turns: int | None = Field(None, description="turns per multi-turn conversation probe")
    turn_accuracy: list[float] | None = Field(
        None, description="multi-turn probes: candidate accuracy per turn (a turn the full cache fails counts as missed)")
    turn_accuracy_full: list[float] | None = Field(None, description="multi-turn probes: full-cache accuracy per turn")
    turn1_retention: float | None = Field(
        None, description="of the first turns the full cache answers, the fraction the candidate also answers")
    followup_retention: float | None = Field(
        None, description="of the follow-up turns (2nd on) the full cache answers, the fraction the candidate answers")
    multiturn_kl: float | None = Field(None, description="mean KL(full || candidate) on multi-turn answer tokens, nats")


class CostResult(_Strict):
    """Cost with the candidate's stored form at the target model's shapes (what the kernels measured)."""

    bytes_per_token: float = Field(gt=0, description="KV bytes held per context token, all layers, K+V, scales included")
    bytes_per_token_full: float = Field(gt=0, description="the same for the uncompressed cache in the target dtype")
    compression_ratio: float = Field(gt=0, description="bytes_per_token_full / bytes_per_token")
    decode_latency_ms: float | None = Field(
        None, ge=0, description="one decode step's attention over all layers, median; only when the kernels ran on "
                                "the target device itself (never a CPU timing for a GPU target)")
    decode_latency_full_ms: float | None = Field(None, ge=0, description="the same with the full cache, same run")
    context_tokens: int = Field(ge=1, description="context length the cost was measured at")
    host_bytes_per_token: float = Field(0.0, ge=0, description="bytes per context token a spilling selector keeps "
                                                                 "off the device (every token, its host codec)")
    capacity_seqs: int = Field(ge=0, description="concurrent sequences of context_tokens within the memory tiers")
    capacity_full_seqs: int = Field(ge=0)
    memory_budget_bytes: int = Field(ge=0, description="device KV pool used for capacity")
    transfer_ms: float | None = Field(None, ge=0.0, description="written by kvtune 0.1 only (superseded by serving)")
    backend: str = Field(description="kernel path the bytes (and any timing) came from (torch-cpu, triton-cuda, ...)")
    device: str = Field(description="where the kernels ran")
    notes: list[str] = Field(default_factory=list)


class ServingResult(_Strict):
    """What a deployment gets on the target hardware over the workload (kvtune.measure.serving)."""

    target: str = Field(description="hardware the figures are for")
    tpot_target_ms: float | None = Field(None, gt=0, description="the scenario's time-per-output-token target")
    batch: int = Field(ge=0, description="concurrent sequences the deployment runs: of the sizes meeting the target, "
                                         "the one with the most tokens/s (0: the target is missed at batch 1)")
    max_batch: int = Field(ge=0, description="sequences of the decode context that fit the memory tiers")
    batch_bound: str = Field(description="what bounds max_batch")
    tpot_ms: float = Field(ge=0, description="decode step time at `batch` (at batch 1 when batch is 0)")
    tokens_per_s: float = Field(ge=0, description="sustained output tokens/s at the target, prefill included")
    decode_tokens_per_s: float = Field(ge=0, description="batch / step time, decode only")
    ttft_ms: float = Field(ge=0, description="time to first token of the median prompt")
    decode_context: float = Field(ge=0, description="time-averaged context of a decoding sequence, tokens")
    weights_ms: float = Field(ge=0)
    kv_ms: float = Field(ge=0)
    compute_ms: float = Field(ge=0)
    copy_ms: float = Field(ge=0, description="offload copy per step")
    exposed_copy_ms: float = Field(ge=0, description="the part of the copy prefetch does not hide")
    overhead_ms: float = Field(ge=0)
    hit_rate_device: float = Field(ge=0, le=1, description="prompt tokens served by the device prefix cache")
    hit_rate_lower: float = Field(ge=0, le=1, description="prompt tokens served by the host/disk tier")
    prompt_recomputed: float = Field(ge=0, le=1, description="prompt tokens prefilled again")
    provenance: dict[str, str] = Field(default_factory=dict, description="figure -> measured|calibrated|assumed: basis")
    notes: list[str] = Field(default_factory=list)


class Measured(_Strict):
    quality: QualityResult
    cost: CostResult
    serving: ServingResult | None = None
    trial: int | None = Field(None, description="Optuna trial number this came from")
    seconds: float | None = Field(None, ge=0.0, description="wall time of the measurement")


class ModelInfo(_Strict):
    name: str
    source: str = Field(description="path or hub id it was loaded from")
    layers: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    q_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    dtype: str = Field(description="KV dtype of the target deployment, e.g. float16")


class HardwareInfo(_Strict):
    name: str
    source: Literal["measured", "datasheet", "this-machine"] = "this-machine"
    accelerator: str | None = None
    memory_bytes: int | None = Field(None, ge=0)


class WorkloadInfo(_Strict):
    name: str
    source: str | None = None
    context_p50: int | None = Field(None, ge=0)
    context_p90: int | None = Field(None, ge=0)
    context_p99: int | None = Field(None, ge=0)
    prefix_reuse: float | None = Field(None, ge=0.0, le=1.0)


class Bucket(_Strict):
    """One context-length bucket of a per-bucket pipeline (schema version 2): a prompt of at most
    ``max_input_tokens`` tokens runs this bucket's stages; the last bucket has no bound. Routing takes the first
    bucket whose bound holds (:meth:`Pipeline.route`)."""

    max_input_tokens: int | None = Field(None, ge=1, le=MAX_CONTEXT_TOKENS,
                                         description="upper bound of the bucket's prompt length; none on the last")
    selection: Stage
    codec: Stage
    placement: Stage
    share: FiniteFloat | None = Field(None, ge=0.0, le=1.0, description="fraction of the workload's requests")
    measured_at_tokens: int | None = Field(None, ge=1, le=MAX_CONTEXT_TOKENS,
                                           description="context length quality was measured at for this bucket")
    measured: Measured | None = None

    def label(self) -> str:
        return f"{self.selection.label()} + {self.codec.label()} @ {self.placement.label()}"


class Provenance(_Strict):
    kvtune_version: str
    created: str = Field(description="UTC time, ISO 8601")
    scenario: str | None = None
    study: str | None = None
    seed: int | None = None
    model: ModelInfo | None = None  # the target's shapes, which bytes and serving figures are priced at
    quality_model: str | None = Field(None, max_length=MAX_TEXT, description=(
        "the model quality was measured on: name, content identity (file name + SHA-256), device and dtype; "
        "it differs from `model` when --target prices another model's shapes"))
    hardware: HardwareInfo | None = None
    workload: WorkloadInfo | None = None


class Pipeline(_Strict):
    """A KV-cache pipeline: three stages, serving switches, and optionally what was measured for it."""

    schema_version: Literal[1, 2] = 1  # 2 only when ``buckets`` is present, so older kvtune reads the rest
    name: str | None = Field(None, max_length=MAX_TEXT, description="free text; exporters escape it")
    selection: Stage = Field(default_factory=lambda: Stage(method="none"))
    codec: Stage = Field(default_factory=lambda: Stage(method="fp16"))
    placement: Stage = Field(default_factory=lambda: Stage(method="gpu"))
    switches: Switches = Field(default_factory=Switches)
    measured: Measured | None = None
    provenance: Provenance | None = None
    buckets: list[Bucket] | None = Field(None, min_length=1, max_length=MAX_BUCKETS,
                                         description="per-length-bucket stages (schema version 2)")

    @model_validator(mode="after")
    def _buckets_ordered(self) -> "Pipeline":
        if self.buckets is None:
            return self
        if self.schema_version < 2:
            raise ValueError("'buckets' needs schema_version 2")
        bounds = [b.max_input_tokens for b in self.buckets]
        if bounds[-1] is not None or any(x is None for x in bounds[:-1]):
            raise ValueError("buckets: only the last bucket, and it must, leave max_input_tokens unset")
        if any(a >= b for a, b in zip(bounds[:-2], bounds[1:-1])):  # type: ignore[operator]
            raise ValueError("buckets: max_input_tokens must increase from bucket to bucket")
        return self

    def route(self, prompt_tokens: int) -> "Pipeline":
        """The stages a prompt of this many tokens runs: its bucket's (the first whose bound holds), else the
        pipeline's own."""
        for b in self.buckets or ():
            if b.max_input_tokens is None or prompt_tokens <= b.max_input_tokens:
                return Pipeline(selection=b.selection, codec=b.codec, placement=b.placement, switches=self.switches)
        return self

    @field_validator("schema_version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if isinstance(value, int) and value > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {value} is newer than this kvtune understands ({SCHEMA_VERSION}); upgrade kvtune"
            )
        return value

    def label(self) -> str:
        """Short human label: ``snapkv(budget=0.25) + kivi(bits=4) @ gpu``."""
        return f"{self.selection.label()} + {self.codec.label()} @ {self.placement.label()}"

    def is_identity(self) -> bool:
        return self.selection.method == "none" and self.codec.method in ("fp16", "bf16") and self.placement.method == "gpu"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        from kvtune.io import dump_yaml

        return dump_yaml(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "pipeline") -> "Pipeline":
        if data is None:
            raise UserError(f"{where}: empty document (expected a pipeline mapping with 'schema_version')")
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping at the top level, got {_kind(data)}")
        if "schema_version" not in data:
            raise UserError(f"{where}: missing 'schema_version' (this kvtune writes 1, or 2 with 'buckets')")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"{where}: {first_error(exc)}") from None


def first_error(exc: ValidationError) -> str:
    """One line from a pydantic error: the field path and the message of the first problem."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"field '{loc}': {msg}{more}"


def _kind(data: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(data), type(data).__name__)


def load_pipeline(path: str | os.PathLike[str], *, spec: ModelSpec | None = None) -> Pipeline:
    """Read a pipeline YAML file and validate it completely (:func:`validate_pipeline`); :class:`UserError` on
    any problem."""
    from kvtune.io import read_yaml

    pipeline = Pipeline.from_dict(read_yaml(path), where=str(path))
    validate_pipeline(pipeline, spec=spec, where=str(path))
    return pipeline


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _param_type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the strategy field's annotation ``hint`` (None when it does)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if not all(a in _TYPE_NAMES for a in allowed):
        return None  # a container or custom type: the strategy's own checks decide
    if isinstance(value, bool):
        return None if bool in allowed else f"expected {_expected(allowed)}, got {value!r}"
    if isinstance(value, int) and (int in allowed or float in allowed):
        return None
    if isinstance(value, float) and float in allowed:
        return None
    if isinstance(value, str) and str in allowed:
        return None
    return f"expected {_expected(allowed)}, got {value!r}"


def _expected(allowed: tuple[Any, ...]) -> str:
    names = [_TYPE_NAMES[a] for a in allowed if not (a is int and float in allowed)]  # a number covers integers
    return " or ".join(names)


def _non_finite(data: Any, path: str) -> str | None:
    if isinstance(data, float) and not math.isfinite(data):
        return path
    if isinstance(data, dict):
        for key, value in data.items():
            found = _non_finite(value, f"{path}.{key}")
            if found:
                return found
    if isinstance(data, list):
        for i, value in enumerate(data):
            found = _non_finite(value, f"{path}.{i}")
            if found:
                return found
    return None


def recorded_spec(pipeline: Pipeline) -> ModelSpec | None:
    """The model shapes the pipeline's provenance records (what its parameters must fit), or None."""
    info = pipeline.provenance.model if pipeline.provenance is not None else None
    if info is None:
        return None
    return ModelSpec(name=info.name, layers=info.layers, kv_heads=info.kv_heads, q_heads=info.q_heads,
                     head_dim=info.head_dim, dtype=info.dtype, source=info.source)


def validate_pipeline(pipeline: Pipeline, *, spec: ModelSpec | None = None, where: str = "pipeline") -> "Stages":
    """Check everything the schema cannot: each stage's parameters against its strategy (names, types, ranges,
    via the strategy's own validation) and what the model's shapes allow: ``spec``'s, else those the pipeline's
    provenance records. Returns the built :class:`~kvtune.strategies.Stages`; raises :class:`UserError` naming
    the file and the field.

    The one validation path for a pipeline a command reads: ``export``, ``evaluate`` and ``recommend``'s resume
    call it before any work.
    """
    from kvtune.strategies import AXES, Stages, load_plugins  # imports torch: only when a pipeline is checked

    load_plugins()
    spec = spec if spec is not None else recorded_spec(pipeline)
    for axis in AXES:
        stage: Stage = getattr(pipeline, axis)
        cls = AXES[axis].get(stage.method)
        if cls is None:
            continue  # unknown methods are reported by the registry below, with the known ones
        hints = typing.get_type_hints(cls)
        for key, value in stage.params.items():
            problem = _param_type_problem(value, hints[key]) if key in hints else None
            if problem:
                raise UserError(f"{where}: field '{axis}.params.{key}' ({stage.method}): {problem}")
    try:
        stages = Stages.of(pipeline)
        if spec is not None:
            for axis, strategy in (("selection", stages.selector), ("codec", stages.codec),
                                   ("placement", stages.placement)):
                if strategy is not None:
                    try:
                        strategy.check_model(spec)
                    except ValueError as exc:
                        raise UserError(f"{axis}.params ({strategy.name}): {exc} (model {spec.name})") from None
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    for i, bucket in enumerate(pipeline.buckets or ()):  # each bucket's stages, checked as a pipeline of their own
        validate_pipeline(pipeline.route(bucket.max_input_tokens or MAX_CONTEXT_TOKENS), spec=spec,
                          where=f"{where}: buckets.{i}")
    if pipeline.measured is not None:
        bad = _non_finite(pipeline.measured.model_dump(mode="python"), "measured")
        if bad:
            raise UserError(f"{where}: field '{bad}': must be a finite number")
    return stages


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
