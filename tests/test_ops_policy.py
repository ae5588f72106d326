"""policy_loss and kl_penalty against an independent float64 transcription of TRL 1.16's GRPO loss.

``_trl_loss`` below follows ``trl/trainer/grpo_trainer.py::_compute_loss`` line by line (gradient
accumulation 1, one process, no vLLM correction), so a wrong aggregation, clip or KL sign in grkernels shows.
Tolerances: fp32 logits 1e-5 on the loss and 1e-5 x max|grad| on gradients; bf16 logits compare against the
float64 reference of the same rounded logits, gradients 2^-7 x max|grad| (stored in bf16).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, requires_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grkernels.ops as ops
from grkernels.kernels import cpp_loaded, cpp_status

requires_cpp = pytest.mark.skipif(DEVICE != "cpu" or not cpp_loaded(), reason=f"C++ kernels: {cpp_status()}")

BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]
KERNELS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # x max|grad|, one rounding


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


def _trl_loss(logits, ids, adv, mask, old, ref, beta, eps_low, eps_high, loss_type, isl, temperature,
              entropy_coef, num_items=None, max_len=None, delta=None):  # fmt: skip
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    per_token_logps = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropies = -(logp_all.exp() * logp_all).sum(-1)
    mask = mask.to(logits.dtype)
    advantages = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old_per_token_logps = per_token_logps.detach() if old is None else old
    log_ratio = per_token_logps - old_per_token_logps
    if isl == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = None
    if ref is not None:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / torch.as_tensor(num_items).clamp(min=1.0)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    policy = loss.detach()
    ent_mean = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
    loss = loss - entropy_coef * ent_mean

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    low = (coef_1 < 1 - eps_low) & (advantages < 0)
    high = (coef_1 > 1 + eps_high) & (advantages > 0)
    metrics = {
        "entropy": ent_mean.detach(),
        "clip_fraction": global_masked_mean((low | high).to(logits.dtype)),
        "clip_low_fraction": global_masked_mean(low.to(logits.dtype)),
        "clip_high_fraction": global_masked_mean(high.to(logits.dtype)),
        "policy_loss": policy,
    }
    if per_token_kl is not None:
        metrics["kl"] = global_masked_mean(per_token_kl.detach())
    return loss, metrics


def _inputs(B=3, T=6, V=37, dtype=torch.float32, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[-1] = False  # a sequence with no completion tokens: must not produce NaN
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(logits.double() / 0.9, -1).gather(-1, ids[..., None]).squeeze(-1)  # T = 0.9
    # old/ref policies near the current one, far enough for some ratios to leave [0.8, 1.2]
    noise = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # a per-sequence shift that moves GSPO's sequence ratios out of the clip band for some sequences
    adv_seq = adv if adv.dim() == 1 else adv.mean(-1)
    shift = torch.rand(B, 1, generator=g, dtype=torch.float64)
    shift = -torch.sign(adv_seq.double())[:, None] * (0.1 + 0.5 * shift)
    old = (lp + noise + shift).float()
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ids_padded = torch.where(mask, ids, torch.full_like(ids, -100))
    return logits, ids, ids_padded, mask, adv, old, ref


CASES = [
    # (loss_agg passed to grkernels, TRL loss_type, extra kwargs)
    ("token_mean", "bnpo", {}),
    ("dapo", "dapo", {"num_items": 40.0}),
    ("grpo", "grpo", {}),
    ("seq_mean_token_mean", "grpo", {"delta": 1.1}),
    ("dr_grpo", "dr_grpo", {"max_completion_length": 16}),
    ("seq_mean_token_sum", "luspo", {}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("agg,trl_type,extra", CASES)
def test_policy_loss_matches_trl(agg, trl_type, extra, importance_sampling, backend, device):
    seed = [c[0] for c in CASES].index(agg) * 2 + (importance_sampling == "sequence")
    logits, ids, ids_padded, mask, adv, old, ref = _inputs(seed=seed)
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, temperature=0.9, entropy_coef=0.01)
    x = logits.clone().to(device).requires_grad_()
    d_ids, d_adv, d_mask, d_old, d_ref = _to(device, ids_padded, adv, mask, old, ref)
    loss, metrics = ops.policy_loss(
        x, d_ids, d_adv, d_mask, old_logp=d_old, ref_logp=d_ref, kl_estimator="k3", loss_agg=agg,
        importance_sampling=importance_sampling, backend=backend, **kw, **extra,
    )  # fmt: skip
    xr = logits.double().requires_grad_()
    ref_loss, ref_metrics = _trl_loss(
        xr, ids, adv.double(), mask, old.double(), ref.double(), kw["beta"], kw["clip_low"], kw["clip_high"],
        trl_type, importance_sampling, kw["temperature"], kw["entropy_coef"],
        num_items=extra.get("num_items"), max_len=extra.get("max_completion_length"), delta=extra.get("delta"),
    )  # fmt: skip
    assert loss.dim() == 0 and torch.isfinite(loss)
    if "delta" not in extra:  # the inputs are built so that the clipped branch is exercised
        assert metrics["clip_fraction"] > 0
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    for k, v in ref_metrics.items():
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad and metrics[k].device == x.device
        torch.testing.assert_close(metrics[k].cpu().double(), v.double(), atol=1e-5, rtol=1e-5, msg=k)
    loss.backward()
    ref_loss.backward()
    scale = xr.grad.abs().max().item()
    grad = x.grad.cpu()
    torch.testing.assert_close(grad.double(), xr.grad, atol=1e-5 * scale, rtol=0)
    assert (grad[~mask] == 0).all(), "masked tokens must get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_bf16_per_token_advantages(backend, device):
    """old_logp=None (ratio 1, gradient = -A grad logp), bf16 logits, advantages per token, no KL."""
    logits, ids, ids_padded, mask, adv, _, _ = _inputs(dtype=torch.bfloat16, seed=7, per_token_adv=True)
    x = logits.clone().to(device).requires_grad_()
    loss, metrics = ops.policy_loss(x, *_to(device, ids_padded, adv, mask), loss_agg="grpo", backend=backend)
    xr = logits.double().requires_grad_()
    ref_loss, _ = _trl_loss(xr, ids, adv.double(), mask, None, None, 0.0, 0.2, 0.2, "grpo", "token", 1.0, 0.0)
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    assert metrics["clip_fraction"].item() == 0.0 and metrics["kl"].item() == 0.0
    loss.backward()
    ref_loss.backward()
    assert x.grad.dtype == torch.bfloat16
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, atol=2.0**-7 * scale, rtol=0)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_inplace_backward_policy_loss(backend, device):
    logits, _, ids_padded, mask, adv, old, ref = _inputs(seed=11)
    logits, ids_padded, mask, adv, old, ref = _to(device, logits, ids_padded, mask, adv, old, ref)
    leaf = logits.clone().requires_grad_()
    work = leaf * 1.0
    loss, _ = ops.policy_loss(work, ids_padded, adv, mask, old, ref, beta=0.1, inplace_backward=True,
                              entropy_coef=0.02, backend=backend)  # fmt: skip
    loss.backward()
    leaf2 = logits.clone().requires_grad_()
    loss2, _ = ops.policy_loss(leaf2, ids_padded, adv, mask, old, ref, beta=0.1, entropy_coef=0.02, backend="torch")
    loss2.backward()
    torch.testing.assert_close(leaf.grad, leaf2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(work.detach(), leaf2.grad, atol=1e-6, rtol=1e-5)  # the buffer holds the grad


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_formulas_and_policy_loss_estimators(estimator, device):
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    rf = lp + 0.5 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    d = rf - lp
    want = {"k1": lp - rf, "k2": 0.5 * (lp - rf) ** 2, "k3": d.exp() - d - 1}[estimator]
    torch.testing.assert_close(ops.kl_penalty(lp, rf, estimator), want)
    if estimator != "k1":
        assert (ops.kl_penalty(lp, rf, estimator) >= 0).all()
    # the estimator reaches policy_loss: loss(beta) - loss(0) = beta * token-mean KL
    logits, _, ids_padded, mask, adv, old, ref = _inputs(seed=5)
    l0, m0 = ops.policy_loss(logits, ids_padded, adv, mask, old, ref, beta=0.0, kl_estimator=estimator)
    l1, m1 = ops.policy_loss(logits, ids_padded, adv, mask, old, ref, beta=0.5, kl_estimator=estimator)
    lp_cur = ops.selective_log_softmax(logits, torch.where(mask, ids_padded, 0)).double()
    kl = ops.kl_penalty(lp_cur, ref.double(), estimator)
    kl_mean = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close((l1 - l0).double(), 0.5 * kl_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m1["kl"].double(), kl_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_extreme_logits_and_padding_values_stay_finite(backend, device):
    """-inf vocab entries, |logits| ~ 1e4, and garbage old/ref values on padded tokens: no NaN anywhere."""
    logits, _, ids_padded, mask, adv, old, ref = _inputs(seed=9)
    logits[0, 0, 5:] = float("-inf")
    ids_padded[0, 0] = 2
    logits[1] += 1e4
    old = torch.where(mask, old, torch.full_like(old, -1e30))
    ref = torch.where(mask, ref, torch.full_like(ref, float("-inf")))
    logits, ids_padded, mask, adv, old, ref = _to(device, logits, ids_padded, mask, adv, old, ref)
    x = logits.clone().requires_grad_()
    loss, metrics = ops.policy_loss(x, ids_padded, adv, mask, old, ref, beta=0.1, entropy_coef=0.1,
                                    importance_sampling="sequence", backend=backend)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert (x.grad[0, 0, 5:] == 0).all()


def test_policy_loss_bad_inputs(device):
    logits, _, ids_padded, mask, adv, old, ref = _inputs()
    B, T, V = logits.shape
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(logits, ids_padded, torch.randn(B + 1), mask)
    with pytest.raises(ValueError, match="completion_mask"):
        ops.policy_loss(logits, ids_padded, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="old_logp"):
        ops.policy_loss(logits, ids_padded, adv, mask, old_logp=old[:, :-1])
    with pytest.raises(ValueError, match="ids shape"):
        ops.policy_loss(logits, ids_padded[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="ref_logp"):
        ops.policy_loss(logits, ids_padded, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_agg"):
        ops.policy_loss(logits, ids_padded, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        ops.policy_loss(logits, ids_padded, adv, mask, ref_logp=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="importance_sampling"):
        ops.policy_loss(logits, ids_padded, adv, mask, importance_sampling="seq")
    with pytest.raises(ValueError, match="on meta"):
        ops.policy_loss(logits, ids_padded, adv, mask.to("meta"))
    bad = ids_padded.clone()
    bad[0, 0] = V  # an active token with an id outside the vocabulary
    with pytest.raises(ValueError, match="outside"):
        ops.policy_loss(logits, bad, adv, mask)
    with pytest.raises(ValueError, match="empty"):
        ops.policy_loss(logits[:0], ids_padded[:0], adv[:0], mask[:0])


@pytest.mark.parametrize("backend", KERNELS)
def test_fused_token_path_matches_generic_path_and_saves_no_vocab_copy(backend, device):
    """The fused token-level kernel equals kernel + torch epilogue, and autograd keeps O(tokens) besides logits."""
    logits, _, ids_padded, mask, adv, old, ref = _inputs(seed=13, per_token_adv=True)
    logits, ids_padded, mask, adv, old, ref = _to(device, logits, ids_padded, mask, adv, old, ref)
    kw = dict(beta=0.1, clip_low=0.2, clip_high=0.28, kl_estimator="k2", loss_agg="dr_grpo", entropy_coef=0.05)
    x1 = logits.clone().requires_grad_()
    work = x1 * 1.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss1, m1 = ops.policy_loss(work, ids_padded, adv, mask, old, ref, backend=backend, **kw)
    n_tok = mask.numel()
    for t in saved:
        if t.numel() > 5 * n_tok:  # O(tokens) vectors are allowed (at most five per token)
            assert t.untyped_storage().data_ptr() == work.untyped_storage().data_ptr(), tuple(t.shape)
    loss1.backward()
    # the generic path: the log-prob/entropy kernel, then the shared torch epilogue
    x2 = logits.clone().requires_grad_()
    lp, h = ops.logp_and_entropy(x2, ids_padded, active=mask, backend=backend)
    loss2, m2 = ops.policy_loss_from_logp(
        lp, h, adv, mask, old, ref, kw["beta"], kw["clip_low"], kw["clip_high"], kw["kl_estimator"],
        kw["loss_agg"], "token", kw["entropy_coef"],
    )  # fmt: skip
    loss2.backward()
    torch.testing.assert_close(loss1, loss2, atol=1e-6, rtol=1e-5)
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-7, rtol=1e-5)


@requires_triton
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 5),
    v=st.integers(2, 60),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    agg=st.sampled_from(sorted(ops.LOSS_AGGREGATIONS)),
    isl=st.sampled_from(["token", "sequence"]),
    on_policy=st.booleans(),
    estimator=st.sampled_from(["k1", "k2", "k3"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_policy_loss_triton_vs_torch_float64(b, t, v, dtype, agg, isl, on_policy, estimator, seed):

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    adv = torch.randn(b, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    old = None if on_policy else (lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    kw = dict(beta=0.1, kl_estimator=estimator, loss_agg=agg, importance_sampling=isl, entropy_coef=0.03)
    x = logits.clone().to(DEVICE).requires_grad_()
    d_ids, d_adv, d_mask, d_old, d_ref = _to(DEVICE, ids, adv, mask, old, ref)
    loss, _ = ops.policy_loss(x, d_ids, d_adv, d_mask, d_old, d_ref, backend="triton", **kw)
    loss.backward()
    xr = logits.double().requires_grad_()
    old_r = None if old is None else old.double()
    ref_loss, _ = ops.policy_loss(xr, ids, adv.double(), mask, old_r, ref.double(), backend="torch", **kw)
    ref_loss.backward()
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), atol=1e-5, rtol=1e-4)
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, atol=GRAD_TOL[dtype] * scale + 1e-9, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
@pytest.mark.parametrize("isl", ["token", "sequence"])
def test_no_host_sync_on_cuda(isl):
    logits, _, ids_padded, mask, adv, old, ref = _inputs(seed=17)
    logits, ids_padded, mask, adv, old, ref = _to("cuda", logits, ids_padded, mask, adv, old, ref)
    x = logits.requires_grad_()
    ops.policy_loss(x, ids_padded, adv, mask, old, ref, beta=0.1, backend="triton", importance_sampling=isl)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = ops.policy_loss(
            x, ids_padded, adv, mask, old, ref, beta=0.1, entropy_coef=0.01, backend="triton", importance_sampling=isl
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in metrics.values())


# ---------------------------------------------------------------------------------------- num_items (N)
def _n_inputs(B=3, T=5, V=23, seed=21):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    adv = torch.randn(B, generator=g)
    old = (torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
           + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()  # fmt: skip
    return logits, ids, mask, adv, old


def _entry_points(logits, ids, mask, adv, old, backend, importance_sampling="token"):
    """{name: call(num_items)} of policy_loss, fused_linear_policy_loss (logits = hidden @ W^T) and
    policy_loss_from_logp (the log-probs computed once, by ``backend``)."""
    kw = dict(loss_agg="dapo", importance_sampling=importance_sampling)
    V = logits.shape[-1]
    hidden = logits[..., :7]
    weight = torch.eye(7, device=logits.device).repeat(4, 1)[:V].contiguous()  # [V, 7]: logits' first 7 columns
    lp, h = ops.logp_and_entropy(logits, ids, active=mask, backend=backend)
    return {
        "policy_loss": lambda n: ops.policy_loss(logits, ids, adv, mask, old, num_items=n, backend=backend, **kw),
        "fused_linear_policy_loss": lambda n: ops.fused_linear_policy_loss(
            hidden, weight, None, ids, adv, mask, old, chunk_size=4, num_items=n, backend=backend, **kw
        ),
        "policy_loss_from_logp": lambda n: ops.policy_loss_from_logp(lp, h, adv, mask, old, num_items=n, **kw),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_must_be_finite_and_positive(backend, device):
    """num_items <= 0 used to flip the loss's sign (-3) or divide by zero (0): every op refuses it by name."""
    logits, ids, mask, adv, old = _to(device, *_n_inputs())
    bad = [-3.0, 0, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), True, "40", [40.0]]
    if device == "cpu":  # a tensor's value is checked on the host on CPU (a device-side assert on CUDA)
        bad += [torch.tensor(-3.0), torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(0.0),
                torch.tensor(0)]  # fmt: skip
    bad += [torch.tensor([40.0, 40.0], device=device), torch.tensor(True, device=device)]
    for isl in ("token", "sequence"):
        for name, call in _entry_points(logits, ids, mask, adv, old, backend, isl).items():
            for n in bad:
                with pytest.raises(ValueError, match="num_items"):
                    call(n)
                    raise AssertionError(f"{name} accepted num_items={n!r}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_num_items_tensor_equals_the_number_and_float64(backend, importance_sampling, device):
    """A tensor N (0-d, [1], integer) gives the float64 loss sum(l m) / N and its gradient, as the number does."""
    logits, ids, mask, adv, old = _n_inputs(seed=22)
    xr = logits.double().requires_grad_()
    want, _ = _trl_loss(xr, ids, adv.double(), mask, old.double(), None, 0.0, 0.2, 0.2, "dapo", importance_sampling,
                        1.0, 0.0, num_items=37.0)  # fmt: skip
    want.backward()
    for n in (37.0, torch.tensor(37.0), torch.tensor([37.0]), torch.tensor(37)):
        x = logits.clone().to(device).requires_grad_()
        n = n.to(device) if isinstance(n, torch.Tensor) else n
        loss, _ = ops.policy_loss(x, *_to(device, ids, adv, mask, old), loss_agg="dapo",
                                  importance_sampling=importance_sampling, num_items=n, backend=backend)  # fmt: skip
        assert loss.dim() == 0
        torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), atol=1e-6, rtol=1e-5)
        loss.backward()
        scale = xr.grad.abs().max().item()
        torch.testing.assert_close(x.grad.cpu().double(), xr.grad, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_zero_tensor_of_an_all_masked_batch_is_zero_on_every_backend(backend, device):
    """A device-computed count of an all-padding batch is 0: the loss is 0 with zero gradient everywhere (it was
    0/0 = NaN on torch and NaN gradients on C++), while a 0 with active tokens is refused."""
    logits, ids, mask, adv, old = _to(device, *_n_inputs(seed=23))
    none = torch.zeros_like(mask)
    zero = torch.tensor(0.0, device=device)
    for isl in ("token", "sequence"):
        x = logits.clone().requires_grad_()
        for name, call in _entry_points(x, ids, none, adv, old, backend, isl).items():
            loss, metrics = call(zero)
            assert loss.item() == 0.0, name
            assert all(torch.isfinite(v) for v in metrics.values()), name
            loss.backward()
            assert x.grad is None or (x.grad == 0).all(), name
        if device == "cpu":
            with pytest.raises(ValueError, match="num_items"):
                ops.policy_loss(logits, ids, adv, mask, old, loss_agg="dapo", importance_sampling=isl,
                                num_items=zero, backend=backend)  # fmt: skip


def test_num_items_tensor_is_checked_without_a_host_read_where_one_would_sync(monkeypatch):
    """On CUDA and under torch.compile a tensor N is checked by torch._assert_async (a device-side assertion, no
    host read); stood in for here by making the ops believe they are being compiled (on CPU it raises at once)."""
    logits, ids, mask, adv, old = _n_inputs(seed=24)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for n in (torch.tensor(-3.0), torch.tensor(float("nan"))):
        with pytest.raises(RuntimeError, match="num_items"):
            ops.policy_loss(logits, ids, adv, mask, old, loss_agg="dapo", num_items=n, backend="torch")
    loss, _ = ops.policy_loss(logits, ids, adv, mask, old, loss_agg="dapo", num_items=torch.tensor(7.0),
                              backend="torch")  # fmt: skip
    assert torch.isfinite(loss)
