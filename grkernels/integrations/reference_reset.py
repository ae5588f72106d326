"""Reference resets for plain training loops: the KL-penalty baseline the GR paper compares against.

A KL penalty towards a reference policy whose reference is periodically moved to the current policy implicitly
regularizes the gradient norm (the paper's observation). :class:`ReferenceReset` does the moving: every
``every`` calls of :meth:`ReferenceReset.step` (one per optimizer step), ::

    θ_ref ← α·θ_policy + (1 − α)·θ_ref          (α = 1: hard reset, the reference becomes the policy)

the same rule as TRL's ``SyncRefModelCallback`` (``sync_ref_model=True``, ``ref_model_sync_steps``,
``ref_model_mixup_alpha``); with TRL use those config fields instead of this class.

Usage::

    ref = copy.deepcopy(policy).requires_grad_(False)
    resetter = ReferenceReset(ref, policy, every=512, alpha=0.6)
    for batch in data:
        ...                      # loss = task loss + beta * KL(policy || ref); backward; optimizer.step()
        resetter.step()          # after the optimizer step
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ReferenceReset", "mix_into_reference"]


@torch.no_grad()
def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float = 1.0) -> None:
    """``θ_ref ← α·θ_policy + (1 − α)·θ_ref`` for every parameter and floating-point buffer, in place.

    The two modules must have the same parameter and buffer names and shapes (the reference may have another
    dtype or device: values are converted). ``alpha = 1`` copies the policy bitwise (same dtype).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"mix_into_reference: alpha must be in (0, 1], got {alpha}")
    ref_t = dict(reference.named_parameters())
    ref_t.update(dict(reference.named_buffers()))
    pol_t = dict(policy.named_parameters())
    pol_t.update(dict(policy.named_buffers()))
    if ref_t.keys() != pol_t.keys():
        missing = sorted(pol_t.keys() - ref_t.keys())[:3]
        extra = sorted(ref_t.keys() - pol_t.keys())[:3]
        raise ValueError(
            "mix_into_reference: reference and policy differ in parameter/buffer names "
            f"(only in policy: {missing}, only in reference: {extra}). PEFT/LoRA policies: merge or use the base "
            "model as reference."
        )
    for name, r in ref_t.items():
        p = pol_t[name]
        if r.shape != p.shape:
            raise ValueError(f"mix_into_reference: {name} has shape {tuple(r.shape)} in the reference and "
                             f"{tuple(p.shape)} in the policy")
        if alpha == 1.0 or not r.is_floating_point():
            r.copy_(p)
        else:
            # mix in fp32 at least, round once into the reference's dtype
            dt = torch.promote_types(r.dtype, torch.float32)
            r.copy_(r.to(dt).lerp_(p.to(device=r.device, dtype=dt), alpha))


class ReferenceReset:
    """Every ``every`` optimizer steps, move ``reference`` to ``policy`` (hard reset, or mix with ``alpha``).

    Args:
        reference: the reference model (frozen; the KL penalty's target).
        policy: the trained model (same architecture and parameter names; unwrap DDP first, or pass
            ``ddp_model.module``).
        every: number of :meth:`step` calls between resets (> 0).
        alpha: mixing factor in (0, 1]; 1 is a hard reset.
    """

    def __init__(self, reference: nn.Module, policy: nn.Module, every: int, alpha: float = 1.0) -> None:
        if int(every) != every or every <= 0:
            raise ValueError(f"ReferenceReset: every must be a positive integer, got {every}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ReferenceReset: alpha must be in (0, 1], got {alpha}")
        if reference is policy:
            raise ValueError("ReferenceReset: reference and policy are the same module; pass a copy as reference")
        self.reference, self.policy = reference, policy
        self.every, self.alpha = int(every), float(alpha)
        self.steps = 0
        self.resets = 0

    def step(self) -> bool:
        """Count one optimizer step; reset the reference when the count reaches a multiple of ``every``.

        Returns whether a reset happened (host-side counter, no device sync).
        """
        self.steps += 1
        if self.steps % self.every:
            return False
        self.reset()
        return True

    def reset(self) -> None:
        """Reset (or mix) now, regardless of the counter."""
        mix_into_reference(self.reference, self.policy, self.alpha)
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "resets": self.resets, "every": self.every, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.resets = int(state["steps"]), int(state["resets"])
