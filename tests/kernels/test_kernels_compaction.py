"""kvtune.kernels.compaction: gathers vs naive indexing, Triton vs reference (exact: they move bits)."""

import pytest
import torch

from kvtune.kernels.compaction import gather_paged, gather_tokens, to_paged
from kvtune.kernels.quant import dequantize_int, quantize_int
from tolerances import EXACT

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float8_e4m3fn]


def _x(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _same(a, b):
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    torch.testing.assert_close(a, b, atol=EXACT[0], rtol=EXACT[1])


def test_reference_gather_matches_loops():
    x = _x((3, 2, 17, 5), torch.float32, "cpu")
    idx = torch.randint(0, 17, (3, 2, 7))
    out = gather_tokens(x, idx, backend="torch")
    for b in range(3):
        for h in range(2):
            for k in range(7):
                assert torch.equal(out[b, h, k], x[b, h, idx[b, h, k]])


def test_reference_paged_round_trip_and_missing_blocks():
    x = _x((3, 2, 54, 8), torch.float16, "cpu", seed=1)
    pool, table = to_paged(x, 16)
    assert pool.shape == (12, 2, 16, 8) and table.shape == (3, 4)
    assert torch.equal(gather_paged(pool, table, 54, backend="torch"), x)
    table[1, 2] = -1  # sequence 1 lost tokens 32..47
    dense = gather_paged(pool, table, 54, backend="torch")
    assert float(dense[1, :, 32:48].abs().max()) == 0.0
    assert torch.equal(dense[1, :, :32], x[1, :, :32]) and torch.equal(dense[0], x[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k", [(17, 5), (233, 97), (54, 54)])
def test_gather_tokens_triton_matches_reference(need_triton, device, dtype, t, k):
    x = _x((3, 2, t, 40), dtype, device, seed=t)
    idx = torch.stack([torch.randperm(t)[:k] for _ in range(6)]).reshape(3, 2, k).to(device)
    _same(gather_tokens(x, idx, backend="triton"), gather_tokens(x, idx, backend="torch"))


def test_gather_tokens_triton_strided_view(need_triton, device):
    x = _x((3, 2, 128, 32), torch.float16, device, seed=4)[:, :, :97]  # view of a preallocated cache
    idx = torch.randint(0, 97, (3, 2, 20)).to(device)
    _same(gather_tokens(x, idx, backend="triton"), gather_tokens(x, idx, backend="torch"))


def test_gather_packed_codes_equals_index_select(need_triton, device):
    x = _x((3, 2, 54, 32), torch.float16, device, seed=5)
    qt = quantize_int(x, bits=4, group_size=32, axis="channel")
    idx = torch.randint(0, 54, (3, 2, 11)).to(device)
    packed = gather_tokens(qt.packed, idx, backend="triton")
    assert torch.equal(packed, qt.index_select_tokens(idx).packed)
    assert torch.equal(dequantize_int(qt.index_select_tokens(idx)), gather_tokens(dequantize_int(qt), idx))


@pytest.mark.parametrize("dtype", [torch.float16, torch.uint8, torch.float8_e5m2])
def test_gather_paged_triton_matches_reference(need_triton, device, dtype):
    x = _x((3, 2, 97, 24), dtype, device, seed=6)
    pool, table = to_paged(x, 16)
    perm = torch.randperm(pool.shape[0])  # scatter the blocks around the pool
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    pool = pool[perm]
    table = inv[table.long()].to(torch.int32).to(device)
    table[2, 1] = -1
    for n in (97, 17, 112):
        _same(gather_paged(pool, table, n, backend="triton"), gather_paged(pool, table, n, backend="torch"))


def test_compaction_validation():
    x = torch.randn(2, 2, 9, 4)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        gather_tokens(x, torch.full((2, 2, 3), 9))
    with pytest.raises(ValueError, match=r"idx must have shape \(2, 2, K\)"):
        gather_tokens(x, torch.zeros(2, 3, dtype=torch.long))
    pool, table = to_paged(x, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        gather_paged(pool, table, 13)
    with pytest.raises(ValueError, match="block ids"):
        gather_paged(pool, table + 10, 9)
    with pytest.raises(ValueError, match="block_size"):
        to_paged(x, 0)
