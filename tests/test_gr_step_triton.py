"""Triton-specific properties of the GR-step backend (``TritonGRStep``); what every backend promises is tested
once for all in tests/test_backend_contract.py.

Here: stochastic rounding independent of the chunking, memory per parameter as documented (``main_grad``
gradients, lean mode), lean mode on a ``main_grad`` attribute, clear errors for layouts and dtypes the kernels do
not take, unaligned views of a flat buffer, and (when the CUDA backend of triton is installed) kernels that compile
for sm_90 with vector loads and no FMA contraction.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton

pytestmark = requires_triton

from grkernels.backends.base import StepPlan  # noqa: E402
from grkernels.backends.reference import TorchGRStep  # noqa: E402

SMALL = dict(chunk=4096, block=1024)  # several chunks per 2^16+3 tensor, interpreter-friendly


def _triton(**kw):
    from grkernels.backends.triton import TritonGRStep

    return TritonGRStep("cuda" if torch.cuda.is_available() else "cpu", **{**SMALL, **kw})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_independent_of_the_chunking(device, dtype):
    n = 8192
    gen = torch.Generator().manual_seed(0)
    theta = (1.0 + 0.05 * torch.rand(n, generator=gen)).to(dtype)
    grad = torch.rand(n, generator=gen) * 2 - 0.5

    def run(chunk):
        p = theta.clone().to(device).requires_grad_()
        p.grad = grad.to(dtype).to(device)
        impl = _triton(chunk=chunk)
        plan = StepPlan(params=[p], coefs=[1.0], eps=1e-3, g1_clip=None, rounding="stochastic", seed=11)
        impl.perturb(plan, 0)
        out = p.detach().clone()
        impl.restore(plan)
        return out.cpu()

    a, b = run(4096), run(1024)
    assert torch.equal(a, b) and not torch.equal(a, theta)


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


def test_lean_mode_on_main_grad(device):
    """grad_attr="main_grad": the lean step is accurate there too, a replaced buffer is an error (θ restored), and
    an abort before the second backward gives g1 back bitwise."""
    gen = torch.Generator().manual_seed(1)
    n = 3000
    theta = torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
    g1, h = (torch.randn(n, generator=gen).to(device) for _ in range(2))
    grads = {}
    for lean in (False, True):
        p = theta.clone()
        p.main_grad = g1.clone()
        impl = _triton(lean=lean, grad_attr="main_grad")
        plan = StepPlan(params=[p], coefs=[0.01], eps=1e-3, g1_clip=None, g2_clip=None)
        impl.perturb(plan, 0)
        p.main_grad.add_(g1 + 1e-3 * h)
        impl.restore_and_combine(plan)
        grads[lean] = p.main_grad.clone()
    assert bool(((grads[True] - grads[False]).abs() <= 2.0**-8 * g1.abs() + 1e-6).all())
    p = theta.clone()
    p.main_grad = g1.clone()
    impl = _triton(lean=True, grad_attr="main_grad")
    plan = StepPlan(params=[p], coefs=[0.01], eps=1e-3)
    impl.perturb(plan, 0)
    impl.restore(plan)
    assert torch.equal(p, theta) and torch.equal(p.main_grad, g1)
    impl.perturb(plan, 0)
    p.main_grad = g1 + 1e-3 * h  # e.g. zero_grad(set_to_none=True) before the second backward
    with pytest.raises(RuntimeError, match="replaced"):
        impl.restore_and_combine(plan)
    assert torch.equal(p, theta)


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
        dict(tab, g1s_ptr="*i16", ths_ptr="*i16", gps_ptr="*i16", part_ptr="*fp64", step_ptr="*fp32",
             finite_ptr="*i8", seed="i64", **cx("P_INT", "P_FLT", "G_INT", "G_FLT", "S_INT", "S_FLT", "SAVE_CAST",
                                                "W", "ACC", "POINT", "ROUND", "PRELOAD", "ALIGNED", "CHUNK", "BLOCK")),
        dict(P_INT=tl.int16, P_FLT=tl.bfloat16, G_INT=tl.int32, G_FLT=tl.float32, S_INT=tl.int16, S_FLT=tl.bfloat16,
             SAVE_CAST=True, W=tl.float32, ACC=tl.float64, POINT=1, ROUND=1, PRELOAD=2, ALIGNED=True, CHUNK=65536,
             BLOCK=2048),
        num_warps=8, enable_fp_fusion=False,
    )
except (ImportError, RuntimeError, FileNotFoundError) as err:  # e.g. no ptxas here
    print("SKIP", err)
    sys.exit(0)
assert "ld.global.v" in ptx and "st.global.v" in ptx and "fma.rn" not in ptx, "perturb"
ptx = compile_sm90(
    G.combine_kernel,
    dict(tab, g1s_ptr="*i16", ths_ptr="*i16", gps_ptr="*i16", part_ptr="*fp64", coef_ptr="*fp32", sa_ptr="*fp32",
         sb_ptr="*fp32", **cx("P_INT", "G_INT", "G_FLT", "S_INT", "S_FLT", "ACC", "SUM", "MODE", "DELTA", "ALIGNED",
                              "CHUNK", "BLOCK")),
    dict(P_INT=tl.int16, G_INT=tl.int32, G_FLT=tl.float32, S_INT=tl.int16, S_FLT=tl.bfloat16, ACC=tl.float32,
         SUM=tl.float64, MODE=1, DELTA=True, ALIGNED=True, CHUNK=65536, BLOCK=2048),
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
