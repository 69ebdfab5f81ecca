"""The strategy library: one module per strategy, one class per module, an explicit registry.

The registry is built from imports (no import-time side effects). Third-party strategies may register
through the ``kvtune.strategies`` entry-point group: each entry point names a Strategy subclass.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from kvtune.errors import UserError
from kvtune.strategies.ada_kv import AdaKV
from kvtune.strategies.base import Codec, ScoreInputs, Selector, Store, Strategy
from kvtune.strategies.fp8 import FP8
from kvtune.strategies.h2o import H2O
from kvtune.strategies.identity import BF16, FP16
from kvtune.strategies.int8 import Int8
from kvtune.strategies.kivi import KIVI
from kvtune.strategies.knorm import KNorm
from kvtune.strategies.lowrank import LowRank
from kvtune.strategies.mixed import Mixed
from kvtune.strategies.placement import GPU, Offload, Placement
from kvtune.strategies.pyramidkv import PyramidKV
from kvtune.strategies.random_select import Random
from kvtune.strategies.sliding_window import SlidingWindow
from kvtune.strategies.snapkv import SnapKV
from kvtune.strategies.snapkv_agnostic import SnapKVAgnostic
from kvtune.strategies.spill_recall import SpillRecall
from kvtune.strategies.stages import Stages
from kvtune.strategies.streaming_llm import StreamingLLM
from kvtune.strategies.tova import TOVA

NONE = "none"  # selection method that keeps every token

SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (StreamingLLM, SnapKV, H2O, PyramidKV, AdaKV, TOVA, KNorm, SlidingWindow, Random,
                              SnapKVAgnostic, SpillRecall)
}
CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (FP16, BF16, FP8, Int8, KIVI, LowRank, Mixed)}
PLACEMENTS: dict[str, type[Placement]] = {cls.name: cls for cls in (GPU, Offload)}
AXES: dict[str, dict[str, type[Strategy]]] = {"selection": SELECTORS, "codec": CODECS, "placement": PLACEMENTS}  # type: ignore[dict-item]

_plugins_loaded = False


def load_plugins() -> None:
    """Add strategies registered by other distributions under the ``kvtune.strategies`` entry-point group."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="kvtune.strategies"):
        cls = ep.load()
        axis = getattr(cls, "category", None)
        if axis not in AXES or not getattr(cls, "name", None):
            raise UserError(f"entry point {ep.name} ({ep.value}): not a kvtune Strategy subclass")
        AXES[axis].setdefault(cls.name, cls)


def build(axis: str, method: str, params: dict[str, Any] | None = None) -> Strategy | None:
    """Instantiate the ``method`` of ``axis`` with ``params``; ``None`` for selection ``none``. A parameter
    omitted from ``params`` takes the class's ``legacy_defaults`` value if it has one (what documents written
    before that parameter existed meant), else the dataclass default.

    Raises :class:`UserError` naming the stage and the parameter on anything invalid.
    """
    load_plugins()
    if axis == "selection" and method == NONE:
        if params:
            raise UserError(f"selection: method 'none' takes no params, got {sorted(params)}")
        return None
    registry = AXES[axis]
    if method not in registry:
        known = ([NONE] if axis == "selection" else []) + sorted(registry)
        raise UserError(f"{axis}.method: unknown '{method}' (known: {', '.join(known)})")
    cls = registry[method]
    unknown = sorted(set(params or {}) - set(cls.param_names()))
    if unknown:
        raise UserError(f"{axis}.params: unknown parameter '{unknown[0]}' for {method} (known: {', '.join(cls.param_names())})")
    try:
        return cls(**{**cls.legacy_defaults, **(params or {})})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{axis}.params ({method}): {exc}") from None


def multiturn_safe(axis: str) -> tuple[str, ...]:
    """Methods of ``axis`` that never drop a token for good (``Strategy.multiturn_safe``), in registry order;
    selection ``none`` included. The ``multi-turn`` scenario allows exactly these."""
    load_plugins()
    names = tuple(name for name, cls in AXES[axis].items() if cls.multiturn_safe())
    return ((NONE,) + names) if axis == "selection" else names


def codec_bytes_per_token(method: str, params: dict[str, Any], spec: Any, tokens: int = 4096) -> float:
    """K+V bytes per token over all layers for ``spec`` (a ModelSpec) with this codec, scales included."""
    import torch

    codec = build("codec", method, params)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[spec.dtype]
    total = sum(codec.layer_nbytes(i, spec.layers, 1, spec.kv_heads, tokens, spec.head_dim, dtype)  # type: ignore[union-attr]
                for i in range(spec.layers))
    return total / tokens


__all__ = [
    "AXES", "CODECS", "PLACEMENTS", "SELECTORS", "NONE", "Codec", "Placement", "ScoreInputs", "Selector",
    "Stages", "Store", "Strategy", "build", "codec_bytes_per_token", "load_plugins", "multiturn_safe",
]
