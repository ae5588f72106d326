"""Fused token-level PPO-clip policy loss: log-prob, entropy, ratio, clip, KL and the loss gradient per token.

For ``importance_sampling="token"`` the loss is a weighted sum of per-token terms,

    loss = sum_t w_t l_t(lp_t) - c * sum_t u_t H_t,      u_t = m_t / sum(m)      (m: completion mask)

where the aggregation weight ``w_t`` (``m_t / N`` for token mean, ``m_t / (B n_b)`` for GRPO's sequence
mean of token means, ``m_t / (B L)`` for Dr.GRPO, ``m_t / B`` for sequence sums) depends on the mask only.
So dloss/dlp_t = w_t l_t'(lp_t) and dloss/dH_t = -c u_t are known in the forward pass. One forward kernel
per token does the vocabulary pass of ``logprob.py`` and then, in registers, the whole per-token loss:

    r = exp(lp - old)        r_c = clamp(r, 1 - eps_low, 1 + eps_high)      r_1 = min(r, delta) (optional)
    l = -min(r_1 A, r_c A) + beta KL(d = ref - lp)      k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1
    dl/dlp = -(g_1 A dr_1 + g_2 A dr_c) + beta dKL,   dr = r where the clamp passes the gradient, else 0

with ``torch.min``'s tie rule (g_1 = g_2 = 1/2 when r_1 A = r_c A, 1/0 otherwise), so the gradient equals
autograd's through the reference expression exactly, and writes five per-token values (weighted loss,
masked entropy, KL, low/high clip indicators) that a single ``sum`` reduces to the loss and the metrics.
Backward is ``logprob.py``'s single pass over the logits with ``g_lp = w l' * dL`` and ``g_H = -c u * dL``.
Saved: the logits and five fp32 ``[tokens]`` vectors. ``FusedLinearPolicyLossFunction`` applies the same
kernels to ``hidden @ W^T`` chunk by chunk and forms the parameter gradients in the forward pass.
GSPO's sequence-level ratios need the whole sequence's log-probs before any token's loss: that case uses
the generic path (log-prob/entropy kernel + torch epilogue).
Runtime scalars (temperature, clip bounds, delta, beta, entropy coefficient) are kernel arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grkernels.kernels.fused_linear import accumulate_head_grads
from grkernels.kernels.logprob import _as_3d, _row_logp_entropy, launch_config, logp_entropy_backward

KL_CODES = {"k1": 0, "k2": 1, "k3": 2}


@triton.jit
def _policy_loss_fwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    n_inner,
    ids_ptr,
    mask_ptr,
    w_ptr,
    adv_ptr,
    adv_stride_b,
    adv_stride_t,
    old_ptr,
    ref_ptr,
    out_ptr,
    max_ptr,
    logs_ptr,
    ent_ptr,
    glp_ptr,
    n_tokens,
    T,
    V,
    inv_temp,
    clip_lo,
    clip_hi,
    delta,
    beta,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    KL_EST: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    act = tl.load(mask_ptr + row) != 0
    y = tl.load(ids_ptr + row).to(tl.int64)
    y = tl.minimum(tl.maximum(y, 0), V - 1)  # padding ids of masked tokens never address memory
    lp, m, log_s, ent = _row_logp_entropy(base, y, act, V, inv_temp, True, BLOCK_V)

    w = tl.load(w_ptr + row)  # aggregation weight, 0 on masked tokens
    adv = tl.load(adv_ptr + (row // T) * adv_stride_b + (row % T) * adv_stride_t).to(tl.float32)
    if HAS_OLD:
        old = tl.load(old_ptr + row).to(tl.float32)
    else:
        old = lp  # on-policy: r = exp(lp - lp.detach()) = 1, dr/dlp = 1
    # masked tokens may hold padding garbage in old/ref: zero the differences before exp()
    r = tl.exp(tl.where(act, lp - old, 0.0))
    r_c = tl.minimum(tl.maximum(r, 1.0 - clip_lo), 1.0 + clip_hi)
    dr_c = tl.where((r >= 1.0 - clip_lo) & (r <= 1.0 + clip_hi), r, 0.0)  # clamp passes grad on [lo, hi]
    if HAS_DELTA:
        r_1 = tl.minimum(r, delta)
        dr_1 = tl.where(r <= delta, r, 0.0)
    else:
        r_1 = r
        dr_1 = r
    s1 = r_1 * adv
    s2 = r_c * adv
    g1 = tl.where(s1 < s2, 1.0, tl.where(s1 == s2, 0.5, 0.0))  # torch.min's gradient, ties split evenly
    per_tok = -tl.minimum(s1, s2)
    dper = -(g1 * adv * dr_1 + (1.0 - g1) * adv * dr_c)
    if HAS_REF:
        d = tl.where(act, tl.load(ref_ptr + row).to(tl.float32) - lp, 0.0)
        if KL_EST == 0:
            kl = -d
            dkl = tl.full((), 1.0, tl.float32)
        elif KL_EST == 1:
            kl = 0.5 * d * d
            dkl = -d
        else:
            ed = tl.exp(d)
            kl = ed - d - 1.0
            dkl = 1.0 - ed
        per_tok = per_tok + beta * kl
        dper = dper + beta * dkl
    else:
        kl = tl.zeros((), tl.float32)
    mf = act.to(tl.float32)
    low = ((r_1 < 1.0 - clip_lo) & (adv < 0.0)).to(tl.float32)
    high = ((r_1 > 1.0 + clip_hi) & (adv > 0.0)).to(tl.float32)
    # five rows of per-token values, reduced by one torch.sum: loss, entropy, KL, low clip, high clip
    tl.store(out_ptr + row, w * per_tok)
    tl.store(out_ptr + n_tokens + row, ent * mf)
    tl.store(out_ptr + 2 * n_tokens + row, kl * mf)
    tl.store(out_ptr + 3 * n_tokens + row, low * mf)
    tl.store(out_ptr + 4 * n_tokens + row, high * mf)
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    tl.store(ent_ptr + row, ent)
    tl.store(glp_ptr + row, w * dper)


class FusedPolicyLossFunction(torch.autograd.Function):
    """(logits [B, T, V], ...) -> (loss 0-d, stats [5]: policy loss, mean entropy, mean KL, low/high clip)."""

    @staticmethod
    def forward(ctx, logits, ids, mask_b, weights, inv_ntok, adv, old, ref, cfg):
        B, T, V = logits.shape
        n = B * T
        logits3 = _as_3d(logits)
        dev = logits.device
        ids_f = ids.reshape(-1).contiguous()
        mask_u8 = mask_b.reshape(-1).contiguous().view(torch.uint8)
        w = weights.reshape(-1).contiguous()
        adv2 = adv.reshape(B, 1) if adv.numel() == B else adv.reshape(B, T)
        adv_sb, adv_st = adv2.stride(0), (adv2.stride(1) if adv2.shape[1] == T else 0)
        old_f = None if old is None else old.reshape(-1).float().contiguous()
        ref_f = None if ref is None else ref.reshape(-1).float().contiguous()
        out = torch.empty(5, n, dtype=torch.float32, device=dev)
        mx, log_s, ent, g_lp = _launch_policy_fwd(
            logits3, ids_f, mask_u8, w, adv2, adv_sb, adv_st, T, old_f, ref_f, out, n, cfg
        )
        coef = float(cfg["entropy_coef"])
        inv_temp = 1.0 / float(cfg["temperature"])
        loss, stats = _loss_and_stats(out, inv_ntok, coef)
        ctx.save_for_backward(logits3, ids_f, mask_u8, mx, log_s, ent, g_lp, inv_ntok)
        ctx.coef = coef
        ctx.inv_temp = inv_temp
        ctx.inplace = cfg["inplace_backward"]
        ctx.logits_shape = logits.shape
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        logits3, ids, mask_u8, mx, log_s, ent, g_lp, inv_ntok = ctx.saved_tensors
        if g_loss is None:
            return (None,) * 9
        g_loss = g_loss.float()
        g_lp_eff = g_lp * g_loss  # no host sync: the upstream scalar stays on the device
        g_ent = None
        if ctx.coef != 0.0:
            g_ent = mask_u8.to(torch.float32) * (inv_ntok * (-ctx.coef) * g_loss)
        grad3 = logits3 if ctx.inplace else torch.empty_like(logits3)
        logp_entropy_backward(logits3, grad3, ids, None, (mx, log_s), ent, g_lp_eff, g_ent, ctx.inv_temp)
        return grad3.reshape(ctx.logits_shape), None, None, None, None, None, None, None, None


def _launch_policy_fwd(z3, ids, mask_u8, w, adv_tok, adv_sb, adv_st, T, old_f, ref_f, out, row_stride, cfg):
    """Forward kernel on ``z3 [outer, inner, V]``; per-token outputs into fresh fp32 vectors (returned)."""
    n = z3.shape[0] * z3.shape[1]
    V = z3.shape[2]
    dev = z3.device
    mx, log_s, ent, g_lp = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4))
    block, warps = launch_config(V, z3.element_size())
    _policy_loss_fwd_kernel[(n,)](
        z3, z3.stride(0), z3.stride(1), z3.shape[1],
        ids, mask_u8, w, adv_tok, adv_sb, adv_st,
        old_f if old_f is not None else w, ref_f if ref_f is not None else w,
        out, mx, log_s, ent, g_lp,
        row_stride, T, V, 1.0 / float(cfg["temperature"]), float(cfg["clip_low"]), float(cfg["clip_high"]),
        float(cfg["delta"]) if cfg["delta"] is not None else 0.0, float(cfg["beta"]),
        HAS_OLD=old_f is not None, HAS_REF=ref_f is not None, HAS_DELTA=cfg["delta"] is not None,
        KL_EST=KL_CODES[cfg["kl_estimator"]], BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
    return mx, log_s, ent, g_lp


def _loss_and_stats(out: torch.Tensor, inv_ntok: torch.Tensor, coef: float):
    sums = out.sum(1)
    stats = torch.stack([sums[0], sums[1] * inv_ntok, sums[2] * inv_ntok, sums[3] * inv_ntok, sums[4] * inv_ntok])
    loss = sums[0] - coef * stats[1] if coef != 0.0 else sums[0].clone()
    return loss, stats


class FusedLinearPolicyLossFunction(torch.autograd.Function):
    """Token-level policy loss of ``hidden [N, H] @ weight.T (+ bias)``, gradients computed in the forward.

    For token-level importance sampling every token's loss gradient is known in the forward pass (see the
    module docstring), so each chunk's logits, once evaluated, are turned into d(logits) in place right away
    and multiplied into ``d hidden``, ``d W``, ``d b``: three matmuls per chunk instead of four (no recompute
    in backward). Backward only scales the stored gradients by the upstream scalar (on the device).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask_b, weights, inv_ntok, adv, old, ref, cfg):
        N = hidden.shape[0]
        V = weight.shape[0]
        dev = hidden.device
        B, T = mask_b.shape
        chunk = int(cfg["chunk_size"])
        coef = float(cfg["entropy_coef"])
        inv_temp = 1.0 / float(cfg["temperature"])
        ids_f = torch.where(mask_b, ids, torch.zeros_like(ids)).reshape(-1).long().contiguous()
        mask_f = mask_b.reshape(-1).contiguous()
        mask_u8 = mask_f.view(torch.uint8)
        w = weights.reshape(-1).contiguous()
        # advantages per token (O(N)): a chunk's rows then index them directly (T = 1, strides (1, 0))
        adv_tok = (adv.reshape(B, 1) if adv.numel() == B else adv.reshape(B, T)).expand(B, T).reshape(-1)
        adv_tok = adv_tok.float().contiguous()
        old_f = None if old is None else old.reshape(-1).float().contiguous()
        ref_f = None if ref is None else ref.reshape(-1).float().contiguous()
        need_h, need_w, need_b = cfg["needs_grad"]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.float32 if cfg["fp32_grad_weight"] else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=dev) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
        any_grad = need_h or need_w or need_b
        g_ent_all = mask_f.to(torch.float32) * (inv_ntok * -coef) if (coef != 0.0 and any_grad) else None
        out = torch.empty(5, N, dtype=torch.float32, device=dev)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h = hidden[s:e]
            z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
            z3 = z.unsqueeze(0)
            mx, log_s, ent, g_lp = _launch_policy_fwd(
                z3, ids_f[s:e], mask_u8[s:e], w[s:e], adv_tok[s:e], 1, 0, 1,
                None if old_f is None else old_f[s:e], None if ref_f is None else ref_f[s:e],
                out[:, s:e], N, cfg,
            )  # fmt: skip
            if not any_grad:
                continue
            g_ent = None if g_ent_all is None else g_ent_all[s:e]
            logp_entropy_backward(z3, z3, ids_f[s:e], None, (mx, log_s), ent, g_lp, g_ent, inv_temp)
            accumulate_head_grads(z, weight, h, grad_h if need_h else None, grad_w if need_w else None,
                                  grad_b if need_b else None, slice(s, e))
            del z, z3
        loss, stats = _loss_and_stats(out, inv_ntok, coef)
        # keep the gradients in the parameters' dtypes until backward (the fp32 accumulator is freed here)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if g_loss is None:
            return (None,) * 11
        # the loss is linear in the stored gradients' scale: multiply by the upstream scalar on the device
        outs = [None if g is None else g * g_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*outs, None, None, None, None, None, None, None, None)


def triton_policy_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask_b: torch.Tensor,
    weights: torch.Tensor,
    inv_ntok: torch.Tensor,
    adv: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    cfg: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level fused policy loss on validated ``[B, T, V]`` inputs; returns ``(loss, stats[5])``."""
    return FusedPolicyLossFunction.apply(logits, ids, mask_b, weights, inv_ntok, adv, old, ref, cfg)


def triton_fused_linear_policy_loss(hidden, weight, bias, ids, mask_b, weights, inv_ntok, adv, old, ref, cfg):
    """Token-level fused LM-head policy loss on validated inputs (``hidden [N, H]``); ``(loss, stats[5])``."""
    return FusedLinearPolicyLossFunction.apply(hidden, weight, bias, ids, mask_b, weights, inv_ntok, adv, old, ref, cfg)


__all__ = [
    "KL_CODES",
    "FusedLinearPolicyLossFunction",
    "FusedPolicyLossFunction",
    "triton_fused_linear_policy_loss",
    "triton_policy_loss",
]
