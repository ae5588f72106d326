"""Warnings that name the knob, from the values of the GR step's one host read (``GREngine.finish``).

- GR doing almost nothing: at a fixed strength, gr_rel = ‖GR − g1‖/‖g1‖ averaged below 1% over a window of 20 full
  GR steps (each step pays for an extra pass and changes the gradient by less than 1%): raise strength, or use the
  adaptive strength. Never with ``strength="auto"`` (its target is the user's choice).
- A perturbation erased or noisy on bf16/fp16 weights: perturb_ratio = ‖θ'−θ‖/‖ε·v‖ (the realised over the intended
  perturbation, dimensionless) outside the estimator's band, as the median of the last ≤ 10 full GR steps, checked
  from the first one. The bands are where the finite-difference estimate of H·v keeps cos ≳ 0.9 to the float64
  double-backprop value in BENCHMARKS.md's fidelity sweep (0.53M-parameter Llama, bf16 weights):

      forward  [0.9, 2]   nearest rounding: ratio 0.95 → cos 0.96, 0.64 → 0.54;  stochastic: 1.77 → 0.97, 3.0 → 0.84
      central  [0.8, 3]   nearest: 0.95 → 0.99, 0.64 → 0.76;  stochastic: 3.0 → 0.94, 5.2 → 0.70

  Below the band round-to-nearest erased part of ε·v; above it stochastic rounding's noise dominates ε·v.

bf16/fp16 weights with absolute ε (the issue's question: the safe setting, or a pointer to it?): a pointer, at the
first full GR step whose perturb_ratio is outside the band, naming ``eps_mode="radius", eps=0.02`` (central: 0.01).
Not a silent switch, because the fidelity table shows absolute ε is right on bf16 weights when ε·‖clip(g1)‖ is large
enough (the loss ×10 row: cos 0.97 forward, 0.99 central, perturb_ratio in band) and wrong when it is small (×1 and
×0.1: cos 0.47 and 0.05, perturb_ratio 5.2 and 17): the same setting is safe or not depending on the gradient's
scale, which only the first step measures, and perturb_ratio tells the two apart. Switching ε's meaning under an
explicit setting would also silently change a run the user configured; the fix the pointer names changes nothing
else (GR − g1 ≈ γ·H·clip(g1) in both modes, so γ keeps its meaning).

Each warning fires once per optimizer, and only on values already read (no extra host synchronisation). Nothing is
observed when no host read happens (fixed strength with ``skip_nonfinite=False``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

__all__ = ["Watch"]

# Frames inside these directories are GradReg's machinery (the engine, the optimizer face, torch's step wrappers): a
# warning is attributed to the first frame outside them, the user's call of step(), on every path and host.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_INTERNAL = (_PACKAGE + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
_USER_CODE = (os.path.join(_PACKAGE, "demo") + os.sep,)  # the demo is a user of GradReg


def _warn(message: str) -> None:
    """``warnings.warn(message, UserWarning)`` attributed to the code that called GradReg."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _internal(path: str) -> bool:
    return path.startswith(_INTERNAL) and not path.startswith(_USER_CODE)


#: perturb_ratio bands per estimator (see the module docstring); the exact estimator has no perturbation.
BANDS: dict[str, tuple[float, float]] = {"forward": (0.9, 2.0), "central": (0.8, 3.0)}
#: what to set instead, per estimator (BENCHMARKS.md: cos ≥ 0.98 at every gradient scale measured).
RADIUS_EPS = {"forward": 0.02, "central": 0.01}


class Watch:
    """Warnings that name the knob, each once: GR doing almost nothing (gr_rel < 1% averaged over 20 full GR steps
    at a fixed strength), and a perturbation erased or noisy on bf16/fp16 weights (perturb_ratio outside the
    estimator's band, median of the last ≤ 10 full GR steps)."""

    WINDOW = 20  # full GR steps averaged for the "doing almost nothing" warning
    RATIO_WINDOW = 10  # full GR steps whose median perturb_ratio is checked
    LOW_REL = 0.01

    def __init__(self) -> None:
        self.rel: list[float] = []
        self.ratio: list[float] = []
        self.warned: set[str] = set()

    def observe(self, host: dict[str, Any], *, auto: bool, eps_mode: str, estimator: str = "forward") -> None:
        """One full GR step's host values (``gr_rel``, ``perturb_ratio``, ``low_precision``: bf16/fp16 weights)."""
        self.rel = (self.rel + [host["gr_rel"]])[-self.WINDOW:]
        if not auto and len(self.rel) == self.WINDOW and "weak" not in self.warned:
            mean = sum(self.rel) / len(self.rel)
            if mean < self.LOW_REL:
                self.warned.add("weak")
                _warn(
                    f"GradReg: GR is doing almost nothing: gr_rel = ‖GR − g1‖/‖g1‖ averaged {mean:.2g} over the last "
                    f"{self.WINDOW} GR steps (< {self.LOW_REL:.0%}), so each step pays for the extra pass and "
                    "changes the gradient by less than 1%. Raise strength, or use strength='auto' with target_rel "
                    "(docs/from_kl_to_gr.md)")
        band = BANDS.get(estimator)
        if not host["low_precision"] or band is None or "ratio" in self.warned:
            return
        self.ratio = (self.ratio + [host["perturb_ratio"]])[-self.RATIO_WINDOW:]
        median = sorted(self.ratio)[len(self.ratio) // 2]
        lo, hi = band
        if median != median or lo <= median <= hi:  # NaN: no perturbation was made to judge
            return
        self.warned.add("ratio")
        what = "erased (bf16/fp16 rounding swallows ε·v)" if median < lo else "noisy (rounding dominates ε·v)"
        eps = RADIUS_EPS[estimator]
        fix = (f"use eps_mode='radius' with eps={eps:g} (θ' − θ of norm ε whatever the gradient's scale)"
               if eps_mode == "absolute" else
               f"raise eps ({eps:g} suits the {estimator} estimator on small models; the same ε spread over many "
               "more parameters is a smaller step per weight, so a larger model needs a larger ε)")
        _warn(
            f"GradReg: the perturbation of the low-precision weights is {what}: perturb_ratio = ‖θ'−θ‖/‖ε·v‖ has "
            f"median {median:.3g} over the last {len(self.ratio)} GR steps, outside [{lo:g}, {hi:g}] where the "
            f"{estimator} estimate of H·v keeps cos ≳ 0.9 to the exact one; {fix} (BENCHMARKS.md, finite-difference "
            "fidelity)")
