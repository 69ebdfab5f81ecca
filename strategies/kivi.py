"""KIVI: 2/4-bit asymmetric quantization, keys per channel, values per token, recent tokens in full precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import concat_tokens, dequantize_int, int_nbytes, quantize_int
from kvtune.strategies.base import Codec, Store, tensor_bytes


def kivi_split(tokens: int, group_size: int, residual: int) -> tuple[int, int]:
    """(quantized, full-precision) token counts after one append of ``tokens`` into an empty store.

    The residual fills up to ``residual`` tokens; when it reaches that, every whole group of ``group_size``
    in it is quantized and the remainder (< group_size) stays in full precision.
    """
    if tokens < residual:
        return 0, tokens
    quantized = (tokens // group_size) * group_size
    return quantized, tokens - quantized


class KiviStore(Store):
    working_buffers = ("_deq",)

    def __init__(self, bits: int, group_size: int, residual: int) -> None:
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.kq = None  # QuantizedTensor, axis="token": (B, H, Nq, D) in groups of G tokens per channel
        self.vq = None  # QuantizedTensor, axis="channel": per token, groups of G channels
        self.k_res: torch.Tensor | None = None  # (B, H, R, D) full precision, R < residual after a flush
        self.v_res: torch.Tensor | None = None
        self.n_quantized = 0
        self.n_residual = 0
        self._deq: tuple[torch.Tensor, torch.Tensor] | None = None  # decoded quantized part, until it changes

    def _flush(self, force: bool = False) -> None:
        if self.n_residual < self.residual and not force:
            return
        n = (self.n_residual // self.group_size) * self.group_size
        if n == 0:
            return
        k_new, v_new = self.k_res[:, :, :n], self.v_res[:, :, :n]
        gv = min(self.group_size, k_new.shape[-1])
        kq = quantize_int(k_new, bits=self.bits, group_size=self.group_size, axis="token")
        vq = quantize_int(v_new, bits=self.bits, group_size=gv, axis="channel")
        self._deq = None if self._deq is None else (
            torch.cat([self._deq[0], dequantize_int(kq)], dim=-2), torch.cat([self._deq[1], dequantize_int(vq)], dim=-2))
        self.kq = kq if self.kq is None else concat_tokens([self.kq, kq])
        self.vq = vq if self.vq is None else concat_tokens([self.vq, vq])
        self.k_res, self.v_res = self.k_res[:, :, n:].contiguous(), self.v_res[:, :, n:].contiguous()
        self.n_quantized += n
        self.n_residual -= n

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.k_res = keys if self.k_res is None else torch.cat([self.k_res, keys], dim=-2)
        self.v_res = values if self.v_res is None else torch.cat([self.v_res, values], dim=-2)
        self.n_residual += keys.shape[-2]
        self._flush()

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kq is None:
            return self.k_res, self.v_res
        if self._deq is None:  # memoized between flushes: only new groups are dequantized (nbytes excludes it)
            self._deq = (dequantize_int(self.kq), dequantize_int(self.vq))
        k = torch.cat([self._deq[0], self.k_res], dim=-2)
        v = torch.cat([self._deq[1], self.v_res], dim=-2)
        return k, v

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        from kvtune.kernels.decode_attention import decode_attention, decode_attention_int

        if self.kq is None:
            return decode_attention(query, self.k_res, self.v_res, scale=scale, return_probs=return_probs)
        return decode_attention_int(query, self.kq, self.vq, self.k_res, self.v_res, scale=scale,
                                    return_probs=return_probs)

    def keep(self, idx: torch.Tensor) -> None:
        # Keys are grouped along tokens, so a subset cannot be cut out of the codes: decode, select, re-encode.
        k, v = self.decoded()
        gather = idx.unsqueeze(-1).expand(*idx.shape, k.shape[-1])  # (B, H, K, D)
        k, v = k.gather(2, gather), v.gather(2, gather)
        self.__init__(self.bits, self.group_size, self.residual)  # type: ignore[misc]
        self.append(k, v)
        self._flush(force=True)  # tokens that were quantized before stay quantized (whole groups)

    def nbytes(self) -> int:
        held = tensor_bytes(self.k_res, self.v_res)
        if self.kq is not None:
            held += self.kq.nbytes() + self.vq.nbytes()
        return held

    def __len__(self) -> int:
        return self.n_quantized + self.n_residual


@dataclass
class KIVI(Codec):
    """KIVI: keys quantized per channel in groups of ``group_size`` tokens, values per token in groups of
    ``group_size`` channels, both asymmetric with ``bits`` bits; the newest tokens wait in full precision
    until ``residual`` have gathered, then every whole group among them is quantized.

    Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024.
    Deviations: the residual is flushed in whole groups as soon as it reaches ``residual`` tokens (the paper
    flushes exactly ``residual`` tokens); the value residual follows the key residual. A decode-time eviction
    over KIVI storage (H2O + KIVI) decodes, selects and re-encodes, so the kept tokens are quantized twice.
    Parameters: ``bits`` 2|4; ``group_size`` 32|64|128 (paper: 32); ``residual`` a multiple of group_size,
    32..256 (paper: 128).
    """

    name: ClassVar[str] = "kivi"
    citation: ClassVar[str] = "Liu et al., KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, ICML 2024"
    summary: ClassVar[str] = "2/4-bit, keys per channel, values per token, full-precision residual"

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"bits must be 2 or 4, got {self.bits}")
        if self.group_size not in (16, 32, 64, 128):
            raise ValueError(f"group_size must be one of 16, 32, 64, 128, got {self.group_size}")
        if self.residual < self.group_size or self.residual % self.group_size:
            raise ValueError(f"residual must be a positive multiple of group_size ({self.group_size}), got {self.residual}")

    def new_store(self) -> Store:
        return KiviStore(self.bits, self.group_size, self.residual)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        nq, nr = kivi_split(tokens, self.group_size, self.residual)
        full = 2 * batch * heads * nr * head_dim * torch.finfo(dtype).bits // 8
        if nq == 0:
            return full
        gv = min(self.group_size, head_dim)
        shape = (batch, heads, nq, head_dim)
        return full + int_nbytes(shape, self.bits, self.group_size, "token", dtype) + int_nbytes(
            shape, self.bits, gv, "channel", dtype
        )

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "bits": trial.suggest_categorical("kivi.bits", [2, 4]),
            "group_size": trial.suggest_categorical("kivi.group_size", [32, 64]),
            "residual": trial.suggest_categorical("kivi.residual", [64, 128]),
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "bits {2, 4}, group_size {32, 64}, residual {64, 128}"
