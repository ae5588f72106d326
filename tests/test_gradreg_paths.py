"""GradReg's promises off the main path (issue 10): non-finite values, errors at every point of a step, unusual
calls, arguments that would be silently misread, copies/pickles/hooks/compile, and one meaning per metric.

Each test names the class of hole it closes; both backends where the backend matters.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from gr_helpers import (
    BACKENDS,
    GradCapture,
    bitwise_equal,
    exact_gr_gradient,
    make_closure,
    regression_batch,
    rel_err,
    snapshot,
    tanh_mlp,
)
from torch import nn

from grkernels import GradReg
from grkernels.backends import make_backend


def _opt(model, backend="torch", *, lr=0.1, base=torch.optim.SGD, **kw):
    kw.setdefault("strength", 0.5)
    kw.setdefault("eps", 1e-3)
    return GradReg(base(model.parameters(), lr=lr), backend=backend, **kw)


def _loss(model, x, y):
    return (model(x) - y).square().mean()


# ---------------------------------------------------------------------------------------------- 1. non-finite
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["excluded", "gr_off_group"])
@pytest.mark.parametrize("two_phase", [False, True])
def test_nonfinite_outside_gr_parameters_skips_the_step(backend, where, two_phase):
    model = tanh_mlp(1, dtype=torch.float32)
    x, y = regression_batch(2, dtype=torch.float32)
    bias = model[0].bias
    if where == "excluded":
        opt = _opt(model, backend, exclude=[bias])
    else:
        rest = [p for p in model.parameters() if p is not bias]
        base = torch.optim.SGD([{"params": rest}, {"params": [bias], "gr_enabled": False}], lr=0.1)
        opt = GradReg(base, strength=0.5, eps=1e-3, backend=backend)
    bias.register_hook(lambda g: torch.full_like(g, float("nan")))  # NaN only in the non-GR parameter
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        if two_phase:
            _loss(model, x, y).backward()
            opt.perturb()
            _loss(model, x, y).backward()
            opt.step()
        else:
            opt.step(make_closure(model, x, y))
    assert bitwise_equal(snapshot(model), before)
    assert opt.metrics()["skipped"] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_combined_gradient_never_reaches_fp16_weights(backend):
    # L = a·w²/2: g1 = a·w = 100 and g2 = a·(w + ε·g1) = 110 are finite in fp16, but the GR gradient
    # g1 + (γ/ε)(g2 − g1) = 100 + 1e5 overflows fp16 (max 65504).
    w = nn.Parameter(torch.ones(8, dtype=torch.float16))
    opt = GradReg(torch.optim.SGD([w], lr=1e-3), strength=10.0, eps=1e-3, eps_mode="absolute", g1_clip=None,
                  g2_clip=None, rounding="nearest", backend=backend)

    def closure():
        loss = (100.0 * w.float().square() / 2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert torch.equal(w.detach(), before) and torch.isfinite(w).all()
    assert opt.metrics()["skipped"] == 1.0


def test_nan_schedule_and_nan_group_strength_are_refused_before_anything_moves():
    model = tanh_mlp(3, dtype=torch.float32)
    x, y = regression_batch(4, dtype=torch.float32)
    factor = {"value": float("nan")}
    opt = _opt(model, schedule=lambda step: factor["value"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="schedule"):
        opt.step(make_closure(model, x, y))
    assert bitwise_equal(snapshot(model), before)
    factor["value"] = 1.0
    opt.step(make_closure(model, x, y))  # usable again
    assert not bitwise_equal(snapshot(model), before)

    with pytest.raises(ValueError, match="gr_strength"):
        GradReg(torch.optim.SGD([{"params": model.parameters(), "gr_strength": float("inf")}], lr=0.1),
                strength=0.5, eps=1e-3)
    opt.param_groups[0]["gr_strength"] = float("nan")  # set later, by hand
    with pytest.raises(ValueError, match="gr_strength"):
        opt.step(make_closure(model, x, y))


def test_finite_check_has_no_false_alarm_on_large_low_precision_gradients():
    # ‖g‖₂ of a large bf16/fp16 gradient can overflow its dtype while every element is finite: the skip test
    # must look at elements (max-abs), not at a norm.
    w = nn.Parameter(torch.zeros(100_000, dtype=torch.float16))
    opt = GradReg(torch.optim.SGD([w], lr=1e-6), strength=0.0, eps=1e-3)
    w.grad = torch.full_like(w, 300.0)  # ‖g‖ = 94,868 > 65,504
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    assert opt.metrics()["skipped"] == 0.0 and (w.detach() != 0).all()


# --------------------------------------------------------------------------------------- 2. errors and states
_FAILURES = ["first_closure", "second_closure", "backend_perturb", "backend_combine", "missing_grad", "base_step"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("failure", _FAILURES)
def test_any_error_leaves_theta_bitwise_and_the_optimizer_usable(backend, failure, monkeypatch):
    """Inject a failure at every point of a step; afterwards θ is bitwise θ and the next step is exactly the step
    a fresh optimizer would take."""
    model = tanh_mlp(5, dtype=torch.float32)
    x, y = regression_batch(6, dtype=torch.float32)
    twin = copy.deepcopy(model)
    opt, twin_opt = _opt(model, backend), _opt(twin, backend)
    calls = {"n": 0}

    class Boom(Exception):
        pass

    def closure():
        calls["n"] += 1
        if (failure == "first_closure" and calls["n"] == 1) or (failure == "second_closure" and calls["n"] == 2):
            raise Boom
        loss = _loss(model, x, y)
        if failure == "missing_grad" and calls["n"] == 2:
            for p in model.parameters():
                p.grad = None
            model[4].bias.sum().backward()  # the second pass leaves most of the model without a gradient
        else:
            loss.backward()
        return loss

    impl = make_backend(opt.backend, "cpu", lean=opt.lean)
    opt.engine.backend = impl
    if failure == "backend_perturb":
        monkeypatch.setattr(impl, "perturb", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    if failure == "backend_combine":
        monkeypatch.setattr(impl, "restore_and_combine", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    if failure == "base_step":
        monkeypatch.setattr(opt.optimizer, "step", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    before = snapshot(model)
    with pytest.raises((Boom, RuntimeError)):
        opt.step(closure)
    assert bitwise_equal(snapshot(model), before)
    assert opt.engine.phase == "idle"
    monkeypatch.undo()
    opt.engine.backend = None
    assert opt.engine.step_count == twin_opt.engine.step_count  # a failed step is not counted: same seeds, cycle
    opt.step(make_closure(model, x, y))
    twin_opt.step(make_closure(twin, x, y))
    assert bitwise_equal(snapshot(model), snapshot(twin))


def test_grad_scaler_refusal_leaves_the_optimizer_usable():
    model = tanh_mlp(7, dtype=torch.float32)
    x, y = regression_batch(8, dtype=torch.float32)
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(model, x, y)).backward()
    opt.perturb()
    scaler.scale(_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scaler.step(opt)
    before = snapshot(model)
    opt.step(make_closure(model, x, y))  # no leftover scaler attributes: a plain GR step works
    assert not bitwise_equal(snapshot(model), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_during_a_perturbed_step_restores_theta(backend):
    model = tanh_mlp(9, dtype=torch.float32)
    x, y = regression_batch(10, dtype=torch.float32)
    opt = _opt(model, backend)
    sd = opt.state_dict()
    before = snapshot(model)
    _loss(model, x, y).backward()
    opt.perturb()
    with pytest.warns(RuntimeWarning, match="aborted"):
        opt.load_state_dict(sd)
    assert bitwise_equal(snapshot(model), before)
    opt.step(make_closure(model, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_parameter_in_a_group_is_one_parameter(backend):
    model = tanh_mlp(11)
    x, y = regression_batch(12)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.optim warns about the duplicate itself
        base = torch.optim.SGD(params + [params[0]], lr=0.0)
    opt = GradReg(base, strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None, backend=backend)
    cap = GradCapture(base)
    before = snapshot(model)
    opt.step(make_closure(model, x, y))
    assert bitwise_equal(snapshot(model), before)
    expected = exact_gr_gradient(lambda: _loss(model, x, y), params, [0.5] * len(params))
    assert rel_err(cap.grads[0][: len(params)], expected) < 1e-4


@pytest.mark.parametrize("call", ["perturb_too_often", "closure_while_perturbed", "combine_too_early"])
def test_calls_in_the_wrong_order_abort_cleanly(call):
    model = tanh_mlp(13, dtype=torch.float32)
    x, y = regression_batch(14, dtype=torch.float32)
    opt = _opt(model, estimator="central")
    before = snapshot(model)
    _loss(model, x, y).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    opt.perturb()
    with pytest.raises(RuntimeError, match="abort"):
        if call == "perturb_too_often":
            opt.perturb()
            opt.perturb()
        elif call == "closure_while_perturbed":
            opt.step(make_closure(model, x, y))
        else:
            opt.restore_and_combine()  # central needs two points
    assert bitwise_equal(snapshot(model), before)
    assert bitwise_equal([p.grad for p in model.parameters()], g1)
    opt.zero_grad()
    opt.step(make_closure(model, x, y))


# --------------------------------------------------------------------------- 3. silent no-ops and misreadings
def test_rewrapping_an_optimizer_uses_the_new_strength():
    model = tanh_mlp(15)
    x, y = regression_batch(16)
    base = torch.optim.SGD(model.parameters(), lr=0.0)
    GradReg(base, strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None)
    opt = GradReg(base, strength=2.0, eps=1e-6, g1_clip=None, g2_clip=None)
    cap = GradCapture(base)
    opt.step(make_closure(model, x, y))
    params = list(model.parameters())
    assert rel_err(cap.grads[0], exact_gr_gradient(lambda: _loss(model, x, y), params, [2.0] * len(params))) < 1e-4
    assert opt.metrics()["strength"] == 2.0


def test_exclude_entries_that_are_not_parameters_are_refused():
    model = tanh_mlp(17)
    other = tanh_mlp(18)
    for bad in ([model[0].weight.data], [model[0].weight.detach().clone()], [other[0].weight]):
        with pytest.raises(ValueError, match="names no parameter"):
            _opt(model, exclude=bad)
    with pytest.raises(ValueError, match="names no parameter"):
        _opt(model, exclude=["weight"], named_parameters=other.named_parameters())
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)  # never gets a gradient: harmless
    _opt(model, exclude=[frozen, model[0].weight])


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_with_gradient_only_at_the_perturbed_point_is_left_alone(backend):
    model = tanh_mlp(19, dtype=torch.float32)
    x, y = regression_batch(20, dtype=torch.float32)
    late = nn.Parameter(torch.randn(3))
    opt = GradReg(torch.optim.AdamW([*model.parameters(), late], lr=0.1), strength=0.5, eps=1e-3, backend=backend)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = _loss(model, x, y) + (late.sum() if calls["n"] == 2 else 0.0)
        loss.backward()
        return loss

    before = late.detach().clone()
    opt.step(closure)
    assert late.grad is None and torch.equal(late.detach(), before)


def test_lean_on_the_torch_backend_warns():
    model = tanh_mlp(21, dtype=torch.float32)
    x, y = regression_batch(22, dtype=torch.float32)
    opt = _opt(model, "torch", lean=True)
    with pytest.warns(UserWarning, match="lean"):
        opt.step(make_closure(model, x, y))


def test_bad_schedule_and_warmup_types_are_refused():
    model = tanh_mlp(23)
    with pytest.raises(TypeError, match="schedule"):
        _opt(model, schedule=0.5)
    with pytest.raises(TypeError, match="warmup_steps"):
        _opt(model, warmup_steps=2.5)


# ------------------------------------------------------------------------------- 6. torch.optim conventions
def _train(model, opt, x, y, steps=3):
    for _ in range(steps):
        opt.step(make_closure(model, x, y))
    return snapshot(model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_and_pickles_train_like_the_original(how):
    model = tanh_mlp(24, dtype=torch.float32)
    x, y = regression_batch(25, dtype=torch.float32)
    params = list(model.parameters())
    opt = _opt(model, base=torch.optim.AdamW, exclude=[params[0]], warmup_steps=1, rounding="nearest")
    _train(model, opt, x, y, steps=2)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert {id(e.tensor) for e in opt2.engine.source.entries() if e.excluded} == {id(list(model2.parameters())[0])}
    assert bitwise_equal(_train(model, opt, x, y), _train(model2, opt2, x, y))
    assert opt2.metrics()["step"] == opt.metrics()["step"] == 5


def test_exclusions_follow_parameters_swapped_in_place():
    """Hosts that replace the optimizer's parameter objects after GradReg is built (Accelerate's FSDP2 prepare puts
    the sharded parameters in place) keep the exclusions: by position, as torch.optim's state_dict keys them. The
    run equals a GradReg built on the new parameters bitwise; a group that changes size is refused."""
    x, y = regression_batch(25, dtype=torch.float32)
    old = tanh_mlp(24, dtype=torch.float32)
    new, ref_model = copy.deepcopy(old), copy.deepcopy(old)
    opt = _opt(old, base=torch.optim.AdamW, exclude=[list(old.parameters())[0]], rounding="nearest")
    for group in opt.param_groups:  # what accelerate's fsdp2_switch_optimizer_parameters does
        group["params"] = [dict(new.named_parameters())[n] for n, _ in old.named_parameters()]
    ref = _opt(ref_model, base=torch.optim.AdamW, exclude=[list(ref_model.parameters())[0]], rounding="nearest")
    assert {id(e.tensor) for e in opt.engine.source.entries() if e.excluded} == {id(list(new.parameters())[0])}
    assert bitwise_equal(_train(new, opt, x, y), _train(ref_model, ref, x, y))
    opt.param_groups[0]["params"] = opt.param_groups[0]["params"][1:]
    with pytest.raises(RuntimeError, match="changed size"):
        opt.step(make_closure(new, x, y))


def test_copy_during_a_perturbed_step_is_refused():
    model = tanh_mlp(26, dtype=torch.float32)
    x, y = regression_batch(27, dtype=torch.float32)
    opt = _opt(model)
    _loss(model, x, y).backward()
    opt.perturb()
    with pytest.raises(RuntimeError, match="perturbed"):
        copy.deepcopy(opt)
    opt.restore()


def test_state_dict_hooks_run():
    model = tanh_mlp(28, dtype=torch.float32)
    opt = _opt(model)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))

    def post(o, sd):
        seen.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        seen.append("load_pre")
        sd = dict(sd)
        sd.pop("extra")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_compiled_step_equals_eager():
    model = tanh_mlp(29, dtype=torch.float32)
    x, y = regression_batch(30, dtype=torch.float32)
    twin = copy.deepcopy(model)
    opt, twin_opt = _opt(model, rounding="nearest"), _opt(twin, rounding="nearest")
    compiled = torch.compile(opt.step)
    for _ in range(3):
        compiled(make_closure(model, x, y))
        twin_opt.step(make_closure(twin, x, y))
    assert bitwise_equal(snapshot(model), snapshot(twin))
    assert opt.metrics()["step"] == 3


# ------------------------------------------------------------------------------------------- 8. one meaning
def _norm(ts):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])))


@pytest.mark.parametrize("two_phase", [False, True])
def test_g1_norm_and_strength_mean_the_same_in_warmup_and_after(two_phase):
    model = tanh_mlp(31, dtype=torch.float32)
    x, y = regression_batch(32, dtype=torch.float32)
    params = list(model.parameters())
    excluded = params[-1]
    opt = _opt(model, strength=0.5, exclude=[excluded], warmup_steps=1, schedule=lambda s: 0.25 * s,
               g1_clip=1e-3, g2_clip=1e-3)
    for step in range(3):
        g1 = torch.autograd.grad(_loss(model, x, y), params)
        expected = _norm([g for g, p in zip(g1, params) if p is not excluded])  # GR parameters, before any clip
        opt.zero_grad()
        if two_phase:
            _loss(model, x, y).backward()
            for _ in range(opt.extra_passes):
                opt.perturb()
                _loss(model, x, y).backward()
            opt.combine()
            torch.nn.utils.clip_grad_norm_(params, 1e-4)  # the caller's clip must not change g1_norm
            opt.step()
        else:
            opt.step(make_closure(model, x, y))
        m = opt.metrics()
        assert m["g1_norm"] == pytest.approx(expected, rel=1e-5)
        assert m["strength"] == pytest.approx(0.5 * (0.0 if step == 0 else 0.25 * step))
        assert m["step"] == step + 1
