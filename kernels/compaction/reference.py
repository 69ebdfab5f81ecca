"""PyTorch reference for compaction: per-head token gathers and paged block tables.

* ``gather_tokens_ref(x (B, H, T, W), idx (B, H, K)) -> (B, H, K, W)``: row ``idx[b, h, k]`` of head ``(b, h)``.
  ``W`` is whatever the storage holds per token (``D`` values, ``D * bits / 8`` packed bytes, group scales).
* Paged layout: a pool of blocks ``(N, H, S, W)`` (``S`` tokens per block) and a block table ``(B, M)`` of
  block ids (``-1`` = no block). Token ``t`` of sequence ``b`` lives in block ``table[b, t // S]`` at row
  ``t % S``. ``gather_paged_ref`` rebuilds the dense ``(B, H, T, W)`` view (zeros where there is no block).
"""

from __future__ import annotations

import torch


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dtype in _FP8:  # torch's CPU gather has no fp8 kernel: move the bytes
        return gather_tokens_ref(x.view(torch.uint8), idx).view(x.dtype)
    b, h, _, w = x.shape
    return x.gather(2, idx.long()[..., None].expand(b, h, idx.shape[2], w))  # (B, H, K, W)


def gather_paged_ref(pool: torch.Tensor, table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if pool.dtype in _FP8:
        return gather_paged_ref(pool.view(torch.uint8), table, num_tokens).view(pool.dtype)
    n, h, s, w = pool.shape
    b, m = table.shape
    t = torch.arange(num_tokens, device=pool.device)  # (T,)
    blk = table.long()[:, t // s]  # (B, T) block id of each token
    rows = (t % s)[None, :].expand(b, num_tokens)  # (B, T) row inside the block
    flat = pool.permute(0, 2, 1, 3).reshape(n * s, h, w)  # (N*S, H, W): token-major
    src = (blk.clamp(min=0) * s + rows).reshape(-1)  # (B*T,)
    out = flat[src].reshape(b, num_tokens, h, w).permute(0, 2, 1, 3)  # (B, H, T, W)
    return torch.where((blk >= 0)[:, None, :, None], out, torch.zeros((), dtype=pool.dtype, device=pool.device))
