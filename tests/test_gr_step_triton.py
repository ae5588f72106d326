"""The Triton GR-step backend against the torch reference backend (the specification).

Bitwise where the arithmetic is the same (round-to-nearest, clip factors exactly 1), within a documented
tolerance otherwise (active clipping: the global norms are summed in a different order); restore always
bitwise; stochastic rounding unbiased, deterministic per seed and independent of chunking; no host sync;
memory per parameter as documented.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_triton
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = requires_triton

from gr_helpers import (  # noqa: E402
    FUZZ_DTYPES,
    assert_bitwise_like_torch,
    assert_close_to_torch_with_active_clipping,
    assert_fuzz_case_bitwise,
)
from gr_helpers import clone_params as _clone  # noqa: E402
from gr_helpers import make_params as _make  # noqa: E402
from gr_helpers import mixed_spec as _spec  # noqa: E402

from grkernels.backends.base import StepPlan  # noqa: E402
from grkernels.backends.reference import TorchGRStep  # noqa: E402

SMALL = dict(chunk=4096, block=1024)  # several chunks per 2^16+3 tensor, interpreter-friendly


def _triton(**kw):
    from grkernels.backends.triton import TritonGRStep

    return TritonGRStep("cuda" if torch.cuda.is_available() else "cpu", **{**SMALL, **kw})


@pytest.mark.parametrize("estimator", ["forward", "central"])
@pytest.mark.parametrize("with_fp64", [False, True])
def test_matches_torch_bitwise_without_clipping(device, estimator, with_fp64):
    assert_bitwise_like_torch(_triton(), device, estimator, with_fp64)


@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_matches_torch_with_active_clipping(device, estimator):
    assert_close_to_torch_with_active_clipping(_triton(), device, estimator)


def test_abort_restores_theta_and_g1_bitwise(device):
    a = _make(_spec(True, many=10, seed=5, big=4099), device, seed=6)
    theta0 = [p.detach().clone() for p in a]
    g1 = [p.grad.clone() for p in a]
    impl = _triton()
    plan = StepPlan(params=a, coefs=[1.0] * len(a), eps=0.1, rounding="stochastic", g1_clip=None, seed=1)
    impl.perturb(plan, 0)
    assert any(not torch.equal(p.detach(), t) for p, t in zip(a, theta0) if p.numel() > 100)
    a[0].grad = None  # e.g. the second backward raised before reaching it
    for p in a[1:]:
        p.grad.normal_()
    impl.restore(plan)
    for p, t, g in zip(a, theta0, g1):
        assert torch.equal(p.detach(), t) and torch.equal(p.grad, g)


def test_missing_second_gradient_restores_and_raises(device):
    a = _make(_spec(False, big=4099), device)
    theta0 = [p.detach().clone() for p in a]
    impl = _triton()
    plan = StepPlan(params=a, coefs=[1.0] * len(a), eps=0.1)
    impl.perturb(plan, 0)
    a[2].grad = None
    with pytest.raises(RuntimeError, match="none after the second"):
        impl.restore_and_combine(plan)
    assert all(torch.equal(p.detach(), t) for p, t in zip(a, theta0))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN·0 in the interpreter
def test_nonfinite_g1_never_reaches_the_weights(device):
    a = _make([(torch.bfloat16, 100), (torch.float32, 50)], device)
    a[1].grad[3] = float("inf")
    a[0].grad[0] = float("nan")
    theta0 = [p.detach().clone() for p in a]
    impl = _triton()
    plan = StepPlan(params=a, coefs=[1.0, 1.0], eps=0.1)
    impl.perturb(plan, 0)
    assert all(torch.equal(p.detach(), t) for p, t in zip(a, theta0))
    assert all(bool((p.grad == 0).all()) for p in a)
    impl.restore_and_combine(plan)
    assert not bool(impl.metrics["finite"])
    assert all(torch.equal(p.detach(), t) for p, t in zip(a, theta0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_unbiased_deterministic_chunk_independent(device, dtype):
    n = 8192
    gen = torch.Generator().manual_seed(0)
    theta = (1.0 + 0.05 * torch.rand(n, generator=gen)).to(dtype)
    step = 1e-3  # ε·g below half an ulp (2^-8 near 1 for bf16, 2^-11 for fp16... still sub-ulp for bf16)
    grad = torch.rand(n, generator=gen) * 2 - 0.5  # mixed signs

    def run(seed, chunk, point=0):
        p = theta.clone().to(device).requires_grad_()
        p.grad = grad.to(dtype).to(device)
        impl = _triton(chunk=chunk)
        plan = StepPlan(params=[p], coefs=[1.0], eps=step, g1_clip=None, rounding="stochastic", seed=seed,
                        estimator="central" if point else "forward")
        impl.perturb(plan, 0)
        if point:
            impl.perturb(plan, 1)
        out = p.detach().clone()
        impl.restore(plan)
        assert torch.equal(p.detach().cpu(), theta)  # restore is bitwise after stochastic rounding too
        return out.cpu()

    r1, r2, r3, r4 = run(11, 4096), run(11, 4096), run(11, 1024), run(12, 4096)
    assert torch.equal(r1, r2) and torch.equal(r1, r3)  # deterministic, independent of chunking
    assert not torch.equal(r1, r4)
    x = theta.float() + step * grad.to(dtype).float()  # the exact fp32 target
    near = x.to(dtype)
    down = torch.where(near.float() <= x, near, torch.nextafter(near, torch.full_like(near, -math.inf)))
    up = torch.where(near.float() >= x, near, torch.nextafter(near, torch.full_like(near, math.inf)))
    assert bool(((r1 == down) | (r1 == up)).all())  # always one of the two neighbours of x
    assert bool((r1 == up).any() and (r1 == down).any())
    # unbiased: the mean shift equals ε·g (sd of the mean ≈ ulp/2/sqrt(n))
    ulp = torch.finfo(dtype).eps  # the grid spacing in [1, 2)
    shift = (r1.double() - theta.double()).mean()
    target = (x.double() - theta.double()).mean()
    assert abs(float(shift - target)) < 5 * ulp / math.sqrt(n)
    # point 1 (θ − ε·v) draws a different stream and is unbiased towards −ε·v
    m = run(11, 4096, point=1)
    assert abs(float((m.double() - theta.double()).mean() + target)) < 5 * ulp / math.sqrt(n)


def test_stochastic_rounding_statistics_match_torch(device):
    """Same distribution as the reference's stochastic_round: the realised-perturbation ratio agrees."""
    torch.manual_seed(3)
    w = (0.02 * torch.randn(20000)).to(torch.bfloat16).to(device)
    g = torch.randn(20000).to(torch.bfloat16).to(device)
    ratios = []
    for impl in (TorchGRStep(), _triton()):
        p = w.clone().requires_grad_()
        p.grad = g.clone()
        impl.perturb(StepPlan(params=[p], coefs=[1.0], eps=1e-3, g1_clip=None, rounding="stochastic"), 0)
        ratios.append(float(impl.metrics["perturb_ratio"]))
    assert ratios[1] == pytest.approx(ratios[0], rel=0.05)
    assert ratios[0] > 1.0  # rounding noise on top of an unbiased perturbation


def test_no_host_sync_in_perturb_and_combine(device, monkeypatch):
    a = _make(_spec(False, many=5, big=4099), device)
    keep = _make([(torch.float32, 9)], device)
    impl = _triton()
    for step in range(2):  # the first step builds the caches; the second is checked
        plan = StepPlan(params=a, coefs=[1.0] * len(a), keep=keep, eps=1e-2, estimator="central", seed=step)
        with monkeypatch.context() as mp:
            if step:
                def no_sync(*args, **kw):
                    raise AssertionError("host synchronisation in the GR step")

                for name in ("item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy"):
                    mp.setattr(torch.Tensor, name, no_sync)
                mp.setattr(torch.cuda, "synchronize", no_sync)
            impl.perturb(plan, 0)
            impl.perturb(plan, 1)
            impl.restore_and_combine(plan)
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in impl.metrics.values())


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_memory_per_parameter(device, lean, estimator):
    """bf16 params with fp32 (main_grad) or bf16 grads, fp32 params: saved bytes match the documented table."""
    torch.manual_seed(0)
    spec = [(torch.bfloat16, torch.float32, 3000), (torch.bfloat16, torch.bfloat16, 2000),
            (torch.float32, torch.float32, 1000), (torch.float16, torch.float16, 500)]
    ps = []
    for pd, gd, n in spec:
        p = torch.randn(n).to(pd).to(device)
        p.main_grad = torch.randn(n).to(gd).to(device)
        ps.append(p)
    impl = _triton(lean=lean, grad_attr="main_grad")
    plan = StepPlan(params=ps, coefs=[1.0] * len(ps), eps=1e-2, estimator=estimator)
    impl.perturb(plan, 0)
    if estimator == "central":
        impl.perturb(plan, 1)
    impl.restore_and_combine(plan)
    per_param = {  # (param, grad) dtype -> bytes: g1 + θ (+ g₊)
        (torch.bfloat16, torch.float32): (2 if lean else 4) + 2 + ((2 if lean else 4) if estimator == "central" else 0),
        (torch.bfloat16, torch.bfloat16): 2 + 2 + (2 if estimator == "central" else 0),
        (torch.float32, torch.float32): (2 if lean else 4) + 4 + ((2 if lean else 4) if estimator == "central" else 0),
        (torch.float16, torch.float16): 2 + 2 + (2 if estimator == "central" else 0),
    }
    expected = sum(-(-n // 8) * 8 * per_param[(pd, gd)] for pd, gd, n in spec)  # slots padded to 8 elements
    assert impl.saved_bytes() == expected
    if estimator == "forward":
        assert per_param[(torch.bfloat16, torch.float32)] <= (4 if lean else 6)
        assert per_param[(torch.bfloat16, torch.bfloat16)] <= 4
    overhead = impl.extra_bytes() - impl.saved_bytes()
    assert 0 < overhead < 2048  # tables and per-chunk partial sums only


@pytest.mark.parametrize("estimator", ["forward", "central"])
@pytest.mark.parametrize("clip", [None, 50.0])
def test_lean_mode_keeps_the_correction_accurate(device, estimator, clip):
    """lean: g1 of fp32 grads saved in bf16, and the gradient buffer carries g − g1 between perturb and
    combine: the GR correction keeps fp32 accuracy (the bf16 error of g1 is NOT amplified by γ/ε); only the
    g1 term of the result is bf16-rounded (≤ 2^-9·|g1| per element)."""
    torch.manual_seed(1)
    n = 5000
    theta = torch.randn(n).to(torch.bfloat16).to(device)
    g1 = torch.randn(n, device=device)
    h = torch.randn(n, device=device)  # plays H·v
    gamma, eps = 0.01, 1e-3
    grads = {}
    for lean in (False, True):
        p = theta.clone()
        p.main_grad = g1.clone()
        impl = _triton(lean=lean, grad_attr="main_grad")
        plan = StepPlan(params=[p], coefs=[gamma], eps=eps, g1_clip=clip, g2_clip=clip, estimator=estimator)
        impl.perturb(plan, 0)
        if lean:  # the buffer holds −g1 (forward) or −bf16(g1) (central) instead of zeros
            target = g1 if estimator == "forward" else g1.to(torch.bfloat16).float()
            assert torch.equal(p.main_grad, -target)
        p.main_grad.add_(g1 + eps * h)  # the second backward accumulates
        if estimator == "central":
            impl.perturb(plan, 1)
            p.main_grad.add_(g1 - eps * h)
        impl.restore_and_combine(plan)
        assert torch.equal(p, theta)
        grads[lean] = (p.main_grad.clone(), {k: float(v) for k, v in impl.metrics.items()})
    b = g1.to(torch.bfloat16).float()
    exact_corr = grads[False][0] - g1
    lean_corr = grads[True][0] - b
    assert float((lean_corr - exact_corr).norm()) <= 2e-3 * float(exact_corr.norm())
    assert bool(((grads[True][0] - grads[False][0]).abs() <= 2.0**-8 * g1.abs() + 2e-3 * exact_corr.abs()
                 + 1e-6).all())
    for k in ("g1_norm", "g2_norm", "gr_rel", "perturb_ratio"):
        assert grads[True][1][k] == pytest.approx(grads[False][1][k], rel=1e-4)
    # lean mode needs the second backward to accumulate into the same buffers: a replaced buffer is an error
    p = theta.clone()
    p.main_grad = g1.clone()
    impl = _triton(lean=True, grad_attr="main_grad")
    plan = StepPlan(params=[p], coefs=[gamma], eps=eps, estimator=estimator)
    impl.perturb(plan, 0)
    if estimator == "central":
        impl.perturb(plan, 1)
    p.main_grad = g1 + eps * h  # e.g. zero_grad(set_to_none=True) before the second backward
    with pytest.raises(RuntimeError, match="accumulate"):
        impl.restore_and_combine(plan)
    assert torch.equal(p, theta)
    # without the difference trick the error would be 2^-9·‖g1‖/ε ≈ 4·‖correction‖/γ... i.e. useless:
    assert float((b - g1).norm()) * gamma / eps > 0.5 * float(exact_corr.norm())


def test_non_dense_layout_and_bad_dtype_give_clear_errors(device, monkeypatch):
    from grkernels.kernels.multi_tensor import check_tensor

    base = torch.randn(6, 4, device=device)
    p = base.t().requires_grad_()  # transposed: dense, not contiguous
    p.grad = torch.randn(4, 6, device=device)  # contiguous grad: a different element order
    impl = _triton()
    with pytest.raises(ValueError, match="not dense in the same layout"):
        impl.perturb(StepPlan(params=[p], coefs=[1.0]), 0)
    # same permuted layout on both: supported, and equal to the torch backend
    p.grad = torch.randn(6, 4, device=device).t()
    q = p.detach().clone().t().contiguous().t().requires_grad_()
    q.grad = p.grad.clone().t().contiguous().t()
    plan_kw = dict(coefs=[1.0], eps=1e-2, g1_clip=None, g2_clip=None, rounding="nearest")
    impl.perturb(StepPlan(params=[p], **plan_kw), 0)
    TorchGRStep().perturb(StepPlan(params=[q], **plan_kw), 0)
    assert torch.equal(p.detach(), q.detach())
    with pytest.raises(TypeError, match="float8|int32"):
        check_tensor(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), "GradReg")
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        from grkernels.backends.triton import TritonGRStep

        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            TritonGRStep("cpu")


def test_gradreg_lean_kwarg_reaches_backend(device):
    from grkernels.backends.triton import TritonGRStep

    assert TritonGRStep(device, lean=True).lean
    with pytest.raises(ValueError, match="chunk"):
        TritonGRStep(device, chunk=1000, block=1024)


@settings(max_examples=6, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    dts=st.lists(st.sampled_from(FUZZ_DTYPES), min_size=6, max_size=6),
    estimator=st.sampled_from(["forward", "central"]),
    seed=st.integers(0, 2**40),
)
def test_fuzz_shapes_dtypes_bitwise(sizes, dts, estimator, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_fuzz_case_bitwise(_triton(chunk=1024), device, sizes, dts, estimator, seed)


def test_exact_estimator_matches_torch(device):
    """The exact estimator's combine (g1 + γ·H·v) and s1 are the reference's, bitwise."""
    a = _make([(torch.float64, 30), (torch.float32, 20)], device, seed=9)
    b = _clone(a)
    hvp = [torch.randn(p.shape, dtype=torch.float64).to(p.dtype).to(device) for p in a]
    plans = [StepPlan(params=ps, coefs=[0.5, 2.0], eps=1e-3, g1_clip=1.0, estimator="exact") for ps in (a, b)]
    ta, tb = TorchGRStep(), _triton()
    torch.testing.assert_close(tb.clip_scale_g1(plans[1]), ta.clip_scale_g1(plans[0]), rtol=0, atol=0)
    ta.combine_hvp(plans[0], hvp)
    tb.combine_hvp(plans[1], hvp)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    assert set(tb.metrics) == {"g1_norm", "g2_norm", "perturb_ratio", "gr_rel", "finite"}


def test_unaligned_views_of_a_flat_buffer(device):
    """Parameters that are views at odd offsets of one flat buffer (FSDP-style): the unaligned code path."""
    sizes = [7, 2000, 33, 1]
    outs = []
    for impl in (TorchGRStep(), _triton()):
        gen = torch.Generator().manual_seed(5)
        flat = torch.randn(1 + sum(sizes), generator=gen).to(torch.bfloat16).to(device)
        gflat = torch.randn(1 + sum(sizes), generator=gen).to(torch.bfloat16).to(device)
        ps, at = [], 1  # offset 1 element: 2-byte aligned only
        for n in sizes:
            p = flat[at : at + n]
            p.grad = gflat[at : at + n]
            ps.append(p)
            at += n
        plan = StepPlan(params=ps, coefs=[0.5] * len(ps), eps=1e-2, g1_clip=None, g2_clip=None, rounding="nearest")
        impl.perturb(plan, 0)
        pert = flat.clone()
        gflat.add_(1.0)
        impl.restore_and_combine(plan)
        outs.append((pert, flat.clone(), gflat.clone()))
    assert not any(g.aligned for g in impl._groups)
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_master_weights_hook(device, rounding):
    """model_attr: GR parameters are fp32 masters; the bf16 model weight w is set to round(w + ε·v) (from the
    weight the gradient was taken at, not from the master), the master is never written, both are exact after the
    step, and the gradient equals the torch backend's (its combine does not depend on the weights)."""
    gen = torch.Generator().manual_seed(21)
    sizes = [5000, 7, 1]
    masters = [torch.randn(n, generator=gen).to(device) for n in sizes]
    models = [m.to(torch.bfloat16) for m in masters]
    g1 = [1e-2 * torch.randn(n, generator=gen).to(device) for n in sizes]
    g2 = [torch.randn(n, generator=gen).to(device) for n in sizes]
    for m, w, g in zip(masters, models, g1):
        m.grad = g.clone()
        m.model = w
    ref = [m.detach().clone().requires_grad_() for m in masters]
    for r, g in zip(ref, g1):
        r.grad = g.clone()
    m0, w0 = [m.clone() for m in masters], [w.clone() for w in models]
    kw = dict(coefs=[0.1] * 3, eps=1e-2, g1_clip=None, g2_clip=None, rounding=rounding, seed=4)
    impl, torch_impl = _triton(model_attr="model"), TorchGRStep()
    plan, ref_plan = StepPlan(params=masters, **kw), StepPlan(params=ref, **kw)
    impl.perturb(plan, 0)
    torch_impl.perturb(ref_plan, 0)
    assert all(torch.equal(m, m_) for m, m_ in zip(masters, m0))  # masters untouched
    x = [w.float() + (1e-2 * g) for w, g in zip(w0, g1)]  # the target, from the model weight
    for w, xt in zip(models, x):
        if rounding == "nearest":
            assert torch.equal(w, xt.to(torch.bfloat16))
        else:
            near = xt.to(torch.bfloat16)
            other = torch.nextafter(near, torch.where(near.float() < xt, math.inf, -math.inf).to(torch.bfloat16))
            assert bool(((w == near) | (w == other)).all())
    if rounding == "stochastic":  # unbiased around w + ε·v: E[w' − w] = ε·v, the intended perturbation
        assert abs(float((models[0].double() - x[0].double()).mean())) < 4 * 2**-8 / math.sqrt(5000)
    for m, r, g in zip(masters, ref, g2):
        m.grad.add_(g)
        r.grad.add_(g)
    impl.restore_and_combine(plan)
    torch_impl.restore_and_combine(ref_plan)
    assert all(torch.equal(w, w_) for w, w_ in zip(models, w0))  # model weights restored bitwise
    assert all(torch.equal(m, m_) for m, m_ in zip(masters, m0))
    assert all(torch.equal(m.grad, r.grad) for m, r in zip(masters, ref))
    assert impl.saved_bytes() == sum(-(-n // 8) * 8 * (4 + 2) for n in sizes)  # g1 fp32 + the bf16 weight


_COMPILE_CHECK = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from grkernels.kernels import gr_step as G


def compile_sm90(fn, sig, constexprs, **opts):
    # pointer args declared 16-byte aligned, as the JIT specialises them for aligned tensors
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]


def cx(*names):
    return {k: "constexpr" for k in names}


tab = {"tab_ptr": "*i64", "n_tensors": "i32", "chunk_ptr": "*i64", "n_chunks": "i32"}
try:
    ptx = compile_sm90(
        G.perturb_kernel,
        dict(tab, g1s_ptr="*i16", ths_ptr="*i16", gps_ptr="*i16", part_ptr="*fp32", step_ptr="*fp32",
             finite_ptr="*i8", seed="i64", **cx("P_INT", "P_FLT", "G_INT", "G_FLT", "S_INT", "S_FLT", "SAVE_CAST",
                                                "W", "ACC", "POINT", "ROUND", "PRELOAD", "ALIGNED", "CHUNK", "BLOCK")),
        dict(P_INT=tl.int16, P_FLT=tl.bfloat16, G_INT=tl.int32, G_FLT=tl.float32, S_INT=tl.int16, S_FLT=tl.bfloat16,
             SAVE_CAST=True, W=tl.float32, ACC=tl.float32, POINT=1, ROUND=1, PRELOAD=2, ALIGNED=True, CHUNK=65536,
             BLOCK=2048),
        num_warps=8, enable_fp_fusion=False,
    )
except (ImportError, RuntimeError, FileNotFoundError) as err:  # e.g. no ptxas here
    print("SKIP", err)
    sys.exit(0)
assert "ld.global.v" in ptx and "st.global.v" in ptx and "fma.rn" not in ptx, "perturb"
ptx = compile_sm90(
    G.combine_kernel,
    dict(tab, g1s_ptr="*i16", ths_ptr="*i16", gps_ptr="*i16", part_ptr="*fp32", coef_ptr="*fp32", sa_ptr="*fp32",
         sb_ptr="*fp32", **cx("P_INT", "G_INT", "G_FLT", "S_INT", "S_FLT", "ACC", "MODE", "DELTA", "ALIGNED",
                              "CHUNK", "BLOCK")),
    dict(P_INT=tl.int16, G_INT=tl.int32, G_FLT=tl.float32, S_INT=tl.int16, S_FLT=tl.bfloat16, ACC=tl.float32,
         MODE=1, DELTA=True, ALIGNED=True, CHUNK=65536, BLOCK=2048),
    num_warps=8, enable_fp_fusion=False,
)
assert "ld.global.v" in ptx and "fma.rn" not in ptx, "combine"
ptx = compile_sm90(
    G.sumsq_kernel,
    dict(tab, part_ptr="*fp64", g1s_ptr="*i16", base_ptr="*fp64",
         **cx("G_INT", "G_FLT", "S_INT", "S_FLT", "ACC", "NORM", "ALIGNED", "CHUNK", "BLOCK")),
    dict(G_INT=tl.int16, G_FLT=tl.float16, S_INT=tl.int16, S_FLT=tl.float16, ACC=tl.float64, NORM=2, ALIGNED=True,
         CHUNK=65536, BLOCK=2048),
    num_warps=8,
)
assert "ld.global.v" in ptx, "sumsq"
print("OK")
"""


def test_kernels_compile_for_the_gpu_with_vector_access_and_no_fma():
    """The interpreter accepts more than the compiler: compile the main variants for sm_90 (no GPU needed; in a
    subprocess, since this process runs Triton interpreted) and check that full blocks use vector loads and
    stores and that FMA contraction is off (bitwise parity with the torch backend)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    import grkernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(grkernels.__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.stdout.strip().endswith("OK")
