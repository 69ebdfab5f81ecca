"""kvtune.kernels.decode_attention: reference vs SDPA, Triton vs reference (dense, fp8, KIVI int + residual)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvtune.kernels.decode_attention import decode_attention, decode_attention_fp8, decode_attention_int
from kvtune.kernels.quant import dequantize_fp8, dequantize_int, quantize_fp8, quantize_int
from tolerances import ATTN, ATTN_PROBS, ATTN_QUANT, REF_VS_SDPA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LENGTHS = [17, 54, 97]  # batch 3, awkward lengths (not multiples of any tile)


def _inputs(hkv, group, t, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, hkv * group, d, generator=g)
    k = torch.randn(3, hkv, t, d, generator=g)
    v = torch.randn(3, hkv, t, d, generator=g)
    return (x.to(dtype).to(device) for x in (q, k, v))


def _sdpa(q, k, v, lengths, scale):
    """Per sequence, torch SDPA (float32) over its first lengths[b] tokens; returns out and per-KV-head probs."""
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    group = hq // hkv
    outs, probs = [], torch.zeros(b, hkv, t)
    for i in range(b):
        n = int(lengths[i])
        qi = q[i].float()[:, None, :]  # (Hq, 1, D)
        ki = k[i, :, :n].float().repeat_interleave(group, 0)  # (Hq, n, D)
        vi = v[i, :, :n].float().repeat_interleave(group, 0)  # (Hq, n, D)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale)[:, 0])  # (Hq, D)
        p = torch.softmax((qi @ ki.transpose(1, 2))[:, 0] * scale, dim=-1)  # (Hq, n)
        probs[i, :, :n] = p.reshape(hkv, group, n).sum(1)  # (Hkv, n)
    return torch.stack(outs), probs


# ------------------------------------------------------------------------------------- reference vs SDPA
@pytest.mark.parametrize("group", [1, 4, 8])
def test_reference_matches_sdpa(group):
    q, k, v = _inputs(2, group, 97, 16, torch.float32, "cpu", seed=group)
    lengths = torch.tensor(LENGTHS)
    out, probs = decode_attention(q, k, v, lengths=lengths, return_probs=True, backend="torch")
    want_out, want_probs = _sdpa(q, k, v, lengths, 1 / math.sqrt(16))
    atol, rtol = REF_VS_SDPA
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(probs, want_probs, atol=atol, rtol=rtol)
    torch.testing.assert_close(probs.sum(-1), torch.full((3, 2), float(group)), atol=1e-5, rtol=0)


def test_reference_int_and_fp8_match_sdpa_on_dequantized():
    q, k, v = _inputs(2, 4, 97, 16, torch.float32, "cpu", seed=3)
    lengths = torch.tensor(LENGTHS)
    kq = quantize_int(k[:, :, :64], bits=4, group_size=16, axis="token")
    vq = quantize_int(v[:, :, :64], bits=4, group_size=8, axis="channel")
    out, probs = decode_attention_int(q, kq, vq, k[:, :, 64:], v[:, :, 64:], lengths=lengths, return_probs=True,
                                      backend="torch")
    kd = torch.cat([dequantize_int(kq), k[:, :, 64:]], 2)  # (B, Hkv, T, D)
    vd = torch.cat([dequantize_int(vq), v[:, :, 64:]], 2)
    want_out, want_probs = _sdpa(q, kd, vd, lengths, 0.25)
    torch.testing.assert_close(out, want_out, atol=REF_VS_SDPA[0], rtol=REF_VS_SDPA[1])
    torch.testing.assert_close(probs, want_probs, atol=REF_VS_SDPA[0], rtol=REF_VS_SDPA[1])
    kf, vf = quantize_fp8(k, "e4m3", "token"), quantize_fp8(v, "e5m2", "head")
    out, _ = decode_attention_fp8(q, kf, vf, scale=0.3, lengths=lengths, backend="torch")
    want_out, _ = _sdpa(q, dequantize_fp8(kf), dequantize_fp8(vf), lengths, 0.3)
    torch.testing.assert_close(out, want_out, atol=REF_VS_SDPA[0], rtol=REF_VS_SDPA[1])


# ---------------------------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,t,splits", [(1, 97, 3), (4, 233, None), (8, 54, 2)])
def test_dense_triton_matches_reference(need_triton, device, dtype, group, t, splits):
    q, k, v = _inputs(2, group, t, 32, dtype, device, seed=group)
    lengths = torch.tensor([17, 54, t])
    a_out, a_p = decode_attention(q, k, v, lengths=lengths, return_probs=True, backend="torch")
    b_out, b_p = decode_attention(q, k, v, lengths=lengths, return_probs=True, backend="triton", num_splits=splits)
    assert b_out.dtype == dtype and b_out.shape == q.shape and b_p.shape == (3, 2, t)
    torch.testing.assert_close(b_out.float(), a_out.float(), atol=ATTN[dtype][0], rtol=ATTN[dtype][1])
    torch.testing.assert_close(b_p, a_p, atol=ATTN_PROBS[dtype][0], rtol=ATTN_PROBS[dtype][1])
    assert float(b_p[0, :, 17:].abs().max()) == 0.0  # nothing beyond a sequence's length


def test_dense_triton_strided_cache_and_no_lengths(need_triton, device):
    # a cache preallocated for 128 tokens of which 97 are used: a strided view, no copy
    q, k, v = _inputs(2, 4, 128, 32, torch.float16, device, seed=5)
    k, v = k[:, :, :97], v[:, :, :97]
    a, _ = decode_attention(q, k, v, backend="torch")
    b, p = decode_attention(q, k, v, backend="triton", num_splits=2)
    assert p is None
    torch.testing.assert_close(b.float(), a.float(), atol=ATTN[torch.float16][0], rtol=ATTN[torch.float16][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt_k,axis_k,fmt_v,axis_v", [("e4m3", "head", "e4m3", "head"), ("e4m3", "token", "e5m2", "token"), ("e5m2", "head", "e4m3", "token")])
def test_fp8_triton_matches_reference(need_triton, device, dtype, fmt_k, axis_k, fmt_v, axis_v):
    q, k, v = _inputs(2, 4, 97, 32, dtype, device, seed=9)
    kf, vf = quantize_fp8(k, fmt_k, axis_k), quantize_fp8(v, fmt_v, axis_v)
    lengths = torch.tensor(LENGTHS)
    a_out, a_p = decode_attention_fp8(q, kf, vf, lengths=lengths, return_probs=True, backend="torch")
    b_out, b_p = decode_attention_fp8(q, kf, vf, lengths=lengths, return_probs=True, backend="triton", num_splits=2)
    torch.testing.assert_close(b_out.float(), a_out.float(), atol=ATTN_QUANT[dtype][0], rtol=ATTN_QUANT[dtype][1])
    torch.testing.assert_close(b_p, a_p, atol=ATTN_PROBS[dtype][0], rtol=ATTN_PROBS[dtype][1])


# (key bits, key group, value bits, value group, quantized tokens, residual tokens, group of query heads)
INT_CASES = [
    (4, 32, 4, 32, 64, 33, 4),  # both folds: a key tile is one group; one value group per token (GV == D)
    (2, 16, 2, 8, 96, 1, 8),  # key fold, elementwise values, int2
    (8, 8, 8, 16, 48, 6, 1),  # elementwise keys (GK < 16), int8
    (4, 16, 4, 8, 96, 0, 4),  # no residual
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bk,gk,bv,gv,tq,r,group", INT_CASES)
def test_int_triton_matches_reference(need_triton, device, dtype, bk, gk, bv, gv, tq, r, group):
    q, k, v = _inputs(2, group, tq + r, 32, dtype, device, seed=bk + gk)
    kq = quantize_int(k[:, :, :tq], bits=bk, group_size=gk, axis="token", backend="torch")
    vq = quantize_int(v[:, :, :tq], bits=bv, group_size=gv, axis="channel", backend="torch")
    lengths = torch.tensor([17, 54, tq + r])
    args = (q, kq, vq, k[:, :, tq:], v[:, :, tq:])
    a_out, a_p = decode_attention_int(*args, lengths=lengths, return_probs=True, backend="torch")
    b_out, b_p = decode_attention_int(*args, lengths=lengths, return_probs=True, backend="triton", num_splits=3)
    torch.testing.assert_close(b_out.float(), a_out.float(), atol=ATTN_QUANT[dtype][0], rtol=ATTN_QUANT[dtype][1])
    torch.testing.assert_close(b_p, a_p, atol=ATTN_PROBS[dtype][0], rtol=ATTN_PROBS[dtype][1])


def test_int_triton_residual_only(need_triton, device):
    q, k, v = _inputs(2, 4, 23, 32, torch.float32, device, seed=2)
    kq = quantize_int(k[:, :, :0], bits=4, group_size=16, axis="token")
    vq = quantize_int(v[:, :, :0], bits=4, group_size=16, axis="channel")
    a, _ = decode_attention(q, k, v, backend="torch")
    b, _ = decode_attention_int(q, kq, vq, k, v, backend="triton")
    torch.testing.assert_close(b, a, atol=ATTN[torch.float32][0], rtol=ATTN[torch.float32][1])


# ------------------------------------------------------------------------------------------- validation
def test_decode_attention_rejects_bad_inputs():
    q, k, v = _inputs(2, 4, 17, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(q[:, :7], k, v)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 17\]"):
        decode_attention(q, k, v, lengths=torch.tensor([1, 18, 3]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        decode_attention(q, k, v, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"\(B, Hq, D\)"):
        decode_attention(q[0], k, v)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, k, v, backend="cuda")
    kq = quantize_int(k[:, :, :16], 4, 16, "token")
    with pytest.raises(ValueError, match="axis='channel'"):
        decode_attention_int(q, kq, kq, k[:, :, 16:], v[:, :, 16:])
    with pytest.raises(ValueError, match="Fp8Tensor"):
        decode_attention_fp8(q, k, v)
