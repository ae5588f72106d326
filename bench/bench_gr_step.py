"""Speed of the GR-step math (CPU-sized; on a GPU the Triton backend joins): perturb + restore_and_combine.

    .venv/bin/python -m pytest bench/bench_gr_step.py --benchmark-enable -q

Compared on one transformer-shaped parameter set (~4.5M parameters, 2 layers x 9 tensors + norms + embeddings):
the torch backend of ``GradReg`` (``TorchGRStep``, the specification), a ``torch._foreach`` implementation and
a reference-style per-parameter loop (both in ``bench/baselines_gr_step.py``), on CPU the C++ kernels
(``CppGRStep``; the round-robin comparison with bandwidth is ``bench/cpu_gr_step.py``), on CUDA the Triton kernels.
Dtype mixes: bf16 params with bf16 grads, fp32 params with fp32 grads, and bf16 params with fp32 gradient
buffers (``main_grad``; the torch backend needs ``.grad`` of the parameter dtype, so it is skipped there).
The full-size GPU measurement (1B-shaped set, bandwidth) is ``bench/gpu_gr_step.py``.
"""

from __future__ import annotations

import pytest
import torch
from baselines_gr_step import ForeachGRStep, LoopGRStep

from grkernels.backends.base import StepPlan
from grkernels.backends.reference import TorchGRStep
from grkernels.kernels import cpp_loaded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS, GAMMA = 1e-3, 1e-2


def transformer_shapes(hidden: int = 256, inter: int = 688, layers: int = 2, vocab: int = 2048) -> list[tuple]:
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return shapes + [(hidden,), (vocab, hidden)]


def make_set(p_dtype: torch.dtype, g_dtype: torch.dtype, shapes=None):
    torch.manual_seed(0)
    params, grads = [], []
    for s in shapes or transformer_shapes():
        p = (0.02 * torch.randn(s, device=DEVICE)).to(p_dtype)
        g = (1e-3 * torch.randn(s, device=DEVICE)).to(g_dtype)
        if g_dtype == p_dtype:
            p.grad = g
        p.main_grad = g
        params.append(p)
        grads.append(g)
    return params, grads


MIXES = {
    "bf16-bf16": (torch.bfloat16, torch.bfloat16),
    "fp32-fp32": (torch.float32, torch.float32),
    "bf16-fp32grad": (torch.bfloat16, torch.float32),
}


def _impls():
    out = ["torch-backend", "foreach", "loop"]
    if DEVICE == "cuda":
        out.append("triton")
    elif cpp_loaded():
        out.append("cpp")
    return out


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("impl", _impls())
def test_gr_step_math(benchmark, impl, mix):
    p_dtype, g_dtype = MIXES[mix]
    params, grads = make_set(p_dtype, g_dtype)
    if impl in ("torch-backend", "cpp") and p_dtype != g_dtype:
        pytest.skip("the torch and C++ backends read .grad, which has the parameter dtype")
    plan = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=EPS, rounding="nearest")
    if impl in ("torch-backend", "triton", "cpp"):
        if impl == "cpp":
            from grkernels.backends.cpp import CppGRStep

            backend = CppGRStep()
        elif impl == "triton":
            from grkernels.backends.triton import TritonGRStep

            backend = TritonGRStep(DEVICE, grad_attr="main_grad")
        else:
            backend = TorchGRStep()

        def step():
            backend.perturb(plan, 0)
            backend.restore_and_combine(plan)
            _sync()
    else:
        backend = (ForeachGRStep if impl == "foreach" else LoopGRStep)(EPS, GAMMA)

        def step():
            backend.perturb(params, grads)
            backend.combine(params, grads)
            _sync()

    with torch.no_grad():
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    n = sum(p.numel() for p in params)
    benchmark.extra_info["extra_bytes_per_param"] = backend.extra_bytes() / n
    benchmark.extra_info["params"] = n


# The end-to-end ratio of a GR step over a plain step is bench/bench_overhead.py (and bench/e2e_overhead.py).
