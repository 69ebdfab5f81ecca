"""KIVI: 2/4-bit asymmetric quantization, keys per channel, values per token, recent tokens in full precision."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.kernels.quant import QuantizedTensor, concat_tokens, dequantize_int, int_nbytes, quantize_int
from kvtune.strategies.base import Codec, Store, TokenView, tensor_bytes

# How the full-precision value window moves (``KIVI.value_window``):
#   "paper"        the paper's policy: the newest ``residual`` values always stay in full precision, a sliding
#                  window; when a token enters, the oldest value beyond the window is quantized (per token).
#   "key_schedule" the values are quantized together with the keys, on the keys' group schedule, so right after
#                  a flush no value is in full precision (kvtune's policy before the parameter existed).
VALUE_WINDOWS = ("paper", "key_schedule")


def kivi_split(tokens: int, group_size: int, residual: int) -> tuple[int, int]:
    """Keys: (quantized, full-precision) token counts after one append of ``tokens`` into an empty store.

    The key residual fills up to ``residual`` tokens; when it reaches that, every whole group of ``group_size``
    in it is quantized and the remainder (< group_size) stays in full precision. Under ``value_window:
    key_schedule`` the values split the same way.
    """
    if tokens < residual:
        return 0, tokens
    quantized = (tokens // group_size) * group_size
    return quantized, tokens - quantized


def kivi_value_split(tokens: int, group_size: int, residual: int, value_window: str) -> tuple[int, int]:
    """Values: (quantized, full-precision) token counts after one append of ``tokens`` into an empty store."""
    if value_window == "paper":
        full = min(tokens, residual)
        return tokens - full, full
    return kivi_split(tokens, group_size, residual)


def _slice_tokens(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Tokens ``start:stop`` of ``qt`` (whole groups for ``axis="token"``), contiguous."""
    g = qt.group_size if qt.axis == "token" else 1
    b, h, _, d = qt.shape
    return dataclasses.replace(qt, packed=qt.packed[:, :, start:stop].contiguous(),
                               scale=qt.scale[:, :, start // g:stop // g].contiguous(),
                               zero=qt.zero[:, :, start // g:stop // g].contiguous(), shape=(b, h, stop - start, d))


class KiviStore(Store):
    """Keys: ``kq`` (quantized, whole groups of G tokens per channel) then ``k_res`` (full precision, < residual
    tokens after a flush). Values: ``vq`` (quantized per token in groups of G channels) then ``v_res`` (full
    precision): the newest ``residual`` under the paper's policy, the same tokens as ``k_res`` under
    ``key_schedule``. So at most as many values as keys are quantized (``n_vq <= n_kq``)."""

    working_buffers = ("_deq", "_split")

    def __init__(self, bits: int, group_size: int, residual: int, value_window: str = "paper") -> None:
        self.bits, self.group_size, self.residual, self.value_window = bits, group_size, residual, value_window
        self.kq: QuantizedTensor | None = None  # axis="token": (B, H, n_kq, D)
        self.vq: QuantizedTensor | None = None  # axis="channel": (B, H, n_vq, D)
        self.k_res: torch.Tensor | None = None  # (B, H, n - n_kq, D) full precision
        self.v_res: torch.Tensor | None = None  # (B, H, n - n_vq, D) full precision
        self.n_kq = 0
        self.n_vq = 0
        self.n_tokens = 0
        # decoded quantized parts (keys, values), extended as tokens are quantized; None until first asked
        self._deq: tuple[TokenView, TokenView] | None = None
        self._split: tuple | None = None  # attend()'s operands, until the store changes

    @property
    def n_quantized(self) -> int:
        """Keys quantized (values: ``n_vq``)."""
        return self.n_kq

    @property
    def n_residual(self) -> int:
        """Keys in full precision."""
        return self.n_tokens - self.n_kq

    def _quantize_keys(self, n: int) -> None:
        kq = quantize_int(self.k_res[:, :, :n], bits=self.bits, group_size=self.group_size, axis="token")
        self.kq = kq if self.kq is None else concat_tokens([self.kq, kq])
        self.k_res = self.k_res[:, :, n:].contiguous()
        self.n_kq += n
        if self._deq is not None:
            self._deq[0].append(dequantize_int(kq))

    def _quantize_values(self, n: int) -> None:
        gv = min(self.group_size, self.v_res.shape[-1])
        vq = quantize_int(self.v_res[:, :, :n], bits=self.bits, group_size=gv, axis="channel")
        self.vq = vq if self.vq is None else concat_tokens([self.vq, vq])
        self.v_res = self.v_res[:, :, n:].contiguous()
        self.n_vq += n
        if self._deq is not None:
            self._deq[1].append(dequantize_int(vq))

    def _flush(self, force: bool = False) -> None:
        """Keys: once the key residual reaches ``residual`` (or when ``force``), quantize every whole group in
        it. Values: under ``key_schedule`` the same tokens; under ``paper`` every value older than the newest
        ``residual``."""
        rk = self.n_tokens - self.n_kq
        if rk >= self.residual or force:
            n = (rk // self.group_size) * self.group_size
            if n:
                self._quantize_keys(n)
                if self.value_window == "key_schedule":
                    self._quantize_values(n)
        if self.value_window == "paper":
            over = self.n_tokens - self.n_vq - self.residual
            if over > 0:
                self._quantize_values(over)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.k_res = keys if self.k_res is None else torch.cat([self.k_res, keys], dim=-2)
        self.v_res = values if self.v_res is None else torch.cat([self.v_res, values], dim=-2)
        self.n_tokens += keys.shape[-2]
        self._split = None
        self._flush()

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._deq is None:  # memoized: later flushes dequantize only their new tokens (nbytes excludes it)
            b, h, _, d = self.k_res.shape
            empty = self.k_res.new_empty((b, h, 0, d))
            self._deq = (TokenView(empty if self.kq is None else dequantize_int(self.kq)),
                         TokenView(empty if self.vq is None else dequantize_int(self.vq)))
        return self._deq[0].tensor(), self._deq[1].tensor()

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kq is None and self.vq is None:
            return self.k_res, self.v_res
        kd, vd = self._dequantized()
        return torch.cat([kd, self.k_res], dim=-2), torch.cat([vd, self.v_res], dim=-2)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        """The int kernel over the first ``m`` tokens, quantized in both keys and values (``m`` = the quantized
        values rounded down to whole key groups), and the rest in full precision: under ``key_schedule`` that
        is exactly the residual; under ``paper`` it adds the keys quantized beyond ``m`` (< residual + G
        tokens), dequantized once per store change, as the paper's kernel reads its quantized and
        full-precision parts separately."""
        from kvtune.kernels.decode_attention import decode_attention, decode_attention_int

        if self._split is None:
            m = (self.n_vq // self.group_size) * self.group_size
            if m == 0:
                self._split = (None, None, *self.decoded())
            else:
                k_tail, v_tail = self.k_res, self.v_res  # (B, H, n - m, D) once the quantized tails join
                if self.n_kq > m:
                    k_tail = torch.cat([self._deq[0].tensor()[:, :, m:] if self._deq is not None else
                                        dequantize_int(_slice_tokens(self.kq, m, self.n_kq)), k_tail], dim=-2)
                if self.n_vq > m:
                    v_tail = torch.cat([self._deq[1].tensor()[:, :, m:] if self._deq is not None else
                                        dequantize_int(_slice_tokens(self.vq, m, self.n_vq)), v_tail], dim=-2)
                kq = self.kq if self.n_kq == m else _slice_tokens(self.kq, 0, m)
                vq = self.vq if self.n_vq == m else _slice_tokens(self.vq, 0, m)
                self._split = (kq, vq, k_tail, v_tail)
        kq, vq, k_tail, v_tail = self._split
        if kq is None:
            return decode_attention(query, k_tail, v_tail, scale=scale, return_probs=return_probs)
        return decode_attention_int(query, kq, vq, k_tail, v_tail, scale=scale, return_probs=return_probs)

    def keep(self, idx: torch.Tensor) -> None:
        # Keys are grouped along tokens, so a subset cannot be cut out of the codes: decode, select, re-encode.
        k, v = self.decoded()
        gather = idx.unsqueeze(-1).expand(*idx.shape, k.shape[-1])  # (B, H, K, D)
        k, v = k.gather(2, gather), v.gather(2, gather)
        self.__init__(self.bits, self.group_size, self.residual, self.value_window)  # type: ignore[misc]
        self.append(k, v)
        self._flush(force=True)  # tokens that were quantized before stay quantized (whole key groups)

    def nbytes(self) -> int:
        held = tensor_bytes(self.k_res, self.v_res)
        if self.kq is not None:
            held += self.kq.nbytes()
        if self.vq is not None:
            held += self.vq.nbytes()
        return held

    def __len__(self) -> int:
        return self.n_tokens


@dataclass
class KIVI(Codec):
    """KIVI: keys quantized per channel in groups of ``group_size`` tokens, values per token in groups of
    ``group_size`` channels, both asymmetric with ``bits`` bits, the newest tokens in full precision. Keys wait
    in a full-precision residual until ``residual`` have gathered, then every whole group among them is
    quantized; values follow ``value_window``: ``paper`` keeps the newest ``residual`` values in full
    precision at every step (a sliding window, the oldest value beyond it quantized as a token enters);
    ``key_schedule`` quantizes the values with the keys, so after a flush no value is in full precision.

    Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024.
    Deviations: the key residual is flushed in whole groups as soon as it reaches ``residual`` tokens, the
    remainder (< group_size) staying in full precision (the paper flushes exactly ``residual`` tokens and keeps
    ``T mod residual`` after prefill); ``key_schedule`` is not the paper's (it was kvtune's only policy before
    ``value_window`` existed, and costs +1.3 perplexity at 2 bits on the bundled model, docs/strategies.md). A
    decode-time eviction over KIVI storage (H2O + KIVI) decodes, selects and re-encodes, so the kept tokens are
    quantized twice.
    Parameters: ``bits`` 2|4; ``group_size`` 16|32|64|128 (paper: 32); ``residual`` a multiple of group_size
    (paper: 128); ``value_window`` paper|key_schedule (default paper). In a pipeline document an omitted
    ``value_window`` means ``key_schedule`` (``legacy_defaults``): what documents written before it meant.
    """

    name: ClassVar[str] = "kivi"
    citation: ClassVar[str] = "Liu et al., KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, ICML 2024"
    summary: ClassVar[str] = "2/4-bit, keys per channel, values per token, full-precision residual"
    legacy_defaults: ClassVar[dict[str, Any]] = {"value_window": "key_schedule"}

    bits: int = 4
    group_size: int = 32
    residual: int = 128
    value_window: str = "paper"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"bits must be 2 or 4, got {self.bits}")
        if self.group_size not in (16, 32, 64, 128):
            raise ValueError(f"group_size must be one of 16, 32, 64, 128, got {self.group_size}")
        if self.residual < self.group_size or self.residual % self.group_size:
            raise ValueError(f"residual must be a positive multiple of group_size ({self.group_size}), got {self.residual}")
        if self.value_window not in VALUE_WINDOWS:
            raise ValueError(f"value_window must be one of {', '.join(VALUE_WINDOWS)}, got {self.value_window!r}")

    def new_store(self) -> Store:
        return KiviStore(self.bits, self.group_size, self.residual, self.value_window)

    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        nkq, nkr = kivi_split(tokens, self.group_size, self.residual)
        nvq, nvr = kivi_value_split(tokens, self.group_size, self.residual, self.value_window)
        held = batch * heads * (nkr + nvr) * head_dim * torch.finfo(dtype).bits // 8
        if nkq:
            held += int_nbytes((batch, heads, nkq, head_dim), self.bits, self.group_size, "token", dtype)
        if nvq:
            held += int_nbytes((batch, heads, nvq, head_dim), self.bits, min(self.group_size, head_dim), "channel",
                               dtype)
        return held

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {
            "bits": trial.suggest_categorical("kivi.bits", [2, 4]),
            "group_size": trial.suggest_categorical("kivi.group_size", [32, 64]),
            "residual": trial.suggest_categorical("kivi.residual", [64, 128]),
            "value_window": "paper",  # not searched: key_schedule saves < residual values' precision, loses more
        }

    @classmethod
    def search_space_doc(cls) -> str:
        return "bits {2, 4}, group_size {32, 64}, residual {64, 128}; value_window paper (fixed)"
