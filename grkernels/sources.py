"""Parameter sources: what a GR step works on, for :class:`grkernels.engine.GREngine`.

A source answers four questions for the engine, and nothing else:

- which tensors (``entries``: each a tensor whose ``.grad`` is its gradient, with its group's γ override, whether
  GR is on for its group, whether it is excluded), in a stable order: the *positions* that per-parameter state
  (exclusions, the stored correction) is keyed by;
- how their norms are summed across ranks (``shards``: a :class:`~grkernels.backends.base.Shards`);
- where the weight the model computes with lives (``model_attr``: None, or the attribute of each tensor holding it,
  e.g. fp32 masters over bf16 model weights, or ZeRO partitions);
- how changed weights are published (``publish``: nothing for plain tensors and FSDP2, which gathers at the next
  forward; an all-gather for ZeRO) and how live gradients are found again (``refresh``).

:class:`OptimizerSource` is the source of ``GradReg``: the base optimizer's parameters (plain, DDP, or FSDP2
DTensors through :func:`grkernels.distributed.shards_for`). The DeepSpeed ZeRO source lives with its host
(``grkernels.integrations.deepspeed``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from grkernels.backends.base import Shards
from grkernels.distributed import check_not_fsdp1, shards_for

__all__ = ["Entry", "OptimizerSource", "ParamSource"]


@dataclass(frozen=True)
class Entry:
    """One tensor GR may work on: ``tensor.grad`` is its gradient; ``gamma`` its group's γ override (None: the
    global γ); ``enabled`` False when its group turns GR off; ``excluded`` when the user left it out."""

    tensor: torch.Tensor
    gamma: float | None = None
    enabled: bool = True
    excluded: bool = False


class ParamSource(Protocol):
    """What :class:`~grkernels.engine.GREngine` works on (see the module docstring)."""

    model_attr: str | None

    def entries(self) -> list[Entry]:
        """Every tensor the base optimizer steps, once each, in a stable order (positions)."""

    def step_tensors(self) -> list[torch.Tensor]:
        """The tensors with a gradient that the base step uses (the non-finite vote covers all of them)."""

    def shards(self, tensors: Sequence[torch.Tensor], estimator: str) -> Shards:
        """How a step over ``tensors`` reaches their local parts and sums their squares across ranks."""

    def check(self, params: Sequence[torch.Tensor], keep: Sequence[torch.Tensor]) -> None:
        """Raise a clear error for tensors a GR step cannot work on."""

    def refresh(self, plan: Any) -> None:
        """Before the step reads gradients again: point the plan at the live gradient buffers."""

    def publish(self) -> None:
        """After the step wrote weights: make the model compute with them."""


def check_group(group: dict[str, Any]) -> None:
    """A param group's ``gr_strength`` (finite, >= 0), ``gr_enabled`` (bool) and no ``maximize=True``. Checked
    at construction, in ``add_param_group``, before a state dict is loaded and at every step (a group edited in
    place), before anything moves."""
    gamma = group.get("gr_strength", 0.0)
    if isinstance(gamma, (torch.Tensor, bool)) or not isinstance(gamma, (int, float)) or not (
            math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"GradReg: a param group's gr_strength must be a finite number >= 0, got {gamma!r}")
    if not isinstance(group.get("gr_enabled", True), bool):
        raise TypeError(f"GradReg: a param group's gr_enabled must be True or False, got {group['gr_enabled']!r}")
    if group.get("maximize", False):
        raise ValueError(
            "GradReg: a param group has maximize=True. GR adds γ·H·g to the gradient of a loss to be minimised; "
            "a maximising base optimizer would climb R + (γ/2)‖∇R‖², seeking sharp regions. Minimise the negated "
            "objective instead (loss = −R) with maximize=False")


class OptimizerSource:
    """The parameters of a ``torch.optim.Optimizer``'s param groups, with exclusions kept by (group, index)
    position — as ``torch.optim`` keys its state — so that hosts which swap the parameter objects after the
    optimizer is built (Accelerate's FSDP2 ``prepare``; a copy; unpickling) keep them."""

    def __init__(self, optimizer: torch.optim.Optimizer, excluded: set[int], master_weights: str | None = None):
        self.optimizer = optimizer
        self.model_attr = master_weights
        groups = optimizer.param_groups
        self._excluded_pos = [(gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])
                              if id(p) in excluded]
        self._sizes = [len(g["params"]) for g in groups]
        for g in groups:
            check_group(g)
        check_not_fsdp1([p for g in groups for p in g["params"]])

    def _excluded_ids(self) -> set[int]:
        groups = self.optimizer.param_groups
        if len(groups) < len(self._sizes) or any(len(groups[gi]["params"]) != n for gi, n in enumerate(self._sizes)):
            raise RuntimeError(
                "GradReg: the wrapped optimizer's param groups changed size since GradReg was built, so its "
                "exclusions cannot be followed; build GradReg after the model is prepared (sharded, wrapped) or give "
                "each param group its own gr_strength instead of exclude=")
        return {id(groups[gi]["params"][pi]) for gi, pi in self._excluded_pos}

    def entries(self) -> list[Entry]:
        excluded = self._excluded_ids()
        out: list[Entry] = []
        seen: dict[int, int] = {}  # a tensor listed twice in one group is one parameter, stepped once
        for gi, group in enumerate(self.optimizer.param_groups):
            check_group(group)
            gamma, enabled = group.get("gr_strength"), group.get("gr_enabled", True)
            for p in group["params"]:
                if id(p) in seen:
                    if seen[id(p)] != gi:
                        raise ValueError("GradReg: a parameter appears in more than one param group")
                    continue
                seen[id(p)] = gi
                out.append(Entry(p, None if gamma is None else float(gamma), enabled, id(p) in excluded))
        return out

    def step_tensors(self) -> list[torch.Tensor]:
        return [e.tensor for e in self.entries() if e.tensor.grad is not None]

    def shards(self, tensors: Sequence[torch.Tensor], estimator: str) -> Shards:
        return shards_for(tensors, estimator)

    def check(self, params: Sequence[torch.Tensor], keep: Sequence[torch.Tensor]) -> None:
        devices: set[torch.device] = set()
        for p in list(params) + list(keep):
            if p.grad.is_sparse or p.layout != torch.strided:
                raise RuntimeError(
                    f"GradReg: sparse gradients are not supported (parameter of shape {tuple(p.shape)}); use dense "
                    "embeddings (sparse=False) or exclude the parameter's group from GradReg")
            if not p.is_floating_point():
                raise TypeError(f"GradReg: parameter of dtype {p.dtype} is not floating point")
            devices.add(p.device)
        if len(devices) > 1:
            raise RuntimeError(
                f"GradReg: parameters are on several devices ({sorted(str(d) for d in devices)}); one GR step works "
                "on one device. Use one GradReg per device, or DDP/FSDP with one device per process.")
        if self.model_attr is not None:
            for p in params:
                w = getattr(p, self.model_attr, None)
                if not isinstance(w, torch.Tensor) or w.shape != p.shape or w.device != p.device:
                    raise RuntimeError(
                        f"GradReg(master_weights={self.model_attr!r}): a GR parameter of shape {tuple(p.shape)} has no "
                        "such attribute holding a model weight of the same shape and device")

    def refresh(self, plan: Any) -> None:
        """Plain tensors: the gradient is ``.grad`` itself."""

    def publish(self) -> None:
        """Plain tensors and FSDP2 shards: the next forward reads (gathers) them; nothing to do."""
