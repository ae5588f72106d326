"""The backend contract of the GR step: what the engine hands a backend (``StepPlan``, ``Shards``) and what every
backend implements (``GRBackend``). The specification of the arithmetic is ``grkernels.backends.reference``; the
shared step arithmetic (norms, clip and perturbation scales, buffers) is ``grkernels.backends.arith``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from grkernels.backends.arith import global_norm


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


@runtime_checkable
class GRBackend(Protocol):
    """What the engine calls on a GR-step implementation (torch reference, C++, Triton).

    Notation (per GR parameter p of the plan's P; norms over all of P, across processes when sharded):

        g1 = ∇L(θ)  (``.grad`` at ``perturb(plan, 0)``)
        n1 = ‖g1‖₂,          s1 = min(1, c1 / (n1 + 1e-6))         (1 when c1 is None)
        v  = s1·g1,          ‖v‖ = s1·n1
        ε_eff = ε (eps_mode "absolute") or ε/‖v‖ ("radius": ‖θ' − θ‖ = ε whatever the gradient's scale)
        θ' = round(θ + ε_eff·v)             (point 0; point 1 of the central estimator: θ − ε_eff·v)
        g2 = ∇L(θ')  (the caller's pass at θ', accumulated into the zeroed ``.grad``)
        n2 = ‖g2‖₂,          s2 = min(1, c2 / (n2 + 1e-6))
        forward:  grad ← g1 + (γ_p/ε_eff)·(s2·g2 − s1·g1)             ≈ g1 + γ_p·H·v
        central:  grad ← g1 + (γ_p/(2ε_eff))·(s₊·g₊ − s₋·g₋)          (g± = ∇L(θ ± ε_eff·v))
        exact:    grad ← g1 + γ_p·H·v                                   (H·v from double backprop)

    Units: ε in parameter units per unit of (clipped) gradient (absolute) or in parameter units (radius: the
    length of θ' − θ); γ_p the strength of p's group, the regulariser being (γ/2)·‖∇L‖², so γ_p·H·v is in gradient
    units; norms and clip thresholds c1, c2 in gradient units. Every norm, scale and flag is a 0-d tensor on the
    parameters' device: no method reads a value back to the host.

    Norms are overflow- and underflow-safe (as BLAS ``nrm2``): a gradient with elements of 3e19 has its finite
    norm, one of 1e-25 per element its nonzero one. Finiteness is a property of the elements (``finite`` is False
    exactly when an element of g1, g± or g2 — H·v for the exact estimator — is inf/NaN), never of a norm; with a
    non-finite g1, θ' = θ. In radius mode ‖v‖ is clamped below at the dtype's smallest normal number (1.2e-38 in
    float32): a gradient that small moves θ by ε·‖v‖/tiny < ε, never by an overflow. A zero gradient gives
    θ' = θ.
    """

    name: str
    """"torch", "cpp" or "triton"."""

    metrics: dict[str, torch.Tensor]
    """0-d device tensors. After ``perturb(plan, 0)``: ``g1_norm`` (n1) and ``perturb_ratio`` (‖θ' − θ‖ over
    the intended ε_eff·‖v‖: 1 unless rounding ate part of the step). After the combine, also ``g2_norm`` (n2,
    central: n₋; ‖H·v‖ for the exact estimator), ``gr_rel`` (‖grad − g1‖ / max(n1, tiny)) and ``finite``."""

    def perturb(self, plan: StepPlan, point: int) -> None:
        """Move P to point ``point`` (0: θ + ε_eff·v; 1, central only: θ − ε_eff·v) and zero P's gradients for
        the caller's next backward.

        Point 0 saves θ (bitwise, the weight the model computes with), g1 of P and of ``plan.keep``, and computes
        n1, s1, ‖v‖. Point 1 saves g₊ and computes n₊, s₊. When g1 is not finite θ' = θ (nothing non-finite ever
        reaches the weights). On an exception it restores (θ and g1 back) before raising."""
        ...

    def restore(self, plan: StepPlan) -> None:
        """Abort, at any point after ``perturb(plan, 0)`` began: θ back bitwise and ``.grad`` of P and of
        ``plan.keep`` back to g1 (also after ``restore_and_combine``: the combined gradient is replaced by g1
        again). Idempotent; a no-op before anything of this step was saved. Lean mode (C++/Triton,
        fp32 gradients): g1 comes back bitwise while the backend still holds it exactly (see the backend)."""
        ...

    def restore_and_combine(self, plan: StepPlan) -> None:
        """θ back bitwise; P's ``.grad`` ← the forward or central GR gradient; ``plan.keep``'s ← g1 (bitwise).
        Raises (after ``restore``) when a GR parameter got no gradient at θ' or, in lean mode, when the gradient
        buffers were replaced or zeroed in place between ``perturb`` and this call."""
        ...

    def combine_hvp(self, plan: StepPlan, hvp: Sequence[torch.Tensor]) -> None:
        """Exact estimator: ``.grad`` (holding g1) ← g1 + γ_p·H·v with ``hvp`` = H·v per GR parameter."""
        ...

    def clip_scale_g1(self, plan: StepPlan) -> torch.Tensor:
        """s1 = min(1, c1 / (‖g1‖ + 1e-6)) from P's ``.grad`` (the exact estimator's direction v = s1·g1)."""
        ...

    def extra_bytes(self) -> int:
        """Bytes held by this backend's buffers right now (saved θ, g1, g₊, keep gradients, tables)."""
        ...


class ExactViaReference:
    """For the fast backends (``self._torch`` the torch reference): the exact estimator's cheap combine and its s1
    are the reference's, since that step is dominated by the double backprop, not by this arithmetic."""

    _torch: GRBackend
    metrics: dict[str, torch.Tensor]

    def combine_hvp(self, plan: StepPlan, hvp: Sequence[torch.Tensor]) -> None:
        """Exact estimator: ``.grad`` ← g1 + γ_p·H·v (the torch reference's combine)."""
        self._torch.combine_hvp(plan, hvp)
        self.metrics = self._torch.metrics

    def clip_scale_g1(self, plan: StepPlan) -> torch.Tensor:
        """s1 for the exact estimator's direction v = s1·g1 (computed from ``.grad``)."""
        return self._torch.clip_scale_g1(plan)
