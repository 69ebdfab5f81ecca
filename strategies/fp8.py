"""fp8: keys and values cast to 8-bit floats (e4m3 or e5m2) with a scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import dequantize_fp8, fp8_nbytes, quantize_fp8
from kvtune.strategies.base import Codec, Store
from kvtune.strategies.per_token import PerTokenStore


class Fp8Store(PerTokenStore):
    def __init__(self, fmt: str, scale: str) -> None:
        super().__init__(lambda x: quantize_fp8(x, fmt=fmt, scale_axis=scale), dequantize_fp8)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        from kvtune.kernels.decode_attention import decode_attention_fp8

        return decode_attention_fp8(query, self.k, self.v, scale=scale, return_probs=return_probs)


@dataclass
class FP8(Codec):
    """8-bit floating point KV with a float32 scale per head (or per token).

    Mechanism: scale = amax / fp8_max over the head (or token), codes = cast(x / scale) to e4m3 (more
    mantissa, range +-448) or e5m2 (more range, +-57344). Reference: the fp8 KV cache of vLLM/TensorRT-LLM
    (Micikevicius et al., "FP8 Formats for Deep Learning", 2022). Deviations: scales are computed from the
    data as it arrives (dynamic), whereas vLLM defaults to a scale of 1.0 unless calibrated; dynamic scales
    are the better case, so a deployment without calibration can be worse than measured here. Tokens
    appended after the prompt keep their own scale (the store becomes per-token: exact, 4 bytes more per
    token and head), where vLLM would reuse one static scale.
    Parameters: ``fmt`` e4m3|e5m2; ``scale`` head|token.
    """

    name: ClassVar[str] = "fp8"
    citation: ClassVar[str] = "Micikevicius et al., FP8 Formats for Deep Learning, 2022 (fp8 KV cache as in vLLM)"
    summary: ClassVar[str] = "8-bit float (e4m3/e5m2) with per-head or per-token scales"

    fmt: str = "e4m3"
    scale: str = "head"

    def __post_init__(self) -> None:
        if self.fmt not in ("e4m3", "e5m2"):
            raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {self.fmt!r}")
        if self.scale not in ("head", "token"):
            raise ValueError(f"scale must be 'head' or 'token', got {self.scale!r}")

    def new_store(self) -> Store:
        return Fp8Store(self.fmt, self.scale)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * fp8_nbytes((batch, heads, tokens, head_dim), self.scale)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "fmt": trial.suggest_categorical("fp8.fmt", ["e4m3", "e5m2"]),
            "scale": trial.suggest_categorical("fp8.scale", ["head", "token"]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "fmt {e4m3, e5m2}, scale {head, token}"
