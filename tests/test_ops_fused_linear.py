"""fused_linear_policy_loss (chunked LM head) vs the materialised-logits policy loss in float64.

fp32 inputs: loss within 1e-5, gradients of hidden / weight / bias within 1e-4 x their max (the chunked
matmuls sum in a different order). bf16 inputs are compared with the float64 loss of the bf16-rounded
logits: the chunk's logits are rounded to bf16 once, as a model's would be, so 2^-6 relative.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, requires_triton

import grkernels.ops as ops
from grkernels.kernels import cpp_loaded, cpp_status

requires_cpp = pytest.mark.skipif(DEVICE != "cpu" or not cpp_loaded(), reason=f"C++ kernels: {cpp_status()}")

BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]
KERNELS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]


def _inputs(B=2, T=5, H=16, V=41, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    ids = torch.where(mask, ids, torch.full_like(ids, -100))
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T + bias.double()
        lp = torch.log_softmax(logits, -1).gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return hidden, weight, bias, ids, mask, adv, old, ref


KW = dict(beta=0.05, entropy_coef=0.02, temperature=0.8, clip_high=0.28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("loss_agg,isl", [("token_mean", "token"), ("grpo", "sequence")])
def test_fused_linear_matches_materialised(backend, chunk_size, with_bias, loss_agg, isl, device):
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs(seed=chunk_size)
    bias = bias if with_bias else None
    params = [t.clone().to(device).requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    h, w = params[0], params[1]
    b = params[2] if with_bias else None
    d = [t.to(device) for t in (ids, adv, mask, old, ref)]
    loss, metrics = ops.fused_linear_policy_loss(
        h, w, b, *d, loss_agg=loss_agg, importance_sampling=isl,
        chunk_size=chunk_size, backend=backend, **KW,
    )  # fmt: skip
    refs = [t.detach().double().requires_grad_() for t in params]
    logits = refs[0] @ refs[1].T + (refs[2] if with_bias else 0.0)
    ref_loss, ref_metrics = ops.policy_loss(
        logits, ids, adv.double(), mask, old.double(), ref.double(), loss_agg=loss_agg,
        importance_sampling=isl, backend="torch", **KW,
    )  # fmt: skip
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k].cpu().double(), ref_metrics[k].double(), atol=1e-5, rtol=1e-5, msg=k)
    loss.backward()
    ref_loss.backward()
    for p, r in zip(params, refs):
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(p.grad.cpu().double(), r.grad, atol=1e-4 * scale, rtol=0)
    assert (h.grad.cpu()[~mask] == 0).all(), "masked tokens must give zero hidden-state gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_frozen_weight_and_bf16(backend, device):
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs(seed=4, dtype=torch.bfloat16, V=37)
    h = hidden.clone().to(device).requires_grad_()
    w, b = weight.to(device), bias.to(device)
    d = [t.to(device) for t in (ids, adv, mask, old, ref)]
    loss, _ = ops.fused_linear_policy_loss(h, w, b, *d, chunk_size=4, backend=backend, **KW)
    loss.backward()
    assert w.grad is None and b.grad is None  # frozen head: no gradient computed or stored
    hr = hidden.double().requires_grad_()
    logits = (hr @ weight.double().T + bias.double()).to(torch.bfloat16).double()
    ref_loss, _ = ops.policy_loss(logits, ids, adv.double(), mask, old.double(), ref.double(),
                                  backend="torch", **KW)  # fmt: skip
    tol = 2.0**-6 * ref_loss.abs().item()
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), atol=tol, rtol=0)
    ref_loss.backward()
    assert h.grad.dtype == torch.bfloat16
    scale = hr.grad.abs().max().item()
    torch.testing.assert_close(h.grad.cpu().double(), hr.grad, atol=2.0**-5 * scale, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_weight_dtype_accumulation(backend, device):
    """fp32_grad_weight=False accumulates dW in the weight dtype: same result up to per-chunk rounding."""
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs(seed=6, dtype=torch.bfloat16, T=9)
    d = [t.to(device) for t in (ids, adv, mask, old, ref)]
    grads = []
    for fp32 in (True, False):
        w = weight.clone().to(device).requires_grad_()
        loss, _ = ops.fused_linear_policy_loss(
            hidden.to(device), w, None, *d, chunk_size=4, fp32_grad_weight=fp32, backend=backend, **KW
        )
        loss.backward()
        assert w.grad.dtype == torch.bfloat16
        grads.append(w.grad.cpu().double())
    scale = grads[0].abs().max().item()
    torch.testing.assert_close(grads[1], grads[0], atol=2.0**-6 * scale, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_no_grad_and_partial_grads(backend, device):
    """Under no_grad only the loss is computed; with only hidden trainable, only its gradient exists."""
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs(seed=8)
    d = [t.to(device) for t in (ids, adv, mask, old, ref)]
    h, w, b = hidden.to(device), weight.to(device), bias.to(device)
    with torch.no_grad():
        l0, m0 = ops.fused_linear_policy_loss(h, w, b, *d, chunk_size=3, backend=backend, **KW)
    hg = h.clone().requires_grad_()
    l1, m1 = ops.fused_linear_policy_loss(hg, w, b, *d, chunk_size=3, backend=backend, **KW)
    torch.testing.assert_close(l0, l1.detach())
    assert not l0.requires_grad and l1.requires_grad
    (2.0 * l1).backward()  # the upstream scale reaches the stored gradients
    hr = hidden.double().requires_grad_()
    logits = hr @ weight.double().T + bias.double()
    ref_loss, _ = ops.policy_loss(logits, ids, adv.double(), mask, old.double(), ref.double(), backend="torch", **KW)
    (2.0 * ref_loss).backward()
    torch.testing.assert_close(hg.grad.cpu().double(), hr.grad, atol=1e-4 * hr.grad.abs().max().item(), rtol=0)


def test_fused_linear_bad_inputs(device):
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs()
    with pytest.raises(ValueError, match="weight must be"):
        ops.fused_linear_policy_loss(hidden, weight[:, :-1], bias, ids, adv, mask)
    with pytest.raises(ValueError, match="bias"):
        ops.fused_linear_policy_loss(hidden, weight, bias[:-1], ids, adv, mask)
    with pytest.raises(TypeError, match="dtype"):
        ops.fused_linear_policy_loss(hidden, weight.double(), bias, ids, adv, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.fused_linear_policy_loss(hidden, weight, bias, ids, adv, mask, chunk_size=0)
    with pytest.raises(ValueError, match="completion_ids"):
        ops.fused_linear_policy_loss(hidden, weight, bias, ids[:, :-1], adv, mask)
    bad = ids.clone()
    bad[0, 0] = weight.shape[0]
    with pytest.raises(ValueError, match="outside"):
        ops.fused_linear_policy_loss(hidden, weight, bias, bad, adv, mask)
