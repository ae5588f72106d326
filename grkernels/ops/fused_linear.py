"""LM head + log-prob/entropy without materialising the logits: ``z = h W^T + b`` chunk by chunk over tokens.

Forward, per chunk of ``C`` tokens: ``z_c = h_c W^T (+ b)`` in the hidden dtype, then the fused
log-prob/entropy op ``torch.ops.grkernels.logp_entropy`` (C++ or Triton, :mod:`grkernels.ops.custom_ops`)
or the torch specification (:mod:`grkernels.ops.spec`), keeping only ``logp``, ``H`` and ``lse`` per token;
``z_c`` is dropped.
Backward, per chunk: recompute ``z_c`` (one extra ``[C, H] x [H, V]`` matmul, the price of never storing
logits), turn it into ``dz_c`` in place with the backward kernel, then ``dh_c = dz_c W``,
``dW += dz_c^T h_c`` (an fp32 accumulator, cast to the weight dtype once at the end; on CUDA with
torch >= 2.8 the bf16 product goes into it unrounded; ``fp32_grad_weight=False`` accumulates in the weight
dtype instead, to save memory), ``db += sum_c dz_c`` (fp32).
The loss itself is applied outside, on the per-token ``logp``/``H`` (O(tokens)), so every loss aggregation
and GSPO's sequence-level ratios work unchanged. Frozen weights (``requires_grad=False``) skip the ``dW``
matmul. Peak extra memory: one ``[C, V]`` chunk in the hidden dtype (Triton) or a few fp32 ones (torch),
plus the fp32 ``[V, H]`` dW accumulator when the weight is trained.

Token-level policy loss (``FusedLinearPolicyLossFunction``): every token's loss gradient is known in the
forward pass, so each chunk's logits are turned into d(logits) right away and multiplied into the parameter
gradients there (no recompute). Neither function is double-differentiable: a backward with
``create_graph=True`` raises a clear error.
"""

from __future__ import annotations

import torch

from grkernels.ops.custom_ops import logp_entropy, logp_entropy_backward_, policy_loss_terms
from grkernels.ops.spec import logp_entropy as spec_logp_entropy
from grkernels.ops.spec import loss_and_stats, vjp


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


def _no_double_backward(what: str) -> None:
    """The chunked head ops form their gradients with kernels that autograd cannot differentiate again."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what}: a graph of the gradient was requested (backward(create_graph=True), e.g. "
            "GradReg(estimator='exact')), but the chunked LM-head op is not double-differentiable. Use "
            "estimator='forward' or 'central', or compute the logits and call policy_loss / logp_and_entropy "
            "(their backward is double-differentiable)."
        )


class FusedLinearLogProbEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V]|None, ids [N], active [N]) -> (logp, entropy) fp32 [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, active, temperature, chunk_size, impl, fp32_grad_weight):
        n = hidden.shape[0]
        # inactive tokens may hold padding ids (e.g. -100): point them at 0, their outputs are zeroed anyway
        ids = torch.where(active, ids, torch.zeros_like(ids)).long().contiguous()
        parts = []
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], weight, bias)
            if impl == "torch":  # the specification; backward recomputes its gradient by autograd
                lp, h = spec_logp_entropy(z, ids[s:e], temperature, True, active=active[s:e])
                parts.append((lp, h, lp, lp))  # no log-sum-exp parts needed (placeholders, dropped below)
            else:
                parts.append(logp_entropy(z, ids[s:e], active[s:e], temperature, True, impl))
            del z
        logp, ent, mx, log_s = (torch.cat(p) for p in zip(*parts))
        if impl == "torch":
            mx = log_s = None
        ctx.save_for_backward(hidden, weight, bias, ids, active, mx, log_s, ent)
        ctx.temperature = float(temperature)
        ctx.chunk_size = chunk_size
        ctx.impl = impl
        ctx.fp32_grad_weight = fp32_grad_weight
        ctx.set_materialize_grads(False)  # an unused entropy output arrives as None: no dH term to compute
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        _no_double_backward("fused_linear_policy_loss")
        hidden, weight, bias, ids, active, mx, log_s, ent = ctx.saved_tensors
        n = hidden.shape[0]
        if g_lp is None and g_ent is None:
            return (None,) * 9
        zero = ent.new_zeros(())
        # masked tokens: zero upstream gradient, so the kernel skips reading their logits
        g_lp = torch.zeros_like(ent) if g_lp is None else torch.where(active, g_lp.to(ent.dtype), zero).contiguous()
        g_ent = None if g_ent is None else torch.where(active, g_ent.to(ent.dtype), zero).contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        # dW sums over all chunks: by default in an fp32 accumulator (a bf16 running sum is rounded once per
        # chunk), cast once at the end; fp32_grad_weight=False sums into the weight dtype (saves 6 bytes per
        # weight element of peak memory, e.g. 3.7 GB for a 152k x 4096 head, for per-chunk rounding)
        acc_dtype = torch.float32 if ctx.fp32_grad_weight else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            dz = _chunk_logits(h, weight, bias)
            g_e = None if g_ent is None else g_ent[s:e]
            if ctx.impl == "torch":
                fn = lambda x: spec_logp_entropy(x, ids[s:e], ctx.temperature, True, active=active[s:e])
                dz = vjp(dz, fn, [g_lp[s:e], g_e], create_graph=False).to(dz.dtype)
            else:  # the chunk's logits become their gradient in place (masked tokens: zero upstream, zero rows)
                logp_entropy_backward_(
                    dz, ids[s:e], active[s:e], mx[s:e], log_s[s:e], ent[s:e], g_lp[s:e], g_e, ctx.temperature,
                    ctx.impl,
                )  # fmt: skip
            accumulate_head_grads(dz, weight, h, grad_h if need_h else None, grad_w if need_w else None,
                                  grad_b if need_b else None, slice(s, e))
            del dz
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
    impl: str,
    fp32_grad_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) ``[N]`` of ``hidden [N, H] @ weight.T + bias`` at ``ids [N]`` (inputs validated)."""
    return FusedLinearLogProbEntropy.apply(
        hidden, weight, bias, ids, active.bool(), temperature, chunk_size, impl, fp32_grad_weight
    )


class FusedLinearPolicyLossFunction(torch.autograd.Function):
    """Token-level policy loss of ``hidden [N, H] @ weight.T (+ bias)``, gradients computed in the forward.

    For token-level importance sampling every token's loss gradient is known in the forward pass
    (``torch.ops.grkernels.policy_loss_terms`` returns it), so each chunk's logits, once evaluated, are turned
    into d(logits) in place right away and multiplied into ``d hidden``, ``d W``, ``d b``: three matmuls per
    chunk instead of four (no recompute in backward). Backward only scales the stored gradients by the upstream
    scalar (on the device). Returns ``(loss, stats [5])`` as :func:`grkernels.ops.spec.loss_and_stats`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask_b, weights, inv_ntok, adv_tok, old, ref, cfg, impl):

        N = hidden.shape[0]
        V = weight.shape[0]
        dev = hidden.device
        chunk = int(cfg["chunk_size"])
        coef = float(cfg["entropy_coef"])
        ids_f = torch.where(mask_b, ids, torch.zeros_like(ids)).reshape(-1).long().contiguous()
        mask_f = mask_b.reshape(-1).contiguous()
        w = weights.reshape(-1).contiguous()
        need_h, need_w, need_b = cfg["needs_grad"]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.float32 if cfg["fp32_grad_weight"] else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=dev) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
        any_grad = need_h or need_w or need_b
        sums = []
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h = hidden[s:e]
            z = _chunk_logits(h, weight, bias)
            sl = slice(s, e)
            terms, stats, mx, log_s, g_lp = policy_loss_terms(
                z, ids_f[sl], mask_f[sl], w[sl], adv_tok[sl], None if old is None else old[sl],
                None if ref is None else ref[sl], cfg, impl,
            )  # fmt: skip
            sums.append(torch.cat([terms.sum(1), stats.sum(1)]))
            if not any_grad:
                continue
            g_ent = None if coef == 0.0 else mask_f[sl].to(g_lp.dtype) * (inv_ntok * -coef)
            logp_entropy_backward_(
                z, ids_f[sl], None, mx, log_s, terms[1], g_lp, g_ent, float(cfg["temperature"]), impl
            )
            accumulate_head_grads(z, weight, h, grad_h, grad_w, grad_b, sl)
            del z
        total = torch.stack(sums).sum(0)
        loss, stats = loss_and_stats(total[:2], total[2:], inv_ntok, coef)
        # keep the gradients in the parameters' dtypes until backward (the fp32 accumulator is freed here)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        _no_double_backward("fused_linear_policy_loss")
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if g_loss is None:
            return (None,) * 12
        # the loss is linear in the stored gradients' scale: multiply by the upstream scalar on the device
        outs = [None if g is None else g * g_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*outs, *(None,) * 9)
