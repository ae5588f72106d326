"""Guards against hosts that would call ``GradReg.step`` in a way that silently breaks GR. Kept out of the engine:
they look at who is calling (a few frames up the stack, host objects only, no device read), which is a host concern.

- ``torch.amp.GradScaler`` (fp16 loss scaling): ``scaler.step(opt)`` unscales ``.grad`` before calling ``step``, in
  whatever phase the step is; g1 and g2 would then be scaled differently from the perturbation. Refused: train in
  bf16 (autocast needs no scaler) or fp32.
- Accelerate's ``AcceleratedOptimizer`` under ``gradient_accumulation_steps > 1`` with ``step(closure)``: Accelerate
  calls the optimizer on the window's last micro-batch only, so the closure would see that micro-batch alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["refuse_unsupported_callers"]

_DEPTH = 6


def refuse_unsupported_callers(*, with_closure: bool, abort: Callable[[], None]) -> None:
    """Raise (after ``abort()``: θ restored, ``.grad`` back to g1) when the caller of ``GradReg.step`` is a
    GradScaler, or Accelerate's optimizer accumulating micro-batches while a closure is passed."""
    frame = sys._getframe(2)
    for _ in range(_DEPTH):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        kind, module = type(owner).__name__, type(owner).__module__
        if kind == "GradScaler" and module.startswith("torch") and getattr(owner, "_enabled", True):
            abort()
            raise RuntimeError(
                "GradReg does not support torch.amp.GradScaler (fp16 loss scaling): the scaler unscales .grad in "
                "the middle of a GR step, so g1 and g2 would be scaled differently from the perturbation. Train in "
                "bf16 (autocast needs no scaler) or fp32. Parameters were left at θ, gradients at g1.")
        if with_closure and module.startswith("accelerate") and kind == "AcceleratedOptimizer":
            steps = getattr(getattr(owner, "gradient_state", None), "num_steps", 1)
            if steps > 1:
                abort()
                raise RuntimeError(
                    f"GradReg.step(closure) under Accelerate's gradient accumulation ({steps} micro-batches): "
                    "Accelerate calls the optimizer on the window's last micro-batch only, so the closure would see "
                    "that micro-batch alone. Use grkernels.integrations.accelerate.GradRegWindow (GR over the whole "
                    "window), or the two-phase API (perturb / combine) after the window's backward passes.")
            return
        frame = frame.f_back
