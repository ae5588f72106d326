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

Per-parameter state is keyed by position (the parameter's index in the optimizer's groups), never by tensor
identity, so a copy, a pickle or a checkpoint of the optimizer reuses the correction like the original. Only a
finite full step's correction is kept (a non-finite one leaves the previous one, chosen on the device). A step in
between applies the correction to the parameters that have a gradient (an unused branch or MoE expert without one
is simply left out).

Memory: one copy of the GR parameters' gradients (grad dtype; 2 B/param for bf16 gradients, 4 B for fp32), kept
between full steps, plus transient flat copies (g1, the prediction) during a step. Everything stays on the device
(norms and ratios are 0-d tensors), so reuse adds no host synchronisation. Sharded parameters (FSDP2): the stored
correction is the local shard and every inner product is all-reduced through the step's ``Shards``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grkernels.backends.arith import accum_dtype
from grkernels.backends.base import Shards

REUSE_MODES = ("none", "orthogonal")


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A new 1-D tensor of ``dtype`` holding ``tensors`` one after the other (one copy, one kernel)."""
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


def _storage_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The tensors' dtype where they share one (the stored correction keeps the gradients' dtype), else the
    accumulation dtype."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else accum_dtype(tensors)


def _unit_scale(x: torch.Tensor, shards: Shards) -> torch.Tensor:
    """A power of two s (0-d, float64) with ‖s·x‖ in [0.5, 1) over all processes (1 when x is zero or not finite).

    The reuse arithmetic is homogeneous in g1 and c, so it runs on s·x: scaling by a power of two is exact (the
    results are bit for bit those of the unscaled arithmetic on ordinary gradients), and the inner products of
    unit-size vectors can neither overflow (elements of 3e19 in fp32) nor lose their leading terms to underflow
    (elements of 1e-25). The norm is taken in float64: exact for 32-bit and narrower gradients at any scale."""
    sq = shards.sum_across(torch._foreach_norm([x], 2, dtype=torch.float64)[0].square())
    exp = torch.frexp(sq.sqrt())[1].clamp(-126, 126)  # ‖x‖ = m·2^exp, m in [0.5, 1); 2^±126 is normal in fp32
    one = torch.ones((), dtype=torch.float64, device=sq.device)
    return torch.where(torch.isfinite(sq) & (sq > 0), torch.ldexp(one, -exp), one)


class CorrectionReuse:
    """Keeps the correction of the last full GR step and applies it, projected and rescaled, in between.

    Held flat (the GR parameters' local gradients one after the other, in position order), so each inner product
    or update is one kernel whatever the number of tensors.
    """

    def __init__(self) -> None:
        self._c: torch.Tensor | None = None  # last full correction, flat (gradient dtype)
        self._index: tuple[int, ...] = ()  # positions of the parameters the segments of _c belong to
        self._shapes: list[torch.Size] = []  # local gradient shapes, in the order of the segments
        self._rho: torch.Tensor | None = None
        self._gamma: torch.Tensor | None = None  # γ multiplier of the full step c belongs to (0-d float64, device)
        self._g1: torch.Tensor | None = None  # g1 of the full step in progress, flat (transient)
        self._pred: torch.Tensor | None = None  # what reuse would have applied at this full step (transient)
        self._undo: tuple | None = None  # the committed correction while a step's store is pending (transient)

    @property
    def ready(self) -> bool:
        """Whether a correction is stored (a full step has happened)."""
        return self._rho is not None

    def _fields(self) -> tuple:
        return self._c, self._index, self._shapes, self._rho, self._gamma

    def commit(self) -> None:
        """The step whose combine stored a correction was taken (or skipped as non-finite): keep it."""
        self._undo = None

    def rollback(self) -> None:
        """The step was aborted: the correction committed before it is back, the step's transients dropped (a
        step that never happened leaves no trace; idempotent)."""
        if self._undo is not None:
            self._c, self._index, self._shapes, self._rho, self._gamma = self._undo
        self._undo = self._g1 = self._pred = None

    def state(self) -> dict | None:
        """The committed correction for a state dict: one tensor per parameter, named by its position, with ρ and
        the γ multiplier of its full step."""
        c, index, shapes, rho, gamma = self._fields() if self._undo is None else self._undo
        if rho is None:
            return None
        parts = c.split([s.numel() for s in shapes])
        return {"index": list(index), "c": [x.view(s).clone() for x, s in zip(parts, shapes)], "rho": rho.clone(),
                "gamma": gamma.clone()}

    def load(self, state: dict | None, params: Sequence[torch.Tensor], gamma: float = 1.0) -> None:
        """Inverse of :meth:`state`; ``params``: the tensors in position order (for device and dtype); ``gamma``:
        the γ multiplier when ``state`` has none (a checkpoint written before it was kept there)."""
        self.__init__()
        if state:
            chosen = [params[i] for i in state["index"]]
            like = [p if p.grad is None else p.grad for p in chosen]
            device = chosen[0].device
            self._index = tuple(state["index"])
            self._shapes = [c.shape for c in state["c"]]
            self._c = _flat(state["c"], _storage_dtype(like)).to(device)
            self._rho = state["rho"].to(device)
            self._gamma = torch.as_tensor(state.get("gamma", gamma), dtype=torch.float64).to(device)

    def extra_bytes(self) -> int:
        held = [t for t in (self._c, self._g1, self._pred) if t is not None]
        if self._undo is not None and self._undo[0] is not None:
            held.append(self._undo[0])
        return sum(t.numel() * t.element_size() for t in held)

    def _segments(self, positions: Sequence[int], g1: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The stored correction laid out like ``g1`` (one segment per position; zeros where none is stored), or
        None when nothing stored matches."""
        if not self.ready:
            return None
        if tuple(positions) == self._index and self._shapes == [g.shape for g in g1]:
            return self._c
        stored = dict(zip(self._index, zip(self._c.split([s.numel() for s in self._shapes]), self._shapes)))
        parts, hit = [], False
        for i, g in zip(positions, g1):
            seg = stored.get(i)
            if seg is not None and seg[1] == g.shape:
                parts.append(seg[0])
                hit = True
            else:
                parts.append(self._c.new_zeros(g.numel()))
        return torch.cat(parts) if hit else None

    def _direction(self, g1: torch.Tensor, c: torch.Tensor,
                   shards: Shards) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reused correction for the flat gradient g1 (accumulation dtype), ρ·‖g1‖·d/‖d‖ with d the stored c
        made orthogonal to g1, scaled by s = :func:`_unit_scale` of g1: (s·correction, ‖s·g1‖², s)."""
        dtype = g1.dtype
        tiny = torch.finfo(dtype).tiny
        s_g, s_c = _unit_scale(g1, shards), _unit_scale(c, shards)
        a = g1 * s_g.to(dtype)
        c = c.to(dtype) * s_c.to(dtype)
        a_sq = shards.sum_across(torch.dot(a, a))
        beta = shards.sum_across(torch.dot(c, a)) / a_sq.clamp_min(tiny)
        d = a.mul_(-beta).add_(c)  # s_c·(c − ⟨c, g1⟩/‖g1‖²·g1); two roundings, as the unscaled arithmetic
        d_norm = shards.sum_across(torch.dot(d, d)).sqrt()
        return d.mul_(self._rho.to(dtype) * a_sq.sqrt() / d_norm.clamp_min(tiny)), a_sq, s_g

    @torch.no_grad()
    def capture(self, params: Sequence[torch.Tensor], positions: Sequence[int], shards: Shards) -> None:
        """Full step, right after the backward at θ (``.grad`` = g1): keep g1, and the reuse prediction for the
        ``reuse_cos`` diagnostic."""
        g1 = [shards.local(p.grad) for p in params]
        self._g1 = _flat(g1, _storage_dtype(g1))
        c = self._segments(positions, g1)
        self._pred = None if c is None else self._direction(self._g1.to(accum_dtype(g1)), c, shards)[0]  # scaled

    @torch.no_grad()
    def store(self, params: Sequence[torch.Tensor], positions: Sequence[int], shards: Shards,
              finite: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
        """Full step, after the combine (``.grad`` = GR): c = GR − g1, ρ and ``gamma`` (the step's γ multiplier),
        kept only where ``finite`` (a 0-d device flag: a non-finite step leaves the previous correction, or none);
        pending until :meth:`commit` (:meth:`rollback` on an abort). Returns ``reuse_cos``."""
        self._undo = self._fields()
        grads = [shards.local(p.grad) for p in params]
        g1, self._g1 = self._g1, None
        c_new = _flat(grads, g1.dtype).sub_(g1)
        dtype = accum_dtype(grads)
        tiny = torch.finfo(dtype).tiny
        s_g, s_c = _unit_scale(g1, shards), _unit_scale(c_new, shards)  # exact rescaling: see _unit_scale
        c, g1 = c_new.to(dtype) * s_c.to(dtype), g1.to(dtype) * s_g.to(dtype)
        g1_sq = shards.sum_across(torch.dot(g1, g1))
        c_dot = shards.sum_across(torch.dot(c, g1))
        c_sq = shards.sum_across(torch.dot(c, c))
        perp_sq = (c_sq - c_dot.square() / g1_sq.clamp_min(tiny)).clamp_min(0)  # ‖c⊥‖² = ‖c‖² − ⟨c, g1⟩²/‖g1‖²
        rho_new = perp_sq.sqrt() / g1_sq.sqrt().clamp_min(tiny)  # ‖c⊥‖/‖g1‖ = (‖s_c·c⊥‖/‖s_g·g1‖)·s_g/s_c:
        rho_new = (rho_new.double() * (s_g / s_c)).to(dtype)  # the power of two applied in float64 (exact)
        out: dict[str, torch.Tensor] = {}
        if self._pred is not None:  # a cosine: the scales cancel
            num = shards.sum_across(torch.dot(self._pred, c))
            den = (shards.sum_across(torch.dot(self._pred, self._pred)) * c_sq).sqrt().clamp_min(tiny)
            out["reuse_cos"] = num / den
        self._pred = None
        old = self._segments(positions, grads)
        finite = finite.to(c_new.device)
        self._c = torch.where(finite, c_new, torch.zeros_like(c_new) if old is None else old.to(c_new.dtype))
        rho_old = torch.zeros_like(rho_new) if old is None else self._rho.to(rho_new)
        self._rho = torch.where(finite, rho_new, rho_old)
        gamma_new = torch.tensor(gamma, dtype=torch.float64, device=c_new.device)  # a host-to-device copy: no read
        self._gamma = gamma_new if self._gamma is None else torch.where(finite, gamma_new, self._gamma)
        self._index, self._shapes = tuple(positions), [g.shape for g in grads]
        return out

    @torch.no_grad()
    def apply(self, params: Sequence[torch.Tensor], positions: Sequence[int], gamma: float,
              shards: Shards) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Step in between: ``.grad`` (= g1) ← g1 + scale·ρ·‖g1‖·d/‖d‖ (scale: ``gamma``, the γ multiplier now,
        over that of the full step) on ``params`` (those with a gradient). Returns ``gr_rel`` of the applied
        correction, and (gradient, g1) pairs that put g1 back bitwise on an abort. A no-op (``{}, []``) when
        nothing stored matches."""
        g1 = [shards.local(p.grad) for p in params]
        c = self._segments(positions, g1) if g1 else None
        if c is None:
            return {}, []
        dtype = accum_dtype(g1)
        flat_g1 = _flat(g1, dtype)
        sizes = [g.numel() for g in g1]
        if all(g.dtype == dtype for g in g1):  # the compute copy is g1 bit for bit: also the undo copy
            undo = [(g, x.view(g.shape)) for g, x in zip(g1, flat_g1.split(sizes))]
        else:  # a widened copy does not give every bit back (a NaN's payload through bf16 → fp32 → bf16)
            undo = [(g, g.clone()) for g in g1]
        corr, g1_sq, s_g = self._direction(flat_g1, c, shards)
        corr.mul_((gamma / self._gamma).to(dtype))  # on the device: the stored γ was chosen there
        rel = shards.sum_across(torch.dot(corr, corr)).sqrt() / g1_sq.sqrt().clamp_min(torch.finfo(dtype).tiny)
        corr.div_(s_g.to(dtype))  # back to the gradients' scale (exact)
        parts = corr.to(_storage_dtype(g1)).split(sizes)
        torch._foreach_add_(g1, [x.view(g.shape) for x, g in zip(parts, g1)])
        return {"gr_rel": rel}, undo
