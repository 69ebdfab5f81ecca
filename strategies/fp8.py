"""fp8: keys and values cast to 8-bit floats (e4m3 or e5m2) with a scale."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import Fp8Tensor, dequantize_fp8, fp8_nbytes, quantize_fp8
from kvtune.kernels.quant.reference import FP8_DTYPES, FP8_MAX, fp8_values
from kvtune.strategies.base import Codec, Store
from kvtune.strategies.per_token import PerTokenStore


class Fp8Store(PerTokenStore):
    def __init__(self, fmt: str, scale: str) -> None:
        super().__init__(lambda x: quantize_fp8(x, fmt=fmt, scale_axis=scale), dequantize_fp8)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        from kvtune.kernels.decode_attention import decode_attention_fp8

        return decode_attention_fp8(query, self.k, self.v, scale=scale, return_probs=return_probs)


@dataclass(frozen=True)
class StaticFp8Tensor:
    """fp8 codes (B, H, T, D) under one static float32 scale of 1.0 (``scale`` (1,)): the values saturated to the
    format's range and cast. No per-token or per-head scale, so concatenation and token gathers are exact."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str
    dtype: torch.dtype  # of the tensor that was quantized (what decoding returns)

    @classmethod
    def encode(cls, x: torch.Tensor, fmt: str) -> "StaticFp8Tensor":
        fmax = FP8_MAX[fmt]
        return cls(x.float().clamp(-fmax, fmax).to(FP8_DTYPES[fmt]),
                   torch.ones(1, dtype=torch.float32, device=x.device), fmt, x.dtype)

    def decode(self) -> torch.Tensor:
        return fp8_values(self.data).to(self.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale))

    def index_select_tokens(self, idx: torch.Tensor) -> "StaticFp8Tensor":
        gather = idx.long()[..., None].expand(-1, -1, -1, self.data.shape[-1])  # (B, H, K, D)
        data = self.data.view(torch.uint8).gather(2, gather).view(self.data.dtype)  # no fp8 gather on CPU
        return dataclasses.replace(self, data=data)

    @staticmethod
    def concat(parts: list["StaticFp8Tensor"]) -> "StaticFp8Tensor":
        """Join along the token axis (the scale is the same constant in every part)."""
        data = torch.cat([p.data.view(torch.uint8) for p in parts], dim=2).view(parts[0].data.dtype)
        return dataclasses.replace(parts[0], data=data)

    def as_fp8(self) -> Fp8Tensor:
        """The same codes as an :class:`Fp8Tensor` with scale 1.0 per (B, H), for the fused kernel."""
        b, h = self.data.shape[:2]
        return Fp8Tensor(self.data, self.scale.expand(b, h).contiguous(), self.fmt, "head", tuple(self.data.shape), self.dtype)


class StaticFp8Store(PerTokenStore):
    """fp8 codes with one static scale of 1.0 (``scale="tensor"``): what vLLM, SGLang and TensorRT-LLM store when the
    checkpoint carries no calibrated KV scales. The store holds the codes and two float32 scales (K's and V's),
    nothing per token or head."""

    SCALE_BYTES = 8  # one float32 scale for K and one for V

    def __init__(self, fmt: str) -> None:
        super().__init__(lambda x: StaticFp8Tensor.encode(x, fmt), StaticFp8Tensor.decode, StaticFp8Tensor.concat)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        from kvtune.kernels.decode_attention import decode_attention_fp8

        return decode_attention_fp8(query, self.k.as_fp8(), self.v.as_fp8(), scale=scale, return_probs=return_probs)


SCALES = ("head", "token", "tensor")


@dataclass
class FP8(Codec):
    """8-bit floating point KV with a float32 scale per head (or per token).

    Mechanism: scale = amax / fp8_max over the head (or token), codes = cast(x / scale) to e4m3 (more
    mantissa, range +-448) or e5m2 (more range, +-57344). Reference: the fp8 KV cache of vLLM/TensorRT-LLM
    (Micikevicius et al., "FP8 Formats for Deep Learning", 2022). Deviations: scales are computed from the
    data as it arrives (dynamic), whereas vLLM defaults to a scale of 1.0 unless calibrated; dynamic scales
    are the better case, so a deployment without calibration can be worse than measured here. Tokens
    appended after the prompt keep their own scale (the store becomes per-token: exact, 4 bytes more per
    token and head), where vLLM would reuse one static scale. ``scale="tensor"`` is that static scale: 1.0, as
    vLLM/SGLang/TensorRT-LLM use without calibrated scales (``recommend --stack`` measures it), values saturated
    to the format's range. ``scale="token"`` (e4m3) is vLLM 0.33's ``fp8_per_token_head``.
    Parameters: ``fmt`` e4m3|e5m2; ``scale`` head|token|tensor.
    """

    name: ClassVar[str] = "fp8"
    citation: ClassVar[str] = "Micikevicius et al., FP8 Formats for Deep Learning, 2022 (fp8 KV cache as in vLLM)"
    summary: ClassVar[str] = "8-bit float (e4m3/e5m2) with per-head or per-token scales"

    fmt: str = "e4m3"
    scale: str = "head"

    def __post_init__(self) -> None:
        if self.fmt not in ("e4m3", "e5m2"):
            raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {self.fmt!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")

    def new_store(self) -> Store:
        return StaticFp8Store(self.fmt) if self.scale == "tensor" else Fp8Store(self.fmt, self.scale)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        if self.scale == "tensor":
            return 2 * batch * heads * tokens * head_dim + (StaticFp8Store.SCALE_BYTES if tokens else 0)
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
