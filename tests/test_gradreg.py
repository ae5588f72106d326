"""GradReg against the double-backprop definition, and its behaviour under bad conditions (both backends)."""

from __future__ import annotations

import copy
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

from grkernels import GradReg, paper_exclude


def gr_opt(model, backend, *, lr=0.0, **kw):
    kw.setdefault("strength", 0.5)
    kw.setdefault("eps", 1e-6)
    kw.setdefault("g1_clip", None)
    kw.setdefault("g2_clip", None)
    base = torch.optim.SGD(model.parameters(), lr=lr)
    return GradReg(base, backend=backend, **kw), base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["forward", "central", "exact"])
def test_matches_double_backprop_float64(backend, estimator):
    model = tanh_mlp()
    x, y = regression_batch()
    eps = 1e-6 if estimator == "forward" else 1e-4
    opt, base = gr_opt(model, backend, eps=eps, estimator=estimator)
    cap = GradCapture(base)
    params = list(model.parameters())
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, [0.5] * len(params))
    closure = make_closure(model, x, y)
    if estimator == "exact":

        def closure():
            loss = (model(x) - y).square().mean()
            opt.backward(loss)
            return loss

    opt.step(closure)
    assert rel_err(cap.grads[0], expected) < 1e-4
    # The correction is large enough that plain g1 would fail the same check.
    g1 = [g.detach() for g in torch.autograd.grad((model(x) - y).square().mean(), params)]
    assert rel_err(g1, expected) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_applies_to_perturbation_and_g2(backend):
    model = tanh_mlp(3)
    x, y = regression_batch(4)
    params = list(model.parameters())
    g1 = torch.autograd.grad((model(x) - y).square().mean(), params)
    n1 = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g1])))
    clip = 0.25 * n1  # active
    opt, base = gr_opt(model, backend, eps=1e-6, g1_clip=clip, g2_clip=clip)
    cap = GradCapture(base)
    opt.step(make_closure(model, x, y))
    # With both clips active, (s2·g2 − s1·g1)/ε is the derivative of the clipped-gradient map along v:
    # finite difference of F(θ) = clip(∇L(θ)) along v = F(θ), done here independently in float64.
    def clipped_grad(shift):
        with torch.no_grad():
            for p, v in zip(params, shift):
                p.add_(v)
        g = torch.autograd.grad((model(x) - y).square().mean(), params)
        with torch.no_grad():
            for p, v in zip(params, shift):
                p.sub_(v)
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        return [t * min(1.0, clip / (float(n) + 1e-6)) for t in g], g

    h = 1e-6
    f0, raw = clipped_grad([torch.zeros_like(p) for p in params])
    f1, _ = clipped_grad([h * t for t in f0])
    expected = [r + 0.5 * (b - a) / h for r, a, b in zip(raw, f0, f1)]
    assert rel_err(cap.grads[0], expected) < 1e-5
    m = opt.metrics()
    assert m["g1_norm"] == pytest.approx(n1, rel=1e-9)
    assert m["perturb_ratio"] == pytest.approx(1.0, rel=1e-6)  # float64: nothing lost to rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_parameters_get_exactly_g1(backend):
    model = tanh_mlp(1)
    x, y = regression_batch(2)
    params = list(model.parameters())
    excluded = [params[0], params[-1]]
    opt, base = gr_opt(model, backend, exclude=excluded)
    cap = GradCapture(base)
    before = snapshot(model)
    g1 = [g.detach().clone() for g in torch.autograd.grad((model(x) - y).square().mean(), params)]
    coefs = [0.0 if any(p is e for e in excluded) else 0.5 for p in params]
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, coefs)
    opt.step(make_closure(model, x, y))
    got = cap.grads[0]
    assert torch.equal(got[0], g1[0]) and torch.equal(got[-1], g1[-1])  # bitwise g1
    assert rel_err(got[1:-1], expected[1:-1]) < 1e-4
    assert bitwise_equal(snapshot(model), before)  # lr = 0: restored exactly


def test_exclude_by_name_and_paper_default():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10)

    m = Tiny()
    assert {id(p) for p in paper_exclude(m)} == {id(m.embed.weight), id(m.lm_head.weight), id(m.lm_head.bias)}
    opt = GradReg(torch.optim.SGD(m.parameters(), lr=0.1), strength=1.0, eps=1e-3,
                  exclude=["embed", "lm_head"], named_parameters=m.named_parameters())
    assert {id(e.tensor) for e in opt.engine.source.entries() if e.excluded} == {id(p) for p in paper_exclude(m)}
    with pytest.raises(ValueError, match="named_parameters"):
        GradReg(torch.optim.SGD(m.parameters(), lr=0.1), strength=1.0, eps=1e-3, exclude=["embed"])
    with pytest.raises(ValueError, match="matches no parameter"):
        GradReg(torch.optim.SGD(m.parameters(), lr=0.1), strength=1.0, eps=1e-3, exclude=["nope"],
                named_parameters=m.named_parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_replayed(backend):
    model = tanh_mlp(2, dropout=0.5)
    model.train()
    x, y = regression_batch(3)
    params = list(model.parameters())
    opt, base = gr_opt(model, backend, eps=1e-6)
    cap = GradCapture(base)
    torch.manual_seed(1234)
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, [0.5] * len(params))
    torch.manual_seed(1234)
    opt.step(make_closure(model, x, y))
    assert rel_err(cap.grads[0], expected) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_evaluation_raising_restores_bitwise(backend):
    model = tanh_mlp(5, dtype=torch.float32)
    x, y = regression_batch(6, dtype=torch.float32)
    opt, _ = gr_opt(model, backend, lr=0.1, eps=1e-2)
    before = snapshot(model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("boom at θ'")  # BaseException too
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert bitwise_equal(snapshot(model), before)
    opt.step(make_closure(model, x, y))  # still usable
    assert not bitwise_equal(snapshot(model), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["g1", "g2"])
def test_nonfinite_gradient_skips_step(backend, where):
    model = tanh_mlp(7, dtype=torch.float32)
    x, y = regression_batch(8, dtype=torch.float32)
    opt, base = gr_opt(model, backend, lr=0.1, eps=1e-2)
    base_steps = []
    base.register_step_pre_hook(lambda *a: base_steps.append(1))
    before = snapshot(model)
    calls = []

    def closure():
        calls.append(1)
        loss = (model(x) - y).square().mean()
        bad = (where == "g1" and len(calls) == 1) or (where == "g2" and len(calls) == 2)
        if bad:
            loss = loss * torch.tensor(float("nan"))
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert bitwise_equal(snapshot(model), before)
    assert not base_steps
    assert opt.metrics()["skipped"] == 1.0
    opt.step(make_closure(model, x, y))
    assert base_steps and opt.metrics()["skipped"] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_phase_accumulation_equals_one_big_batch(backend):
    x, y = regression_batch(9, n=32)
    grads = []
    for micro in (1, 4):
        model = tanh_mlp(9)
        opt, base = gr_opt(model, backend, eps=1e-6, g1_clip=1.0, g2_clip=1.0)
        cap = GradCapture(base)
        chunks = list(zip(x.chunk(micro), y.chunk(micro)))

        def accumulate():
            for xc, yc in chunks:
                ((model(xc) - yc).square().mean() / micro).backward()

        opt.zero_grad()
        accumulate()
        assert opt.extra_passes == 1
        opt.perturb()
        accumulate()
        opt.restore_and_combine()
        opt.step()
        grads.append(cap.grads[0])
    assert rel_err(grads[1], grads[0]) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_phase_step_without_restore_and_perturbed_context(backend):
    model = tanh_mlp(10)
    x, y = regression_batch(11)
    opt, base = gr_opt(model, backend)
    cap = GradCapture(base)
    before = snapshot(model)
    (model(x) - y).square().mean().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    opt.perturb()
    assert not bitwise_equal(snapshot(model), before)  # really moved
    with pytest.raises(RuntimeError, match="too often"):
        opt.perturb()
    # Any error aborts the pending step: θ bitwise θ, .grad back to g1, and the optimizer usable again.
    assert bitwise_equal(snapshot(model), before)
    assert bitwise_equal([p.grad for p in model.parameters()], g1)
    opt.perturb()
    (model(x) - y).square().mean().backward()
    opt.step()  # restores, combines and steps
    params = list(model.parameters())
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, [0.5] * len(params))
    assert rel_err(cap.grads[0], expected) < 1e-4
    assert bitwise_equal(snapshot(model), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_overrides(backend):
    model = tanh_mlp(12)
    x, y = regression_batch(13)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    groups = [
        {"params": list(layers[0].parameters()), "gr_strength": 2.0},
        {"params": list(layers[1].parameters()), "gr_enabled": False},
        {"params": list(layers[2].parameters())},  # the default strength
    ]
    base = torch.optim.SGD(groups, lr=0.0)
    opt = GradReg(base, strength=0.5, eps=1e-6, g1_clip=None, g2_clip=None, backend=backend)
    cap = GradCapture(base)
    params = [p for g in groups for p in g["params"]]
    coefs = [2.0, 2.0, 0.0, 0.0, 0.5, 0.5]
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, coefs)
    opt.step(make_closure(model, x, y))
    got = cap.grads[0]
    assert rel_err(got, expected) < 1e-4
    g1 = torch.autograd.grad((model(x) - y).square().mean(), params[2:4])
    assert torch.equal(got[2], g1[0]) and torch.equal(got[3], g1[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_and_schedule(backend):
    model = tanh_mlp(14, dtype=torch.float32)
    x, y = regression_batch(15, dtype=torch.float32)
    opt, _ = gr_opt(model, backend, lr=0.01, eps=1e-2, warmup_steps=2, schedule=lambda s: 0.0 if s == 3 else 1.0)
    per_step = []
    for _ in range(5):
        calls = []
        opt.step(make_closure(model, x, y, calls))
        per_step.append(len(calls))
    assert per_step == [1, 1, 2, 1, 2]  # warmup, warmup, GR, schedule 0, GR
    # Inactive steps need no closure.
    opt2, _ = gr_opt(tanh_mlp(14, dtype=torch.float32), backend, lr=0.01, warmup_steps=1)
    assert not opt2.active and opt2.extra_passes == 0
    (opt2.param_groups[0]["params"][0].sum()).backward()
    opt2.step()
    assert opt2.active
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt2.step()


def test_lr_scheduler_and_shared_param_groups():
    model = tanh_mlp(16, dtype=torch.float32)
    x, y = regression_batch(17, dtype=torch.float32)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = GradReg(base, strength=0.1, eps=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            opt.step(make_closure(model, x, y))
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert len(base.state) == len(list(model.parameters()))  # Adam moments live in the base optimizer


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resume_is_bitwise(backend):
    def make():
        torch.manual_seed(21)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2)).to(torch.bfloat16)
        opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2), strength=0.3, eps=1e-2,
                      warmup_steps=1, backend=backend, seed=5)
        return model, opt

    g = torch.Generator().manual_seed(22)
    batches = [(torch.randn(8, 6, generator=g).bfloat16(), torch.randn(8, 2, generator=g).bfloat16())
               for _ in range(6)]

    def run(model, opt, bs):
        for x, y in bs:
            opt.step(make_closure(model, x, y))

    m1, o1 = make()
    run(m1, o1, batches)
    m2, o2 = make()
    run(m2, o2, batches[:3])
    sd_model, sd_opt = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    assert sd_opt["grad_reg"]["step"] == 3 and "state" in sd_opt
    m3, o3 = make()
    m3.load_state_dict(sd_model)
    o3.load_state_dict(sd_opt)
    assert o3.param_groups is o3.optimizer.param_groups
    run(m3, o3, batches[3:])
    assert bitwise_equal(snapshot(m3), snapshot(m1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_perturbation_survives_with_stochastic_rounding(backend):
    torch.manual_seed(30)
    w = nn.Parameter((0.02 * torch.randn(4096)).to(torch.bfloat16) + 1.0)  # ulp 2^-7 near 1.0
    ratios, shifts = {}, {}
    before = w.detach().clone()
    for rounding in ("nearest", "stochastic"):
        opt = GradReg(torch.optim.SGD([w], lr=0.0), strength=1.0, eps=1e-3, eps_mode="absolute", g1_clip=None,
                      rounding=rounding, backend=backend)
        w.grad = torch.full_like(w, 1.0)  # ε·g = 1e-3 < half an ulp (3.9e-3): nearest erases it
        opt.perturb()
        ratios[rounding] = opt.engine.backend.metrics["perturb_ratio"].item()
        shifts[rounding] = (w.detach().double() - before.double()).mean().item() / 1e-3
        opt.restore()
        assert torch.equal(w.detach(), before)
    assert ratios["nearest"] == 0.0 and shifts["nearest"] == 0.0
    # Stochastic rounding: unbiased (mean shift = ε·g), and the norm ratio shows the rounding noise
    # (each element moves 0 or 1 ulp: ‖δ‖/‖ε·g‖ = sqrt(ulp/ε·g) ≈ 2.8 here).
    assert 0.85 < shifts["stochastic"] < 1.15
    assert 2.0 < ratios["stochastic"] < 3.5


def test_stochastic_rounding_is_unbiased_and_deterministic():
    from grkernels.rounding import stochastic_round

    x = torch.full((200_000,), 1.0 + 1e-3, dtype=torch.float32)  # 0.256 ulp above 1.0 in bf16
    for dtype in (torch.bfloat16, torch.float16):
        r1 = stochastic_round(x, dtype, torch.Generator().manual_seed(0))
        r2 = stochastic_round(x, dtype, torch.Generator().manual_seed(0))
        assert torch.equal(r1, r2)
        assert abs(r1.double().mean().item() - (1.0 + 1e-3)) < 2e-5
        exact = torch.tensor([0.5, -0.25, 3.0])
        assert torch.equal(stochastic_round(exact, dtype, torch.Generator()).float(), exact)


def test_errors_are_clear():
    model = tanh_mlp(40, dtype=torch.float32)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        GradReg(model, strength=1.0, eps=1e-3)
    with pytest.raises(ValueError, match="eps"):
        GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=1.0, eps=0.0)
    with pytest.raises(ValueError, match="estimator"):
        GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=1.0, eps=1e-3, estimator="backward")
    with pytest.raises(ValueError, match="backend"):
        GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=1.0, eps=1e-3, backend="cuda")

    emb = nn.Embedding(10, 3, sparse=True)
    opt = GradReg(torch.optim.SGD(emb.parameters(), lr=0.1), strength=1.0, eps=1e-3)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum().backward())

    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(3, device="meta"))
    opt = GradReg(torch.optim.SGD([a, b], lr=0.1), strength=1.0, eps=1e-3)
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="several devices"):
        opt.perturb()

    exact = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=1.0, eps=1e-3, estimator="exact")
    x, y = regression_batch(41, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="create_graph"):
        exact.step(make_closure(model, x, y))


def test_parameters_without_gradient_are_left_alone_and_storage_never_moves():
    model = tanh_mlp(50, dtype=torch.float32)
    unused = nn.Parameter(torch.randn(4))
    opt = GradReg(torch.optim.SGD([*model.parameters(), unused], lr=0.1), strength=0.5, eps=1e-2)
    x, y = regression_batch(51, dtype=torch.float32)
    ptrs = [p.data_ptr() for p in model.parameters()]
    before = unused.detach().clone()
    for _ in range(2):
        opt.step(make_closure(model, x, y))
    assert unused.grad is None and torch.equal(unused.detach(), before)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_grad_scaler_gives_clear_error_and_restores():
    model = tanh_mlp(60, dtype=torch.float32)
    x, y = regression_batch(61, dtype=torch.float32)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = snapshot(model)
    scaler.scale((model(x) - y).square().mean()).backward()
    opt.perturb()
    scaler.scale((model(x) - y).square().mean()).backward()
    with pytest.raises(RuntimeError, match="GradScaler"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scaler.step(opt)
    assert bitwise_equal(snapshot(model), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gr_math_makes_no_host_sync(backend, monkeypatch):
    model = tanh_mlp(70, dtype=torch.float32)
    x, y = regression_batch(71, dtype=torch.float32)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-2, backend=backend,
                  exclude=[model[0].weight])
    (model(x) - y).square().mean().backward()
    opt.perturb()  # first call builds caches; the second step below is checked
    (model(x) - y).square().mean().backward()
    opt.step()
    opt.zero_grad()

    def no_sync(*a, **k):
        raise AssertionError("host synchronisation in the GR step")

    (model(x) - y).square().mean().backward()
    with monkeypatch.context() as mp:
        for name in ("item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy"):
            mp.setattr(torch.Tensor, name, no_sync)
        mp.setattr(torch.cuda, "synchronize", no_sync)
        opt.perturb()
        (model(x) - y).square().mean().backward()
        opt.restore_and_combine()
        m = opt.metrics(sync=False)
    assert all(isinstance(v, torch.Tensor) for k, v in m.items() if k not in ("strength", "step"))
    opt.step()


def test_failure_inside_perturb_restores_theta_and_g1(monkeypatch):
    import grkernels.backends.reference as ref

    model = tanh_mlp(80, dtype=torch.float32)
    x, y = regression_batch(81, dtype=torch.float32)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-2, backend="torch")
    before = snapshot(model)
    (model(x) - y).square().mean().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    real, calls = ref.perturbed_value, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory half-way through the perturbation")
        return real(*a, **k)

    monkeypatch.setattr(ref, "perturbed_value", failing)
    with pytest.raises(MemoryError):
        opt.perturb()
    assert bitwise_equal(snapshot(model), before)
    assert bitwise_equal([p.grad for p in model.parameters()], g1)
    monkeypatch.setattr(ref, "perturbed_value", real)
    opt.perturb()  # usable again
    (model(x) - y).square().mean().backward()
    opt.step()


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    strength=st.floats(0.01, 3.0),
    excluded_mask=st.integers(0, 63),
    seed=st.integers(0, 10_000),
)
def test_fuzz_forward_estimator_matches_double_backprop(widths, strength, excluded_mask, seed):
    torch.manual_seed(seed)
    dims = [4, *widths, 2]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers).double()
    params = list(model.parameters())
    excluded = [p for i, p in enumerate(params) if excluded_mask >> i & 1]
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    base = torch.optim.SGD(params, lr=0.0)
    opt = GradReg(base, strength=strength, eps=1e-6, g1_clip=None, g2_clip=None, exclude=excluded,
                  backend="torch")
    cap = GradCapture(base)
    coefs = [0.0 if any(p is e for e in excluded) else strength for p in params]
    if all(c == 0 for c in coefs):
        with pytest.raises(RuntimeError, match="no GR parameter"):
            opt.step(make_closure(model, x, y))
        return
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, coefs)
    opt.step(make_closure(model, x, y))
    assert rel_err(cap.grads[0], expected) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_perturb_the_model_weight_and_never_the_masters(backend):
    torch.manual_seed(90)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(torch.bfloat16)
    masters = [nn.Parameter(p.detach().float() + 1e-3 * torch.randn(p.shape)) for p in model.parameters()]
    with torch.no_grad():  # the model computes with its bf16 copy of the masters
        for m, p in zip(masters, model.parameters()):
            m.model_weight = p
            p.copy_(m)
    base = torch.optim.SGD(masters, lr=0.05)
    opt = GradReg(base, strength=0.3, eps=1e-2, eps_mode="absolute", g1_clip=None, g2_clip=None,
                  rounding="nearest", master_weights="model_weight", backend=backend)
    x, y = regression_batch(91, dtype=torch.bfloat16)
    seen, grads = [], []

    def closure():
        model.zero_grad(set_to_none=True)
        loss = (model(x) - y).float().square().mean()
        loss.backward()
        seen.append([p.detach().clone() for p in model.parameters()])
        grads.append([p.grad.float() for p in model.parameters()])
        for m, p in zip(masters, model.parameters()):  # what a mixed-precision trainer does
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad.float())
        return loss

    masters_before = [m.detach().clone() for m in masters]
    at_base_step = []
    base.register_step_pre_hook(lambda *a: at_base_step.append(
        (snapshot(model), [m.detach().clone() for m in masters], [m.grad.clone() for m in masters])))
    opt.step(closure)
    g1, g2 = grads
    # From the weight the gradient was taken at (w = rn(master)), not from the master: master − w is up to half a
    # bf16 ulp per element, far larger than ε·g1, and would dominate g2 − g1.
    expected_w = [(w.float() + 1e-2 * g).to(torch.bfloat16) for w, g in zip(seen[0], g1)]
    assert bitwise_equal(seen[1], expected_w)
    from_master = [(m + 1e-2 * g).to(torch.bfloat16) for m, g in zip(masters_before, g1)]
    assert not bitwise_equal(seen[1], from_master)
    weights, masters_seen, combined = at_base_step[0]
    assert bitwise_equal(weights, seen[0]) and bitwise_equal(masters_seen, masters_before)
    expected = [a + (0.3 / 1e-2) * (b - a) for a, b in zip(g1, g2)]
    assert rel_err(combined, expected) < 1e-5
    with pytest.raises(RuntimeError, match="master_weights"):
        bad = GradReg(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1), strength=1.0, eps=1e-2,
                      master_weights="model_weight", backend=backend)
        bad.param_groups[0]["params"][0].grad = torch.ones(3)
        bad.perturb()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_radius_mode_fixes_perturbation_norm_and_still_estimates_hv(backend, estimator):
    model = tanh_mlp(100)
    x, y = regression_batch(101)
    radius = 1e-6 if estimator == "forward" else 1e-4
    opt, base = gr_opt(model, backend, eps=radius, eps_mode="radius", estimator=estimator)
    cap = GradCapture(base)
    params = list(model.parameters())
    expected = exact_gr_gradient(lambda: (model(x) - y).square().mean(), params, [0.5] * len(params))
    before = snapshot(model)
    moved = []

    def closure():
        moved.append(sum(float((p.detach() - b).square().sum()) for p, b in zip(params, before)) ** 0.5)
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert moved[0] == 0.0 and all(m == pytest.approx(radius, rel=1e-6) for m in moved[1:])  # ‖θ' − θ‖ = ε
    # ‖g1‖ is far from 1: ε_eff = ε/‖g1‖ differs from ε, and the estimate still targets H·g1.
    assert abs(opt.metrics()["g1_norm"] - 1.0) > 0.2
    assert rel_err(cap.grads[0], expected) < 1e-4
    assert opt.metrics()["perturb_ratio"] == pytest.approx(1.0, rel=1e-6)


def test_radius_mode_backends_agree():
    pytest.importorskip("triton")
    from grkernels.kernels import triton_usable

    if not triton_usable("cpu"):
        pytest.skip("triton not usable here")
    got = []
    for backend in ("torch", "triton"):
        model = tanh_mlp(102, dtype=torch.float32)
        x, y = regression_batch(103, dtype=torch.float32)
        opt, base = gr_opt(model, backend, eps=0.05, eps_mode="radius", g1_clip=0.1, g2_clip=0.1)
        cap = GradCapture(base)
        opt.step(make_closure(model, x, y))
        got.append(cap.grads[0])
    assert opt.metrics()["g1_norm"] > 0.1  # both clips active
    # Not bitwise: the backends sum the global norms in different orders (see tests/test_gr_step_triton.py).
    assert rel_err(got[1], got[0]) < 1e-5


def test_mismatched_clips_warn():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match="differ"):
        GradReg(torch.optim.SGD(params, lr=0.1), strength=1.0, eps=1e-3, g1_clip=10.0, g2_clip=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradReg(torch.optim.SGD(params, lr=0.1), strength=1.0, eps=1e-3, g1_clip=10.0, g2_clip=10.0)


def test_triton_backend_without_triton_or_off_device_is_a_clear_error(monkeypatch):
    import grkernels.kernels as K

    model = tanh_mlp(110, dtype=torch.float32)
    x, y = regression_batch(111, dtype=torch.float32)
    monkeypatch.setattr(K, "triton_installed", lambda: False)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-2, backend="triton")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        opt.step(make_closure(model, x, y))
    monkeypatch.setattr(K, "triton_installed", lambda: True)
    monkeypatch.setattr(K, "interpreter_on", lambda: False)  # CPU tensors outside the interpreter
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-2, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opt.step(make_closure(model, x, y))


def test_dtensor_parameters_one_rank_equal_plain_and_mixed_layouts_are_refused(tmp_path):
    """DTensor parameters (FSDP2's layout; the 2-process runs are in test_fsdp2.py) on a 1-rank mesh take the same
    GR steps as plain tensors; a mix of DTensor and plain parameters is refused."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.randn(8, 4, dtype=torch.float64)
        p = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        q = nn.Parameter(w.clone())
        for t in (p, q):
            opt = GradReg(torch.optim.SGD([t], lr=0.1), strength=0.5, eps=1e-2, g1_clip=1.0, g2_clip=1.0)
            for _ in range(2):
                opt.step(lambda t=t: (t.sin() * t).sum().backward())
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-12, atol=1e-12)
        assert not torch.equal(q.detach(), w)
        r = nn.Parameter(torch.randn(3, dtype=torch.float64))
        opt = GradReg(torch.optim.SGD([p, r], lr=0.1), strength=0.5, eps=1e-2)
        with pytest.raises(NotImplementedError, match="DTensor"):
            opt.step(lambda: [t.square().sum().backward() for t in (p, r)])
    finally:
        dist.destroy_process_group()
