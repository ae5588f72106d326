"""Python face of the C++ loss kernels (``csrc/losses.cpp``, ``torch.ops.grkernels_cpp.{logp_entropy_fwd,
logp_entropy_bwd, policy_loss_fwd}``): thin typed launchers with the same arguments as the Triton launchers of
``logprob.py`` / ``policy_loss.py``. The ops that users see (``torch.ops.grkernels.*``, with autograd, fake
kernels and the backend choice) are registered in :mod:`grkernels.ops.custom_ops`, which calls these.

Shapes and dtypes (checked again in C++): logits ``[outer, inner, V]`` with unit stride over V (any row strides),
per-token vectors contiguous 1-D of ``outer * inner`` entries: ids int64, masks bool, everything else in the
accumulation dtype (fp64 for fp64 logits, else fp32), which is also the dtype of every per-token output.
The C++ library registers its ops when ``grkernels._C`` is loaded (:func:`grkernels.kernels.cpp_loaded`).
"""

from __future__ import annotations

import torch


def logp_entropy_forward(
    logits3: torch.Tensor, ids: torch.Tensor, active: torch.Tensor | None, inv_temp: float, with_entropy: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logp, (max, log_sum_exp_minus_max), entropy)`` per token (see ``logprob.py`` for the formulas)."""
    lp, mx, log_s, h = torch.ops.grkernels_cpp.logp_entropy_fwd(logits3, ids, active, inv_temp, with_entropy)
    return lp, (mx, log_s), h


def logp_entropy_backward(
    logits3: torch.Tensor,
    grad3: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor | None,
    lse: tuple[torch.Tensor, torch.Tensor],
    ent: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
) -> None:
    """Writes d(logits) into ``grad3`` (which may be ``logits3`` itself)."""
    torch.ops.grkernels_cpp.logp_entropy_bwd(logits3, ids, active, lse[0], lse[1], ent, g_lp, g_ent, inv_temp, grad3)


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
    """Token-level PPO-clip loss per token: ``(terms [2, n], stats [3, n], max, log_s, g_lp)`` (see
    ``policy_loss.py`` for the formulas and :func:`grkernels.ops.spec.policy_terms` for the rows)."""
    return torch.ops.grkernels_cpp.policy_loss_fwd(
        logits3, ids, mask, weights, adv_tok, old, ref, inv_temp, clip_low, clip_high, delta, beta, kl_est
    )
