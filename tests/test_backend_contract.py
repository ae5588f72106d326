"""The GR-step backend contract (``grkernels.backends.base.GRBackend``), checked on every backend this machine
has: the torch reference, the C++ kernels (when ``grkernels._C`` is built) and Triton (CUDA, or the interpreter
on CPU), against an independent float64 recomputation of the step on fresh random inputs.

Covered: θ' and the combined gradient for the forward and central estimators, absolute and radius steps, clipping
off / inactive / active, several tensors of odd sizes in bf16/fp16/fp32/fp64, excluded ("keep") parameters,
numeric extremes (elements of 3e19 and 1e-25, inf/NaN), the metrics, the abort at every point (after the combine
too), the exact estimator, master weights, stochastic rounding statistics, no host synchronisation, and the fast
backends' lean mode (accuracy, its exact abort, in-place writes detected).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from gr_helpers import BACKENDS, assert_bitwise_like_torch, assert_fuzz_case_bitwise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grkernels.backends import all_finite, make_backend
from grkernels.backends.base import GRBackend, StepPlan
from grkernels.backends.reference import TorchGRStep
from grkernels.backends.reference import all_finite as reference_all_finite
from grkernels.kernels import cpp_loaded, triton_usable

FAST = [b for b in BACKENDS if not (isinstance(b, str) and b == "torch")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def backend(name: str, *, lean: bool = False, model_attr: str | None = None) -> GRBackend:
    if name == "triton":  # small chunks: several programs per tensor at test sizes; 256-element blocks are
        from grkernels.backends.triton import TritonGRStep  # the interpreter's sweet spot

        return TritonGRStep(DEVICE, lean=lean, model_attr=model_attr, chunk=1024, block=256)
    return make_backend(name, DEVICE, lean=lean, model_attr=model_attr)


def tensor(n: int, dtype: torch.dtype, scale: float, gen: torch.Generator) -> torch.Tensor:
    return (scale * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)


def params_with_grads(spec, scale: float, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for dt, n in spec:
        p = tensor(n, dt, 0.5, gen).requires_grad_()
        p.grad = tensor(n, dt, scale, gen)
        out.append(p)
    return out


def f64(ts) -> list[torch.Tensor]:
    return [t.detach().double().cpu().clone() for t in ts]


def norm64(ts) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in ts))


def clip64(n: float, c: float | None) -> float:
    return 1.0 if c is None else min(1.0, c / (n + 1e-6))


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t``'s dtype at each element's magnitude (float64 tensor)."""
    fi = torch.finfo(t.dtype)
    a = t.detach().double().abs().cpu()
    e = torch.floor(torch.log2(a.clamp_min(fi.tiny)))
    return torch.exp2(e) * fi.eps


def run_step(impl, plan: StepPlan, g2s, keep_add: float = 1.0) -> list[list[torch.Tensor]]:
    """perturb at each point, let "the backward" accumulate ``g2s[point]``, combine; the θ' of each point."""
    perturbed = []
    for point in range(2 if plan.estimator == "central" else 1):
        impl.perturb(plan, point)
        perturbed.append([w.detach().clone() for w in plan.params])
        for p, g in zip(plan.params, g2s[point]):
            p.grad.add_(g)
        for p in plan.keep:
            p.grad.add_(keep_add)
    impl.restore_and_combine(plan)
    return perturbed


# ------------------------------------------------------------------------------------------ the float64 check
@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1.0, 1.0, 3e19, 1e-25]))
    allowed = [d for d in DTYPES if scale == 1.0 or d != torch.float16]  # fp16 holds neither extreme
    dts = draw(st.lists(st.sampled_from(allowed), min_size=n, max_size=n))
    sizes = draw(st.lists(st.integers(0, 300) | st.sampled_from([1, 1025, 2049]), min_size=n, max_size=n))
    if sum(sizes) == 0:
        sizes[0] = 3
    keep = draw(st.lists(st.tuples(st.sampled_from(allowed), st.integers(1, 50)), max_size=2))
    eps_mode = draw(st.sampled_from(["absolute", "radius"]))
    clip = draw(st.sampled_from([None, "inactive", "active"]))
    if scale > 1 and eps_mode == "radius":  # unclipped, γ·‖v‖/ε·g2 ≈ 1e41 itself exceeds float32: not a test
        clip = "active"
    return dict(
        spec=list(zip(dts, sizes)), keep=keep, scale=scale, clip=clip, eps_mode=eps_mode,
        estimator=draw(st.sampled_from(["forward", "central"])), eps=draw(st.sampled_from([1e-3, 3e-2])),
        seed=draw(st.integers(0, 2**31)),
    )


def check_against_float64(name: str, case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    scale = case["scale"]
    ps = params_with_grads(case["spec"], scale, gen)
    keep = params_with_grads(case["keep"], scale, gen)
    theta, g1, g1_keep = f64(ps), f64([p.grad for p in ps]), [p.grad.clone() for p in keep]
    points = 2 if case["estimator"] == "central" else 1
    g2s = [[tensor(p.numel(), p.dtype, scale, gen) for p in ps] for _ in range(points)]
    n1 = norm64(g1)
    # active: s1 ≈ 0.3 (c1 is compared with ‖g1‖ + 1e-6, as torch's clip_grad_norm_ does), ‖v‖ ≤ 10
    clip = {None: None, "inactive": 1e3 * n1 + 1.0, "active": min(0.3 * (n1 + 1e-6), 10.0)}[case["clip"]]
    coefs = [0.05 * (1 + i % 3) for i in range(len(ps))]
    plan = StepPlan(params=ps, coefs=coefs, keep=keep, eps=case["eps"], g1_clip=clip, g2_clip=clip,
                    estimator=case["estimator"], rounding="nearest", eps_mode=case["eps_mode"], seed=case["seed"])
    impl = backend(name)
    perturbed = run_step(impl, plan, g2s)

    wide = any(dt == torch.float64 for dt, _ in case["spec"])
    eps_acc = 2.0**-52 if wide else 2.0**-23
    s1 = clip64(n1, clip)
    vnorm = s1 * n1
    eps_eff = case["eps"] / vnorm if case["eps_mode"] == "radius" else case["eps"]
    for point, pert in enumerate(perturbed):  # θ ± ε_eff·v, within one rounding of the weight's dtype
        sign = 1.0 if point == 0 else -1.0
        for w, t, g in zip(pert, theta, g1):
            target = t + sign * eps_eff * s1 * g
            err = (w.double().cpu() - target).abs()
            assert bool(torch.isfinite(err).all())
            eps_w = 2.0**-52 if w.dtype == torch.float64 else 2.0**-23  # θ' is computed in float32 below fp64
            tol = ulp(w) + ulp(target.to(w.dtype)) + 64 * max(eps_w, eps_acc) * (eps_eff * s1 * g).abs() + 1e-300
            assert bool((err <= tol).all()), (point, w.dtype, float((err - tol).max()))
    wide_weights = all(p.dtype in (torch.float32, torch.float64) for p in ps)  # no rounding eats the step
    if case["eps_mode"] == "radius" and n1 > 0 and wide_weights:  # ‖θ' − θ‖ = ε whatever the gradient's scale
        realised = norm64([w.double().cpu() - t for w, t in zip(perturbed[0], theta)])
        assert realised == pytest.approx(case["eps"], rel=1e-3)

    g2 = [f64(g) for g in g2s]
    if case["estimator"] == "central":
        sa, sb = clip64(norm64(g2[0]), clip), clip64(norm64(g2[1]), clip)
        ga, gb, div = g2[0], g2[1], 2 * eps_eff
    else:
        sa, sb = clip64(norm64(g2[0]), clip), s1
        ga, gb, div = g2[0], g1, eps_eff
    corr_norm = 0.0
    for p, t, g, a, b, c in zip(ps, theta, g1, ga, gb, coefs):
        assert torch.equal(p.detach().double().cpu(), t)  # θ restored bitwise
        corr = (c / div) * (sa * a - sb * b)
        corr_norm += float(corr.square().sum())
        expected = g + corr
        got = p.grad.double().cpu()
        assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(expected).all())
        tol = ulp(p.grad) + ulp(expected.to(p.grad.dtype)) + 64 * eps_acc * (
            g.abs() + (c / div) * (sa * a.abs() + sb * b.abs()))
        assert bool(((got - expected).abs() <= tol).all()), (p.dtype, float(((got - expected).abs() - tol).max()))
    for p, g in zip(keep, g1_keep):
        assert torch.equal(p.grad, g)  # keep parameters: g1, bitwise
    m = {k: v.double().cpu() for k, v in impl.metrics.items() if k != "finite"}
    assert bool(impl.metrics["finite"])
    rel = 1e-4 if not wide else 1e-9
    assert float(m["g1_norm"]) == pytest.approx(n1, rel=rel)
    assert float(m["g2_norm"]) == pytest.approx(norm64(g2[-1]), rel=rel)
    if n1 > 0 and corr_norm > 0:
        assert float(m["gr_rel"]) == pytest.approx(math.sqrt(corr_norm) / n1, rel=1e-2, abs=1e-6)
    if n1 > 0:
        realised = norm64([w.double().cpu() - t for w, t in zip(perturbed[0], theta)])
        assert float(m["perturb_ratio"]) == pytest.approx(realised / (eps_eff * s1 * n1), rel=1e-3)
    assert all(math.isfinite(float(v)) for v in m.values())


@pytest.mark.parametrize("name", BACKENDS)
def test_step_matches_float64_reference(name):
    """Hypothesis over dtypes, sizes, scales (1, 3e19, 1e-25 per element), clipping, estimators and step modes:
    θ', θ restored, the combined gradient, keep parameters and the metrics against a float64 recomputation."""
    examples = 10 if name == "triton" else 60

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def check(case):
        check_against_float64(name, case)

    check()


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_fast_backends_equal_the_reference_bitwise(name, estimator):
    """Where the reference is bitwise-defined (round-to-nearest, clip factors exactly 1), a fast backend gives the
    same bits: θ' at every point, θ after restore, the combined gradient, keep parameters (fp64 in the step or
    not), and over random shapes and dtypes."""
    small = name == "triton" and DEVICE == "cpu"  # the interpreter: fewer, smaller tensors
    assert_bitwise_like_torch(backend(name), DEVICE, estimator, with_fp64=estimator == "central",
                              many=40 if small else 200, big=5003 if small else 2**16 + 3)

    @settings(max_examples=3 if name == "triton" else 10, deadline=None)
    @given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4),
           dts=st.lists(st.sampled_from(["float32", "bfloat16", "float16", "float64"]), min_size=4, max_size=4),
           seed=st.integers(0, 2**40))
    def fuzz(sizes, dts, seed):
        assert_fuzz_case_bitwise(backend(name), DEVICE, sizes, dts, estimator, seed)

    fuzz()


# ------------------------------------------------------------------------------------------ numeric extremes
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_finite_gradients_are_finite(name, dtype):
    """Elements of 3e19 (their squares overflow float32): the norm is the true one, the step is finite and
    perturbs, both with clipping (θ' − θ bounded by ε·c1) and without; ``all_finite`` agrees."""
    gen = torch.Generator().manual_seed(1)
    ps = params_with_grads([(dtype, 301), (dtype, 7)], 1.0, gen)
    for p in ps:
        p.grad = torch.full_like(p.grad, 3e19) * torch.sign(tensor(p.numel(), torch.float32, 1.0, gen)).to(dtype)
    theta = [p.detach().clone() for p in ps]
    exact = 3e19 * math.sqrt(308)
    impl = backend(name)
    plan = StepPlan(params=ps, coefs=[0.1, 0.1], eps=1e-3, g1_clip=1.0, g2_clip=1.0, rounding="nearest")
    assert bool(all_finite([p.grad for p in ps])) and bool(reference_all_finite([p.grad for p in ps]))
    impl.perturb(plan, 0)
    assert float(impl.metrics["g1_norm"]) == pytest.approx(float(torch.tensor(3e19, dtype=dtype)) * math.sqrt(308),
                                                           rel=1e-5)
    assert exact / 2 < float(impl.metrics["g1_norm"]) < 2 * exact
    moved = norm64([p.detach().double() - t.double() for p, t in zip(ps, theta)])
    if dtype == torch.float32:
        assert moved == pytest.approx(1e-3, rel=1e-4)  # ε·c1: the clipped step, as for any gradient
    else:
        assert moved < 0.05  # bf16 weights round ε·v (sub-ulp) away or to a neighbour
    for p in ps:
        p.grad.add_(p.grad.new_full(p.shape, -1e19))
    impl.restore_and_combine(plan)
    assert bool(impl.metrics["finite"])
    assert all(math.isfinite(float(v)) for v in impl.metrics.values())
    assert all(torch.equal(p.detach(), t) for p, t in zip(ps, theta))


@pytest.mark.parametrize("name", BACKENDS)
def test_radius_mode_with_a_tiny_gradient_moves_by_eps(name):
    """1e-25 per element in fp32 (‖g1‖² underflows float32): the radius step still moves θ by ε, not by
    ε/finfo.tiny; perturb_ratio and gr_rel are finite."""
    gen = torch.Generator().manual_seed(2)
    ps = params_with_grads([(torch.float32, 1001), (torch.float32, 3)], 1e-25, gen)
    theta, g1 = f64(ps), f64([p.grad for p in ps])
    impl = backend(name)
    plan = StepPlan(params=ps, coefs=[0.1, 0.1], eps=1e-3, g1_clip=10.0, g2_clip=10.0, eps_mode="radius")
    impl.perturb(plan, 0)
    moved = norm64([w.double().cpu() - t for w, t in zip(f64(ps), theta)])
    assert moved == pytest.approx(1e-3, rel=1e-3)
    assert float(impl.metrics["g1_norm"]) == pytest.approx(norm64([g * 1e25 for g in g1]) * 1e-25, rel=1e-5)
    assert float(impl.metrics["perturb_ratio"]) == pytest.approx(1.0, rel=1e-3)
    for p in ps:
        p.grad.add_(1e-25 * torch.randn(p.shape, generator=gen).to(DEVICE))
    impl.restore_and_combine(plan)
    assert all(math.isfinite(float(v)) for v in impl.metrics.values())
    assert bool(impl.metrics["finite"])


@pytest.mark.parametrize("name", BACKENDS)
def test_tiny_gradient_norm_is_accurate(name):
    """‖g1‖ of 1e-25-sized fp32 elements and of 1e-160 / 1e200-sized fp64 elements, against float64 math."""
    gen = torch.Generator().manual_seed(3)
    for dtype, scale in ((torch.float32, 1e-25), (torch.bfloat16, 1e-25), (torch.float64, 1e-160),
                         (torch.float64, 1e200)):
        ps = params_with_grads([(dtype, 513), (dtype, 2)], scale, gen)
        exact = norm64([p.grad.double().cpu() / scale for p in ps]) * scale
        impl = backend(name)
        impl.perturb(StepPlan(params=ps, coefs=[0.1, 0.1], eps=1e-3, g1_clip=None), 0)
        assert float(impl.metrics["g1_norm"]) == pytest.approx(exact, rel=1e-6), (dtype, scale)
        impl.restore(StepPlan(params=ps, coefs=[0.1, 0.1]))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("where", ["g1", "g_plus", "g2"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN·0 in the interpreter
def test_nonfinite_values_never_reach_the_weights(name, where):
    """inf/NaN in g1 (the weights never move), in g₊ (central) or in g2: the flag is False, θ is restored."""
    gen = torch.Generator().manual_seed(4)
    ps = params_with_grads([(torch.bfloat16, 100), (torch.float32, 50), (torch.float16, 9)], 1.0, gen)
    theta = [p.detach().clone() for p in ps]
    if where == "g1":
        ps[1].grad[3] = float("inf")
        ps[0].grad[0] = float("nan")
    impl = backend(name)
    plan = StepPlan(params=ps, coefs=[1.0] * 3, eps=0.1, estimator="central")
    impl.perturb(plan, 0)
    if where == "g1":
        assert all(torch.equal(p.detach(), t) for p, t in zip(ps, theta))
    ps[2].grad[1] = float("nan") if where == "g_plus" else 0.0
    impl.perturb(plan, 1)
    ps[1].grad[0] = float("-inf") if where == "g2" else 0.0
    impl.restore_and_combine(plan)
    assert not bool(impl.metrics["finite"])
    assert all(torch.equal(p.detach(), t) for p, t in zip(ps, theta))


# ------------------------------------------------------------------------------------------ the abort
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("when", ["point0", "point1", "combined", "missing_grad"])
def test_restore_puts_theta_and_g1_back_bitwise_at_every_point(name, when):
    """restore(): θ and every gradient (GR and keep parameters) back to g1, bitwise, whether the abort comes after
    point 0, after point 1, or after the combine (then only the gradients: θ is back); idempotent; a no-op before
    anything was saved and after it ran. A GR parameter without a gradient at θ' is an error that restores."""
    gen = torch.Generator().manual_seed(5)
    spec = [(torch.float32, 300), (torch.bfloat16, 1025), (torch.float16, 7), (torch.float64, 5)]
    ps = params_with_grads(spec, 1.0, gen)
    keep = params_with_grads([(torch.float32, 4)], 1.0, gen)
    theta = [p.detach().clone() for p in ps]
    g1, g1_keep = [p.grad.clone() for p in ps], [p.grad.clone() for p in keep]
    impl = backend(name)
    plan = StepPlan(params=ps, coefs=[0.5] * 4, keep=keep, eps=0.1, rounding="stochastic", g1_clip=None,
                    estimator="forward" if when == "point0" else "central", seed=3)
    impl.restore(plan)  # nothing saved yet: a no-op
    assert all(torch.equal(p.detach(), t) and torch.equal(p.grad, g) for p, t, g in zip(ps, theta, g1))
    impl.perturb(plan, 0)
    assert any(not torch.equal(p.detach(), t) for p, t in zip(ps, theta))
    for p in ps + keep:
        p.grad.normal_(generator=gen)  # part of a second backward
    if when != "point0":
        impl.perturb(plan, 1)
        for p in ps + keep:
            p.grad.normal_(generator=gen)
    ps[0].grad = None  # the backward at θ' raised before reaching it
    if when == "missing_grad":
        with pytest.raises(RuntimeError, match="none after the second"):
            impl.restore_and_combine(plan)
    elif when == "combined":
        ps[0].grad = torch.zeros_like(ps[0])
        impl.restore_and_combine(plan)
        assert not all(torch.equal(p.grad, g) for p, g in zip(ps, g1))
        impl.restore(plan)
    else:
        impl.restore(plan)
    impl.restore(plan)  # idempotent
    for p, t, g in zip(ps, theta, g1):
        assert torch.equal(p.detach(), t) and torch.equal(p.grad, g), p.dtype
    assert all(torch.equal(p.grad, g) for p, g in zip(keep, g1_keep))
    for p in ps:  # after the abort the backend holds nothing to write back
        p.grad.add_(1.0)
    impl.restore(plan)
    assert all(torch.equal(p.grad, g + 1.0) for p, g in zip(ps, g1))


# ------------------------------------------------------------------------------------------ other estimators
@pytest.mark.parametrize("name", BACKENDS)
def test_exact_estimator(name):
    """combine_hvp: grad ← g1 + γ_p·H·v and clip_scale_g1 = min(1, c1/(‖g1‖ + 1e-6)), against float64; the
    metrics' finite flag is False for a non-finite H·v; huge finite values are finite."""
    gen = torch.Generator().manual_seed(6)
    for scale in (1.0, 3e19):
        ps = params_with_grads([(torch.float64, 30), (torch.float32, 20), (torch.bfloat16, 9)], scale, gen)
        g1 = f64([p.grad for p in ps])
        hvp = [tensor(p.numel(), p.dtype, scale, gen) for p in ps]
        plan = StepPlan(params=ps, coefs=[0.5, 2.0, 1.0], eps=1e-3, g1_clip=1.0, estimator="exact")
        impl = backend(name)
        assert float(impl.clip_scale_g1(plan)) == pytest.approx(clip64(norm64(g1), 1.0), rel=1e-6)
        impl.combine_hvp(plan, hvp)
        for p, g, h, c in zip(ps, g1, f64(hvp), plan.coefs):
            expected = g + c * h
            assert bool(((p.grad.double().cpu() - expected).abs() <= 2 * ulp(p.grad) + 1e-12 * expected.abs()).all())
        assert set(impl.metrics) == {"g1_norm", "g2_norm", "perturb_ratio", "gr_rel", "finite"}
        assert bool(impl.metrics["finite"])
        assert float(impl.metrics["g1_norm"]) == pytest.approx(norm64(g1), rel=1e-6)
    hvp[0][0] = float("nan")
    impl.combine_hvp(plan, hvp)
    assert not bool(impl.metrics["finite"])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_master_weights_perturb_the_model_weight(name, rounding):
    """StepPlan.model_attr (fp32 masters, bf16 model weights): the model weight is perturbed from itself, saved
    and restored bitwise, the master never written; nearest rounding equals w + ε·g1 rounded, stochastic lands on
    a neighbour and is unbiased; the combined gradient equals the plain parameters' one."""
    gen = torch.Generator().manual_seed(21)
    sizes = [4001, 7, 1]
    masters = [tensor(n, torch.float32, 1.0, gen) for n in sizes]
    for m in masters:
        m.model = m.to(torch.bfloat16)
        m.grad = tensor(m.numel(), torch.float32, 1e-2, gen)
    m0, w0, g1 = [m.clone() for m in masters], [m.model.clone() for m in masters], [m.grad.clone() for m in masters]
    g2 = [tensor(m.numel(), torch.float32, 1.0, gen) for m in masters]
    plan = StepPlan(params=masters, coefs=[0.1] * 3, eps=1e-2, g1_clip=None, g2_clip=None, rounding=rounding,
                    seed=4, model_attr="model")
    impl = backend(name, model_attr="model")
    impl.perturb(plan, 0)
    assert all(torch.equal(m, m_) for m, m_ in zip(masters, m0))
    x = [w.float() + 1e-2 * g for w, g in zip(w0, g1)]
    for m, xt in zip(masters, x):
        near = xt.to(torch.bfloat16)
        if rounding == "nearest":
            assert torch.equal(m.model, near)
        else:
            other = torch.nextafter(near, torch.where(near.float() < xt, math.inf, -math.inf).to(torch.bfloat16))
            assert bool(((m.model == near) | (m.model == other)).all())
    if rounding == "stochastic":
        assert abs(float((masters[0].model.double() - x[0].double()).mean())) < 4 * 2**-8 / math.sqrt(sizes[0])
    for m, g in zip(masters, g2):
        m.grad.add_(g)
    impl.restore_and_combine(plan)
    assert all(torch.equal(m.model, w) and torch.equal(m, m_) for m, w, m_ in zip(masters, w0, m0))
    ref = [m.detach().clone().requires_grad_() for m in m0]
    for r, g in zip(ref, g1):
        r.grad = g.clone()
    run_step(TorchGRStep(), StepPlan(params=ref, coefs=[0.1] * 3, eps=1e-2, g1_clip=None, g2_clip=None), [g2])
    assert all(torch.equal(m.grad, r.grad) for m, r in zip(masters, ref))


# ------------------------------------------------------------------------------------------ rounding, syncs
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_deterministic(name, dtype):
    """θ' lands on a neighbour of θ + ε·g1, E[θ' − θ] = ε·g1 (the mean over n elements within 5 standard
    errors), the same bits for the same seed, other bits for another; point 1 unbiased towards −ε·g1; the C++
    and Triton backends draw the same Philox stream."""
    n = 4001
    gen = torch.Generator().manual_seed(0)
    theta = (1.0 + 0.05 * torch.rand(n, generator=gen)).to(dtype).to(DEVICE)
    grad = (torch.rand(n, generator=gen) * 2 - 0.5).to(dtype).to(DEVICE)

    def run(impl, seed, point=0):
        p = theta.clone().requires_grad_()
        p.grad = grad.clone()
        plan = StepPlan(params=[p], coefs=[1.0], eps=1e-3, g1_clip=None, rounding="stochastic", seed=seed,
                        estimator="central" if point else "forward")
        impl.perturb(plan, 0)
        if point:
            impl.perturb(plan, 1)
        out = p.detach().clone()
        impl.restore(plan)
        assert torch.equal(p.detach(), theta)
        return out.cpu()

    impl = backend(name)
    r1, r2, r3 = run(impl, 11), run(impl, 11), run(impl, 12)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    x = theta.cpu().float() + 1e-3 * grad.cpu().float()
    near = x.to(dtype)
    down = torch.where(near.float() <= x, near, torch.nextafter(near, torch.full_like(near, -math.inf)))
    up = torch.where(near.float() >= x, near, torch.nextafter(near, torch.full_like(near, math.inf)))
    assert bool(((r1 == down) | (r1 == up)).all()) and bool((r1 != near).any())
    ulp1 = torch.finfo(dtype).eps
    target = float((x.double() - theta.cpu().double()).mean())
    assert abs(float((r1.double() - theta.cpu().double()).mean()) - target) < 5 * ulp1 / math.sqrt(n)
    m = run(impl, 11, point=1)
    assert abs(float((m.double() - theta.cpu().double()).mean()) + target) < 5 * ulp1 / math.sqrt(n)
    if name == "cpp" and triton_usable(DEVICE):
        assert torch.equal(r1, run(backend("triton"), 11)) and torch.equal(m, run(backend("triton"), 11, point=1))


@pytest.mark.parametrize("name", BACKENDS)
def test_no_host_sync(name, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    ps = params_with_grads([(torch.float32, 300), (torch.bfloat16, 1025), (torch.float16, 7)], 1.0, gen)
    keep = params_with_grads([(torch.float32, 9)], 1.0, gen)
    impl = backend(name)
    for step in range(2):  # the first step allocates and builds caches; the second is checked
        plan = StepPlan(params=ps, coefs=[1.0] * 3, keep=keep, eps=1e-2, estimator="central", seed=step,
                        eps_mode="radius")
        with monkeypatch.context() as mp:
            if step:
                def no_sync(*args, **kw):
                    raise AssertionError("host read in the GR step")

                for attr in ("item", "__bool__", "tolist", "__float__", "__int__", "numpy", "cpu"):
                    mp.setattr(torch.Tensor, attr, no_sync)
                mp.setattr(torch.cuda, "synchronize", no_sync)
            impl.perturb(plan, 0)
            impl.perturb(plan, 1)
            impl.restore_and_combine(plan)
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in impl.metrics.values())


# ------------------------------------------------------------------------------------------ lean mode
def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 33), torch.nn.Tanh(), torch.nn.Linear(33, 2)).to(DEVICE)
    x = torch.randn(9, 5, device=DEVICE)
    return model, lambda: model(x).square().sum().backward()


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_lean_mode_keeps_the_correction_accurate(name, estimator):
    """lean: g1 of fp32 gradients saved in bf16, the buffers carry g − g1 (or g − b) between the passes: the
    correction keeps fp32 accuracy (the bf16 error of g1 is not amplified by γ/ε); only the g1 term is rounded."""
    gen = torch.Generator().manual_seed(1)
    n = 5000
    g1 = tensor(n, torch.float32, 1.0, gen)
    h = tensor(n, torch.float32, 1.0, gen)  # plays H·v
    theta = tensor(n, torch.float32, 1.0, gen)
    gamma, eps = 0.01, 1e-3
    out = {}
    for lean in (False, True):
        p = theta.clone().requires_grad_()
        p.grad = g1.clone()
        impl = backend(name, lean=lean)
        plan = StepPlan(params=[p], coefs=[gamma], eps=eps, g1_clip=50.0, g2_clip=50.0, estimator=estimator)
        impl.perturb(plan, 0)
        if lean:  # −g1 (forward) or −bf16(g1) (central) instead of zeros
            assert torch.equal(p.grad, -(g1 if estimator == "forward" else g1.to(torch.bfloat16).float()))
        p.grad.add_(g1 + eps * h)
        if estimator == "central":
            impl.perturb(plan, 1)
            p.grad.add_(g1 - eps * h)
        impl.restore_and_combine(plan)
        assert torch.equal(p.detach(), theta)
        out[lean] = (p.grad.clone(), {k: float(v) for k, v in impl.metrics.items()})
    exact_corr = out[False][0] - g1
    lean_corr = out[True][0] - g1.to(torch.bfloat16).float()
    assert float((lean_corr - exact_corr).norm()) <= 2e-3 * float(exact_corr.norm())
    for k in ("g1_norm", "g2_norm", "gr_rel", "perturb_ratio"):
        assert out[True][1][k] == pytest.approx(out[False][1][k], rel=1e-4)
    # without the difference trick the bf16 error of g1, amplified by γ/ε, would swamp the correction
    assert float((g1.to(torch.bfloat16).float() - g1).norm()) * gamma / eps > 0.5 * float(exact_corr.norm())


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("write", ["zero_", "set_to_none", "none"])
@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_lean_mode_refuses_a_buffer_written_between_the_passes(name, write, estimator):
    """zero_grad(set_to_none=False) (an in-place zero) or set_to_none=True between perturb() and the backward at
    θ' would make the lean step wrong: both are a clear error (at the combine, or at the central estimator's
    second point), θ restored. The plain backward (accumulation) is no error, and then the result equals the
    non-lean step within the bf16 rounding of g1 (and, central, of the saved g₊ − b)."""
    results = {}
    for lean in (False, True):
        model, backward = _tiny_model()
        backward()
        ps = list(model.parameters())
        theta, g1 = [p.detach().clone() for p in ps], [p.grad.clone() for p in ps]
        impl = backend(name, lean=lean)
        plan = StepPlan(params=ps, coefs=[0.1] * len(ps), eps=1e-2, estimator=estimator, g1_clip=None, g2_clip=None)

        def rest():
            if write != "none":
                model.zero_grad(set_to_none=write == "set_to_none")
            backward()
            if estimator == "central":
                impl.perturb(plan, 1)
                backward()
            impl.restore_and_combine(plan)

        impl.perturb(plan, 0)
        if lean and write != "none":
            with pytest.raises(RuntimeError, match="lean=True"):
                rest()
            assert all(torch.equal(p.detach(), t) for p, t in zip(ps, theta))
            return
        rest()
        results[lean] = [p.grad.clone() for p in ps]
    for a, b, g in zip(results[False], results[True], g1):
        assert bool(((b - a).abs() <= 2.0**-8 * g.abs() + 2.0**-6 * (a - g).abs() + 1e-6).all())


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("when", ["before_backward", "mid_backward", "after_combine"])
def test_lean_mode_abort(name, when):
    """The documented guarantee: before the backward at θ' reached a buffer it still holds −g1 and the abort gives
    g1 back bitwise; after it (or after the combine) g1 rounded to bf16, within 2^-8·|g1| per element."""
    model, backward = _tiny_model(3)
    backward()
    ps = list(model.parameters())
    theta, g1 = [p.detach().clone() for p in ps], [p.grad.clone() for p in ps]
    impl = backend(name, lean=True)
    plan = StepPlan(params=ps, coefs=[0.1] * len(ps), eps=1e-2)
    impl.perturb(plan, 0)
    if when == "mid_backward":  # the last layer's gradients arrived, the first layer's not yet
        ps[2].grad.add_(1.0)
        ps[3].grad.add_(1.0)
    elif when == "after_combine":
        backward()
        impl.restore_and_combine(plan)
    impl.restore(plan)
    assert all(torch.equal(p.detach(), t) for p, t in zip(ps, theta))
    for i, (p, g) in enumerate(zip(ps, g1)):
        if when == "before_backward" or (when == "mid_backward" and i < 2):
            assert torch.equal(p.grad, g)
        else:
            assert torch.equal(p.grad, g.to(torch.bfloat16).float())
            assert bool(((p.grad - g).abs() <= 2.0**-8 * g.abs()).all())


# ------------------------------------------------------------------------------------------ the seam itself
@pytest.mark.parametrize("name", BACKENDS)
def test_backends_implement_the_protocol(name):
    impl = backend(name)
    assert isinstance(impl, GRBackend) and impl.name == name
    assert impl.extra_bytes() == 0 or name == "triton"
    gen = torch.Generator().manual_seed(8)
    ps = params_with_grads([(torch.float32, 10)], 1.0, gen)
    plan = StepPlan(params=ps, coefs=[0.1], eps=1e-2)
    impl.perturb(plan, 0)
    assert set(impl.metrics) == {"g1_norm", "perturb_ratio"}
    assert impl.extra_bytes() >= 10 * 8
    ps[0].grad.add_(1.0)
    impl.restore_and_combine(plan)
    assert set(impl.metrics) == {"g1_norm", "perturb_ratio", "g2_norm", "gr_rel", "finite"}


def test_make_backend_chooses_and_explains():
    assert type(make_backend("torch", "cpu")).__name__ == "TorchGRStep"
    assert type(make_backend("auto", "cpu")).__name__ == ("CppGRStep" if cpp_loaded() else "TorchGRStep")
    with pytest.warns(UserWarning, match="lean"):
        make_backend("torch", "cpu", lean=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend("fast", "cpu")
    if not triton_usable("cpu"):
        with pytest.raises(RuntimeError, match="triton"):
            make_backend("triton", "cpu")


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 2100), min_size=1, max_size=6),
    dts=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
    bad=st.lists(st.sampled_from([None, "inf", "-inf", "nan", "max", "tiny"]), min_size=6, max_size=6),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_all_finite_is_exact(sizes, dts, bad, strided, seed):
    """``all_finite`` (Σx² in float64 in one C++ pass where it can, the foreach max-abs reference elsewhere) is
    True exactly when every element is finite: an inf, −inf or NaN anywhere is caught, and the dtype's largest
    finite value in every element (whose square overflows fp32) is no false alarm."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for n, dt, b in zip(sizes, dts, bad):
        t = torch.randn(2 * n if strided else n, generator=g, dtype=torch.float64).to(dt)
        t = t[::2] if strided else t
        if b == "max":
            t.fill_(torch.finfo(dt).max)
        elif b == "tiny":
            t.fill_(torch.finfo(dt).tiny)
        elif b is not None:
            t[int(torch.randint(0, n, (), generator=g))] = float(b)
        tensors.append(t)
    expected = all(bool(torch.isfinite(t.double()).all()) for t in tensors)
    assert bool(all_finite(tensors)) is expected
    assert bool(reference_all_finite(tensors)) is expected
    narrow = [t.contiguous() for t in tensors if t.dtype != torch.float64]  # the C++ path proper
    assert bool(all_finite(narrow)) is all(bool(torch.isfinite(t.double()).all()) for t in narrow)
