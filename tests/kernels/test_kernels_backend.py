"""kvtune.kernels.backend: dispatch by the tensors' device, and proof that the Triton tests really run Triton.

The dispatch tests pretend CUDA is available (``torch.cuda.is_available`` patched to True) on this CPU-only
machine: that is the situation of a GPU host holding CPU tensors, where the old resolve-once backend sent CPU
tensors to Triton.
"""

import pytest
import torch

from kvtune.kernels import backend as kb
from kvtune.kernels.compaction import gather_paged, gather_tokens, to_paged
from kvtune.kernels.decode_attention import decode_attention, decode_attention_fp8, decode_attention_int
from kvtune.kernels.decode_attention import reference as da_ref
from kvtune.kernels.quant import dequantize_fp8, dequantize_int, quantize_fp8, quantize_int


@pytest.fixture
def fresh_request(monkeypatch):
    """Forget the cached process request before and after the test (it reads the environment once)."""
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    kb.default_request.cache_clear()
    yield
    kb.default_request.cache_clear()


@pytest.fixture
def triton_launches(monkeypatch):
    """Every Triton kernel launch (compiled or interpreted) is recorded and refused."""
    if not kb.triton_available():
        pytest.skip("triton is not importable here: nothing could launch it anyway")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []

    def refuse(self, grid):
        launched.append(getattr(self, "__name__", repr(self)))
        raise AssertionError(f"Triton kernel {launched[-1]} launched")

    monkeypatch.setattr(JITFunction, "__getitem__", refuse)
    monkeypatch.setattr(InterpretedFunction, "__getitem__", refuse)
    return launched


def test_parse_request_names():
    assert kb.parse_request("torch") is kb.Backend.TORCH
    assert kb.parse_request(" TORCH ") is kb.Backend.TORCH
    assert kb.parse_request("triton") is kb.Backend.TRITON
    assert kb.parse_request(kb.Backend.TORCH) is kb.Backend.TORCH
    assert kb.parse_request("auto") is None
    assert kb.parse_request(None) is None


def test_parse_request_rejects_unknown_and_says_where():
    with pytest.raises(ValueError, match="environment variable KVTUNE_KERNEL_BACKEND: unknown kernel backend 'cuda'"):
        kb.parse_request("cuda", where="environment variable KVTUNE_KERNEL_BACKEND")


def test_auto_follows_the_device(monkeypatch):
    monkeypatch.setattr(kb, "triton_available", lambda: True)
    assert kb.for_device(None, "cuda") is kb.Backend.TRITON
    assert kb.for_device(None, "cuda:1") is kb.Backend.TRITON
    assert kb.for_device(None, "cpu") is kb.Backend.TORCH
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kb.for_device(None, "cpu") is kb.Backend.TORCH  # auto never interprets
    monkeypatch.setattr(kb, "triton_available", lambda: False)
    assert kb.for_device(None, "cuda") is kb.Backend.TORCH


def test_explicit_request_that_cannot_serve_the_device_is_an_error(monkeypatch):
    monkeypatch.setattr(kb, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: kernel backend 'triton' cannot run on cpu tensors"):
        kb.for_device(kb.Backend.TRITON, "cpu")
    with pytest.raises(ValueError, match="cannot run on meta tensors"):
        kb.for_device(kb.Backend.TRITON, "meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kb.for_device(kb.Backend.TRITON, "cpu") is kb.Backend.TRITON  # explicit interpreter, for tests
    assert kb.for_device(kb.Backend.TORCH, "cuda") is kb.Backend.TORCH  # the reference runs anywhere
    monkeypatch.setattr(kb, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="'triton' requested but `import triton` fails"):
        kb.for_device(kb.Backend.TRITON, "cuda")


def test_env_request_is_read_once_and_named_in_errors(monkeypatch, fresh_request):
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    assert kb.default_request() is kb.Backend.TORCH
    monkeypatch.setenv(kb.ENV_VAR, "bogus")
    assert kb.default_request() is kb.Backend.TORCH  # read once, cached
    kb.default_request.cache_clear()
    monkeypatch.setenv(kb.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kb, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="environment variable KVTUNE_KERNEL_BACKEND: kernel backend 'triton' cannot"):
        kb.resolve(None, "cpu")
    assert kb.resolve("auto", "cpu") is kb.Backend.TORCH  # the op's argument wins over the environment


def test_ops_refuse_forced_triton_on_cpu_tensors(monkeypatch, fresh_request):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kb, "triton_available", lambda: True)
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        decode_attention(q, k, k, backend="triton")
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        quantize_int(k.repeat(1, 1, 8, 1)[:, :, :32], 4, 32, "token", backend="triton")


def test_cpu_tensors_never_reach_triton_when_cuda_is_available(monkeypatch, fresh_request, triton_launches):
    """A GPU host (CUDA faked here) with CPU tensors: every op runs the reference and matches it exactly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, auto keeps CPU tensors off Triton
    assert kb.resolve(None) is kb.Backend.TRITON  # the process default (labels) says GPU ...
    assert kb.resolve(None, "cpu") is kb.Backend.TORCH  # ... but CPU tensors get the reference
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 2, 8, 2, 97, 32
    q = torch.randn(b, hq, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    lengths = torch.tensor([97, 54])
    out, probs = decode_attention(q, k, v, lengths=lengths, return_probs=True)
    ref, ref_p = da_ref.decode_attention_ref(q, k, v, d**-0.5, lengths.to(torch.int32), True)
    assert torch.equal(out, ref) and torch.equal(probs, ref_p)
    kq = quantize_int(k[:, :, :96].contiguous(), 4, 32, "token")
    vq = quantize_int(v[:, :, :96].contiguous(), 2, 32, "channel")
    assert torch.equal(dequantize_int(kq), dequantize_int(kq, backend="torch"))
    out_i, _ = decode_attention_int(q, kq, vq, k[:, :, 96:], v[:, :, 96:])
    assert torch.equal(out_i, decode_attention_int(q, kq, vq, k[:, :, 96:], v[:, :, 96:], backend="torch")[0])
    kf, vf = quantize_fp8(k), quantize_fp8(v, scale_axis="token")
    assert torch.equal(dequantize_fp8(kf), dequantize_fp8(kf, backend="torch"))
    assert torch.equal(decode_attention_fp8(q, kf, vf)[0], decode_attention_fp8(q, kf, vf, backend="torch")[0])
    idx = torch.randint(0, t, (b, hkv, 11), generator=g)
    assert torch.equal(gather_tokens(k, idx), k.gather(2, idx[..., None].expand(b, hkv, 11, d)))
    pool, table = to_paged(k, 16)
    assert torch.equal(gather_paged(pool, table, t), k)
    assert triton_launches == []


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


def test_explicit_triton_on_cpu_runs_the_interpreter(need_triton, device):
    """With TRITON_INTERPRET=1 (set by conftest without CUDA) an explicit request does reach the kernels."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 16, generator=g).to(device)
    k, v = torch.randn(1, 2, 17, 16, generator=g).to(device), torch.randn(1, 2, 17, 16, generator=g).to(device)
    out, _ = decode_attention(q, k, v, backend="triton")
    ref, _ = decode_attention(q, k, v, backend="torch")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
