"""``GradReg`` driven through random sequences of its public calls (``hypothesis.stateful``), on every backend.

The machine mixes whole steps (``step(closure)``), the two-phase calls in and out of order (``perturb``,
``restore_and_combine``, ``combine``, ``restore``, ``step()``), the sub-batch calls (``mark_subset``,
``subset_fraction``), exceptions in the caller's loss and in the base optimizer's step, non-finite (NaN) and huge
finite (3e19) gradients, ``state_dict``/``load_state_dict`` and ``copy.deepcopy``, ``perturb(keep_untouched=True)``
(head-only GR's promise, broken by a pass that reaches the parameter outside GR); with ``every`` 1 and 3, reuse off
and on, the forward and central estimators, a fixed and the adaptive strength, warmup, fp32 and bf16 weights.

It keeps its own model of the phase (which calls are legal now) and checks after every call:

- a legal call is accepted and an illegal one refused (class 11: combine() without perturb(); class 4: sub-batch
  calls out of order);
- outside a step (idle), θ is bit for bit what the last step taken left (a refused or aborted call, a skipped step,
  a state-dict round trip or a copy change nothing);
- after any abort, ``.grad`` is bit for bit g1 (what the backward(s) at θ left) and ``metrics()`` are the last step
  taken's again;
- no non-finite value ever reaches θ, and a step is skipped exactly when a gradient it steps with is not finite;
- the next clean step equals, bit for bit, that of a fresh GradReg over a copied model loaded with the state dict
  (the rule ``fresh_twin_agrees``), and a deep copy's step equals the original's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from gr_helpers import BACKENDS
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from grkernels import GradReg

HUGE = 3e19  # a gradient element this size: Σg² overflows fp32, the element does not
_FAULT = {"base": False}  # the base optimizer's step raises while set (a module global: copies share it)


class Injected(Exception):
    """An exception raised on purpose in the caller's loss or in the base optimizer's step."""


class FlakyAdam(torch.optim.Adam):
    """Adam whose step raises while ``_FAULT["base"]`` is set (survives deepcopy and state-dict round trips).
    Adam's steps are bounded by ~lr whatever the gradient, so a huge finite gradient does not blow θ up."""

    def step(self, closure=None):
        if _FAULT["base"]:
            raise Injected("base optimizer step")
        return super().step(closure)


class Net(nn.Module):
    """A tiny tanh MLP, plus ``aux``: a parameter only in a linear loss term, where the huge gradients go (so a
    3e19 gradient moves aux alone and the run stays finite)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.aux = nn.Parameter(0.1 * torch.randn(3))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


_G = torch.Generator().manual_seed(5)
X, Y, W = torch.randn(8, 3, generator=_G), torch.randn(8, 2, generator=_G), torch.randn(3, generator=_G)
ROWS = {"all": slice(0, 8), "subset": slice(0, 2), "rest": slice(2, 8)}
INJECT = st.sampled_from(["none", "none", "none", "nan", "huge"])


def loss_of(model: Net, part: str = "all", inject: str = "none") -> torch.Tensor:
    """The batch mean over ``part``'s rows, normalised as over the whole batch (sub-batch GR's convention), plus the
    aux term; ``inject``: "nan" makes every gradient NaN, "huge" gives aux a gradient of 3e19 per element."""
    rows = ROWS[part]
    x, y = X[rows].to(model.lin1.weight.dtype), Y[rows].to(model.lin1.weight.dtype)
    share = x.shape[0] / X.shape[0]
    loss = (model(x) - y).square().mean() * share
    aux = (model.aux * W.to(model.aux.dtype)).sum() * share
    loss = loss + aux * (HUGE if inject == "huge" else 1e-2)
    return loss * float("nan") if inject == "nan" else loss


def params(model: Net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def grads(model: Net) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    """Bit for bit (NaN patterns included), None matching None."""
    def eq(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))


def _nonfinite(gs: list[torch.Tensor | None]) -> bool:
    return any(g is not None and not bool(g.isfinite().all()) for g in gs)


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


class GRMachine(RuleBasedStateMachine):
    """The phase model: ``idle``, ``marked`` (a subset's g1 saved), ``perturbed`` (``points`` perturb() calls made,
    ``backward`` since the last one), ``combined``."""

    BACKEND = "torch"

    def __init__(self) -> None:
        super().__init__()
        _FAULT["base"] = False
        self.model: Net | None = None

    # ------------------------------------------------------------------ set-up
    @initialize(every=st.sampled_from([1, 3]), reuse=st.sampled_from(["none", "orthogonal"]),
                estimator=st.sampled_from(["forward", "forward", "central", "exact"]),
                strength=st.sampled_from([0.5, 0.5, "auto"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
                warmup=st.sampled_from([0, 0, 2]))
    def build(self, every, reuse, estimator, strength, dtype, warmup):
        self.kw = dict(strength=strength, eps=1e-2, every=every, reuse=reuse, estimator=estimator,
                       backend=self.BACKEND, g1_clip=1.0, g2_clip=1.0, warmup_steps=warmup)
        self.model = Net(dtype)
        self.opt = self._wrap(self.model)
        self._idle()
        self._settle()

    def _wrap(self, model: Net) -> GradReg:
        """GR on every parameter but lin1's bias (a group with GR off: a "keep" parameter, g1 bitwise)."""
        keep = [model.lin1.bias]
        rest = [p for p in model.parameters() if p is not model.lin1.bias]
        groups = [{"params": rest}, {"params": keep, "gr_enabled": False}]
        return GradReg(FlakyAdam(groups, lr=1e-2), **self.kw)

    def _idle(self) -> None:
        """The phase model back at idle: no perturb() made, no backward at θ or θ' yet, no subset marked."""
        self.phase, self.points, self.backward, self.subset = "idle", 0, False, False
        self.backward_done, self.last_part = False, None
        self.keep = self.touched = False  # perturb(keep_untouched=True); a backward at θ' reached the keep bias

    def _settle(self) -> None:
        """The state a step starts from: θ, g1 (the gradients now), the metrics and counters of the last step."""
        self.theta, self.g1 = params(self.model), grads(self.model)
        self.m0 = self.opt.metrics()
        self.steps, self.skips = self.m0["step"], self.m0["skipped"]
        self.nan_g1, self.nan_g2 = _nonfinite(self.g1), False  # a step without a backward steps with .grad as is

    # ------------------------------------------------------------------ checking one call
    def _call(self, name: str, legal: bool, fn, *, injected: bool = False) -> bool:
        """Run ``fn`` (a GradReg call); it must be refused (RuntimeError/ValueError, then everything as after an
        abort) exactly when ``legal`` is False; an ``Injected`` exception must come out when ``injected``."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except Injected:
            event(f"{self.phase} {name}: injected exception, aborted")
            assert injected, "an injected exception where none was expected"
            self._aborted()
            return False
        except (RuntimeError, ValueError) as err:
            event(f"{self.phase} {name}: refused")
            assert not legal, f"a legal call was refused: {err}"
            self._aborted()
            return False
        event(f"{self.phase} {name}: accepted")
        assert legal, f"an illegal call in phase {self.phase} was accepted"
        assert not injected, "the injected exception did not come out"
        return True

    def _aborted(self) -> None:
        """After any abort: idle, θ and g1 bit for bit, the last step's metrics, nothing counted."""
        assert self.opt.engine.phase == "idle"
        assert same(params(self.model), self.theta), "θ not restored bitwise"
        assert same(grads(self.model), self.g1), ".grad is not g1 after an abort"
        assert same_metrics(self.opt.metrics(), self.m0), "an aborted step changed the metrics"
        self._idle()
        self.nan_g1, self.nan_g2 = _nonfinite(self.g1), False

    def _stepped(self, full: bool) -> None:
        """After a step that completed: counted; skipped exactly when a gradient it stepped with (``.grad`` now)
        is not finite, and always when a NaN was injected into g1 or, on a full step, into g2 (then θ unchanged bit
        for bit); a huge finite gradient alone skips nothing."""
        m = self.opt.metrics()
        assert m["step"] == self.steps + 1
        skipped = m["skipped"] - self.skips
        assert skipped == float(_nonfinite(grads(self.model))), "skipped with finite gradients, or the reverse"
        if self.nan_g1 or (full and self.nan_g2):
            assert skipped == 1.0, "a NaN gradient did not skip the step"
        if skipped:
            assert same(params(self.model), self.theta)
        self._idle()
        self._settle()

    @property
    def passes(self) -> int:
        return 2 if self.kw["estimator"] == "central" else 1

    @property
    def exact(self) -> bool:
        return self.kw["estimator"] == "exact"

    def _gr_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p is not self.model.lin1.bias and p.grad is not None]

    def _plain_combine_ok(self) -> bool:
        """combine() / step() from idle: a plain (or reuse) step, or the exact estimator's H·v, which needs the
        graph of the gradients (``opt.backward`` keeps it while GR is active; aux's gradient, constant in θ, has
        none)."""
        if not self.opt.active:
            return True
        gr = self._gr_grads()
        return self.exact and any(g.requires_grad for g in gr)

    def _has_grad(self) -> bool:
        return any(p.grad is not None for p in self.model.parameters())

    def _full_ready(self) -> bool:
        """The combine may run: every perturbed point made, and no keep_untouched promise broken (every backward
        here reaches the keep bias, so after perturb(keep_untouched=True) one at θ' makes the combine an error)."""
        return self.phase == "perturbed" and self.points == self.passes and not (self.keep and self.touched)

    # ------------------------------------------------------------------ whole steps
    @rule(inject=st.sampled_from(["none", "none", "nan_g1", "nan_g2", "huge", "raise_first", "raise_second",
                                  "base"]))
    def step_closure(self, inject):
        legal = self.phase == "idle"
        full, calls = self.opt.active, []

        def closure():
            calls.append(1)
            first = len(calls) == 1
            kind = {"nan_g1": "nan" if first else "none", "nan_g2": "none" if first else "nan",
                    "huge": "huge"}.get(inject, "none")
            loss = loss_of(self.model, "all", kind)
            self.opt.backward(loss)  # create_graph=True for the exact estimator
            if first:
                self.g1 = grads(self.model)  # what an abort must put back
                self.nan_g1 = kind == "nan"
            else:
                self.nan_g2 = self.nan_g2 or kind == "nan"
            if inject == "raise_first" and first or inject == "raise_second" and not first:
                raise Injected("caller's loss")
            return loss

        # with inject == "base" no NaN is injected, so the base step runs (and raises)
        second = self.opt.extra_passes > 0  # the closure runs again at θ' (not for the exact estimator)
        fires = legal and (inject in ("raise_first", "base") or (inject == "raise_second" and second))
        if legal:
            self.nan_g2 = False
        _FAULT["base"] = inject == "base"
        try:
            ok = self._call(f"step(closure, {inject})", legal, lambda: self.opt.step(closure), injected=fires)
        finally:
            _FAULT["base"] = False
        if ok:
            self._stepped(full)

    # ------------------------------------------------------------------ the two-phase calls
    @rule(part=st.sampled_from(["all", "subset", "rest"]), inject=INJECT)
    def backward_at_theta(self, part, inject):
        """The caller's backward at θ (a new step from idle: zero_grad first; after mark_subset: the rest)."""
        if self.phase not in ("idle", "marked"):
            return
        if self.phase == "idle":
            self.opt.zero_grad()
        self.opt.backward(loss_of(self.model, part, inject))
        self.g1 = grads(self.model)
        self.backward_done, self.last_part = True, part
        self.nan_g1 = _nonfinite(self.g1)

    @rule(inject=INJECT, fail=st.sampled_from([False, False, False, True]))
    def backward_at_theta_prime(self, inject, fail):
        """The caller's backward at θ' (the subset only after mark_subset); ``fail``: the loss raises after its
        backward, and the caller aborts with restore() as every host does."""
        if self.phase != "perturbed" or self.backward:
            return
        loss_of(self.model, "subset" if self.subset else "all", inject).backward()
        if fail:
            self.opt.restore()
            self._aborted()
            return
        self.backward, self.touched = True, self.keep
        self.nan_g2 = self.nan_g2 or inject == "nan"

    @rule(keep=st.sampled_from([False, False, True]))
    def perturb(self, keep=False):
        first = self.phase in ("idle", "marked")
        legal = self.opt.active and not self.exact and (
            (first and self._has_grad()) or (self.phase == "perturbed" and self.points < self.passes))
        if self._call(f"perturb(keep_untouched={keep})", legal, lambda: self.opt.perturb(keep)):
            self.phase, self.points, self.backward = "perturbed", self.points + 1, False
            self.keep = self.keep or (first and keep)  # the first perturb() of a step decides

    @rule()
    def restore_and_combine(self):
        if self._call("restore_and_combine", self._full_ready(), self.opt.restore_and_combine):
            self.phase = "combined"

    @rule()
    def combine(self):
        legal = self._full_ready() or self.phase == "combined" or (self.phase == "idle" and self._plain_combine_ok())
        if self._call("combine", legal, self.opt.combine):
            self.phase = "combined"

    @rule(base_fails=st.booleans())
    def step_two_phase(self, base_fails):
        full = self.opt.active
        legal = self._full_ready() or self.phase == "combined" or (self.phase == "idle" and self._plain_combine_ok())
        skip = self.nan_g1 or (full and self.nan_g2)
        _FAULT["base"] = base_fails
        try:
            ok = self._call(f"step(base_fails={base_fails})", legal, self.opt.step,
                            injected=legal and base_fails and not skip)
        finally:
            _FAULT["base"] = False
        if ok:
            self._stepped(full)

    @rule()
    def restore(self):
        self.opt.restore()
        self._aborted()

    @rule(fraction=st.sampled_from([0.25, 0.25, 1.0, 0.0, 1.5]))
    def mark_subset(self, fraction):
        legal = self.phase == "idle" and 0 < fraction <= 1 and not self.exact
        if self._call(f"mark_subset({fraction})", legal, lambda: self.opt.mark_subset(fraction)):
            self.phase, self.subset, self.backward_done = "marked", True, False

    @rule(fraction=st.sampled_from([0.5, 2.0]))
    def set_subset_fraction(self, fraction):
        legal = self.phase == "marked" and fraction <= 1

        def set_it():
            self.opt.subset_fraction = fraction

        self._call(f"subset_fraction = {fraction}", legal, set_it)

    def _advance(self, data):
        """The natural next call of a two-phase step (so that whole steps, sub-batch ones included, happen often
        among the out-of-order calls the other rules make)."""
        if self.phase == "idle":
            if not self.backward_done:
                part = data.draw(st.sampled_from(["all", "all", "subset"]), label="part")
                self.backward_at_theta(part, data.draw(INJECT, label="inject"))
            elif self.last_part == "subset" and not self.exact:
                self.mark_subset(0.25)
            elif self.opt.active and not self.exact:
                self.perturb()
            else:
                self.step_two_phase(False)
        elif self.phase == "marked":
            if not self.backward_done:
                self.backward_at_theta("rest", data.draw(INJECT, label="inject"))
            else:
                self.perturb()
        elif self.phase == "perturbed":
            if not self.backward:
                self.backward_at_theta_prime(data.draw(INJECT, label="inject"), False)
            elif self.points < self.passes:
                self.perturb()
            else:
                self.step_two_phase(False)
        else:
            self.step_two_phase(False)

    advance = rule(data=st.data())(_advance)  # registered three times: a third of the calls move a step on
    advance_2 = rule(data=st.data())(_advance)
    advance_3 = rule(data=st.data())(_advance)

    # ------------------------------------------------------------------ state, copies, twins
    @rule()
    def state_dict_round_trip(self):
        """load_state_dict(state_dict()) in any phase: a pending step is aborted, nothing else changes."""
        sd = copy.deepcopy(self.opt.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt.load_state_dict(sd)
        self._aborted()
        assert self.opt.metrics()["step"] == self.steps

    @rule()
    def deepcopy(self):
        """A copy mid-step is refused and changes nothing; an idle copy replaces the original (and must behave
        like it: the invariants and the fresh-twin rule keep checking the copy from here on)."""
        before = self.opt.engine.phase
        if self.phase != "idle":
            with pytest.raises(RuntimeError, match="copied"):
                copy.deepcopy((self.model, self.opt))
            assert self.opt.engine.phase == before
            return
        model, opt = copy.deepcopy((self.model, self.opt))
        assert same(params(model), self.theta) and same_metrics(opt.metrics(), self.m0)
        opt.state_dict()  # keyed by position: works on the copy
        self._next_steps_agree(model, opt)
        self.model, self.opt = model, opt  # the copy carries on
        self._settle()

    @precondition(lambda self: self.model is not None and self.phase == "idle")
    @rule()
    def fresh_twin_agrees(self):
        """The next clean step equals that of a fresh GradReg over a copied model loaded with the state dict."""
        twin = copy.deepcopy(self.model)
        twin_opt = self._wrap(twin)
        twin_opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        self._next_steps_agree(twin, twin_opt)

    def _next_steps_agree(self, twin: Net, twin_opt: GradReg) -> None:
        """One clean step(closure) on the machine's optimizer and on ``twin_opt``: bit for bit the same."""
        full = self.opt.active
        assert twin_opt.active == full and twin_opt.reusing == self.opt.reusing

        def closure_of(model, opt):
            def closure():
                loss = loss_of(model)
                opt.backward(loss)
                return loss
            return closure

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt.step(closure_of(self.model, self.opt))
            twin_opt.step(closure_of(twin, twin_opt))
        self.nan_g1 = self.nan_g2 = False
        assert same(params(self.model), params(twin)), "a fresh optimizer from the state dict steps differently"
        assert same(grads(self.model), grads(twin))
        assert same_metrics(self.opt.metrics(), twin_opt.metrics())
        self._stepped(full)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def theta_is_finite(self):
        if self.model is not None:
            assert all(bool(p.isfinite().all()) for p in self.model.parameters()), "a non-finite value in θ"

    @invariant()
    def phase_matches_the_model(self):
        if self.model is None:
            return
        assert self.opt.engine.phase == self.phase
        if self.phase == "idle":
            assert same(params(self.model), self.theta), "θ moved outside a step"


def _case(backend: str, examples: int, steps: int) -> type:
    """The machine on ``backend`` as a test case, skipped where gr_helpers.BACKENDS skips that backend."""
    machine = type(f"GRMachine_{backend}", (GRMachine,), {"BACKEND": backend})
    case = machine.TestCase
    case.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                             suppress_health_check=list(HealthCheck))
    for entry in BACKENDS:
        if getattr(entry, "values", (entry,))[0] == backend:
            for mark in getattr(entry, "marks", ()):
                case = mark(case)
    return case


# Triton runs under its CPU interpreter here: fewer, shorter sequences.
TestTorchBackend = _case("torch", 40, 40)
TestCppBackend = _case("cpp", 25, 40)
TestTritonBackend = _case("triton", 10, 30)
