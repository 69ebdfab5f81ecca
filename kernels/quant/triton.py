"""Triton kernels for the KV-cache quantizers (integer KIVI layouts and fp8).

Algorithm
---------
Integer quantization is one pass over a tile that holds whole groups:

* ``axis="token"`` (KIVI keys): a program owns one group of ``G`` consecutive tokens of one (batch, head) and
  all ``D`` channels, a ``(G, BLOCK_D)`` tile. ``min`` and ``max`` run down the token axis, giving a per-channel
  scale and zero.
* ``axis="channel"`` (KIVI values): a program owns ``BLOCK_T`` tokens; its ``(BLOCK_T, BLOCK_D)`` tile is viewed
  as ``(BLOCK_T, BLOCK_D / G, G)`` and ``min``/``max`` run over the last axis: a scale and zero per token and
  group of ``G`` channels.

Scale and zero are rounded to the input dtype first, then the codes are computed from the rounded values with
IEEE division (``div_rn``) and half-up rounding ``floor(v + 1/2)``, exactly like the PyTorch reference, so both
backends produce the same bits. Codes are packed ``E = 8 / bits`` per byte along channels: the code tile is
viewed as ``(rows, BLOCK_D / E, E)``, shifted by ``e * bits`` and summed over the last axis (the bit fields are
disjoint, so the sum is a bitwise or).

Dequantization is elementwise: each output element loads its byte (``d // E``), shifts by ``(d % E) * bits``,
masks, and applies its group's scale and zero.

fp8: per-token scales are a row ``amax`` inside the quantizing program. Per-head scales need the ``amax`` of a
whole ``(T, D)`` head; a first kernel writes one partial ``amax`` per token tile, the launcher reduces those
few numbers, and the quantizing kernel divides by the resulting scale. Values are clamped to the format's
largest finite value and rounded to the fp8 grid with round-to-nearest-even by explicit arithmetic (see ``_round_to_fp8_grid``),
so the final cast to fp8 is exact.
"""

import triton
import triton.language as tl


@triton.jit
def _pack(codes, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes (ROWS, BLOCK_D) -> uint8 words (ROWS, BLOCK_D // E), little-endian bit fields."""
    E: tl.constexpr = 8 // BITS
    c3 = tl.reshape(codes, (ROWS, BLOCK_D // E, E))
    shifts = tl.arange(0, E) * BITS
    return tl.sum(c3 << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` with round-to-nearest-even. For bfloat16 the rounding is done on the bits first,
    because Triton 3.9's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even); the
    final cast of an already-representable value is exact on both."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _round_to_fp8_grid(y, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """Round float32 ``y`` to the nearest value with MANT_BITS mantissa bits (ties to even), exponents below
    MIN_EXP sharing MIN_EXP's step (subnormals). The later cast to fp8 is then exact. Done by hand because
    Triton 3.9's interpreter mis-rounds float32 -> fp8 when rounding carries into the next binade
    (125.48 -> 64 in e4m3); doing it here keeps the compiled and interpreted paths identical."""
    bits = y.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127  # exact floor(log2 |y|) for normal float32
    exp = tl.maximum(exp, MIN_EXP)
    step = tl.exp2((exp - MANT_BITS).to(tl.float32))  # a power of two: exact
    v = y / step  # exact (division by a power of two)
    r = tl.floor(v + 0.5)
    tie_odd = ((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    r = tl.abs(tl.where(tie_odd, r - 1.0, r) * step)
    return tl.where(bits < 0, -r, r)  # keep the sign, of -0.0 too


@triton.jit
def quantize_int_token_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, T, D,
    G: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
):
    """Grid (B*H, T // G): one group of G tokens x all channels per program."""
    bh = tl.program_id(0)
    grp = tl.program_id(1)
    E: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    t = grp * G + tl.arange(0, G)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = dmask[None, :] & (t[:, None] >= 0)
    x_raw = tl.load(x_ptr + (bh * T + t)[:, None] * D + d[None, :], mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    lo = tl.min(tl.where(mask, x, float("inf")), 0)  # (BLOCK_D,)
    hi = tl.max(tl.where(mask, x, float("-inf")), 0)
    lo = tl.where(dmask, lo, 0.0)
    hi = tl.where(dmask, hi, 0.0)
    scale = _cast(tl.math.div_rn(hi - lo, LEVELS * 1.0), x_raw.dtype)
    scale = tl.where(scale == 0, 1.0, scale.to(tl.float32)).to(x_raw.dtype)
    zero = _cast(lo, x_raw.dtype)
    v = tl.math.div_rn(x - zero.to(tl.float32)[None, :], scale.to(tl.float32)[None, :])
    codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), LEVELS * 1.0).to(tl.int32)
    words = _pack(codes, G, BLOCK_D, BITS)
    w = tl.arange(0, BLOCK_D // E)
    tl.store(packed_ptr + (bh * T + t)[:, None] * (D // E) + w[None, :], words, mask=(w < D // E)[None, :] & (t[:, None] >= 0))
    n_groups = T // G
    tl.store(scale_ptr + (bh * n_groups + grp) * D + d, scale, mask=dmask)
    tl.store(zero_ptr + (bh * n_groups + grp) * D + d, zero, mask=dmask)


@triton.jit
def quantize_int_channel_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, T, D,
    G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BLOCK_T)): BLOCK_T tokens per program, groups of G channels per token."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    E: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = BLOCK_D // G
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    mask = tmask[:, None] & (d < D)[None, :]
    x_raw = tl.load(x_ptr + (bh * T + t)[:, None] * D + d[None, :], mask=mask, other=0.0)
    x3 = tl.reshape(x_raw.to(tl.float32), (BLOCK_T, NG, G))
    lo = tl.min(x3, 2)  # (BLOCK_T, NG); padded channels are whole groups (D % G == 0), never mixed in
    hi = tl.max(x3, 2)
    scale = _cast(tl.math.div_rn(hi - lo, LEVELS * 1.0), x_raw.dtype)
    scale = tl.where(scale == 0, 1.0, scale.to(tl.float32)).to(x_raw.dtype)
    zero = _cast(lo, x_raw.dtype)
    v = tl.math.div_rn(x3 - zero.to(tl.float32)[:, :, None], scale.to(tl.float32)[:, :, None])
    codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), LEVELS * 1.0).to(tl.int32)
    words = _pack(tl.reshape(codes, (BLOCK_T, BLOCK_D)), BLOCK_T, BLOCK_D, BITS)
    w = tl.arange(0, BLOCK_D // E)
    tl.store(packed_ptr + (bh * T + t)[:, None] * (D // E) + w[None, :], words, mask=tmask[:, None] & (w < D // E)[None, :])
    gi = tl.arange(0, NG)
    smask = tmask[:, None] & (gi < D // G)[None, :]
    tl.store(scale_ptr + (bh * T + t)[:, None] * (D // G) + gi[None, :], scale, mask=smask)
    tl.store(zero_ptr + (bh * T + t)[:, None] * (D // G) + gi[None, :], zero, mask=smask)


@triton.jit
def dequantize_int_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr, T, D,
    G: tl.constexpr, TOKEN_AXIS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BLOCK_T)): out = code * scale + zero, elementwise."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    E: tl.constexpr = 8 // BITS
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < D)[None, :]
    row = bh * T + t
    byte = tl.load(packed_ptr + row[:, None] * (D // E) + (d // E)[None, :], mask=mask, other=0)
    code = ((byte.to(tl.int32) >> ((d % E) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    if TOKEN_AXIS:
        sidx = (bh * (T // G) + t // G)[:, None] * D + d[None, :]
    else:
        sidx = row[:, None] * (D // G) + (d // G)[None, :]
    s = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row[:, None] * D + d[None, :], _cast(code * s + z, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def amax_partial_kernel(x_ptr, part_ptr, T, D, NT, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B*H, NT): part[bh, tb] = max |x| over a tile of BLOCK_T tokens."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + (bh * T + t)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + bh * NT + tb, tl.max(tl.max(tl.abs(x), 1), 0))


@triton.jit
def quantize_fp8_kernel(
    x_ptr, data_ptr, scale_ptr, T, D, FP8_MAX,
    PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BLOCK_T)). Per token: compute and store scale = amax / FP8_MAX (1 if 0) per row.
    Per head: read the scale the launcher computed. data = clamp(x / scale) in the output's fp8 format."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    mask = tmask[:, None] & (d < D)[None, :]
    row = bh * T + t
    x = tl.load(x_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        scale = tl.math.div_rn(tl.max(tl.abs(x), 1), FP8_MAX)  # (BLOCK_T,)
        scale = tl.where(scale == 0, 1.0, scale)
        tl.store(scale_ptr + row, scale, mask=tmask)
        y = tl.math.div_rn(x, scale[:, None])
    else:
        scale = tl.load(scale_ptr + bh)
        y = tl.math.div_rn(x, scale)
    y = _round_to_fp8_grid(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), MANT_BITS, MIN_EXP)
    tl.store(data_ptr + row[:, None] * D + d[None, :], y.to(data_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequantize_fp8_kernel(
    data_ptr, scale_ptr, out_ptr, T, D, PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BLOCK_T)): out = data * scale."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    mask = tmask[:, None] & (d < D)[None, :]
    row = bh * T + t
    x = tl.load(data_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        s = tl.load(scale_ptr + row, mask=tmask, other=1.0)[:, None]
    else:
        s = tl.load(scale_ptr + bh)
    tl.store(out_ptr + row[:, None] * D + d[None, :], _cast(x * s, out_ptr.dtype.element_ty), mask=mask)
