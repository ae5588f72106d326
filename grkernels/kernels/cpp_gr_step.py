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
    a 0-d float64 sum (of squares: float32 would overflow beyond 1.8e19 per element) and mutates its ``(a!)``
    lists in place."""

    def total(*args) -> torch.Tensor:
        return torch.empty((), dtype=torch.float64)

    for op in ("gr_sumsq", "gr_perturb", "gr_combine"):
        torch.library.register_fake(f"grkernels_cpp::{op}", total)


if cpp_loaded():
    _register_fakes()


def sumsq(xs: Sequence[torch.Tensor], base: Sequence[torch.Tensor], mode: int, wide: bool = False) -> torch.Tensor:
    """Σ over the tensors (mode 0: x², 1: (x + b)², 2: x² + 2·x·b) as a 0-d float64 tensor, accumulated in double
    (exact range for 32-bit and narrower values; float64 values are squared unscaled). ``wide``: the working
    precision of the values is double (a step with float64 tensors), else float."""
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    return ops().gr_sumsq(list(xs), list(base), mode, wide)
