"""Writing θ + δ back into low-precision parameters without erasing δ.

With bf16 weights most of ε·g1 lies below half an ulp, and round-to-nearest maps θ + δ back to θ
(../shared/docs/bf16.md measured 0.3% of weights changing at ε = 1e-3 on a 1.5B model). Stochastic rounding
rounds up with probability equal to the distance to the lower neighbour over the gap, so E[SR(x)] = x and the
perturbation survives in expectation. It is deterministic for a given (seed, step point, tensor index).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
ROUNDING_MODES = ("stochastic", "nearest")

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads consecutive seeds apart
SEED_MASK = 2**63 - 1  # seeds handed to generators and kernels are non-negative 63-bit integers


def rounding_seed(seed: int, index: int, point: int) -> int:
    """A 63-bit generator seed for one tensor at one perturbation point of one step."""
    h = (seed * _MIX + (index + 1) * 0xBF58476D1CE4E5B9 + (point + 1) * 0x94D049BB133111EB) & (2**64 - 1)
    h ^= h >> 31
    return h & SEED_MASK


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Round ``x`` (fp32/fp64) to ``dtype`` stochastically: P(upper neighbour) = (x − lo)/(hi − lo).

    Unbiased: E[result] = x for every x between the two neighbours of ``dtype``.
    """
    lo = x.to(dtype)  # nearest; the other neighbour lies on the other side of x
    lo_wide = lo.to(x.dtype)
    toward = torch.where(lo_wide < x, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(lo, toward)
    gap = (other.to(x.dtype) - lo_wide).abs()
    p_other = torch.where(gap > 0, (x - lo_wide).abs() / gap, torch.zeros_like(x))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(u < p_other, other, lo)


def perturbed_value(
    theta: torch.Tensor,
    direction: torch.Tensor,
    step: torch.Tensor,
    rounding: str,
    *,
    seed: int,
    index: int,
    point: int,
    grid: torch.dtype | None = None,
) -> torch.Tensor:
    """θ + step·direction in θ's dtype; ``step`` is a 0-d device tensor (no host read).

    Computed in float32 (float64 for float64 parameters); bf16/fp16 results are stochastically rounded when
    ``rounding == "stochastic"``, else rounded to nearest.

    With ``grid`` (the dtype a mixed-precision model computes with, e.g. FSDP2 casting fp32 shards to bf16), the
    result is rn_grid(θ) + step·direction rounded onto ``grid`` and stored in θ's dtype: the model's cast then
    keeps it exactly, and the perturbation starts from the weight the model computed with at θ.
    """
    wide = torch.float64 if theta.dtype == torch.float64 else torch.float32
    start = theta
    target = theta.dtype if grid is None else grid
    if grid is not None:
        start = start.to(grid)
    x = start.to(wide) + step.to(wide) * direction.to(wide)
    if target in LOW_PRECISION and rounding == "stochastic":
        gen = torch.Generator(device=theta.device)
        gen.manual_seed(rounding_seed(seed, index, point))
        return stochastic_round(x, target, gen).to(theta.dtype)
    return x.to(target).to(theta.dtype)
