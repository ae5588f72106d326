"""The C++ CPU kernels (grkernels._C, built from csrc/): presence in CI, the torch fallback, and what only
they have (several vocabulary chunks per row, fp64 arithmetic, thread-count independence).

The op-level agreement with the torch specification and Triton is in tests/test_ops_library.py and the other
tests/test_ops_*.py files (parametrised over "cpp").
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import grkernels
import grkernels.ops as ops
from grkernels.kernels import cpp_loaded, cpp_status

ROOT = Path(__file__).resolve().parents[1]
requires_cpp = pytest.mark.skipif(not cpp_loaded(), reason=f"C++ kernels: {cpp_status()}")


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises a built extension")
def test_extension_is_built_in_ci():
    """`make test` on a fresh clone builds grkernels._C: CI must never silently run on the torch fallback."""
    assert cpp_loaded(), cpp_status()
    assert grkernels.info()["logp_and_entropy [cpu]"]["implementation"] == "cpp"
    assert grkernels.info()["GradReg step [cpu]"]["implementation"] == "cpp"


def test_without_the_extension_everything_runs_on_torch_and_info_says_why():
    script = textwrap.dedent(
        """
        import torch, grkernels, grkernels.ops as ops
        from grkernels.kernels import cpp_loaded
        assert not cpp_loaded()
        table = grkernels.info("cpu")
        row = table["policy_loss [cpu]"]
        assert row["implementation"] == "torch" and "GRKERNELS_NO_CPP" in row["reason"], row
        x = torch.randn(2, 3, 7, requires_grad=True)
        ids = torch.randint(0, 7, (2, 3))
        loss, _ = ops.policy_loss(x, ids, torch.randn(2), torch.ones(2, 3, dtype=torch.bool))
        loss.backward()
        assert table["GradReg step [cpu]"]["implementation"] == "torch"
        w = torch.nn.Parameter(torch.randn(5))
        opt = grkernels.GradReg(torch.optim.SGD([w], lr=0.1), strength=0.1, eps=1e-2)
        opt.step(lambda: (w.grad is None or w.grad.zero_(), (w ** 3).sum().backward())[-1])
        assert type(opt.engine.backend).__name__ == "TorchGRStep", type(opt.engine.backend)
        try:
            grkernels.GradReg(torch.optim.SGD([w], lr=0.1), strength=0.1, eps=1e-2, backend="cpp")
        except RuntimeError as e:
            assert "GRKERNELS_NO_CPP" in str(e)
        else:
            raise AssertionError("GradReg(backend='cpp') without the extension must raise")
        try:
            ops.selective_log_softmax(x, ids, backend="cpp")
        except RuntimeError as e:
            assert "GRKERNELS_NO_CPP" in str(e)
        else:
            raise AssertionError("backend='cpp' without the extension must raise")
        print("FALLBACK-OK")
        """
    )
    env = dict(os.environ, GRKERNELS_NO_CPP="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "FALLBACK-OK" in proc.stdout, proc.stderr[-3000:]


def test_cli_info_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "grkernels", "info"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "grkernels._C" in proc.stdout and "policy_loss [cpu]" in proc.stdout


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_rows_spanning_several_chunks_match_float64(dtype):
    """V > 2048 (the kernel's chunk): the online log-sum-exp rescaling across chunks, a growing max, -inf runs."""
    torch.manual_seed(0)
    V = 2 * 2048 + 77
    logits = (torch.randn(3, 2, V) * 3).to(dtype)
    logits[0, 0] = torch.linspace(-30, 30, V).to(dtype)  # the max grows in every chunk
    logits[0, 1, :3000] = float("-inf")  # whole chunks at -inf, then finite values
    logits[1, 0, 2048:] = float("-inf")
    ids = torch.randint(0, 2048, (3, 2))
    ids[0, 1] = 3500
    active = torch.ones(3, 2, dtype=torch.bool)
    active[2, 1] = False
    x = logits.clone().requires_grad_()
    lp, h = ops.logp_and_entropy(x, ids, 0.8, active=active, backend="cpp")
    g1, g2 = torch.randn(3, 2), torch.randn(3, 2)
    (lp * g1 + h * g2).sum().backward()
    xr = logits.double().requires_grad_()
    lpr, hr = ops.logp_and_entropy(xr, ids, 0.8, active=active, backend="torch")
    (lpr * g1.double() + hr * g2.double()).sum().backward()
    atol = 1e-12 if dtype == torch.float64 else 2e-5 + 30 / 0.8 * 2.0**-22
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lp.double(), lpr.detach(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(h.double(), hr.detach(), atol=atol, rtol=1e-5)
    rtol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=rtol * scale + 1e-12, rtol=0)
    assert (x.grad[2, 1] == 0).all() and (x.grad[0, 1, :3000] == 0).all()


@requires_cpp
def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    logits = torch.randn(64, 3000)
    ids = torch.randint(0, 3000, (64,))
    adv, mask = torch.randn(64, 1), torch.rand(64, 1) > 0.2
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_()
            lp, h = ops.logp_and_entropy(x, ids, backend="cpp")
            loss, _ = ops.policy_loss(x[:, None], ids[:, None], adv, mask, entropy_coef=0.1, backend="cpp")
            (lp.sum() + h.sum() + loss).backward()
            runs.append((lp, h, loss.detach(), x.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
