"""kvtune.kernels.backend: the resolver, and proof that the Triton tests really run Triton code here."""

import pytest
import torch

from kvtune.kernels import backend as kb


def test_parse_backend_names():
    assert kb.parse_backend("torch") is kb.Backend.TORCH
    assert kb.parse_backend(" TORCH ") is kb.Backend.TORCH
    assert kb.parse_backend(kb.Backend.TORCH) is kb.Backend.TORCH
    want = kb.Backend.TRITON if (torch.cuda.is_available() and kb.triton_available()) else kb.Backend.TORCH
    assert kb.parse_backend("auto") is want


def test_parse_backend_rejects_unknown_and_says_where():
    with pytest.raises(ValueError, match="environment variable KVTUNE_KERNEL_BACKEND: unknown kernel backend 'cuda'"):
        kb.parse_backend("cuda", where="environment variable KVTUNE_KERNEL_BACKEND")


def test_forced_triton_without_cuda_needs_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal only applies without it")
    if not kb.triton_available():
        pytest.skip("triton is not importable here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA is not available"):
        kb.parse_backend("triton")


def test_default_backend_reads_env_once(monkeypatch):
    kb.default_backend.cache_clear()
    try:
        monkeypatch.setenv(kb.ENV_VAR, "torch")
        assert kb.default_backend() is kb.Backend.TORCH
        monkeypatch.setenv(kb.ENV_VAR, "bogus")
        assert kb.default_backend() is kb.Backend.TORCH  # resolved once, cached
    finally:
        kb.default_backend.cache_clear()


def test_triton_kernels_are_interpreted_here(need_triton):
    """Without CUDA the kernel tests must run Triton's interpreter on the real @triton.jit code."""
    if torch.cuda.is_available():
        pytest.skip("compiled on the GPU here; nothing interpreted")
    from triton.runtime.interpreter import InterpretedFunction

    from kvtune.kernels.decode_attention import triton as da
    from kvtune.kernels.quant import triton as qt

    for fn in (da.decode_split_kernel, da.decode_int_split_kernel, da.merge_kernel, da.probs_kernel,
               qt.quantize_int_token_kernel, qt.quantize_fp8_kernel, qt.dequantize_int_kernel):
        assert isinstance(fn, InterpretedFunction), fn
