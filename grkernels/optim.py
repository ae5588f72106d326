"""``GradReg``: gradient regularization as a wrapper around any ``torch.optim.Optimizer``.

Per optimizer step (Karakida et al. 2023, forward finite difference; Ackermann et al. 2026 for RLHF/RLVR):

    g1 = ∇L(θ);  θ' = θ + ε·v with v = clip(g1);  g2 = ∇L(θ');  restore θ;
    grad = g1 + (γ/ε)·(clip(g2) − v)  ≈  ∇L + γ·H·v          → handed to the base optimizer

This file is the bookkeeping: which parameters take part, the γ schedule, RNG replay, the order of calls, errors,
state and diagnostics. The arithmetic lives in a backend: ``grkernels.backends.reference.TorchGRStep`` (plain
PyTorch, the specification), ``grkernels.backends.cpp.CppGRStep`` (C++ CPU kernels) or
``grkernels.backends.triton.TritonGRStep`` (fused GPU kernels), picked in ``_make_backend``.

Host synchronisation: ``perturb()`` and ``restore_and_combine()`` read nothing back from the device. ``step()``
reads one boolean (were g1 and g2 finite?) right before the base optimizer's step, the same read
``torch.amp.GradScaler`` makes, so that a non-finite step can be skipped; ``skip_nonfinite=False`` removes it.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from grkernels.backends.arith import accum_dtype, global_norm
from grkernels.backends.base import Shards, StepPlan
from grkernels.backends.reference import TorchGRStep
from grkernels.distributed import check_not_fsdp1, shards_for
from grkernels.kernels import check_triton_device, resolve_backend
from grkernels.params import resolve_exclude
from grkernels.reuse import REUSE_MODES, CorrectionReuse
from grkernels.rng import RNGState

ESTIMATORS = ("forward", "central", "exact")


_IDLE, _PERTURBED, _COMBINED = "idle", "perturbed", "combined"


def _aborts_on_error(method: Callable) -> Callable:
    """Any exception out of a public step method leaves θ bitwise θ and the optimizer idle and usable: the one
    mechanism behind every error path (a raising closure, a failed kernel, a call in the wrong order ...)."""

    @functools.wraps(method)
    def wrapper(self: GradReg, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._abort()
            raise

    return wrapper


class GradReg(torch.optim.Optimizer):
    r"""Gradient regularization around an existing optimizer: the base optimizer steps with
    ``g1 + (γ/ε)·(clip(g2) − clip(g1)) ≈ ∇L + γ·H·∇L`` instead of ``g1 = ∇L``.

    Args:
        optimizer: the base optimizer (an instance). ``GradReg`` shares its ``param_groups`` and ``state``.
        strength: γ, the weight of the penalty (γ/2)·‖∇L‖² (units of 1/loss: γ·H·g has the units of g).
        eps: ε, the finite-difference step: θ' = θ + ε·clip(g1) (parameter units per gradient unit), or with
            ``eps_mode="radius"`` the perturbation's norm: θ' = θ + ε·v/‖v‖ (parameter units).
        eps_mode: "absolute" (the paper's) or "radius". The finite difference is accurate when ε·‖v‖ is in a
            window set by the weights' precision (≈ 0.01–0.03 for bf16 weights, BENCHMARKS.md); "radius" keeps
            the perturbation there whatever the gradient's scale, and still estimates γ·H·v (it divides by ε/‖v‖).
        g1_clip: max norm of g1 for the perturbation direction (None: no clipping). Paper default 10.
        g2_clip: max norm of g2 (None: no clipping). Paper default 10.
        exclude: parameters left out of GR (neither perturbed nor corrected: they get plain g1): tensors, and/or
            name substrings when ``named_parameters`` is given. ``grkernels.paper_exclude(model)`` gives the
            paper's default (embeddings and output head).
        named_parameters: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``, for string excludes.
        warmup_steps: steps before GR starts (plain base-optimizer steps until then).
        schedule: ``schedule(step) -> float``, a multiplier of every group's strength after warmup.
        estimator: "forward" (paper; 1 extra pass), "central" (θ ± ε·v, 2 extra passes, robust over ε) or
            "exact" (double backprop H·v; the closure must call ``loss.backward(create_graph=True)``, or
            ``opt.backward(loss)``).
        rounding: "stochastic" (default; unbiased, keeps ε·v alive in bf16/fp16 weights) or "nearest".
        backend: "torch" (the reference), "cpp" (C++ CPU kernels), "triton" or "auto" (Triton on CUDA when
            installed, C++ on CPU when ``grkernels._C`` is built, else torch; ``grkernels.info()`` says which).
        skip_nonfinite: skip (and count, with a warning) a step whose g1 or g2 is not finite. Costs one host read
            of a boolean per step; with False nothing is read and non-finite gradients reach the base optimizer
            (the perturbation itself is always protected).
        seed: seed of the stochastic rounding (the step index is mixed in; resuming reproduces it).
        master_weights: for optimizers that step fp32 master copies of low-precision model weights: the name of
            the attribute on each master (a parameter of the base optimizer) holding the model's weight. GR then
            perturbs that weight where the gradient was taken, w ← round(w + ε·v) (not from the master: master − w
            is up to half an ulp per element and would swamp ε·v), and restores it bitwise; the masters are never
            written. The caller copies model gradients into ``master.grad`` after
            each backward, as mixed-precision trainers do.
        lean: C++ and Triton backends: save g1 of fp32 gradients in bf16 (4 instead of 6 bytes per bf16 parameter
            with fp32 gradients); between perturb() and step() the gradient buffers then hold g − g1, and the
            GR correction keeps fp32 accuracy (see grkernels.backends.triton). Ignored (with a warning) by torch.
        every: run the full GR step (the extra pass) on every k-th step after warmup only; see ``reuse``.
        reuse: what the steps in between do: "none" (the plain gradient g1) or "orthogonal" (LookSAM-style: the
            last full correction, made orthogonal to the current g1 and rescaled to the size relative to ‖g1‖ it
            had; ``grkernels.reuse``). ``every=1`` is full GR on every step.

    Sub-batch GR (two-phase API): ``mark_subset(fraction)`` after the backward of a subset of the batch, taken
    first; the perturbed pass then runs on that subset only (see ``mark_subset``).

    Per-group overrides: a param group may set ``gr_strength`` (γ for that group) or ``gr_enabled=False``.
    """

    _step_supports_amp_scaling = True  # so that GradScaler.step() reaches step() and gets a clear error

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        strength: float,
        eps: float,
        g1_clip: float | None = 10.0,
        g2_clip: float | None = 10.0,
        exclude: Iterable[torch.Tensor | str] | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        warmup_steps: int = 0,
        schedule: Callable[[int], float] | None = None,
        estimator: str = "forward",
        eps_mode: str = "absolute",
        rounding: str = "stochastic",
        backend: str = "auto",
        skip_nonfinite: bool = True,
        seed: int = 0,
        master_weights: str | None = None,
        lean: bool = False,
        every: int = 1,
        reuse: str = "none",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GradReg wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        if isinstance(optimizer, GradReg):
            raise TypeError("GradReg: the base optimizer is already a GradReg")
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"GradReg: strength must be a finite number >= 0, got {strength}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"GradReg: eps must be a finite number > 0, got {eps}")
        for name, clip in (("g1_clip", g1_clip), ("g2_clip", g2_clip)):
            if clip is not None and not clip > 0:
                raise ValueError(f"GradReg: {name} must be > 0 or None, got {clip}")
        if g1_clip != g2_clip and estimator != "exact":
            warnings.warn(
                f"GradReg: g1_clip={g1_clip} and g2_clip={g2_clip} differ. The correction is (γ/ε)·(s2·g2 − s1·g1): "
                "whenever only one clip is active its factor no longer cancels, and the correction grows like "
                "‖g‖/ε. Clip both at the same norm (the paper: 10 and 10) unless you mean it.",
                UserWarning,
                stacklevel=2,
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"GradReg: estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if eps_mode not in ("absolute", "radius"):
            raise ValueError(f"GradReg: eps_mode must be 'absolute' or 'radius', got {eps_mode!r}")
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"GradReg: rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        if warmup_steps < 0:
            raise ValueError(f"GradReg: warmup_steps must be >= 0, got {warmup_steps}")
        resolve_backend(backend, "cpu", what="GradReg")  # validates the name
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GradReg: every must be a whole number >= 1, got {every!r}")
        if reuse not in REUSE_MODES:
            raise ValueError(f"GradReg: reuse must be one of {REUSE_MODES}, got {reuse!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"GradReg: schedule must be callable (step -> factor), got {type(schedule).__name__}")
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps:
            raise TypeError(f"GradReg: warmup_steps must be a whole number, got {warmup_steps!r}")

        self.optimizer = optimizer
        self.strength, self.eps = float(strength), float(eps)
        self.g1_clip, self.g2_clip = g1_clip, g2_clip
        self.warmup_steps, self.schedule = int(warmup_steps), schedule
        self.estimator, self.eps_mode, self.rounding, self.backend = estimator, eps_mode, rounding, backend
        self.skip_nonfinite, self.seed = skip_nonfinite, int(seed)
        self.lean = bool(lean)
        self.every, self.reuse = every, reuse
        self._reuse = CorrectionReuse()
        self._reuse_factor = 1.0  # the γ multiplier of the full step whose correction is stored
        self._subset: dict[int, torch.Tensor] | None = None  # sub-batch GR: g1 of the subset, then R (mark_subset)
        self._subset_fraction = 1.0
        self._untouched: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # perturb(keep_untouched=True)
        self.master_weights = master_weights
        self._set_exclusions(resolve_exclude(exclude, named_parameters, self._parameters()))
        check_not_fsdp1(self._parameters())
        for group in optimizer.param_groups:
            self._check_group(group)

        # torch.optim.Optimizer's own bookkeeping, without copying the base optimizer's param groups.
        self._init_hooks()
        self._patch_step_function()

        self._step = 0  # optimizer steps taken (skipped ones included): drives warmup, schedule, seeds
        self._phase = _IDLE
        self._plan: StepPlan | None = None
        self._impl: TorchGRStep | None = None
        self._point = 0  # perturbation points visited this step
        self._finite: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None  # device counter of skipped (non-finite) steps
        self._metrics: dict[str, torch.Tensor] = {}
        self._last_factor = 0.0  # the γ multiplier (warmup, schedule) of the last step taken
        self._observed = -1  # the step whose g1 diagnostics observe_g1() recorded

    def _init_hooks(self) -> None:
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())

    # ------------------------------------------------------------------ sharing the base optimizer
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def _parameters(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # Per-group settings are read where they are used, never written into the shared groups: a group that does
    # not set gr_strength / gr_enabled follows this GradReg's own strength, also after re-wrapping the optimizer.
    def _group_gamma(self, group: dict[str, Any]) -> float:
        """γ of a param group before warmup/schedule: its ``gr_strength``, else ``strength``; 0 if GR is off."""
        if not group.get("gr_enabled", True):
            return 0.0
        return float(group.get("gr_strength", self.strength))

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        gamma = group.get("gr_strength", 0.0)
        if isinstance(gamma, torch.Tensor) or not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"GradReg: a param group's gr_strength must be a finite number >= 0, got {gamma!r}")
        if not isinstance(group.get("gr_enabled", True), bool):
            raise TypeError(f"GradReg: a param group's gr_enabled must be True or False, got {group['gr_enabled']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_group(param_group)
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (
            f"GradReg(strength={self.strength}, eps={self.eps}, eps_mode={self.eps_mode!r}, "
            f"estimator={self.estimator!r}, g1_clip={self.g1_clip}, g2_clip={self.g2_clip}, "
            f"backend={self.backend!r},\n  {self.optimizer!r})"
        )

    # ------------------------------------------------------------------ schedule
    def strength_factor(self, step: int | None = None) -> float:
        """Multiplier of every group's γ at ``step`` (default: the coming step): 0 during warmup."""
        step = self._step if step is None else step
        if step < self.warmup_steps:
            return 0.0
        if self.schedule is None:
            return 1.0
        factor = self.schedule(step)
        if isinstance(factor, torch.Tensor) or not (math.isfinite(factor) and factor >= 0):
            raise ValueError(
                f"GradReg: schedule({step}) returned {factor!r}; it must return a finite number >= 0 (a host float: "
                "a tensor would force a device read every step)"
            )
        return float(factor)

    def _regularising(self) -> bool:
        """GR is on for the coming step (after warmup, some γ > 0), whether or not it is a full step."""
        factor = self.strength_factor()
        return factor != 0.0 and any(self._group_gamma(g) * factor != 0.0 for g in self.param_groups)

    @property
    def active(self) -> bool:
        """Whether the coming step is a full GR step, with its perturbed pass(es) (False during warmup, when every
        γ is 0, and on the steps between full steps with ``every > 1``). Host-side, no sync."""
        return self._regularising() and (self._step - self.warmup_steps) % self.every == 0

    @property
    def reusing(self) -> bool:
        """Whether the coming step applies the stored correction (``every > 1, reuse="orthogonal"``) in step()."""
        return (
            self.reuse == "orthogonal" and self._reuse.ready and not self.active and self._regularising()
        )

    @property
    def extra_passes(self) -> int:
        """Forward/backward passes at perturbed points this step needs: 1 forward, 2 central, 0 exact/inactive."""
        if not self.active or self.estimator == "exact":
            return 0
        return 2 if self.estimator == "central" else 1

    @property
    def needs_graph(self) -> bool:
        """Whether the backward of this step must keep its graph (``create_graph=True``): the exact estimator."""
        return self.active and self.estimator == "exact"

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with ``create_graph=True`` when the exact estimator needs it."""
        loss.backward(create_graph=self.needs_graph)

    # ------------------------------------------------------------------ exclusions
    def _set_exclusions(self, ids: set[int]) -> None:
        """Keep the exclusions as (group, index) positions in ``param_groups``, as torch.optim's state_dict keys
        parameters: hosts that replace the parameter objects in place after the optimizer is built (Accelerate's
        FSDP2 ``prepare`` swaps in the sharded parameters; a copy or unpickling makes new tensors) keep them."""
        self._excluded_pos = [(gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])
                              if id(p) in ids]
        self._group_sizes = [len(g["params"]) for g in self.param_groups]
        self._excluded_key: tuple[int, ...] | None = None
        self._excluded_ids: set[int] = set()

    @property
    def _excluded(self) -> set[int]:
        """ids of the excluded parameters as the param groups hold them now (O(number excluded) to check)."""
        groups = self.param_groups
        if len(groups) < len(self._group_sizes) or any(
                len(groups[gi]["params"]) != n for gi, n in enumerate(self._group_sizes)):
            raise RuntimeError(
                "GradReg: the wrapped optimizer's param groups changed size since GradReg was built, so its "
                "exclusions cannot be followed; build GradReg after the model is prepared (sharded, wrapped) or "
                "give each param group its own gr_strength instead of exclude="
            )
        key = tuple(id(groups[gi]["params"][pi]) for gi, pi in self._excluded_pos)
        if key != self._excluded_key:
            self._excluded_key, self._excluded_ids = key, set(key)
        return self._excluded_ids

    # ------------------------------------------------------------------ plan and backend
    def _make_plan(self) -> StepPlan:
        """Sort parameters with a gradient into GR parameters and keep parameters; validate them."""
        factor = self.strength_factor()
        params: list[torch.Tensor] = []
        coefs: list[float] = []
        keep: list[torch.Tensor] = []
        absent: list[torch.Tensor] = []
        devices: set[torch.device] = set()
        seen: dict[int, int] = {}  # id -> group index: a tensor listed twice is one parameter, stepped once by GR
        excluded = self._excluded
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            gamma = self._group_gamma(group) * factor
            for p in group["params"]:
                if id(p) in seen:
                    if seen[id(p)] != gi:
                        raise ValueError("GradReg: a parameter appears in more than one param group")
                    continue
                seen[id(p)] = gi
                if p.grad is None:
                    absent.append(p)  # no gradient at θ: left alone
                    continue
                if p.grad.is_sparse or p.layout != torch.strided:
                    raise RuntimeError(
                        f"GradReg: sparse gradients are not supported (parameter of shape {tuple(p.shape)}); "
                        "use dense embeddings (sparse=False) or exclude the parameter's group from GradReg"
                    )
                if not p.is_floating_point():
                    raise TypeError(f"GradReg: parameter of dtype {p.dtype} is not floating point")
                devices.add(p.device)
                if gamma != 0.0 and id(p) not in excluded:
                    params.append(p)
                    coefs.append(gamma)
                else:
                    keep.append(p)
        if self.master_weights is not None:
            for p in params:
                w = getattr(p, self.master_weights, None)
                if not isinstance(w, torch.Tensor) or w.shape != p.shape or w.device != p.device:
                    raise RuntimeError(
                        f"GradReg(master_weights={self.master_weights!r}): a GR parameter of shape {tuple(p.shape)} "
                        "has no such attribute holding a model weight of the same shape and device"
                    )
        if len(devices) > 1:
            raise RuntimeError(
                f"GradReg: parameters are on several devices ({sorted(str(d) for d in devices)}); one GR step "
                "works on one device. Use one GradReg per device, or DDP/FSDP with one device per process."
            )
        return StepPlan(
            params=params,
            coefs=coefs,
            keep=keep,
            absent=absent,
            eps=self.eps,
            g1_clip=self.g1_clip,
            g2_clip=self.g2_clip,
            estimator=self.estimator,
            rounding=self.rounding,
            seed=self.seed * 1_000_003 + self._step,
            model_attr=self.master_weights,
            eps_mode=self.eps_mode,
            shards=shards_for(params + keep, self.estimator),
        )

    def _make_backend(self, device: torch.device) -> TorchGRStep:
        """The one place the GR-step implementation is chosen (the rule: ``grkernels.kernels.resolve_backend``)."""
        impl = resolve_backend(self.backend, device, what="GradReg")
        if impl == "triton":
            check_triton_device(torch.empty(0, device=device), what="GradReg")  # clear error before the import
            from grkernels.backends.triton import TritonGRStep

            return TritonGRStep(device, lean=self.lean, model_attr=self.master_weights)
        if impl == "cpp":
            from grkernels.backends.cpp import CppGRStep

            return CppGRStep(lean=self.lean)
        if self.lean:
            warnings.warn(
                "GradReg(lean=True) has no effect on the torch backend (it saves g1 in the gradient's dtype); "
                "lean mode is a memory saving of the C++ and Triton backends",
                UserWarning,
                stacklevel=4,
            )
        return TorchGRStep()

    def _backend_for(self, plan: StepPlan) -> TorchGRStep:
        if self._impl is None:
            self._impl = self._make_backend(plan.device)
        return self._impl

    def _check_no_grad_scaler(self, kwargs: dict[str, Any]) -> None:
        if "grad_scaler" in kwargs or hasattr(self, "grad_scale") or hasattr(self, "found_inf"):
            # GradScaler set these on us before calling step(); it deletes them only after a successful step.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise RuntimeError(
                "GradReg does not support torch.amp.GradScaler (fp16 loss scaling): g1 and g2 would be scaled "
                "differently from the perturbation. Train in bf16 (autocast needs no scaler) or fp32. "
                "Parameters were left at θ."
            )

    def _abort(self) -> None:
        """Put θ back bitwise (if a perturbation is pending), drop gradients of parameters that had none at θ, go
        idle. Safe to call at any point: the backends' ``restore`` only writes what this step saved."""
        plan, self._plan = self._plan, None
        try:
            if self._phase == _PERTURBED and plan is not None and self._impl is not None:
                plan.shards.before_write(plan.params)
                self._impl.restore(plan)
        finally:
            if plan is not None:
                _drop_new_grads(plan)
            self._go_idle()

    def _go_idle(self) -> None:
        """Forget the step in progress (its plan, phase, sub-batch buffers, untouched-gradient checks)."""
        self._phase, self._point, self._finite, self._plan = _IDLE, 0, None, None
        self._subset, self._untouched = None, []

    # ------------------------------------------------------------------ two-phase API
    @torch.no_grad()
    @_aborts_on_error
    def perturb(self, keep_untouched: bool = False) -> None:
        """After the backward pass(es) at θ: save g1, zero the GR gradients, move to the next perturbed point.

        Call it ``extra_passes`` times per step, each followed by the same forward/backward pass(es) as at θ:
        once for the forward estimator (θ + ε·v), twice for the central one (θ + ε·v, then θ − ε·v).

        ``keep_untouched=True`` (at the step's first call): the perturbed passes will not touch the gradients of the
        parameters outside GR (e.g. head-only GR from cached hidden states), so their g1 is not copied (saves one
        gradient copy of them); checked at the combine by their version counters, and a pass that did touch one
        is an error (θ restored; those gradients are then g1 + the pass's, so the step must be redone).
        """
        if self.estimator == "exact":
            raise RuntimeError("GradReg(estimator='exact') has no perturbed pass: call step() after the backward")
        if not self.active:
            raise RuntimeError("GradReg.perturb(): GR is inactive this step (warmup or γ = 0); check opt.active")
        if self._phase == _COMBINED or (self._phase == _PERTURBED and self._point >= self.extra_passes):
            raise RuntimeError(
                "GradReg.perturb() called too often: this step's perturbed passes were done; the step was aborted "
                "(θ restored, gradients back to g1)"
            )
        if self._phase == _IDLE:
            self._plan = self._make_plan()
            self._point = 0
            if not self._plan.params:
                raise RuntimeError(
                    "GradReg.perturb(): no GR parameter has a gradient: run backward first, or check `exclude` "
                    "and gr_enabled (every parameter with a gradient is excluded)"
                )
            self._phase = _PERTURBED  # from here on an error restores what the backend saved
            if keep_untouched:  # nothing to save or restore for them: only check they stay as they are
                self._untouched = [(p, p.grad, p.grad._version) for p in self._plan.keep]
                self._plan.keep = []
            if self.reuse != "none":
                self._reuse.capture(self._plan.params, self._plan.shards)
            self._subset_residual(self._plan)
        else:
            self._subset_estimate(self._plan)
        self._plan.shards.before_write(self._plan.params)
        self._backend_for(self._plan).perturb(self._plan, self._point)
        self._point += 1

    @torch.no_grad()
    @_aborts_on_error
    def restore_and_combine(self) -> None:
        """After the backward pass(es) at the perturbed point(s): restore θ bitwise and write the GR gradient
        into ``.grad`` (excluded parameters get g1). The caller may clip before ``step()``."""
        if self._phase != _PERTURBED or self._point < self.extra_passes:
            raise RuntimeError(
                f"GradReg.restore_and_combine(): expected {self.extra_passes} perturb() call(s) first "
                f"(state: {self._phase}, perturbed points: {self._point}); the step was aborted"
            )
        impl = self._backend_for(self._plan)
        self._check_untouched()
        self._subset_estimate(self._plan)
        self._plan.shards.before_write(self._plan.params)
        impl.restore_and_combine(self._plan)
        _drop_new_grads(self._plan)
        self._finish_gr(impl)

    def _check_untouched(self) -> None:
        """perturb(keep_untouched=True): the gradients outside GR are the tensors they were, at the same version."""
        changed = [p for p, grad, version in self._untouched if p.grad is not grad or grad._version != version]
        if changed:
            raise RuntimeError(
                f"GradReg: the perturbed pass changed the gradient of {len(changed)} parameter(s) outside GR (shapes "
                f"{[tuple(p.shape) for p in changed[:3]]}) after perturb(keep_untouched=True): their g1 was not kept, "
                "so they now hold g1 plus that pass's gradient. θ was restored; zero the gradients and redo the step, "
                "or call perturb() without keep_untouched"
            )

    @torch.no_grad()
    def restore(self) -> None:
        """Abort a perturbed step: θ back bitwise and ``.grad`` back to g1. No-op when nothing is perturbed."""
        self._abort()

    def _finish_gr(self, impl: TorchGRStep) -> None:
        self._metrics = dict(impl.metrics)
        self._finite = impl.metrics["finite"]
        self._phase = _COMBINED
        self._subset = None
        if self.reuse != "none":
            self._metrics.update(self._reuse.store(self._plan.params, self._plan.shards))
            self._reuse_factor = self.strength_factor()

    # ------------------------------------------------------------------ sub-batch GR
    @torch.no_grad()
    def mark_subset(self, fraction: float) -> None:
        """Sub-batch GR (K-SAM-style): the perturbed pass runs on a subset S of the batch only.

        Two-phase use: backward of the subset's share of the loss first, then ``mark_subset(|S|/|B|)``, then the
        backward of the rest (``.grad`` = g1 of the whole batch), ``perturb()``, the backward of the same subset
        at θ' (same loss scaling: the subset's terms as they appear in the whole batch's loss), and
        ``restore_and_combine()``. Under DDP / FSDP2 the subset's backward must end synchronised (its last
        micro-batch outside ``no_sync`` / with ``set_requires_gradient_sync(True)``), so that the saved g1_S is
        the global one. GR then combines with the full-batch estimate g2 ≈ g1 + (g2_S − g1_S)/f, f =
        ``fraction``: the difference is taken on the same data, the perturbation direction is the whole batch's
        clip(g1), and with S = B (f = 1) it is full GR exactly. Costs one gradient copy of the GR parameters.
        Not with ``lean=True`` (its buffers carry g − g1) nor the exact estimator.
        """
        if not (0.0 < fraction <= 1.0):
            raise ValueError(f"GradReg.mark_subset: fraction must be in (0, 1], got {fraction!r}")
        if self.lean or self.estimator == "exact":
            raise RuntimeError("GradReg.mark_subset: sub-batch GR needs lean=False and a finite-difference estimator")
        if self._phase != _IDLE:
            raise RuntimeError("GradReg.mark_subset: call it before perturb(), after the subset's backward")
        have = [p for p in self._gr_candidates() if p.grad is not None]
        shards = shards_for(have)
        copies = torch._foreach_mul([shards.local(p.grad).detach() for p in have], 1.0) if have else []
        self._subset = {id(p): c for p, c in zip(have, copies)}
        self._subset_fraction = float(fraction)

    @property
    def subset_fraction(self) -> float | None:
        """The marked subset's share of the batch (None: no subset marked this step). Settable until
        ``perturb()``, for a caller that learns the batch's size only after marking (e.g. a short last window)."""
        return None if self._subset is None else self._subset_fraction

    @subset_fraction.setter
    def subset_fraction(self, fraction: float) -> None:
        if self._subset is None or self._phase != _IDLE:
            raise RuntimeError("GradReg.subset_fraction: set it after mark_subset() and before perturb()")
        if not (0.0 < fraction <= 1.0):
            raise ValueError(f"GradReg.subset_fraction must be in (0, 1], got {fraction!r}")
        self._subset_fraction = float(fraction)

    def _subset_residual(self, plan: StepPlan) -> None:
        """At θ (``.grad`` = g1): the subset buffers become D = g1_S − f·g1 (−f times the residual g1 − g1_S/f)."""
        if self._subset is None:
            return
        # One foreach call per operation, not one op per tensor: the Python cost stays flat in the model's depth
        # (and no foreach multiply by a Python scalar, which is slow on CPU: the fraction rides on alpha).
        f, local = self._subset_fraction, plan.shards.local
        saved = [p for p in plan.params if id(p) in self._subset]
        if saved:
            torch._foreach_add_([self._subset[id(p)] for p in saved], [local(p.grad) for p in saved], alpha=-f)
        fresh = [p for p in plan.params if id(p) not in self._subset]  # no gradient from the subset: D = −f·g1
        if fresh:
            self._subset.update(zip(map(id, fresh), torch._foreach_mul([local(p.grad) for p in fresh], -f)))

    def _subset_estimate(self, plan: StepPlan) -> None:
        """At a perturbed point (``.grad`` = g_S there): ``.grad`` ← (g_S − D)/f = g1 + (g_S − g1_S)/f, the
        whole-batch estimate."""
        if self._subset is None:
            return
        have = [p for p in plan.params if p.grad is not None]
        if have:
            grads = [plan.shards.local(p.grad) for p in have]
            torch._foreach_sub_(grads, [self._subset[id(p)] for p in have])
            if self._subset_fraction != 1.0:
                torch._foreach_mul_(grads, 1.0 / self._subset_fraction)

    def _combine_exact(self) -> None:
        """Exact estimator: H·v by double backprop from the graph kept in ``.grad``; ``.grad`` ← g1 + γ·H·v."""
        plan = self._make_plan()
        grads = [p.grad for p in plan.params]
        if not plan.params or not all(g.requires_grad for g in grads):
            raise RuntimeError(
                "GradReg(estimator='exact') needs the graph of the gradient: call "
                "loss.backward(create_graph=True) (or opt.backward(loss)) in the closure / before step()"
            )
        impl = self._backend_for(plan)
        with torch.no_grad():
            scale = impl.clip_scale_g1(plan)
        v = [(g.detach() * scale).to(g.dtype) for g in grads]
        try:
            hvp = torch.autograd.grad(grads, plan.params, grad_outputs=v, allow_unused=True)
        except RuntimeError as err:
            raise RuntimeError(
                "GradReg(estimator='exact'): the model's ops cannot double-backward (" + str(err).split("\n")[0]
                + "). Use estimator='forward' or 'central', or ops with double-backward support "
                "(e.g. attn_implementation='eager')."
            ) from err
        for p in plan.params + plan.keep:
            p.grad = p.grad.detach()  # drop the graph (exact mode only: the only place .grad is rebound)
        with torch.no_grad():
            hvp = [torch.zeros_like(p) if h is None else h for p, h in zip(plan.params, hvp)]
            if self.reuse != "none":
                self._reuse.capture(plan.params, plan.shards)
            impl.combine_hvp(plan, hvp)
        self._plan = plan
        self._finish_gr(impl)

    # ------------------------------------------------------------------ step
    @torch.compiler.disable  # host-side bookkeeping (phase, step counter, RNG replay) must run eagerly every call
    @_aborts_on_error
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """One GR step.

        With a closure (which computes the loss, calls ``loss.backward()`` and returns the loss): evaluate at θ,
        perturb, evaluate again with the RNG replayed, restore θ bitwise, combine, step the base optimizer;
        returns the first loss. Without a closure: finish a two-phase step (after ``perturb()`` and the second
        backward, or after ``restore_and_combine()``), or take a plain step while GR is inactive (warmup).
        """
        self._check_no_grad_scaler(kwargs)
        if closure is None:
            if self._phase == _PERTURBED:
                self.restore_and_combine()
            if self._phase == _IDLE and self.active:
                if self.estimator != "exact":
                    raise RuntimeError(
                        "GradReg.step() needs a closure (re-evaluating the loss at θ + ε·g1), or the two-phase "
                        "API: backward, opt.perturb(), backward again, opt.step()"
                    )
                self._combine_exact()
            return self._base_step()
        _refuse_hidden_accumulation()
        if self._phase != _IDLE:
            raise RuntimeError(
                f"GradReg.step(closure) while a two-phase step was {self._phase}: the pending step was aborted "
                "(θ restored); call step() without a closure to finish a two-phase step"
            )

        self.zero_grad()
        rng = RNGState()
        with torch.enable_grad():
            loss = closure()
        if self.needs_graph:
            self._combine_exact()
            self._base_step()
            return loss
        if not self.active:
            self.observe_g1()  # before anything (a caller's clip) can change g1
        for _ in range(self.extra_passes):
            self.perturb()
            rng.replay()
            with torch.enable_grad():
                closure()
        if self._phase == _PERTURBED:
            self.restore_and_combine()
        self._base_step()
        return loss

    @_aborts_on_error
    def combine(self) -> None:
        """Two-phase loops: after the step's backward pass(es), before your clip and ``step()``, in every step.

        A full GR step: ``restore_and_combine()`` (θ back, ``.grad`` ← GR; the exact estimator's H·v from the
        graph). A step between full steps with ``reuse="orthogonal"``: ``.grad`` ← g1 + the reused correction. Any
        other step (warmup, γ = 0, ``reuse="none"``): records g1's diagnostics. So a clip after it always acts on the
        gradient the base optimizer steps with, and ``g1_norm`` is always taken before it. Idempotent per step.
        """
        if self._phase == _PERTURBED:
            self.restore_and_combine()
        elif self._phase == _IDLE and self.needs_graph:
            self._combine_exact()
        elif self._phase == _IDLE:
            self.observe_g1()
            if self.reusing:
                self._apply_reuse()
            self._phase = _COMBINED

    @torch.no_grad()
    def _apply_reuse(self) -> None:
        gr = [p for p in self._gr_candidates() if p.grad is not None]
        scale = self.strength_factor() / self._reuse_factor  # γ schedules scale the stored correction
        self._metrics.update(self._reuse.apply(gr, scale, shards_for(gr)))

    @torch.no_grad()
    def observe_g1(self) -> None:
        """Record ``g1_norm`` of a step without GR (warmup, γ = 0) from ``.grad`` now. Two-phase loops that clip
        before ``step()`` call it after the backward at θ, so that ``g1_norm`` means the same (before any clip)
        in every step; GR steps record it in ``perturb()``."""
        if self._phase != _IDLE:
            return
        have = [p for p in self._gr_candidates() if p.grad is not None]
        shards = shards_for(have)
        gr = [shards.local(p.grad) for p in have]
        dtype = accum_dtype(gr)
        n1 = global_norm(gr, dtype, shards).to(gr[0].device) if gr else torch.zeros(())
        nan = torch.full_like(n1, float("nan"))
        # Same keys as a GR step, so loggers see one schema: GR changed nothing this step.
        self._metrics = {"g1_norm": n1, "g2_norm": nan, "gr_rel": torch.zeros_like(n1), "perturb_ratio": nan}
        self._observed = self._step

    def _gr_candidates(self) -> list[torch.Tensor]:
        """The parameters GR regularises when active: not excluded, in a group with γ > 0 and GR on."""
        excluded = self._excluded
        return list({
            id(p): p for g in self.param_groups if self._group_gamma(g) != 0.0 for p in g["params"]
            if id(p) not in excluded
        }.values())

    def _base_step(self) -> None:
        """Step the base optimizer, unless a gradient it would step with is not finite (one host read).

        The flag covers every gradient the base optimizer steps with, as it is now (combined, excluded, GR off,
        after the caller's clipping), on every backend and every path: one max-abs pass over the gradients
        (exact in each dtype, so no false alarm from a norm overflowing), reduced on the device.
        """
        try:
            if self._phase == _IDLE and self._observed != self._step:
                self.observe_g1()  # plain step: g1 is what the caller hands us
            if self._phase == _IDLE and self.reusing:
                self._apply_reuse()
            if self.skip_nonfinite:
                have = [p for p in self._parameters() if p.grad is not None]
                finite = _all_finite(have, shards_for(have))
                if self._finite is not None:
                    finite = finite & self._finite.to(finite.device)
                self._skipped = (~finite).long() + (0 if self._skipped is None else self._skipped.to(finite.device))
                if not bool(finite):
                    warnings.warn(
                        f"GradReg: non-finite gradient at step {self._step} (inf/NaN in a gradient the base "
                        "optimizer would step with); the step was skipped and the parameters are unchanged",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    return
            self.optimizer.step()
        finally:
            self._last_factor = self.strength_factor()
            self._step += 1
            self._go_idle()

    # ------------------------------------------------------------------ diagnostics and state
    def metrics(self, sync: bool = True) -> dict[str, Any]:
        """Diagnostics of the last step taken, one meaning per name on every path:

        - ``g1_norm``: ‖g1‖ over the GR parameters (not excluded, GR on, γ > 0), before any clipping;
        - ``g2_norm``: ‖g2‖ over the same parameters before clipping (exact estimator: ‖H·v‖; NaN without GR);
        - ``gr_rel`` = ‖GR − g1‖/‖g1‖ (0 without GR); ``perturb_ratio`` = ‖θ' − θ‖/‖ε·v‖ (NaN without GR);
        - ``skipped``: non-finite steps skipped so far; ``strength``: γ applied in the last step (``strength``
          × warmup/schedule factor, 0 in warmup; groups with their own ``gr_strength`` scale by the same factor);
          ``step``: optimizer steps taken.

        ``sync=False`` returns the device tensors as they are (no host read); ``sync=True`` returns floats.
        """
        out: dict[str, Any] = {k: v for k, v in self._metrics.items() if k != "finite"}
        if self._skipped is not None:
            out["skipped"] = self._skipped
        if sync:
            out = {k: float(v) for k, v in out.items()}
            out.setdefault("skipped", 0.0)
        out["strength"] = self.strength * self._last_factor
        out["step"] = self._step
        return out

    def extra_memory_bytes(self) -> int:
        """Bytes the GR step keeps between perturb() and step() (saved g1, θ, ...), as last allocated."""
        return 0 if self._impl is None else self._impl.extra_bytes()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"grad_reg"``: GR's step counter and skip count."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["grad_reg"] = {
            "step": self._step,
            "skipped": int(self._skipped.sum()) if self._skipped is not None else 0,
            "last_factor": self._last_factor,
        }
        if self.reuse != "none":
            position = {id(p): i for i, p in enumerate(self._parameters())}
            sd["grad_reg"]["reuse"] = self._reuse.state(position)
            sd["grad_reg"]["reuse_factor"] = self._reuse_factor
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``. A pending two-phase step is aborted first (θ restored bitwise)."""
        if self._phase == _PERTURBED:
            warnings.warn("GradReg.load_state_dict() during a perturbed step: the step was aborted and θ restored",
                          RuntimeWarning, stacklevel=2)
        self._abort()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        sd = dict(state_dict)
        gr = sd.pop("grad_reg", None)
        self.optimizer.load_state_dict(sd)
        for group in self.optimizer.param_groups:
            self._check_group(group)
        if gr is not None:
            self._step = int(gr["step"])
            self._skipped = torch.tensor(int(gr["skipped"])) if gr.get("skipped") else None
            self._last_factor = float(gr.get("last_factor", 0.0))
            self._reuse.load(gr.get("reuse"), self._parameters())
            self._reuse_factor = float(gr.get("reuse_factor", 1.0))
        self._impl = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ------------------------------------------------------------------ copy, pickle, torch.save
    def __getstate__(self) -> dict[str, Any]:
        if self._phase != _IDLE:
            raise RuntimeError(
                f"GradReg cannot be copied or pickled while a two-phase step is {self._phase}: finish it with step() "
                "or abort it with restore() first (θ would be saved perturbed)"
            )
        state = {k: v for k, v in self.__dict__.items() if not k.endswith("_hooks")}
        state["_impl"] = None  # device buffers of the last step: rebuilt on demand
        state["_excluded_key"] = None  # tensor ids change in a copy; the positions carry the exclusions
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_untouched": [], **state})
        self._init_hooks()
        self._patch_step_function()


def _refuse_hidden_accumulation() -> None:
    """``step(closure)`` re-evaluates one batch from zeroed gradients: wrong when a host accumulates micro-batches
    and calls the optimizer only on the window's last one. Accelerate's ``AcceleratedOptimizer`` does that under
    ``gradient_accumulation_steps > 1``: found by looking at the callers (a few frames, host only, no sync)."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if type(owner).__module__.startswith("accelerate") and type(owner).__name__ == "AcceleratedOptimizer":
            steps = getattr(getattr(owner, "gradient_state", None), "num_steps", 1)
            if steps > 1:
                raise RuntimeError(
                    f"GradReg.step(closure) under Accelerate's gradient accumulation ({steps} micro-batches): "
                    "Accelerate calls the optimizer on the window's last micro-batch only, so the closure would "
                    "see that micro-batch alone. Use grkernels.integrations.accelerate.GradRegWindow (GR over the "
                    "whole window), or the two-phase API (perturb / combine) after the window's backward passes."
                )
            return
        frame = frame.f_back


def _drop_new_grads(plan: StepPlan) -> None:
    """Parameters without a gradient at θ are left alone: a gradient the perturbed pass gave them is dropped."""
    for p in plan.absent:
        p.grad = None


def _all_finite(params: list[torch.Tensor], shards: Shards) -> torch.Tensor:
    """0-d bool device tensor: every element of every gradient is finite (exact in each dtype), on every process
    that holds a part of them."""
    from grkernels.backends import all_finite  # C++ on CPU where it can, else the reference

    finite = all_finite([shards.local(p.grad) for p in params])
    if shards.sharded:  # every rank must take the same decision
        finite = shards.sum_across((~finite).to(torch.float32)) == 0
    return finite
