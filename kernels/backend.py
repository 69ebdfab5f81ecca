"""Which implementation the kernels run: the PyTorch reference or Triton.

The choice is made once per process and held as a :class:`Backend` member; ops compare enum members, never
strings. ``auto`` picks Triton when CUDA is available and ``triton`` imports, the PyTorch reference otherwise.
The environment variable ``KVTUNE_KERNEL_BACKEND`` (``auto``, ``torch`` or ``triton``) forces a choice.

Forcing ``triton`` on a machine without CUDA is allowed only under ``TRITON_INTERPRET=1`` (Triton's
interpreter runs the kernels on CPU tensors, slowly); that is how the kernel tests run on a laptop.
Every public op also takes ``backend=`` so a caller (or a test) can pick one explicitly per call.
"""

from __future__ import annotations

import enum
import functools
import os

ENV_VAR = "KVTUNE_KERNEL_BACKEND"


class Backend(str, enum.Enum):
    TORCH = "torch"
    TRITON = "triton"


def triton_available() -> bool:
    """True when ``import triton`` works (it may still lack a GPU to run on)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


def parse_backend(name: str | Backend, where: str = "backend") -> Backend:
    """Turn ``auto|torch|triton`` (or a Backend) into a usable Backend; ValueError says what and where."""
    if isinstance(name, Backend):
        requested = name.value
    else:
        requested = str(name).strip().lower()
    if requested == "auto":
        import torch

        return Backend.TRITON if (torch.cuda.is_available() and triton_available()) else Backend.TORCH
    if requested == "torch":
        return Backend.TORCH
    if requested == "triton":
        if not triton_available():
            raise ValueError(f"{where}: backend 'triton' requested but `import triton` fails")
        import torch

        if not torch.cuda.is_available() and not interpret_mode():
            raise ValueError(
                f"{where}: backend 'triton' requested but CUDA is not available "
                "(set TRITON_INTERPRET=1 to run the Triton kernels in the CPU interpreter)"
            )
        return Backend.TRITON
    raise ValueError(f"{where}: unknown kernel backend {name!r}; expected one of auto, torch, triton")


@functools.lru_cache(maxsize=1)
def default_backend() -> Backend:
    """The process-wide backend, resolved once from ``KVTUNE_KERNEL_BACKEND`` (default ``auto``)."""
    return parse_backend(os.environ.get(ENV_VAR, "auto"), where=f"environment variable {ENV_VAR}")


def resolve(backend: str | Backend | None) -> Backend:
    """The backend an op call runs on: the explicit argument if given, else :func:`default_backend`."""
    if backend is None:
        return default_backend()
    return parse_backend(backend)
