"""fp8: keys and values cast to 8-bit floats (e4m3 or e5m2) with a scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import Fp8Tensor, dequantize_fp8, fp8_nbytes, quantize_fp8
from kvtune.kernels.quant.reference import FP8_DTYPES, FP8_MAX, fp8_values
from kvtune.strategies.base import Codec, Store, TokenView
from kvtune.strategies.per_token import PerTokenStore


class Fp8Store(PerTokenStore):
    def __init__(self, fmt: str, scale: str) -> None:
        super().__init__(lambda x: quantize_fp8(x, fmt=fmt, scale_axis=scale), dequantize_fp8)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        from kvtune.kernels.decode_attention import decode_attention_fp8

        return decode_attention_fp8(query, self.k, self.v, scale=scale, return_probs=return_probs)


class StaticFp8Store(Store):
    """fp8 codes with one static scale of 1.0 (``scale="tensor"``): what vLLM, SGLang and TensorRT-LLM store when the
    checkpoint carries no calibrated KV scales. Values are saturated to the format's range and cast; the scale is a
    per-layer constant, so the store holds the codes and two float32 scales (K and V), nothing per token or head."""

    working_buffers = ("_view",)
    SCALE_BYTES = 8  # one float32 scale for K and one for V

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.k: torch.Tensor | None = None  # (B, H, N, D) float8
        self.scales: torch.Tensor | None = None  # (2,) float32: K's and V's static scale, 1.0
        self.v: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.tokens = 0
        self._view: tuple[TokenView, TokenView] | None = None

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        fmax = FP8_MAX[self.fmt]
        return x.float().clamp(-fmax, fmax).to(FP8_DTYPES[self.fmt])  # (B, H, T, D), scale 1.0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        kq, vq = self._encode(keys), self._encode(values)
        self.dtype = keys.dtype
        if self.scales is None:
            self.scales = torch.ones(2, dtype=torch.float32, device=keys.device)
        self.k = kq if self.k is None else torch.cat([self.k, kq], dim=-2)
        self.v = vq if self.v is None else torch.cat([self.v, vq], dim=-2)
        self.tokens += keys.shape[-2]
        if self._view is not None:
            self._view[0].append(fp8_values(kq).to(self.dtype))
            self._view[1].append(fp8_values(vq).to(self.dtype))

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._view is None:
            self._view = (TokenView(fp8_values(self.k).to(self.dtype)), TokenView(fp8_values(self.v).to(self.dtype)))
        return self._view[0].tensor(), self._view[1].tensor()

    def keep(self, idx: torch.Tensor) -> None:
        gather = idx.long()[..., None].expand(-1, -1, -1, self.k.shape[-1])  # (B, H, K, D)
        pick = lambda x: x.view(torch.uint8).gather(2, gather).view(x.dtype)  # noqa: E731 - no fp8 gather on CPU
        self.k, self.v = pick(self.k), pick(self.v)
        self.tokens = idx.shape[-1]
        self._view = None

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.scales))

    def __len__(self) -> int:
        return self.tokens

    def _as_fp8(self, data: torch.Tensor) -> Fp8Tensor:  # a view for the fused kernel: scale 1.0 per (B, H)
        b, h = data.shape[:2]
        return Fp8Tensor(data, torch.ones(b, h, dtype=torch.float32, device=data.device), self.fmt, "head",
                         tuple(data.shape), self.dtype)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        from kvtune.kernels.decode_attention import decode_attention_fp8

        return decode_attention_fp8(query, self._as_fp8(self.k), self._as_fp8(self.v), scale=scale,
                                    return_probs=return_probs)


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
