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
Saved: the logits and five fp32 ``[tokens]`` vectors. The launcher below is the CUDA (and interpreted CPU)
kernel of ``torch.ops.grkernels.policy_loss_terms`` (``grkernels/ops/custom_ops.py``: autograd, fake, the C++
twin); ``grkernels.ops.fused_linear.FusedLinearPolicyLossFunction`` applies the op to ``hidden @ W^T`` chunk by
chunk and forms the parameter gradients in the forward pass.
GSPO's sequence-level ratios need the whole sequence's log-probs before any token's loss: that case uses
the generic path (log-prob/entropy kernel + torch epilogue).
Runtime scalars (temperature, clip bounds, delta, beta, entropy coefficient) are kernel arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grkernels.kernels.logprob import _row_logp_entropy, launch_config


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


def policy_loss_forward(
    logits3: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    adv_tok: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    inv_temp: float,
    clip_low: float,
    clip_high: float,
    delta: float | None,
    beta: float,
    kl_est: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward kernel on ``logits3 [outer, inner, V]`` with per-token vectors (ids int64, ``mask`` bool, the
    rest in the accumulation dtype, read in fp32; ``adv_tok`` one advantage per token).

    Returns ``(terms [2, n], stats [3, n], max, log_s, g_lp)`` in the accumulation dtype (fp64 for fp64
    logits, else fp32), as the C++ launcher of ``cpp_losses.py``: terms = (w·l, H·m), stats = (KL·m,
    low-clip·m, high-clip·m), the log-sum-exp parts, and g_lp = w·dl/dlp."""
    n = logits3.shape[0] * logits3.shape[1]
    V = logits3.shape[2]
    dev = logits3.device
    f32 = lambda t: None if t is None else t.float()
    w, adv, old_f, ref_f = weights.float(), adv_tok.float(), f32(old), f32(ref)
    out = torch.empty(5, n, dtype=torch.float32, device=dev)
    mx, log_s, ent, g_lp = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4))
    block, warps = launch_config(V, logits3.element_size())
    _policy_loss_fwd_kernel[(n,)](
        logits3, logits3.stride(0), logits3.stride(1), logits3.shape[1],
        ids, mask.view(torch.uint8), w, adv, 1, 0,
        old_f if old_f is not None else w, ref_f if ref_f is not None else w,
        out, mx, log_s, ent, g_lp,
        out.stride(0), 1, V, float(inv_temp), float(clip_low), float(clip_high),
        float(delta) if delta is not None else 0.0, float(beta),
        HAS_OLD=old_f is not None, HAS_REF=ref_f is not None, HAS_DELTA=delta is not None,
        KL_EST=kl_est, BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
    acc = torch.float64 if logits3.dtype == torch.float64 else torch.float32
    return out[:2].to(acc, copy=True), out[2:].to(acc, copy=True), mx.to(acc), log_s.to(acc), g_lp.to(acc)


__all__ = ["policy_loss_forward"]
