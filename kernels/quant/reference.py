"""PyTorch reference for the KV-cache quantizers: asymmetric integer (KIVI layout) and fp8.

Integer codes
-------------
For a group of values ``g`` the code of ``x`` is ``q = clamp(floor((x - zero) / scale + 1/2), 0, 2**bits - 1)``
with ``zero = min(g)`` and ``scale = (max(g) - min(g)) / (2**bits - 1)`` (a zero scale, i.e. a constant group,
is replaced by 1 so the group decodes exactly to ``zero``). ``scale`` and ``zero`` are rounded to the input
dtype *before* the codes are computed, so the codes are the best ones for the scale and zero actually stored.
Rounding is half-up (``floor(v + 1/2)``), the same in the Triton kernel, so both produce identical codes.

Groups run along one of two axes of ``x`` with shape ``(B, H, T, D)``:

* ``axis="token"``: ``G`` consecutive tokens of one channel (KIVI keys, per channel). scale/zero ``(B, H, T/G, D)``.
* ``axis="channel"``: ``G`` consecutive channels of one token (KIVI values, per token). scale/zero ``(B, H, T, D/G)``.

Packing: always along the channel axis into ``uint8`` words, ``8 / bits`` codes per byte, channel ``c`` of a
token in byte ``c // (8/bits)`` at bit offset ``(c % (8/bits)) * bits`` (little-endian within the byte).
Packed codes have shape ``(B, H, T, D * bits / 8)``; a token's codes are contiguous, so tokens can be gathered
or concatenated without unpacking.

fp8
---
``scale = amax / fp8_max`` (a zero amax gives scale 1), ``data = (x / scale).clamp(-fp8_max, fp8_max)`` cast to
``float8_e4m3fn`` or ``float8_e5m2`` (round to nearest even), scale in float32 per ``(B, H)`` ("head") or per
``(B, H, T)`` ("token").
"""

from __future__ import annotations

import torch

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": torch.finfo(torch.float8_e4m3fn).max, "e5m2": torch.finfo(torch.float8_e5m2).max}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., D)`` (values in ``[0, 2**bits)``) into uint8 words ``(..., D * bits / 8)``."""
    per_word = 8 // bits
    c = codes.to(torch.uint8)
    if per_word == 1:
        return c
    c = c.reshape(*codes.shape[:-1], codes.shape[-1] // per_word, per_word)  # (..., D/E, E)
    out = c[..., 0].clone()
    for i in range(1, per_word):  # disjoint bit fields: or-ing in uint8, no wider intermediate
        out |= c[..., i] << (i * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(..., W)`` -> codes ``(..., W * 8 / bits)`` (int32 by default).
    Shift and mask in uint8 (on a CPU this beats a 256-entry table gather, whose int64 index costs more than
    the gather saves)."""
    per_word = 8 // bits
    if per_word == 1:
        return packed.to(dtype)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (E,)
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., W, E)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).to(dtype)


def _grouped(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """View ``x (B, H, T, D)`` with the group elements on a dimension of its own."""
    b, h, t, d = x.shape
    if axis == "token":
        return x.reshape(b, h, t // group_size, group_size, d)  # (B, H, T/G, G, D), reduce dim 3
    return x.reshape(b, h, t, d // group_size, group_size)  # (B, H, T, D/G, G), reduce dim 4


def quantize_int_ref(x: torch.Tensor, bits: int, group_size: int, axis: str):
    """Return ``(packed uint8 (B,H,T,D*bits/8), scale, zero)``; scale/zero in ``x.dtype`` (see module doc)."""
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    g = _grouped(x.float(), group_size, axis)
    red = 3 if axis == "token" else 4
    lo = g.amin(dim=red, keepdim=True)  # (B,H,T/G,1,D) or (B,H,T,D/G,1)
    hi = g.amax(dim=red, keepdim=True)
    scale = ((hi - lo) / levels).to(x.dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = lo.to(x.dtype)
    v = (g - zero.float()) / scale.float()
    codes = torch.floor(v + 0.5).clamp_(0, levels).to(torch.uint8).reshape(b, h, t, d)  # (B, H, T, D)
    return pack_codes(codes, bits), scale.squeeze(red), zero.squeeze(red)


def dequantize_int_ref(packed, scale, zero, bits: int, group_size: int, axis: str, dtype: torch.dtype):
    """Inverse of :func:`quantize_int_ref` up to the rounding of the codes; returns ``(B, H, T, D)`` in ``dtype``."""
    codes = unpack_codes(packed, bits, torch.float32)  # (B, H, T, D)
    b, h, t, d = codes.shape
    g = _grouped(codes, group_size, axis)  # (B, H, T/G, G, D) or (B, H, T, D/G, G)
    red = 3 if axis == "token" else 4
    out = torch.addcmul(zero.float().unsqueeze(red), g, scale.float().unsqueeze(red))  # broadcast, no copies
    return out.reshape(b, h, t, d).to(dtype)


def quantize_fp8_ref(x: torch.Tensor, fmt: str, scale_axis: str):
    """Return ``(data fp8 (B,H,T,D), scale float32 (B,H) or (B,H,T))``."""
    fmax = FP8_MAX[fmt]
    xf = x.float()
    if scale_axis == "head":
        amax = xf.abs().amax(dim=(2, 3))  # (B, H)
        scale = amax / fmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        s = scale[:, :, None, None]  # (B, H, 1, 1)
    else:
        amax = xf.abs().amax(dim=3)  # (B, H, T)
        scale = amax / fmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        s = scale[:, :, :, None]  # (B, H, T, 1)
    data = (xf / s).clamp(-fmax, fmax).to(FP8_DTYPES[fmt])
    return data, scale


_FP8_TABLES: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def _fp8_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """float32 ``(256,)``: the value of every fp8 bit pattern, made by the cast itself (so decoding through it
    is bit-identical to ``data.float()``, and on a CPU several times faster than that cast)."""
    key = (dtype, str(device))
    table = _FP8_TABLES.get(key)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8, device=device).view(dtype).float()
        _FP8_TABLES[key] = table
    return table


def fp8_values(data: torch.Tensor) -> torch.Tensor:
    """fp8 codes as float32 values, exactly ``data.float()`` (on a CPU through :func:`_fp8_table`)."""
    if data.device.type != "cpu":
        return data.float()
    table = _fp8_table(data.dtype, data.device)
    return table.index_select(0, data.reshape(-1).view(torch.uint8).int()).view(data.shape)


def dequantize_fp8_ref(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data * scale`` in float32, cast to ``dtype``; scale ``(B,H)`` or ``(B,H,T)``."""
    s = scale[:, :, None, None] if scale.dim() == 2 else scale[:, :, :, None]  # broadcast to (B, H, T, D)
    return (fp8_values(data) * s).to(dtype)
