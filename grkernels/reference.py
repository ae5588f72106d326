"""The GR step in plain PyTorch: the specification every fast backend must match.

One GR step over the gradient-regularised ("GR") parameters P, with g1 = ∇L(θ) in ``.grad``:

    n1 = ‖g1‖₂ over P,             s1 = min(1, c1 / (n1 + 1e-6))    (1 when c1 is None)
    v  = s1·g1                     (the clipped direction; "the scale factor applies to the perturbation")
    θ' = round(θ + ε·v)            (stochastic rounding for bf16/fp16 parameters, see ``stochastic_round``)
    g2 = ∇L(θ')                    (the caller's second forward/backward, accumulated into ``.grad``)
    n2 = ‖g2‖₂ over P,             s2 = min(1, c2 / (n2 + 1e-6))
    θ  ← θ (bitwise, from a saved copy)
    grad ← g1 + (γ_p/ε)·(s2·g2 − s1·g1)        ≈ ∇L + γ·H·v

With ``eps_mode="radius"`` the step is ε_eff = ε/‖v‖, so that ‖θ' − θ‖ = ε whatever the gradient's scale (the
fidelity of the finite difference depends on ε·‖v‖, see BENCHMARKS.md); the combine divides by ε_eff, so the
estimate still targets γ·H·v.

The central estimator evaluates g± = ∇L(θ ± ε·v) and uses grad ← g1 + (γ_p/2ε)·(s₊·g₊ − s₋·g₋); the exact
estimator gets H·v from double backprop and uses grad ← g1 + γ_p·H·v. Parameters outside P that have a gradient
("keep" parameters: excluded, or in a group with GR off) end the step with their g1, bitwise.

Everything stays on the device: norms, clip factors and the finite flag are 0-d tensors, so no step of this file
reads a value back to the host. Arithmetic is in float32 (float64 for float64 tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from grkernels.rounding import perturbed_value

NORM_EPS = 1e-6  # added to a norm before dividing by it, as torch.nn.utils.clip_grad_norm_ does


class Shards:
    """How a GR step reaches its tensors and sums over them. This default is the identity: one process, or
    tensors every rank holds in full (DDP, after its all-reduce). ``grkernels.distributed.DTensorShards``
    is the sharded one (FSDP2): local shards, and sums of squares all-reduced over the ranks holding the rest.
    """

    sharded = False

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The part of ``t`` (a parameter or gradient) this process works on."""
        return t

    def sum_across(self, x: torch.Tensor) -> torch.Tensor:
        """A local sum of squares (0-d) summed over the processes that hold the other parts."""
        return x

    def wrap_grad(self, like: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """A gradient for parameter ``like`` made from its local part (when ``.grad`` was set to None)."""
        return local

    def compute_dtype(self, p: torch.Tensor) -> torch.dtype | None:
        """The dtype the model computes with when it differs from ``p``'s (mixed precision), else None: θ' is
        then stochastically rounded onto that dtype's grid (so the model's cast keeps it) and stored in p."""
        return None

    def before_write(self, params: Sequence[torch.Tensor]) -> None:
        """Called before the step writes parameters (e.g. FSDP2 reshards, so the next forward sees the edit)."""


@dataclass
class StepPlan:
    """What one GR step works on, decided by ``GradReg`` on the host (no tensor values read).

    params: the GR parameters P (each has ``.grad``), all on one device.
    coefs:  γ_p per parameter of P (the strength of its group after warmup/schedule).
    keep:   parameters outside P that have a gradient and must end the step with their g1.
    eps:    ε, the finite-difference step (units of the parameters per unit of clipped gradient).
    g1_clip, g2_clip: max norms c1, c2 (None: no clipping).
    estimator: "forward", "central" or "exact".
    rounding: "stochastic" or "nearest" (bf16/fp16 parameters only; fp32/fp64 always round to nearest).
    eps_mode: "absolute" (θ' = θ + ε·v, the paper's) or "radius" (θ' = θ + ε·v/‖v‖).
    seed:   seed of the stochastic rounding of this step (deterministic for a given seed).
    absent: parameters of the optimizer that had no gradient at θ: left alone, so whatever gradient a pass at a
            perturbed point gives them is dropped again (``.grad`` back to None) when the step ends or aborts.
    model_attr: fp32 master weights: when set, each GR parameter is an optimizer's master and
            ``getattr(master, model_attr)`` is the low-precision weight the model computes with. That weight is
            perturbed where the gradient was taken, w ← round(w + ε·v) (not from the master: master − w, up to
            half an ulp per element, would swamp ε·v), saved and restored bitwise; the master is never written.
    """

    params: list[torch.Tensor]
    coefs: list[float]
    keep: list[torch.Tensor] = field(default_factory=list)
    absent: list[torch.Tensor] = field(default_factory=list)
    eps: float = 1e-3
    g1_clip: float | None = 10.0
    g2_clip: float | None = 10.0
    estimator: str = "forward"
    rounding: str = "stochastic"
    seed: int = 0
    model_attr: str | None = None
    eps_mode: str = "absolute"
    shards: Shards = field(default_factory=Shards)

    def weights(self) -> list[torch.Tensor]:
        """The tensors the perturbation is written into: the parameters, or their model weights (masters)."""
        if self.model_attr is None:
            return [self.shards.local(p.detach()) for p in self.params]
        return [getattr(p, self.model_attr).detach() for p in self.params]

    def grads(self, params: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The (local) gradients of ``params`` (default: the GR parameters)."""
        return [self.shards.local(p.grad) for p in (self.params if params is None else params)]

    def set_grad(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """``p.grad`` ← ``value`` (a local tensor): in place when p has a gradient, else a new one."""
        if p.grad is None:
            p.grad = self.shards.wrap_grad(p, value.clone())
        else:
            self.shards.local(p.grad).copy_(value)

    def norm(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """‖concat(tensors)‖₂ over all processes (``global_norm`` of the local parts, summed by ``shards``)."""
        return global_norm(tensors, dtype, self.shards)

    @property
    def device(self) -> torch.device:
        return (self.params or self.keep)[0].device


def reusable_buffers(
    like: Sequence[torch.Tensor], bufs: list[torch.Tensor], dtypes: Sequence[torch.dtype] | None = None
) -> list[torch.Tensor]:
    """``bufs`` holding one contiguous buffer shaped like each tensor of ``like`` (its device; its dtype, or the
    matching entry of ``dtypes``), reallocated in place only when a shape, dtype or device changed."""
    dts = [t.dtype for t in like] if dtypes is None else list(dtypes)
    if len(bufs) != len(like) or any(
        b.shape != t.shape or b.dtype != d or b.device != t.device for b, t, d in zip(bufs, like, dts)
    ):
        bufs[:] = [torch.empty(t.shape, dtype=d, device=t.device) for t, d in zip(like, dts)]
    return bufs


def accum_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any tensor is float64 (so exact-HVP tests stay meaningful), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype, shards: Shards | None = None) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor of ``dtype``; per-tensor norms first, in a fixed order. With sharded
    ``shards`` the tensors are local parts: the local sum of squares is summed across processes first."""
    if shards is not None and shards.sharded:
        local = global_norm(tensors, dtype).square()
        return shards.sum_across(local).sqrt()
    if not tensors:
        return torch.zeros((), dtype=dtype)
    norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def require_second_gradients(plan: StepPlan, restore, grad_attr: str = "grad") -> None:
    """Every GR parameter must have a gradient after the pass at θ'; if one has none, ``restore(plan)`` (θ back,
    g1 back) and raise: the GR gradient cannot be formed."""
    missing = sum(getattr(p, grad_attr) is None for p in plan.params)
    if missing:
        restore(plan)
        raise RuntimeError(
            f"GradReg: {missing} parameter(s) had a gradient at θ but none after the second "
            "backward (did the second pass skip part of the model?). Parameters were restored."
        )


def clip_scale(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """min(1, c / (‖g‖ + 1e-6)) as a device tensor; 1 when ``max_norm`` is None."""
    if max_norm is None:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)


def v_norm(plan: StepPlan, s1: torch.Tensor, n1: torch.Tensor) -> torch.Tensor | None:
    """‖v‖ = s1·‖g1‖ when ``eps_mode == "radius"`` (then ε_eff = ε/‖v‖); None for "absolute"."""
    return s1 * n1 if plan.eps_mode == "radius" else None


def perturb_scale(plan: StepPlan, s1: torch.Tensor, vnorm: torch.Tensor | None, sign: float) -> torch.Tensor:
    """The multiplier m of g1 in θ' = θ + m·g1: ±s1·ε (absolute) or ±s1·ε/‖v‖ (radius), a device tensor."""
    if vnorm is None:
        return s1 * (sign * plan.eps)
    return s1 * (sign * plan.eps) / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny)


def combine_scales(
    sa: torch.Tensor, sb: torch.Tensor, vnorm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip factors of the two gradients in γ_p/(k·ε_eff)·(sa·ga − sb·gb), with the coefficient kept as the
    host float γ_p/(k·ε): in radius mode 1/ε_eff = ‖v‖/ε, so ‖v‖ multiplies the (device) clip factors."""
    return (sa, sb) if vnorm is None else (sa * vnorm, sb * vnorm)


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
        self._plan: StepPlan | None = None
        self._theta: list[torch.Tensor] = []
        self._g1: list[torch.Tensor] = []
        self._g1_keep: list[torch.Tensor] = []
        self._g_plus: list[torch.Tensor] = []
        self._s1 = self._s_plus = self._finite = self._vnorm = None
        self._armed = False  # θ of the current step is saved: restore() may write it back
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
            self._plan = plan
            self._armed = False  # the buffers hold another step's θ until the copies below are complete
            self._copies(plan.weights(), self._theta)
            self._copies(grads, self._g1)
            self._copies(plan.grads(plan.keep), self._g1_keep)
            self._armed = True
            n1 = plan.norm(grads, dtype)
            self._s1 = clip_scale(n1, plan.g1_clip)
            self._vnorm = v_norm(plan, self._s1, n1)
            self._finite = torch.isfinite(n1)
            self.metrics = {"g1_norm": n1}
            sign = 1.0
        else:
            n_plus = plan.norm(grads, dtype)
            self._copies(grads, self._g_plus)
            self._s_plus = clip_scale(n_plus, plan.g2_clip)
            self._finite = self._finite & torch.isfinite(n_plus)
            sign = -1.0
        # The perturbation ε·s1·g1 (zero where g1 is not finite: a NaN must never reach the weights).
        step = torch.where(self._finite, perturb_scale(plan, self._s1, self._vnorm, sign), torch.zeros_like(self._s1))
        realised_sq = torch.zeros((), dtype=dtype, device=plan.device)
        try:
            for i, (p, w, theta, g1) in enumerate(zip(plan.params, plan.weights(), self._theta, self._g1)):
                grid = plan.shards.compute_dtype(p)
                new = perturbed_value(theta, g1, step, plan.rounding, seed=plan.seed, index=i, point=point, grid=grid)
                new = torch.where(self._finite, new, theta)
                w.copy_(new)
                if point == 0:  # against the weight the model computed g1 with
                    base = theta if grid is None else theta.to(grid)
                    realised_sq += (new.to(dtype) - base.to(dtype)).square().sum()
                grads[i].zero_()
        except BaseException:
            self.restore(plan)  # θ and g1 are saved in full before anything moves: put them back, then raise
            raise
        if point == 0:
            intended = perturb_scale(plan, self._s1, self._vnorm, 1.0) * self.metrics["g1_norm"]
            realised = plan.shards.sum_across(realised_sq).sqrt()
            self.metrics["perturb_ratio"] = realised / intended.clamp_min(torch.finfo(dtype).tiny)

    def restore(self, plan: StepPlan) -> None:
        """Abort: θ back bitwise, every saved gradient back to g1. Idempotent; a no-op before θ was saved."""
        if not self._armed:
            return
        for p, w, theta, g1 in zip(plan.params, plan.weights(), self._theta, self._g1):
            w.copy_(theta)
            plan.set_grad(p, g1)
        self._restore_keep(plan)

    def _restore_keep(self, plan: StepPlan) -> None:
        for p, g1 in zip(plan.keep, self._g1_keep):
            plan.set_grad(p, g1)

    def restore_and_combine(self, plan: StepPlan) -> None:
        """θ back bitwise; ``.grad`` ← the GR gradient (forward or central estimator); keep params ← g1."""
        require_second_gradients(plan, self.restore)
        grads = plan.grads()
        dtype = accum_dtype(grads)
        n2 = plan.norm(grads, dtype)
        s2 = clip_scale(n2, plan.g2_clip)
        self._finite = self._finite & torch.isfinite(n2)
        if plan.estimator == "central":
            a, sa, b, sb, div = self._g_plus, self._s_plus, grads, s2, 2.0 * plan.eps
        else:
            a, sa, b, sb, div = grads, s2, self._g1, self._s1, plan.eps
        sa, sb = combine_scales(sa, sb, self._vnorm)
        diff_sq = torch.zeros((), dtype=dtype, device=plan.device)
        for g, w, theta, g1, ga, gb, gamma in zip(grads, plan.weights(), self._theta, self._g1, a, b, plan.coefs):
            w.copy_(theta)
            correction = (gamma / div) * (sa * ga.to(dtype) - sb * gb.to(dtype))
            diff_sq += correction.square().sum()
            g.copy_(g1.to(dtype) + correction)
        self._restore_keep(plan)
        self._armed = False
        self.metrics["g2_norm"] = n2
        diff = plan.shards.sum_across(diff_sq).sqrt()
        self.metrics["gr_rel"] = diff / self.metrics["g1_norm"].clamp_min(torch.finfo(dtype).tiny)
        self.metrics["finite"] = self._finite

    def combine_hvp(self, plan: StepPlan, hvp: Sequence[torch.Tensor]) -> None:
        """Exact estimator: ``.grad`` ← g1 + γ_p·H·v with H·v from double backprop (``.grad`` holds g1)."""
        grads = [p.grad for p in plan.params]
        dtype = accum_dtype(grads)
        n1 = global_norm(grads, dtype)
        finite = torch.isfinite(n1)
        diff_sq = torch.zeros((), dtype=dtype, device=plan.device)
        for p, hv, gamma in zip(plan.params, hvp, plan.coefs):
            correction = gamma * hv.to(dtype)
            diff_sq += correction.square().sum()
            p.grad.copy_(p.grad.to(dtype) + correction)
        hv_norm = global_norm(list(hvp), dtype)
        self.metrics = {
            "g1_norm": n1,
            "g2_norm": hv_norm,  # for the exact estimator: ‖H·v‖
            "perturb_ratio": torch.ones_like(n1),
            "gr_rel": diff_sq.sqrt() / n1.clamp_min(torch.finfo(dtype).tiny),
            "finite": finite & torch.isfinite(hv_norm),
        }

    def clip_scale_g1(self, plan: StepPlan) -> torch.Tensor:
        """s1 for the exact estimator's direction v = s1·g1 (computed from ``.grad``)."""
        grads = [p.grad for p in plan.params]
        return clip_scale(global_norm(grads, accum_dtype(grads)), plan.g1_clip)


class ExactViaReference:
    """For the fast backends (``self._torch`` a ``TorchGRStep``): the exact estimator's cheap combine and its s1
    are the reference's, since that step is dominated by the double backprop, not by this arithmetic."""

    _torch: TorchGRStep
    metrics: dict[str, torch.Tensor]

    def combine_hvp(self, plan: StepPlan, hvp: Sequence[torch.Tensor]) -> None:
        """Exact estimator: ``.grad`` ← g1 + γ_p·H·v (the torch reference's combine)."""
        self._torch.combine_hvp(plan, hvp)
        self.metrics = self._torch.metrics

    def clip_scale_g1(self, plan: StepPlan) -> torch.Tensor:
        """s1 for the exact estimator's direction v = s1·g1 (computed from ``.grad``)."""
        return self._torch.clip_scale_g1(plan)
