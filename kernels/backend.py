"""Which implementation a kernel call runs: the PyTorch reference or Triton, decided by the tensors' device.

Dispatch is per call, by the device of the call's tensors, whatever the process default:

* **CUDA tensors** run the Triton kernels when ``triton`` imports, the PyTorch reference otherwise;
* **CPU tensors** (or any other device) run the PyTorch reference.

A *request* narrows that: ``auto`` (the policy above), ``torch`` (the reference on any device) or ``triton``
(the Triton kernels, which need CUDA tensors). The request comes from the op's ``backend=`` argument, else
from the environment variable ``KVTUNE_KERNEL_BACKEND`` (read once per process, default ``auto``). A request
that cannot serve the tensors' device is a ``ValueError`` naming both, never a silent fallback: ``triton``
with CPU tensors is refused unless ``TRITON_INTERPRET=1`` is set explicitly (Triton's interpreter runs the
kernels on CPU tensors, slowly; that is how the kernel tests run on a laptop). ``auto`` never sends CPU tensors
to Triton, not even under the interpreter, so a process that holds both GPU and CPU tensors (a model on the
GPU, a cost measured on the CPU) runs each on the path that fits it.

The outcome is a :class:`Backend` member; ops compare enum members, never strings.
"""

from __future__ import annotations

import enum
import functools
import os

import torch

ENV_VAR = "KVTUNE_KERNEL_BACKEND"
REQUESTS = ("auto", "torch", "triton")


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


def parse_request(name: str | Backend | None, where: str = "backend") -> Backend | None:
    """``auto|torch|triton`` (or a Backend) -> the requested Backend, ``None`` for ``auto``.

    Only the name is checked here; whether the request can serve a device is :func:`for_device`'s question.
    """
    if name is None:
        return None
    if isinstance(name, Backend):
        return name
    requested = str(name).strip().lower()
    if requested == "auto":
        return None
    try:
        return Backend(requested)
    except ValueError:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; expected one of {', '.join(REQUESTS)}") from None


@functools.lru_cache(maxsize=1)
def default_request() -> Backend | None:
    """The process-wide request, read once from ``KVTUNE_KERNEL_BACKEND`` (``None`` = auto, the default)."""
    return parse_request(os.environ.get(ENV_VAR, "auto"), where=f"environment variable {ENV_VAR}")


def for_device(request: Backend | None, device: torch.device | str, where: str = "backend") -> Backend:
    """The backend that runs a call on ``device`` under ``request`` (see the module docstring)."""
    dev = torch.device(device)
    if request is None:
        return Backend.TRITON if dev.type == "cuda" and triton_available() else Backend.TORCH
    if request is Backend.TORCH:
        return Backend.TORCH
    if not triton_available():
        raise ValueError(f"{where}: kernel backend 'triton' requested but `import triton` fails")
    if dev.type == "cuda":
        return Backend.TRITON
    if dev.type == "cpu" and interpret_mode():
        return Backend.TRITON
    hint = " (set TRITON_INTERPRET=1 to interpret the kernels on the CPU)" if dev.type == "cpu" else ""
    raise ValueError(f"{where}: kernel backend 'triton' cannot run on {dev.type} tensors: the Triton kernels "
                     f"need CUDA tensors{hint}; use backend 'torch' or 'auto'")


def resolve(backend: str | Backend | None, device: torch.device | str | None = None) -> Backend:
    """The backend an op call runs on: ``backend`` if given, else the process request, served on ``device``.

    Every op passes its tensors' device. ``device=None`` stands for the device this process computes on by
    default (CUDA when available, else the CPU); it is for labels and reports, never for a kernel call.
    """
    if backend is None:
        request, where = default_request(), f"environment variable {ENV_VAR}"
    else:
        request, where = parse_request(backend), "backend"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return for_device(request, device, where)
