"""Decode attention: one new query per sequence against a KV cache, dense, fp8 or KIVI-quantized.

Public API::

    out, probs = decode_attention(q, k, v, scale=None, lengths=None, return_probs=False)
    out, probs = decode_attention_int(q, kq, vq, k_res, v_res, scale=None, lengths=None, return_probs=False)
    out, probs = decode_attention_fp8(q, kf8, vf8, scale=None, lengths=None, return_probs=False)

Shapes: ``q (B, Hq, D)``; ``k, v (B, Hkv, T, D)`` with ``Hq % Hkv == 0`` (grouped-query attention: query head
``h`` reads KV head ``h // (Hq // Hkv)``); ``lengths (B,)`` integer, ``1 <= lengths[b] <= T`` (``None``: all T);
``scale`` defaults to ``1/sqrt(D)``. Returns ``out (B, Hq, D)`` in ``q.dtype`` and, if ``return_probs``,
``probs (B, Hkv, T)`` float32: each key's softmax probability summed over the query heads of its KV head
(H2O's statistic), zero beyond a sequence's length; else ``None``.

``decode_attention_int``: keys are ``cat(deq(kq), k_res)`` and values ``cat(deq(vq), v_res)`` along the token
axis, with ``kq`` a :class:`~kvtune.kernels.quant.QuantizedTensor` with ``axis="token"`` (KIVI keys),
``vq`` one with ``axis="channel"`` (KIVI values), the same number of tokens ``Tq``, and ``k_res, v_res``
``(B, Hkv, R, D)`` in ``q.dtype`` (``R`` may be 0; ``None`` means ``R = 0``). ``lengths`` count tokens of the
concatenation (``T = Tq + R``); positions ``>= lengths[b]`` are masked.

``decode_attention_fp8``: ``kf8, vf8`` are :class:`~kvtune.kernels.quant.Fp8Tensor` of shape ``(B, Hkv, T, D)``.

All take keyword-only ``num_splits`` (split-KV factor of the Triton path; default from the GPU's size) and
``backend`` (``auto|torch|triton`` or a :class:`~kvtune.kernels.backend.Backend`; default: the process request,
``auto`` unless ``KVTUNE_KERNEL_BACKEND`` says otherwise). Dispatch follows ``q``'s device: CUDA tensors run
Triton, CPU tensors the PyTorch reference (see :mod:`kvtune.kernels.backend`).
Validating ``lengths`` reads it on the host (one device sync when it lives on the GPU).
"""

from __future__ import annotations

import math

import torch

from ..backend import Backend, interpret_mode, resolve
from ..quant import Fp8Tensor, QuantizedTensor
from . import reference as _ref

__all__ = ["decode_attention", "decode_attention_int", "decode_attention_fp8"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# -------------------------------------------------------------------------------------------- validation
def _check_q(q, where):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{where}: q must be a tensor of shape (B, Hq, D), got {got}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: q dtype must be float32, float16 or bfloat16, got {q.dtype}")


def _check_kv(name, x, q, where, dtype=None):
    b, hq, d = q.shape
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: {name} must be a tensor of shape (B, Hkv, T, D), got {got}")
    if x.shape[0] != b or x.shape[3] != d:
        raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}, expected ({b}, Hkv, T, {d}) to match q {tuple(q.shape)}")
    if x.device != q.device:
        raise ValueError(f"{where}: {name} is on {x.device}, q on {q.device}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{where}: {name} dtype {x.dtype} differs from q dtype {dtype}")


def _check_heads(hq, hkv, where):
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{where}: query heads ({hq}) must be a multiple of KV heads ({hkv})")


def _check_lengths(lengths, b, t, device, where):
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != b:
        raise ValueError(f"{where}: lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dtype.is_complex:
        raise ValueError(f"{where}: lengths must be an integer tensor, got {lengths.dtype}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > t:
        raise ValueError(f"{where}: lengths must lie in [1, {t}] (tokens in the cache), got [{lo}, {hi}]")
    return lengths.to(device=device, dtype=torch.int32)


def _scale(scale, d, where):
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: scale must be a positive finite number, got {scale}")
    return scale


def _check_splits(num_splits, where):
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{where}: num_splits must be a positive int or None, got {num_splits!r}")


def _check_common(q, hkv, t, lengths, scale, num_splits, where):
    """The checks every decode op shares once its cache is known: heads, a non-empty cache, lengths, scale and
    split count. Returns the validated ``lengths`` and the softmax scale."""
    _check_heads(q.shape[1], hkv, where)
    if t < 1:
        raise ValueError(f"{where}: the cache holds no tokens (T = 0)")
    lengths = _check_lengths(lengths, q.shape[0], t, q.device, where)
    sm = _scale(scale, q.shape[2], where)
    _check_splits(num_splits, where)
    return lengths, sm


# ----------------------------------------------------------------------------------------------- public
def decode_attention(q, k, v, scale=None, lengths=None, return_probs=False, *, num_splits=None, backend=None):
    """Attention of one query per sequence over a dense fp32/fp16/bf16 cache (see the module docstring)."""
    where = "decode_attention"
    _check_q(q, where)
    _check_kv("k", k, q, where, q.dtype)
    _check_kv("v", v, q, where, q.dtype)
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    lengths, sm = _check_common(q, k.shape[1], k.shape[2], lengths, scale, num_splits, where)
    if resolve(backend, q.device) is Backend.TRITON:
        return _launch_dense(q, k, v, None, None, 0, 0, sm, lengths, return_probs, num_splits)
    return _ref.decode_attention_ref(q, k, v, sm, lengths, return_probs)


def decode_attention_fp8(q, kf8, vf8, scale=None, lengths=None, return_probs=False, *, num_splits=None, backend=None):
    """Attention over an fp8 cache (per-head or per-token scales folded into the scores and p)."""
    where = "decode_attention_fp8"
    _check_q(q, where)
    for name, f in (("kf8", kf8), ("vf8", vf8)):
        if not isinstance(f, Fp8Tensor):
            raise ValueError(f"{where}: {name} must be an Fp8Tensor, got {type(f).__name__}")
        _check_kv(f"{name}.data", f.data, q, where)
    if kf8.shape != vf8.shape:
        raise ValueError(f"{where}: kf8 {kf8.shape} and vf8 {vf8.shape} must have the same shape")
    lengths, sm = _check_common(q, kf8.shape[1], kf8.shape[2], lengths, scale, num_splits, where)
    if resolve(backend, q.device) is Backend.TRITON:
        mode = {"head": 1, "token": 2}
        return _launch_dense(
            q, kf8.data, vf8.data, kf8.scale.contiguous(), vf8.scale.contiguous(),
            mode[kf8.scale_axis], mode[vf8.scale_axis], sm, lengths, return_probs, num_splits,
        )
    return _ref.decode_attention_fp8_ref(q, kf8, vf8, sm, lengths, return_probs)


def decode_attention_int(
    q, kq, vq, k_res=None, v_res=None, scale=None, lengths=None, return_probs=False, *, num_splits=None, backend=None
):
    """Attention over a KIVI cache: int keys (per-channel groups), int values (per-token groups), plus a
    full-precision residual of the most recent tokens; dequantized inside the kernel."""
    where = "decode_attention_int"
    _check_q(q, where)
    if not isinstance(kq, QuantizedTensor) or kq.axis != "token":
        raise ValueError(f"{where}: kq must be a QuantizedTensor with axis='token' (KIVI keys), got "
                         f"{getattr(kq, 'axis', type(kq).__name__)!r}")
    if not isinstance(vq, QuantizedTensor) or vq.axis != "channel":
        raise ValueError(f"{where}: vq must be a QuantizedTensor with axis='channel' (KIVI values), got "
                         f"{getattr(vq, 'axis', type(vq).__name__)!r}")
    b, hq, d = q.shape
    for name, qt in (("kq", kq), ("vq", vq)):
        if qt.shape[0] != b or qt.shape[3] != d:
            raise ValueError(f"{where}: {name} has shape {qt.shape}, expected ({b}, Hkv, T, {d}) to match q")
        if qt.device != q.device:
            raise ValueError(f"{where}: {name} is on {qt.device}, q on {q.device}")
    if kq.shape != vq.shape:
        raise ValueError(f"{where}: kq {kq.shape} and vq {vq.shape} must have the same shape")
    hkv, tq = kq.shape[1], kq.shape[2]
    _check_heads(hq, hkv, where)
    if k_res is None and v_res is None:
        k_res = v_res = q.new_empty((b, hkv, 0, d))
    elif k_res is None or v_res is None:
        raise ValueError(f"{where}: give both k_res and v_res, or neither")
    _check_kv("k_res", k_res, q, where, q.dtype)
    _check_kv("v_res", v_res, q, where, q.dtype)
    if k_res.shape != v_res.shape or k_res.shape[1] != hkv:
        raise ValueError(f"{where}: k_res {tuple(k_res.shape)} and v_res {tuple(v_res.shape)} must both be "
                         f"({b}, {hkv}, R, {d})")
    t = tq + k_res.shape[2]
    if t < 1:
        raise ValueError(f"{where}: the cache holds no tokens (Tq + R = 0)")
    lengths = _check_lengths(lengths, b, t, q.device, where)
    sm = _scale(scale, d, where)
    _check_splits(num_splits, where)
    if resolve(backend, q.device) is Backend.TRITON:
        return _launch_int(q, kq, vq, k_res, v_res, sm, lengths, return_probs, num_splits)
    return _ref.decode_attention_int_ref(q, kq, vq, k_res, v_res, sm, lengths, return_probs)


# ------------------------------------------------------------------------------------------- launchers
def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _plan_splits(b, hkv, t, block_t, num_splits, device):
    """Tokens per split (a multiple of block_t) and the number of splits. Default: enough programs to fill
    the GPU twice over, but no split shorter than 256 tokens; 2 splits in the CPU interpreter."""
    if num_splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = max(1, min(-(-2 * sms // (b * hkv)), -(-t // 256)))
        else:
            num_splits = 2
    num_splits = max(1, min(num_splits, -(-t // block_t)))
    chunk = -(-t // num_splits)
    chunk = -(-chunk // block_t) * block_t
    return chunk, -(-t // chunk)


def _finish(q, part_o, part_lse, scores, lengths, hkv, t, num_splits, return_probs):
    """Merge the split partials into out (B, Hq, D) and, if asked, compute probs (B, Hkv, T)."""
    from . import triton as tk

    b, hq, d = q.shape
    out = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b * hq,), device=q.device, dtype=torch.float32)
    tk.merge_kernel[(b * hq,)](part_o, part_lse, out, lse, NUM_SPLITS=num_splits,
                               SPLITS_PAD=_pow2(num_splits, 2), D=d, BLOCK_D=_pow2(d, 16))
    if not return_probs:
        return out, None
    probs = torch.empty((b, hkv, t), device=q.device, dtype=torch.float32)
    block_t = 64
    g = hq // hkv
    tk.probs_kernel[(b * hkv, -(-t // block_t))](scores, lse, lengths, probs, t, HKV=hkv, GROUP=g,
                                                  GROUP_PAD=_pow2(g, 16), BLOCK_T=block_t)
    return out, probs


def _alloc(q, num_splits, t, return_probs):
    b, hq, d = q.shape
    part_o = torch.empty((b * hq, num_splits, d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((b * hq, num_splits), device=q.device, dtype=torch.float32)
    scores = torch.empty((b * hq, t), device=q.device, dtype=torch.float32) if return_probs else part_lse
    return part_o, part_lse, scores


def _dot_fp32(dtype) -> bool:
    """fp32 dot operands for fp32 inputs, and for bf16 in the interpreter (its bf16 tl.dot is wrong)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpret_mode())


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_dense(q, k, v, ks, vs, ks_mode, vs_mode, sm, lengths, return_probs, num_splits):
    from . import triton as tk

    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    if lengths is None:
        lengths = torch.full((b,), t, device=q.device, dtype=torch.int32)
    block_t = 64
    chunk, splits = _plan_splits(b, hkv, t, block_t, num_splits, q.device)
    part_o, part_lse, scores = _alloc(q, splits, t, return_probs)
    dummy = part_lse
    tk.decode_split_kernel[(b, hkv, splits)](
        q, k, v, ks if ks is not None else dummy, vs if vs is not None else dummy, lengths, part_o, part_lse, scores,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        t, chunk, sm * _LOG2E,
        HKV=hkv, GROUP=g, GROUP_PAD=_pow2(g, 16), D=d, BLOCK_D=_pow2(d, 16), BLOCK_T=block_t, NUM_SPLITS=splits,
        KS_MODE=ks_mode, VS_MODE=vs_mode, RETURN_SCORES=bool(return_probs), DOT_FP32=_dot_fp32(q.dtype),
    )
    return _finish(q, part_o, part_lse, scores, lengths, hkv, t, splits, return_probs)


def _launch_int(q, kq, vq, k_res, v_res, sm, lengths, return_probs, num_splits):
    from . import triton as tk

    q, k_res, v_res = (_last_dim_contiguous(x) for x in (q, k_res, v_res))
    b, hq, d = q.shape
    hkv, tq = kq.shape[1], kq.shape[2]
    t = tq + k_res.shape[2]
    g = hq // hkv
    if lengths is None:
        lengths = torch.full((b,), t, device=q.device, dtype=torch.int32)
    block_t = max(16, kq.group_size)  # a multiple of the key group: quantized tiles start on a group
    chunk, splits = _plan_splits(b, hkv, t, block_t, num_splits, q.device)
    part_o, part_lse, scores = _alloc(q, splits, t, return_probs)
    c = [x.contiguous() for x in (kq.packed, kq.scale, kq.zero, vq.packed, vq.scale, vq.zero)]
    tk.decode_int_split_kernel[(b, hkv, splits)](
        q, *c, k_res, v_res, lengths, part_o, part_lse, scores,
        q.stride(0), q.stride(1), k_res.stride(0), k_res.stride(1), k_res.stride(2),
        v_res.stride(0), v_res.stride(1), v_res.stride(2),
        tq, t, chunk, sm * _LOG2E,
        HKV=hkv, GROUP=g, GROUP_PAD=_pow2(g, 16), D=d, BLOCK_D=_pow2(d, 16), BLOCK_T=block_t, NUM_SPLITS=splits,
        BITS_K=kq.bits, GK=kq.group_size, BITS_V=vq.bits, GV=vq.group_size,
        RETURN_SCORES=bool(return_probs), DOT_FP32=_dot_fp32(q.dtype),
    )
    return _finish(q, part_o, part_lse, scores, lengths, hkv, t, splits, return_probs)
