"""Gradient regularization inside any ``transformers.Trainer``: :class:`GradRegTrainerMixin`.

A Trainer runs forward/backward itself and calls ``optimizer.step()`` with no closure, so an optimizer
alone never sees the batch and cannot evaluate the loss at the perturbed point θ'. The mixin therefore owns
``training_step``:

1. every micro-batch of an accumulation window runs through the stock ``training_step`` (the subclass's
   own one included), so ``.grad`` accumulates ``g1 = ∇L(θ)`` with the Trainer's loss scaling; the prepared
   inputs (the output of ``_prepare_inputs``) and the RNG state before each forward are captured;
2. on the last micro-batch of the window (``accelerator.sync_gradients``), after its first pass:
   ``GradReg.perturb()`` (θ' = θ + ε·clip(g1) on the GR parameters), every captured micro-batch is replayed
   through the same stock ``training_step`` with its RNG state (same dropout masks), then
   ``GradReg.restore_and_combine()`` puts θ back bitwise and writes ``g1 + (γ/ε)(g2 − g1)`` into ``.grad``
   (excluded parameters keep g1);
3. the Trainer then clips the combined gradient (``max_grad_norm``) and calls ``optimizer.step()``, which
   only steps the base optimizer.

The replay must not change trainer state: the attribute bindings of the trainer are restored after the
replay (step counters, entropy controllers, buffers ...) and the metric containers named in
:attr:`GradRegTrainerMixin.grad_reg_scratch_attributes` are replaced by throw-away copies during it, so no
metric is logged twice. GR diagnostics (``GradReg.metrics()``) are averaged over the logging interval and
logged as ``grad_reg/<name>``.

Under DDP the replays of all but the last micro-batch run under ``no_sync`` (as the first pass does), so
both g1 and g2 are all-reduced exactly once per window.

Usage with any Trainer subclass::

    from transformers import Trainer, TrainingArguments
    from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer

    Args = grad_reg_config(TrainingArguments)      # TrainingArguments + the grad_reg_* fields
    GRTrainer = grad_reg_trainer(Trainer)          # or: class GRTrainer(GradRegTrainerMixin, Trainer)
    GRTrainer(model=model, args=Args(output_dir="out", grad_reg_strength=1e-3), ...).train()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from grkernels.integrations.window import accelerate_sync_context, replay_window
from grkernels.rng import RNGState

__all__ = [
    "GradRegArguments",
    "GradRegTrainerMixin",
    "grad_reg_config",
    "grad_reg_settings",
    "grad_reg_trainer",
    "register_trainer_mixin",
]


@dataclass
class GradRegArguments:
    """The ``grad_reg_*`` fields: mix into a ``TrainingArguments`` (or TRL config) dataclass.

    Parsed from the command line by ``HfArgumentParser`` like every other field. A clip norm ``<= 0``
    disables that clip (the command line cannot express ``None``).
    """

    grad_reg_strength: float = field(
        default=1e-3,
        metadata={"help": "GR strength gamma: the gradient is g1 + (gamma/eps)(g2 - g1) ~ grad L + gamma*H*g1. "
                  "0 disables GR (no second pass)."},
    )
    grad_reg_eps: float = field(
        default=1e-3,
        metadata={"help": "Finite-difference step epsilon: theta' = theta + eps * clip(g1) (not normalised)."},
    )
    grad_reg_g1_clip: float | None = field(
        default=10.0, metadata={"help": "Max norm of g1 for the perturbation (<= 0 or None: no clip)."}
    )
    grad_reg_g2_clip: float | None = field(
        default=10.0, metadata={"help": "Max norm of g2 (<= 0 or None: no clip)."}
    )
    grad_reg_exclude: list[str] | None = field(
        default=None,
        metadata={"help": "Parameter-name substrings left out of GR (they get the plain gradient g1). "
                  "Default: the input/position embeddings and the output head, as in the paper. "
                  "Pass 'none' to apply GR to every parameter."},
    )
    grad_reg_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps without GR (no second pass) before GR starts."}
    )
    grad_reg_estimator: str = field(
        default="forward", metadata={"help": "GR estimator: 'forward' (paper), 'central' or 'exact'."}
    )
    grad_reg_eps_mode: str = field(
        default="absolute",
        metadata={"help": "'absolute' (paper: theta' = theta + eps*clip(g1)) or 'radius' (theta' = theta + "
                  "eps*v/|v|: a perturbation of norm eps whatever the gradient scale; see BENCHMARKS.md)."},
    )
    grad_reg_every: int = field(
        default=1, metadata={"help": "Run the full GR step (the second pass) on every k-th optimizer step only."}
    )
    grad_reg_reuse: str = field(
        default="none",
        metadata={"help": "Between full GR steps: 'none' (plain gradient) or 'orthogonal' (reuse the last "
                  "correction, orthogonal to the current gradient, rescaled; LookSAM-style)."},
    )
    grad_reg_subset_fraction: float = field(
        default=1.0,
        metadata={"help": "Sub-batch GR: the second pass replays only the first ceil(f*n) of the n micro-batches "
                  "of each accumulation window (a random subset: batches are shuffled, unless the host integration "
                  "orders them). 1: all. Single process."},
    )


_FIELDS = tuple(f.name for f in dataclasses.fields(GradRegArguments))


def _clip_value(v: float | None) -> float | None:
    return None if v is None or v <= 0 else float(v)


def grad_reg_settings(args: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve the ``grad_reg_*`` settings from ``args`` (missing fields take the defaults) and ``overrides``.

    Returns a dict keyed by the :class:`GradRegArguments` field names, validated.
    """
    defaults = GradRegArguments()
    out = {name: getattr(args, name, getattr(defaults, name)) for name in _FIELDS}
    for k, v in (overrides or {}).items():
        key = k if k.startswith("grad_reg_") else f"grad_reg_{k}"
        if key not in out:
            raise TypeError(f"unknown GradReg setting {k!r}; known: {', '.join(_FIELDS)}")
        out[key] = v
    s, e = float(out["grad_reg_strength"]), float(out["grad_reg_eps"])
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"grad_reg_strength must be a finite number >= 0, got {s}")
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"grad_reg_eps must be a finite number > 0, got {e}")
    if out["grad_reg_eps_mode"] not in ("absolute", "radius"):
        raise ValueError(f"grad_reg_eps_mode must be 'absolute' or 'radius', got {out['grad_reg_eps_mode']!r}")
    if int(out["grad_reg_every"]) < 1:
        raise ValueError(f"grad_reg_every must be >= 1, got {out['grad_reg_every']}")
    if out["grad_reg_reuse"] not in ("none", "orthogonal"):
        raise ValueError(f"grad_reg_reuse must be 'none' or 'orthogonal', got {out['grad_reg_reuse']!r}")
    if not 0.0 < float(out["grad_reg_subset_fraction"]) <= 1.0:
        raise ValueError(f"grad_reg_subset_fraction must be in (0, 1], got {out['grad_reg_subset_fraction']}")
    if float(out["grad_reg_subset_fraction"]) < 1.0 and out["grad_reg_estimator"] == "exact":
        raise ValueError("grad_reg_subset_fraction < 1 needs a finite-difference estimator (forward or central)")
    if int(out["grad_reg_warmup_steps"]) < 0:
        raise ValueError(f"grad_reg_warmup_steps must be >= 0, got {out['grad_reg_warmup_steps']}")
    out["grad_reg_g1_clip"] = _clip_value(out["grad_reg_g1_clip"])
    out["grad_reg_g2_clip"] = _clip_value(out["grad_reg_g2_clip"])
    ex = out["grad_reg_exclude"]
    if isinstance(ex, str):
        ex = [ex]
    out["grad_reg_exclude"] = None if ex is None else list(ex)
    return out


@dataclass
class _Captured:
    """One micro-batch of the current accumulation window, as the first pass saw it."""

    raw: Any  # what the training loop passed to training_step
    prepared: Any  # what _prepare_inputs returned (what compute_loss saw)
    rng: RNGState  # RNG state right before compute_loss
    num_items_in_batch: Any = None
    pinned: dict[str, Any] = dataclasses.field(default_factory=dict)  # input keys added for the replay
    aux: dict[str, Any] = dataclasses.field(default_factory=dict)  # other first-pass values a subclass pins


class _GradRegMetricsCallback(TrainerCallback):
    """Collects ``GradReg.metrics(sync=False)`` after every optimizer step (no host sync there)."""

    def __init__(self, trainer: GradRegTrainerMixin) -> None:
        self._trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        gr = self._trainer._grad_reg
        if gr is not None:  # copies: a backend may reuse its metric buffers in the next step
            m = gr.metrics(sync=False)
            self._trainer._gr_metrics.append(
                {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in m.items()}
            )
        return None


class GradRegTrainerMixin:
    """Gradient regularization for any ``transformers.Trainer`` subclass: put it first in the bases.

    ``class MyTrainer(GradRegTrainerMixin, SomeTrainer)``. Settings come from the ``grad_reg_*`` fields of
    ``args`` (see :class:`GradRegArguments`; missing fields take its defaults) and from the ``grad_reg``
    keyword of ``__init__`` (a dict, which wins). ``create_optimizer`` wraps the Trainer's optimizer (or the one
    passed in ``optimizers=``) in :class:`grkernels.GradReg`, which shares its ``param_groups`` so LR schedulers
    keep working.

    DeepSpeed ZeRO-1/2/3 (any ``gradient_accumulation_steps``): GR runs on the engine's partitions between the
    backward at the accumulation boundary and the engine's step (:mod:`grkernels.integrations.deepspeed`);
    ``grad_reg`` is then a ``DeepSpeedGR``. Not supported yet (a clear error is raised): FSDP through the Trainer,
    fp16 with a gradient scaler (the scaled g1 would set the perturbation), LOMO optimizers.
    """

    #: Trainer attributes holding metric/log containers that the replay may append to: they are replaced by
    #: deep copies during the replay and restored afterwards, so nothing is logged twice.
    grad_reg_scratch_attributes: tuple[str, ...] = (
        "_metrics",
        "_pending_metrics",
        "_pending_extra_logs",
        "_textual_logs",
    )

    def __init__(self, *args: Any, grad_reg: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # set before Trainer.__init__: it may call create_optimizer (optimizers=...) or our overrides
        self._grad_reg = None
        self._gr_overrides = dict(grad_reg or {})
        self._gr_window: list[_Captured] = []
        self._gr_capturing = False
        self._gr_replay: _Captured | None = None
        self._gr_metrics: list[dict[str, torch.Tensor]] = []
        super().__init__(*args, **kwargs)
        self.grad_reg_config = grad_reg_settings(self.args, self._gr_overrides)
        self.add_callback(_GradRegMetricsCallback(self))

    # ------------------------------------------------------------------ optimizer
    @property
    def grad_reg(self):
        """The :class:`grkernels.GradReg` optimizer (``None`` before the optimizer is created)."""
        return self._grad_reg

    def _grad_reg_check_supported(self) -> None:
        acc = getattr(self, "accelerator", None)
        if getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "grkernels GradReg with FSDP/FSDP2 through the Trainer is not supported yet (untested with "
                "sharded DTensor parameters and deferred gradient reduction). Use DDP (or a single device)."
            )
        if float(self.grad_reg_settings_for_optimizer()["grad_reg_subset_fraction"]) < 1.0 and (
            getattr(self.args, "world_size", 1) > 1
        ):
            raise NotImplementedError(
                "grad_reg_subset_fraction < 1 runs on one process only: under DDP the subset's gradient at theta "
                "would be this rank's unreduced sum. Use grad_reg_subset_fraction=1, or the two-phase API with "
                "GradReg.mark_subset (end the subset's backward synchronised)."
            )
        if getattr(self.args, "fp16", False) or (acc is not None and getattr(acc, "scaler", None) is not None):
            raise NotImplementedError(
                "grkernels GradReg does not support fp16 with a gradient scaler: g1 would be the scaled "
                "gradient and set a wrong perturbation. Use bf16 (or fp32)."
            )
        if str(getattr(self.args, "optim", "")).lower().endswith("lomo"):
            raise NotImplementedError("grkernels GradReg cannot wrap LOMO optimizers (they step inside backward)")

    def _grad_reg_exclude(self, model: torch.nn.Module) -> list[Any]:
        ex = self.grad_reg_config["grad_reg_exclude"]
        if ex is None:
            from grkernels import paper_exclude

            return list(paper_exclude(model))
        if [e.lower() for e in ex] == ["none"]:
            return []
        return list(ex)

    def create_optimizer(self, model: torch.nn.Module | None = None):
        """The Trainer's optimizer wrapped in ``GradReg`` (an existing ``GradReg`` is kept as it is)."""
        from grkernels import GradReg

        self._grad_reg_check_supported()
        opt = super().create_optimizer(*(() if model is None else (model,)))
        if getattr(self, "is_deepspeed_enabled", False):
            return opt  # DeepSpeed wraps the plain optimizer; GR runs on its partitions (integrations/deepspeed.py)
        if isinstance(opt, GradReg):
            self._grad_reg = opt
            return opt
        cfg = self.grad_reg_settings_for_optimizer()
        opt_model = self.model if model is None else model
        self.optimizer = GradReg(
            opt,
            strength=cfg["grad_reg_strength"],
            eps=cfg["grad_reg_eps"],
            g1_clip=cfg["grad_reg_g1_clip"],
            g2_clip=cfg["grad_reg_g2_clip"],
            exclude=self._grad_reg_exclude(opt_model),
            named_parameters=list(opt_model.named_parameters()),
            warmup_steps=int(cfg["grad_reg_warmup_steps"]),
            estimator=cfg["grad_reg_estimator"],
            eps_mode=cfg["grad_reg_eps_mode"],
            every=int(cfg["grad_reg_every"]),
            reuse=cfg["grad_reg_reuse"],
        )
        self._grad_reg = self.optimizer
        return self.optimizer

    def grad_reg_settings_for_optimizer(self) -> dict[str, Any]:
        # create_optimizer may run inside Trainer.__init__ (before grad_reg_config is set)
        cfg = getattr(self, "grad_reg_config", None)
        if cfg is None:
            cfg = self.grad_reg_config = grad_reg_settings(self.args, self._gr_overrides)
        return cfg

    # ------------------------------------------------------------------ capture
    def _prepare_inputs(self, inputs: Any) -> Any:
        replay = self._gr_replay
        if replay is not None:  # second pass: the captured inputs of the first pass, pinned values added
            return {**replay.prepared, **replay.pinned} if replay.pinned else replay.prepared
        prepared = super()._prepare_inputs(inputs)
        if self._gr_capturing:
            # RNG state after generation (which samples) and right before the forward: replayed at theta'
            self._gr_window.append(_Captured(raw=inputs, prepared=prepared, rng=RNGState()))
        return prepared

    _gr_holding = False  # DeepSpeed: inside DeepSpeedGR.hold_step (the engine steps after the GR passes)

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        gr = self._grad_reg
        if gr is None and getattr(self, "is_deepspeed_enabled", False) and self._gr_replay is None:
            from grkernels.integrations.deepspeed import trainer_grad_reg

            cfg = self.grad_reg_settings_for_optimizer()
            gr = self._grad_reg = trainer_grad_reg(self, cfg, self._grad_reg_exclude(self.model))
        if gr is None or self._gr_replay is not None:
            return super().training_step(model, inputs, num_items_in_batch)
        if hasattr(gr, "hold_step") and not self._gr_holding and gr.active and self.accelerator.sync_gradients:
            self._gr_holding = True
            try:
                with gr.hold_step():
                    return self.training_step(model, inputs, num_items_in_batch)
            finally:
                self._gr_holding = False
        n_before = len(self._gr_window)
        self._gr_capturing = gr.active
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._gr_window.clear()  # a failed micro-batch voids the window
            raise
        finally:
            self._gr_capturing = False
        if gr.active:
            if len(self._gr_window) != n_before + 1:
                self._gr_window.clear()
                raise RuntimeError(
                    f"{type(self).__name__}: expected training_step to call _prepare_inputs exactly once per "
                    "micro-batch (GR replays the prepared inputs); this Trainer subclass does not."
                )
            self._gr_window[-1].num_items_in_batch = num_items_in_batch
            subset = self._grad_reg_subset_size()
            if subset < self.args.gradient_accumulation_steps and len(self._gr_window) == subset:
                gr.mark_subset(subset / self.args.gradient_accumulation_steps)
        if self.accelerator.sync_gradients:  # last micro-batch of the accumulation window
            window, self._gr_window = self._gr_window, []
            if gr.active and window:
                if getattr(gr, "subset_fraction", None) is not None:  # replay the subset (a short window: its share)
                    gr.subset_fraction = self._grad_reg_subset_share(window, self._grad_reg_subset_size())
                    window = window[: self._grad_reg_subset_size()]
                self._grad_reg_second_pass(model, window)
            elif hasattr(gr, "combine"):  # warmup / between full steps: g1 diagnostics, reused correction, pre-clip
                gr.combine()
        return loss

    def _grad_reg_subset_share(self, window: list[_Captured], subset: int) -> float:
        """The share f of the window that the first ``subset`` micro-batches stand for, in the sub-batch estimate
        g2 ≈ g1 + (g2_S − g1_S)/f: their count share (the window's micro-batches are a random split). Host
        integrations that order the window override it (e.g. by the share of a per-sequence score)."""
        return subset / len(window)

    def _grad_reg_subset_size(self) -> int:
        """Micro-batches of each window the second pass replays (``grad_reg_subset_fraction``)."""
        n = self.args.gradient_accumulation_steps
        f = float(self.grad_reg_settings_for_optimizer()["grad_reg_subset_fraction"])
        return n if f >= 1.0 else max(1, math.ceil(f * n))

    # ------------------------------------------------------------------ replay
    @contextlib.contextmanager
    def _grad_reg_replay_guard(self) -> Iterator[None]:
        """Undo every trainer-state change the replay makes (see the class docstring)."""
        saved = dict(self.__dict__)
        for name in self.grad_reg_scratch_attributes:
            if name in saved:
                self.__dict__[name] = copy.deepcopy(saved[name])
        try:
            yield
        finally:
            for name in [k for k in self.__dict__ if k not in saved]:
                del self.__dict__[name]
            self.__dict__.update(saved)

    def _grad_reg_sync_context(self, model: torch.nn.Module, last: bool):
        if getattr(self, "is_deepspeed_enabled", False):  # the engine reduces per its boundary mark, not no_sync
            from grkernels.integrations.deepspeed import accumulation_boundary

            return accumulation_boundary(self.accelerator, last)
        return accelerate_sync_context(self.accelerator, model, last)

    def _grad_reg_second_pass(self, model: torch.nn.Module, window: list[_Captured]) -> None:
        stock_step = super().training_step

        def replay_one(entry: _Captured, last: bool) -> None:
            self._gr_replay = entry
            try:
                with self._grad_reg_sync_context(model, last=last):
                    stock_step(model, entry.raw, entry.num_items_in_batch)
            finally:
                self._gr_replay = None

        replay_window(self._grad_reg, window, replay_one, guard=self._grad_reg_replay_guard)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._gr_metrics and not any(k.startswith("eval_") for k in logs):
            collected, self._gr_metrics = self._gr_metrics, []
            keys = collected[-1].keys()
            for k in keys:
                vals = [m[k] for m in collected if k in m]
                if k in ("skipped", "step"):  # counters: report the latest value
                    logs[f"grad_reg/{k}"] = float(vals[-1])
                else:
                    logs[f"grad_reg/{k}"] = float(torch.stack([torch.as_tensor(v).float() for v in vals]).mean())
        return super().log(logs, *args, **kwargs)


#: Host-specific mixins, ``(host base class, mixin)``: ``grad_reg_trainer`` puts each mixin whose base is in the
#: trainer's MRO before :class:`GradRegTrainerMixin`. Integration modules add theirs with
#: :func:`register_trainer_mixin` (``grkernels.integrations.trl`` registers the GRPO pinning).
_TRAINER_MIXINS: list[tuple[type, type]] = []


def register_trainer_mixin(base: type, mixin: type) -> None:
    """Make :func:`grad_reg_trainer` add ``mixin`` (before :class:`GradRegTrainerMixin`) to subclasses of ``base``.

    For loss-specific pinning that the generic replay cannot know (values of the first pass that the loss
    reads back detached, e.g. "old" log-probs).
    """
    if (base, mixin) not in _TRAINER_MIXINS:
        _TRAINER_MIXINS.append((base, mixin))
        _grad_reg_trainer.cache_clear()


def _load_host_integrations(trainer_cls: type) -> None:
    """Import ``grkernels.integrations.<pkg>`` for each top-level package ``pkg`` in the trainer's MRO, where
    such a module exists: it registers its mixins (the generic layer names no host)."""
    for pkg in {c.__module__.partition(".")[0] for c in trainer_cls.__mro__}:
        name = f"{__package__}.{pkg}"
        if name == __name__ or name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            importlib.import_module(name)


def grad_reg_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` with gradient regularization: ``GradRegTrainerMixin`` first in its bases.

    Mixins registered for a base of ``trainer_cls`` (:func:`register_trainer_mixin`) come before it; the
    integration module of the trainer's package (``grkernels.integrations.<package>``) is imported first so that
    its mixins are registered. Cached per class.
    """
    _load_host_integrations(trainer_cls)
    return _grad_reg_trainer(trainer_cls)


@functools.cache
def _grad_reg_trainer(trainer_cls: type) -> type:
    mixins = tuple(m for b, m in _TRAINER_MIXINS if issubclass(trainer_cls, b) and not issubclass(trainer_cls, m))
    bases: tuple[type, ...] = (*mixins, GradRegTrainerMixin, trainer_cls)
    return type(f"GradReg{trainer_cls.__name__}", bases, {"__module__": trainer_cls.__module__})


class _PicklableConfig:
    """Base of the classes :func:`grad_reg_config` makes. Such a class is made at run time, so pickle cannot
    find it by name; an instance pickles as "``grad_reg_config(<its importable base>)``, then its fields", which
    works in any process (Trainer checkpoints ``torch.save`` the arguments)."""

    _grad_reg_base: type

    def __reduce__(self) -> tuple[Any, ...]:
        return _new_config, (type(self)._grad_reg_base,), dict(self.__dict__)


def _new_config(config_cls: type) -> Any:
    """An empty instance of ``grad_reg_config(config_cls)`` (unpickling fills its fields)."""
    cls = grad_reg_config(config_cls)
    return cls.__new__(cls)


@functools.cache
def grad_reg_config(config_cls: type) -> type:
    """``config_cls`` (a ``TrainingArguments`` dataclass) plus the ``grad_reg_*`` fields, validated on init.

    E.g. ``grad_reg_config(TrainingArguments)(output_dir="out", grad_reg_strength=1e-3)``; parsable by
    ``HfArgumentParser``; instances pickle (and ``torch.save``) in any process as long as ``config_cls`` is
    importable. The result is cached per class.
    """

    def __post_init__(self) -> None:
        config_cls.__post_init__(self)
        grad_reg_settings(self)  # raises on bad values

    name = f"GradReg{config_cls.__name__}"
    cls = type(name, (config_cls, GradRegArguments, _PicklableConfig),
               {"__post_init__": __post_init__, "__module__": __name__, "__qualname__": name,
                "_grad_reg_base": config_cls})
    cls = dataclass(cls)
    if name not in globals():  # the class itself pickles by name in this process (the first one of that name)
        globals()[name] = cls
    return cls
