"""Pipelines the export tests run over, and a checker for recorded option lists.

The cases together cover every mapping rule of docs/exports.md: identity, each codec (fp8 e4m3/e5m2 with head and
token scales, int8 asymmetric and symmetric, kivi, an unknown one), each selection method (known, later and unknown), token and fraction
budgets with and without a known context, both offload tiers with and without host bytes or measurements, an
unknown placement, prefix caching on and off, max_model_len set and unset, measured capacity present and absent,
a hub-id model and a local model path.
"""

from __future__ import annotations

import json
from typing import Any

from kvtune.pipeline import Pipeline


def measured(*, context: int = 4096, capacity: int = 40, capacity_full: int = 12, bpt: float = 9216.0,
             bpt_full: float = 36864.0) -> dict[str, Any]:
    return {
        "quality": {
            "quality_loss": 0.05, "kl_mean": 0.02, "kl_max": 0.4, "top1_agreement": 0.97, "perplexity": 9.1,
            "perplexity_full": 9.0, "eval_tokens": 512,
        },
        "cost": {
            "bytes_per_token": bpt, "bytes_per_token_full": bpt_full, "compression_ratio": bpt_full / bpt,
            "decode_latency_ms": 1.5, "decode_latency_full_ms": 2.5, "context_tokens": context,
            "capacity_seqs": capacity, "capacity_full_seqs": capacity_full, "memory_budget_bytes": 20 * 2**30,
            "backend": "torch-cpu", "device": "cpu",
        },
    }


def provenance(source: str = "meta-llama/Llama-3.1-8B-Instruct") -> dict[str, Any]:
    return {
        "kvtune_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "scenario": "balanced",
        "model": {"name": "llama-3.1-8b", "source": source, "layers": 32, "kv_heads": 8, "q_heads": 32,
                  "head_dim": 128, "dtype": "bfloat16"},
    }


def _p(selection=("none", {}), codec=("fp16", {}), placement=("gpu", {}), switches=None, **extra) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "selection": {"method": selection[0], "params": selection[1]},
        "codec": {"method": codec[0], "params": codec[1]},
        "placement": {"method": placement[0], "params": placement[1]},
        "switches": switches or {"prefix_caching": True, "gpu_memory_fraction": 0.9},
    }
    doc.update(extra)
    return doc


CASES: dict[str, dict[str, Any]] = {
    # identity, nothing measured, defaults everywhere
    "identity": _p(),
    # fp8 e4m3 (per-head scales), measured, hub model, max_model_len set: the stacks realize it exactly
    "fp8_e4m3_measured": _p(
        codec=("fp8", {"fmt": "e4m3", "scale": "head"}),
        switches={"prefix_caching": True, "max_model_len": 32768, "gpu_memory_fraction": 0.92},
        name="fp8-balanced", measured=measured(capacity=24, capacity_full=12, bpt=18432.0), provenance=provenance(),
    ),
    # fp8 e5m2 with per-token scales, prefix caching off
    "fp8_e5m2_prefix_off": _p(
        codec=("fp8", {"fmt": "e5m2", "scale": "token"}),
        switches={"prefix_caching": False, "max_model_len": 8192, "gpu_memory_fraction": 0.8},
    ),
    # snapkv + kivi + CPU offload with explicit host bytes, measured
    "snapkv_kivi_offload_cpu": _p(
        selection=("snapkv", {"budget": 0.25, "sinks": 4, "window": 32, "kernel": 7, "pooling": "max"}),
        codec=("kivi", {"bits": 4, "group_size": 32, "residual": 128}),
        placement=("offload", {"tier": "cpu", "gpu_fraction": 0.5, "block_size": 16, "prefetch_depth": 1,
                               "host_bytes": 8 * 2**30}),
        measured=measured(), provenance=provenance(),
    ),
    # streaming_llm with a token budget, int8, measured at 4096 tokens, local model path
    "streaming_tokens_int8": _p(
        selection=("streaming_llm", {"budget": 1024, "sinks": 4}),
        codec=("int8", {"group_size": 64}),
        switches={"prefix_caching": True, "max_model_len": 16384, "gpu_memory_fraction": 0.9},
        measured=measured(context=4096, capacity=100, capacity_full=20, bpt=4608.0),
        provenance=provenance(source="/models/llama.gguf"),
    ),
    # vLLM 0.33's int8_per_token_head exactly (symmetric, one group per head), measured: written as measured
    "int8_per_token_head_measured": _p(
        codec=("int8", {"group_size": 128, "symmetric": True}),
        switches={"prefix_caching": True, "max_model_len": 32768, "gpu_memory_fraction": 0.9},
        measured=measured(capacity=23, capacity_full=12, bpt=16896.0), provenance=provenance(),
    ),
    # streaming_llm with a fraction budget and no known context (TensorRT-LLM cannot turn it into tokens)
    "streaming_fraction_no_context": _p(selection=("streaming_llm", {"budget": 0.1, "sinks": 4})),
    # h2o + bf16 + disk offload, a block size vLLM's CUDA backends lack, prefetch depth 2, no host bytes
    "h2o_offload_disk": _p(
        selection=("h2o", {"budget": 0.5, "sinks": 0, "recent": 32}),
        codec=("bf16", {}),
        placement=("offload", {"tier": "disk", "gpu_fraction": 0.25, "block_size": 64, "prefetch_depth": 2}),
    ),
    # disk offload with host bytes: LMCache's local_disk with its size
    "offload_disk_sized": _p(placement=("offload", {"tier": "disk", "gpu_fraction": 0.5, "block_size": 32,
                                                     "prefetch_depth": 1, "host_bytes": 64 * 2**30})),
    # CPU offload with neither host bytes nor measurements: sizes unknown, SGLang falls back to a ratio
    "offload_cpu_unsized": _p(placement=("offload", {"tier": "cpu", "gpu_fraction": 0.5, "block_size": 32,
                                                      "prefetch_depth": 1})),
    # CPU offload whose host bytes are derived from measurements, prefix caching off
    "offload_cpu_derived_prefix_off": _p(
        placement=("offload", {"tier": "cpu", "gpu_fraction": 0.25, "block_size": 64, "prefetch_depth": 1}),
        switches={"prefix_caching": False, "gpu_memory_fraction": 0.85},
        measured=measured(context=8192, capacity=16, capacity_full=16, bpt=36864.0),
    ),
    # methods the lead adds later
    "pyramidkv": _p(selection=("pyramidkv", {"budget": 0.3, "window": 32, "kernel": 7, "beta": 20})),
    "ada_kv": _p(selection=("ada_kv", {"budget": 0.2, "window": 16, "kernel": 5, "alpha_safeguard": 0.2})),
    "tova": _p(selection=("tova", {"budget": 0.5})),
    "knorm": _p(selection=("knorm", {"budget": 0.4})),
    "sliding_window_tokens": _p(selection=("sliding_window", {"budget": 512}),
                                measured=measured(context=2048, capacity=30, capacity_full=10, bpt=9216.0)),
    "random_seeded": _p(selection=("random", {"budget": 0.5, "seed": 0})),
    # strategies a third-party plugin registers (tests/export/conftest.py), unknown to every exporter: each names
    # them as not expressible, never crashes
    "future_methods": _p(selection=("quest", {"budget": 0.3, "page": 16}), codec=("lowrank", {"rank": 32}),
                         placement=("nvme_direct", {"queue_depth": 8})),
}


def pipeline(case: str) -> Pipeline:
    return Pipeline.from_dict(json.loads(json.dumps(CASES[case])), where=case)


# -- recorded option lists ------------------------------------------------------------------------------------


def check_value(key: str, value: Any, spec: dict[str, Any]) -> list[str]:
    """Problems with one emitted option against its recorded spec (empty when it conforms)."""
    problems: list[str] = []
    kind = spec["type"]
    if kind == "str" and not isinstance(value, str):
        problems.append(f"{key}: expected a string, got {value!r}")
    elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{key}: expected an int, got {value!r}")
    elif kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        problems.append(f"{key}: expected a number, got {value!r}")
    elif kind == "bool" and not isinstance(value, bool):
        problems.append(f"{key}: expected a bool, got {value!r}")
    elif kind == "list_int":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            problems.append(f"{key}: expected a list of ints, got {value!r}")
        elif len(value) < spec.get("min_len", 0):
            problems.append(f"{key}: list shorter than {spec['min_len']}")
    elif kind == "json":  # a JSON string, or a nested map (vLLM >= 0.33's loader turns a map into JSON)
        try:
            parsed = value if isinstance(value, dict) else json.loads(value)
        except (TypeError, ValueError):
            return [f"{key}: expected a JSON string or a map, got {value!r}"]
        for field in spec.get("required_fields", []):
            if field not in parsed:
                problems.append(f"{key}: JSON lacks {field!r}")
        if "kv_role" in spec and parsed.get("kv_role") not in spec["kv_role"]:
            problems.append(f"{key}: kv_role {parsed.get('kv_role')!r} not in {spec['kv_role']}")
    elif kind == "mapping":
        if not isinstance(value, dict):
            return [f"{key}: expected a mapping, got {value!r}"]
        for sub, subvalue in value.items():
            if sub not in spec["keys"]:
                problems.append(f"{key}.{sub}: not a recorded option")
            else:
                problems += check_value(f"{key}.{sub}", subvalue, spec["keys"][sub])
    if "choices" in spec and value not in spec["choices"]:
        problems.append(f"{key}: {value!r} not in {spec['choices']}")
    if "only" in spec and value not in spec["only"]:
        problems.append(f"{key}: {value!r} must be one of {spec['only']} (a false flag is dropped by the loader)")
    if "min" in spec and isinstance(value, (int, float)) and value < spec["min"]:
        problems.append(f"{key}: {value!r} below {spec['min']}")
    if "min_exclusive" in spec and isinstance(value, (int, float)) and value <= spec["min_exclusive"]:
        problems.append(f"{key}: {value!r} not above {spec['min_exclusive']}")
    if "max_exclusive" in spec and isinstance(value, (int, float)) and value >= spec["max_exclusive"]:
        problems.append(f"{key}: {value!r} not below {spec['max_exclusive']}")
    if "max" in spec and isinstance(value, (int, float)) and value > spec["max"]:
        problems.append(f"{key}: {value!r} above {spec['max']}")
    if spec.get("power_of_two") and isinstance(value, int) and (value < 2 or value & (value - 1)):
        problems.append(f"{key}: {value!r} is not a power of two > 1")
    return problems


def check_lmcache(body: dict[str, Any], keys: dict[str, Any]) -> list[str]:
    """LMCache's list records Python types and defaults: check names and the basic type of each value."""
    problems = []
    for key, value in body.items():
        if key not in keys:
            problems.append(f"{key}: not an LMCache 0.5.6 option")
            continue
        declared = keys[key]["type"]
        base = declared.replace("Optional[", "").rstrip("]")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(base, True)
        if not ok:
            problems.append(f"{key}: {value!r} is not a {declared}")
    return problems
