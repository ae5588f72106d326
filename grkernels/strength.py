"""The adaptive strength: γ adjusted each full GR step so that gr_rel = ‖GR − g1‖/‖g1‖ tracks a target ρ*.

The rule, proportional in log γ with a clipped step (as the adaptive KL controllers of Ziegler et al. 2019 move β)::

    after a full GR step that measured ρ_t at γ_t:
        log γ_{t+1} = log γ_t + clip(k·(log ρ* − log ρ_t), −log 2, +log 2),    γ ∈ [γ_min, γ_max]

Why it is stable: the finite-difference correction is linear in γ — GR − g1 = (γ/ε)(clip(g2) − clip(g1)), and g2
does not depend on γ — so ρ_t = γ_t·r_t with r_t = ‖(clip(g2) − clip(g1))/ε‖/‖g1‖ the step's own relative
curvature. Substituting, the error e_t = log γ_t − log(ρ*/r_t) obeys e_{t+1} = (1 − k)·e_t + (log r_t − log
r_{t+1}): for 0 < k < 2 it contracts by |1 − k| per step towards γ* = ρ*/r, and the gain k = 0.5 averages the
step-to-step noise of r over about two steps. What no rule acting on past steps removes is that noise itself: γ_t
is set before r_t is measured, so with i.i.d. noise of σ in log r the measured log gr_rel scatters by σ·√(2/(2 − k))
around log ρ* (k = 0.5: 1.15·σ; k → 0 would reach σ only, at the price of lagging a drifting r by drift/k). In
the demo's worlds that prediction matches the measured scatter (grkernels/demo/README.md, "Adaptive strength").
The clip bounds any one change to ×2 (a gradient spike, an outlier batch), and the bounds keep γ finite when
gr_rel is zero for many steps (no update at all then: a zero, NaN or infinite ρ carries no information about r).
Units: γ in 1/loss units, ρ dimensionless.

One controller for the whole model, not one per param group: gr_rel is one global measurement (the norm of the whole
correction against the whole g1), and groups with their own ``gr_strength`` keep their ratio to the global γ (they
are scaled by γ_t/γ_0). The controller reads ρ_t from the step's one documented host read (``GREngine.finish``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["StrengthController"]

DEFAULT_INIT = 1e-2


class StrengthController:
    """γ for the coming full GR step, moved after each one towards ``target`` (ρ*).

    Args:
        target: ρ*, the gr_rel to hold (dimensionless, > 0).
        init: γ_0 (1/loss units); None: 1e-2.
        gain: k in (0, 2); 0.5 by default.
        max_step: the largest change of log γ per step (log 2: at most ×2 or ÷2).
        bounds: (γ_min, γ_max).
    """

    def __init__(self, target: float, init: float | None = None, *, gain: float = 0.5,
                 max_step: float = math.log(2.0), bounds: tuple[float, float] = (1e-8, 1e8)) -> None:
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"StrengthController: target must be a finite number > 0, got {target!r}")
        if not 0.0 < gain < 2.0:
            raise ValueError(f"StrengthController: gain must be in (0, 2) for the update to contract, got {gain!r}")
        if not (math.isfinite(max_step) and max_step > 0):
            raise ValueError(f"StrengthController: max_step must be a finite number > 0, got {max_step!r}")
        self.target = float(target)
        self.initial = float(DEFAULT_INIT if init is None else init)
        self.gain, self.max_step = float(gain), float(max_step)
        self.lo, self.hi = (float(b) for b in bounds)
        if not 0 < self.lo <= self.initial <= self.hi:
            raise ValueError(f"StrengthController: the initial γ {self.initial} must lie in the bounds {bounds}")
        self.log_gamma = math.log(self.initial)
        self.updates = 0

    @property
    def gamma(self) -> float:
        # clamped again after exp: exp(log(γ_min)) can round to just below γ_min (1e-8 → 9.999999999999982e-09)
        return min(self.hi, max(self.lo, math.exp(self.log_gamma)))

    def update(self, rel: float) -> float:
        """Move γ after a full GR step that measured gr_rel = ``rel`` at the current γ; returns the new γ. A rel
        that is 0, negative, NaN or infinite (no gradient, a skipped step) leaves γ as it is."""
        if not (math.isfinite(rel) and rel > 0):
            return self.gamma
        step = self.gain * (math.log(self.target) - math.log(rel))
        step = max(-self.max_step, min(self.max_step, step))
        self.log_gamma = min(math.log(self.hi), max(math.log(self.lo), self.log_gamma + step))
        self.updates += 1
        return self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"log_gamma": self.log_gamma, "updates": self.updates, "target": self.target,
                "initial": self.initial}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume: γ, the update count and γ_0 (groups with ``gr_strength`` scale by γ/γ_0, so a resumed run keeps
        their γ whatever ``strength_init`` it was built with). The target stays the one this controller was built
        with: a resumed run may hold a new target."""
        self.log_gamma, self.updates = float(sd["log_gamma"]), int(sd["updates"])
        self.initial = float(sd.get("initial", self.initial))
