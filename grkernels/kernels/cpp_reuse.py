"""Python face of the C++ passes of the correction reuse (``csrc/reuse_passes.inc``, registered in
``csrc/gr_step.cpp`` as ``torch.ops.grkernels_cpp.gr_reuse_*``): their fake (meta) kernels and thin wrappers. The
module that drives them, and the torch specification they are tested against, is ``grkernels.reuse``.

Every op takes lists of CPU, contiguous fp32/bf16/fp16 tensors; ``c`` / ``old`` lists hold one tensor per gradient,
an empty tensor where no correction is stored for it (read as zeros). Sums are float64, each product widened to
double before it is added (exact range for these dtypes: elements of 3e19 or 1e-25 give their true sums), summed
in a fixed order whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grkernels.kernels import cpp_loaded

REUSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take (float64: the reference)


def _register_fakes() -> None:
    """Fake kernels, so that torch.compile / opcheck can trace the ops: the sums are float64 vectors (3 and 6), the
    update returns nothing (it mutates ``g``)."""

    def sums(g, c, undo):
        return torch.empty(3, dtype=torch.float64)

    def update(g, c, a, k):
        return None

    def store(gr, buf, old, finite):
        return torch.empty(6, dtype=torch.float64)

    torch.library.register_fake("grkernels_cpp::gr_reuse_sums", sums)
    torch.library.register_fake("grkernels_cpp::gr_reuse_update", update)
    torch.library.register_fake("grkernels_cpp::gr_reuse_store", store)


if cpp_loaded() and hasattr(torch.ops.grkernels_cpp, "gr_reuse_sums"):  # an extension built before the op: none
    _register_fakes()


def available() -> bool:
    """Whether the loaded extension has the reuse ops (an extension built before them has not)."""
    return cpp_loaded() and hasattr(torch.ops.grkernels_cpp, "gr_reuse_sums")


def takes(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernels take these tensors (CPU, contiguous, fp32/bf16/fp16)."""
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in REUSE_DTYPES for t in tensors)


def reuse_sums(g: Sequence[torch.Tensor], c: Sequence[torch.Tensor],
               undo: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """[Σ g², Σ c·g, Σ c²] over all tensors (float64, shape (3,)): one pass over g and c, which also copies g's bits
    into ``undo`` (one tensor per g, its dtype, contiguous) when given."""
    return torch.ops.grkernels_cpp.gr_reuse_sums(list(g), list(c), list(undo))


def reuse_update(g: Sequence[torch.Tensor], c: Sequence[torch.Tensor], a: torch.Tensor, k: torch.Tensor) -> None:
    """In place, one pass: g ← a·g + k·c per element in float32 (a, k: 0-d tensors, rounded to float32), rounded
    once onto g's dtype. ``a == 1 and k == 0``: nothing is written."""
    torch.ops.grkernels_cpp.gr_reuse_update(list(g), list(c), a, k)


def reuse_store(gr: Sequence[torch.Tensor], buf: Sequence[torch.Tensor], old: Sequence[torch.Tensor],
                finite: torch.Tensor) -> torch.Tensor:
    """One pass: n = gr − buf (buf holds g1) rounded onto buf's dtype; returns [Σ g1², Σ n·g1, Σ n², Σ o·n, Σ o·g1,
    Σ o²] (float64, shape (6,); o = ``old``, zeros where absent) and leaves buf ← n where ``finite`` (0-d bool),
    else o."""
    return torch.ops.grkernels_cpp.gr_reuse_store(list(gr), list(buf), list(old), finite)
