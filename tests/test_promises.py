"""The promises of issue 22, one test (at least) per class, through the public ``GradReg`` API on every backend.

Each test injects the situation the issue describes and checks what must be true instead, against a twin that never
saw it (bit for bit) or an independent float64 recomputation. Class 7 (lean mode), 10 (loss ops) and 12 (hosts)
are tested elsewhere; class 5's arithmetic lives in ``grkernels.backends``, tested here through GradReg.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from gr_helpers import BACKENDS, GradCapture, bitwise_equal, exact_gr_gradient, regression_batch, snapshot, tanh_mlp
from test_head_only import batch as head_batch
from test_head_only import head_loss, trunk
from test_head_only import make_model as make_head_model
from test_head_only import make_opt as make_head_opt
from torch import nn

from grkernels import GradReg, head_perturbed_pass


def _loss(model, x, y, scale: float = 1.0):
    return (model(x) - y).square().mean() * scale


def _closure(model, x, y, scale: float = 1.0):
    def closure():
        loss = _loss(model, x, y, scale)
        loss.backward()
        return loss

    return closure


def _grads(model) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _same_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and
                                                                   bitwise_equal([x], [y])) for x, y in zip(a, b))


def _same_metrics(a: dict, b: dict) -> bool:
    """Equal metrics, NaN equal to NaN (a step without a perturbed pass reports NaN g2_norm / perturb_ratio)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def _gr(model, backend, *, lr=0.05, base=torch.optim.SGD, **kw) -> GradReg:
    settings = dict(strength=0.5, eps=1e-3, backend=backend, rounding="nearest")
    settings.update(kw)
    return GradReg(base(model.parameters(), lr=lr), **settings)


def _flat64(ts) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in ts])


def _reused(g1: torch.Tensor, c: torch.Tensor, rho: float) -> torch.Tensor:
    """The documented reuse rule (grkernels.reuse), float64: g1 + ρ·‖g1‖·d/‖d‖, d = c − (⟨c, g1⟩/‖g1‖²)·g1."""
    d = c - (c @ g1) / (g1 @ g1) * g1
    return g1 + rho * g1.norm() * d / d.norm()


def _rho(g1: torch.Tensor, c: torch.Tensor) -> float:
    perp = c - (c @ g1) / (g1 @ g1) * g1
    return float(perp.norm() / g1.norm())


# ----------------------------------------------------------------------------- class 1: copies and checkpoints
def _copy(obj, how: str):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class1_a_copy_mid_cycle_reuses_the_correction_like_the_original(backend, how):
    """every=3, reuse="orthogonal", copied after the full step (a correction stored): the copy's reuse steps apply
    the same correction (same gr_rel > 0, same parameters bit for bit), its state_dict works, and a fresh GradReg
    loaded from that state dict continues bit for bit too."""
    model = tanh_mlp(11, dtype=torch.float32)
    x, y = regression_batch(12, dtype=torch.float32)
    opt = _gr(model, backend, every=3, reuse="orthogonal")
    opt.step(_closure(model, x, y))  # the full step: its correction is stored
    m2, o2 = _copy((model, opt), how)
    assert o2.engine.backend is None  # no copy of the last step's buffers: the copy makes its own
    sd = o2.state_dict()  # keyed by position: no KeyError on the copy
    m3 = copy.deepcopy(m2)
    o3 = _gr(m3, backend, every=3, reuse="orthogonal")
    o3.load_state_dict(copy.deepcopy(sd))
    for _ in range(2):  # the two reuse steps of the cycle
        assert opt.reusing and o2.reusing and o3.reusing
        for m, o in ((model, opt), (m2, o2), (m3, o3)):
            o.step(_closure(m, x, y))
        rel = opt.metrics()["gr_rel"]
        assert rel > 0 and o2.metrics()["gr_rel"] == rel and o3.metrics()["gr_rel"] == rel
        assert bitwise_equal(snapshot(m2), snapshot(model)) and bitwise_equal(snapshot(m3), snapshot(model))


@pytest.mark.parametrize("backend", BACKENDS)
def test_class1_reuse_with_group_strengths_and_a_zero_global_strength(backend):
    """γ given per group (``gr_strength``) with the global strength 0: the reuse steps rescale the correction by the
    groups' common multiplier (here 1), never by the global γ — bit for bit the run with the same γ set globally."""
    a = tanh_mlp(13, dtype=torch.float32)
    b = copy.deepcopy(a)
    x, y = regression_batch(14, dtype=torch.float32)
    kw = dict(eps=1e-3, every=2, reuse="orthogonal", backend=backend, rounding="nearest")
    oa = GradReg(torch.optim.SGD([{"params": list(a.parameters()), "gr_strength": 0.5}], lr=0.05), strength=0.0, **kw)
    ob = GradReg(torch.optim.SGD(b.parameters(), lr=0.05), strength=0.5, **kw)
    for _ in range(4):
        oa.step(_closure(a, x, y))
        ob.step(_closure(b, x, y))
        assert oa.metrics()["gr_rel"] > 0 and bitwise_equal(snapshot(a), snapshot(b))


# ----------------------------------------------------------------------------- class 2: reuse after a skipped step
@pytest.mark.parametrize("schedule", [None, "doubling"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class2_a_skipped_full_step_keeps_the_previous_correction(backend, schedule):
    """A full step whose g2 is not finite is skipped, and its correction is not stored: the next reuse step (finite
    g1) steps, with the last finite full step's correction (float64 recomputation from what the base saw), scaled
    by γ now over γ at that step (a schedule doubling γ from step 3 on: twice the correction)."""
    model = tanh_mlp(21)
    x, y = regression_batch(22)
    base = torch.optim.SGD(model.parameters(), lr=1e-2)
    cap = GradCapture(base)
    factor = 1.0 if schedule is None else 2.0
    opt = GradReg(base, strength=0.5, eps=1e-4, g1_clip=None, g2_clip=None, every=3, reuse="orthogonal",
                  backend=backend, schedule=None if schedule is None else (lambda s: 1.0 if s < 3 else 2.0))
    params = list(model.parameters())
    g1_0 = _flat64(torch.autograd.grad(_loss(model, x, y), params))
    opt.step(_closure(model, x, y))
    c0 = _flat64(cap.grads[-1]) - g1_0
    for _ in range(2):
        opt.step(_closure(model, x, y))
    calls = []

    def nan_at_theta_prime():
        calls.append(1)
        loss = _loss(model, x, y) * (float("nan") if len(calls) == 2 else 1.0)
        loss.backward()
        return loss

    assert opt.active
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(nan_at_theta_prime)
    assert bitwise_equal(snapshot(model), before) and opt.metrics()["skipped"] == 1
    assert opt.reusing
    g1_4 = _flat64(torch.autograd.grad(_loss(model, x, y), params))
    seen = len(cap.grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no false "non-finite" skip
        opt.step(_closure(model, x, y))
    assert len(cap.grads) == seen + 1 and opt.metrics()["skipped"] == 1
    expected = _reused(g1_4, c0, factor * _rho(g1_0, c0))
    got = _flat64(cap.grads[-1])
    assert float((got - expected).norm() / expected.norm()) < 1e-10
    assert opt.metrics()["gr_rel"] > 0


# ----------------------------------------------------------------------------- class 3: abort after combine
@pytest.mark.parametrize("kind", ["reuse", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class3_restore_after_combine_puts_g1_back(backend, kind):
    """restore() after combine() — on a reuse step or a full step — leaves θ and ``.grad`` (= g1) bit for bit as
    after the backward at θ; the step redone then equals a twin's that never aborted (the correction once)."""
    model = tanh_mlp(31, dtype=torch.float32)
    x, y = regression_batch(32, dtype=torch.float32)
    opt = _gr(model, backend, every=3, reuse="orthogonal")
    if kind == "reuse":
        opt.step(_closure(model, x, y))
        assert opt.reusing
    twin, twin_opt = copy.deepcopy((model, opt))
    theta = snapshot(model)
    opt.zero_grad()
    _loss(model, x, y).backward()
    g1 = _grads(model)
    if kind == "full":
        opt.perturb()
        _loss(model, x, y).backward()
    opt.combine()
    assert not _same_grads(_grads(model), g1)  # a correction was applied
    opt.restore()
    assert bitwise_equal(snapshot(model), theta) and _same_grads(_grads(model), g1)
    if kind == "full":
        opt.perturb()
        _loss(model, x, y).backward()
    opt.step()
    twin_opt.zero_grad()
    _loss(twin, x, y).backward()
    if kind == "full":
        twin_opt.perturb()
        _loss(twin, x, y).backward()
    twin_opt.step()
    assert bitwise_equal(snapshot(model), snapshot(twin))
    assert _same_metrics(opt.metrics(), twin_opt.metrics())


@pytest.mark.parametrize("backend", BACKENDS)
def test_class3_restore_after_a_reuse_combine_gives_back_every_bit_of_bf16_g1(backend):
    """bf16 gradients holding a negative NaN (as a bad batch leaves them) on a reuse step: combine() then restore()
    puts them back bit for bit — the undo copy is not a widened one (a NaN's payload and sign do not survive
    bf16 → fp32 → bf16)."""
    model = tanh_mlp(33, dtype=torch.bfloat16)
    x, y = regression_batch(34, dtype=torch.bfloat16)
    opt = _gr(model, backend, every=2, reuse="orthogonal")
    opt.step(_closure(model, x, y))
    opt.zero_grad()
    _loss(model, x, y).backward()
    model[0].weight.grad.view(torch.int16)[0, :2] = -64  # 0xFFC0: a NaN with its sign bit set
    g1 = _grads(model)
    assert g1[0][0, 0].isnan()
    opt.combine()
    opt.restore()
    assert _same_grads(_grads(model), g1)


# ----------------------------------------------------------------------------- class 4: wrong-order sub-batch calls
@pytest.mark.parametrize("call", ["mark_subset", "subset_fraction"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class4_subset_calls_after_perturb_abort_with_theta_bitwise(backend, call):
    model = tanh_mlp(41, dtype=torch.float32)
    x, y = regression_batch(42, dtype=torch.float32)
    opt = _gr(model, backend)
    theta = snapshot(model)
    _loss(model, x, y).backward()
    g1 = _grads(model)
    opt.perturb()
    assert not bitwise_equal(snapshot(model), theta)
    with pytest.raises((RuntimeError, ValueError)):
        if call == "mark_subset":
            opt.mark_subset(0.5)
        else:
            opt.subset_fraction = 0.5
    assert bitwise_equal(snapshot(model), theta) and _same_grads(_grads(model), g1)
    assert opt.metrics()["step"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_class4_mark_subset_then_step_closure_uses_no_stale_subset(backend):
    """mark_subset() then step(closure): refused (θ bitwise, the subset's gradient left as it was) or a full GR step
    equal to a twin's — never a step with the stale subset copy. Afterwards the optimizer is usable."""
    model = tanh_mlp(43, dtype=torch.float32)
    x, y = regression_batch(44, dtype=torch.float32)
    opt = _gr(model, backend)
    twin, twin_opt = copy.deepcopy((model, opt))
    theta = snapshot(model)
    _loss(model, x[:8], y[:8], 8 / 32).backward()
    g_s = _grads(model)
    opt.mark_subset(0.25)
    try:
        opt.step(_closure(model, x, y))
    except RuntimeError:
        assert bitwise_equal(snapshot(model), theta) and _same_grads(_grads(model), g_s)
        opt.step(_closure(model, x, y))
    twin_opt.step(_closure(twin, x, y))
    assert bitwise_equal(snapshot(model), snapshot(twin))


# ----------------------------------------------------------------------------- class 5: numeric extremes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class5_huge_finite_gradients_step_like_a_plain_step(backend, dtype):
    """Gradient elements near 3e19 (Σg² overflows fp32): the GR step is not skipped (no warning), θ moves and
    stays finite, and ``g1_norm`` is the float64 norm."""
    model = tanh_mlp(51, dtype=dtype)
    x, y = regression_batch(52, dtype=dtype)
    scale = 2e20
    params = list(model.parameters())
    g1 = torch.autograd.grad(_loss(model, x, y, scale), params)
    assert max(float(g.abs().max()) for g in g1) > 1e19 and all(bool(g.isfinite().all()) for g in g1)
    norm64 = float(_flat64(g1).norm())
    opt = _gr(model, backend, lr=1e-22)
    theta = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step(_closure(model, x, y, scale))
    m = opt.metrics()
    assert m["skipped"] == 0
    assert not bitwise_equal(snapshot(model), theta)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert abs(m["g1_norm"] / norm64 - 1) < 1e-2, (m["g1_norm"], norm64)
    assert all(abs(m[k]) < float("inf") for k in ("gr_rel", "perturb_ratio", "g2_norm"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_class5_radius_mode_perturbs_by_eps_for_a_tiny_gradient(backend):
    """eps_mode="radius" with gradient elements near 1e-25 (‖v‖² underflows fp32): ‖θ' − θ‖ = ε, and
    ``perturb_ratio`` ≈ 1."""
    model = tanh_mlp(53, dtype=torch.float32)
    x, y = regression_batch(54, dtype=torch.float32)
    eps = 1e-3
    opt = _gr(model, backend, eps=eps, eps_mode="radius", lr=1e-2)
    theta = snapshot(model)
    _loss(model, x, y, 1e-25).backward()
    assert 0 < max(float(p.grad.abs().max()) for p in model.parameters()) < 1e-23
    opt.perturb()
    moved = float((_flat64(snapshot(model)) - _flat64(theta)).norm())
    assert abs(moved / eps - 1) < 1e-2, moved
    _loss(model, x, y, 1e-25).backward()
    opt.step()
    ratio = opt.metrics()["perturb_ratio"]
    assert abs(ratio - 1) < 1e-2, ratio


@pytest.mark.parametrize("power", [72, -84])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class5_the_reused_correction_scales_with_the_gradient_at_any_size(backend, power):
    """A reuse step on a loss scaled by 2^72 (gradient elements ~1e20: Σg² overflows fp32) or 2^-84 (~1e-26: the
    squares underflow): not skipped, and the gradient the base optimizer steps with is exactly 2^power times the
    one at the ordinary scale (the reuse rule is homogeneous; scaling by a power of two is exact)."""
    model = tanh_mlp(55, dtype=torch.float32)
    x, y = regression_batch(56, dtype=torch.float32)
    runs = []
    for scale in (1.0, 2.0**power):
        m = copy.deepcopy(model)
        base = torch.optim.SGD(m.parameters(), lr=1e-2)
        cap = GradCapture(base)
        opt = GradReg(base, strength=0.5, eps=1e-3, every=2, reuse="orthogonal", backend=backend)
        opt.step(_closure(m, x, y))
        assert opt.reusing
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            opt.step(_closure(m, x, y, scale))
        assert opt.metrics()["skipped"] == 0 and opt.metrics()["gr_rel"] > 0
        runs.append(cap.grads[-1])
    assert bitwise_equal([g * 2.0**power for g in runs[0]], runs[1])


# ----------------------------------------------------------------------------- class 6: the base optimizer
def test_class6_line_search_and_maximize_are_refused_at_construction():
    model = tanh_mlp(61)
    with pytest.raises(TypeError, match="closure"):
        GradReg(torch.optim.LBFGS(model.parameters()), strength=0.1, eps=1e-3)
    with pytest.raises(ValueError, match="maximize"):
        GradReg(torch.optim.AdamW(model.parameters(), maximize=True), strength=0.1, eps=1e-3)
    opt = GradReg(torch.optim.SGD(list(model.parameters())[:2], lr=0.1), strength=0.1, eps=1e-3)
    with pytest.raises(ValueError, match="maximize"):
        opt.add_param_group({"params": list(model.parameters())[2:], "maximize": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_class6_maximize_set_later_is_refused_before_anything_moves(backend):
    """maximize=True arriving after construction — a group edited in place, or a state dict that carries it — is
    refused with the same message: at the next step (θ and g1 bit for bit) or before the state dict loads."""
    model = tanh_mlp(64, dtype=torch.float32)
    x, y = regression_batch(65, dtype=torch.float32)
    opt = _gr(model, backend, base=torch.optim.AdamW)
    opt.step(_closure(model, x, y))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["maximize"] = True
    with pytest.raises(ValueError, match="maximize"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False
    opt.param_groups[0]["maximize"] = True
    theta = snapshot(model)
    with pytest.raises(ValueError, match="maximize"):
        opt.step(_closure(model, x, y))
    assert bitwise_equal(snapshot(model), theta) and opt.metrics()["step"] == 1


class _Boom(Exception):
    pass


@pytest.mark.parametrize("two_phase", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_class6_a_failing_base_step_aborts_like_any_other(backend, two_phase):
    """An exception from the base optimizer's step (a step pre-hook here) leaves θ bitwise, ``.grad`` at g1 bitwise
    and the step counter (hence the ``every`` cycle) unchanged; the next step equals a twin's."""
    model = tanh_mlp(62, dtype=torch.float32)
    x, y = regression_batch(63, dtype=torch.float32)
    opt = _gr(model, backend, every=2, reuse="orthogonal")
    opt.step(_closure(model, x, y))
    opt.step(_closure(model, x, y))
    twin, twin_opt = copy.deepcopy((model, opt))
    assert opt.active
    handle = opt.optimizer.register_step_pre_hook(lambda *a: (_ for _ in ()).throw(_Boom()))
    theta, g1 = snapshot(model), []
    with pytest.raises(_Boom):
        if two_phase:
            opt.zero_grad()
            _loss(model, x, y).backward()
            g1 = _grads(model)
            opt.perturb()
            _loss(model, x, y).backward()
            opt.step()
        else:
            def closure():
                loss = _loss(model, x, y)
                loss.backward()
                if not g1:
                    g1.extend(_grads(model))
                return loss

            opt.step(closure)
    handle.remove()
    assert bitwise_equal(snapshot(model), theta) and _same_grads(_grads(model), g1)
    assert opt.metrics()["step"] == 2 and opt.active
    opt.step(_closure(model, x, y))
    twin_opt.step(_closure(twin, x, y))
    assert bitwise_equal(snapshot(model), snapshot(twin)) and _same_metrics(opt.metrics(), twin_opt.metrics())


class _WithOffset(nn.Module):
    """A tanh MLP and ``offset``, a parameter the loss is linear in: its gradient is constant in θ (no graph)."""

    def __init__(self, seed: int):
        super().__init__()
        self.mlp = tanh_mlp(seed)
        self.offset = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def loss(self, x, y):
        return (self.mlp(x) - y).square().mean() + self.offset.sum() * 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_class6_exact_estimator_with_a_parameter_the_loss_is_linear_in(backend):
    """estimator="exact" when one GR parameter's gradient has no graph (constant in θ, so its part of H·v is 0): a
    GR step, equal to the float64 double-backprop reference on the others, g1 on it — not a refusal."""
    model = _WithOffset(66)
    x, y = regression_batch(67)
    base = torch.optim.SGD(model.parameters(), lr=1e-2)
    cap = GradCapture(base)
    opt = GradReg(base, strength=0.5, estimator="exact", g1_clip=None, g2_clip=None, backend=backend)
    mlp = list(model.mlp.parameters())
    expected = exact_gr_gradient(lambda: model.loss(x, y), mlp, [0.5] * len(mlp))
    offset_g1 = torch.full((3,), 0.1, dtype=torch.float64)

    def closure():
        loss = model.loss(x, y)
        opt.backward(loss)
        return loss

    opt.step(closure)
    got = cap.grads[-1]  # the module's own parameter (offset) first, then the MLP's
    assert float((_flat64(got[1:]) - _flat64(expected)).norm() / _flat64(expected).norm()) < 1e-12
    assert torch.equal(got[0], offset_g1) and opt.metrics()["gr_rel"] > 0


# ----------------------------------------------------------------------------- class 8: parameters without a gradient
class _Branchy(nn.Module):
    """A tanh MLP and an "expert" whose output is added only when asked (an unused branch, an MoE expert)."""

    def __init__(self, seed: int, with_expert: bool = True):
        super().__init__()
        self.mlp = tanh_mlp(seed)
        if with_expert:
            torch.manual_seed(seed + 1)
            self.expert = nn.Linear(5, 3).double()

    def forward(self, x, use_expert=False):
        out = self.mlp(x)
        return out + self.expert(x) if use_expert else out


@pytest.mark.parametrize("backend", BACKENDS)
def test_class8_reuse_applies_to_the_parameters_that_have_a_gradient(backend):
    """An expert never used: GradReg over MLP + expert steps the MLP bit for bit like GradReg over the MLP alone
    (the reuse is not switched off because one parameter has no gradient)."""
    a, b = _Branchy(81), _Branchy(81, with_expert=False)
    x, y = regression_batch(82)
    oa, ob = (_gr(m, backend, every=3, reuse="orthogonal", lr=0.02) for m in (a, b))
    for step in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.step(_closure(m, x, y))
        if step:
            assert oa.metrics()["gr_rel"] > 0
        assert a.expert.weight.grad is None
        assert bitwise_equal(snapshot(a.mlp), snapshot(b.mlp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_class8_an_expert_idle_on_the_reuse_step_leaves_the_others_reused(backend):
    """The expert has a gradient at the full step and none at the reuse step: the other parameters get the reuse
    rule with the stored correction restricted to them (float64 recomputation)."""
    model = _Branchy(83)
    x, y = regression_batch(84)
    base = torch.optim.SGD(model.parameters(), lr=1e-2)
    cap = GradCapture(base)
    opt = GradReg(base, strength=0.5, eps=1e-4, g1_clip=None, g2_clip=None, every=3, reuse="orthogonal",
                  backend=backend)
    params = list(model.parameters())
    n_mlp = len(list(model.mlp.parameters()))

    def closure(use_expert):
        def run():
            loss = (model(x, use_expert) - y).square().mean()
            loss.backward()
            return loss
        return run

    g1_0 = _flat64(torch.autograd.grad((model(x, True) - y).square().mean(), params))
    opt.step(closure(True))
    c0 = _flat64(cap.grads[-1]) - g1_0
    rho = _rho(g1_0, c0)
    mlp_size = sum(p.numel() for p in params[:n_mlp])
    g1_1 = _flat64(torch.autograd.grad((model(x, False) - y).square().mean(), params[:n_mlp]))
    opt.step(closure(False))
    assert all(g is None for g in cap.grads[-1][n_mlp:])
    got = _flat64(cap.grads[-1][:n_mlp])
    expected = _reused(g1_1, c0[:mlp_size], rho)
    assert float((got - expected).norm() / expected.norm()) < 1e-10
    assert float((got - g1_1).norm()) > 1e-3 * float(g1_1.norm())


# ----------------------------------------------------------------------------- class 9: head-only abort
@pytest.mark.parametrize("backend", BACKENDS)
def test_class9_a_head_loss_that_touches_the_trunk_then_raises_leaves_g1(backend):
    """The perturbed head pass's loss reaches a trunk gradient and then raises: every parameter and gradient is
    back bit for bit, the optimizer idle, and the next step equals a twin's."""
    model = make_head_model()
    twin = copy.deepcopy(model)
    opt, twin_opt = make_head_opt(model, backend=backend), make_head_opt(twin, backend=backend)
    ids, targets, weights = head_batch(model.vocab)
    lfh = head_loss(model, targets, weights)
    hidden = trunk(model, ids)
    lfh(hidden).backward()
    theta, g1 = snapshot(model), _grads(model)

    def leaky(h):
        (1e-3 * model.blocks[0].qkv.weight.square().sum()).backward()  # a trunk gradient reached ...
        raise _Boom  # ... and then the loss fails

    with pytest.raises(_Boom):
        head_perturbed_pass(opt, hidden, leaky)
    assert bitwise_equal(snapshot(model), theta) and _same_grads(_grads(model), g1)
    assert opt.metrics()["step"] == 0
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        lfh_m = head_loss(m, targets, weights)
        h = trunk(m, ids)
        lfh_m(h).backward()
        head_perturbed_pass(o, h, lfh_m)
        o.step()
    assert bitwise_equal(snapshot(model), snapshot(twin))


# ----------------------------------------------------------------------------- class 11: two-phase misuse
@pytest.mark.parametrize("backend", BACKENDS)
def test_class11_combine_without_perturb_on_a_full_step_is_refused(backend):
    model = tanh_mlp(111, dtype=torch.float32)
    x, y = regression_batch(112, dtype=torch.float32)
    opt = _gr(model, backend)
    twin, twin_opt = copy.deepcopy((model, opt))
    theta = snapshot(model)
    _loss(model, x, y).backward()
    g1 = _grads(model)
    assert opt.active
    with pytest.raises(RuntimeError, match="perturb"):
        opt.combine()
    assert bitwise_equal(snapshot(model), theta) and _same_grads(_grads(model), g1)
    assert opt.metrics()["step"] == 0
    opt.perturb()
    _loss(model, x, y).backward()
    opt.step()
    twin_opt.step(_closure(twin, x, y))
    assert bitwise_equal(snapshot(model), snapshot(twin))
    assert opt.metrics()["gr_rel"] > 0 and opt.metrics()["strength"] == 0.5
