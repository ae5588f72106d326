"""Log-prob, entropy, KL and policy-loss ops for RL fine-tuning of language models: the public op surface.

Each op takes ``backend="auto" | "torch" | "cpp" | "triton"``; :func:`grkernels.kernels.select_backend`
decides ("auto" = Triton for CUDA tensors, the C++ kernels of ``grkernels._C`` for CPU tensors when they are
built, torch otherwise; ``grkernels.info()`` says which and why). Layers, each importing only those below it:

    grkernels.ops.losses        this file: validation, backend choice, the public functions
    grkernels.ops.fused_linear  the chunked LM head (autograd Functions over the registered ops)
    grkernels.ops.custom_ops    torch.ops.grkernels.*: schema, C++/Triton kernels, fake kernels, autograd
    grkernels.kernels           the Triton kernels and the C++ kernels' launchers
    grkernels.ops.spec          the specification in plain torch (backend "torch", and what the others are
                                tested against and differentiated through for double backprop)

Every input is validated here, once, before a backend is chosen (:func:`_validate_policy`,
:func:`_check_logits_ids`, :func:`_check_temperature`, :func:`_check_num_items`): all backends see the same
normalised inputs and refuse the same ones. Shapes must match exactly (a transposed mask is an error, not a
reshape). Nothing here reads a CUDA tensor's value on the host: value checks of tensors (token ids in range, a
tensor ``num_items``) are a host check on CPU and ``torch._assert_async`` on CUDA and under ``torch.compile``.

Only the vocab-sized part (log-sum-exp, chosen-token log-prob, entropy, and their gradient) differs between
backends. The per-token loss arithmetic (ratios, clipping, KL, aggregation) is O(tokens) and written once, in
the specification; the kernels evaluate the same formulas per token for token-level ratios.

Units: log-probs and entropies in nats, fp32 (fp64 for fp64 logits). Loss definitions follow TRL 1.16's
``GRPOTrainer._compute_loss``.
"""

from __future__ import annotations

import math
import numbers

import torch

from grkernels.kernels import select_backend
from grkernels.ops import custom_ops, spec
from grkernels.ops.fused_linear import FusedLinearPolicyLossFunction, fused_linear_logp_entropy
from grkernels.ops.spec import KL_ESTIMATORS, LOSS_AGGREGATIONS


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


def _check_num_items(num_items: float | torch.Tensor | None, mask_b: torch.Tensor, what: str) -> None:
    """The token-mean normaliser N must be finite and > 0 (a negative N flips the loss, 0 divides by zero).

    A Python number is checked here on the host. A tensor must hold one number; its value is checked like the
    token ids: a host check on CPU, ``torch._assert_async`` on CUDA and under ``torch.compile`` (no host
    sync). A tensor may also be 0 when no token is active (an all-padding batch whose count was computed on the
    device): the loss is then 0 with zero gradient on every backend (:func:`grkernels.ops.spec.token_mean_denominator`).
    """
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
            raise ValueError(
                f"{what}: num_items (the token-mean normaliser) must be a number or a one-element real tensor, got "
                f"a tensor of shape {tuple(num_items.shape)} and dtype {num_items.dtype}"
            )
        n = num_items.reshape(())
        ok = torch.isfinite(n) & ((n > 0) | ~mask_b.any())
        msg = f"{what}: num_items (the token-mean normaliser) must be finite and > 0"
        if ok.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(ok, msg)
        elif not bool(ok):
            raise ValueError(f"{msg}, got {n.item()!r}")
        return
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise ValueError(
            f"{what}: num_items (the token-mean normaliser) must be a number or a one-element tensor, got "
            f"{type(num_items).__name__}"
        )
    if not math.isfinite(float(num_items)) or not float(num_items) > 0.0:
        raise ValueError(f"{what}: num_items (the token-mean normaliser) must be finite and > 0, got {num_items!r}")


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
        logp, entropy = spec.logp_entropy(logits, index, temperature, with_entropy, entropy_grad, active)
        return logp, (torch.zeros_like(logp) if entropy is None else entropy)
    logp, entropy, _, _ = custom_ops.logp_entropy(
        logits, index, active, temperature, with_entropy, impl, inplace_backward
    )
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
            get exactly zero gradient, whatever their logits hold (-inf, NaN) on every backend. An active token
            whose row holds a NaN or +inf (or is -inf everywhere) gives non-finite outputs and a gradient row
            with NaN in it on every backend, whatever the upstream gradient (:mod:`grkernels.ops.spec`).
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
    return spec.kl_from_diff(ref_logp - logp, estimator)


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
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("policy_loss_from_logp: entropy_coef != 0 needs the entropy")
    _check_num_items(num_items, mask_b, "policy_loss_from_logp")
    return spec.loss_from_logp(
        logp, entropy, advantages, mask_b, old_logp, ref_logp, beta, clip_low, clip_high, kl_estimator, agg,
        importance_sampling, entropy_coef, num_items, max_completion_length, delta,
    )  # fmt: skip


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
    num_items: float | torch.Tensor | None,
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
    _check_num_items(num_items, mask_b, what)
    # one advantage per sequence ([..., ] or [..., 1]) or per token ([..., T]; the same thing when T = 1)
    adv = advantages.reshape(B, T) if tuple(advantages.shape) == lead else advantages.reshape(B)
    old = None if old_logp is None else old_logp.reshape(B, T)
    ref = None if ref_logp is None else ref_logp.reshape(B, T)
    return B, T, ids, adv, mask_b, old, ref, agg


def _token_level_inputs(mask_b, adv, agg, num_items, max_completion_length):
    """(per-token weights, 1 / token count, advantages per token) for the fused token-level kernels."""
    mask_f = mask_b.to(torch.float32)
    inv_ntok = 1.0 / mask_f.sum().clamp(min=1.0)
    weights = spec.token_weights(mask_f, agg, num_items, max_completion_length)
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
      count, e.g. for gradient accumulation; finite and > 0, else ValueError: a Python number on the host, a
      one-element tensor by a host check on CPU and ``torch._assert_async`` on CUDA; a tensor 0 is admitted
      when no token is active, and gives loss 0) or ``sum(m)``; ``"seq_mean_token_mean"`` (GRPO)
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

    Non-finite logits: an active token whose row holds a NaN or +inf (or is -inf everywhere) makes the loss
    non-finite and puts NaN into that row's gradient on every backend (the rule of :mod:`grkernels.ops.spec`),
    so a non-finite-gradient check sees it; masked rows stay exactly zero.

    Backends: "torch" is the specification, :mod:`grkernels.ops.spec` (materialises fp32 log-softmax).
    "cpp" / "triton" with ``importance_sampling="token"`` run one fused kernel per token that also evaluates the
    loss and its gradient coefficient (``torch.ops.grkernels.policy_loss_terms``), then one backward pass over
    the logits; with ``"sequence"`` they run the log-prob/entropy kernel and the specification's epilogue.
    Either way autograd keeps only the logits plus O(tokens) vectors. Double backprop (``create_graph=True``,
    e.g. ``GradReg(estimator="exact")``) is exact on every backend: the kernels' backward then differentiates
    the specification's formulas, including the loss head's curvature.
    """
    what = "policy_loss"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(f"{what}: logits must be [..., T, V], got {getattr(logits, 'shape', type(logits))}")
    _check_logits_ids(logits, completion_ids, what)
    V = logits.shape[-1]
    B, T, ids, adv, mask_b, old, ref, agg = _validate_policy(
        tuple(completion_ids.shape), V, logits.device, completion_ids, advantages, completion_mask, old_logp,
        ref_logp, beta, kl_estimator, loss_agg, temperature, importance_sampling, num_items, what,
    )  # fmt: skip
    impl = select_backend(backend, logits, what=what)
    if importance_sampling == "token" and impl != "torch":
        # the fused kernel: log-prob, entropy, ratio, clip, KL and the loss gradient in one pass per token
        weights, inv_ntok, adv_tok = _token_level_inputs(mask_b, adv, agg, num_items, max_completion_length)
        cfg = dict(
            temperature=temperature, clip_low=clip_low, clip_high=clip_high, delta=delta, beta=beta,
            kl_estimator=kl_estimator, inplace_backward=inplace_backward,
        )  # fmt: skip
        terms, stats, _, _, _ = custom_ops.policy_loss_terms(
            logits.reshape(B, T, V), ids, mask_b, weights, adv_tok, old, ref, cfg, impl
        )
        loss, st = spec.loss_and_stats(terms.sum(1), stats.sum(1), inv_ntok, entropy_coef)
        return loss, spec.metrics_from_stats(st)
    logp, entropy = _logp_entropy_impl(
        logits.reshape(B, T, V), ids, temperature, mask_b, inplace_backward, impl, True, entropy_coef != 0.0
    )
    return spec.loss_from_logp(
        logp, entropy, adv, mask_b, old, ref, beta, clip_low, clip_high, kl_estimator, agg, importance_sampling,
        entropy_coef, num_items, max_completion_length, delta,
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
        old_logp, ref_logp, beta, kl_estimator, loss_agg, temperature, importance_sampling, num_items, what,
    )  # fmt: skip
    impl = select_backend(backend, hidden, what=what)
    h2 = hidden.reshape(B * T, -1).contiguous()
    if impl != "torch" and importance_sampling == "token":
        # every token's loss gradient is known in the forward: d(hidden), dW, db are formed chunk by chunk
        # there (3 matmuls per chunk, no recompute) and only scaled by the upstream gradient in backward
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
        return loss, spec.metrics_from_stats(stats)
    logp, entropy = fused_linear_logp_entropy(
        h2, weight, bias, ids.reshape(-1), mask_b.reshape(-1), temperature, chunk_size, impl, fp32_grad_weight,
    )  # fmt: skip
    return spec.loss_from_logp(
        logp.reshape(B, T), entropy.reshape(B, T), adv, mask_b, old, ref, beta, clip_low, clip_high,
        kl_estimator, agg, importance_sampling, entropy_coef, num_items, max_completion_length, delta,
    )  # fmt: skip
