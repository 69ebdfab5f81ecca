"""The pipeline document: what to run (three stages) and what was measured for it.

A KV-cache pipeline is at most one stage per axis, applied per layer in this order:

1. ``selection`` — which tokens stay (eviction); ``method: none`` keeps every token.
2. ``codec`` — how the kept tokens are stored; ``method: fp16`` stores them as they are.
3. ``placement`` — where the stored blocks live; ``method: gpu`` keeps them all on the accelerator.

Plus the serving-level ``switches`` that serving stacks own (prefix caching, max model length, memory fraction).

The document is versioned (``schema_version``) and strict (``extra="forbid"``): an unknown field is an error,
never silently ignored. It is written with ``yaml.safe_dump`` and read with ``yaml.safe_load``; a dump followed
by a load gives back an equal object (tested).

Stage ``params`` are checked against the strategy named by ``method`` when the pipeline is built into a
runtime (:func:`kvtune.strategies.build_stage`), since third-party strategies may register more methods.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvtune.errors import UserError

SCHEMA_VERSION = 1

ParamValue = Union[bool, int, float, str, list[int], list[str]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class Stage(_Strict):
    """One stage of one axis: a registered method name and its parameters."""

    method: str = Field(min_length=1, description="registered strategy name, e.g. 'snapkv', 'kivi', 'gpu'")
    params: dict[str, ParamValue] = Field(default_factory=dict)

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
    max_model_len: int | None = Field(None, ge=1, description="longest context (prompt + output) to serve")
    gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0, description="fraction of GPU memory the server may use")


class QualityResult(_Strict):
    """Quality against the same model with the full cache (see docs/concepts.md for each metric)."""

    quality_loss: float = Field(description="search objective: mean KL + (1 - probe retention)")
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


class CostResult(_Strict):
    """Cost with the candidate's stored form at the target model's shapes."""

    bytes_per_token: float = Field(description="KV bytes held per context token, all layers, K+V, scales included")
    bytes_per_token_full: float = Field(description="the same for the uncompressed cache in the target dtype")
    compression_ratio: float = Field(description="bytes_per_token_full / bytes_per_token")
    decode_latency_ms: float = Field(description="one decode step's attention over all layers, median")
    decode_latency_full_ms: float = Field(description="the same with the full fp16/bf16 cache, same run")
    context_tokens: int = Field(ge=1, description="context length the cost was measured at")
    capacity_seqs: int = Field(ge=0, description="concurrent sequences of context_tokens within the memory budget")
    capacity_full_seqs: int = Field(ge=0)
    memory_budget_bytes: int = Field(ge=0, description="KV memory budget used for capacity")
    transfer_ms: float = Field(0.0, ge=0.0, description="per-step host-to-device time the placement adds")
    backend: str = Field(description="kernel path the cost came from (torch-cpu, triton-cuda, ...)")
    device: str = Field(description="where the timing ran")
    notes: list[str] = Field(default_factory=list)


class Measured(_Strict):
    quality: QualityResult
    cost: CostResult
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


class Provenance(_Strict):
    kvtune_version: str
    created: str = Field(description="UTC time, ISO 8601")
    scenario: str | None = None
    study: str | None = None
    seed: int | None = None
    model: ModelInfo | None = None
    hardware: HardwareInfo | None = None
    workload: WorkloadInfo | None = None


class Pipeline(_Strict):
    """A KV-cache pipeline: three stages, serving switches, and optionally what was measured for it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str | None = None
    selection: Stage = Field(default_factory=lambda: Stage(method="none"))
    codec: Stage = Field(default_factory=lambda: Stage(method="fp16"))
    placement: Stage = Field(default_factory=lambda: Stage(method="gpu"))
    switches: Switches = Field(default_factory=Switches)
    measured: Measured | None = None
    provenance: Provenance | None = None

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
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
        if "schema_version" not in data:
            raise UserError(f"{where}: missing 'schema_version' (this kvtune writes {SCHEMA_VERSION})")
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


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline YAML file; :class:`UserError` on any problem."""
    from kvtune.io import read_yaml

    return Pipeline.from_dict(read_yaml(path), where=str(path))


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
