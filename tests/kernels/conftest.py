"""Kernel tests run the Triton kernels too: on a machine without CUDA, in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created; the kernels' ``triton.py``
modules are imported lazily (on the first Triton call), so setting it here, at collection time, is enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


TRITON_OK = _triton_usable()


@pytest.fixture
def device() -> str:
    """Tensors live on the GPU when there is one (Triton compiled), else on the CPU (Triton interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    if request.param == "triton" and not TRITON_OK:
        pytest.skip("triton is not importable here (or neither CUDA nor TRITON_INTERPRET=1)")
    return request.param


@pytest.fixture
def need_triton() -> None:
    """Skip (saying why) when the Triton path cannot run here."""
    if not TRITON_OK:
        pytest.skip("triton is not importable here (or neither CUDA nor TRITON_INTERPRET=1)")
