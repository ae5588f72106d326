"""Cheaper GR by reusing the last full correction between full GR steps (``GradReg(every=k, reuse=...)``).

A full GR step costs one more forward/backward. With ``every=k`` only every k-th step (counted from the end of
warmup) runs it; the steps between either take the plain gradient (``reuse="none"``) or reuse the last full step's
correction c = GR − g1 in the LookSAM way (Liu et al., CVPR 2022), ``reuse="orthogonal"``:

    full step t0:      c = GR − g1 (on the GR parameters), ρ = ‖c⊥‖/‖g1‖ with c⊥ = c − (⟨c, g1⟩/‖g1‖²)·g1
    step in between:   d = c − (⟨c, g1⟩/‖g1‖²)·g1        (the stored correction, orthogonal to the CURRENT g1)
                       grad = g1 + ρ·‖g1‖·d/‖d‖

The component along g1 (a rescaling of the step, which adaptive optimizers largely undo) is dropped, and the
orthogonal part keeps the size relative to ‖g1‖ it had at the full step: LookSAM's rule with its α set by the
measurement instead of a hyperparameter. Diagnostic ``reuse_cos``: at each full step after the first, the cosine
between the correction reuse would have applied at that step and the full correction actually computed.

Memory: one copy of the GR parameters' gradients (grad dtype; 2 B/param for bf16 gradients, 4 B for fp32), kept
between full steps, plus a transient second copy during a full step. Everything stays on the device (norms and
ratios are 0-d tensors), so reuse adds no host synchronisation. Sharded parameters (FSDP2): the stored correction
is the local shard and every inner product is all-reduced through the step's ``Shards``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grkernels.reference import Shards, accum_dtype

REUSE_MODES = ("none", "orthogonal")


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], dtype: torch.dtype, shards: Shards) -> torch.Tensor:
    """Σ⟨a_i, b_i⟩ over local tensors, summed across the processes holding the other shards (0-d, ``dtype``)."""
    return shards.sum_across(torch.stack([(x.to(dtype) * y.to(dtype)).sum() for x, y in zip(a, b)]).sum())


class CorrectionReuse:
    """Keeps the correction of the last full GR step and applies it, projected and rescaled, in between."""

    def __init__(self) -> None:
        self._c: list[torch.Tensor] = []  # last full correction, per GR parameter (grad dtype)
        self._ids: tuple[int, ...] = ()
        self._rho: torch.Tensor | None = None
        self._g1: list[torch.Tensor] = []  # g1 of the full step in progress (transient)
        self._pred: list[torch.Tensor] | None = None  # what reuse would have applied at this full step

    @property
    def ready(self) -> bool:
        """Whether a full correction is stored (the first full step has happened)."""
        return self._rho is not None

    def state(self, position: dict[int, int]) -> dict | None:
        """The stored correction for a state dict, parameters named by ``position`` (id -> flat index)."""
        if not self.ready:
            return None
        return {"index": [position[i] for i in self._ids], "c": [c.clone() for c in self._c], "rho": self._rho}

    def load(self, state: dict | None, params: Sequence[torch.Tensor]) -> None:
        """Inverse of :meth:`state`; ``params`` are the optimizer's parameters in flat order."""
        self.__init__()
        if state:
            chosen = [params[i] for i in state["index"]]
            self._ids = tuple(id(p) for p in chosen)
            self._c = [c.to(device=p.device, dtype=p.dtype if p.grad is None else p.grad.dtype)
                       for c, p in zip(state["c"], chosen)]
            self._rho = state["rho"].to(chosen[0].device)

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._c + self._g1)

    def _matches(self, params: Sequence[torch.Tensor]) -> bool:
        return self.ready and self._ids == tuple(id(p) for p in params)

    def _scaled_direction(self, g1: Sequence[torch.Tensor], shards: Shards) -> tuple[list[torch.Tensor], torch.dtype]:
        """The reused correction for gradient g1: ρ·‖g1‖·d/‖d‖ with d the stored c made orthogonal to g1."""
        dtype = accum_dtype(list(g1))
        g1_sq = _dot(g1, g1, dtype, shards)
        beta = _dot(self._c, g1, dtype, shards) / g1_sq.clamp_min(torch.finfo(dtype).tiny)
        d = [c.to(dtype) - beta * g.to(dtype) for c, g in zip(self._c, g1)]
        d_norm = _dot(d, d, dtype, shards).sqrt()
        scale = self._rho.to(dtype) * g1_sq.sqrt() / d_norm.clamp_min(torch.finfo(dtype).tiny)
        return [x * scale for x in d], dtype

    @torch.no_grad()
    def capture(self, params: Sequence[torch.Tensor], shards: Shards) -> None:
        """Full step, right after the backward at θ (``.grad`` = g1): keep g1, and the reuse prediction for the
        ``reuse_cos`` diagnostic."""
        g1 = [shards.local(p.grad) for p in params]
        self._pred = self._scaled_direction(g1, shards)[0] if self._matches(params) else None
        self._g1 = [g.detach().clone() for g in g1]

    @torch.no_grad()
    def store(self, params: Sequence[torch.Tensor], shards: Shards) -> dict[str, torch.Tensor]:
        """Full step, after the combine (``.grad`` = GR): c = GR − g1 and ρ; returns ``reuse_cos`` if measured."""
        g1, self._g1 = self._g1, []
        self._c = [shards.local(p.grad).detach() - g for p, g in zip(params, g1)]
        self._ids = tuple(id(p) for p in params)
        dtype = accum_dtype(self._c)
        g1_sq = _dot(g1, g1, dtype, shards)
        tiny = torch.finfo(dtype).tiny
        c_dot = _dot(self._c, g1, dtype, shards)
        c_sq = _dot(self._c, self._c, dtype, shards)
        # ‖c⊥‖² = ‖c‖² − ⟨c, g1⟩²/‖g1‖²
        perp_sq = (c_sq - c_dot.square() / g1_sq.clamp_min(tiny)).clamp_min(0)
        self._rho = perp_sq.sqrt() / g1_sq.sqrt().clamp_min(tiny)
        out: dict[str, torch.Tensor] = {}
        if self._pred is not None:
            num = _dot(self._pred, self._c, dtype, shards)
            den = (_dot(self._pred, self._pred, dtype, shards) * c_sq).sqrt().clamp_min(tiny)
            out["reuse_cos"] = num / den
        self._pred = None
        return out

    @torch.no_grad()
    def apply(self, params: Sequence[torch.Tensor], scale: float, shards: Shards) -> dict[str, torch.Tensor]:
        """Step in between: ``.grad`` (= g1) ← g1 + scale·ρ·‖g1‖·d/‖d‖ (``scale``: γ now over γ at the full step);
        returns ``gr_rel`` of the applied correction. A no-op (returns {}) unless a correction for exactly these
        parameters is stored."""
        if not self._matches(params):
            return {}
        g1 = [shards.local(p.grad) for p in params]
        corr, dtype = self._scaled_direction(g1, shards)
        corr = [c * scale for c in corr]
        g1_norm = _dot(g1, g1, dtype, shards).sqrt()
        for g, c in zip(g1, corr):
            g.add_(c.to(g.dtype))
        rel = _dot(corr, corr, dtype, shards).sqrt() / g1_norm.clamp_min(torch.finfo(dtype).tiny)
        return {"gr_rel": rel}
