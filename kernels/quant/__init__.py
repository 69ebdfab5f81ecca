"""Quantize / dequantize / pack the KV cache: asymmetric int8/int4/int2 (KIVI layout) and fp8 e4m3/e5m2.

Public API::

    qt = quantize_int(x, bits=4, group_size=32, axis="token")   # x (B, H, T, D) fp32/fp16/bf16
    x_hat = dequantize_int(qt)                                 # (B, H, T, D), x.dtype
    f8 = quantize_fp8(x, fmt="e4m3", scale_axis="head")
    x_hat = dequantize_fp8(f8)
    concat_tokens([a, b])            # along the token axis, QuantizedTensor or Fp8Tensor
    qt.nbytes() == int_nbytes(qt.shape, qt.bits, qt.group_size, qt.axis, qt.dtype)
    f8.nbytes() == fp8_nbytes(f8.shape, f8.scale_axis)

Storage (see ``reference.py`` for the math):

* :class:`QuantizedTensor` holds ``packed`` codes as **uint8 words** ``(B, H, T, D*bits/8)`` packed along the
  channel axis (``8/bits`` codes per byte, little-endian bit fields), plus ``scale`` and ``zero`` in the input
  dtype: ``(B, H, T/G, D)`` for ``axis="token"`` (KIVI keys: per channel, groups of G consecutive tokens),
  ``(B, H, T, D/G)`` for ``axis="channel"`` (KIVI values: per token, groups of G channels).
* :class:`Fp8Tensor` holds ``data`` in ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` ``(B, H, T, D)`` and a
  float32 ``scale`` ``(B, H)`` (``scale_axis="head"``) or ``(B, H, T)`` (``"token"``).

Concatenating fp8 tensors: per-head scales of different parts generally differ, and requantizing would add
error, so :func:`concat_tokens` on fp8 parts returns a ``scale_axis="token"`` tensor whenever any part is
per-head (each token keeps the exact scale it was encoded with; the bytes are then counted as per-token
scales, and ``nbytes()`` / ``fp8_nbytes(shape, "token")`` agree). Concatenating only per-token parts stays
per-token. ``index_select_tokens`` keeps the scale axis (a per-head scale still applies to the kept tokens).

Inputs are validated with ValueError; values are assumed finite (NaN/inf are not checked, they would cost a
full reduction on every call).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..backend import Backend, resolve
from . import reference as _ref

__all__ = [
    "QuantizedTensor",
    "Fp8Tensor",
    "quantize_int",
    "dequantize_int",
    "quantize_fp8",
    "dequantize_fp8",
    "concat_tokens",
    "int_nbytes",
    "fp8_nbytes",
    "INT_BITS",
    "FP8_FORMATS",
]

INT_BITS = (2, 4, 8)
INT_AXES = ("token", "channel")
FP8_FORMATS = ("e4m3", "e5m2")
FP8_SCALE_AXES = ("head", "token")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- containers
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Integer-quantized ``(B, H, T, D)`` tensor: packed uint8 codes + per-group scale and zero (input dtype)."""

    packed: torch.Tensor  # (B, H, T, D*bits/8) uint8
    scale: torch.Tensor  # (B, H, T/G, D) for axis="token"; (B, H, T, D/G) for axis="channel"
    zero: torch.Tensor  # same shape and dtype as scale
    bits: int
    group_size: int
    axis: str
    shape: tuple
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    def nbytes(self) -> int:
        """Bytes of every stored tensor: packed codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def dequantize(self, backend: str | Backend | None = None) -> torch.Tensor:
        return dequantize_int(self, backend=backend)

    def index_select_tokens(self, idx: torch.Tensor) -> "QuantizedTensor":
        """Keep tokens ``idx`` ``(B, H, K)`` per (batch, head), in that order. Only for ``axis="channel"``:
        per-token groups carry their own scale and zero, so the gather is exact. Token-axis groups span
        several tokens and cannot be split without requantizing (ValueError)."""
        if self.axis != "channel":
            raise ValueError(
                "QuantizedTensor.index_select_tokens: only axis='channel' (per-token groups) can be gathered "
                f"exactly; this tensor has axis={self.axis!r} (groups of {self.group_size} tokens)"
            )
        idx = _check_token_index(idx, self.shape, self.device, "QuantizedTensor.index_select_tokens")
        b, h, _, d = self.shape
        k = idx.shape[2]
        packed = _gather_tokens(self.packed, idx)  # (B, H, K, D*bits/8)
        scale = _gather_tokens(self.scale, idx)  # (B, H, K, D/G)
        zero = _gather_tokens(self.zero, idx)  # (B, H, K, D/G)
        return dataclasses.replace(self, packed=packed, scale=scale, zero=zero, shape=(b, h, k, d))


@dataclasses.dataclass(frozen=True)
class Fp8Tensor:
    """fp8 ``(B, H, T, D)`` tensor with a float32 scale per (B, H) ("head") or per (B, H, T) ("token")."""

    data: torch.Tensor  # (B, H, T, D) float8_e4m3fn / float8_e5m2
    scale: torch.Tensor  # (B, H) or (B, H, T) float32
    fmt: str
    scale_axis: str
    shape: tuple
    dtype: torch.dtype  # dtype of the tensor that was quantized (what dequantize returns)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    def nbytes(self) -> int:
        """Bytes of every stored tensor: fp8 data + float32 scales."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale))

    def dequantize(self, backend: str | Backend | None = None) -> torch.Tensor:
        return dequantize_fp8(self, backend=backend)

    def index_select_tokens(self, idx: torch.Tensor) -> "Fp8Tensor":
        """Keep tokens ``idx`` ``(B, H, K)``; exact for both scale axes (the scale axis is kept)."""
        idx = _check_token_index(idx, self.shape, self.device, "Fp8Tensor.index_select_tokens")
        b, h, _, d = self.shape
        data = _gather_tokens(self.data.view(torch.uint8), idx).view(self.data.dtype)  # (B, H, K, D)
        scale = self.scale if self.scale_axis == "head" else self.scale.gather(2, idx)  # (B, H) / (B, H, K)
        return dataclasses.replace(self, data=data, scale=scale, shape=(b, h, idx.shape[2], d))


# ------------------------------------------------------------------------------------------ analytic sizes
def int_nbytes(shape: Sequence[int], bits: int, group_size: int, axis: str, dtype: torch.dtype) -> int:
    """Bytes a :class:`QuantizedTensor` of ``shape`` holds: ``B*H*T*D*bits/8`` packed code bytes plus a
    scale and a zero (each ``dtype``) per group: ``B*H*(T/G)*D`` groups (token axis) or ``B*H*T*(D/G)``."""
    b, h, t, d = (int(s) for s in shape)
    codes = b * h * t * d * bits // 8
    groups = b * h * (t // group_size) * d if axis == "token" else b * h * t * (d // group_size)
    return codes + 2 * groups * torch.empty((), dtype=dtype).element_size()


def fp8_nbytes(shape: Sequence[int], scale_axis: str) -> int:
    """Bytes an :class:`Fp8Tensor` of ``shape`` holds: one byte per value plus a float32 scale per (B, H)
    (``"head"``) or per (B, H, T) (``"token"``)."""
    b, h, t, d = (int(s) for s in shape)
    return b * h * t * d + 4 * (b * h if scale_axis == "head" else b * h * t)


# -------------------------------------------------------------------------------------------- validation
def _check_x(x, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: x must have shape (B, H, T, D), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: x dtype must be float32, float16 or bfloat16, got {x.dtype}")


def _check_token_index(idx, shape, device, where: str) -> torch.Tensor:
    b, h, t, _ = shape
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{where}: idx must be a torch.Tensor of shape (B, H, K), got {type(idx).__name__}")
    if idx.dim() != 3 or idx.shape[0] != b or idx.shape[1] != h:
        raise ValueError(f"{where}: idx must have shape ({b}, {h}, K), got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
        raise ValueError(f"{where}: idx must be an integer tensor, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{where}: idx is on {idx.device} but the tensor is on {device}")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t):
        raise ValueError(f"{where}: idx values must lie in [0, {t}), got [{int(idx.min())}, {int(idx.max())}]")
    return idx


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, H, T, W)`` gathered along T with ``idx (B, H, K)`` -> ``(B, H, K, W)``."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[3]))


# ----------------------------------------------------------------------------------------------- integer
def quantize_int(
    x: torch.Tensor, bits: int = 4, group_size: int = 32, axis: str = "token", backend: str | Backend | None = None
) -> QuantizedTensor:
    """Asymmetric integer quantization of ``x (B, H, T, D)`` with ``bits`` in {2, 4, 8}.

    ``axis="token"``: groups of ``group_size`` consecutive tokens per channel (KIVI keys), needs
    ``T % group_size == 0``. ``axis="channel"``: groups of ``group_size`` channels per token (KIVI values),
    needs ``D % group_size == 0``. ``group_size`` must be a power of two. Codes are packed along the channel
    axis into uint8 words (``D * bits`` must be a multiple of 8). Per group: ``scale = (max - min) /
    (2**bits - 1)`` (1 if zero), ``zero = min``, both stored in ``x.dtype``; ``q = clamp(round((x - zero) /
    scale))`` with round half up. Dequantization error per element is at most ``scale / 2`` plus the
    rounding of scale/zero/output to ``x.dtype``.
    """
    where = "quantize_int"
    _check_x(x, where)
    if bits not in INT_BITS:
        raise ValueError(f"{where}: bits must be one of {INT_BITS}, got {bits!r}")
    if axis not in INT_AXES:
        raise ValueError(f"{where}: axis must be 'token' or 'channel', got {axis!r}")
    if not isinstance(group_size, int) or group_size < 1 or group_size & (group_size - 1):
        raise ValueError(f"{where}: group_size must be a positive power of two, got {group_size!r}")
    b, h, t, d = x.shape
    if axis == "token" and t % group_size:
        raise ValueError(f"{where}: axis='token' needs T % group_size == 0, got T={t}, group_size={group_size}")
    if axis == "channel" and d % group_size:
        raise ValueError(f"{where}: axis='channel' needs D % group_size == 0, got D={d}, group_size={group_size}")
    if (d * bits) % 8:
        raise ValueError(f"{where}: D * bits must be a multiple of 8 to pack into bytes, got D={d}, bits={bits}")
    if resolve(backend, x.device) is Backend.TRITON and x.numel():
        packed, scale, zero = quantize_int_triton(x, bits, group_size, axis)
    else:
        packed, scale, zero = _ref.quantize_int_ref(x, bits, group_size, axis)
    return QuantizedTensor(packed, scale, zero, bits, group_size, axis, tuple(x.shape), x.dtype)


def dequantize_int(qt: QuantizedTensor, backend: str | Backend | None = None) -> torch.Tensor:
    """``(B, H, T, D)`` tensor in ``qt.dtype``: ``code * scale + zero`` per group."""
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"dequantize_int: expected a QuantizedTensor, got {type(qt).__name__}")
    if resolve(backend, qt.device) is Backend.TRITON and qt.packed.numel():
        return dequantize_int_triton(qt)
    return _ref.dequantize_int_ref(qt.packed, qt.scale, qt.zero, qt.bits, qt.group_size, qt.axis, qt.dtype)


# ------------------------------------------------------------------------------------------------- fp8
def quantize_fp8(
    x: torch.Tensor, fmt: str = "e4m3", scale_axis: str = "head", backend: str | Backend | None = None
) -> Fp8Tensor:
    """fp8 quantization of ``x (B, H, T, D)``: ``scale = amax / fp8_max`` (1 if amax is 0) per (B, H)
    (``scale_axis="head"``) or per (B, H, T) (``"token"``), float32; data = ``x / scale`` in fp8."""
    where = "quantize_fp8"
    _check_x(x, where)
    if fmt not in FP8_FORMATS:
        raise ValueError(f"{where}: fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    if scale_axis not in FP8_SCALE_AXES:
        raise ValueError(f"{where}: scale_axis must be 'head' or 'token', got {scale_axis!r}")
    if resolve(backend, x.device) is Backend.TRITON and x.numel():
        data, scale = quantize_fp8_triton(x, fmt, scale_axis)
    else:
        data, scale = _ref.quantize_fp8_ref(x, fmt, scale_axis)
    return Fp8Tensor(data, scale, fmt, scale_axis, tuple(x.shape), x.dtype)


def dequantize_fp8(f8: Fp8Tensor, backend: str | Backend | None = None) -> torch.Tensor:
    """``(B, H, T, D)`` tensor in ``f8.dtype``: ``data * scale``."""
    if not isinstance(f8, Fp8Tensor):
        raise ValueError(f"dequantize_fp8: expected an Fp8Tensor, got {type(f8).__name__}")
    if resolve(backend, f8.device) is Backend.TRITON and f8.data.numel():
        return dequantize_fp8_triton(f8)
    return _ref.dequantize_fp8_ref(f8.data, f8.scale, f8.dtype)


# ----------------------------------------------------------------------------------------------- concat
def concat_tokens(parts):
    """Concatenate :class:`QuantizedTensor` or :class:`Fp8Tensor` parts along the token axis (exact, no
    requantization). Integer parts must share bits, group_size, axis, dtype, B, H, D and device. fp8 parts
    must share fmt, dtype, B, H, D and device; if any part has a per-head scale the result is per-token
    (see the module docstring)."""
    where = "concat_tokens"
    parts = list(parts)
    if not parts:
        raise ValueError(f"{where}: needs at least one part")
    first = parts[0]
    if isinstance(first, QuantizedTensor):
        for i, p in enumerate(parts):
            if not isinstance(p, QuantizedTensor):
                raise ValueError(f"{where}: part {i} is {type(p).__name__}, expected QuantizedTensor like part 0")
            for field in ("bits", "group_size", "axis", "dtype", "device"):
                if getattr(p, field) != getattr(first, field):
                    raise ValueError(
                        f"{where}: part {i} has {field}={getattr(p, field)!r}, part 0 has {getattr(first, field)!r}"
                    )
            if (p.shape[0], p.shape[1], p.shape[3]) != (first.shape[0], first.shape[1], first.shape[3]):
                raise ValueError(f"{where}: part {i} has shape {p.shape}, incompatible with part 0 {first.shape}")
        b, h, _, d = first.shape
        t = sum(p.shape[2] for p in parts)
        return dataclasses.replace(
            first,
            packed=torch.cat([p.packed for p in parts], dim=2),  # (B, H, T, D*bits/8)
            scale=torch.cat([p.scale for p in parts], dim=2),  # (B, H, T/G, D) or (B, H, T, D/G)
            zero=torch.cat([p.zero for p in parts], dim=2),
            shape=(b, h, t, d),
        )
    if isinstance(first, Fp8Tensor):
        for i, p in enumerate(parts):
            if not isinstance(p, Fp8Tensor):
                raise ValueError(f"{where}: part {i} is {type(p).__name__}, expected Fp8Tensor like part 0")
            for field in ("fmt", "dtype", "device"):
                if getattr(p, field) != getattr(first, field):
                    raise ValueError(
                        f"{where}: part {i} has {field}={getattr(p, field)!r}, part 0 has {getattr(first, field)!r}"
                    )
            if (p.shape[0], p.shape[1], p.shape[3]) != (first.shape[0], first.shape[1], first.shape[3]):
                raise ValueError(f"{where}: part {i} has shape {p.shape}, incompatible with part 0 {first.shape}")
        if len(parts) == 1:
            return first
        b, h, _, d = first.shape
        t = sum(p.shape[2] for p in parts)
        scales = [
            p.scale[:, :, None].expand(b, h, p.shape[2]) if p.scale_axis == "head" else p.scale for p in parts
        ]  # each (B, H, T_i)
        data = torch.cat([p.data.view(torch.uint8) for p in parts], dim=2).view(first.data.dtype)  # (B, H, T, D)
        return dataclasses.replace(
            first, data=data, scale=torch.cat(scales, dim=2).contiguous(), scale_axis="token", shape=(b, h, t, d)
        )
    raise ValueError(f"{where}: parts must be QuantizedTensor or Fp8Tensor, got {type(first).__name__}")


# ------------------------------------------------------------------------------------------- launchers
# Imported lazily: ``kvtune.kernels.quant`` works without triton installed.
_BLOCK_T = 32


def quantize_int_triton(x, bits, group_size, axis):
    from . import triton as tk

    x = x.contiguous()
    b, h, t, d = x.shape
    packed = torch.empty((b, h, t, d * bits // 8), device=x.device, dtype=torch.uint8)
    block_d = _pow2(d, 16 if axis == "token" else max(group_size, 16))
    if axis == "token":
        scale = torch.empty((b, h, t // group_size, d), device=x.device, dtype=x.dtype)
        zero = torch.empty_like(scale)
        if t:
            tk.quantize_int_token_kernel[(b * h, t // group_size)](
                x, packed, scale, zero, t, d, G=group_size, BLOCK_D=block_d, BITS=bits
            )
    else:
        scale = torch.empty((b, h, t, d // group_size), device=x.device, dtype=x.dtype)
        zero = torch.empty_like(scale)
        tk.quantize_int_channel_kernel[(b * h, -(-t // _BLOCK_T))](
            x, packed, scale, zero, t, d, G=group_size, BLOCK_T=_BLOCK_T, BLOCK_D=block_d, BITS=bits
        )
    return packed, scale, zero


def dequantize_int_triton(qt):
    from . import triton as tk

    b, h, t, d = qt.shape
    out = torch.empty(qt.shape, device=qt.device, dtype=qt.dtype)
    tk.dequantize_int_kernel[(b * h, -(-t // _BLOCK_T))](
        qt.packed.contiguous(), qt.scale.contiguous(), qt.zero.contiguous(), out, t, d,
        G=qt.group_size, TOKEN_AXIS=qt.axis == "token", BLOCK_T=_BLOCK_T, BLOCK_D=_pow2(d, 16), BITS=qt.bits,
    )
    return out


def quantize_fp8_triton(x, fmt, scale_axis):
    from . import triton as tk

    x = x.contiguous()
    b, h, t, d = x.shape
    fmax = _ref.FP8_MAX[fmt]
    data = torch.empty(x.shape, device=x.device, dtype=_ref.FP8_DTYPES[fmt])
    nt = -(-t // _BLOCK_T)
    block_d = _pow2(d, 16)
    if scale_axis == "token":
        scale = torch.empty((b, h, t), device=x.device, dtype=torch.float32)
    else:
        part = torch.empty((b * h, nt), device=x.device, dtype=torch.float32)
        tk.amax_partial_kernel[(b * h, nt)](x, part, t, d, nt, BLOCK_T=_BLOCK_T, BLOCK_D=block_d)
        scale = part.amax(dim=1).reshape(b, h) / fmax  # (B, H): a few numbers, reduced here
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    tk.quantize_fp8_kernel[(b * h, nt)](
        x, data, scale, t, d, fmax, PER_TOKEN=scale_axis == "token", BLOCK_T=_BLOCK_T, BLOCK_D=block_d,
        MANT_BITS=3 if fmt == "e4m3" else 2, MIN_EXP=-6 if fmt == "e4m3" else -14,
    )
    return data, scale


def dequantize_fp8_triton(f8):
    from . import triton as tk

    b, h, t, d = f8.shape
    out = torch.empty(f8.shape, device=f8.device, dtype=f8.dtype)
    tk.dequantize_fp8_kernel[(b * h, -(-t // _BLOCK_T))](
        f8.data.contiguous(), f8.scale.contiguous(), out, t, d,
        PER_TOKEN=f8.scale_axis == "token", BLOCK_T=_BLOCK_T, BLOCK_D=_pow2(d, 16),
    )
    return out
