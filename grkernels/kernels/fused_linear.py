"""LM head + log-prob/entropy without materialising the logits: ``z = h W^T + b`` chunk by chunk over tokens.

Forward, per chunk of ``C`` tokens: ``z_c = h_c W^T (+ b)`` in the hidden dtype, then the fused
log-prob/entropy pass (``grkernels.kernels.logprob``'s Triton kernel, or the same math in torch), keeping
only ``logp``, ``H`` and ``lse`` per token; ``z_c`` is dropped.
Backward, per chunk: recompute ``z_c`` (one extra ``[C, H] x [H, V]`` matmul, the price of never storing
logits), turn it into ``dz_c`` in place with the backward kernel, then ``dh_c = dz_c W``,
``dW += dz_c^T h_c`` (an fp32 accumulator, cast to the weight dtype once at the end; on CUDA with
torch >= 2.8 the bf16 product goes into it unrounded; ``fp32_grad_weight=False`` accumulates in the weight
dtype instead, to save memory), ``db += sum_c dz_c`` (fp32).
The loss itself is applied outside, on the per-token ``logp``/``H`` (O(tokens)), so every loss aggregation
and GSPO's sequence-level ratios work unchanged. Frozen weights (``requires_grad=False``) skip the ``dW``
matmul. Peak extra memory: one ``[C, V]`` chunk in the hidden dtype (Triton) or a few fp32 ones (torch),
plus the fp32 ``[V, H]`` dW accumulator when the weight is trained.
"""

from __future__ import annotations

import torch

from grkernels.kernels import triton_usable


def accumulate_head_grads(
    dz: torch.Tensor,
    weight: torch.Tensor,
    h: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    rows: slice,
) -> None:
    """For one token chunk with logits z = h·Wᵀ + b and dL/dz = ``dz``: grad_h[rows] = dz·W, grad_W += dzᵀ·h
    (fp32 accumulation), grad_b += Σ dz. A None gradient is skipped (frozen weight / no bias / h not needed)."""
    if grad_h is not None:
        torch.mm(dz, weight, out=grad_h[rows])
    if grad_w is not None:
        _addmm_fp32_(grad_w, dz.t(), h)
    if grad_b is not None:
        grad_b += dz.sum(0, dtype=torch.float32)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 ``acc`` without first rounding the bf16/fp16 product to bf16/fp16."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda":
        try:  # torch >= 2.8: cuBLAS writes the fp32 product-sum straight into acc
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except TypeError:
            pass
    acc.addmm_(a.float(), b.float())


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def _torch_chunk_forward(z, ids, inv_temp):
    """Reference per-chunk forward: fp32 (logp, (max, log-sum-exp minus max), H) of ``z [C, V]`` at ``ids``."""
    z32 = z.float() * inv_temp
    m = z32.amax(-1)
    shifted = z32 - m[:, None]
    log_s = shifted.exp().sum(-1).log()
    logp_all = shifted - log_s[:, None]
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    logp = logp_all.gather(1, ids[:, None]).squeeze(1)
    return logp, (m, log_s), ent


def _torch_chunk_backward(z, ids, lse, ent, g_lp, g_ent, inv_temp):
    """Reference per-chunk backward: ``inv_temp (g_lp (onehot - p) - g_H p (log p + H))`` as z's dtype."""
    logp_all = (z.float() * inv_temp - lse[0][:, None]) - lse[1][:, None]
    p = logp_all.exp()
    dz = -g_lp[:, None] * p
    if g_ent is not None:
        dz = dz - g_ent[:, None] * p * torch.where(p > 0, logp_all + ent[:, None], 0.0)
    dz.scatter_add_(1, ids[:, None], g_lp[:, None])
    return (dz * inv_temp).to(z.dtype)


class FusedLinearLogProbEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V]|None, ids [N], active [N]) -> (logp, entropy) fp32 [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, active, temperature, chunk_size, use_triton, fp32_grad_weight):
        n = hidden.shape[0]
        dev = hidden.device
        inv_temp = 1.0 / float(temperature)
        # inactive tokens may hold padding ids (e.g. -100): point them at 0, their outputs are zeroed anyway
        ids = torch.where(active, ids, torch.zeros_like(ids)).long().contiguous()
        act_u8 = active.contiguous().view(torch.uint8)
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        mx = torch.empty(n, dtype=torch.float32, device=dev)
        log_s = torch.empty(n, dtype=torch.float32, device=dev)
        ent = torch.empty(n, dtype=torch.float32, device=dev)
        if use_triton:
            from grkernels.kernels.logprob import logp_entropy_forward
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], weight, bias)
            if use_triton:
                lp_c, lse_c, ent_c = logp_entropy_forward(z.unsqueeze(0), ids[s:e], act_u8[s:e], inv_temp)
            else:
                lp_c, lse_c, ent_c = _torch_chunk_forward(z, ids[s:e], inv_temp)
            logp[s:e] = lp_c
            mx[s:e], log_s[s:e] = lse_c
            ent[s:e] = ent_c
            del z
        zero = logp.new_zeros(())
        logp = torch.where(active, logp, zero)
        ent = torch.where(active, ent, zero)
        ctx.save_for_backward(hidden, weight, bias, ids, active, mx, log_s, ent)
        ctx.inv_temp = inv_temp
        ctx.chunk_size = chunk_size
        ctx.use_triton = use_triton
        ctx.fp32_grad_weight = fp32_grad_weight
        ctx.set_materialize_grads(False)  # an unused entropy output arrives as None: no dH term to compute
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, ids, active, mx, log_s, ent = ctx.saved_tensors
        n = hidden.shape[0]
        if g_lp is None and g_ent is None:
            return (None,) * 9
        zero = mx.new_zeros(())
        # masked tokens: zero upstream gradient, so the kernel skips reading their logits
        g_lp = torch.zeros_like(mx) if g_lp is None else torch.where(active, g_lp.float(), zero).contiguous()
        g_ent = None if g_ent is None else torch.where(active, g_ent.float(), zero).contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        # dW sums over all chunks: by default in an fp32 accumulator (a bf16 running sum is rounded once per
        # chunk), cast once at the end; fp32_grad_weight=False sums into the weight dtype (saves 6 bytes per
        # weight element of peak memory, e.g. 3.7 GB for a 152k x 4096 head, for per-chunk rounding)
        acc_dtype = torch.float32 if ctx.fp32_grad_weight else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        if ctx.use_triton:
            from grkernels.kernels.logprob import logp_entropy_backward
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            z = _chunk_logits(h, weight, bias)
            if ctx.use_triton:
                z3 = z.unsqueeze(0)
                logp_entropy_backward(
                    z3, z3, ids[s:e], None, (mx[s:e], log_s[s:e]), ent[s:e], g_lp[s:e],
                    None if g_ent is None else g_ent[s:e], ctx.inv_temp,
                )  # fmt: skip
                dz = z  # overwritten in place
            else:
                dz = _torch_chunk_backward(
                    z, ids[s:e], (mx[s:e], log_s[s:e]), ent[s:e], g_lp[s:e], None if g_ent is None else g_ent[s:e],
                    ctx.inv_temp,
                )  # fmt: skip
            accumulate_head_grads(dz, weight, h, grad_h if need_h else None, grad_w if need_w else None,
                                  grad_b if need_b else None, slice(s, e))
            del z, dz
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def fused_linear_logp_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    active: torch.Tensor,
    temperature: float,
    chunk_size: int,
    use_triton: bool,
    fp32_grad_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) fp32 ``[N]`` of ``hidden [N, H] @ weight.T + bias`` at ``ids [N]`` (inputs validated)."""
    if use_triton and not triton_usable(hidden.device):
        raise RuntimeError(f"fused_linear_policy_loss: Triton cannot run on {hidden.device}")
    return FusedLinearLogProbEntropy.apply(
        hidden, weight, bias, ids, active.bool(), temperature, chunk_size, use_triton, fp32_grad_weight
    )
