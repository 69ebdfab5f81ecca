"""Triton kernels for compaction: gathers that read only the kept rows.

Algorithm
---------
``gather_tokens``: grid ``(B * H, cdiv(K, BLOCK_K))``. A program loads ``BLOCK_K`` token indices of one
(batch, head), then copies those rows, ``BLOCK_W`` elements at a time, from ``x[b, h, idx, :]`` to
``out[b, h, k, :]``. Only the kept rows are read, so compacting a cache to K of T tokens moves ``2 K W`` elements
(read + write), never the full cache. Rows are addressed through strides, so ``x`` may be a view.

``gather_paged``: grid ``(B * H, cdiv(T, BLOCK_T))``. For output token ``t`` the program reads the block id
``table[b, t // S]`` and copies row ``t % S`` of that block; a missing block (id ``-1``) writes zeros. This is
the read side of a paged cache (blocks scattered in a pool, e.g. after an offloaded layer is fetched back).

Both kernels move bits: any dtype works (fp8 and packed integer codes are passed as ``uint8`` views).
"""

import triton
import triton.language as tl


@triton.jit
def gather_tokens_kernel(
    x_ptr, idx_ptr, out_ptr, H, K, W,
    stride_xb, stride_xh, stride_xt,
    BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
):
    bh = tl.program_id(0)
    kb = tl.program_id(1)
    b = bh // H
    h = bh % H
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    rows = tl.load(idx_ptr + bh * K + k, mask=kmask, other=0).to(tl.int64)
    src = x_ptr + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt
    dst = out_ptr + (bh * K + k).to(tl.int64)[:, None] * W
    for w0 in range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        m = kmask[:, None] & (w < W)[None, :]
        tl.store(dst + w[None, :], tl.load(src + w[None, :], mask=m), mask=m)


@triton.jit
def gather_paged_kernel(
    pool_ptr, table_ptr, out_ptr, H, T, W, M,
    S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    blk = tl.load(table_ptr + b * M + t // S, mask=tmask, other=-1).to(tl.int64)
    has = tmask & (blk >= 0)
    src = pool_ptr + ((tl.maximum(blk, 0) * H + h) * S + t % S)[:, None] * W
    dst = out_ptr + (bh * T + t).to(tl.int64)[:, None] * W
    for w0 in range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        wmask = (w < W)[None, :]
        vals = tl.load(src + w[None, :], mask=has[:, None] & wmask, other=0)
        tl.store(dst + w[None, :], vals, mask=tmask[:, None] & wmask)
