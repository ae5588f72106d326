"""Log-prob, entropy, KL and policy-loss ops for RL fine-tuning of language models.

Each public op takes ``backend="auto" | "torch" | "cpp" | "triton"``; :func:`grkernels.kernels.select_backend`
decides ("auto" = Triton for CUDA tensors, the C++ kernels of ``grkernels._C`` for CPU tensors when they are
built, torch otherwise; ``grkernels.info()`` says which and why). The torch code in this file is the
specification: readable, autograd-differentiated, and what the C++ kernels (``csrc/``) and the Triton kernels
(``grkernels/kernels/``) are tested against. Those run through the ops of ``torch.ops.grkernels``
(``grkernels/library.py``: one registration each, with fake kernels and autograd, so ``torch.compile`` traces
them; double backprop falls back to differentiating this file's torch code).

Every input is validated here, once, before a backend is chosen (:func:`_validate_policy`,
:func:`_check_logits_ids`, :func:`_check_temperature`): all backends see the same normalised inputs and refuse
the same ones. Shapes must match exactly (a transposed mask is an error, not a reshape).

Only the vocab-sized part (log-sum-exp, chosen-token log-prob, entropy, and their gradient) differs between
backends. The per-token loss arithmetic (ratios, clipping, KL, aggregation) is O(tokens) and written once,
:func:`_per_token_loss`; the kernels evaluate the same formulas per token for token-level ratios.

Units: log-probs and entropies in nats, fp32 (fp64 for fp64 logits). Loss definitions follow TRL 1.16's
``GRPOTrainer._compute_loss``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from grkernels.kernels import select_backend

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


# --------------------------------------------------------------------------------------------------------------
# input checks (host-side metadata only: shapes, dtypes, devices; never tensor values on CUDA)
# --------------------------------------------------------------------------------------------------------------
def _check_logits_ids(logits: torch.Tensor, index: torch.Tensor, what: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"{what}: logits must be a tensor [..., V], got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{what}: logits must be floating point (fp32/bf16/fp16), got dtype {logits.dtype}")
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{what}: token ids must be an integer tensor, got dtype {index.dtype}")
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{what}: token ids shape {tuple(index.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])} (logits [..., T, V], ids [..., T], already shifted by the caller)"
        )
    if index.device != logits.device:
        raise ValueError(f"{what}: token ids are on {index.device} but logits on {logits.device}")
    if logits.numel() == 0:
        raise ValueError(f"{what}: empty input (logits shape {tuple(logits.shape)})")


def _check_temperature(temperature: float, what: str) -> None:
    """A finite positive Python number (a kernel argument; a tensor would need a host read)."""
    ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool | torch.Tensor)
    if not ok or not math.isfinite(float(temperature)) or not float(temperature) > 0.0:
        raise ValueError(f"{what}: temperature must be a finite positive Python float, got {temperature!r}")


def _check_ids_in_range(index: torch.Tensor, vocab: int, active: torch.Tensor | None, what: str) -> None:
    """Token ids of active tokens must lie in [0, V).

    On CPU a host check raises ValueError. On CUDA (and inside ``torch.compile``) the check is
    ``torch._assert_async``: a device-side assertion enqueued on the stream, so the launch path never waits
    for the GPU.
    """
    bad = (index < 0) | (index >= vocab)
    if active is not None:
        bad = bad & active
    # under torch.compile a host read would break the graph: the assertion then runs inside it
    if index.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{what}: token id outside [0, {vocab}) (vocab size)")
    elif bool(bad.any()):
        first = index[bad].flatten()[0].item()
        raise ValueError(f"{what}: token id {first} outside [0, {vocab}) (vocab size = logits.shape[-1])")


# --------------------------------------------------------------------------------------------------------------
# torch reference of the vocab-sized part
# --------------------------------------------------------------------------------------------------------------
def _torch_logp_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: z = logits / temperature (computed in fp32, or fp64 for fp64 input),
    logp = z[index] - logsumexp(z), entropy = -sum_j p_j log p_j with p = softmax(z).

    Vocab entries at -inf have p = 0 and contribute 0 to the entropy (0 log 0 := 0), also in the gradient.
    Inactive tokens (``active`` False) read no logits: their row is replaced by zeros before anything is
    computed and their id by 0, so -inf/NaN logits or padding ids there give outputs 0 and a gradient of
    exactly 0 (a ``where`` after the log-softmax would pass 0 · NaN = NaN back).
    """
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
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
        # without a gradient through H (e.g. entropy only logged), autograd need not keep two more [.., V] tensors
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            p = logp_all.exp()
            # where() before the product, so that neither the value nor the gradient sees 0 * (-inf)
            safe = torch.where(p > 0, logp_all, 0.0)
            entropy = -(p * safe).sum(-1)
    if active is not None:
        logp = torch.where(act, logp, 0.0)
        entropy = None if entropy is None else torch.where(act, entropy, 0.0)
    return logp, entropy


def _check_active(active: torch.Tensor | None, index: torch.Tensor, logits: torch.Tensor, what: str):
    if active is None:
        return None
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"{what}: mask must be a tensor, got {type(active).__name__}")
    if tuple(active.shape) != tuple(index.shape):
        raise ValueError(f"{what}: mask shape {tuple(active.shape)} must equal ids shape {tuple(index.shape)}")
    if active.device != logits.device:
        raise ValueError(f"{what}: mask is on {active.device} but logits on {logits.device}")
    return active.bool() if active.dtype != torch.bool else active


def _logp_entropy_impl(logits, index, temperature, active, inplace_backward, impl, with_entropy, entropy_grad):
    """(logp, entropy) on validated inputs with the implementation ``impl`` (see :func:`logp_and_entropy`)."""
    if impl == "torch":
        logp, entropy = _torch_logp_entropy(logits, index, temperature, with_entropy, entropy_grad, active)
        return logp, (torch.zeros_like(logp) if entropy is None else entropy)
    from grkernels.library import logp_entropy

    logp, entropy, _, _ = logp_entropy(logits, index, active, temperature, with_entropy, impl, inplace_backward)
    return logp, (entropy if entropy_grad and with_entropy else entropy.detach())


def logp_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    active: torch.Tensor | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen-token log-prob and entropy of every token, from one pass over the vocabulary.

    Args:
        logits: ``[..., V]`` (fp32/bf16/fp16/fp64).
        index: ``[...]`` token ids in [0, V) (only checked where ``active``).
        temperature: logits are divided by it (a finite positive Python float; a kernel argument, never
            recompiles).
        active: optional bool ``[...]`` (exactly the ids' shape); inactive tokens read no logits, return 0 and
            get exactly zero gradient, whatever their logits hold (-inf, NaN) on every backend.
        inplace_backward: C++/Triton: write d(logits) into the logits buffer (saves one vocab-sized tensor;
            the logits must not be needed by anything else afterwards). Ignored by the torch backend.
        with_entropy: False skips the entropy (returned as zeros).
        entropy_grad: False returns the entropy without a gradient path (cheaper on the torch backend).
    Returns:
        ``(logp, entropy)``, fp32 ``[...]`` each (fp64 for fp64 logits), in nats, differentiable w.r.t. ``logits``
        (twice too: ``create_graph=True`` works on every backend).
    """
    what = "logp_and_entropy"
    _check_logits_ids(logits, index, what)
    _check_temperature(temperature, what)
    active = _check_active(active, index, logits, what)
    _check_ids_in_range(index, logits.shape[-1], active, what)
    impl = select_backend(backend, logits, what=what)
    return _logp_entropy_impl(logits, index, temperature, active, inplace_backward, impl, with_entropy, entropy_grad)


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """fp32 log-probability of the chosen tokens: ``log_softmax(logits / temperature)[..., index]``.

    ``logits`` ``[..., V]``, ``index`` ``[...]`` (ids in [0, V)); returns ``[...]`` fp32 nats, differentiable.
    The Triton backend saves only a per-token log-sum-exp and recomputes the softmax in backward.
    """
    logp, _ = logp_and_entropy(logits, index, temperature, backend=backend, with_entropy=False)
    return logp


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """fp32 per-token entropy ``H = -sum_j p_j log p_j``, ``p = softmax(logits / temperature)``, in nats.

    ``logits`` ``[..., V]`` -> ``[...]``, differentiable. Entries at -inf count as ``p = 0``.
    """
    index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = logp_and_entropy(logits, index, temperature, backend=backend)
    return entropy


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Elementwise estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's estimators).

    With ``d = ref_logp - logp``: ``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1`` (>= 0, unbiased).
    Elementwise and O(tokens): one torch expression on every device (a kernel would not be faster than one
    fused elementwise pass), so this op has no ``backend`` argument.
    """
    what = "kl_penalty"
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{what}: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"{what}: logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}")
    if logp.device != ref_logp.device:
        raise ValueError(f"{what}: logp on {logp.device} but ref_logp on {ref_logp.device}")
    return _kl_from_diff(ref_logp - logp, estimator)


def _kl_from_diff(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL estimators as functions of ``d = ref_logp - logp``."""
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------------------------
# the O(tokens) policy-loss epilogue, shared by every backend
# --------------------------------------------------------------------------------------------------------------
def _check_policy_args(kl_estimator, loss_agg, importance_sampling, beta, ref_logp, what="policy_loss") -> str:
    """Validate the loss options; returns the canonical aggregation name."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{what}: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"{what}: loss_agg must be one of {sorted(LOSS_AGGREGATIONS)}, got {loss_agg!r}")
    if importance_sampling not in ("token", "sequence"):
        raise ValueError(f"{what}: importance_sampling must be 'token' or 'sequence', got {importance_sampling!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"{what}: beta={beta} needs ref_logp (the reference policy's per-token log-probs)")
    return LOSS_AGGREGATIONS[loss_agg]


def _token_weights(mask: torch.Tensor, agg: str, num_items, max_completion_length) -> torch.Tensor:
    """Per-token weight w_t with ``loss = sum_t w_t l_t`` for each aggregation (0 on masked tokens)."""
    B, T = mask.shape
    if agg == "token_mean":
        return mask / (mask.sum().clamp(min=1.0) if num_items is None else num_items)
    if agg == "seq_mean_token_mean":
        return mask / (B * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if agg == "seq_mean_token_sum_norm":
        return mask / (B * (T if max_completion_length is None else max_completion_length))
    return mask / B  # seq_mean_token_sum


def _metrics_from_stats(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fused kernels' stats vector [policy loss, entropy, KL, low clip, high clip] as the metrics dict."""
    return {
        "kl": stats[2],
        "clip_fraction": stats[3] + stats[4],
        "clip_low_fraction": stats[3],
        "clip_high_fraction": stats[4],
        "entropy": stats[1],
        "policy_loss": stats[0],
    }


def _per_token_loss(
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

    ``logp`` ``[B, T]`` (or ``[n]`` for token-level ratios), ``adv`` broadcastable to it. See
    :func:`policy_loss` for the formulas; masked tokens' old/ref values never reach an exp().
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
        per_token_kl = _kl_from_diff(d, kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * per_token_kl
    with torch.no_grad():
        low = (coef_1 < 1.0 - clip_low) & (adv < 0)
        high = (coef_1 > 1.0 + clip_high) & (adv > 0)
    return per_token, per_token_kl, low, high


def policy_loss_from_logp(
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    importance_sampling: str = "token",
    entropy_coef: float = 0.0,
    num_items: float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss from per-token log-probs ``[B, T]`` (see :func:`policy_loss` for the formulas)."""
    agg = _check_policy_args(kl_estimator, loss_agg, importance_sampling, beta, ref_logp)
    if logp.dim() != 2:
        raise ValueError(f"policy_loss_from_logp: logp must be [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    for name, t in (("completion_mask", completion_mask), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"policy_loss_from_logp: {name} has shape {tuple(t.shape)}, expected {(B, T)}")
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(
            f"policy_loss_from_logp: advantages has shape {tuple(advantages.shape)}, expected {(B,)} or {(B, T)}"
        )
    mask_b = completion_mask.bool() if completion_mask.dtype != torch.bool else completion_mask
    mask = mask_b.to(logp.dtype)
    adv = (advantages.reshape(B, 1) if advantages.numel() == B else advantages).to(logp.dtype)
    zero = logp.new_zeros(())
    per_token, per_token_kl, low, high = _per_token_loss(
        logp, adv, mask_b, old_logp, ref_logp, beta, clip_low, clip_high, kl_estimator, delta, importance_sampling
    )

    masked = per_token * mask  # broadcasts [B, 1] (sequence-level) to [B, T]
    if agg == "token_mean":
        denom = mask.sum().clamp(min=1.0) if num_items is None else num_items
        loss = masked.sum() / denom
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
        if entropy is None:
            raise ValueError("policy_loss: entropy_coef != 0 needs the entropy")
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


def _validate_policy(
    lead: tuple[int, ...],
    vocab: int,
    device: torch.device,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    beta: float,
    kl_estimator: str,
    loss_agg: str,
    temperature: float,
    importance_sampling: str,
    what: str,
):
    """The one validation of the policy-loss inputs, before any backend is chosen.

    ``lead`` is the ids' shape ``[..., T]``. Returns ``(B, T, ids [B, T], adv [B] or [B, T], mask [B, T] bool,
    old, ref [B, T] or None, canonical aggregation)``. Shapes must match exactly (no reshape by element count).
    """
    agg = _check_policy_args(kl_estimator, loss_agg, importance_sampling, beta, ref_logp, what)
    _check_temperature(temperature, what)
    if len(lead) < 1:
        raise ValueError(f"{what}: completion_ids must be [..., T], got shape {lead}")
    if not isinstance(advantages, torch.Tensor) or not isinstance(completion_mask, torch.Tensor):
        raise TypeError(f"{what}: advantages and completion_mask must be tensors")
    T = lead[-1]
    B = math.prod(lead[:-1])
    if tuple(completion_mask.shape) != lead:
        raise ValueError(
            f"{what}: completion_mask has shape {tuple(completion_mask.shape)}, expected {lead} (= completion_ids)"
        )
    if tuple(advantages.shape) not in (lead[:-1], (*lead[:-1], 1), lead):
        raise ValueError(
            f"{what}: advantages has shape {tuple(advantages.shape)}; expected one per sequence {lead[:-1]} "
            f"or one per token {lead}"
        )
    if not advantages.is_floating_point():
        raise TypeError(f"{what}: advantages must be floating point, got {advantages.dtype}")
    for name, t in (("advantages", advantages), ("completion_mask", completion_mask)):
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device} but logits on {device}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor")
        if tuple(t.shape) != lead:
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, expected {lead} (= completion_ids)")
        if not t.is_floating_point():
            raise TypeError(f"{what}: {name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device} but logits on {device}")
    mask_b = completion_mask.reshape(B, T)
    mask_b = mask_b.bool() if mask_b.dtype != torch.bool else mask_b
    ids = completion_ids.reshape(B, T)
    _check_ids_in_range(ids, vocab, mask_b, what)
    # one advantage per sequence ([..., ] or [..., 1]) or per token ([..., T]; the same thing when T = 1)
    adv = advantages.reshape(B, T) if tuple(advantages.shape) == lead else advantages.reshape(B)
    old = None if old_logp is None else old_logp.reshape(B, T)
    ref = None if ref_logp is None else ref_logp.reshape(B, T)
    return B, T, ids, adv, mask_b, old, ref, agg


def _token_level_inputs(mask_b, adv, agg, num_items, max_completion_length):
    """(per-token weights, 1 / token count, advantages per token) for the fused token-level kernels."""
    mask_f = mask_b.to(torch.float32)
    inv_ntok = 1.0 / mask_f.sum().clamp(min=1.0)
    weights = _token_weights(mask_f, agg, num_items, max_completion_length)
    B, T = mask_b.shape
    adv_tok = (adv.reshape(B, 1) if adv.dim() == 1 else adv).expand(B, T)
    return weights, inv_ntok, adv_tok


def policy_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    temperature: float = 1.0,
    importance_sampling: str = "token",
    entropy_coef: float = 0.0,
    inplace_backward: bool = False,
    *,
    num_items: float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    delta: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family PPO-clip policy loss straight from the logits, as TRL 1.16 defines it.

    Shapes: ``logits [..., T, V]`` (any float dtype), ``completion_ids [..., T]`` (shifted by the caller),
    ``advantages [...]`` (per sequence) or ``[..., T]``, ``completion_mask [..., T]``, ``old_logp`` /
    ``ref_logp [..., T]`` fp32. Leading dims are flattened to B sequences.

    Per token, with ``lp = log_softmax(logits / temperature)[id]`` (nats) and mask ``m``:

    - ``r = exp(lp - old_logp)`` (``importance_sampling="token"``), or GSPO's sequence ratio
      ``r_b = exp(sum_t m (lp - old) / sum_t m)`` (``"sequence"``); ``old_logp=None`` = on-policy
      (``old = lp.detach()``, so r = 1 with the policy gradient).
    - ``l = -min(r A, clamp(r, 1 - clip_low, 1 + clip_high) A)`` (``r`` capped at ``delta`` if given),
      plus ``beta * KL`` with ``KL = kl_penalty(lp, ref_logp, kl_estimator)``.
    - ``loss_agg``: ``"token_mean"`` (DAPO/BNPO) ``sum(l m) / N`` with ``N = num_items`` (a global token
      count, e.g. for gradient accumulation) or ``sum(m)``; ``"seq_mean_token_mean"`` (GRPO)
      ``mean_b(sum_t l m / sum_t m)``; ``"seq_mean_token_sum_norm"`` (Dr.GRPO) ``sum(l m) / (B *
      max_completion_length)`` (default T); ``"seq_mean_token_sum"`` ``mean_b(sum_t l m)``. TRL's
      ``loss_type`` names (dapo, bnpo, grpo, dr_grpo, luspo) are accepted as aliases.
    - ``entropy_coef``: ``loss -= entropy_coef * sum(H m) / sum(m)`` (entropy from the same fused pass).

    Returns ``(loss, metrics)``; ``metrics`` are detached 0-d tensors on the logits' device (no host sync):
    ``kl`` (masked token mean; 0 without ref_logp), ``clip_fraction`` (+ ``clip_low_fraction``,
    ``clip_high_fraction``: the region-clipped share, as TRL logs it), ``entropy`` (masked mean, nats),
    ``policy_loss`` (the loss before the entropy bonus). Masked tokens get exactly zero gradient.
    ``inplace_backward=True`` (C++/Triton) writes d(logits) into the logits buffer.
    Shapes are checked exactly: ``completion_mask``, ``old_logp``, ``ref_logp`` must have the ids' shape,
    ``advantages`` the ids' shape, or it without T (or with T = 1).

    Backends: "torch" is this file's reference (materialises fp32 log-softmax). "cpp" / "triton" with
    ``importance_sampling="token"`` run one fused kernel per token that also evaluates the loss and its
    gradient coefficient (``torch.ops.grkernels.policy_loss_terms``), then one backward pass over the logits;
    with ``"sequence"`` they run the log-prob/entropy kernel and this file's epilogue. Either way autograd
    keeps only the logits plus O(tokens) vectors. Double backprop (``create_graph=True``, e.g.
    ``GradReg(estimator="exact")``) is exact on every backend: the kernels' backward then differentiates this
    file's torch formulas, including the loss head's curvature.
    """
    what = "policy_loss"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(f"{what}: logits must be [..., T, V], got {getattr(logits, 'shape', type(logits))}")
    _check_logits_ids(logits, completion_ids, what)
    V = logits.shape[-1]
    B, T, ids, adv, mask_b, old, ref, agg = _validate_policy(
        tuple(completion_ids.shape), V, logits.device, completion_ids, advantages, completion_mask, old_logp,
        ref_logp, beta, kl_estimator, loss_agg, temperature, importance_sampling, what,
    )  # fmt: skip
    impl = select_backend(backend, logits, what=what)
    if importance_sampling == "token" and impl != "torch":
        # the fused kernel: log-prob, entropy, ratio, clip, KL and the loss gradient in one pass per token
        from grkernels.library import loss_and_stats, policy_loss_terms

        weights, inv_ntok, adv_tok = _token_level_inputs(mask_b, adv, agg, num_items, max_completion_length)
        cfg = dict(
            temperature=temperature, clip_low=clip_low, clip_high=clip_high, delta=delta, beta=beta,
            kl_estimator=kl_estimator, inplace_backward=inplace_backward,
        )  # fmt: skip
        terms, stats, _, _, _ = policy_loss_terms(
            logits.reshape(B, T, V), ids, mask_b, weights, adv_tok, old, ref, cfg, impl
        )
        loss, st = loss_and_stats(terms.sum(1), stats.sum(1), inv_ntok, entropy_coef)
        return loss, _metrics_from_stats(st)
    logp, entropy = _logp_entropy_impl(
        logits.reshape(B, T, V), ids, temperature, mask_b, inplace_backward, impl, True, entropy_coef != 0.0
    )
    return policy_loss_from_logp(
        logp, entropy, adv, mask_b, old, ref, beta, clip_low, clip_high, kl_estimator, loss_agg,
        importance_sampling, entropy_coef, num_items, max_completion_length, delta,
    )  # fmt: skip


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    temperature: float = 1.0,
    importance_sampling: str = "token",
    entropy_coef: float = 0.0,
    chunk_size: int = 4096,
    *,
    num_items: float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    delta: float | None = None,
    fp32_grad_weight: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_loss` of ``logits = hidden @ weight.T + bias`` without ever holding all the logits.

    ``hidden [..., T, H]``, ``weight [V, H]`` (the LM head), ``bias [V]`` or None. Tokens are processed in
    chunks of ``chunk_size`` rows. Triton, token-level ratios: each chunk's logits are evaluated once, the fused
    loss kernel gives every token's loss gradient right away, the chunk is turned into d(logits) in place and
    ``d hidden = dz W``, ``d W += dz^T h``, ``d b += sum dz`` are formed in the forward (backward only scales
    them by the upstream scalar). GSPO (sequence-level ratios, which need all of a sequence's log-probs
    first) and the torch backend: forward keeps only log-probs/entropies/log-sum-exp per token, backward
    recomputes each chunk's logits (one extra matmul) and then does the same. Peak extra
    memory is one ``[chunk_size, V]`` logits chunk (+ its fp32 gradient on the torch backend) plus, for a
    trained weight, the ``[V, H]`` dW accumulator: fp32 by default; ``fp32_grad_weight=False`` sums in the
    weight's dtype instead (less memory, one rounding of the running sum per chunk). A weight with
    ``requires_grad=False`` (frozen head, e.g. LoRA) skips its gradient matmul. Masked tokens read no logits
    in the kernels and get zero gradient (their matmul rows are still computed: compacting them away would
    need a host sync). Other arguments and the result: as in :func:`policy_loss`. Not double-differentiable: a
    backward with ``create_graph=True`` (``GradReg(estimator="exact")``) raises a clear error.
    """
    what = "fused_linear_policy_loss"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"{what}: hidden must be [..., T, H], got {getattr(hidden, 'shape', type(hidden))}")
    if not hidden.is_floating_point():
        raise TypeError(f"{what}: hidden must be floating point, got dtype {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{what}: weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{what}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{what}: {name} is on {t.device} but hidden on {hidden.device}")
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{what}: {name} dtype {t.dtype} differs from hidden dtype {hidden.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{what}: chunk_size must be a positive int, got {chunk_size!r}")
    if completion_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{what}: token ids must be an integer tensor, got dtype {completion_ids.dtype}")
    if tuple(completion_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{what}: completion_ids shape {tuple(completion_ids.shape)} must equal hidden shape without H "
            f"{tuple(hidden.shape[:-1])}"
        )
    if completion_ids.device != hidden.device:
        raise ValueError(f"{what}: token ids are on {completion_ids.device} but hidden on {hidden.device}")
    if hidden.numel() == 0:
        raise ValueError(f"{what}: empty input (hidden shape {tuple(hidden.shape)})")
    B, T, ids, adv, mask_b, old, ref, agg = _validate_policy(
        tuple(completion_ids.shape), weight.shape[0], hidden.device, completion_ids, advantages, completion_mask,
        old_logp, ref_logp, beta, kl_estimator, loss_agg, temperature, importance_sampling, what,
    )  # fmt: skip
    impl = select_backend(backend, hidden, what=what)
    h2 = hidden.reshape(B * T, -1).contiguous()
    if impl != "torch" and importance_sampling == "token":
        # every token's loss gradient is known in the forward: d(hidden), dW, db are formed chunk by chunk
        # there (3 matmuls per chunk, no recompute) and only scaled by the upstream gradient in backward
        from grkernels.kernels.fused_linear import FusedLinearPolicyLossFunction

        weights, inv_ntok, adv_tok = _token_level_inputs(mask_b, adv, agg, num_items, max_completion_length)
        grad_on = torch.is_grad_enabled()
        cfg = dict(
            temperature=temperature, clip_low=clip_low, clip_high=clip_high, delta=delta, beta=beta,
            kl_estimator=kl_estimator, entropy_coef=entropy_coef, chunk_size=chunk_size,
            fp32_grad_weight=fp32_grad_weight, inplace_backward=False,
            needs_grad=(
                grad_on and hidden.requires_grad,
                grad_on and weight.requires_grad,
                grad_on and bias is not None and bias.requires_grad,
            ),
        )  # fmt: skip
        flat = lambda t: None if t is None else t.reshape(-1)
        loss, stats = FusedLinearPolicyLossFunction.apply(
            h2, weight, bias, ids, mask_b, weights, inv_ntok, adv_tok.reshape(-1), flat(old), flat(ref), cfg, impl
        )
        return loss, _metrics_from_stats(stats)
    from grkernels.kernels.fused_linear import fused_linear_logp_entropy

    logp, entropy = fused_linear_logp_entropy(
        h2, weight, bias, ids.reshape(-1), mask_b.reshape(-1), temperature, chunk_size, impl, fp32_grad_weight,
    )  # fmt: skip
    return policy_loss_from_logp(
        logp.reshape(B, T), entropy.reshape(B, T), adv, mask_b, old, ref, beta, clip_low, clip_high,
        kl_estimator, loss_agg, importance_sampling, entropy_coef, num_items, max_completion_length, delta,
    )  # fmt: skip
