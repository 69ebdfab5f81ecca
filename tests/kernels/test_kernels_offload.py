"""kvtune.kernels.offload: chunking, chunked copies, and the layer prefetcher (CPU parts here; CUDA parts skip)."""

import pytest
import torch

from kvtune.kernels.offload import MIN_CHUNK_BYTES, LayerPrefetcher, chunk_ranges, copy_chunked, pinned_empty

MiB = 1 << 20


def test_chunk_ranges_cover_and_respect_minimum():
    for n in (0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB + 5, 5 * MiB):
        r = chunk_ranges(n)
        assert sum(b - a for a, b in r) == n
        assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
        assert all(b - a >= MIN_CHUNK_BYTES for a, b in r) or (len(r) == 1 and n < MiB)
    assert chunk_ranges(3 * MiB + 5) == [(0, MiB), (MiB, 2 * MiB), (2 * MiB, 3 * MiB + 5)]
    assert chunk_ranges(4 * MiB, 2 * MiB) == [(0, 2 * MiB), (2 * MiB, 4 * MiB)]
    with pytest.raises(ValueError, match="1 MiB"):
        chunk_ranges(10, 4096)


def test_copy_chunked_moves_every_byte():
    src = torch.randn(3 * MiB // 4 + 7)  # 3 MiB + 28 bytes of float32
    dst = torch.empty_like(src)
    copy_chunked(dst, src)
    assert torch.equal(dst, src)
    with pytest.raises(ValueError, match="bytes"):
        copy_chunked(torch.empty(3), src)
    with pytest.raises(ValueError, match="contiguous"):
        copy_chunked(dst, torch.randn(8, 8).t())


def _layers(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = pinned_empty((2, 8, 300, 128), torch.float16)  # 1.2 MiB: two chunks
        v = pinned_empty((2, 8, 300, 128), torch.float16)
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
        out.append([k, v])
    return out


def test_prefetcher_delivers_each_layer_cpu():
    layers = _layers(4)
    pf = LayerPrefetcher(layers, "cpu")
    pf.prefetch(0)
    seen = []
    for i in range(4):
        k, v = pf.get(i)
        if i + 1 < 4:
            pf.prefetch(i + 1)
        ref_k, ref_v = pf.fetch_blocking(i)
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
        seen.append(float(k.float().sum()))
        pf.release(i)
    assert pf.bytes_copied == 4 * pf.layer_nbytes
    assert len(set(seen)) == 4


def test_prefetcher_validation():
    layers = _layers(2)
    with pytest.raises(ValueError, match="layer 1 has tensors"):
        LayerPrefetcher([layers[0], [layers[1][0]]], "cpu")
    pf = LayerPrefetcher(layers, "cpu")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        pf.get(2)
    with pytest.raises(ValueError, match="depth"):
        LayerPrefetcher(layers, "cpu", depth=0)


def test_prefetcher_cuda_overlap_and_correctness():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layers = _layers(6)
    assert all(t.is_pinned() for layer in layers for t in layer)
    pf = LayerPrefetcher(layers, "cuda")
    pf.prefetch(0)
    sums = []
    for i in range(6):
        k, v = pf.get(i)
        if i + 1 < 6:
            pf.prefetch(i + 1)
        sums.append((k.float().sum() + v.float().sum()).item())
        pf.release(i)
    want = [(layer[0].float().sum() + layer[1].float().sum()).item() for layer in layers]
    assert sums == pytest.approx(want, rel=1e-5)
