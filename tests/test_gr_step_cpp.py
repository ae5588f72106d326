"""The C++ GR-step backend (csrc/gr_step.cpp through ``CppGRStep``) against the torch reference (the specification).

Bitwise where the reference is bitwise-defined (round-to-nearest, clip factors exactly 1); within the norm's
summation-order tolerance when clipping is active; restore always bitwise; stochastic rounding unbiased,
deterministic, independent of the thread count and equal bit for bit to the Triton kernel's stream; no host sync;
lean mode, master weights and a mixed-precision grid as the reference / Triton backend define them; opcheck-clean
ops that torch.compile traces without graph breaks.
"""

from __future__ import annotations

import math

import pytest
import torch
from gr_helpers import (
    FUZZ_DTYPES,
    assert_bitwise_like_torch,
    assert_close_to_torch_with_active_clipping,
    assert_fuzz_case_bitwise,
    clone_params,
    make_params,
    mixed_spec,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from grkernels.backends.base import Shards, StepPlan
from grkernels.backends.reference import TorchGRStep
from grkernels.kernels import cpp_loaded, triton_usable

pytestmark = pytest.mark.skipif(not cpp_loaded(), reason="grkernels._C is not built")


if cpp_loaded():
    from grkernels.backends.cpp import CppGRStep  # also registers the ops' fake kernels


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _g2s(ps, n=2):
    return [[torch.randn(p.shape, dtype=torch.float64).to(p.dtype) for p in ps] for _ in range(n)]


@pytest.mark.parametrize("estimator", ["forward", "central"])
@pytest.mark.parametrize("with_fp64", [False, True])
def test_matches_torch_bitwise_without_clipping(threads, estimator, with_fp64):
    impl = CppGRStep()
    assert_bitwise_like_torch(impl, "cpu", estimator, with_fp64)
    assert impl.last_path == "cpp"


def test_norms_are_accurate_and_thread_independent():
    """The sums of squares against float64, and identical bits for 1 and 2 threads (fixed summation order)."""
    from grkernels.kernels.cpp_gr_step import sumsq as _sumsq

    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=gen).to(dt) for n, dt in [(200003, torch.float32), (70001, torch.bfloat16),
                                                            (1, torch.float16), (0, torch.float32)]]
    exact = sum(float(x.double().square().sum()) for x in xs)
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(_sumsq(xs, (), 0, torch.float32))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])
    assert float(got[0]) == pytest.approx(exact, rel=1e-5)  # fp32 lanes over ≤ 65,536-element chunks, fp64 across
    assert float(_sumsq([], (), 0, torch.float64)) == 0.0


@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_matches_torch_with_active_clipping(estimator):
    assert_close_to_torch_with_active_clipping(CppGRStep(), "cpu", estimator)


def test_abort_missing_gradient_and_nonfinite():
    a = make_params(mixed_spec(True, many=10, seed=5, big=4099), "cpu", seed=6)
    theta0 = [p.detach().clone() for p in a]
    g1 = [p.grad.clone() for p in a]
    impl = CppGRStep()
    plan = StepPlan(params=a, coefs=[1.0] * len(a), eps=0.1, rounding="stochastic", g1_clip=None, seed=1)
    impl.restore(plan)  # before any perturbation: a no-op
    assert all(torch.equal(p.detach(), t) for p, t in zip(a, theta0))
    impl.perturb(plan, 0)
    assert any(not torch.equal(p.detach(), t) for p, t in zip(a, theta0) if p.numel() > 100)
    a[0].grad = None  # e.g. the second backward raised before reaching it
    for p in a[1:]:
        p.grad.normal_()
    impl.restore(plan)
    impl.restore(plan)  # idempotent
    for p, t, g in zip(a, theta0, g1):
        assert torch.equal(p.detach(), t) and torch.equal(p.grad, g)
    impl.perturb(plan, 0)
    a[2].grad = None
    with pytest.raises(RuntimeError, match="none after the second"):
        impl.restore_and_combine(plan)
    assert all(torch.equal(p.detach(), t) for p, t in zip(a, theta0))
    # a NaN/inf in g1: the weights never move, the step reports non-finite
    b = make_params([(torch.bfloat16, 100), (torch.float32, 50), (torch.float64, 9)], "cpu")
    b[1].grad[3] = float("inf")
    b[0].grad[0] = float("nan")
    theta_b = [p.detach().clone() for p in b]
    plan = StepPlan(params=b, coefs=[1.0] * 3, eps=0.1, estimator="central")
    impl.perturb(plan, 0)
    assert all(torch.equal(p.detach(), t) for p, t in zip(b, theta_b))
    assert all(bool((p.grad == 0).all()) for p in b)
    impl.perturb(plan, 1)
    assert all(torch.equal(p.detach(), t) for p, t in zip(b, theta_b))
    impl.restore_and_combine(plan)
    assert not bool(impl.metrics["finite"])
    assert all(torch.equal(p.detach(), t) for p, t in zip(b, theta_b))


def _sr_run(make_impl, theta, grad, seed, point=0):
    p = theta.clone().requires_grad_()
    p.grad = grad.clone()
    impl = make_impl()
    plan = StepPlan(params=[p], coefs=[1.0], eps=1e-3, g1_clip=None, rounding="stochastic", seed=seed,
                    estimator="central" if point else "forward")
    impl.perturb(plan, 0)
    if point:
        impl.perturb(plan, 1)
    out = p.detach().clone()
    impl.restore(plan)
    assert torch.equal(p.detach(), theta)  # restore is bitwise after stochastic rounding too
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_unbiased_deterministic(threads, dtype):
    n = 200003  # several work items, an odd tail
    gen = torch.Generator().manual_seed(0)
    theta = (1.0 + 0.05 * torch.rand(n, generator=gen)).to(dtype)
    grad = (torch.rand(n, generator=gen) * 2 - 0.5).to(dtype)  # mixed signs; ε·g below half an ulp
    r1, r2, r3 = (_sr_run(CppGRStep, theta, grad, s) for s in (11, 11, 12))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    x = theta.float() + 1e-3 * grad.float()  # the exact fp32 target
    near = x.to(dtype)
    down = torch.where(near.float() <= x, near, torch.nextafter(near, torch.full_like(near, -math.inf)))
    up = torch.where(near.float() >= x, near, torch.nextafter(near, torch.full_like(near, math.inf)))
    assert bool(((r1 == down) | (r1 == up)).all())  # always one of the two neighbours of x
    ulp = torch.finfo(dtype).eps
    target = (x.double() - theta.double()).mean()
    assert abs(float((r1.double() - theta.double()).mean() - target)) < 5 * ulp / math.sqrt(n)  # unbiased
    m = _sr_run(CppGRStep, theta, grad, 11, point=1)  # θ − ε·v: its own stream, unbiased towards −ε·v
    assert abs(float((m.double() - theta.double()).mean() + target)) < 5 * ulp / math.sqrt(n)


@pytest.mark.skipif(not triton_usable("cpu"), reason="triton interpreter not usable here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_the_triton_stream(dtype):
    """One seed perturbs to the same bits on the C++ and the Triton backend (Philox4x32-10, same counters)."""
    from grkernels.backends.triton import TritonGRStep

    gen = torch.Generator().manual_seed(1)
    theta = (0.3 * torch.randn(5003, generator=gen)).to(dtype)
    grad = torch.randn(5003, generator=gen).to(dtype)
    for point in (0, 1):
        a = _sr_run(CppGRStep, theta, grad, 2**40 + 3, point)
        b = _sr_run(lambda: TritonGRStep("cpu", chunk=2048, block=1024), theta, grad, 2**40 + 3, point)
        assert torch.equal(a, b)
        assert not torch.equal(a, theta.to(torch.float64).add(1e-3 * grad.double()).to(dtype))  # not nearest


def test_no_host_sync(monkeypatch):
    a = make_params(mixed_spec(False, many=5, big=4099), "cpu")
    keep = make_params([(torch.float32, 9)], "cpu")
    impl = CppGRStep()
    for step in range(2):  # the first step allocates; the second is checked
        plan = StepPlan(params=a, coefs=[1.0] * len(a), keep=keep, eps=1e-2, estimator="central", seed=step)
        with monkeypatch.context() as mp:
            if step:
                def no_sync(*args, **kw):
                    raise AssertionError("host read in the GR step")

                for name in ("item", "__bool__", "tolist", "__float__", "__int__", "numpy"):
                    mp.setattr(torch.Tensor, name, no_sync)
            impl.perturb(plan, 0)
            impl.perturb(plan, 1)
            impl.restore_and_combine(plan)
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in impl.metrics.values())


@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_lean_mode_keeps_the_correction_accurate_and_saves_memory(estimator):
    """lean: g1 of fp32 gradients saved in bf16, the gradient buffer carries g − g1 between perturb and
    combine, so the correction keeps fp32 accuracy; equal to the Triton backend's lean mode by construction
    (same expressions), checked here against the exact (non-lean) step."""
    torch.manual_seed(1)
    n = 70001
    theta = torch.randn(n)
    g1 = torch.randn(n)
    h = torch.randn(n)  # plays H·v
    gamma, eps = 0.01, 1e-3
    out = {}
    for lean in (False, True):
        p = theta.clone().requires_grad_()
        p.grad = g1.clone()
        impl = CppGRStep(lean=lean)
        plan = StepPlan(params=[p], coefs=[gamma], eps=eps, g1_clip=50.0, g2_clip=50.0, estimator=estimator)
        impl.perturb(plan, 0)
        if lean:  # the buffer holds −g1 (forward) or −bf16(g1) (central) instead of zeros
            target = g1 if estimator == "forward" else g1.to(torch.bfloat16).float()
            assert torch.equal(p.grad, -target)
        p.grad.add_(g1 + eps * h)
        if estimator == "central":
            impl.perturb(plan, 1)
            p.grad.add_(g1 - eps * h)
        impl.restore_and_combine(plan)
        assert torch.equal(p.detach(), theta)
        out[lean] = (p.grad.clone(), {k: float(v) for k, v in impl.metrics.items()}, impl.extra_bytes())
    exact_corr = out[False][0] - g1
    lean_corr = out[True][0] - g1.to(torch.bfloat16).float()
    assert float((lean_corr - exact_corr).norm()) <= 2e-3 * float(exact_corr.norm())
    for k in ("g1_norm", "g2_norm", "gr_rel", "perturb_ratio"):
        assert out[True][1][k] == pytest.approx(out[False][1][k], rel=1e-4)
    points = 2 if estimator == "central" else 1
    assert out[False][2] == n * (4 + 4 * points)  # θ + g1 (+ g₊), fp32
    assert out[True][2] == n * (4 + 2 * points)  # g1 (and g₊) in bf16


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_master_weights_perturb_the_model_weight(rounding):
    """StepPlan.model_attr: the bf16 model weight is perturbed (from itself) and restored, the fp32 master never
    written; the gradient equals the torch backend's; nearest rounding equals it bitwise, stochastic rounding
    lands on a neighbour of w + ε·g1 and is unbiased."""
    sizes = [70001, 7, 1]
    runs = []
    for impl in (TorchGRStep(), CppGRStep()):
        gen = torch.Generator().manual_seed(21)
        masters = [torch.randn(n, generator=gen) for n in sizes]
        for m in masters:
            m.model = m.to(torch.bfloat16)
            m.grad = 1e-2 * torch.randn(m.shape, generator=gen)
        m0, w0, g1 = [m.clone() for m in masters], [m.model.clone() for m in masters], [m.grad.clone() for m in masters]
        plan = StepPlan(params=masters, coefs=[0.1] * 3, eps=1e-2, g1_clip=None, g2_clip=None, rounding=rounding,
                        seed=4, model_attr="model")
        impl.perturb(plan, 0)
        assert all(torch.equal(m, m_) for m, m_ in zip(masters, m0))
        pert = [m.model.clone() for m in masters]
        for m in masters:
            m.grad.add_(torch.ones_like(m))
        impl.restore_and_combine(plan)
        assert all(torch.equal(m.model, w) for m, w in zip(masters, w0))
        assert all(torch.equal(m, m_) for m, m_ in zip(masters, m0))
        runs.append((pert, [m.grad for m in masters]))
    (pa, ga), (pb, gb) = runs
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    if rounding == "nearest":
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        return
    x = w0[0].float() + 1e-2 * g1[0]
    near = x.to(torch.bfloat16)
    other = torch.nextafter(near, torch.where(near.float() < x, math.inf, -math.inf).to(torch.bfloat16))
    assert bool(((pb[0] == near) | (pb[0] == other)).all())
    assert abs(float((pb[0].double() - x.double()).mean())) < 4 * 2**-8 / math.sqrt(sizes[0])


class _GridShards(Shards):
    """One process, but the model computes in bf16 from fp32 parameters (FSDP2's MixedPrecisionPolicy)."""

    def compute_dtype(self, p):
        return torch.bfloat16


def test_mixed_precision_grid_equals_the_reference():
    a = make_params([(torch.float32, 70001), (torch.float32, 33)], "cpu", seed=8, scale=1e-2)
    b = clone_params(a)
    theta0 = [p.detach().clone() for p in a]
    outs = []
    for impl, ps in ((TorchGRStep(), a), (CppGRStep(), b)):
        plan = StepPlan(params=ps, coefs=[0.2, 0.2], eps=1.0, g1_clip=None, g2_clip=None, rounding="nearest",
                        shards=_GridShards())
        impl.perturb(plan, 0)
        pert = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad.add_(1.0)
        impl.restore_and_combine(plan)
        outs.append((pert, [p.grad.clone() for p in ps], impl.metrics))
    for x, y, t in zip(outs[0][0], outs[1][0], theta0):
        assert torch.equal(x, y)
        assert torch.equal(x, x.to(torch.bfloat16).float())  # on the bf16 grid: the model's cast keeps it
        assert not torch.equal(x.to(torch.bfloat16), t.to(torch.bfloat16))
    assert all(torch.equal(x, y) for x, y in zip(outs[0][1], outs[1][1]))
    assert all(torch.equal(p.detach(), t) for p, t in zip(b, theta0))
    torch.testing.assert_close(outs[1][2]["perturb_ratio"], outs[0][2]["perturb_ratio"], rtol=1e-5, atol=0)


def test_what_the_kernels_do_not_take_runs_the_reference():
    base = torch.randn(6, 4)
    p = base.t().requires_grad_()  # not contiguous
    p.grad = torch.randn(4, 6)
    q = p.detach().clone().requires_grad_()
    q.grad = p.grad.clone()
    kw = dict(coefs=[1.0], eps=1e-2, g1_clip=None, g2_clip=None, rounding="nearest")
    impl = CppGRStep()
    impl.perturb(StepPlan(params=[p], **kw), 0)
    assert impl.last_path.startswith("torch (") and "contiguous" in impl.last_path
    TorchGRStep().perturb(StepPlan(params=[q], **kw), 0)
    assert torch.equal(p.detach(), q.detach())
    impl.restore(StepPlan(params=[p], **kw))
    assert torch.equal(p.detach(), base.t())


def test_bad_op_input_is_a_clear_error():
    ops = torch.ops.grkernels_cpp
    w, g = [torch.zeros(4)], [torch.zeros(5)]
    one, yes = torch.ones(()), torch.tensor(True)
    with pytest.raises(RuntimeError, match="5 elements, expected 4"):
        ops.gr_perturb(w, g, [torch.empty(4)], [torch.empty(5)], [], one, yes, 0, 0, 0, 0, None, False)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.gr_sumsq([torch.zeros(3, dtype=torch.int32)], [], 0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.gr_sumsq([torch.zeros(4, 4).t()], [], 0, False)
    with pytest.raises(RuntimeError, match="point must be 0 or 1"):
        ops.gr_perturb(w, w, w, w, [], one, yes, 2, 0, 0, 0, None, False)


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70000), min_size=1, max_size=6),
    dts=st.lists(st.sampled_from(FUZZ_DTYPES), min_size=6, max_size=6),
    estimator=st.sampled_from(["forward", "central"]),
    seed=st.integers(0, 2**40),
)
def test_fuzz_shapes_dtypes_bitwise(sizes, dts, estimator, seed):
    assert_fuzz_case_bitwise(CppGRStep(), "cpu", sizes, dts, estimator, seed)


def _op_args():
    ws = [torch.randn(5), torch.randn(3, 4).to(torch.bfloat16)]
    gs = [torch.randn(5), torch.randn(3, 4).to(torch.bfloat16)]
    saves = [[torch.randn(t.shape).to(t.dtype) for t in ts] for ts in (ws, gs, gs)]  # finite: outputs compared
    return ws, gs, saves


def test_opcheck():
    ops = torch.ops.grkernels_cpp
    ws, gs, (th, g1, gp) = _op_args()
    torch.library.opcheck(ops.gr_sumsq, (gs, [], 0, False))
    torch.library.opcheck(ops.gr_sumsq, (gs, g1, 2, True))
    for point in (0, 1):
        torch.library.opcheck(
            ops.gr_perturb, (ws, gs, th, g1, gp, torch.tensor(1e-2), torch.tensor(True), point, 1, 5, 0, None, False)
        )
    for kind in (0, 1, 2):
        args = (ws, gs, th, g1, gp, [0.1, 0.2], torch.tensor(1.0), torch.tensor(0.5), kind, False, False)
        torch.library.opcheck(ops.gr_combine, args)


def test_compile_fullgraph_traces_the_gr_passes():
    """A GR step written with the ops compiles without graph breaks and equals eager bitwise."""
    ops = torch.ops.grkernels_cpp

    def gr_step(ws, gs, th, g1, g2, step, gamma_over_eps):
        n1 = ops.gr_sumsq(gs, [], 0, False).sqrt()
        ops.gr_perturb(ws, gs, th, g1, [], step, torch.isfinite(n1), 0, 0, 0, 0, None, False)
        torch._foreach_add_(gs, g2)  # stands for the second backward
        one = torch.ones(())
        ops.gr_combine(ws, gs, th, g1, [], gamma_over_eps, one, one, 0, False, False)
        return n1

    compiled = torch.compile(gr_step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (gr_step, compiled):
        torch.manual_seed(0)
        ws, gs, (th, g1, _) = _op_args()
        g2 = [torch.randn_like(g) for g in gs]
        n1 = fn(ws, gs, th, g1, g2, torch.tensor(1e-2), [0.1, 0.2])
        results.append((n1, ws, gs))
    (n_a, w_a, g_a), (n_b, w_b, g_b) = results
    assert torch.equal(n_a, n_b)
    assert all(torch.equal(x, y) for x, y in zip(w_a + g_a, w_b + g_b))


def test_gradreg_auto_picks_cpp_on_cpu_and_equals_the_torch_backend():
    """backend="auto" on CPU tensors is the C++ backend; three AdamW steps equal backend="torch" bitwise (fp32,
    clipping off: the arithmetic is bitwise-defined), lean mode warns only on torch."""
    from gr_helpers import make_closure, regression_batch, tanh_mlp

    from grkernels import GradReg

    results = []
    for backend in ("auto", "torch"):
        model = tanh_mlp(7, dtype=torch.float32)
        x, y = regression_batch(8, dtype=torch.float32)
        opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2), strength=0.5, eps=1e-2, g1_clip=None,
                      g2_clip=None, backend=backend)
        for _ in range(3):
            opt.step(make_closure(model, x, y))
        results.append(([p.detach().clone() for p in model.parameters()], type(opt.engine.backend).__name__))
    assert results[0][1] == "CppGRStep" and results[1][1] == "TorchGRStep"
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    with pytest.warns(UserWarning, match="lean"):
        GradReg(torch.optim.SGD(tanh_mlp(1).parameters(), lr=0.1), strength=0.1, eps=1e-2, lean=True,
                backend="torch")._make_backend(torch.device("cpu"))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 2100), min_size=1, max_size=6),
    dts=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]), min_size=6,
                 max_size=6),
    bad=st.lists(st.sampled_from([None, "inf", "-inf", "nan", "max"]), min_size=6, max_size=6),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_all_finite_is_exact(sizes, dts, bad, strided, seed):
    """``all_finite`` (Σx² in float64 in one C++ pass where it can, the foreach max-abs reference elsewhere) is
    True exactly when every element is finite: an inf, −inf or NaN anywhere is caught, and the dtype's largest
    finite value in every element (whose square overflows fp32) is no false alarm."""
    from grkernels.backends import all_finite
    from grkernels.backends.reference import all_finite as reference_all_finite

    g = torch.Generator().manual_seed(seed)
    tensors = []
    for n, dt, b in zip(sizes, dts, bad):
        t = torch.randn(2 * n if strided else n, generator=g, dtype=torch.float64).to(dt)
        t = t[::2] if strided else t
        if b == "max":
            t.fill_(torch.finfo(dt).max)
        elif b is not None:
            t[int(torch.randint(0, n, (), generator=g))] = float(b)
        tensors.append(t)
    expected = all(bool(torch.isfinite(t.double()).all()) for t in tensors)
    assert bool(all_finite(tensors)) is expected
    assert bool(reference_all_finite(tensors)) is expected
    narrow = [t.contiguous() for t in tensors if t.dtype != torch.float64]  # the C++ path proper
    assert bool(all_finite(narrow)) is all(bool(torch.isfinite(t.double()).all()) for t in narrow)
