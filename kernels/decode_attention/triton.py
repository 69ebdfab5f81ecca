"""Triton kernels for decode attention (one query token per sequence), split-KV ("flash-decoding").

Algorithm
---------
Decode attention reads the whole KV cache once per step and does little arithmetic per byte, so it is bound by
memory bandwidth; the kernels are organised to stream K and V exactly once, in their stored (compressed) form,
and to keep every streaming multiprocessor busy even at batch 1.

* **Grid** ``(B, Hkv, S)``: one program per sequence, KV head and *split*. A split is a contiguous chunk of
  ``chunk`` tokens (a multiple of the tile size ``BLOCK_T``). Splitting the token axis is what fills the GPU
  when ``B * Hkv`` is small and the context is long.
* **GQA**: a program loads the ``GROUP = Hq / Hkv`` query heads that share its KV head as one
  ``(GROUP_PAD, D)`` tile (rows padded to 16 for ``tl.dot``), so each K/V tile is read once for all of them.
* **Online softmax** over the split's tiles, in base 2: scores ``s = (q . k) * sm_scale * log2(e)``, running
  max ``m``, running sum ``l``, accumulator ``acc``; a new tile rescales by ``alpha = 2**(m_old - m_new)``.
  Tokens at or beyond the sequence's length are masked to ``-inf``.
* Each split writes its normalised partial output ``o_s = acc / l`` and its log-sum-exp ``lse_s = m + log2 l``
  (``-inf`` for an empty split). The **merge** kernel combines them per query head:
  ``out = sum_s 2**(lse_s - M) o_s / sum_s 2**(lse_s - M)`` with ``M = max_s lse_s``, and writes the total
  ``lse`` for the probability kernel.
* **Probabilities for H2O** (optional): the split kernel also writes the scaled scores; once the total ``lse``
  of every head is known, the probability kernel computes ``sum_{h in group} 2**(s_h - lse_h)`` per key.

Compressed KV is dequantized inside the kernel, tile by tile, never materialised in memory:

* **fp8** (e4m3 / e5m2) data is loaded as fp8 and widened to the query dtype (exact). The scales are folded
  out of the tile: a per-head key scale multiplies the scores, a per-token key scale multiplies score column
  ``t``; a per-token value scale multiplies ``p`` before ``p @ V`` (the softmax sum ``l`` uses the unscaled
  ``p``), a per-head value scale multiplies the final partial output.
* **KIVI int2/int4/int8**: keys are grouped per channel over ``GK`` consecutive tokens, values per token over
  ``GV`` channels; codes are packed along channels, ``8/bits`` per byte (see ``kvtune.kernels.quant``).
  A code tile is unpacked with a shift and a mask per element. When a key tile is exactly one group
  (``BLOCK_T == GK``), scale ``s_d`` and zero ``z_d`` are per channel and fold into the query:
  ``q . (c * s + z) = (q * s) . c + q . z``, so raw codes go straight into ``tl.dot``. When one group spans a
  whole token's values (``GV == D``), ``p @ (c * s_t + z_t) = (p * s_t) @ c + (p . z_t)``. Otherwise the tile
  is dequantized elementwise (``c * s + z``) before the dot. The full-precision residual (the most recent
  tokens, not yet quantized) is streamed by a second loop over the same split range, in the concatenated
  token index space ``[0, Tq)`` quantized, ``[Tq, Tq + R)`` residual.

Accumulation is float32 throughout; dot operands are in the query dtype (fp16/bf16 on tensor cores; fp32 with
``input_precision="ieee"``). Under ``TRITON_INTERPRET=1`` bf16 operands are widened to fp32 for ``tl.dot``
because the interpreter's bf16 dot is wrong (Triton 3.9); the compiled GPU path keeps bf16 tensor-core dots.
"""

import triton
import triton.language as tl


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step on a (GROUP_PAD, BLOCK_T) base-2 score tile; returns p, alpha, new m, new l."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # DOT_FP32: float32 operands, exact products (fp32 inputs; also bf16 under TRITON_INTERPRET, whose bf16
    # tl.dot returns garbage in Triton 3.9 -- the operands were already rounded to bf16, so only the
    # tensor-core accumulation order differs from the GPU path).
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _store_partial(po_ptr, plse_ptr, acc, m_i, l_i, row, g, d, gmask, dmask, sp, NUM_SPLITS: tl.constexpr, D: tl.constexpr):
    """Write o_s = acc / l and lse_s = m + log2(l) (or -inf) for query-head rows ``row`` of split ``sp``."""
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(plse_ptr + row * NUM_SPLITS + sp, lse, mask=gmask)
    tl.store(po_ptr + (row * NUM_SPLITS + sp)[:, None] * D + d[None, :], o, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def decode_split_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, po_ptr, plse_ptr, sc_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    T, chunk, qk_scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr,
    KS_MODE: tl.constexpr, VS_MODE: tl.constexpr, RETURN_SCORES: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Dense (fp16/bf16/fp32) or fp8 K/V. KS_MODE / VS_MODE: 0 no scale, 1 per (B, Hkv), 2 per (B, Hkv, T)."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    t_ar = tl.arange(0, BLOCK_T)
    gmask = g < GROUP
    dmask = d < D
    row = b * (HKV * GROUP) + hk * GROUP + g  # flat query-head index (B * Hq)
    q = tl.load(q_ptr + b * stride_qb + (hk * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    dt = q.dtype
    length = tl.load(len_ptr + b)
    start = sp * chunk
    end = tl.minimum(start + chunk, length)
    bh = b * HKV + hk
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    score_scale = qk_scale
    if KS_MODE == 1:
        score_scale = qk_scale * tl.load(ks_ptr + bh)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + t_ar
        tmask = t < end
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0).to(dt)
        s = _dot(q, tl.trans(k), DOT_FP32) * score_scale  # (GROUP_PAD, BLOCK_T)
        if KS_MODE == 2:
            s = s * tl.load(ks_ptr + bh * T + t, mask=tmask, other=1.0)[None, :]
        s = tl.where(tmask[None, :], s, float("-inf"))
        if RETURN_SCORES:
            tl.store(sc_ptr + row[:, None] * T + t[None, :], s, mask=gmask[:, None] & tmask[None, :])
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0).to(dt)
        if VS_MODE == 2:
            p = p * tl.load(vs_ptr + bh * T + t, mask=tmask, other=0.0)[None, :]
        acc = acc * alpha[:, None] + _dot(p.to(dt), v, DOT_FP32)
    if VS_MODE == 1:
        acc = acc * tl.load(vs_ptr + bh)
    _store_partial(po_ptr, plse_ptr, acc, m_i, l_i, row, g, d, gmask, dmask, sp, NUM_SPLITS, D)


@triton.jit
def decode_int_split_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kr_ptr, vr_ptr, len_ptr, po_ptr, plse_ptr, sc_ptr,
    stride_qb, stride_qh, stride_krb, stride_krh, stride_krt, stride_vrb, stride_vrh, stride_vrt,
    TQ, T, chunk, qk_scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BITS_K: tl.constexpr, GK: tl.constexpr, BITS_V: tl.constexpr, GV: tl.constexpr,
    RETURN_SCORES: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """KIVI keys (per-channel groups of GK tokens) and values (per-token groups of GV channels), packed uint8,
    then the full-precision residual. TQ quantized tokens, T = TQ + R in total."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    t_ar = tl.arange(0, BLOCK_T)
    gmask = g < GROUP
    dmask = d < D
    row = b * (HKV * GROUP) + hk * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + (hk * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    dt = q.dtype
    qf = q.to(tl.float32)
    length = tl.load(len_ptr + b)
    start = sp * chunk
    end = tl.minimum(start + chunk, length)
    bh = b * HKV + hk

    EK: tl.constexpr = 8 // BITS_K  # codes per byte
    EV: tl.constexpr = 8 // BITS_V
    WK: tl.constexpr = D // EK  # bytes per token
    WV: tl.constexpr = D // EV
    NGV: tl.constexpr = D // GV  # value groups per token
    FOLD_K: tl.constexpr = BLOCK_T == GK
    FOLD_V: tl.constexpr = NGV == 1
    k_byte = d // EK
    k_shift = (d % EK) * BITS_K
    v_byte = d // EV
    v_shift = (d % EV) * BITS_V
    n_kgroups = TQ // GK

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)

    # ---- quantized part: tokens [start, min(end, TQ)), tiles aligned to key groups
    q_end = tl.minimum(end, TQ)
    for t0 in range(start, q_end, BLOCK_T):
        t = t0 + t_ar
        tmask = t < q_end
        kv_mask = tmask[:, None] & dmask[None, :]
        kbytes = tl.load(kc_ptr + (bh * TQ + t)[:, None] * WK + k_byte[None, :], mask=kv_mask, other=0)
        kcode = ((kbytes.to(tl.int32) >> k_shift[None, :]) & ((1 << BITS_K) - 1)).to(tl.float32)
        if FOLD_K:
            grp = bh * n_kgroups + t0 // GK
            sk = tl.load(ks_ptr + grp * D + d, mask=dmask, other=0.0).to(tl.float32)  # (BLOCK_D,)
            zk = tl.load(kz_ptr + grp * D + d, mask=dmask, other=0.0).to(tl.float32)
            qs = (qf * sk[None, :]).to(dt)
            qz = tl.sum(qf * zk[None, :], 1)  # (GROUP_PAD,)
            s = (_dot(qs, tl.trans(kcode.to(dt)), DOT_FP32) + qz[:, None]) * qk_scale
        else:
            grp = bh * n_kgroups + t // GK  # (BLOCK_T,)
            sk = tl.load(ks_ptr + grp[:, None] * D + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            zk = tl.load(kz_ptr + grp[:, None] * D + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            k = (kcode * sk + zk).to(dt)
            s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        if RETURN_SCORES:
            tl.store(sc_ptr + row[:, None] * T + t[None, :], s, mask=gmask[:, None] & tmask[None, :])
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        vbytes = tl.load(vc_ptr + (bh * TQ + t)[:, None] * WV + v_byte[None, :], mask=kv_mask, other=0)
        vcode = ((vbytes.to(tl.int32) >> v_shift[None, :]) & ((1 << BITS_V) - 1)).to(tl.float32)
        if FOLD_V:
            sv = tl.load(vs_ptr + bh * TQ + t, mask=tmask, other=0.0).to(tl.float32)  # (BLOCK_T,)
            zv = tl.load(vz_ptr + bh * TQ + t, mask=tmask, other=0.0).to(tl.float32)
            pv = _dot((p * sv[None, :]).to(dt), vcode.to(dt), DOT_FP32) + tl.sum(p * zv[None, :], 1)[:, None]
        else:
            vg = (bh * TQ + t)[:, None] * NGV + (d // GV)[None, :]
            sv = tl.load(vs_ptr + vg, mask=kv_mask, other=0.0).to(tl.float32)
            zv = tl.load(vz_ptr + vg, mask=kv_mask, other=0.0).to(tl.float32)
            pv = _dot(p.to(dt), (vcode * sv + zv).to(dt), DOT_FP32)
        acc = acc * alpha[:, None] + pv

    # ---- residual part: tokens [max(start, TQ), end), full precision
    kr_base = kr_ptr + b * stride_krb + hk * stride_krh
    vr_base = vr_ptr + b * stride_vrb + hk * stride_vrh
    for t0 in range(tl.maximum(start, TQ), end, BLOCK_T):
        t = t0 + t_ar
        tmask = t < end
        kv_mask = tmask[:, None] & dmask[None, :]
        r = t - TQ
        k = tl.load(kr_base + r[:, None] * stride_krt + d[None, :], mask=kv_mask, other=0.0).to(dt)
        s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        if RETURN_SCORES:
            tl.store(sc_ptr + row[:, None] * T + t[None, :], s, mask=gmask[:, None] & tmask[None, :])
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(vr_base + r[:, None] * stride_vrt + d[None, :], mask=kv_mask, other=0.0).to(dt)
        acc = acc * alpha[:, None] + _dot(p.to(dt), v, DOT_FP32)
    _store_partial(po_ptr, plse_ptr, acc, m_i, l_i, row, g, d, gmask, dmask, sp, NUM_SPLITS, D)


@triton.jit
def merge_kernel(po_ptr, plse_ptr, out_ptr, lse_ptr,
                 NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per query head: out = sum_s w_s o_s / sum_s w_s with w_s = 2**(lse_s - max lse); total lse."""
    r = tl.program_id(0)
    s_ar = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    smask = s_ar < NUM_SPLITS
    dmask = d < D
    lse = tl.load(plse_ptr + r * NUM_SPLITS + s_ar, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)  # empty splits (-inf) weigh 0; at least one split holds a token
    o = tl.load(po_ptr + (r * NUM_SPLITS + s_ar)[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / total
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(lse_ptr + r, m + tl.log2(total))


@triton.jit
def probs_kernel(sc_ptr, lse_ptr, len_ptr, probs_ptr, T,
                 HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """probs[b, hk, t] = sum over the GROUP query heads of hk of 2**(s - lse); 0 at and beyond the length."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    b = bh // HKV
    g = tl.arange(0, GROUP_PAD)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    gmask = g < GROUP
    length = tl.load(len_ptr + b)
    valid = t < length
    row = bh * GROUP + g
    lse = tl.load(lse_ptr + row, mask=gmask, other=0.0)
    s = tl.load(sc_ptr + row[:, None] * T + t[None, :], mask=gmask[:, None] & valid[None, :], other=float("-inf"))
    p = tl.exp2(s - lse[:, None])
    tl.store(probs_ptr + bh * T + t, tl.sum(p, 0), mask=t < T)
