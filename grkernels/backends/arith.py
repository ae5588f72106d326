"""The shared arithmetic of a GR step (every backend's host-side scalars): norms, clip and perturbation scales,
reusable save buffers. All results are 0-d device tensors; nothing here reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # types only: base imports this module
    from grkernels.backends.base import Shards, StepPlan

NORM_EPS = 1e-6  # added to a norm before dividing by it, as torch.nn.utils.clip_grad_norm_ does


def reusable_buffers(
    like: Sequence[torch.Tensor], bufs: list[torch.Tensor], dtypes: Sequence[torch.dtype] | None = None
) -> list[torch.Tensor]:
    """``bufs`` holding one contiguous buffer shaped like each tensor of ``like`` (its device; its dtype, or the
    matching entry of ``dtypes``), reallocated in place only when a shape, dtype or device changed."""
    dts = [t.dtype for t in like] if dtypes is None else list(dtypes)
    if len(bufs) != len(like) or any(
        b.shape != t.shape or b.dtype != d or b.device != t.device for b, t, d in zip(bufs, like, dts)
    ):
        bufs[:] = [torch.empty(t.shape, dtype=d, device=t.device) for t, d in zip(like, dts)]
    return bufs


def accum_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any tensor is float64 (so exact-HVP tests stay meaningful), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype, shards: Shards | None = None) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor of ``dtype``; per-tensor norms first, in a fixed order. With sharded
    ``shards`` the tensors are local parts: the local sum of squares is summed across processes first."""
    if shards is not None and shards.sharded:
        local = global_norm(tensors, dtype).square()
        return shards.sum_across(local).sqrt()
    if not tensors:
        return torch.zeros((), dtype=dtype)
    norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def require_second_gradients(plan: StepPlan, restore, grad_attr: str = "grad") -> None:
    """Every GR parameter must have a gradient after the pass at θ'; if one has none, ``restore(plan)`` (θ back,
    g1 back) and raise: the GR gradient cannot be formed."""
    missing = sum(getattr(p, grad_attr) is None for p in plan.params)
    if missing:
        restore(plan)
        raise RuntimeError(
            f"GradReg: {missing} parameter(s) had a gradient at θ but none after the second "
            "backward (did the second pass skip part of the model?). Parameters were restored."
        )


def clip_scale(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """min(1, c / (‖g‖ + 1e-6)) as a device tensor; 1 when ``max_norm`` is None."""
    if max_norm is None:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)


def v_norm(plan: StepPlan, s1: torch.Tensor, n1: torch.Tensor) -> torch.Tensor | None:
    """‖v‖ = s1·‖g1‖ when ``eps_mode == "radius"`` (then ε_eff = ε/‖v‖); None for "absolute"."""
    return s1 * n1 if plan.eps_mode == "radius" else None


def perturb_scale(plan: StepPlan, s1: torch.Tensor, vnorm: torch.Tensor | None, sign: float) -> torch.Tensor:
    """The multiplier m of g1 in θ' = θ + m·g1: ±s1·ε (absolute) or ±s1·ε/‖v‖ (radius), a device tensor."""
    if vnorm is None:
        return s1 * (sign * plan.eps)
    return s1 * (sign * plan.eps) / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny)


def combine_scales(
    sa: torch.Tensor, sb: torch.Tensor, vnorm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip factors of the two gradients in γ_p/(k·ε_eff)·(sa·ga − sb·gb), with the coefficient kept as the
    host float γ_p/(k·ε): in radius mode 1/ε_eff = ‖v‖/ε, so ‖v‖ multiplies the (device) clip factors."""
    return (sa, sb) if vnorm is None else (sa * vnorm, sb * vnorm)


