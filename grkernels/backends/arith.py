"""The shared arithmetic of a GR step (every backend's host-side scalars): norms, clip and perturbation scales,
reusable save buffers. All results are 0-d device tensors; nothing here reads a value back to the host.
"""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------------------------ safe norms
# A norm is taken from float64 "parts" of the sum of squares, [Σ(x·2⁻ˢ)², Σx², Σ(x·2ˢ)²] with S = 600: for
# 32-bit and narrower values Σx² in float64 can neither overflow ((3.4·10³⁸)²·2⁶³ ≈ 10⁹⁶) nor lose a square to
# underflow ((1.4·10⁻⁴⁵)² ≫ 2⁻¹⁰²²), so the middle part is the norm; float64 values can do both, and then the
# part scaled by 2⁻ˢ (squares up to 2⁸⁴⁸) or by 2ˢ holds it exactly (scaling by a power of two is exact). Parts
# add across tensors and processes (one all-reduce of 3 numbers), and the finite flag is read off them: the
# scaled-down part is finite exactly when every element is. As BLAS nrm2, without a host read.
_S = 600
_DOWN, _UP = 2.0**-_S, 2.0**_S
_F64_TINY = torch.finfo(torch.float64).tiny


def sumsq_parts(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The float64 parts [Σ(x·2⁻⁶⁰⁰)², Σx², Σ(x·2⁶⁰⁰)²] over all elements of ``tensors`` (one pass for 32-bit and
    narrower tensors; three, one tensor-sized temporary at a time, for float64 ones)."""
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    narrow = [t for t in tensors if t.dtype != torch.float64 and t.numel()]
    mid = torch.zeros((), dtype=torch.float64, device=device)
    if narrow:
        mid = torch.stack(torch._foreach_norm(narrow, 2, dtype=torch.float64)).square().sum()
    parts = parts_of_sumsq(mid)
    for t in tensors:
        if t.dtype == torch.float64 and t.numel():
            parts = parts + torch.stack(
                [torch.linalg.vector_norm(t * s).square() for s in (_DOWN, 1.0, _UP)]
            )
    return parts


def parts_of_sumsq(sumsq: torch.Tensor) -> torch.Tensor:
    """The parts of a float64 Σx² of 32-bit or narrower values (exact there: see above)."""
    sumsq = sumsq.to(torch.float64)
    return torch.stack([sumsq * _DOWN * _DOWN, sumsq, sumsq * _UP * _UP])


def norm_from_parts(parts: torch.Tensor, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖x‖₂ as a 0-d ``dtype`` tensor, all elements finite) from the summed parts of ``count`` elements: the
    plain sum where it kept its precision, else the scaled part that did (inf only when ‖x‖ exceeds ``dtype``)."""
    hi, mid, lo = parts.unbind()
    plain_ok = torch.isfinite(mid) & (mid >= max(count, 1) * _F64_TINY * 2.0**53)
    overflow = ~torch.isfinite(mid) & torch.isfinite(hi)
    norm = torch.where(plain_ok, mid.sqrt(), torch.where(overflow, hi.sqrt() * _UP, lo.sqrt() * _DOWN))
    return norm.to(dtype), torch.isfinite(hi)


def prefer_plain(plain: torch.Tensor, safe: torch.Tensor, count: int) -> torch.Tensor:
    """``plain`` (a norm computed in its own dtype, the historical bits) wherever it is trustworthy — finite and
    far enough above the underflow range that no lost square matters (relative 2⁻²⁴ for up to 2²⁰·count
    elements summed across processes) — else ``safe``. Ordinary inputs keep their bits; extremes get the safe
    value. Decided on the device."""
    tiny = torch.finfo(plain.dtype).tiny
    threshold = math.sqrt(max(count, 1) * tiny) * 2.0**22
    return torch.where(torch.isfinite(plain) & (plain >= threshold), plain, safe.to(plain.dtype))


def _plain_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype, shards: Shards | None) -> torch.Tensor:
    if shards is not None and shards.sharded:
        local = _plain_norm(tensors, dtype, None).square()
        return shards.sum_across(local).sqrt()
    if not tensors:
        return torch.zeros((), dtype=dtype)
    norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def norm_and_finite(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype, shards: Shards | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖concat(tensors)‖₂ as a 0-d ``dtype`` tensor, every element finite as a 0-d bool tensor), both over all
    processes when ``shards`` is sharded (``tensors`` are then the local parts).

    The torch backend's one norm: per-tensor norms in ``dtype`` in a fixed order (the historical result, kept
    bit for bit on ordinary inputs), replaced on the device by the float64-parts norm when that one overflowed
    (elements ≳ 10¹⁹ in float32) or underflowed (≲ 10⁻¹⁹). The flag is a property of the elements, never of a
    norm: 3e19 is finite, and so is a gradient whose norm exceeds the dtype's range."""
    plain = _plain_norm(tensors, dtype, shards)
    parts = sumsq_parts(tensors, plain.device)
    if shards is not None and shards.sharded:
        parts = shards.sum_across(parts)
    count = sum(t.numel() for t in tensors)
    safe, finite = norm_from_parts(parts, count, dtype)
    return prefer_plain(plain, safe, count), finite


def global_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype, shards: Shards | None = None) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor of ``dtype``, overflow- and underflow-safe (``norm_and_finite``). With
    sharded ``shards`` the tensors are local parts: the sums of squares are summed across processes first."""
    return norm_and_finite(tensors, dtype, shards)[0]


class SumOfSquares:
    """‖·‖₂ of values produced one tensor at a time (a realised perturbation, a correction): the running sum in
    ``dtype`` (the historical bits) and the float64 parts beside it, as ``norm_and_finite``."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.plain = torch.zeros((), dtype=dtype, device=device)
        self.parts = torch.zeros(3, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add Σx² (``x`` in ``dtype``)."""
        self.plain += x.square().sum()
        self.parts += sumsq_parts([x], self.parts.device)
        self.count += x.numel()

    def norm(self, shards: Shards | None = None) -> torch.Tensor:
        """The norm, over all processes when ``shards`` is sharded."""
        plain, parts = self.plain, self.parts
        if shards is not None and shards.sharded:
            plain, parts = shards.sum_across(plain.clone()), shards.sum_across(parts.clone())
        return prefer_plain(plain.sqrt(), norm_from_parts(parts, self.count, plain.dtype)[0], self.count)


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


