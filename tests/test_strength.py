"""The adaptive strength (``GradReg(strength="auto", target_rel=ρ*)``, ``grkernels.strength``).

The analytic check: on L = ½θᵀHθ with the learning rate 0 (θ fixed) and clips inactive, every estimator's correction
is GR − g1 = γ·H·g1 exactly (a quadratic's finite differences have no truncation error), so gr_rel = γ·r with
r = ‖H·g1‖/‖g1‖ known in closed form, and the controller's rule log γ ← log γ + k·(log ρ* − log(γ·r)) gives
γ_n = γ*·(γ_0/γ*)^((1−k)^n), γ* = ρ*/r: the error in log γ shrinks by |1 − k| per full GR step.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from gr_helpers import BACKENDS, GradCapture, bitwise_equal, make_closure, regression_batch, tanh_mlp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from grkernels import GradReg
from grkernels.strength import DEFAULT_INIT, StrengthController

GAIN = 0.5  # the controller's default gain k


def spd(n: int, seed: int, cond: float = 30.0) -> torch.Tensor:
    """A random symmetric positive definite float64 matrix with eigenvalues in [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return (q * eig) @ q.T


class Quadratic:
    """L = s·½θᵀHθ over parameters (float64 tensors, one or more groups), θ = the concatenation of the parameters;
    ‖g1‖ ≤ 1: the clips at 10 are inactive."""

    def __init__(self, sizes: tuple[int, ...] = (7, 4), seed: int = 0, block: bool = False) -> None:
        g = torch.Generator().manual_seed(seed + 100)
        self.params = [torch.nn.Parameter(0.03 * torch.randn(n, generator=g, dtype=torch.float64)) for n in sizes]
        n = sum(sizes)
        if block:  # block-diagonal: each parameter's correction depends on it alone
            self.H = torch.block_diag(*[spd(k, seed + i) for i, k in enumerate(sizes)])
        else:
            self.H = spd(n, seed)
        self.scale = 1.0

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach() for p in self.params])

    def loss(self, H: torch.Tensor | None = None) -> torch.Tensor:
        th = torch.cat(list(self.params))
        return self.scale * 0.5 * th @ (self.H if H is None else H) @ th

    def g1(self) -> torch.Tensor:
        """∇L by autograd (bitwise what a backward gives)."""
        return torch.cat(torch.autograd.grad(self.loss(), self.params))

    def r(self, H_part: torch.Tensor | None = None, f: float = 1.0) -> float:
        """‖H_part·g1‖/(f·‖g1‖), g1 = s·H·θ: gr_rel per unit γ (clips inactive), computed here in float64."""
        g1 = self.scale * self.H @ self.theta()
        hv = (self.H if H_part is None else self.scale * H_part) @ g1
        return float(hv.norm() / (f * g1.norm()))

    def closure(self, opt: GradReg | None = None):
        def run() -> torch.Tensor:
            loss = self.loss()
            if opt is not None and opt.needs_graph:
                opt.backward(loss)
            else:
                loss.backward()
            return loss

        return run


def auto_opt(q: Quadratic, target: float, init: float | None, **kw) -> GradReg:
    base = torch.optim.SGD([{"params": [p]} for p in q.params], lr=0.0)
    kw.setdefault("backend", "torch")
    return GradReg(base, strength="auto", target_rel=target, strength_init=init, exclude=[], **kw)


def closed_form(gamma0: float, gamma_star: float, n: int) -> float:
    return gamma_star * (gamma0 / gamma_star) ** ((1 - GAIN) ** n)


# ---------------------------------------------------------------------------------------------- the rule itself
@settings(max_examples=60, deadline=None)
@given(target=st.floats(1e-4, 1e4), init=st.floats(1e-6, 1e6),
       rels=st.lists(st.one_of(st.floats(0, 1e30, allow_subnormal=True), st.sampled_from(
           [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 1e300])), min_size=1, max_size=30))
@example(target=1.0, init=1e-6, rels=[3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0])  # exp(log 1e-8) rounded below the bound
def test_rule_is_clipped_proportional_in_log_gamma(target, init, rels):
    c = StrengthController(target, init)
    for rel in rels:
        before, n = c.gamma, c.updates
        after = c.update(rel)
        assert after == c.gamma and c.lo <= after <= c.hi and math.isfinite(after)
        if not (math.isfinite(rel) and rel > 0):  # no information about r: nothing moves
            assert after == before and c.updates == n
            continue
        assert c.updates == n + 1
        want = GAIN * (math.log(target) - math.log(rel))  # independent of the class: the rule as documented
        step = math.log(after) - math.log(before)
        assert 0.5 * (1 - 1e-12) <= after / before <= 2 * (1 + 1e-12)  # ×2 at most
        at_bound = after in (c.lo, c.hi)
        if abs(want) < math.log(2) - 1e-9 and not at_bound:
            assert step == pytest.approx(want, rel=1e-9, abs=1e-12)
        elif not at_bound:
            assert step == pytest.approx(math.copysign(math.log(2), want), rel=1e-9)


def test_controller_refuses_bad_settings():
    with pytest.raises(ValueError, match="target"):
        StrengthController(0.0)
    with pytest.raises(ValueError, match="target"):
        StrengthController(math.nan)
    with pytest.raises(ValueError, match="gain"):
        StrengthController(0.3, gain=2.0)
    with pytest.raises(ValueError, match="max_step"):
        StrengthController(0.3, max_step=0.0)
    with pytest.raises(ValueError, match="bounds"):
        StrengthController(0.3, init=1e9)
    assert StrengthController(0.3).gamma == pytest.approx(DEFAULT_INIT)
    with pytest.raises(ValueError, match="target_rel"):
        GradReg(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), strength="auto", target_rel=-1.0)
    with pytest.raises(ValueError, match="strength"):
        GradReg(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), strength="adaptive")


# ---------------------------------------------------------------------------------------------- the analytic check
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["forward", "central", "exact"])
def test_converges_to_the_target_on_a_quadratic_in_closed_form(estimator, backend):
    q = Quadratic(seed=3)
    target = 0.37
    gamma_star = target / q.r()
    gamma0 = gamma_star * 3.1  # within ×4 of γ*: the ×2 clip is inactive from the first step
    opt = auto_opt(q, target, gamma0, estimator=estimator, backend=backend)
    theta0 = q.theta().clone()
    for n in range(30):
        opt.step(q.closure(opt))
        m = opt.metrics()
        want = closed_form(gamma0, gamma_star, n)
        assert m["strength"] == pytest.approx(want, rel=1e-9)  # the γ this step used, in closed form
        assert m["gr_rel"] == pytest.approx(want * q.r(), rel=1e-7)  # gr_rel = γ·r: γ was the one applied
        assert opt.strength == pytest.approx(closed_form(gamma0, gamma_star, n + 1), rel=1e-9)
    assert m["gr_rel"] == pytest.approx(target, rel=1e-7)
    assert torch.equal(q.theta(), theta0)  # lr 0: θ restored bitwise every step


def test_far_start_moves_by_exactly_two_then_contracts_geometrically():
    q = Quadratic(seed=5)
    target = 50.0
    gamma_star = target / q.r()
    opt = auto_opt(q, target, None)  # γ_0 = 1e-2, far below γ*
    assert gamma_star / DEFAULT_INIT > 2**6
    gammas = []
    for _ in range(40):
        opt.step(q.closure())
        gammas.append(opt.metrics()["strength"])
    clipped = [b / a for a, b in zip(gammas, gammas[1:]) if b / a > 2 * (1 - 1e-12)]
    assert len(clipped) >= 5 and all(r == pytest.approx(2.0, rel=1e-12) for r in clipped)
    errs = [abs(math.log(g / gamma_star)) for g in gammas[len(clipped) + 1:]]
    ratios = [b / a for a, b in zip(errs, errs[1:]) if a > 1e-9]
    assert ratios and all(r == pytest.approx(1 - GAIN, rel=1e-5) for r in ratios)
    assert opt.metrics()["gr_rel"] == pytest.approx(target, rel=1e-6)


# ---------------------------------------------------------------------------------------------- the defaults
def test_defaults_hold_gr_rel_at_three_with_a_radius_perturbation():
    """``GradReg(opt)`` with nothing set runs the recommended set (strength "auto", target_rel 3, radius ε 0.02).
    On the quadratic (lr 0, clips inactive) γ starts at 1e-2, doubles while far below γ* = 3/r, then contracts onto
    it: gr_rel = 3 to 1e-6, γ = γ*; and the perturbation θ' − θ has norm 0.02 whatever ‖g1‖ is."""
    q = Quadratic(seed=11)
    opt = GradReg(torch.optim.SGD([{"params": [p]} for p in q.params], lr=0.0))
    s = opt.engine.settings
    assert (s.strength, s.target_rel, s.strength_init, s.eps_mode, s.eps) == ("auto", 3.0, None, "radius", 0.02)
    gamma_star = 3.0 / q.r()
    assert gamma_star / DEFAULT_INIT > 8  # far enough that the ×2 clip acts first
    gammas = []
    for _ in range(40):
        opt.step(q.closure())
        gammas.append(opt.metrics()["strength"])
    assert gammas[0] == pytest.approx(DEFAULT_INIT, rel=1e-12) and gammas[1] == pytest.approx(2 * DEFAULT_INIT)
    assert all(b >= a * (1 - 1e-9) for a, b in zip(gammas, gammas[1:]))  # approached from below, no overshoot
    assert opt.metrics()["gr_rel"] == pytest.approx(3.0, rel=1e-6)
    assert opt.strength == pytest.approx(gamma_star, rel=1e-6)
    theta = q.theta().clone()
    for scale in (1e-3, 1.0):  # two gradient scales: the radius does not follow ‖g1‖
        q.scale = scale
        q.loss().backward()
        opt.perturb()
        assert float((q.theta() - theta).norm()) == pytest.approx(0.02, rel=1e-9)
        opt.restore()
        opt.zero_grad()
        assert torch.equal(q.theta(), theta)


def test_defaults_track_the_target_while_a_model_trains():
    """``GradReg(AdamW)`` at its defaults on a small MLP that learns (fresh batches, float32): γ moves over orders of
    magnitude from 1e-2, and the geometric mean of gr_rel over the last 20 of 60 steps is within 20% of 3 (measured
    2.94–3.05 over four seeds); at the former defaults (γ = 1e-2) it was below 0.01, where GR does nothing."""
    model = tanh_mlp(2, dtype=torch.float32)
    opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2))
    rels, gammas, losses = [], [], []
    for step in range(60):
        x, y = regression_batch(100 + step, dtype=torch.float32)
        losses.append(float(opt.step(make_closure(model, x, y)).detach()))
        m = opt.metrics()
        rels.append(m["gr_rel"])
        gammas.append(m["strength"])
    assert gammas[0] == pytest.approx(DEFAULT_INIT, rel=1e-12) and max(gammas) / min(gammas) > 50
    assert rels[0] < 0.01  # the first step, at γ = 1e-2: the old default barely acted here
    mean = math.exp(sum(math.log(r) for r in rels[-20:]) / 20)
    assert 2.4 < mean < 3.6, mean
    assert all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------------------------------------- bounded
@pytest.mark.parametrize("clip, factor", [(10.0, 2.0), (None, 0.5)])
def test_a_gradient_spike_moves_gamma_by_at_most_two(clip, factor):
    """Loss ×1e6 for one step: with g1 clipped at 10 the correction stays put while ‖g1‖ grows (gr_rel ÷1e6),
    without a clip gr_rel grows ×1e6 (H·g1 scales with the loss squared). Either way γ moves by exactly ×2 / ÷2,
    θ stays finite and unchanged, and the controller converges back."""
    q = Quadratic(seed=7)
    q.params[0].data.mul_(1e-3)
    q.params[1].data.mul_(1e-3)  # ‖g1‖ ≪ 10: the clip is inactive outside the spike
    target = 0.5
    gamma_star = target / q.r()
    opt = auto_opt(q, target, gamma_star * 1.5, g1_clip=clip, g2_clip=clip)
    for _ in range(20):
        opt.step(q.closure())
    before = opt.strength
    q.scale = 1e6
    opt.step(q.closure())
    q.scale = 1.0
    assert opt.strength / before == pytest.approx(factor, rel=1e-12)
    assert all(torch.isfinite(p).all() for p in q.params)
    for _ in range(40):
        opt.step(q.closure())
    assert opt.metrics()["gr_rel"] == pytest.approx(target, rel=1e-6)


def test_zero_and_non_finite_gradients_leave_gamma_alone():
    q = Quadratic(seed=9)
    opt = auto_opt(q, 0.3, 0.05)
    for _ in range(3):
        opt.step(q.closure())
    c = opt.engine.controller
    state = (c.log_gamma, c.updates)
    saved = [p.detach().clone() for p in q.params]
    for p in q.params:
        p.data.zero_()  # θ = 0: g1 = 0, gr_rel = 0
    for _ in range(3):
        opt.step(q.closure())
        m = opt.metrics()
        assert m["gr_rel"] == 0.0 and not math.isnan(m["strength"])
    assert (c.log_gamma, c.updates) == state
    assert all(torch.equal(p, torch.zeros_like(p)) for p in q.params)
    for p, s in zip(q.params, saved):
        p.data.copy_(s)
    q.scale = math.nan  # a NaN gradient: the step is skipped, the controller not moved
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(q.closure())
    assert (c.log_gamma, c.updates) == state
    assert all(torch.equal(p, s) for p, s in zip(q.params, saved))


# ---------------------------------------------------------------------------------------------- every mode
@pytest.mark.parametrize("reuse", ["none", "orthogonal"])
def test_every_k_updates_on_full_steps_only(reuse):
    q = Quadratic(seed=11)
    target, k = 0.8, 3
    gamma_star = target / q.r()
    gamma0 = gamma_star / 2.5
    opt = auto_opt(q, target, gamma0, every=k, reuse=reuse)
    cap = GradCapture(opt.optimizer)
    full = 0
    for step in range(24):
        active = opt.active
        assert active == (step % k == 0)
        g1 = q.g1()
        opt.step(q.closure())
        m = opt.metrics()
        assert m["strength"] == pytest.approx(closed_form(gamma0, gamma_star, full), rel=1e-9)
        if active:
            assert m["gr_rel"] == pytest.approx(m["strength"] * q.r(), rel=1e-7)
            full += 1
        else:
            applied = torch.cat(cap.grads[-1]) - g1
            if reuse == "none":
                assert torch.equal(applied, torch.zeros_like(applied))
            else:  # θ fixed, so g1 is the full step's g1: the part of γ_t·H·g1 orthogonal to g1 (γ_t: γ now)
                c = m["strength"] * (q.H @ g1)
                assert torch.allclose(applied, c - (c @ g1) / (g1 @ g1) * g1, rtol=1e-7, atol=1e-12)
        assert opt.engine.controller.updates == full
    assert full == 8 and opt.metrics()["strength"] == pytest.approx(closed_form(gamma0, gamma_star, 8), rel=1e-9)


def test_sub_batch_pass_tracks_the_target_of_its_estimate():
    """Sub-batch GR: L = L_S + L_R, the pass at θ' on S only: the estimate is g1 + (g2_S − g1_S)/f, so the correction
    is γ·H_S·g1/f and gr_rel = γ·‖H_S·g1‖/(f·‖g1‖): the controller converges on that, in closed form."""
    q = Quadratic(seed=13)
    H_S = spd(11, seed=21, cond=5.0)
    H_R = q.H
    q.H = H_S + H_R
    f, target = 0.3, 1.3
    r = q.r(H_S, f)
    gamma_star = target / r
    gamma0 = gamma_star * 0.4
    opt = auto_opt(q, target, gamma0)
    for n in range(25):
        opt.zero_grad()
        q.loss(H_S).backward()
        opt.mark_subset(f)
        q.loss(H_R).backward()
        opt.perturb()
        q.loss(H_S).backward()
        opt.step()
        m = opt.metrics()
        assert m["strength"] == pytest.approx(closed_form(gamma0, gamma_star, n), rel=1e-9)
        assert m["gr_rel"] == pytest.approx(m["strength"] * r, rel=1e-7)
    assert m["gr_rel"] == pytest.approx(target, rel=1e-6)


def test_groups_with_their_own_strength_keep_their_ratio():
    """One controller: a group with gr_strength = c gets c·γ_t/γ_0 while the others get γ_t, at every step."""
    q = Quadratic(sizes=(6, 5), seed=15, block=True)
    c, gamma0, target = 0.2, 0.01, 0.6
    base = torch.optim.SGD([{"params": [q.params[0]]}, {"params": [q.params[1]], "gr_strength": c}], lr=0.0)
    opt = GradReg(base, strength="auto", target_rel=target, strength_init=gamma0, exclude=[], backend="torch")
    cap = GradCapture(base)
    n_a = q.params[0].numel()
    H_a, H_b = q.H[:n_a, :n_a], q.H[n_a:, n_a:]
    for _ in range(30):
        g1 = q.H @ q.theta()
        opt.step(q.closure())
        got = torch.cat(cap.grads[-1]) - g1
        gamma = opt.metrics()["strength"]
        want = torch.cat([gamma * (H_a @ g1[:n_a]), c * gamma / gamma0 * (H_b @ g1[n_a:])])
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-14)
    assert opt.metrics()["gr_rel"] == pytest.approx(target, rel=1e-6)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("extra", [{}, {"every": 2, "reuse": "orthogonal"}, {"estimator": "central"}])
def test_state_dict_resume_is_bitwise(extra):
    x, y = regression_batch(dtype=torch.float32)

    def make(model):
        return GradReg(torch.optim.Adam(model.parameters(), lr=1e-2), strength="auto", target_rel=0.5,
                       exclude=[], **extra)

    ref = tanh_mlp(dtype=torch.float32)
    model = copy.deepcopy(ref)
    opt_ref = make(ref)
    for _ in range(12):
        opt_ref.step(make_closure(ref, x, y))
    opt = make(model)
    for _ in range(5):
        opt.step(make_closure(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh = tanh_mlp(seed=99, dtype=torch.float32)
    fresh.load_state_dict(saved["model"])
    opt2 = make(fresh)
    opt2.load_state_dict(saved["opt"])
    assert opt2.strength == opt.strength and opt2.metrics()["strength"] == opt.metrics()["strength"]
    for _ in range(7):
        opt2.step(make_closure(fresh, x, y))
    assert bitwise_equal(list(fresh.parameters()), list(ref.parameters()))
    assert opt2.engine.controller.state_dict() == opt_ref.engine.controller.state_dict()
    assert opt2.metrics()["strength"] == opt_ref.metrics()["strength"]
    assert opt_ref.engine.controller.updates == (12 if not extra.get("every") else 6)


def test_resume_keeps_group_strengths_whatever_the_new_strength_init():
    """Groups with gr_strength scale by γ/γ_0: a resumed run takes γ_0 from the checkpoint, so their γ is the
    uninterrupted run's even when the resuming optimizer is built with another strength_init."""
    q = Quadratic(sizes=(6, 5), seed=23, block=True)

    def make(init):
        base = torch.optim.SGD([{"params": [q.params[0]]}, {"params": [q.params[1]], "gr_strength": 0.3}], lr=0.0)
        return GradReg(base, strength="auto", target_rel=0.4, strength_init=init, exclude=[], backend="torch")

    opt = make(0.02)
    for _ in range(4):
        opt.step(q.closure())
    sd = copy.deepcopy(opt.state_dict())
    other = make(5.0)
    other.load_state_dict(sd)
    entries = opt.engine.source.entries()
    assert [opt.engine.gamma_of(e) for e in entries] == [other.engine.gamma_of(e) for e in
                                                          other.engine.source.entries()]
    for o in (opt, other):
        o.step(q.closure())
    assert opt.metrics() == other.metrics()


# ---------------------------------------------------------------------------------------------- host reads
def _count_host_reads(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("skip_nonfinite, every, reads_per_step", [
    (True, 1, [1, 1, 1, 1]),  # the finite flag, with gr_rel and perturb_ratio in the same transfer
    (False, 1, [1, 1, 1, 1]),  # the adaptive strength's own read: one per full GR step
    (False, 2, [1, 0, 1, 0]),  # none on the steps between full GR steps
])
def test_one_host_read_per_step_at_most(monkeypatch, skip_nonfinite, every, reads_per_step):
    q = Quadratic(seed=17)
    opt = auto_opt(q, 0.5, 0.05, skip_nonfinite=skip_nonfinite, every=every)
    for _ in range(every):  # warm (lazy set-up outside the counted steps); the counted ones start on a full step
        opt.step(q.closure())
    calls = _count_host_reads(monkeypatch)
    got = []
    for _ in range(4):
        n = len(calls)
        opt.zero_grad()
        q.loss().backward()
        if opt.active:
            opt.perturb()
            q.loss().backward()
        opt.step()
        opt.metrics(sync=False)
        got.append(len(calls) - n)
    assert got == reads_per_step, calls
    assert set(calls) <= {"tolist"}


def test_fixed_strength_without_skip_reads_nothing(monkeypatch):
    q = Quadratic(seed=19)
    opt = GradReg(torch.optim.SGD(q.params, lr=0.0), strength=0.1, exclude=[], skip_nonfinite=False,
                  backend="torch")
    opt.step(q.closure())
    calls = _count_host_reads(monkeypatch)
    for _ in range(3):
        opt.step(q.closure())
    assert calls == []
