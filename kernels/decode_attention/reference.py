"""PyTorch reference for decode attention: one new query per sequence against a (B, Hkv, T, D) KV cache.

Grouped-query attention: query head ``h`` reads KV head ``h // (Hq / Hkv)``. Sequence ``b`` attends to its first
``lengths[b]`` tokens. All math in float32; the output is cast to the query dtype. ``probs`` are the softmax
probabilities of each key summed over the query heads that share its KV head (the statistic H2O accumulates),
float32, zero beyond a sequence's length.

The quantized variants dequantize to float32 first and run the same math; they are the specification the
Triton kernels (which dequantize tile by tile inside the kernel) are tested against.
"""

from __future__ import annotations

import torch

from ..quant import reference as qref


def decode_attention_ref(q, k, v, scale: float, lengths=None, return_probs: bool = False):
    """q (B, Hq, D); k, v (B, Hkv, T, D) any float dtype; lengths (B,) or None -> (out (B, Hq, D), probs)."""
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g, d)  # (B, Hkv, G, D): heads hkv*G .. hkv*G+G-1 share KV head hkv
    s = torch.einsum("bhgd,bhtd->bhgt", qf, k.float()) * scale  # (B, Hkv, G, T)
    if lengths is not None:
        valid = torch.arange(t, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]  # (B, T)
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)  # (B, Hkv, G, T)
    out = torch.einsum("bhgt,bhtd->bhgd", p, v.float())  # (B, Hkv, G, D)
    out = out.reshape(b, hq, d).to(q.dtype)  # (B, Hq, D)
    probs = p.sum(dim=2) if return_probs else None  # (B, Hkv, T)
    return out, probs


def decode_attention_int_ref(q, kq, vq, k_res, v_res, scale: float, lengths=None, return_probs: bool = False):
    """Keys ``cat(deq(kq), k_res)`` and values ``cat(deq(vq), v_res)`` along T, dequantized in float32."""
    k = qref.dequantize_int_ref(kq.packed, kq.scale, kq.zero, kq.bits, kq.group_size, kq.axis, torch.float32)
    v = qref.dequantize_int_ref(vq.packed, vq.scale, vq.zero, vq.bits, vq.group_size, vq.axis, torch.float32)
    k = torch.cat([k, k_res.float()], dim=2)  # (B, Hkv, Tq + R, D)
    v = torch.cat([v, v_res.float()], dim=2)  # (B, Hkv, Tq + R, D)
    return decode_attention_ref(q, k, v, scale, lengths, return_probs)


def decode_attention_fp8_ref(q, kf8, vf8, scale: float, lengths=None, return_probs: bool = False):
    """Keys and values ``data * scale`` in float32."""
    k = qref.dequantize_fp8_ref(kf8.data, kf8.scale, torch.float32)  # (B, Hkv, T, D)
    v = qref.dequantize_fp8_ref(vf8.data, vf8.scale, torch.float32)  # (B, Hkv, T, D)
    return decode_attention_ref(q, k, v, scale, lengths, return_probs)
