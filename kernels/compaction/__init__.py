"""Compaction: keep a per-head set of tokens, and read paged (block-table) caches.

Public API::

    out = gather_tokens(x, idx)                    # x (B, H, T, W), idx (B, H, K) -> (B, H, K, W)
    pool, table = to_paged(x, block_size)          # (N, H, S, W) blocks + (B, M) int32 block table
    dense = gather_paged(pool, table, num_tokens)  # (B, H, num_tokens, W)

``gather_tokens`` is how selection (H2O, SnapKV, ...) shrinks a cache: each (batch, KV head) keeps its own
``K`` tokens, in the order given, reading only those rows (the full cache is never copied or dequantized).
``W`` is the per-token width of whatever is stored (values, packed codes, per-token scales), any dtype.

Paged layout: ``pool[n]`` is a block of ``S`` consecutive tokens of all heads; ``table[b, j]`` is the block
holding tokens ``[j*S, (j+1)*S)`` of sequence ``b``, ``-1`` if none (read back as zeros). Blocks are the unit
the offload path moves between host and device.
"""

from __future__ import annotations

import torch

from ..backend import Backend, resolve
from . import reference as _ref

__all__ = ["gather_tokens", "gather_paged", "to_paged"]

_BYTE_VIEW = {torch.float8_e4m3fn, torch.float8_e5m2}


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Rows ``idx[b, h, k]`` of ``x[b, h]``: ``(B, H, T, W)`` and ``(B, H, K)`` -> ``(B, H, K, W)``."""
    where = "gather_tokens"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a tensor of shape (B, H, T, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    b, h, t, w = x.shape
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3 or tuple(idx.shape[:2]) != (b, h):
        raise ValueError(f"{where}: idx must have shape ({b}, {h}, K), got "
                         f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
        raise ValueError(f"{where}: idx must be an integer tensor, got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"{where}: idx is on {idx.device}, x on {x.device}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t):
        raise ValueError(f"{where}: idx values must lie in [0, {t}), got [{int(idx.min())}, {int(idx.max())}]")
    if resolve(backend, x.device) is not Backend.TRITON or idx.numel() == 0 or w == 0:
        return _ref.gather_tokens_ref(x, idx)
    from . import triton as tk

    src = x.view(torch.uint8) if x.dtype in _BYTE_VIEW else x
    if src.stride(3) != 1:
        src = src.contiguous()
    k = idx.shape[2]
    out = torch.empty((b, h, k, w), device=x.device, dtype=src.dtype)
    block_k = 16
    tk.gather_tokens_kernel[(b * h, -(-k // block_k))](
        src, idx.contiguous(), out, h, k, w, src.stride(0), src.stride(1), src.stride(2),
        BLOCK_K=block_k, BLOCK_W=min(_pow2(w, 16), 256),
    )
    return out.view(x.dtype) if x.dtype in _BYTE_VIEW else out


def to_paged(x: torch.Tensor, block_size: int):
    """Split a dense ``(B, H, T, W)`` cache into a pool of ``(B * ceil(T/S), H, S, W)`` blocks and a ``(B, M)``
    int32 block table (sequence ``b`` owns blocks ``b*M .. b*M+M-1``; the last block is zero-padded)."""
    where = "to_paged"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a tensor of shape (B, H, T, W)")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be a positive int, got {block_size!r}")
    b, h, t, w = x.shape
    m = -(-t // block_size)
    padded = torch.zeros((b, h, m * block_size, w), dtype=x.dtype, device=x.device)
    padded[:, :, :t] = x
    pool = padded.reshape(b, h, m, block_size, w).permute(0, 2, 1, 3, 4).reshape(b * m, h, block_size, w)  # (N, H, S, W)
    table = torch.arange(b * m, dtype=torch.int32, device=x.device).reshape(b, m)  # (B, M)
    return pool.contiguous(), table


def gather_paged(pool: torch.Tensor, table: torch.Tensor, num_tokens: int, *, backend=None) -> torch.Tensor:
    """Dense ``(B, H, num_tokens, W)`` view of a paged cache (zeros where the table says ``-1``)."""
    where = "gather_paged"
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4:
        raise ValueError(f"{where}: pool must be a tensor of shape (N, H, S, W)")
    n, h, s, w = pool.shape
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"{where}: table must be a tensor of shape (B, M)")
    if table.dtype.is_floating_point or table.dtype == torch.bool:
        raise ValueError(f"{where}: table must be an integer tensor, got {table.dtype}")
    if table.device != pool.device:
        raise ValueError(f"{where}: table is on {table.device}, pool on {pool.device}")
    b, m = table.shape
    if not isinstance(num_tokens, int) or not 0 <= num_tokens <= m * s:
        raise ValueError(f"{where}: num_tokens must be an int in [0, {m * s}] (M * S), got {num_tokens!r}")
    if table.numel() and (int(table.min()) < -1 or int(table.max()) >= n):
        raise ValueError(f"{where}: table entries must be -1 or block ids in [0, {n}), got "
                         f"[{int(table.min())}, {int(table.max())}]")
    if resolve(backend, pool.device) is not Backend.TRITON or num_tokens == 0 or b * h * w == 0:
        return _ref.gather_paged_ref(pool, table, num_tokens)
    from . import triton as tk

    src = (pool.view(torch.uint8) if pool.dtype in _BYTE_VIEW else pool).contiguous()
    out = torch.empty((b, h, num_tokens, w), device=pool.device, dtype=src.dtype)
    block_t = 16
    tk.gather_paged_kernel[(b * h, -(-num_tokens // block_t))](
        src, table.contiguous(), out, h, num_tokens, w, m, S=s, BLOCK_T=block_t, BLOCK_W=min(_pow2(w, 16), 256),
    )
    return out.view(pool.dtype) if pool.dtype in _BYTE_VIEW else out
