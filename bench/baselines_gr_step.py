"""Two baselines of the GR-step math (forward estimator), for the benchmarks only.

Both take explicit ``params`` and ``grads`` lists (so that bf16 parameters with fp32 gradient buffers can be
measured) and do, with g = grads:

    perturb:  n1 = ‖g‖, s1 = min(1, c1/(n1 + 1e-6)); save θ and g1; θ ← rn(θ + ε·s1·g1); g ← 0
    combine:  n2 = ‖g‖, s2 = ...; θ ← saved θ; g ← g1 + (γ/ε)·(s2·g − s1·g1)

``ForeachGRStep``: ``torch._foreach_*`` ops, device-side scalars (no host sync): what a careful PyTorch
implementation without custom kernels does; it allocates an fp32 temporary per pass.

``LoopGRStep``: a per-parameter Python loop in the style of the public reference implementation: fp32 copies
of g1 and of the perturbed weights, a full parameter clone, norms read back with ``.item()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _clip(norm: torch.Tensor, c: float | None) -> torch.Tensor:
    return torch.ones_like(norm) if c is None else torch.clamp(c / (norm + 1e-6), max=1.0)


class _Baseline:
    """What both baselines keep: the settings, the saved θ and g1 (their extra memory)."""

    def __init__(self, eps: float, gamma: float, g1_clip: float | None = 10.0, g2_clip: float | None = 10.0):
        self.eps, self.gamma, self.g1_clip, self.g2_clip = eps, gamma, g1_clip, g2_clip
        self.theta: list[torch.Tensor] = []
        self.g1: list[torch.Tensor] = []

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.theta + self.g1)


class ForeachGRStep(_Baseline):
    """The GR step with ``torch._foreach`` ops (one kernel per op per dtype group, roughly)."""

    @staticmethod
    def _norm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(ts), 2, dtype=torch.float32)))

    def perturb(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if len(self.theta) != len(params):
            self.theta = [torch.empty_like(p) for p in params]
            self.g1 = [torch.empty_like(g) for g in grads]
        n1 = self._norm(grads)
        self.s1 = _clip(n1, self.g1_clip)
        torch._foreach_copy_(self.theta, params)
        torch._foreach_copy_(self.g1, grads)
        delta = torch._foreach_mul([g.float() for g in grads], self.s1 * self.eps)  # fp32 temporaries
        torch._foreach_add_(delta, [p.float() for p in params])
        torch._foreach_copy_(params, delta)  # rounds to the parameter dtype
        torch._foreach_zero_(grads)

    def combine(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        n2 = self._norm(grads)
        s2 = _clip(n2, self.g2_clip)
        torch._foreach_copy_(params, self.theta)
        a = torch._foreach_mul([g.float() for g in grads], s2)
        b = torch._foreach_mul([g.float() for g in self.g1], self.s1)
        torch._foreach_sub_(a, b)
        torch._foreach_mul_(a, self.gamma / self.eps)
        torch._foreach_add_(a, [g.float() for g in self.g1])
        torch._foreach_copy_(grads, a)


class LoopGRStep(_Baseline):
    """The GR step as a per-parameter loop with host reads, like the public reference implementation."""

    def _scale(self, grads: list[torch.Tensor], c: float | None) -> float:
        norm = sum(float(g.float().norm()) ** 2 for g in grads) ** 0.5  # one host read per tensor
        return 1.0 if c is None else min(1.0, c / (norm + 1e-6))

    def perturb(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.g1 = [g.detach().float().clone() for g in grads]
        self.s1 = self._scale(grads, self.g1_clip)
        self.theta = [p.detach().clone() for p in params]
        for p, g in zip(params, self.g1):
            p.copy_((p.float() + self.eps * self.s1 * g).to(p.dtype))
        for g in grads:
            g.zero_()

    def combine(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        s2 = self._scale(grads, self.g2_clip)
        for p, t, g, g1 in zip(params, self.theta, grads, self.g1):
            p.copy_(t)
            g.copy_(g1 + (self.gamma / self.eps) * (s2 * g.float() - self.s1 * g1))
