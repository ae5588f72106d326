"""Warnings that name the knob, from the values of the GR step's one host read (``GREngine.finish``).

- GR doing almost nothing: at a fixed strength, gr_rel = ‖GR − g1‖/‖g1‖ averaged below 1% over a window of full
  GR steps (the step pays for an extra pass and changes the gradient by less than 1%): raise strength or use the
  adaptive strength.
- A perturbation erased or noisy on bf16/fp16 weights: perturb_ratio = ‖θ'−θ‖/‖ε·v‖ outside [0.5, 2] (median over
  the window): the finite difference is then dominated by rounding (BENCHMARKS.md, finite-difference fidelity):
  use eps_mode="radius" with eps=0.02.

Each fires once per optimizer, and only on values already read (no extra host synchronisation).
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["Watch"]


class Watch:
    """Warnings that name the knob, each once: GR doing almost nothing (gr_rel < 1% over a window of full GR steps
    at a fixed strength), and a perturbation erased or noisy on bf16/fp16 weights (perturb_ratio outside [0.5, 2]
    over the window)."""

    WINDOW = 20
    LOW_REL = 0.01
    BAND = (0.5, 2.0)

    def __init__(self) -> None:
        self.rel: list[float] = []
        self.ratio: list[float] = []
        self.warned: set[str] = set()

    def observe(self, host: dict[str, Any], *, auto: bool, eps_mode: str) -> None:
        self.rel = (self.rel + [host["gr_rel"]])[-self.WINDOW:]
        if host["low_precision"]:
            self.ratio = (self.ratio + [host["perturb_ratio"]])[-self.WINDOW:]
        if not auto and len(self.rel) == self.WINDOW and "weak" not in self.warned:
            mean = sum(self.rel) / len(self.rel)
            if mean < self.LOW_REL:
                self.warned.add("weak")
                warnings.warn(
                    f"GradReg: GR is doing almost nothing: gr_rel = ‖GR − g1‖/‖g1‖ averaged {mean:.2g} over the last "
                    f"{self.WINDOW} GR steps (< {self.LOW_REL:.0%}), so each step pays for the extra pass and "
                    "changes the gradient by less than 1%. Raise strength, or use strength='auto' with target_rel "
                    "(docs/from_kl_to_gr.md)", UserWarning, stacklevel=5)
        if len(self.ratio) >= self.WINDOW // 2 and "ratio" not in self.warned:
            median = sorted(self.ratio)[len(self.ratio) // 2]
            lo, hi = self.BAND
            if not lo <= median <= hi:
                self.warned.add("ratio")
                what = "erased (bf16/fp16 rounding swallows ε·v)" if median < lo else "noisy (rounding dominates ε·v)"
                fix = ("use eps_mode='radius' with eps=0.02 (forward) or 0.01 (central)" if eps_mode == "absolute"
                       else "raise eps (radius mode: 0.02 forward, 0.01 central)")
                warnings.warn(
                    f"GradReg: the perturbation of the low-precision weights is {what}: perturb_ratio = ‖θ'−θ‖/‖ε·v‖ "
                    f"has median {median:.2g} over the last {len(self.ratio)} GR steps, outside [{lo}, {hi}]; "
                    f"{fix} (BENCHMARKS.md, finite-difference fidelity)", UserWarning, stacklevel=5)
