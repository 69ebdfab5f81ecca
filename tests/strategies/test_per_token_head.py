"""int8 ``symmetric: true``: vLLM 0.33's ``int8_per_token_head`` quantizer, checked against the formula written out here.

The reference follows ``_reshape_cache_per_token_head`` (vllm/v1/attention/ops/triton_reshape_and_cache_flash.py of
the vLLM 0.33.0 sdist, ``IS_INT_QUANT`` branch) element by element in plain Python floats: per token and KV head,
``scale = max(absmax / 127, 1e-6)`` (float32), ``q = x * (1 / scale)``, then ``q + 0.5`` for ``q >= 0`` else
``q - 0.5``, clamped to [-128, 127] and truncated by the int8 store; the attention kernel reads ``q * scale``.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from kvtune.errors import UserError
from kvtune.strategies import build


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def vllm_int8_per_token_head(head: list[float]) -> tuple[list[int], float]:
    """One (token, head) vector -> (codes, float32 scale), as vLLM 0.33 writes them."""
    absmax = max(abs(f32(v)) for v in head)
    scale = f32(max(f32(absmax / 127.0), 1e-6))
    inv = f32(1.0 / scale)
    codes = []
    for v in head:
        q = f32(f32(v) * inv)
        q = q + 0.5 if q >= 0 else q - 0.5
        codes.append(int(math.trunc(min(max(q, -128.0), 127.0))))
    return codes, scale


def _codec(group: int = 128):
    return build("codec", "int8", {"group_size": group, "symmetric": True})


@pytest.mark.parametrize(("tokens", "head_dim"), [(17, 64), (5, 128)])
def test_codes_and_decoded_values_match_vllms_formula(tokens: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 3, tokens, head_dim, generator=g) * torch.rand(2, 3, tokens, 1, generator=g) * 4
    values = torch.randn(2, 3, tokens, head_dim, generator=g)
    keys[0, 1, 2] = 0.0  # an all-zero head: scale 1e-6, codes 0
    store = _codec().new_store()
    store.append(keys, values)
    codes, scales = store.k.codes, store.k.scale  # (B, H, T, D) int8, (B, H, T, 1) float32
    dk, dv = store.decoded()
    for b in range(2):
        for h in range(3):
            for t in range(tokens):
                ref_codes, ref_scale = vllm_int8_per_token_head(keys[b, h, t].tolist())
                assert codes[b, h, t].tolist() == ref_codes
                assert scales[b, h, t, 0].item() == ref_scale
                assert dk[b, h, t].tolist() == [f32(c * ref_scale) for c in ref_codes]
                ref_v, ref_vs = vllm_int8_per_token_head(values[b, h, t].tolist())
                assert dv[b, h, t].tolist() == [f32(c * ref_vs) for c in ref_v]
    assert scales[0, 1, 2, 0].item() == f32(1e-6) and codes[0, 1, 2].abs().sum() == 0


def test_rounding_is_half_away_from_zero() -> None:
    # absmax 127 gives scale 1.0: the codes are the values rounded half away from zero (torch.round would give 2, -2)
    head = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, -127.0] + [0.0] * 58)
    store = _codec(64).new_store()
    store.append(head.expand(1, 1, 1, 64), head.expand(1, 1, 1, 64))
    assert store.k.codes[0, 0, 0, :6].tolist() == [127, 3, -3, 1, -1, -127]
    assert store.k.codes[0, 0, 0, :6].tolist() == vllm_int8_per_token_head(head.tolist())[0][:6]


def test_error_is_bounded_by_half_a_step() -> None:
    x = torch.randn(1, 2, 33, 64, generator=torch.Generator().manual_seed(1))
    store = _codec().new_store()
    store.append(x, x)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((store.decoded()[0] - x).abs() <= step / 2 + 1e-6).all()


def test_bytes_held_equal_analytic_and_vllms_layout() -> None:
    """vLLM holds head_dim int8 codes + one float32 scale per token and head, for K and V."""
    codec = _codec()
    store = codec.new_store()
    x = torch.randn(2, 3, 17, 64)
    store.append(x, x)
    assert store.nbytes() == codec.analytic_nbytes(2, 3, 17, 64, torch.float32) == 2 * 2 * 3 * 17 * (64 + 4)
    assert codec.bytes_per_token(8, 128, torch.bfloat16) == 2 * 8 * (128 + 4)  # llama-3.1-8b: 2,112 B per layer


def test_appends_and_cuts_are_exact() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 2, 9, 64, generator=g), torch.randn(1, 2, 4, 64, generator=g)
    whole, parts = _codec().new_store(), _codec().new_store()
    whole.append(torch.cat([a, b], 2), torch.cat([a, b], 2))
    parts.append(a, a)
    parts.decoded()  # memoized view extended on append
    parts.append(b, b)
    assert torch.equal(parts.decoded()[0], whole.decoded()[0]) and len(parts) == 13
    idx = torch.tensor([[[0, 3, 12], [1, 2, 5]]])
    parts.keep(idx)
    expect = whole.decoded()[1].gather(2, idx[..., None].expand(-1, -1, -1, 64))
    assert torch.equal(parts.decoded()[1], expect) and len(parts) == 3
    assert parts.nbytes() == _codec().analytic_nbytes(1, 2, 3, 64, torch.float32)


def test_smaller_groups_get_their_own_scale() -> None:
    x = torch.cat([torch.full((1, 1, 1, 32), 0.01), torch.full((1, 1, 1, 32), 10.0)], dim=-1)
    store = _codec(32).new_store()
    store.append(x, x)
    assert store.k.scale.shape == (1, 1, 1, 2)
    assert torch.allclose(store.decoded()[0], x, rtol=1e-3)


def test_symmetric_must_be_a_boolean() -> None:
    with pytest.raises(UserError, match=r"codec.params \(int8\): symmetric must be true or false"):
        build("codec", "int8", {"group_size": 64, "symmetric": "yes"})


# -- fp8_per_token_head: kvtune's fp8 with scale=token (e4m3) ---------------------------------------------------


def vllm_fp8_per_token_head(head: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One (token, head) vector (float32) -> (e4m3 codes, float32 scale), as vLLM 0.33 writes them: the same kernel
    with QUANT_MAX/MIN = +-448 and no rounding step (the fp8 store rounds to nearest even)."""
    absmax = max(abs(v) for v in head.tolist())
    scale = f32(max(f32(absmax / 448.0), 1e-6))
    q = (head * f32(1.0 / scale)).clamp(-448.0, 448.0)  # float32 products, as the kernel's
    return q.to(torch.float8_e4m3fn), scale


def test_fp8_scale_token_is_vllms_fp8_per_token_head() -> None:
    """Scales equal exactly; codes equal except where ``x / scale`` (kvtune) and ``x * (1 / scale)`` (vLLM) differ
    in the last float32 bit right at an fp8 rounding boundary: then one fp8 step apart."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 29, 64, generator=g) * torch.rand(2, 3, 29, 1, generator=g) * 8
    store = build("codec", "fp8", {"fmt": "e4m3", "scale": "token"}).new_store()
    store.append(x, x)
    data, scale = store.k.data, store.k.scale  # (B, H, T, D) e4m3, (B, H, T) float32
    differ = 0
    for b in range(2):
        for h in range(3):
            for t in range(29):
                ref, ref_scale = vllm_fp8_per_token_head(x[b, h, t])
                assert scale[b, h, t].item() == ref_scale
                mine, theirs = data[b, h, t].float(), ref.float()
                off = mine != theirs
                differ += int(off.sum())
                step = theirs.abs().clamp_min(2.0**-6) * 2.0**-3  # e4m3: 3 mantissa bits
                assert ((mine - theirs).abs()[off] <= step[off] + 1e-9).all()
    assert differ <= x.numel() // 1000, f"{differ} of {x.numel()} codes differ"
