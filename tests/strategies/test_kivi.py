"""KIVI's two value policies against a reference written here: the paper's sliding full-precision value window
holds exactly the newest ``residual`` values at every step, ``key_schedule`` quantizes values with the keys;
bytes held equal the formula; attention over the stored form equals attention over the decoded cache; an
omitted ``value_window`` in a pipeline document keeps the meaning older documents had."""

from __future__ import annotations

import pytest
import torch
import yaml

from kvtune.kernels.decode_attention import decode_attention
from kvtune.kernels.quant import dequantize_int, int_nbytes, quantize_int
from kvtune.pipeline import Pipeline
from kvtune.strategies import Stages, build
from kvtune.strategies.kivi import KIVI

from test_conformance import _pipeline, _run, held_bytes

# attend() (int kernel over the quantized part, dequantizing inside) vs the dense kernel over decoded(): the same
# dequantized values, so only the order of float32 accumulation and the output cast differ (as ATTN_QUANT in
# tests/kernels/tolerances.py for the int kernel against its reference)
ATTEND_VS_DECODED = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}

CHUNKS = (37, 1, 1, 9, 1, 30, 1, 1, 64, 3, 1, 1, 1, 40)  # a prefill, then single tokens and chunks: 191 tokens


def _kv(t, seed, b=2, h=3, d=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def _expected(k, v, n_kq, n_vq, bits, group):
    """What the store must decode to with ``n_kq`` keys and ``n_vq`` values quantized: the quantized prefixes
    through the quantizer (key groups of ``group`` tokens from token 0, values per token), the rest exact."""
    kd = torch.cat([dequantize_int(quantize_int(k[:, :, :n_kq], bits=bits, group_size=group, axis="token")),
                    k[:, :, n_kq:]], dim=2) if n_kq else k
    vd = torch.cat([dequantize_int(quantize_int(v[:, :, :n_vq], bits=bits, group_size=group, axis="channel")),
                    v[:, :, n_vq:]], dim=2) if n_vq else v
    return kd, vd


def _reference_counts(sizes, group, residual, policy):
    """(keys quantized, values quantized) after each append, by the rule each policy states."""
    n = n_kq = n_vq = 0
    out = []
    for t in sizes:
        n += t
        if n - n_kq >= residual:  # the key residual reached ``residual``: every whole group in it goes
            flushed = ((n - n_kq) // group) * group
            n_kq += flushed
            if policy == "key_schedule":
                n_vq += flushed
        if policy == "paper":
            n_vq = max(0, n - residual)  # the newest ``residual`` values stay in full precision
        out.append((n, n_kq, n_vq))
    return out


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("policy", ["paper", "key_schedule"])
@pytest.mark.parametrize("group, residual", [(16, 32), (32, 64), (32, 128)])
def test_value_window_at_every_step(policy, bits, group, residual):
    codec = KIVI(bits=bits, group_size=group, residual=residual, value_window=policy)
    store = codec.new_store()
    k, v = _kv(sum(CHUNKS), seed=bits + group)
    at = 0
    for (n, n_kq, n_vq), t in zip(_reference_counts(CHUNKS, group, residual, policy), CHUNKS):
        store.append(k[:, :, at:at + t], v[:, :, at:at + t])
        at += t
        assert (len(store), store.n_kq, store.n_vq) == (n, n_kq, n_vq)
        kd, vd = store.decoded()
        ek, ev = _expected(k[:, :, :n], v[:, :, :n], n_kq, n_vq, bits, group)
        assert torch.equal(kd, ek) and torch.equal(vd, ev)
        if policy == "paper":  # exactly the newest ``residual`` values are exact, and no older one
            full = min(n, residual)
            assert torch.equal(vd[:, :, n - full:], v[:, :, n - full:n])
            if n > full:
                assert not torch.equal(vd[:, :, n - full - 1], v[:, :, n - full - 1])
        else:
            assert n_vq == n_kq  # values flushed with the keys: no full-precision value beyond the key residual
        # bytes: what the tensors hold == the count-based formula
        d = k.shape[-1]
        formula = 4 * 2 * 3 * ((n - n_kq) + (n - n_vq)) * d  # float32 residuals
        formula += int_nbytes((2, 3, n_kq, d), bits, group, "token", torch.float32) if n_kq else 0
        formula += int_nbytes((2, 3, n_vq, d), bits, min(group, d), "channel", torch.float32) if n_vq else 0
        assert store.nbytes() == held_bytes(store) == formula


@pytest.mark.parametrize("policy", ["paper", "key_schedule"])
@pytest.mark.parametrize("tokens", [17, 64, 97, 233, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_append_bytes_equal_analytic(policy, tokens, dtype):
    codec = KIVI(bits=2, group_size=32, residual=64, value_window=policy)
    store = codec.new_store()
    k, v = _kv(tokens, seed=tokens)
    store.append(k.to(dtype), v.to(dtype))
    assert store.nbytes() == held_bytes(store) == codec.analytic_nbytes(2, 3, tokens, 64, dtype)


def test_paper_policy_bytes_by_hand():
    # 2-bit, G=32, R=64, 100 tokens, fp16, one head of 64 channels. Keys: 96 quantized + 4 exact. Values: the
    # newest 64 exact, 36 quantized per token. Keys: 96*64/4 code bytes + 3 groups * 64 channels * (scale+zero)
    # * 2 bytes; values: 36*64/4 + 36 tokens * 2 groups * 2 * 2; exact: (4 + 64) tokens * 64 * 2 bytes.
    codec = KIVI(bits=2, group_size=32, residual=64, value_window="paper")
    expected = (96 * 16 + 3 * 64 * 4) + (36 * 16 + 36 * 2 * 4) + (4 + 64) * 64 * 2
    assert codec.analytic_nbytes(1, 1, 100, 64, torch.float16) == expected
    schedule = KIVI(bits=2, group_size=32, residual=64, value_window="key_schedule")
    assert schedule.analytic_nbytes(1, 1, 100, 64, torch.float16) == 2 * (96 * 16) + 3 * 64 * 4 + 96 * 2 * 4 + 8 * 64 * 2


@pytest.mark.parametrize("policy", ["paper", "key_schedule"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attend_equals_attention_over_the_decoded_cache(policy, dtype):
    store = KIVI(bits=4, group_size=32, residual=64, value_window=policy).new_store()
    k, v = _kv(300, seed=9)
    g = torch.Generator().manual_seed(2)
    at = 0
    for t in (150, 1, 1, 17, 1, 30, 100):  # the split point moves through and off group boundaries
        store.append(k[:, :, at:at + t].to(dtype), v[:, :, at:at + t].to(dtype))
        at += t
        q = torch.randn(2, 6, 64, generator=g).to(dtype)
        out, probs = store.attend(q, 0.125, return_probs=True)
        ref, ref_probs = decode_attention(q, *store.decoded(), scale=0.125, return_probs=True)
        rtol, atol = ATTEND_VS_DECODED[dtype]
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(probs, ref_probs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("policy", ["paper", "key_schedule"])
def test_keep_reencodes_with_the_same_policy(policy):
    codec = KIVI(bits=2, group_size=16, residual=32, value_window=policy)
    store = codec.new_store()
    k, v = _kv(120, seed=4)
    store.append(k, v)
    store.keep(torch.arange(0, 120, 2).expand(2, 3, -1))
    assert len(store) == 60 and store.value_window == policy
    assert store.n_vq == (60 - 32 if policy == "paper" else store.n_kq)
    assert store.nbytes() == held_bytes(store)


def test_paper_is_the_default_and_an_omitted_parameter_keeps_the_old_meaning():
    assert KIVI().value_window == "paper"
    assert KIVI.search_space(_FixedTrial(), None)["value_window"] == "paper"  # every document kvtune writes
    old = yaml.safe_load("schema_version: 1\ncodec: {method: kivi, params: {bits: 2}}\n")
    assert Stages.of(Pipeline.from_dict(old)).codec.value_window == "key_schedule"
    assert build("codec", "kivi", {"value_window": "paper"}).value_window == "paper"
    with pytest.raises(Exception, match="value_window must be one of paper, key_schedule"):
        build("codec", "kivi", {"value_window": "sliding"})


class _FixedTrial:
    def suggest_categorical(self, name, choices):
        return choices[0]


def test_key_schedule_composes_through_the_runtime(tiny, tiny_ids):
    """The conformance suite runs ``kivi`` with the paper's policy; the variant through the runtime here."""
    p = _pipeline(sel=("snapkv", {"budget": 0.5, "window": 8, "kernel": 5, "recent": 8}),
                  codec=("kivi", {"bits": 2, "group_size": 16, "residual": 16, "value_window": "key_schedule"}))
    logits, cache = _run(tiny, tiny_ids, p)
    assert torch.isfinite(logits).all()
    for layer in cache.layers:
        assert layer.store.nbytes() == held_bytes(layer.store)
        assert layer.store.n_vq == layer.store.n_kq
