"""Host integrations: any ``transformers.Trainer`` (:mod:`.hf`), TRL 1.x (:mod:`.trl`), Lightning
(:mod:`.lightning`, ``GradRegCallback``), Accelerate loops (:mod:`.accelerate`, ``GradRegWindow``), reference resets
for plain loops (:mod:`.reference_reset`), verl's FSDP engines (:mod:`.verl`; :mod:`.verl_cpu` runs them on CPU);
:mod:`.window` is the accumulation-window replay they share.

The submodules import their frameworks (transformers, TRL, lightning, accelerate, verl) on import; this package
imports none of them.
"""

from __future__ import annotations

__all__ = ["accelerate", "hf", "lightning", "reference_reset", "trl", "verl", "verl_cpu", "window"]
