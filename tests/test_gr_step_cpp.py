"""C++-specific properties of the GR-step backend (csrc/gr_step.cpp through ``CppGRStep``); what every backend
promises is tested once for all in tests/test_backend_contract.py.

Here: sums of squares exact in range and independent of the thread count (so are the stochastic-rounding
stream and the whole step), lean mode's memory, a mixed-precision compute grid, what the kernels do not take
(they hand the step to the reference), clear op errors, opcheck-clean ops that torch.compile traces without graph
breaks, and ``backend="auto"`` choosing C++ on CPU with results equal to the torch backend.
"""

from __future__ import annotations

import pytest
import torch
from gr_helpers import clone_params, make_params

from grkernels.backends.base import Shards, StepPlan
from grkernels.backends.reference import TorchGRStep
from grkernels.kernels import cpp_loaded

pytestmark = pytest.mark.skipif(not cpp_loaded(), reason="grkernels._C is not built")


if cpp_loaded():
    from grkernels.backends.cpp import CppGRStep  # also registers the ops' fake kernels
    from grkernels.kernels.cpp_gr_step import sumsq


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_sums_of_squares_are_exact_in_range_and_thread_independent():
    """Σx² against float64 (fp32 fast lanes over ≤ 65,536-element chunks, redone in double for a chunk whose
    float sum left the safe range: elements of 3e19, 1e-25, an all-zero chunk), the same bits for 1 and 2
    threads, and inf/NaN propagated."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=gen).to(dt) for n, dt in [(200003, torch.float32), (70001, torch.bfloat16),
                                                            (1, torch.float16), (0, torch.float32)]]
    xs.append(torch.cat([torch.zeros(65536), 3e19 * torch.randn(70000, generator=gen)]))
    xs.append((1e-25 * torch.randn(70000, generator=gen, dtype=torch.float64)).float())
    xs.append((1e-25 * torch.randn(999, generator=gen, dtype=torch.float64)).to(torch.bfloat16))
    exact = sum(float(x.double().square().sum()) for x in xs)
    got = [_with_threads(n, lambda: sumsq(xs, (), 0)) for n in (1, 2)]
    assert got[0].dtype == torch.float64 and torch.equal(got[0], got[1])
    assert float(got[0]) == pytest.approx(exact, rel=1e-6)
    tiny = xs[-2:]
    assert float(sumsq(tiny, (), 0)) == pytest.approx(sum(float(x.double().square().sum()) for x in tiny), rel=1e-6)
    assert float(sumsq([], (), 0)) == 0.0
    assert not bool(torch.isfinite(sumsq([torch.tensor([1.0, float("nan")])], (), 0)))


def test_the_step_is_thread_independent():
    """A whole step (stochastic rounding, clipping, radius mode, central) gives the same bits on 1 and 2 threads."""
    def run():
        a = make_params([(torch.bfloat16, 200003), (torch.float32, 70001), (torch.float16, 7)], "cpu", seed=4)
        plan = StepPlan(params=a, coefs=[0.3] * 3, eps=1e-2, g1_clip=1.0, g2_clip=1.0, estimator="central",
                        eps_mode="radius", rounding="stochastic", seed=2**40 + 1)
        impl = CppGRStep()
        pert = []
        for point in (0, 1):
            impl.perturb(plan, point)
            pert += [p.detach().clone() for p in a]
            for p in a:
                p.grad.add_(1.0)
        impl.restore_and_combine(plan)
        return pert + [p.grad for p in a] + list(impl.metrics.values())

    one, two = (_with_threads(n, run) for n in (1, 2))
    assert all(torch.equal(x, y) for x, y in zip(one, two))


@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_lean_mode_saves_memory(estimator):
    """lean: g1 (and g₊) of fp32 gradients held in bf16: 2 bytes per element instead of 4."""
    n = 70001
    out = {}
    for lean in (False, True):
        p = torch.randn(n).requires_grad_()
        p.grad = torch.randn(n)
        impl = CppGRStep(lean=lean)
        plan = StepPlan(params=[p], coefs=[0.01], eps=1e-3, estimator=estimator)
        impl.perturb(plan, 0)
        if estimator == "central":
            impl.perturb(plan, 1)
        impl.restore_and_combine(plan)
        out[lean] = impl.extra_bytes()
    points = 2 if estimator == "central" else 1
    assert out[False] == n * (4 + 4 * points)  # θ + g1 (+ g₊), fp32
    assert out[True] == n * (4 + 2 * points)  # g1 (and g₊) in bf16


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
    absolute ε, clipping off: the arithmetic is bitwise-defined). In radius mode (the default) the step divides by
    ‖v‖, a reduction whose order differs between backends: equal to rounding there."""
    from gr_helpers import make_closure, regression_batch, rel_err, tanh_mlp

    from grkernels import GradReg

    for eps_mode in ("absolute", "radius"):
        results = []
        for backend in ("auto", "torch"):
            model = tanh_mlp(7, dtype=torch.float32)
            x, y = regression_batch(8, dtype=torch.float32)
            opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2), strength=0.5, eps=1e-2,
                          eps_mode=eps_mode, g1_clip=None, g2_clip=None, backend=backend)
            for _ in range(3):
                opt.step(make_closure(model, x, y))
            results.append(([p.detach().clone() for p in model.parameters()], type(opt.engine.backend).__name__))
        assert results[0][1] == "CppGRStep" and results[1][1] == "TorchGRStep"
        if eps_mode == "absolute":
            assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
        else:
            assert rel_err(results[0][0], results[1][0]) < 1e-6
