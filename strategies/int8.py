"""int8: 8-bit per-token quantization of keys and values, asymmetric (scale + zero) or symmetric (scale only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import dequantize_int, int_nbytes, quantize_int
from kvtune.strategies.base import Codec, Store
from kvtune.strategies.per_token import PerTokenStore

SCALE_BYTES = 4  # a symmetric group's scale is float32, as vLLM stores it


def quantize_symmetric(x: torch.Tensor, group_size: int) -> "SymmetricInt8Tensor":
    """Symmetric int8 of ``x`` (B, H, T, D) per token and ``group_size`` channels: codes int8 (B, H, T, D) and
    scale float32 (B, H, T, D/G).

    vLLM 0.33's per-token-head formula (``_reshape_cache_per_token_head`` in
    vllm/v1/attention/ops/triton_reshape_and_cache_flash.py, ``IS_INT_QUANT``): ``scale = max(amax / 127, 1e-6)``
    in float32, ``q = x * (1 / scale)`` rounded half away from zero, clamped to [-128, 127]. Decoding is
    ``q * scale`` (vLLM folds the scale into the scores and the softmax weights; the product is the same).
    """
    b, h, t, d = x.shape
    g = x.float().reshape(b, h, t, d // group_size, group_size)  # (B, H, T, D/G, G)
    scale = (g.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-6)  # (B, H, T, D/G, 1) float32
    q = g * (1.0 / scale)
    q = torch.where(q >= 0, q + 0.5, q - 0.5).clamp(-128.0, 127.0).trunc()  # half away from zero
    return SymmetricInt8Tensor(q.to(torch.int8).reshape(b, h, t, d), scale.squeeze(-1), x.dtype)


def dequantize_symmetric(st: "SymmetricInt8Tensor") -> torch.Tensor:
    """``codes * scale`` in float32, cast to the encoded tensor's dtype: (B, H, T, D)."""
    b, h, t, d = st.codes.shape
    g = st.codes.float().reshape(b, h, t, st.scale.shape[-1], -1)  # (B, H, T, D/G, G)
    return (g * st.scale[..., None]).reshape(b, h, t, d).to(st.dtype)


@dataclass(frozen=True)
class SymmetricInt8Tensor:
    """Symmetric int8 codes (B, H, T, D) and one float32 scale per token and group of channels (B, H, T, D/G).
    Every token carries its own scales, so concatenation and token gathers are exact."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype  # of the tensor that was quantized (what decoding returns)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))

    def index_select_tokens(self, idx: torch.Tensor) -> "SymmetricInt8Tensor":
        """Keep tokens ``idx`` (B, H, K) per (batch, head), in that order."""
        idx = idx.long()[..., None]  # (B, H, K, 1)
        pick = lambda t: t.gather(2, idx.expand(-1, -1, -1, t.shape[-1]))  # noqa: E731 - (B, H, K, W)
        return SymmetricInt8Tensor(pick(self.codes), pick(self.scale), self.dtype)

    @staticmethod
    def concat(parts: list["SymmetricInt8Tensor"]) -> "SymmetricInt8Tensor":
        """Join along the token axis."""
        return SymmetricInt8Tensor(torch.cat([p.codes for p in parts], dim=2), torch.cat([p.scale for p in parts], dim=2),
                                   parts[0].dtype)


@dataclass
class Int8(Codec):
    """int8 codes per token and ``group_size`` channels, for K and V; asymmetric by default, or symmetric.

    Mechanism: asymmetric: per token and group, scale = (max - min) / 255 and zero = min, stored in the KV dtype.
    Symmetric (``symmetric: true``): scale = absmax / 127 in float32, codes rounded half away from zero; with one
    group per head (``group_size`` >= head_dim) it is vLLM 0.33's ``int8_per_token_head`` formula exactly (see
    :func:`quantize_symmetric`), which ``recommend --stack vllm`` searches and the vLLM export writes.
    Reference: the per-token int8 KV cache of serving stacks (LMDeploy, TensorRT-LLM int8 KV, vLLM 0.33's
    ``int8_per_token_head``). Deviations: the default is asymmetric (scale + zero), which costs one more scale per
    group and halves the worst-case error on skewed channels; the serving stacks quantize symmetrically.
    Parameters: ``group_size`` in {16, 32, 64, 128} channels (capped at head_dim); ``symmetric`` false|true.
    """

    name: ClassVar[str] = "int8"
    citation: ClassVar[str] = "per-token int8 KV cache (as in LMDeploy / TensorRT-LLM int8 KV / vLLM int8_per_token_head)"
    summary: ClassVar[str] = "8-bit per token, grouped channels; asymmetric or symmetric"

    group_size: int = 64
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.group_size not in (16, 32, 64, 128):
            raise ValueError(f"group_size must be one of 16, 32, 64, 128, got {self.group_size}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")

    def new_store(self) -> Store:
        group = self.group_size
        if self.symmetric:
            return PerTokenStore(lambda x: quantize_symmetric(x, min(group, x.shape[-1])), dequantize_symmetric,
                                 SymmetricInt8Tensor.concat)
        return PerTokenStore(
            lambda x: quantize_int(x, bits=8, group_size=min(group, x.shape[-1]), axis="channel"), dequantize_int)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        g = min(self.group_size, head_dim)
        if self.symmetric:  # int8 codes + one float32 scale per group, K and V
            return 2 * batch * heads * tokens * (head_dim + SCALE_BYTES * (head_dim // g))
        return 2 * int_nbytes((batch, heads, tokens, head_dim), 8, g, "channel", dtype)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        # symmetric is sampled only where a stack variant fixes it (--stack vllm: int8_per_token_head); the default
        # search keeps the asymmetric codes, whose error on skewed channels is bounded tighter
        return {"group_size": trial.suggest_categorical("int8.group_size", [32, 64, 128])}

    @classmethod
    def search_space_doc(cls) -> str:
        return "group_size {32, 64, 128}; symmetric false (true with --stack vllm: int8_per_token_head)"
