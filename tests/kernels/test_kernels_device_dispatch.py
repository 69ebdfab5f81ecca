"""End to end: on a GPU host (CUDA faked here) a CPU run of ``kvtune recommend`` must never hand CPU tensors to
Triton. Before dispatch went by the tensors' device, the process-wide backend resolved to Triton whenever CUDA
was available, and the codec stores and the cost measurement launched Triton kernels on CPU tensors."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.kernels import backend as kb
from kvtune.pipeline import load_pipeline

runner = CliRunner()


def _run(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, args)
    finally:
        os.chdir(old)


@pytest.mark.slow
def test_recommend_on_cpu_with_cuda_available_never_launches_triton(tmp_path, monkeypatch, smol):
    if not kb.triton_available():
        pytest.skip("triton is not importable here: nothing could launch it anyway")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []

    def refuse(self, grid):
        launched.append(getattr(self, "__name__", repr(self)))
        raise AssertionError(f"Triton kernel {launched[-1]} launched with CPU tensors")

    monkeypatch.setattr(JITFunction, "__getitem__", refuse)
    monkeypatch.setattr(InterpretedFunction, "__getitem__", refuse)
    decisions = []
    real_for_device = kb.for_device

    def spy(request, device, where="backend"):
        decisions.append((torch.device(device).type, real_for_device(request, device, where)))
        return decisions[-1][1]

    monkeypatch.setattr(kb, "for_device", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    kb.default_request.cache_clear()
    try:
        assert kb.resolve(None) is kb.Backend.TRITON  # the old, process-wide answer on such a host
        decisions.clear()
        result = _run(["recommend", "--scenario", "multi-turn", "--quick", "--trials", "2", "--context", "512",
                       "--device", "cpu"], tmp_path)
    finally:
        kb.default_request.cache_clear()
    assert result.exit_code == 0, result.output
    assert launched == []
    ops = [d for d in decisions if d[0] == "cpu"]
    assert len(ops) > 100 and all(b is kb.Backend.TORCH for _dev, b in ops)  # the kernels ran, on the reference
    p = load_pipeline(tmp_path / "kvtune-pipeline.yaml")
    assert p.measured is not None and p.measured.cost.backend == "torch-cpu"
    assert "on cpu (float32)" in result.output


def test_device_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _run(["recommend", "--quick", "--trials", "1", "--device", "cuda:0"], tmp_path)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("kvtune: error: --device cuda:0: CUDA is not available")
    result = _run(["evaluate", "nope.yaml", "--device", "tpu"], tmp_path)
    assert result.exit_code == 2


def test_bad_kernel_backend_environment_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "warp")
    kb.default_request.cache_clear()
    try:
        result = _run(["recommend", "--quick", "--trials", "1", "--device", "cpu"], tmp_path)
    finally:
        kb.default_request.cache_clear()
    assert result.exit_code == 2
    assert ("kvtune: error: --device cpu: environment variable KVTUNE_KERNEL_BACKEND: unknown kernel backend 'warp'"
            in result.output)
    assert not (tmp_path / "kvtune-pipeline.yaml").exists()
