"""``GradReg``: gradient regularization as a wrapper around any ``torch.optim.Optimizer``.

Per optimizer step::

    g1 = ∇L(θ);  θ' = θ + ε·v with v = clip(g1);  g2 = ∇L(θ');  restore θ;
    grad = g1 + (γ/ε)·(clip(g2) − v)  ≈  ∇L + γ·H·v          → handed to the base optimizer

This class is the ``torch.optim`` face: it shares the base optimizer's groups and state, validates the settings
through the one schema (``grkernels.settings``) and hands each step to the engine (``grkernels.engine.GREngine``),
which owns the step end to end — phases and abort, plan, backend, estimators, reuse, the sub-batch pass, the
non-finite vote, the adaptive strength and the metrics.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from grkernels.engine import TRANSITIONS, GREngine
from grkernels.guards import refuse_unsupported_callers
from grkernels.params import resolve_exclude
from grkernels.rng import RNGState
from grkernels.settings import resolve, settings_help
from grkernels.sources import OptimizerSource, check_group

__all__ = ["GradReg"]


class GradReg(torch.optim.Optimizer):
    r"""Gradient regularization around an existing optimizer: the base optimizer steps with
    ``g1 + (γ/ε)·(clip(g2) − clip(g1)) ≈ ∇L + γ·H·∇L`` instead of ``g1 = ∇L``.

    Args:
        optimizer: the base optimizer (an instance; one whose ``step`` needs no closure, without
            ``maximize=True``). ``GradReg`` shares its ``param_groups`` and ``state``.
        exclude: parameters left out of GR (they get plain g1): tensors, and/or name substrings when
            ``named_parameters`` is given. ``grkernels.paper_exclude(model)`` is the paper's (embeddings, head).
        named_parameters: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``, for string excludes.
        schedule: ``schedule(step) -> float``, a multiplier of every group's γ after warmup.
        master_weights: for optimizers that step fp32 master copies of low-precision model weights: the name of
            the attribute on each master holding the model's weight; GR perturbs and restores that weight bitwise
            (never the master).
        **settings: the GR settings of ``grkernels.settings.SETTINGS`` (below). The defaults hold gr_rel at 3
            (``strength="auto"``) with a perturbation of norm 0.02 (``eps_mode="radius"``); the paper's fixed
            setting is ``strength=1e-2, eps=1e-3, eps_mode="absolute"``.

    Two-phase use (a loop that owns its backward): backward at θ, ``perturb()``, the same backward at θ',
    ``combine()`` (optional: before a clip), ``step()``. Sub-batch GR: ``mark_subset(f)`` after the subset's
    backward, first. Per-group overrides: a param group may set ``gr_strength`` (γ) or ``gr_enabled=False``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, exclude: Iterable[torch.Tensor | str] | None = None,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                 schedule: Callable[[int], float] | None = None, master_weights: str | None = None,
                 **settings: Any) -> None:
        _check_base(optimizer)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"GradReg: schedule must be callable (step -> factor), got {type(schedule).__name__}")
        cfg = resolve(settings, scope="engine")
        if cfg.g1_clip != cfg.g2_clip and cfg.estimator != "exact":
            warnings.warn(
                f"GradReg: g1_clip={cfg.g1_clip} and g2_clip={cfg.g2_clip} differ. The correction is (γ/ε)·(s2·g2 − "
                "s1·g1): whenever only one clip is active its factor no longer cancels, and the correction grows like "
                "‖g‖/ε. Clip both at the same norm (the paper: 10 and 10) unless you mean it.", UserWarning,
                stacklevel=2)
        self.optimizer = optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        source = OptimizerSource(optimizer, resolve_exclude(exclude, named_parameters, params), master_weights)
        self.engine = GREngine(cfg, source, schedule)
        self.master_weights = master_weights
        self._init_hooks()
        self._patch_step_function()  # torch.optim.Optimizer's profiling / hook wrapper

    def _init_hooks(self) -> None:
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    # ------------------------------------------------------------------ the base optimizer's groups and state
    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state, lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults, lambda self, v: setattr(self.optimizer, "defaults", v))

    def __getattr__(self, name: str) -> Any:
        """The settings read as attributes (``opt.strength``, ``opt.eps``, ``opt.every`` ...)."""
        engine = self.__dict__.get("engine")
        if engine is not None and not name.startswith("_") and name in engine.settings.values:
            return engine.strength if name == "strength" else engine.settings.values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_group(param_group)
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v!r}" for k, v in self.engine.settings.as_dict("engine").items())
        return f"GradReg({values},\n  {self.optimizer!r})"

    # ------------------------------------------------------------------ what the coming step does (host-side)
    active = property(lambda self: self.engine.active, doc="Whether the coming step is a full GR step.")
    reusing = property(lambda self: self.engine.reusing, doc="Whether the coming step applies the stored correction.")
    extra_passes = property(lambda self: self.engine.extra_passes, doc="Passes at perturbed points this step.")
    needs_graph = property(lambda self: self.engine.needs_graph, doc="Whether the backward needs create_graph=True.")
    subset_fraction = property(lambda self: self.engine.subset_fraction,
                               lambda self, f: self.engine.set_subset_fraction(f),
                               doc="The marked subset's share of the batch (None: none marked); settable until "
                                   "perturb().")

    def strength_factor(self, step: int | None = None) -> float:
        """Multiplier of every group's γ at ``step`` (default: the coming step): 0 during warmup."""
        return self.engine.factor(step)

    def gr_parameters(self) -> list[torch.Tensor]:
        """The parameters GR regularises this step: not excluded, GR on, γ > 0, with a gradient."""
        return [p for p in self.engine.candidates() if p.grad is not None]

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with ``create_graph=True`` when the exact estimator needs it."""
        loss.backward(create_graph=self.needs_graph)

    # ------------------------------------------------------------------ the step
    @torch.compiler.disable  # host-side bookkeeping (phase, step counter, RNG replay) must run eagerly every call
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One GR step. With a closure (loss = ...; loss.backward(); return loss): evaluate at θ, perturb, evaluate
        again with the RNG replayed, restore θ bitwise, combine, step the base optimizer; returns the first loss.
        Without one: finish a two-phase step, or take a plain step while GR is inactive."""
        engine = self.engine
        refuse_unsupported_callers(with_closure=closure is not None, abort=engine.abort)
        if closure is None:
            return engine.finish(self.optimizer.step)
        if engine.phase not in TRANSITIONS["step_closure"]:
            engine.abort()
            raise RuntimeError("GradReg.step(closure) while a two-phase step was pending (or a subset marked): the "
                               "pending step was aborted (θ restored); step(closure) runs a whole step by itself")
        try:
            self.zero_grad()
            rng = RNGState()
            with torch.enable_grad():
                loss = closure()
            if engine.needs_graph:
                engine.combine()
            for _ in range(engine.extra_passes):
                engine.perturb()
                rng.replay()
                with torch.enable_grad():
                    closure()
        except BaseException:
            engine.abort()
            raise
        engine.finish(self.optimizer.step)
        return loss

    def perturb(self, keep_untouched: bool = False) -> None:
        """After the backward pass(es) at θ: save g1, zero the GR gradients, move θ to the next perturbed point
        (call it ``extra_passes`` times, each followed by the same backward). ``keep_untouched=True``: the passes
        will not touch the gradients outside GR (head-only GR); they are set aside, not copied, and a pass that
        does reach one is an error at the combine."""
        self.engine.perturb(keep_untouched)

    def restore_and_combine(self) -> None:
        """After the backward(s) at θ': θ back bitwise; ``.grad`` ← the GR gradient (excluded params: g1)."""
        self.engine.restore_and_combine()

    def combine(self) -> None:
        """Before a clip and ``step()``, in every step: ``.grad`` becomes what the base optimizer steps with."""
        self.engine.combine()

    def restore(self) -> None:
        """Abort the step in progress: θ back bitwise, ``.grad`` back to g1, whatever the phase."""
        self.engine.abort()

    def mark_subset(self, fraction: float) -> None:
        """Sub-batch GR (K-SAM-style): after the backward of the subset S (taken first, with its terms scaled as in
        the whole batch's loss), before the rest's backward. The pass at θ' then runs on S only and GR combines
        with g2 ≈ g1 + (g2_S − g1_S)/f, f = ``fraction`` = |S|/|B| (f = 1: full GR exactly). Under DDP / FSDP2 the
        subset's backward must end synchronised. One gradient copy of the GR parameters."""
        self.engine.mark_subset(fraction)

    # ------------------------------------------------------------------ diagnostics and state
    def metrics(self, sync: bool = True) -> dict[str, Any]:
        """Diagnostics of the last step taken, one meaning per name on every path and host:

        - ``g1_norm``: ‖g1‖ over the GR parameters, before any clipping; ``g2_norm``: ‖g2‖ likewise (exact: ‖H·v‖;
          NaN without a perturbed pass); ``gr_rel`` = ‖GR − g1‖/‖g1‖ (0 without GR); ``perturb_ratio`` =
          ‖θ' − θ‖/‖ε·v‖ (NaN without a perturbed pass); ``reuse_cos`` (reuse): the reused correction's cosine
          with the full one;
        - ``skipped``: non-finite steps skipped so far; ``strength``: the γ applied in the last step (the adaptive
          strength's value, × warmup/schedule factor); ``step``: optimizer steps taken.

        ``sync=False`` returns the device tensors as they are (no host read); ``sync=True`` returns floats."""
        return self.engine.metrics(sync)

    def extra_memory_bytes(self) -> int:
        """Bytes GR holds now: the backend's saved θ and g1 (as last allocated) and a stored correction."""
        return self.engine.extra_bytes()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"grad_reg"``: the engine's state (step, skips, reuse, strength)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["grad_reg"] = self.engine.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``. A pending step is aborted first (θ restored bitwise)."""
        if self.engine.phase != "idle":
            warnings.warn("GradReg.load_state_dict() during a step: the step was aborted and θ restored",
                          RuntimeWarning, stacklevel=2)
        self.engine.abort()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        sd = dict(state_dict)
        gr = sd.pop("grad_reg", None)
        for group in sd.get("param_groups", []):  # before anything is loaded
            check_group(group)
        self.optimizer.load_state_dict(sd)
        if gr is not None:
            self.engine.load_state_dict(gr)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:  # copy, pickle, torch.save: the engine refuses mid-step
        self.engine.__getstate__()
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_hooks")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        self._patch_step_function()


GradReg.__doc__ = (GradReg.__doc__ or "") + "\n    Settings (``grkernels.settings``):\n\n" + "\n".join(
    "        " + line for line in settings_help(scope="engine").splitlines())


def _check_base(optimizer: Any) -> None:
    """Refuse base optimizers GR cannot drive, at construction."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"GradReg wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
    if isinstance(optimizer, GradReg):
        raise TypeError("GradReg: the base optimizer is already a GradReg")
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"GradReg cannot wrap {type(optimizer).__name__}: its step() requires a closure that it calls several "
            "times (a line search), which would evaluate the loss at points GR does not control. Use a first-order "
            "optimizer (SGD, Adam, AdamW ...)")
    for group in optimizer.param_groups:  # maximize=True among them (also checked at every step)
        check_group(group)
