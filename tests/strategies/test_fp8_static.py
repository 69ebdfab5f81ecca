"""fp8 with one static scale of 1.0 (``scale="tensor"``): the numerics of vLLM/SGLang/TensorRT-LLM without calibrated
KV scales, which ``recommend --stack`` measures."""

from __future__ import annotations

import pytest
import torch

from kvtune.kernels.decode_attention import decode_attention
from kvtune.strategies.fp8 import FP8


@pytest.mark.parametrize(("fmt", "dtype", "fmax"), [("e4m3", torch.float8_e4m3fn, 448.0),
                                                    ("e5m2", torch.float8_e5m2, 57344.0)])
def test_static_scale_is_a_saturating_cast(fmt: str, dtype: torch.dtype, fmax: float) -> None:
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 17, 16) * 4, torch.randn(2, 3, 17, 16)
    keys[0, 0, 0, 0], keys[1, 2, 5, 3] = 1e6, -1e6  # beyond the format's range: saturated, never inf/nan
    store = FP8(fmt=fmt, scale="tensor").new_store()
    store.append(keys, values)
    k, v = store.decoded()
    assert torch.equal(k, keys.clamp(-fmax, fmax).to(dtype).float())
    assert torch.equal(v, values.to(dtype).float())
    assert k[0, 0, 0, 0].item() == fmax and k[1, 2, 5, 3].item() == -fmax
    # small values lose more than with a per-head scale: the static scale is the worse case the stack runs
    per_head = FP8(fmt=fmt, scale="head").new_store()
    small = torch.randn(1, 2, 33, 16) * 1e-3
    per_head.append(small, small)
    static = FP8(fmt=fmt, scale="tensor").new_store()
    static.append(small, small)
    err_static = (static.decoded()[0] - small).abs().mean()
    err_head = (per_head.decoded()[0] - small).abs().mean()
    assert err_static > err_head


def test_static_store_bytes_keep_and_attend() -> None:
    torch.manual_seed(1)
    codec = FP8(fmt="e4m3", scale="tensor")
    store = codec.new_store()
    keys, values = torch.randn(2, 3, 54, 16), torch.randn(2, 3, 54, 16)
    store.append(keys, values)
    assert store.nbytes() == 2 * 2 * 3 * 54 * 16 + 8 == codec.analytic_nbytes(2, 3, 54, 16, torch.float32)
    store.append(keys[:, :, :3], values[:, :, :3])  # decode tokens: still one byte per value, no per-token scale
    assert len(store) == 57 and store.nbytes() == codec.analytic_nbytes(2, 3, 57, 16, torch.float32)
    before = store.decoded()[0]
    idx = torch.tensor([0, 7, 56]).expand(2, 3, 3).contiguous()
    store.keep(idx)
    assert len(store) == 3 and torch.equal(store.decoded()[0], before[:, :, [0, 7, 56]])
    assert store.nbytes() == codec.analytic_nbytes(2, 3, 3, 16, torch.float32)
    query = torch.randn(2, 6, 16)
    out, _ = store.attend(query, 0.25)  # the fused fp8 kernel with scale 1.0 == dense attention over the codes
    ref, _ = decode_attention(query, *store.decoded(), scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_unknown_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="scale must be one of head, token, tensor"):
        FP8(scale="layer")
