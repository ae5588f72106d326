"""CPU-sized benchmarks of the policy-loss head, forward + backward (pytest-benchmark).

    PYTHONPATH=. .venv/bin/python -m pytest bench/bench_ops.py --benchmark-enable -q

Compares on the same inputs (512 tokens x 32k vocab fp32 for the logits head, hidden 256 for the LM-head
variant): eager torch written as TRL 1.16 computes it (full log_softmax), TRL's own chunked
``selective_log_softmax`` / ``entropy_from_logits``, torch.compile of the eager code (opt-in, see below),
and grkernels (on CPU: the C++ kernels of ``grkernels._C`` and the torch backend; the Triton kernels only on
CUDA: under TRITON_INTERPRET they are a correctness tool, orders of magnitude slower, so they are not timed
here). ``test_logp_entropy_fwd_bwd``: chosen-token log-prob + entropy forward and backward alone (512 tokens x
32k vocab fp32), eager torch vs the C++ kernels. The GPU numbers that matter come from ``bench/gpu_ops.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import grkernels.ops as ops

B, T, V, H = 4, 128, 32_000, 256
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KW = dict(beta=0.04, clip_low=0.2, clip_high=0.28, entropy_coef=0.0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 10 - 5
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    return [t.to(DEVICE) for t in (logits, ids, mask, adv, old, ref)]


def _trl_epilogue(lp, ent, adv, mask, old, ref):
    """TRL 1.16's token-level dapo/bnpo loss from per-token log-probs (masked token mean)."""
    m = mask.float()
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - KW["clip_low"], 1 + KW["clip_high"])
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    d = ref - lp
    per_token = per_token + KW["beta"] * (torch.exp(d) - d - 1)
    loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    return loss, (ent.detach() * m).sum() / m.sum()


def eager_loss(logits, ids, mask, adv, old, ref):
    logp_all = torch.log_softmax(logits.float(), -1)
    lp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return _trl_epilogue(lp, ent, adv, mask, old, ref)[0]


def trl_chunked_loss(logits, ids, mask, adv, old, ref):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    lp = selective_log_softmax(logits, ids)
    with torch.no_grad():  # TRL computes the entropy for logging only (no entropy bonus here)
        ent = entropy_from_logits(logits)
    return _trl_epilogue(lp, ent, adv, mask, old, ref)[0]


def grkernels_loss(logits, ids, mask, adv, old, ref, backend="auto"):
    return ops.policy_loss(logits, ids, adv, mask, old, ref, backend=backend, **KW)[0]


def saved_mib(loss_fn) -> float:
    """MiB autograd keeps for backward (unique storages, inputs included): the memory the loss head holds
    between forward and backward, measurable on CPU where there are no allocator peak statistics."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(storages.values()) / 2**20


def _fwd_bwd(fn, args):
    logits = args[0].detach().requires_grad_()

    def run():
        loss = fn(logits, *args[1:])
        (g,) = torch.autograd.grad(loss, logits)
        return g

    return run


def _trl_available() -> bool:
    try:
        from trl.trainer.utils import selective_log_softmax  # noqa: F401
    except Exception:
        return False
    return True


CASES = {
    "eager_torch": eager_loss,
    "trl_chunked": trl_chunked_loss,
    "torch_compile": None,
    "grkernels": grkernels_loss,  # auto: the C++ kernels on CPU when built
    "grkernels_torch": lambda *a: grkernels_loss(*a, backend="torch"),
}


def eager_logp_entropy(logits, ids):
    """Eager torch, as TRL-style code writes it: full fp32 log-softmax, gather, entropy from it."""
    logp_all = torch.log_softmax(logits.float(), -1)
    p = logp_all.exp()
    return logp_all.gather(-1, ids[..., None]).squeeze(-1), -(p * logp_all).sum(-1)


LOGP_CASES = {
    "eager_torch": eager_logp_entropy,
    "grkernels_torch": lambda x, ids: ops.logp_and_entropy(x, ids, backend="torch"),
    "grkernels_cpp": lambda x, ids: ops.logp_and_entropy(x, ids, backend="cpp"),
}


@pytest.mark.parametrize("impl", list(LOGP_CASES))
def test_logp_entropy_fwd_bwd(benchmark, impl):
    """Log-prob + entropy, forward and backward, 512 tokens x 32k vocab fp32 (upstream gradients on both)."""
    from grkernels.kernels import cpp_loaded

    if impl == "grkernels_cpp" and (DEVICE != "cpu" or not cpp_loaded()):
        pytest.skip("the C++ kernels are not built (or not a CPU run)")
    logits, ids = _inputs()[:2]
    g = torch.Generator().manual_seed(2)
    g_lp, g_h = (torch.randn(B, T, generator=g).to(DEVICE) for _ in range(2))
    fn = LOGP_CASES[impl]
    x = logits.detach().requires_grad_()

    def loss():
        lp, h = fn(x, ids)
        return (lp * g_lp + h * g_h).sum()

    def run():
        (grad,) = torch.autograd.grad(loss(), x)
        return grad

    benchmark.extra_info.update(tokens=B * T, vocab=V, device=DEVICE, dtype="fp32", threads=torch.get_num_threads())
    benchmark.extra_info["saved_for_backward_mib"] = saved_mib(loss)
    benchmark.extra_info["logits_mib"] = logits.numel() * logits.element_size() / 2**20
    grad = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    x_ref = logits.detach().double().requires_grad_()
    lp, h = eager_logp_entropy(x_ref, ids)
    (want,) = torch.autograd.grad((lp * g_lp + h * g_h).sum(), x_ref)
    torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", list(CASES))
def test_policy_loss_fwd_bwd(benchmark, impl):
    args = _inputs()
    benchmark.extra_info.update(tokens=B * T, vocab=V, device=DEVICE, dtype="fp32")
    if impl == "trl_chunked" and not _trl_available():
        pytest.skip("trl is not importable")
    if impl == "torch_compile":
        if DEVICE == "cpu" and os.environ.get("GRK_BENCH_COMPILE") != "1":
            pytest.skip(
                "torch.compile on CPU needs ~40 s (2 shared cores) to compile even a 2-op log-softmax here; "
                "set GRK_BENCH_COMPILE=1 to include it"
            )
        fn = torch.compile(eager_loss)
        _fwd_bwd(fn, args)()  # compile outside the timed region
    else:
        fn = CASES[impl]
    run = _fwd_bwd(fn, args)
    x = args[0].detach().requires_grad_()
    benchmark.extra_info["saved_for_backward_mib"] = saved_mib(lambda: fn(x, *args[1:]))
    benchmark.extra_info["logits_mib"] = args[0].numel() * args[0].element_size() / 2**20
    grad = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    # every implementation computes the same gradient
    ref = _fwd_bwd(eager_loss, args)()
    torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["materialised_logits", "grkernels_fused_linear"])
def test_fused_linear_fwd_bwd(benchmark, impl):
    logits, ids, mask, adv, old, ref = _inputs()
    del logits
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE).requires_grad_()
    benchmark.extra_info.update(tokens=B * T, vocab=V, hidden=H, device=DEVICE, logits_mib=B * T * V * 4 / 2**20)

    def loss_fn():
        if impl == "materialised_logits":
            return ops.policy_loss(hidden @ weight.t(), ids, adv, mask, old, ref, backend="auto", **KW)[0]
        return ops.fused_linear_policy_loss(
            hidden, weight, None, ids, adv, mask, old, ref, chunk_size=128, backend="auto", **KW
        )[0]

    def run():
        return torch.autograd.grad(loss_fn(), (hidden, weight))

    benchmark.extra_info["saved_for_backward_mib"] = saved_mib(loss_fn)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
