"""Trainer integrations: any ``transformers.Trainer`` (:mod:`.hf`), TRL 1.x (:mod:`.trl`), reference resets
for plain loops (:mod:`.reference_reset`).

The submodules import their frameworks (transformers, TRL) on import; this package imports none of them.
"""

from __future__ import annotations

__all__ = ["hf", "trl", "reference_reset"]
