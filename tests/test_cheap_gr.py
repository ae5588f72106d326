"""Cheaper GR (issue 13): every-k with reuse, sub-batch second pass, layer-targeted strength, head-only GR.

Each mode against an independent float64 recomputation; every=1 and a subset of all micro-batches against full
GR bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from gr_helpers import BACKENDS, GradCapture, bitwise_equal, exact_gr_gradient, regression_batch, rel_err, tanh_mlp
from torch import nn

from grkernels import GradReg, depth_param_groups
from grkernels.quickstart import TinyLM


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _closure(model, x, y):
    def closure():
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


def _flat_dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- every / reuse
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_1_with_reuse_is_full_gr_bitwise(backend):
    model = tanh_mlp(1, dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = regression_batch(2, dtype=torch.float32)
    kw = dict(strength=0.5, eps=1e-3, backend=backend, rounding="nearest")
    opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2), every=1, reuse="orthogonal", **kw)
    ref = GradReg(torch.optim.AdamW(twin.parameters(), lr=1e-2), **kw)
    for _ in range(4):
        opt.step(_closure(model, x, y))
        ref.step(_closure(twin, x, y))
    assert bitwise_equal(list(model.parameters()), list(twin.parameters()))


def _full_gr_and_g1(model, x, y, gamma):
    params = list(model.parameters())
    full = exact_gr_gradient(lambda: _loss(model, x, y), params, [gamma] * len(params))
    g1 = [g.detach() for g in torch.autograd.grad(_loss(model, x, y), params)]
    return full, g1


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_none_takes_plain_steps_between_full_steps(backend):
    model = tanh_mlp(3)
    x, y = regression_batch(4)
    base = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt = GradReg(base, strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None, every=3, backend=backend)
    cap = GradCapture(base)
    for step in range(6):
        full, g1 = _full_gr_and_g1(model, x, y, 0.5)
        assert opt.active == (step % 3 == 0) and opt.extra_passes == (1 if step % 3 == 0 else 0)
        opt.step(_closure(model, x, y))
        if step % 3 == 0:
            assert rel_err(cap.grads[-1], full) < 1e-4
        else:
            assert bitwise_equal(cap.grads[-1], g1) or rel_err(cap.grads[-1], g1) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthogonal_reuse_applies_the_last_correction_orthogonal_to_current_g1(backend):
    model = tanh_mlp(5)
    x, y = regression_batch(6)
    base = torch.optim.SGD(model.parameters(), lr=5e-2)
    opt = GradReg(base, strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None, every=3, reuse="orthogonal",
                  backend=backend)
    cap = GradCapture(base)
    c = rho = None
    predicted = None
    for step in range(7):
        full, g1 = _full_gr_and_g1(model, x, y, 0.5)
        if c is not None:  # what reuse applies at this step, computed independently in float64
            beta = _flat_dot(c, g1) / _flat_dot(g1, g1)
            d = [ci - beta * gi for ci, gi in zip(c, g1)]
            scale = rho * _flat_dot(g1, g1) ** 0.5 / _flat_dot(d, d) ** 0.5
            predicted = [gi + scale * di for gi, di in zip(g1, d)]
        opt.step(_closure(model, x, y))
        m = opt.metrics()
        if step % 3 == 0:
            assert rel_err(cap.grads[-1], full) < 1e-4
            if predicted is not None:  # reuse_cos: the prediction against the full correction just computed
                pc = [p - g for p, g in zip(predicted, g1)]
                fc = [f - g for f, g in zip(full, g1)]
                cos = _flat_dot(pc, fc) / (_flat_dot(pc, pc) * _flat_dot(fc, fc)) ** 0.5
                assert m["reuse_cos"] == pytest.approx(cos, abs=1e-3)
            c = [f - g for f, g in zip(full, g1)]
            c_par = _flat_dot(c, g1) / _flat_dot(g1, g1)
            perp = [ci - c_par * gi for ci, gi in zip(c, g1)]
            rho = (_flat_dot(perp, perp) / _flat_dot(g1, g1)) ** 0.5
        else:
            assert rel_err(cap.grads[-1], predicted) < 1e-4
            applied = [a - g for a, g in zip(cap.grads[-1], g1)]
            assert abs(_flat_dot(applied, g1)) < 1e-6 * _flat_dot(g1, g1) ** 0.5 * _flat_dot(applied, applied) ** 0.5
            assert m["gr_rel"] == pytest.approx(rho, rel=1e-4)


def test_reuse_state_resumes_bitwise():
    model = tanh_mlp(7, dtype=torch.float32)
    x, y = regression_batch(8, dtype=torch.float32)
    kw = dict(strength=0.5, eps=1e-3, every=3, reuse="orthogonal", rounding="nearest")
    opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)
    for _ in range(2):
        opt.step(_closure(model, x, y))
    twin = copy.deepcopy(model)
    twin_opt = GradReg(torch.optim.AdamW(twin.parameters(), lr=1e-2), **kw)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(4):
        opt.step(_closure(model, x, y))
        twin_opt.step(_closure(twin, x, y))
    assert bitwise_equal(list(model.parameters()), list(twin.parameters()))


def test_every_and_reuse_are_validated():
    model = tanh_mlp(9)
    for bad in (0, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="every"):  # a wrong type is a TypeError
            GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-3, every=bad)
    with pytest.raises(ValueError, match="reuse"):
        GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-3, reuse="looksam")


# ------------------------------------------------------------------------------------------- sub-batch GR
def _two_phase_subset(opt, model, batches, subset, fraction):
    n = len(batches)
    order = subset + [i for i in range(n) if i not in subset]
    for k, i in enumerate(order):
        (_loss(model, *batches[i]) / n).backward()
        if fraction is not None and k == len(subset) - 1:
            opt.mark_subset(fraction)
    opt.perturb()
    for i in subset if fraction is not None else range(n):
        (_loss(model, *batches[i]) / n).backward()
    opt.restore_and_combine()


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_of_all_micro_batches_is_full_gr_bitwise(backend):
    model = tanh_mlp(10, dtype=torch.float32)
    twin = copy.deepcopy(model)
    batches = [regression_batch(20 + i, n=8, dtype=torch.float32) for i in range(3)]
    kw = dict(strength=0.5, eps=1e-3, backend=backend, rounding="nearest")
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.0), **kw)
    ref = GradReg(torch.optim.SGD(twin.parameters(), lr=0.0), **kw)
    _two_phase_subset(opt, model, batches, [0, 1, 2], 1.0)
    _two_phase_subset(ref, twin, batches, [0, 1, 2], None)
    assert bitwise_equal([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, "active"])
def test_subset_correction_is_the_subset_hvp_scaled_to_the_batch(backend, clip):
    model = tanh_mlp(11)
    batches = [regression_batch(30 + i, n=8) for i in range(4)]
    params = list(model.parameters())
    n, subset = len(batches), [2, 0]
    full_loss = lambda: sum(_loss(model, *b) for b in batches) / n  # noqa: E731
    sub_loss = lambda: sum(_loss(model, *batches[i]) for i in subset) / n  # noqa: E731
    g1 = torch.autograd.grad(full_loss(), params)
    n1 = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g1])))
    c = None if clip is None else 0.5 * n1
    opt = GradReg(torch.optim.SGD(params, lr=0.0), strength=0.5, eps=1e-6, g1_clip=c, g2_clip=c, backend=backend)
    _two_phase_subset(opt, model, batches, subset, len(subset) / n)
    got = [p.grad.detach().clone() for p in params]
    # Independent: v = clip(g1 of the whole batch); H_S·v by double backprop of the subset's loss terms.
    s1 = 1.0 if c is None else min(1.0, c / (n1 + 1e-6))
    v = [g.detach() * s1 for g in g1]
    gs = torch.autograd.grad(sub_loss(), params, create_graph=True)
    hv = torch.autograd.grad(gs, params, grad_outputs=v)
    f = len(subset) / n
    if c is None:
        expected = [g.detach() + 0.5 / f * h for g, h in zip(g1, hv)]
    else:  # clipped combine with g2 ≈ g1 + ε·H_S·v/f: first order in ε, the clip factor of g2 moves too
        g2 = [g.detach() + 1e-6 / f * h for g, h in zip(g1, hv)]
        n2 = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g2])))
        s2 = min(1.0, c / (n2 + 1e-6))
        expected = [g.detach() + 0.5 / 1e-6 * (s2 * a - s1 * g.detach()) for g, a in zip(g1, g2)]
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, exact_gr_gradient(full_loss, params, [0.5] * len(params), c)) > 1e-3  # really a subset


def test_mark_subset_is_validated():
    model = tanh_mlp(12)
    x, y = regression_batch(13)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-3)
    _loss(model, x, y).backward()
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            opt.mark_subset(bad)
    exact = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-3, estimator="exact")
    with pytest.raises(RuntimeError, match="sub-batch"):
        exact.mark_subset(0.5)


# ------------------------------------------------------------------------------------- layer-targeted GR
def test_depth_param_groups_ramp_and_layer_set():
    model = TinyLM(vocab=16, dim=16, layers=4, heads=2, ctx=8, dropout=0.0)
    named = dict(model.named_parameters())
    groups = depth_param_groups(model.named_parameters(), 0.8, lr=1e-3)
    strength_of = {id(p): (g["gr_strength"], g["gr_enabled"], g["lr"]) for g in groups for p in g["params"]}
    assert len(strength_of) == len(named)  # every parameter exactly once
    for name, p in named.items():
        gamma, enabled, lr = strength_of[id(p)]
        assert lr == 1e-3
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            assert gamma == pytest.approx(0.8 * i / 3) and enabled == (i > 0)
        else:
            assert gamma == 0.8 and enabled
    only = depth_param_groups(model.named_parameters(), 0.8, layers=[2, 3], rest=0.0)
    on = {id(p) for g in only if g["gr_enabled"] for p in g["params"]}
    assert on == {id(p) for n, p in named.items() if ".layers.2." in n or ".layers.3." in n}
    with pytest.raises(ValueError, match="do not exist"):
        depth_param_groups(model.named_parameters(), 0.8, layers=[7])
    # The groups drive GradReg: layer 0 gets plain g1.
    opt = GradReg(torch.optim.SGD(groups, lr=0.0), strength=123.0, eps=1e-3)
    ids = torch.randint(0, 16, (2, 8))

    def closure():
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        return loss

    base = GradCapture(opt.optimizer)
    g1 = torch.autograd.grad(model(ids).float().logsumexp(-1).mean(), list(model.parameters()))
    opt.step(closure)
    flat = [p for g in opt.param_groups for p in g["params"]]
    got = dict(zip(map(id, flat), base.grads[0]))
    for (name, p), g in zip(named.items(), g1):
        if ".layers.0." in name:
            assert torch.equal(got[id(p)], g)
    assert opt.metrics()["strength"] == 123.0  # the groups' own gr_strength wins; "strength" is the default γ


# ------------------------------------------------------------------------------------------- head-only GR
def test_head_only_gr_reuses_the_first_pass_hidden_states():
    """Only the head is perturbed, so the body's output at θ' equals the one at θ: the second pass may start from
    the saved hidden states (the head's matmul only) and gives the same GR gradient as a full second pass."""
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(6, 12), nn.Tanh()), nn.Linear(12, 5)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 5, (10,))
    body, head = body.double(), head.double()
    results = []
    for reuse_hidden in (False, True):
        b, h = copy.deepcopy(body), copy.deepcopy(head)
        params = list(b.parameters()) + list(h.parameters())
        opt = GradReg(torch.optim.SGD(params, lr=0.0), strength=0.5, eps=1e-6, exclude=list(b.parameters()))
        hidden = b(x)
        nn.functional.cross_entropy(h(hidden), y).backward()
        opt.perturb()
        start = hidden.detach() if reuse_hidden else b(x)
        nn.functional.cross_entropy(h(start), y).backward()
        opt.restore_and_combine()
        results.append([p.grad.clone() for p in params])
    assert rel_err(results[1], results[0]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_phase_combine_applies_reuse_before_the_callers_clip(backend):
    """With combine() the reused correction is in .grad before the caller clips, as the full correction is."""
    model = tanh_mlp(14)
    twin = copy.deepcopy(model)
    x, y = regression_batch(15)
    kw = dict(strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None, every=2, reuse="orthogonal", backend=backend)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=1e-2), **kw)
    ref = GradReg(torch.optim.SGD(twin.parameters(), lr=1e-2), **kw)
    cap = GradCapture(ref.optimizer)
    for step in range(4):
        opt.zero_grad()
        _loss(model, x, y).backward()
        for _ in range(opt.extra_passes):
            opt.perturb()
            _loss(model, x, y).backward()
        opt.combine()
        combined = [p.grad.clone() for p in model.parameters()]
        opt.combine()  # idempotent
        assert bitwise_equal([p.grad for p in model.parameters()], combined)
        opt.step()
        ref.step(_closure(twin, x, y))  # the closure path applies the same correction in step()
        assert rel_err(combined, cap.grads[-1]) < 1e-12
        if step % 2 == 1:
            assert opt.metrics()["gr_rel"] > 0  # a reuse step really added a correction


# ------------------------------------------------------------------------- vectorised bookkeeping, no sync
_SYNCS = ("item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy")


def _no_sync(mp):
    def fail(*a, **k):
        raise AssertionError("host synchronisation in the reuse / sub-batch bookkeeping")

    for name in _SYNCS:
        mp.setattr(torch.Tensor, name, fail)
    mp.setattr(torch.cuda, "synchronize", fail)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_and_subset_make_no_host_sync(backend, monkeypatch):
    model = tanh_mlp(16, dtype=torch.float32)
    batches = [regression_batch(40 + i, n=8, dtype=torch.float32) for i in range(3)]
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=1e-2), strength=0.5, eps=1e-2, every=2,
                  reuse="orthogonal", backend=backend)
    for step in range(5):  # full (stores), reuse, full (capture with a prediction, reuse_cos), reuse, full+subset
        opt.zero_grad()
        subset = step == 4
        with monkeypatch.context() as mp:
            _no_sync(mp)
            if subset:
                _two_phase_subset(opt, model, batches, [1], 1 / 3)
            else:
                for b in batches:
                    (_loss(model, *b) / 3).backward()
                for _ in range(opt.extra_passes):
                    opt.perturb()
                    for b in batches:
                        (_loss(model, *b) / 3).backward()
                opt.combine()
            m = opt.metrics(sync=False)
        opt.step()  # the one documented read (the finite flag)
        if step == 2:
            assert "reuse_cos" in m and torch.isfinite(m["reuse_cos"])
        if step == 3:
            assert m["gr_rel"] > 0


def test_reuse_with_mixed_gradient_dtypes_matches_float64():
    """Gradients of two dtypes (fp32 and bf16) share one flat store: the reused correction is LookSAM's rule
    computed in float64 from the gradients the base optimizer saw, to bf16 accuracy, and survives a state dict."""
    torch.manual_seed(17)
    w1 = nn.Parameter(torch.randn(5, 16) * 0.5)
    w2 = nn.Parameter((torch.randn(16, 3) * 0.5).to(torch.bfloat16))
    x, y = regression_batch(18, dtype=torch.float32)

    def loss():
        return (torch.tanh(x @ w1) @ w2.float() - y).square().mean()

    base = torch.optim.SGD([w1, w2], lr=1e-2)
    opt = GradReg(base, strength=0.5, eps=1e-2, every=2, reuse="orthogonal", g1_clip=None, g2_clip=None)
    cap = GradCapture(base)
    g1s = []

    def closure():
        out = loss()
        out.backward()
        g1s.append([w1.grad.clone(), w2.grad.clone()])
        return out

    opt.step(closure)  # full step: g1s[0] at θ0 (the closure's first call), g1s[1] at θ'
    c = [a.double() - g.double() for a, g in zip(cap.grads[0], g1s[0])]
    sd = copy.deepcopy(opt.state_dict())
    assert [t.shape for t in sd["grad_reg"]["reuse"]["c"]] == [w1.shape, w2.shape]
    opt.load_state_dict(sd)
    opt.step(closure)  # reused step: g1s[2]
    g1 = [g.double() for g in g1s[2]]
    beta = _flat_dot(c, g1) / _flat_dot(g1, g1)
    g0 = [g.double() for g in g1s[0]]
    c0 = [ci - (_flat_dot(c, g0) / _flat_dot(g0, g0)) * gi for ci, gi in zip(c, g0)]
    rho = (_flat_dot(c0, c0) / _flat_dot(g0, g0)) ** 0.5
    d = [ci - beta * gi for ci, gi in zip(c, g1)]
    scale = rho * _flat_dot(g1, g1) ** 0.5 / _flat_dot(d, d) ** 0.5
    applied = [a.double() - g for a, g in zip(cap.grads[1], g1)]
    assert [a.dtype for a in cap.grads[1]] == [torch.float32, torch.bfloat16]
    assert rel_err(applied, [scale * di for di in d]) < 1e-2


def test_subset_with_a_parameter_only_the_rest_reaches():
    """A parameter without gradient from the subset: its residual is its whole g1, and it gets no correction
    from the subset's HVP (which does not depend on it)."""
    model = tanh_mlp(19)
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    batches = [regression_batch(50 + i, n=8) for i in range(3)]
    params = list(model.parameters()) + [extra]

    def term(i):  # only batch 2 reaches `extra`
        b = batches[i]
        return ((model(b[0]) + (extra if i == 2 else 0.0)) - b[1]).square().mean() / 3

    opt = GradReg(torch.optim.SGD(params, lr=0.0), strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None)
    term(0).backward()
    assert extra.grad is None
    opt.mark_subset(1 / 3)
    term(1).backward()
    term(2).backward()
    opt.perturb()
    term(0).backward()
    opt.restore_and_combine()
    got = [p.grad.detach().clone() for p in params]
    g1 = torch.autograd.grad(sum(term(i) for i in range(3)), params)
    gs = torch.autograd.grad(term(0), params, create_graph=True, allow_unused=True)
    hv = torch.autograd.grad(sum((s * g.detach()).sum() for s, g in zip(gs, g1) if s is not None), params,
                             allow_unused=True)  # H_S·g1
    hv = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
    expected = [g + 0.5 * 3 * h for g, h in zip(g1, hv)]
    assert rel_err(got, expected) < 1e-4
    assert rel_err([got[-1]], [g1[-1]]) < 1e-6  # `extra`: no correction
