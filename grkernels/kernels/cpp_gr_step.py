"""Python face of the C++ GR-step ops (``csrc/gr_step.cpp``, ``torch.ops.grkernels_cpp.gr_*``): their fake
(meta) kernels and thin wrappers. The backend that drives them is ``grkernels.backends.cpp.CppGRStep``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grkernels.kernels import cpp_loaded

CPP_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # what the kernels take
NARROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # Σ x² in float64 cannot overflow for these


def ops():
    """``torch.ops.grkernels_cpp`` (registered when ``grkernels._C`` is loaded: see ``cpp_loaded``)."""
    return torch.ops.grkernels_cpp


def _register_fakes() -> None:
    """Fake (meta) kernels of the C++ GR-step ops, so that torch.compile / opcheck can trace them: each returns
    a 0-d sum in float32 (float64 when ``wide``) and mutates its ``(a!)`` lists in place."""

    def total(wide: bool) -> torch.Tensor:
        return torch.empty((), dtype=torch.float64 if wide else torch.float32)

    torch.library.register_fake("grkernels_cpp::gr_sumsq", lambda xs, base, kind, wide: total(wide))
    torch.library.register_fake("grkernels_cpp::gr_perturb", lambda *args: total(args[-1]))
    torch.library.register_fake("grkernels_cpp::gr_combine", lambda *args: total(args[-1]))


if cpp_loaded():
    _register_fakes()


def sumsq(xs: Sequence[torch.Tensor], base: Sequence[torch.Tensor], mode: int, dtype: torch.dtype) -> torch.Tensor:
    """Σ over the tensors (mode 0: x², 1: (x + b)², 2: x² + 2·x·b) as a 0-d tensor of ``dtype``."""
    if not xs:
        return torch.zeros((), dtype=dtype)
    return ops().gr_sumsq(list(xs), list(base), mode, dtype == torch.float64)
