"""The GR step in plain PyTorch: the specification every fast backend must match.

One GR step over the gradient-regularised ("GR") parameters P, with g1 = ∇L(θ) in ``.grad``:

    n1 = ‖g1‖₂ over P,             s1 = min(1, c1 / (n1 + 1e-6))    (1 when c1 is None)
    v  = s1·g1                     (the clipped direction; "the scale factor applies to the perturbation")
    θ' = round(θ + ε·v)            (stochastic rounding for bf16/fp16 parameters, see ``stochastic_round``)
    g2 = ∇L(θ')                    (the caller's second forward/backward, accumulated into ``.grad``)
    n2 = ‖g2‖₂ over P,             s2 = min(1, c2 / (n2 + 1e-6))
    θ  ← θ (bitwise, from a saved copy)
    grad ← g1 + (γ_p/ε)·(s2·g2 − s1·g1)        ≈ ∇L + γ·H·v

With ``eps_mode="radius"`` the step is ε_eff = ε/‖v‖ (‖v‖ = s1·n1), so that ‖θ' − θ‖ = ε whatever the
gradient's scale (the fidelity of the finite difference depends on ε·‖v‖, see BENCHMARKS.md); the combine
divides by ε_eff, so the estimate still targets γ·H·v. ‖v‖ is clamped below at the dtype's smallest normal
number (1.2e-38 in float32): below it the step is ε·‖v‖/tiny, never an overflow.

The central estimator evaluates g± = ∇L(θ ± ε·v) and uses grad ← g1 + (γ_p/2ε)·(s₊·g₊ − s₋·g₋); the exact
estimator gets H·v from double backprop and uses grad ← g1 + γ_p·H·v. Parameters outside P that have a gradient
("keep" parameters: excluded, or in a group with GR off) end the step with their g1, bitwise.

Numeric extremes: every norm (n1, n2, n±, and the metrics ‖θ' − θ‖, ‖grad − g1‖) is overflow- and
underflow-safe (``arith.norm_and_finite``: gradients of 3e19 or 1e-25 per element have their true norm), and
the step's finite flag is a property of the elements of g1, g± and g2, never of a norm. When g1 is not finite,
θ' = θ (no NaN reaches the weights) and the flag tells the caller to skip.

Abort: ``restore`` puts θ back bitwise and every saved gradient back to g1, at any point after point 0 began,
after the combine too (then θ is already back and only the gradients are rewritten).

Everything stays on the device: norms, clip factors and the finite flag are 0-d tensors, so no step of this file
reads a value back to the host. Arithmetic is in float32 (float64 for float64 tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from grkernels.backends.arith import (
    SumOfSquares,
    accum_dtype,
    clip_scale,
    combine_scales,
    global_norm,
    norm_and_finite,
    perturb_scale,
    require_second_gradients,
    reusable_buffers,
    v_norm,
)
from grkernels.backends.base import StepPlan
from grkernels.rounding import perturbed_value


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor: every element of every tensor is finite. Max-abs per tensor in its own dtype (exact: no
    false alarm from a norm overflowing), one foreach kernel on CUDA; ``tensors`` on one device."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(torch._foreach_norm(list(tensors), math.inf)).isfinite().all()


class TorchGRStep:
    """Reference backend. Saves g1 (grad dtype) and θ (param dtype) per GR parameter; g1 per keep parameter.

    Extra memory per GR parameter: grad bytes + param bytes (4 B for bf16, 8 B for fp32), plus one more grad
    copy for the central estimator; per keep parameter: grad bytes.
    """

    name = "torch"

    def __init__(self) -> None:
        self._theta: list[torch.Tensor] = []
        self._g1: list[torch.Tensor] = []
        self._g1_keep: list[torch.Tensor] = []
        self._g_plus: list[torch.Tensor] = []
        self._s1 = self._s_plus = self._finite = self._vnorm = None
        # what restore() may write back: "" (nothing of this step is saved), "theta" (θ and g1 saved, the
        # weights may be perturbed), "grads" (combined: θ is back, the saved g1 may replace the GR gradient)
        self._saved = ""
        self.metrics: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _copies(src: Sequence[torch.Tensor], bufs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``src`` into reusable buffers (reallocated only when shapes/dtypes change)."""
        for b, s in zip(reusable_buffers(src, bufs), src):
            b.copy_(s)
        return bufs

    def extra_bytes(self) -> int:
        """Bytes held by this backend's buffers right now."""
        bufs = self._theta + self._g1 + self._g1_keep + self._g_plus
        return sum(b.numel() * b.element_size() for b in bufs)

    # ------------------------------------------------------------------ the step
    def perturb(self, plan: StepPlan, point: int) -> None:
        """Move P to perturbation point ``point`` (0: θ + ε·v; 1, central only: θ − ε·v); zero P's grads.

        Point 0 also saves θ, g1 (and keep parameters' g1) and computes n1, s1. Point 1 saves g₊ and s₊.
        """
        grads = plan.grads()
        dtype = accum_dtype(grads)
        if point == 0:
            self._saved = ""  # the buffers hold another step's θ until the copies below are complete
            self._copies(plan.weights(), self._theta)
            self._copies(grads, self._g1)
            self._copies(plan.grads(plan.keep), self._g1_keep)
            self._saved = "theta"
            n1, self._finite = norm_and_finite(grads, dtype, plan.shards)
            self._s1 = clip_scale(n1, plan.g1_clip)
            self._vnorm = v_norm(plan, self._s1, n1)
            self.metrics = {"g1_norm": n1}
            sign = 1.0
        else:
            n_plus, finite_plus = norm_and_finite(grads, dtype, plan.shards)
            self._copies(grads, self._g_plus)
            self._s_plus = clip_scale(n_plus, plan.g2_clip)
            self._finite = self._finite & finite_plus
            sign = -1.0
        # The perturbation ε·s1·g1 (zero where g1 is not finite: a NaN must never reach the weights).
        step = torch.where(self._finite, perturb_scale(plan, self._s1, self._vnorm, sign), torch.zeros_like(self._s1))
        realised = SumOfSquares(dtype, plan.device)
        try:
            for i, (p, w, theta, g1) in enumerate(zip(plan.params, plan.weights(), self._theta, self._g1)):
                grid = plan.shards.compute_dtype(p)
                new = perturbed_value(theta, g1, step, plan.rounding, seed=plan.seed, index=i, point=point, grid=grid)
                new = torch.where(self._finite, new, theta)
                w.copy_(new)
                if point == 0:  # against the weight the model computed g1 with
                    base = theta if grid is None else theta.to(grid)
                    realised.add(new.to(dtype) - base.to(dtype))
                grads[i].zero_()
        except BaseException:
            self.restore(plan)  # θ and g1 are saved in full before anything moves: put them back, then raise
            raise
        if point == 0:
            intended = perturb_scale(plan, self._s1, self._vnorm, 1.0) * self.metrics["g1_norm"]
            self.metrics["perturb_ratio"] = realised.norm(plan.shards) / intended.clamp_min(torch.finfo(dtype).tiny)

    def restore(self, plan: StepPlan) -> None:
        """Abort: θ back bitwise, every saved gradient (GR and keep parameters) back to g1; after the combine only
        the gradients (θ is back). Idempotent; a no-op before θ was saved."""
        if self._saved == "theta":
            for w, theta in zip(plan.weights(), self._theta):
                w.copy_(theta)
        if self._saved:
            for p, g1 in zip(plan.params, self._g1):
                plan.set_grad(p, g1)
            self._restore_keep(plan)
        self._saved = ""

    def _restore_keep(self, plan: StepPlan) -> None:
        for p, g1 in zip(plan.keep, self._g1_keep):
            plan.set_grad(p, g1)

    def restore_and_combine(self, plan: StepPlan) -> None:
        """θ back bitwise; ``.grad`` ← the GR gradient (forward or central estimator); keep params ← g1."""
        require_second_gradients(plan, self.restore)
        grads = plan.grads()
        dtype = accum_dtype(grads)
        n2, finite2 = norm_and_finite(grads, dtype, plan.shards)
        s2 = clip_scale(n2, plan.g2_clip)
        self._finite = self._finite & finite2
        if plan.estimator == "central":
            a, sa, b, sb, div = self._g_plus, self._s_plus, grads, s2, 2.0 * plan.eps
        else:
            a, sa, b, sb, div = grads, s2, self._g1, self._s1, plan.eps
        sa, sb = combine_scales(sa, sb, self._vnorm)
        diff = SumOfSquares(dtype, plan.device)
        for g, w, theta, g1, ga, gb, gamma in zip(grads, plan.weights(), self._theta, self._g1, a, b, plan.coefs):
            w.copy_(theta)
            correction = (gamma / div) * (sa * ga.to(dtype) - sb * gb.to(dtype))
            diff.add(correction)
            g.copy_(g1.to(dtype) + correction)
        self._restore_keep(plan)
        self._saved = "grads"
        self.metrics["g2_norm"] = n2
        self.metrics["gr_rel"] = diff.norm(plan.shards) / self.metrics["g1_norm"].clamp_min(torch.finfo(dtype).tiny)
        self.metrics["finite"] = self._finite

    def combine_hvp(self, plan: StepPlan, hvp: Sequence[torch.Tensor]) -> None:
        """Exact estimator: ``.grad`` ← g1 + γ_p·H·v with H·v from double backprop (``.grad`` holds g1)."""
        grads = [p.grad for p in plan.params]
        dtype = accum_dtype(grads)
        n1, finite = norm_and_finite(grads, dtype)
        diff = SumOfSquares(dtype, plan.device)
        for p, hv, gamma in zip(plan.params, hvp, plan.coefs):
            correction = gamma * hv.to(dtype)
            diff.add(correction)
            p.grad.copy_(p.grad.to(dtype) + correction)
        hv_norm, hv_finite = norm_and_finite(list(hvp), dtype)
        self.metrics = {
            "g1_norm": n1,
            "g2_norm": hv_norm,  # for the exact estimator: ‖H·v‖
            "perturb_ratio": torch.ones_like(n1),
            "gr_rel": diff.norm() / n1.clamp_min(torch.finfo(dtype).tiny),
            "finite": finite & hv_finite,
        }

    def clip_scale_g1(self, plan: StepPlan) -> torch.Tensor:
        """s1 for the exact estimator's direction v = s1·g1 (computed from ``.grad``)."""
        grads = [p.grad for p in plan.params]
        return clip_scale(global_norm(grads, accum_dtype(grads)), plan.g1_clip)
