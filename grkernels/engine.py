"""The GR engine: one GR step end to end, over a parameter source. Every host drives this one object.

Per optimizer step (Karakida et al. 2023, forward finite difference; Ackermann et al. 2026 for RLHF/RLVR)::

    g1 = ∇L(θ);  θ' = θ + ε·v with v = clip(g1);  g2 = ∇L(θ');  restore θ;
    grad = g1 + (γ/ε)·(clip(g2) − v)  ≈  ∇L + γ·H·v          → handed to the base optimizer's step

What it owns: the phase machine and the one abort (:data:`TRANSITIONS`), the step plan (which tensors, which γ),
the backend (``grkernels.backends``: the arithmetic), the exact estimator, the reuse of the last correction between
full steps (``grkernels.reuse``), the sub-batch pass, the non-finite vote across ranks, the adaptive strength
(``grkernels.strength``), the metrics and the diagnostics. What it does not own: where the tensors are — that is the
:class:`~grkernels.sources.ParamSource` (plain parameters, FSDP2 local shards, ZeRO partitions) — and how the base
optimizer steps (a callable handed to :meth:`GREngine.finish`).

Phases: ``idle`` → (``marked``: a sub-batch's g1 saved) → ``perturbed`` (θ at a perturbed point, g1 saved) →
``combined`` (``.grad`` is what the base optimizer will step with) → ``idle`` after the base step. Every public
call checks the table; a call in the wrong phase, or any exception inside a call (the caller's closure, a kernel,
the base optimizer's step), runs :meth:`GREngine.abort`: θ back bitwise, ``.grad`` back to g1 bitwise, every
buffer of the step dropped, the step counter unchanged, the engine idle and usable.

Host synchronisation: the perturbation and the combine read nothing back. :meth:`GREngine.finish` reads one small
tensor right before the base step — the finite flag (were all gradients finite?), with gr_rel and perturb_ratio in
the same transfer — the read ``torch.amp.GradScaler`` makes; it is skipped when ``skip_nonfinite=False`` and the
strength is fixed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from grkernels.backends import all_finite, make_backend, resolve_backend
from grkernels.backends.arith import accum_dtype, global_norm
from grkernels.backends.base import GRBackend, Shards, StepPlan
from grkernels.diagnostics import Watch
from grkernels.reuse import CorrectionReuse
from grkernels.settings import GRSettings
from grkernels.sources import Entry, ParamSource
from grkernels.strength import StrengthController

IDLE, MARKED, PERTURBED, COMBINED = "idle", "marked", "perturbed", "combined"
_ANY = frozenset({IDLE, MARKED, PERTURBED, COMBINED})

#: The phase machine: each public call and the phases it may be made in. Anything else aborts the step.
TRANSITIONS: dict[str, frozenset[str]] = {
    "mark_subset": frozenset({IDLE}),
    "set_subset_fraction": frozenset({MARKED}),
    "perturb": frozenset({IDLE, MARKED, PERTURBED}),
    "restore_and_combine": frozenset({PERTURBED}),
    "combine": frozenset({IDLE, PERTURBED, COMBINED}),
    "step_closure": frozenset({IDLE}),
    "finish": frozenset({IDLE, PERTURBED, COMBINED}),
    "restore": _ANY,
}

_HOW = {
    "mark_subset": "call mark_subset() once per step, after the subset's backward and before perturb()",
    "set_subset_fraction": "set subset_fraction after mark_subset() and before perturb()",
    "perturb": "perturb() follows the backward at θ (or mark_subset()); a step has extra_passes of them",
    "restore_and_combine": "restore_and_combine() follows perturb() and the backward at θ'",
    "combine": "combine() follows the backward(s) of a step, before your clip and step()",
    "step_closure": "step(closure) runs a whole step: finish a pending two-phase step with step() first",
    "finish": "finish a sub-batch step with perturb(), the subset's backward at θ', then step()",
}


def transition(event: str) -> Callable:
    """Decorator of the public calls: check the phase against :data:`TRANSITIONS`, and abort on any exception."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: GREngine, *args: Any, **kwargs: Any) -> Any:
            try:
                if self.phase not in TRANSITIONS[event]:
                    raise RuntimeError(
                        f"GradReg: {event.replace('_', ' ')} while the step is {self.phase}: {_HOW[event]}. The "
                        "step was aborted (θ restored, gradients back to g1)"
                    )
                return method(self, *args, **kwargs)
            except BaseException:
                self.abort()
                raise

        return run

    return wrap


class GREngine:
    """One GR step end to end over ``source`` with validated ``settings`` (:func:`grkernels.settings.resolve`).

    ``schedule(step) -> float`` multiplies every group's γ after warmup (host float). ``name`` prefixes messages.
    """

    def __init__(self, settings: GRSettings, source: ParamSource,
                 schedule: Callable[[int], float] | None = None) -> None:
        self.settings = settings
        self.source = source
        self.schedule = schedule
        s = settings
        entries = source.entries()
        resolve_backend(s.backend, entries[0].tensor.device if entries else "cpu", what="GradReg")  # a clear error now
        self.auto = s.strength == "auto"
        self.controller = StrengthController(s.target_rel, s.strength_init) if self.auto else None
        self.phase = IDLE
        self.step_count = 0  # optimizer steps taken (skipped ones included): warmup, schedule, seeds, every
        self._plan: StepPlan | None = None
        self.backend: GRBackend | None = None
        self._point = 0
        self._finite: torch.Tensor | None = None  # this step's finite flag (device), from the backend
        self._skipped: torch.Tensor | None = None  # device counter of skipped steps
        self._metrics: dict[str, torch.Tensor] = {}  # this step's as it goes, then the last step's taken
        self._taken: dict[str, torch.Tensor] = {}  # the last step taken's: what an abort puts back
        self._last_factor = 0.0
        self._last_gamma = 0.0
        self.reuse = CorrectionReuse(s.backend)
        self._g1_copy: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, g1): reuse/exact combine undo
        self._subset: dict[int, torch.Tensor] | None = None  # position -> g1_S, then D = g1_S − f·g1
        self._subset_fraction = 1.0
        self._stashed: list[tuple[torch.Tensor, torch.Tensor]] = []  # keep_untouched: (param, g1) set aside
        self._watch = Watch()
        self._full = False  # this step combined a full GR correction (perturbed pass or exact)

    # ------------------------------------------------------------------ strength and schedule
    @property
    def strength(self) -> float:
        """The global γ in use now (the adaptive strength's current value when ``strength="auto"``)."""
        return self.controller.gamma if self.controller is not None else float(self.settings.strength)

    def factor(self, step: int | None = None) -> float:
        """Multiplier of every group's γ at ``step`` (default: the coming step): 0 during warmup."""
        step = self.step_count if step is None else step
        if step < self.settings.warmup_steps:
            return 0.0
        if self.schedule is None:
            return 1.0
        f = self.schedule(step)
        if isinstance(f, torch.Tensor) or not (math.isfinite(f) and f >= 0):
            raise ValueError(f"GradReg: schedule({step}) returned {f!r}; it must return a finite number >= 0 (a host "
                             "float: a tensor would force a device read every step)")
        return float(f)

    def gamma_of(self, entry: Entry, *, with_exclusions: bool = True) -> float:
        """γ of one entry's group before the factor: its override scaled like the global γ, else the global γ; 0
        when its group turns GR off or (``with_exclusions``) the user excluded it."""
        if not entry.enabled or (with_exclusions and entry.excluded):
            return 0.0
        if entry.gamma is None:
            return self.strength
        scale = 1.0 if self.controller is None else self.controller.gamma / self.controller.initial
        return entry.gamma * scale

    def _gamma_multiplier(self) -> float:
        """What multiplies every group's γ at the coming step (the factor, and the adaptive strength's γ_t when
        on): a stored correction is rescaled by its value now over its value at the full step."""
        return self.factor() * (1.0 if self.controller is None else self.controller.gamma)

    def _regularising(self) -> bool:
        """GR is on for the coming step: after warmup, some group's γ > 0. Exclusions do not turn it off: a GR
        step over nothing but excluded parameters is an error (perturb() says so), not a silent plain step."""
        f = self.factor()
        return f != 0.0 and any(self.gamma_of(e, with_exclusions=False) * f != 0.0 for e in self.source.entries())

    @property
    def active(self) -> bool:
        """Whether the coming step is a full GR step with its perturbed pass(es). Host-side, no sync."""
        return self._regularising() and (self.step_count - self.settings.warmup_steps) % self.settings.every == 0

    @property
    def reusing(self) -> bool:
        """Whether the coming step applies the stored correction (``every > 1, reuse="orthogonal"``)."""
        return (self.settings.reuse == "orthogonal" and self.reuse.ready and not self.active
                and self._regularising())

    @property
    def extra_passes(self) -> int:
        """Forward/backward passes at perturbed points this step: 1 forward, 2 central, 0 exact or inactive."""
        if not self.active or self.settings.estimator == "exact":
            return 0
        return 2 if self.settings.estimator == "central" else 1

    @property
    def needs_graph(self) -> bool:
        """Whether this step's backward must keep its graph (``create_graph=True``): the exact estimator."""
        return self.active and self.settings.estimator == "exact"

    def candidates(self) -> list[torch.Tensor]:
        """The tensors GR regularises when active (γ > 0, GR on, not excluded), whether or not they have a grad."""
        return [e.tensor for e in self.source.entries() if self.gamma_of(e) != 0.0]

    # ------------------------------------------------------------------ plan and backend
    def _make_plan(self) -> StepPlan:
        f = self.factor()
        entries = self.source.entries()
        params, coefs, keep, absent = [], [], [], []
        for e in entries:
            if e.tensor.grad is None:
                absent.append(e.tensor)
            elif self.gamma_of(e) * f != 0.0:
                params.append(e.tensor)
                coefs.append(self.gamma_of(e) * f)
            else:
                keep.append(e.tensor)
        self.source.check(params, keep)
        s = self.settings
        return StepPlan(params=params, coefs=coefs, keep=keep, absent=absent, eps=s.eps, g1_clip=s.g1_clip,
                        g2_clip=s.g2_clip, estimator=s.estimator, rounding=s.rounding,
                        seed=s.seed * 1_000_003 + self.step_count, model_attr=self.source.model_attr,
                        eps_mode=s.eps_mode, shards=self.source.shards(params + keep, s.estimator))

    def _backend_for(self, plan: StepPlan) -> GRBackend:
        if self.backend is None:
            s = self.settings
            self.backend = make_backend(s.backend, plan.device, lean=s.lean, model_attr=self.source.model_attr)
        return self.backend

    def positions(self, tensors: list[torch.Tensor]) -> list[int]:
        """Positions (index in the source's entries) of ``tensors``: what per-parameter state is keyed by, so that
        copies, checkpoints and hosts that swap parameter objects keep it."""
        where = {id(e.tensor): i for i, e in enumerate(self.source.entries())}
        return [where[id(t)] for t in tensors]

    # ------------------------------------------------------------------ the abort
    def abort(self) -> None:
        """Put θ back bitwise and ``.grad`` back to g1 bitwise whatever the phase; drop the step's buffers; idle.
        Safe to call at any point (a no-op when idle)."""
        plan, backend = self._plan, self.backend
        try:
            if plan is not None and backend is not None and self.phase in (PERTURBED, COMBINED):
                plan.shards.before_write(plan.params)
                self.source.refresh(plan)
                backend.restore(plan)  # before the combine: θ and g1; after it: g1 (θ is back already)
                self.source.publish()
            for grad, g1 in self._g1_copy:  # a reuse or exact combine: its g1, bitwise
                grad.copy_(g1)
        finally:
            self._unstash(check=False)
            if plan is not None:
                _drop_new_grads(plan)
            self.reuse.rollback()  # a correction stored at this step's combine, and its transients
            self._metrics = self._taken  # the diagnostics are the last step taken's again
            self._go_idle()

    def _go_idle(self) -> None:
        self.phase, self._point, self._finite, self._plan = IDLE, 0, None, None
        self._subset, self._g1_copy, self._stashed, self._full = None, [], [], False

    def _stash(self, plan: StepPlan) -> None:
        """keep_untouched: the keep parameters' gradients are set aside (``.grad = None``) during the perturbed
        passes, so g1 survives bitwise whatever the passes do, and no copy is made."""
        self._stashed = [(p, p.grad) for p in plan.keep]
        for p in plan.keep:
            p.grad = None
        plan.keep = []

    def _unstash(self, check: bool) -> None:
        touched = [p for p, _ in self._stashed if p.grad is not None]
        for p, g1 in self._stashed:
            p.grad = g1
        self._stashed = []
        if check and touched:
            raise RuntimeError(
                f"GradReg: the perturbed pass reached the gradient of {len(touched)} parameter(s) outside GR (shapes "
                f"{[tuple(p.shape) for p in touched[:3]]}) after perturb(keep_untouched=True): that pass is not "
                "head-only. θ was restored and those gradients put back to g1; use perturb() without keep_untouched"
            )

    # ------------------------------------------------------------------ two-phase calls
    @transition("mark_subset")
    @torch.no_grad()
    def mark_subset(self, fraction: float) -> None:
        """Sub-batch GR: after the subset's backward (``.grad`` = g1_S), save g1_S; ``fraction`` = |S|/|B|."""
        _check_fraction(fraction)
        if self.settings.lean or self.settings.estimator == "exact":
            raise RuntimeError("GradReg.mark_subset: sub-batch GR needs lean=False and a finite-difference estimator")
        have = [t for t in self.candidates() if t.grad is not None]
        shards = self.source.shards(have, self.settings.estimator)
        copies = torch._foreach_mul([shards.local(p.grad).detach() for p in have], 1.0) if have else []
        self._subset = dict(zip(self.positions(have), copies))
        self._subset_fraction = float(fraction)
        self.phase = MARKED

    @property
    def subset_fraction(self) -> float | None:
        return None if self._subset is None else self._subset_fraction

    @transition("set_subset_fraction")
    def set_subset_fraction(self, fraction: float) -> None:
        _check_fraction(fraction)
        self._subset_fraction = float(fraction)

    @transition("perturb")
    @torch.no_grad()
    def perturb(self, keep_untouched: bool = False) -> None:
        """After the backward(s) at θ: save g1, zero the GR gradients, move θ to the next perturbed point."""
        if self.settings.estimator == "exact":
            raise RuntimeError("GradReg(estimator='exact') has no perturbed pass: call step() after the backward")
        if not self.active:
            raise RuntimeError("GradReg.perturb(): GR is inactive this step (warmup, γ = 0 or between `every` "
                               "steps); check opt.active")
        if self.phase == PERTURBED and self._point >= self.extra_passes:
            raise RuntimeError("GradReg.perturb() called too often: this step's perturbed passes were done; the step "
                               "was aborted (θ restored, gradients back to g1)")
        if self.phase != PERTURBED:
            plan = self._make_plan()
            if not plan.params:
                raise RuntimeError("GradReg.perturb(): no GR parameter has a gradient: run backward first, or check "
                                   "`exclude` and gr_enabled (every parameter with a gradient is excluded)")
            self._plan, self._point = plan, 0
            self.phase = PERTURBED  # from here on an abort restores what the backend saved
            if keep_untouched:
                self._stash(plan)
            if self.settings.reuse != "none":
                self.reuse.capture(plan.params, self.positions(plan.params), plan.shards)
            self._subset_residual(plan)
        else:
            self.source.refresh(self._plan)
            self._subset_estimate(self._plan)
        plan = self._plan
        plan.shards.before_write(plan.params)
        try:
            self._backend_for(plan).perturb(plan, self._point)
        finally:
            self.source.publish()
        self._point += 1

    @transition("restore_and_combine")
    @torch.no_grad()
    def restore_and_combine(self) -> None:
        """After the backward(s) at θ': θ back bitwise, ``.grad`` ← the GR gradient (keep parameters: g1)."""
        if self._point < self.extra_passes:
            raise RuntimeError(f"GradReg.restore_and_combine(): expected {self.extra_passes} perturb() call(s) "
                               f"first, got {self._point}; the step was aborted (θ restored, gradients back to g1)")
        plan = self._plan
        self._unstash(check=True)
        self.source.refresh(plan)
        self._subset_estimate(plan)
        plan.shards.before_write(plan.params)
        backend = self._backend_for(plan)
        try:
            backend.restore_and_combine(plan)
        finally:
            self.source.publish()
        _drop_new_grads(plan)
        self._after_combine(backend.metrics, plan)

    def _after_combine(self, metrics: dict[str, torch.Tensor], plan: StepPlan) -> None:
        self._full = True
        self._metrics = dict(metrics)
        self._finite = metrics["finite"]
        self.phase = COMBINED
        self._subset = None
        if self.settings.reuse != "none":
            self._metrics.update(self.reuse.store(plan.params, self.positions(plan.params), plan.shards,
                                                  self._finite, self._gamma_multiplier()))

    @transition("combine")
    def combine(self) -> None:
        """After the step's backward pass(es), before a clip and the base step: ``.grad`` becomes the gradient
        the base optimizer steps with (full step: the GR gradient; exact: g1 + γ·H·v; a step between full steps
        with reuse: g1 + the reused correction; otherwise g1, with its diagnostics recorded). Idempotent."""
        if self.phase == PERTURBED:
            self.restore_and_combine()
        elif self.phase == IDLE:
            if self.needs_graph:
                self._combine_exact()
            elif self.active:
                raise RuntimeError("GradReg.combine() on a full GR step without perturb(): the step would be plain "
                                   "g1. Call perturb() and the backward at θ' first (or use step(closure))")
            else:
                self._observe_g1()
                if self.reusing:
                    self._apply_reuse()
                self.phase = COMBINED

    @torch.no_grad()
    def _apply_reuse(self) -> None:
        have = [t for t in self.candidates() if t.grad is not None]
        shards = self.source.shards(have, self.settings.estimator)
        metrics, self._g1_copy = self.reuse.apply(have, self.positions(have), self._gamma_multiplier(), shards)
        self._metrics.update(metrics)

    @torch.no_grad()
    def _observe_g1(self) -> None:
        """``g1_norm`` of a step without a perturbed pass, from ``.grad`` now (before any caller's clip)."""
        have = [t for t in self.candidates() if t.grad is not None]
        shards = self.source.shards(have, self.settings.estimator)
        gr = [shards.local(p.grad) for p in have]
        n1 = global_norm(gr, accum_dtype(gr), shards).to(gr[0].device) if gr else torch.zeros(())
        nan = torch.full_like(n1, float("nan"))
        self._metrics = {"g1_norm": n1, "g2_norm": nan, "gr_rel": torch.zeros_like(n1), "perturb_ratio": nan}

    def _combine_exact(self) -> None:
        """Exact estimator: H·v by double backprop from the graph kept in ``.grad``; ``.grad`` ← g1 + γ·H·v."""
        plan = self._make_plan()
        grads = [p.grad for p in plan.params]
        # A gradient without a graph is constant in θ (a parameter the loss is linear in): its term of
        # H·v = ∇(g·v) is zero. Not one with a graph: the backward did not keep it.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            raise RuntimeError("GradReg(estimator='exact') needs the graph of the gradient: call "
                               "loss.backward(create_graph=True) (or opt.backward(loss)) in the closure / before "
                               "step()")
        backend = self._backend_for(plan)
        with torch.no_grad():
            scale = backend.clip_scale_g1(plan)
        v = [(grads[i].detach() * scale).to(grads[i].dtype) for i in live]
        try:
            hvp = torch.autograd.grad([grads[i] for i in live], plan.params, grad_outputs=v, allow_unused=True)
        except RuntimeError as err:
            raise RuntimeError(
                "GradReg(estimator='exact'): the model's ops cannot double-backward (" + str(err).split("\n")[0]
                + "). Use estimator='forward' or 'central', or ops with double-backward support "
                "(e.g. attn_implementation='eager')."
            ) from err
        for p in plan.params + plan.keep:
            p.grad = p.grad.detach()  # drop the graph (exact mode only: the only place .grad is rebound)
        with torch.no_grad():
            self._plan = plan
            self._g1_copy = [(p.grad, p.grad.clone()) for p in plan.params]
            hvp = [torch.zeros_like(p) if h is None else h for p, h in zip(plan.params, hvp)]
            if self.settings.reuse != "none":
                self.reuse.capture(plan.params, self.positions(plan.params), plan.shards)
            backend.combine_hvp(plan, hvp)
            self._after_combine(backend.metrics, plan)

    # ------------------------------------------------------------------ the base step
    @transition("finish")
    def finish(self, base_step: Callable[[], Any]) -> Any:
        """End the step: combine if still pending (a plain step: g1's diagnostics and any reused correction), vote
        on finiteness (one host read; every rank agrees), then ``base_step()`` unless a gradient it would step with
        is not finite. Any exception (the base step's included) aborts: ``.grad`` back to g1, the step not counted."""
        if self.phase == PERTURBED:
            self.restore_and_combine()
        if self.phase == IDLE:
            if self.active and self.settings.estimator != "exact":
                raise RuntimeError(
                    "GradReg.step() needs a closure (re-evaluating the loss at θ + ε·g1), or the two-phase API: "
                    "backward, opt.perturb(), backward again, opt.step()")
            self.combine()
        host = self._host_read()
        out = None
        if host is not None and not host["finite"] and self.settings.skip_nonfinite:
            warnings.warn(
                f"GradReg: non-finite gradient at step {self.step_count} (inf/NaN in a gradient the base optimizer "
                "would step with); the step was skipped and the parameters are unchanged", RuntimeWarning,
                stacklevel=4)
        else:
            out = base_step()
        self._last_factor, self._last_gamma = self.factor(), self.strength  # the γ this step used: before _adapt
        self.reuse.commit()
        self._taken = self._metrics
        if host is not None:
            self._adapt(host)
        self.step_count += 1
        self._go_idle()
        return out

    def _host_read(self) -> dict[str, float] | None:
        """The one host read of a step: the finite flag over every gradient the base step uses, with gr_rel and
        perturb_ratio in the same transfer (for the adaptive strength and the diagnostics)."""
        gr_step = self._full
        if not self.settings.skip_nonfinite and not (self.auto and gr_step):
            return None
        have = self.source.step_tensors()
        finite = _vote(have, self.source.shards(have, self.settings.estimator))
        if self._finite is not None:
            finite = finite & self._finite.to(finite.device)
        if self.settings.skip_nonfinite:
            self._skipped = (~finite).long() + (0 if self._skipped is None else self._skipped.to(finite.device))
        parts = [finite.to(torch.float64)]
        if gr_step:
            parts += [self._metrics[k].detach().to(device=finite.device, dtype=torch.float64).reshape(())
                      for k in ("gr_rel", "perturb_ratio")]
        values = torch.stack(parts).tolist()  # the documented read
        out = {"finite": values[0] == 1.0}
        if gr_step:
            out.update(gr_rel=values[1], perturb_ratio=values[2], low_precision=self._low_precision())
        return out

    def _low_precision(self) -> bool:
        return any(w.dtype in (torch.bfloat16, torch.float16) for w in self._plan.weights())

    def _adapt(self, host: dict[str, float]) -> None:
        """After a step's read: the adaptive strength's update (full GR steps only) and the diagnostics."""
        if "gr_rel" not in host or not host["finite"]:
            return
        if self.controller is not None:
            self.controller.update(host["gr_rel"])
        self._watch.observe(host, auto=self.auto, eps_mode=self.settings.eps_mode, estimator=self.settings.estimator)

    # ------------------------------------------------------------------ sub-batch arithmetic
    def _subset_residual(self, plan: StepPlan) -> None:
        """At θ (``.grad`` = g1): the subset buffers become D = g1_S − f·g1."""
        if self._subset is None:
            return
        f, local = self._subset_fraction, plan.shards.local
        pos = self.positions(plan.params)
        saved = [(p, i) for p, i in zip(plan.params, pos) if i in self._subset]
        if saved:
            torch._foreach_add_([self._subset[i] for _, i in saved], [local(p.grad) for p, _ in saved], alpha=-f)
        fresh = [(p, i) for p, i in zip(plan.params, pos) if i not in self._subset]  # no gradient from S: D = −f·g1
        if fresh:
            self._subset.update(zip([i for _, i in fresh], torch._foreach_mul([local(p.grad) for p, _ in fresh], -f)))

    def _subset_estimate(self, plan: StepPlan) -> None:
        """At a perturbed point (``.grad`` = g_S there): ``.grad`` ← (g_S − D)/f = g1 + (g_S − g1_S)/f."""
        if self._subset is None:
            return
        have = [(p, i) for p, i in zip(plan.params, self.positions(plan.params)) if p.grad is not None]
        if have:
            grads = [plan.shards.local(p.grad) for p, _ in have]
            torch._foreach_sub_(grads, [self._subset[i] for _, i in have])
            if self._subset_fraction != 1.0:
                torch._foreach_mul_(grads, 1.0 / self._subset_fraction)

    # ------------------------------------------------------------------ metrics and state
    def metrics(self, sync: bool = True) -> dict[str, Any]:
        """Diagnostics of the last step taken (see ``GradReg.metrics``)."""
        out: dict[str, Any] = {k: v for k, v in self._metrics.items() if k != "finite"}
        if self._skipped is not None:
            out["skipped"] = self._skipped
        if sync:
            out = {k: float(v) for k, v in out.items()}
            out.setdefault("skipped", 0.0)
        out["strength"] = self._last_gamma * self._last_factor
        out["step"] = self.step_count
        return out

    def extra_bytes(self) -> int:
        held = 0 if self.backend is None else self.backend.extra_bytes()
        return held + self.reuse.extra_bytes()

    def state_dict(self) -> dict[str, Any]:
        """GR's own state: step counter, skip count, last factor, the stored correction (by position) and the
        adaptive strength. Positions, not tensor identities: a copy, a checkpoint or a host that swaps the
        parameter objects resumes it."""
        sd: dict[str, Any] = {
            "step": self.step_count,
            "skipped": int(self._skipped.sum()) if self._skipped is not None else 0,
            "last_factor": self._last_factor,
            "last_gamma": self._last_gamma,
        }
        if self.settings.reuse != "none":
            sd["reuse"] = self.reuse.state()
        if self.controller is not None:
            sd["strength"] = self.controller.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.abort()
        self.step_count = int(sd["step"])
        self._skipped = torch.tensor(int(sd["skipped"])) if sd.get("skipped") else None
        self._last_factor = float(sd.get("last_factor", 0.0))
        self._last_gamma = float(sd.get("last_gamma", self.strength))
        entries = self.source.entries()
        if self.controller is not None and sd.get("strength") is not None:
            self.controller.load_state_dict(sd["strength"])
        legacy = float(sd.get("reuse_factor", 1.0))  # 0.2.0 kept factor × global γ beside the correction
        if self.controller is None and self.strength != 0:
            legacy /= self.strength
        self.reuse.load(sd.get("reuse"), [e.tensor for e in entries], legacy)
        self.backend = None

    def __getstate__(self) -> dict[str, Any]:
        if self.phase != IDLE:
            raise RuntimeError(f"GradReg cannot be copied or pickled while a step is {self.phase}: finish it with "
                               "step() or abort it with restore() first (θ would be saved perturbed)")
        return {**self.__dict__, "backend": None}  # a copy makes its own buffers at its first step


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"GradReg.mark_subset: fraction must be in (0, 1], got {fraction!r}")


def _drop_new_grads(plan: StepPlan) -> None:
    """Parameters without a gradient at θ are left alone: a gradient a perturbed pass gave them is dropped."""
    for p in plan.absent:
        p.grad = None


def _vote(tensors: list[torch.Tensor], shards: Shards) -> torch.Tensor:
    """0-d bool device tensor: every element of every gradient is finite, on every process (all ranks agree)."""
    finite = all_finite([shards.local(t.grad) for t in tensors])
    if shards.sharded:
        finite = shards.sum_across((~finite).to(torch.float32)) == 0
    return finite
