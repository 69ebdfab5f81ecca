"""Triton launchers for the quantizers (imported lazily: only when the Triton backend is chosen).

Until the Triton kernels land these delegate to the reference; the signatures are final.
"""

from __future__ import annotations

from . import reference as _ref


def quantize_int_triton(x, bits, group_size, axis):
    return _ref.quantize_int_ref(x, bits, group_size, axis)


def dequantize_int_triton(qt):
    return _ref.dequantize_int_ref(qt.packed, qt.scale, qt.zero, qt.bits, qt.group_size, qt.axis, qt.dtype)


def quantize_fp8_triton(x, fmt, scale_axis):
    return _ref.quantize_fp8_ref(x, fmt, scale_axis)


def dequantize_fp8_triton(f8):
    return _ref.dequantize_fp8_ref(f8.data, f8.scale, f8.dtype)
