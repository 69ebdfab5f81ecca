"""kvtune.kernels.quant: reference vs naive math, round-trip bounds, sizes, gather/concat, Triton vs reference."""

import itertools

import pytest
import torch

from kvtune.kernels.quant import (
    Fp8Tensor,
    QuantizedTensor,
    concat_tokens,
    dequantize_fp8,
    dequantize_int,
    fp8_nbytes,
    int_nbytes,
    quantize_fp8,
    quantize_int,
)
from kvtune.kernels.quant import reference as ref
from tolerances import FP8_REL, FP8_SUB, OUT_CAST_REL, QUANT_REL, QUANT_TRITON_VS_REF

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _x(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5  # offset so groups are not centred on 0
    return x.to(dtype).to(device)


def _group_bound(x, qt):
    """Per element: scale/2 + QUANT_REL * absmax of the element's group, broadcast to (B, H, T, D)."""
    g, ax = qt.group_size, qt.axis
    b, h, t, d = x.shape
    xf = x.float().abs()
    if ax == "token":
        amax = xf.reshape(b, h, t // g, g, d).amax(3).repeat_interleave(g, 2)  # (B, H, T, D)
        s = qt.scale.float().repeat_interleave(g, 2)  # (B, H, T, D)
    else:
        amax = xf.reshape(b, h, t, d // g, g).amax(4).repeat_interleave(g, 3)  # (B, H, T, D)
        s = qt.scale.float().repeat_interleave(g, 3)  # (B, H, T, D)
    return s / 2 + QUANT_REL[x.dtype] * amax + 1e-30


# ------------------------------------------------------------------------------------ reference vs naive
def test_pack_layout_is_little_endian_within_byte():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]])
    packed = ref.pack_codes(codes, 2)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 0xFF]]
    assert ref.pack_codes(torch.tensor([[0xA, 0x5]]), 4).tolist() == [[0x5A]]
    for bits in (2, 4, 8):
        c = torch.randint(0, 1 << bits, (3, 5, 16))
        assert torch.equal(ref.unpack_codes(ref.pack_codes(c, bits), bits), c)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_reference_codes_match_naive_loops(axis):
    x = _x((2, 3, 8, 8), torch.float32, seed=1)
    bits, g = 4, 4
    packed, scale, zero = ref.quantize_int_ref(x, bits, g, axis)
    codes = ref.unpack_codes(packed, bits)
    b, h, t, d = x.shape
    for bi, hi, ti, di in itertools.product(range(b), range(h), range(t), range(d)):
        if axis == "token":
            grp = x[bi, hi, (ti // g) * g : (ti // g + 1) * g, di]
            si, zi = scale[bi, hi, ti // g, di], zero[bi, hi, ti // g, di]
        else:
            grp = x[bi, hi, ti, (di // g) * g : (di // g + 1) * g]
            si, zi = scale[bi, hi, ti, di // g], zero[bi, hi, ti, di // g]
        lo, hi_ = float(grp.min()), float(grp.max())
        assert float(zi) == lo
        assert abs(float(si) - (hi_ - lo) / 15) <= 1e-6 * abs(hi_ - lo)
        want = min(max(int(torch.floor((x[bi, hi, ti, di] - zi) / si + 0.5)), 0), 15)
        assert int(codes[bi, hi, ti, di]) == want


def test_constant_group_round_trips_exactly():
    x = torch.full((1, 2, 8, 8), 3.25)
    for axis in ("token", "channel"):
        qt = quantize_int(x, bits=2, group_size=4, axis=axis, backend="torch")
        assert torch.equal(qt.scale, torch.ones_like(qt.scale))
        assert torch.equal(dequantize_int(qt, backend="torch"), x)


# ------------------------------------------------------------------------------------- round-trip bounds
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_int_round_trip_bound(backend, device, dtype, bits, axis):
    g = 16 if axis == "token" else 8
    x = _x((3, 2, 48, 16), dtype, device, seed=bits)
    qt = quantize_int(x, bits=bits, group_size=g, axis=axis, backend=backend)
    assert isinstance(qt, QuantizedTensor)
    assert qt.packed.dtype == torch.uint8 and qt.packed.shape == (3, 2, 48, 16 * bits // 8)
    assert qt.scale.dtype == dtype and qt.zero.dtype == dtype
    assert (qt.shape, qt.dtype, qt.bits, qt.group_size, qt.axis) == ((3, 2, 48, 16), dtype, bits, g, axis)
    x_hat = dequantize_int(qt, backend=backend)
    assert x_hat.shape == x.shape and x_hat.dtype == dtype
    err = (x.float() - x_hat.float()).abs()
    bound = _group_bound(x, qt)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    assert qt.nbytes() == int_nbytes(x.shape, bits, g, axis, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_axis", ["head", "token"])
def test_fp8_round_trip_bound(backend, device, dtype, fmt, scale_axis):
    x = _x((3, 2, 17, 16), dtype, device, seed=7)
    f8 = quantize_fp8(x, fmt=fmt, scale_axis=scale_axis, backend=backend)
    assert isinstance(f8, Fp8Tensor)
    assert f8.data.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    assert f8.scale.dtype == torch.float32
    assert f8.scale.shape == ((3, 2) if scale_axis == "head" else (3, 2, 17))
    x_hat = dequantize_fp8(f8, backend=backend)
    assert x_hat.shape == x.shape and x_hat.dtype == dtype
    s = f8.scale[:, :, None, None] if scale_axis == "head" else f8.scale[:, :, :, None]
    xf = x.float()
    bound = (FP8_REL[fmt] + OUT_CAST_REL[dtype]) * xf.abs() + FP8_SUB[fmt] * s + 1e-30
    assert bool(((xf - x_hat.float()).abs() <= bound).all())
    # amax maps onto fp8_max: the largest magnitude is representable exactly up to its own rounding
    assert f8.nbytes() == fp8_nbytes(x.shape, scale_axis)


def test_fp8_zero_input():
    x = torch.zeros(1, 2, 3, 8)
    f8 = quantize_fp8(x, backend="torch")
    assert torch.equal(f8.scale, torch.ones(1, 2))
    assert torch.equal(dequantize_fp8(f8), x)


# ------------------------------------------------------------------------------------- triton vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,axis,g", [(2, "token", 16), (4, "token", 32), (8, "channel", 16), (4, "channel", 32), (2, "channel", 8)])
def test_int_triton_matches_reference(need_triton, device, dtype, bits, axis, g):
    x = _x((3, 2, 64, 32), dtype, device, seed=11)
    a = quantize_int(x, bits=bits, group_size=g, axis=axis, backend="torch")
    b = quantize_int(x, bits=bits, group_size=g, axis=axis, backend="triton")
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    mismatch = (ref.unpack_codes(a.packed, bits) != ref.unpack_codes(b.packed, bits)).float().mean().item()
    assert mismatch == 0.0
    atol, rtol = QUANT_TRITON_VS_REF[dtype]
    torch.testing.assert_close(dequantize_int(b, backend="triton"), dequantize_int(a, backend="torch"), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,scale_axis", [("e4m3", "head"), ("e4m3", "token"), ("e5m2", "token"), ("e5m2", "head")])
def test_fp8_triton_matches_reference(need_triton, device, dtype, fmt, scale_axis):
    x = _x((3, 2, 54, 16), dtype, device, seed=12)
    a = quantize_fp8(x, fmt=fmt, scale_axis=scale_axis, backend="torch")
    b = quantize_fp8(x, fmt=fmt, scale_axis=scale_axis, backend="triton")
    torch.testing.assert_close(b.scale, a.scale, atol=0, rtol=1e-6)
    same = (a.data.view(torch.uint8) == b.data.view(torch.uint8)).float().mean().item()
    assert same >= 0.999  # a scale differing in the last bit may flip a rounding tie
    atol, rtol = QUANT_TRITON_VS_REF[dtype]
    torch.testing.assert_close(
        dequantize_fp8(b, backend="triton").float(), dequantize_fp8(b, backend="torch").float(), atol=atol, rtol=rtol
    )


# ------------------------------------------------------------------------------------------ gather/concat
def test_index_select_tokens_channel_axis_is_exact():
    x = _x((3, 2, 17, 16), torch.float16, seed=3)
    qt = quantize_int(x, bits=4, group_size=8, axis="channel", backend="torch")
    idx = torch.stack([torch.randperm(17)[:5] for _ in range(6)]).reshape(3, 2, 5)
    sub = qt.index_select_tokens(idx)
    assert sub.shape == (3, 2, 5, 16)
    full = dequantize_int(qt)
    want = full.gather(2, idx[..., None].expand(3, 2, 5, 16))
    assert torch.equal(dequantize_int(sub), want)
    assert sub.nbytes() == int_nbytes(sub.shape, 4, 8, "channel", torch.float16)


def test_index_select_tokens_token_axis_rejected():
    qt = quantize_int(_x((1, 2, 8, 8), torch.float32), bits=4, group_size=4, axis="token")
    with pytest.raises(ValueError, match="axis='channel'"):
        qt.index_select_tokens(torch.zeros(1, 2, 3, dtype=torch.long))


def test_index_select_tokens_validates_idx():
    qt = quantize_int(_x((1, 2, 8, 8), torch.float32), bits=4, group_size=4, axis="channel")
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        qt.index_select_tokens(torch.full((1, 2, 3), 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        qt.index_select_tokens(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        qt.index_select_tokens(torch.zeros(1, 2, 3))


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_concat_tokens_int(axis):
    a = _x((2, 2, 16, 16), torch.bfloat16, seed=4)
    b = _x((2, 2, 32, 16), torch.bfloat16, seed=5)
    qa, qb = (quantize_int(t, bits=2, group_size=8, axis=axis) for t in (a, b))
    qc = concat_tokens([qa, qb])
    assert qc.shape == (2, 2, 48, 16)
    assert torch.equal(dequantize_int(qc), torch.cat([dequantize_int(qa), dequantize_int(qb)], dim=2))
    assert qc.nbytes() == int_nbytes(qc.shape, 2, 8, axis, torch.bfloat16) == qa.nbytes() + qb.nbytes()
    with pytest.raises(ValueError, match="bits"):
        concat_tokens([qa, quantize_int(b, bits=4, group_size=8, axis=axis)])


def test_fp8_index_select_and_concat():
    a = _x((2, 3, 17, 8), torch.float16, seed=6)
    b = _x((2, 3, 5, 8), torch.float16, seed=8) * 10
    for axis in ("head", "token"):
        fa, fb = quantize_fp8(a, "e4m3", axis), quantize_fp8(b, "e4m3", axis)
        idx = torch.randint(0, 17, (2, 3, 4))
        sub = fa.index_select_tokens(idx)
        assert sub.scale_axis == axis and sub.shape == (2, 3, 4, 8)
        assert torch.equal(dequantize_fp8(sub), dequantize_fp8(fa).gather(2, idx[..., None].expand(2, 3, 4, 8)))
        fc = concat_tokens([fa, fb])
        assert fc.scale_axis == "token" and fc.shape == (2, 3, 22, 8)  # per-head parts become per-token
        assert torch.equal(dequantize_fp8(fc), torch.cat([dequantize_fp8(fa), dequantize_fp8(fb)], dim=2))
        assert fc.nbytes() == fp8_nbytes(fc.shape, fc.scale_axis)


def test_nbytes_formula_values():
    # 1 x 8 heads x 1024 tokens x 128 dims, int4 with groups of 32 tokens, fp16 scale+zero
    assert int_nbytes((1, 8, 1024, 128), 4, 32, "token", torch.float16) == 8 * 1024 * 64 + 2 * 8 * 32 * 128 * 2
    assert int_nbytes((1, 8, 1024, 128), 8, 128, "channel", torch.float32) == 8 * 1024 * 128 + 2 * 8 * 1024 * 4
    assert fp8_nbytes((2, 8, 10, 128), "head") == 2 * 8 * 10 * 128 + 2 * 8 * 4
    assert fp8_nbytes((2, 8, 10, 128), "token") == 2 * 8 * 10 * 128 + 2 * 8 * 10 * 4


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "bits"),
        (dict(axis="row"), "axis"),
        (dict(group_size=12), "power of two"),
        (dict(group_size=0), "power of two"),
        (dict(group_size=16, axis="token"), "T % group_size"),
        (dict(group_size=16, axis="channel"), "D % group_size"),
    ],
)
def test_quantize_int_rejects_bad_arguments(kwargs, match):
    x = torch.randn(1, 2, 24, 8)
    with pytest.raises(ValueError, match=match):
        quantize_int(x, **{"bits": 4, "group_size": 8, "axis": "token", **kwargs})


def test_quantize_rejects_bad_tensors():
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        quantize_int(torch.randn(2, 8, 8), group_size=8)
    with pytest.raises(ValueError, match="dtype"):
        quantize_int(torch.zeros(1, 1, 8, 8, dtype=torch.int32), group_size=8)
    with pytest.raises(ValueError, match="fmt"):
        quantize_fp8(torch.randn(1, 1, 2, 8), fmt="e3m4")
    with pytest.raises(ValueError, match="scale_axis"):
        quantize_fp8(torch.randn(1, 1, 2, 8), scale_axis="channel")
