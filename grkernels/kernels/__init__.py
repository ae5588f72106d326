"""Triton kernels of grkernels, and the one place that says whether they can run.

A kernel file holds the Triton kernel, its launcher and (where it is differentiable) its
``autograd.Function``; thin public wrappers live in ``grkernels/ops`` and ``grkernels/optim.py``.
Triton runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (that is how CI checks every kernel without a GPU).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    """True when Triton's interpreter is on (kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if not triton_installed():
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and interpreter_on()


def check_triton_device(*tensors: torch.Tensor, what: str = "grkernels") -> None:
    """Raise a clear error when Triton cannot run on these tensors' device."""
    for t in tensors:
        if not triton_installed():
            raise RuntimeError(f"{what}: backend='triton' needs the triton package (pip install triton)")
        if not triton_usable(t.device):
            raise RuntimeError(
                f"{what}: backend='triton' got a tensor on {t.device}; Triton runs on CUDA tensors, "
                "or on CPU tensors only under TRITON_INTERPRET=1 (slow, for tests). "
                "Use backend='torch' or backend='auto' for CPU tensors."
            )


def resolve_backend(backend: str, device: torch.device | str, *, what: str = "grkernels") -> str:
    """The one dispatch rule: 'auto' picks Triton for CUDA tensors when triton is installed, else torch."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"{what}: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_installed() else "torch"
    return backend
