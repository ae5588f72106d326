"""The specification of the loss ops, in plain PyTorch: what every backend (torch, C++, Triton) computes.

This file is the reference the C++ kernels (``csrc/losses.cpp``) and the Triton kernels
(``grkernels/kernels/{logprob,policy_loss}.py``) are tested against, the ``backend="torch"`` implementation
of :mod:`grkernels.ops`, and what the registered ops (:mod:`grkernels.ops.custom_ops`) differentiate when a
graph of the gradient is asked for. Inputs here are already validated (:mod:`grkernels.ops.losses` does that,
once, for every backend). Units: log-probs and entropies in nats; outputs fp32, fp64 for fp64 logits.

Vocabulary part, per token with z = logits / T (T the temperature) and chosen id y:

    logp = z_y − logsumexp(z)        H = −Σ_j p_j log p_j,  p = softmax(z)   (entries at −inf: p = 0, 0 log 0 := 0)

Per-token loss (TRL 1.16's ``GRPOTrainer._compute_loss``): r = exp(logp − old) (token) or GSPO's
r_b = exp(Σ_t m (logp − old) / Σ_t m) (sequence); l = −min(r A, clamp(r, 1 − ε_low, 1 + ε_high) A) with r capped
at δ if given, plus β·KL(d = ref − logp) (k1 = −d, k2 = d²/2, k3 = eᵈ − d − 1). Aggregations: see
:data:`LOSS_AGGREGATIONS` and :func:`token_weights`.

Rules every backend follows (the tests in ``tests/test_ops_*.py`` hold each backend to them):

- Masked / inactive tokens read no logits: their outputs are 0 and their gradient rows exactly 0, whatever the
  row holds (−inf, NaN, padding ids).
- Non-finite rows. A row is *degenerate* when z holds a NaN or +inf, or is −inf everywhere (it has no finite
  log-sum-exp). For an active token with a degenerate row, logp and H are not finite and the gradient with
  respect to that row contains NaN, whatever the upstream gradient, even exactly 0: IEEE 0·NaN = NaN, which is
  what torch autograd computes, and what lets a non-finite-gradient check (``GradReg``'s skip) see the bad
  row on every device instead of stepping past it on some. The C++ and Triton kernels make logp, H and every
  entry of such a row's gradient NaN; torch autograd NaNs at least the entries whose probability is undefined.
  All other rows (finite, with any number of −inf entries short of all) give finite outputs and gradients.
- The token-mean normaliser N (``num_items``) is finite and > 0 (the public ops refuse anything else). A
  tensor N is checked without a host read on CUDA, so it admits one more value: 0 when no token is active,
  and then the loss is Σ over no tokens = 0 with zero gradient (0/0 is never formed), on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Canonical aggregation names (verl's vocabulary) and the TRL ``loss_type`` names that mean the same thing.
LOSS_AGGREGATIONS = {
    "token_mean": "token_mean",  # sum over all tokens / token count (TRL dapo, bnpo)
    "dapo": "token_mean",
    "bnpo": "token_mean",
    "seq_mean_token_mean": "seq_mean_token_mean",  # mean over sequences of per-sequence token means (TRL grpo)
    "grpo": "seq_mean_token_mean",
    "seq_mean_token_sum_norm": "seq_mean_token_sum_norm",  # sum / (batch * max_completion_length) (Dr.GRPO)
    "dr_grpo": "seq_mean_token_sum_norm",
    "seq_mean_token_sum": "seq_mean_token_sum",  # mean over sequences of per-sequence token sums (TRL luspo)
    "luspo": "seq_mean_token_sum",
}
KL_ESTIMATORS = ("k1", "k2", "k3")


def acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """dtype of the per-token outputs: fp64 for fp64 logits, else fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# the vocabulary part
# --------------------------------------------------------------------------------------------------------------
def logp_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, H) of every token: z = logits / temperature (in fp32, or fp64 for fp64 logits),
    logp = z[index] − logsumexp(z), H = −Σ_j p_j log p_j with p = softmax(z); H is None without ``with_entropy``.

    Vocab entries at −inf have p = 0 and contribute 0 to the entropy (0 log 0 := 0), also in the gradient.
    Inactive tokens (``active`` False) read no logits: their row is replaced by zeros before anything is
    computed and their id by 0, so −inf/NaN logits or padding ids there give outputs 0 and a gradient of
    exactly 0 (a ``where`` after the log-softmax would pass 0 · NaN = NaN back). ``entropy_grad`` False keeps H
    out of the autograd graph (two fewer vocab-sized tensors saved).
    """
    z = logits.to(acc_dtype(logits))
    if active is not None:
        act = active.bool()
        z = torch.where(act.unsqueeze(-1), z, 0.0)
        index = torch.where(act, index, torch.zeros_like(index))
    if temperature != 1.0:
        z = z / temperature
    logp_all = F.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, index.long().unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            p = logp_all.exp()
            # where() before the product, so that neither the value nor the gradient sees 0 * (-inf)
            safe = torch.where(p > 0, logp_all, 0.0)
            entropy = -(p * safe).sum(-1)
    if active is not None:
        logp = torch.where(act, logp, 0.0)
        entropy = None if entropy is None else torch.where(act, entropy, 0.0)
    return logp, entropy


def vjp(
    logits: torch.Tensor,
    outputs_fn: Callable[[torch.Tensor], Sequence[torch.Tensor | None]],
    grads: Sequence[torch.Tensor | None],
    create_graph: bool,
) -> torch.Tensor:
    """d(Σ outputs·grads)/d logits of ``outputs_fn(logits)`` (a function of this file), by autograd.

    ``create_graph``: differentiate with respect to ``logits`` itself and keep the graph (double backprop);
    else with respect to a detached copy (a plain backward, e.g. the chunked LM head's torch path).
    """
    with torch.enable_grad():
        x = logits if create_graph else logits.detach().requires_grad_()
        outs = outputs_fn(x)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        (gx,) = torch.autograd.grad(
            [o for o, _ in pairs], x, [g.to(o.dtype) for o, g in pairs], create_graph=create_graph,
            allow_unused=True,
        )  # fmt: skip
    return torch.zeros_like(logits) if gx is None else gx


# --------------------------------------------------------------------------------------------------------------
# the O(tokens) part
# --------------------------------------------------------------------------------------------------------------
def kl_from_diff(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's KL estimators as functions of ``d = ref_logp − logp``: k1 = −d, k2 = d²/2, k3 = eᵈ − d − 1."""
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def per_token_loss(
    logp: torch.Tensor,
    adv: torch.Tensor,
    mask_b: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    beta: float,
    clip_low: float,
    clip_high: float,
    kl_estimator: str,
    delta: float | None,
    importance_sampling: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The PPO-clip loss of every token (unweighted), its KL term, and the low/high clip indicators.

    ``logp`` ``[B, T]`` (or ``[n]`` for token-level ratios), ``adv`` broadcastable to it; ``old_logp=None`` is
    on-policy (old = logp.detach(): r = 1 with the policy gradient). Masked tokens' old/ref values never reach
    an exp().
    """
    zero = logp.new_zeros(())
    mask = mask_b.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    # masked (padding) tokens may carry arbitrary old/ref values: zero their differences *before* exp(),
    # so that a padded exp() cannot overflow and turn 0 * inf into NaN
    log_ratio = torch.where(mask_b, logp - old, zero)
    if importance_sampling == "token":
        log_w = log_ratio
    else:  # GSPO: one ratio per sequence, the exp of the mean token log-ratio
        log_w = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1.0 - clip_low, 1.0 + clip_high)
    if delta is not None:  # two-sided clipping (INTELLECT-2): cap the unclipped ratio too
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_kl = None
    if ref_logp is not None:
        d = torch.where(mask_b, ref_logp.to(logp.dtype) - logp, zero)
        per_token_kl = kl_from_diff(d, kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * per_token_kl
    with torch.no_grad():
        low = (coef_1 < 1.0 - clip_low) & (adv < 0)
        high = (coef_1 > 1.0 + clip_high) & (adv > 0)
    return per_token, per_token_kl, low, high


def token_mean_denominator(mask: torch.Tensor, num_items: float | torch.Tensor | None) -> float | torch.Tensor:
    """N of the token mean: ``num_items`` (a global token count, e.g. over gradient accumulation), or the active
    token count Σm when it is None (at least 1: an all-masked batch has loss 0, not 0/0). A tensor ``num_items``
    of 0 (admitted only when no token is active) is replaced by 1 for the same reason; a Python number is > 0."""
    if num_items is None:
        return mask.sum().clamp(min=1.0)
    if isinstance(num_items, torch.Tensor):
        n = num_items.reshape(())
        return torch.where(n > 0, n, torch.ones_like(n))
    return num_items


def token_weights(
    mask: torch.Tensor, agg: str, num_items: float | torch.Tensor | None, max_completion_length: int | None
) -> torch.Tensor:
    """Per-token weight w_t with ``loss = Σ_t w_t l_t`` for the aggregation ``agg`` (0 on masked tokens).

    ``mask`` float ``[B, T]``: token_mean m/N (:func:`token_mean_denominator`), seq_mean_token_mean
    m/(B·n_b) with n_b = max(Σ_t m, 1), seq_mean_token_sum_norm m/(B·L) (L = max_completion_length, default T),
    seq_mean_token_sum m/B.
    """
    B, T = mask.shape
    if agg == "token_mean":
        return mask / token_mean_denominator(mask, num_items)
    if agg == "seq_mean_token_mean":
        return mask / (B * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if agg == "seq_mean_token_sum_norm":
        return mask / (B * (T if max_completion_length is None else max_completion_length))
    return mask / B  # seq_mean_token_sum


def loss_from_logp(
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    adv: torch.Tensor,
    mask_b: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    beta: float,
    clip_low: float,
    clip_high: float,
    kl_estimator: str,
    agg: str,
    importance_sampling: str,
    entropy_coef: float,
    num_items: float | torch.Tensor | None,
    max_completion_length: int | None,
    delta: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss and its metrics from per-token log-probs ``[B, T]`` (validated; ``agg`` canonical).

    ``loss = aggregate(l, m) − entropy_coef · Σ H m / Σ m``; metrics (detached): ``kl`` (masked token mean, 0
    without ref), ``clip_fraction`` / ``clip_low_fraction`` / ``clip_high_fraction`` (share of tokens, or of
    sequences for GSPO, as TRL logs it), ``entropy`` (masked mean), ``policy_loss`` (before the entropy bonus).
    """
    B, T = logp.shape
    mask = mask_b.to(logp.dtype)
    adv = (adv.reshape(B, 1) if adv.numel() == B else adv).to(logp.dtype)
    zero = logp.new_zeros(())
    per_token, per_token_kl, low, high = per_token_loss(
        logp, adv, mask_b, old_logp, ref_logp, beta, clip_low, clip_high, kl_estimator, delta, importance_sampling
    )

    masked = per_token * mask  # broadcasts [B, 1] (sequence-level) to [B, T]
    if agg == "token_mean":
        loss = masked.sum() / token_mean_denominator(mask, num_items)
    elif agg == "seq_mean_token_mean":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif agg == "seq_mean_token_sum_norm":
        L = T if max_completion_length is None else max_completion_length
        loss = masked.sum() / (B * L)
    else:  # seq_mean_token_sum
        loss = masked.sum(-1).mean()
    policy_part = loss.detach()

    n_tok = mask.sum().clamp(min=1.0)
    mean_entropy = zero if entropy is None else (entropy * mask).sum() / n_tok
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * mean_entropy

    with torch.no_grad():
        if importance_sampling == "token":
            frac = lambda x: (x.to(mask.dtype) * mask).sum() / n_tok
        else:  # one ratio per sequence: the fraction of sequences, as TRL logs it
            frac = lambda x: x.to(mask.dtype).expand(B, -1)[:, :1].mean()
        metrics = {
            "kl": zero if per_token_kl is None else (per_token_kl * mask).sum() / n_tok,
            "clip_fraction": frac(low | high),
            "clip_low_fraction": frac(low),
            "clip_high_fraction": frac(high),
            "entropy": mean_entropy.detach(),
            "policy_loss": policy_part,
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------
# the token-level terms the fused kernels compute (``torch.ops.grkernels.policy_loss_terms``)
# --------------------------------------------------------------------------------------------------------------
def policy_terms(
    x: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    adv: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    temperature: float,
    clip_low: float,
    clip_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level policy loss as per-token rows, for logits ``x [..., V]`` and per-token vectors (``n`` tokens):
    ``(terms [2, n] = (w·l, H·m), stats [3, n] = (KL·m, low-clip·m, high-clip·m) detached, logp [n])``.

    Summed over tokens, ``terms`` and ``stats`` give the loss and metrics of :func:`loss_from_logp` for
    token-level importance sampling (:func:`loss_and_stats`).
    """
    mask = mask.reshape(-1).bool()
    lp, h = logp_entropy(x, ids, temperature, True, active=mask.reshape(ids.shape))
    lp, h = lp.reshape(-1), h.reshape(-1)
    acc = lp.dtype
    cast = lambda t: None if t is None else t.reshape(-1).to(acc)
    per_tok, kl, low, high = per_token_loss(
        lp, cast(adv), mask, cast(old), cast(ref), beta, clip_low, clip_high, kl_estimator, delta, "token"
    )
    m = mask.to(acc)
    terms = torch.stack([cast(weights) * per_tok, h * m])
    zero = torch.zeros_like(lp)
    stats = torch.stack([zero if kl is None else kl * m, low.to(acc) * m, high.to(acc) * m]).detach()
    return terms, stats, lp


def loss_and_stats(
    sums: torch.Tensor, stat_sums: torch.Tensor, inv_ntok: torch.Tensor, entropy_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-level loss from the summed ``terms`` rows: ``loss = Σ w·l − c·Σ H·m / N`` and the stats vector
    [policy loss, mean entropy, mean KL, low-clip, high-clip fraction] (detached; N = Σ m, ``inv_ntok`` = 1/N)."""
    stats = torch.cat([sums[:1], sums[1:2] * inv_ntok, stat_sums * inv_ntok]).detach()
    loss = sums[0] - entropy_coef * (sums[1] * inv_ntok) if entropy_coef != 0.0 else sums[0]
    return loss, stats


def metrics_from_stats(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stats vector of :func:`loss_and_stats` as the metrics dict of :func:`loss_from_logp`."""
    return {
        "kl": stats[2],
        "clip_fraction": stats[3] + stats[4],
        "clip_low_fraction": stats[3],
        "clip_high_fraction": stats[4],
        "entropy": stats[1],
        "policy_loss": stats[0],
    }
