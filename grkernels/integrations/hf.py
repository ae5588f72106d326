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
metric is logged twice. GR diagnostics are logged as ``grad_reg/<name>`` by the integrations' one rule
(``grkernels.integrations.common.MetricsLog``: values averaged over the optimizer steps since the last log, the
counters ``step`` and ``skipped`` as they are after the last of them).

Settings: the ``grad_reg_*`` fields are the schema's (``grkernels.settings.SETTINGS`` with the prefix
``grad_reg_``), validated with its messages when the config is built, including what a Trainer cannot run
(``HOST_LIMITS["hf"]``: the exact estimator; under DeepSpeed also ``HOST_LIMITS["deepspeed"]``).

Under DDP the replays of all but the last micro-batch run under ``no_sync`` (as the first pass does), so
both g1 and g2 are all-reduced exactly once per window.

Usage with any Trainer subclass::

    from transformers import Trainer, TrainingArguments
    from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer

    Args = grad_reg_config(TrainingArguments)      # TrainingArguments + the grad_reg_* fields
    GRTrainer = grad_reg_trainer(Trainer)          # or: class GRTrainer(GradRegTrainerMixin, Trainer)
    GRTrainer(model=model, args=Args(output_dir="out", grad_reg_strength="auto"), ...).train()
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
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from grkernels.integrations.common import (
    MetricsLog,
    MicroBatch,
    Window,
    build_grad_reg,
    end_window,
    exclusions,
    host_settings,
    refuse_loss_scaling,
    sync_context,
)
from grkernels.integrations.deepspeed import trainer_grad_reg
from grkernels.optim import GradReg
from grkernels.settings import GRSettings, prefixed_fields

__all__ = [
    "GradRegArguments",
    "GradRegTrainerMixin",
    "grad_reg_config",
    "grad_reg_settings",
    "grad_reg_trainer",
    "register_trainer_mixin",
]

PREFIX = "grad_reg_"

#: The ``grad_reg_*`` fields: the schema's settings (``grkernels.settings.SETTINGS``) with the prefix ``grad_reg_``,
#: their defaults and help; mix into a ``TrainingArguments`` (or TRL config) dataclass. ``HfArgumentParser`` parses
#: each from the command line (``--grad_reg_strength auto``; a clip ``<= 0`` or ``none`` is no clip;
#: ``--grad_reg_exclude none`` is GR on every parameter).
GradRegArguments = dataclasses.make_dataclass(
    "GradRegArguments", prefixed_fields(PREFIX),
    namespace={"__module__": __name__, "__doc__": "The grad_reg_* fields of the GR settings schema (mix into a "
               "TrainingArguments dataclass; see grkernels.settings)."})
_FIELDS = tuple(f.name for f in dataclasses.fields(GradRegArguments))


def _hosts(args: Any) -> tuple[str, ...]:
    """The hosts whose limits apply: a Trainer, and DeepSpeed when the arguments configure it."""
    return ("hf", "deepspeed") if getattr(args, "deepspeed", None) else ("hf",)


def grad_reg_settings(args: Any, overrides: Mapping[str, Any] | None = None,
                      host: str | tuple[str, ...] | None = None) -> GRSettings:
    """The validated GR settings of ``args``' ``grad_reg_*`` fields (missing fields take the schema's defaults),
    with ``overrides`` (keys with or without the ``grad_reg_`` prefix) on top. ``host``: whose limits to check
    (default: a Trainer's, and DeepSpeed's when ``args.deepspeed`` is set)."""
    values = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    for key, value in (overrides or {}).items():
        values[key if key.startswith(PREFIX) else PREFIX + key] = value
    return host_settings(values, host=_hosts(args) if host is None else host, prefix=PREFIX)


class _GradRegMetricsCallback(TrainerCallback):
    """Records ``GradReg.metrics(sync=False)`` after every optimizer step (no host read there)."""

    def __init__(self, trainer: GradRegTrainerMixin) -> None:
        self._trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        gr = self._trainer._grad_reg
        if gr is not None:
            self._trainer._gr_log.record(gr)
        return None


class GradRegTrainerMixin:
    """Gradient regularization for any ``transformers.Trainer`` subclass: put it first in the bases.

    ``class MyTrainer(GradRegTrainerMixin, SomeTrainer)``. Settings come from the ``grad_reg_*`` fields of
    ``args`` (see :data:`GradRegArguments`; missing fields take the schema's defaults) and from the ``grad_reg``
    keyword of ``__init__`` (a dict, which wins); :attr:`grad_reg_config` holds them resolved. ``create_optimizer``
    wraps the Trainer's optimizer (or the one passed in ``optimizers=``) in :class:`grkernels.GradReg` with every
    engine setting; it shares the optimizer's ``param_groups``, so LR schedulers keep working.

    DeepSpeed ZeRO-1/2/3 (any ``gradient_accumulation_steps``): GR runs on the engine's partitions between the
    backward at the accumulation boundary and the engine's step (:mod:`grkernels.integrations.deepspeed`);
    ``grad_reg`` is then that module's object. Refused with a clear error: FSDP through the Trainer, fp16 with a
    gradient scaler (the scaled g1 would set the perturbation), LOMO optimizers, the sub-batch pass under several
    processes or DeepSpeed.
    """

    #: Trainer attributes holding metric/log containers that the replay may append to: they are replaced by
    #: deep copies during the replay and restored afterwards, so nothing is logged twice.
    grad_reg_scratch_attributes: tuple[str, ...] = (
        "_metrics",
        "_pending_metrics",
        "_pending_extra_logs",
        "_textual_logs",
    )

    #: The ``subset_by`` rules this trainer can apply to the sub-batch pass: a generic Trainer replays the window's
    #: first micro-batches (a random subset of shuffled data); trainers with per-sequence advantages add "advantage".
    grad_reg_subset_rules: tuple[str, ...] = ("random",)

    _gr_holding = False  # DeepSpeed: inside hold_step (the engine steps after the GR passes)

    def __init__(self, *args: Any, grad_reg: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        # set before Trainer.__init__: it may call create_optimizer (optimizers=...) or our overrides
        self._grad_reg = None
        self._gr_overrides = dict(grad_reg or {})
        self.grad_reg_config: GRSettings | None = None
        self._gr_window = Window()
        self._gr_capturing = False
        self._gr_replay: MicroBatch | None = None
        self._gr_log = MetricsLog()
        super().__init__(*args, **kwargs)
        cfg = self._grad_reg_settings()
        if cfg.subset_fraction < 1.0 and cfg.subset_by not in self.grad_reg_subset_rules:
            raise ValueError(
                f"GR setting subset_by={cfg.subset_by!r}: not supported by {type(self).__name__}, which replays "
                "the first micro-batches of each window (a random subset of shuffled data) and has no per-sequence "
                f"advantages to order them by; use grad_reg_subset_by in {self.grad_reg_subset_rules}")
        self.add_callback(_GradRegMetricsCallback(self))

    # ------------------------------------------------------------------ optimizer
    @property
    def grad_reg(self):
        """The :class:`grkernels.GradReg` optimizer, or under DeepSpeed its GR object (None before either exists)."""
        return self._grad_reg

    def _grad_reg_settings(self) -> GRSettings:
        """The resolved settings (created on first use: create_optimizer may run inside Trainer.__init__)."""
        if self.grad_reg_config is None:
            hosts = ("hf", "deepspeed") if getattr(self, "is_deepspeed_enabled", False) else _hosts(self.args)
            self.grad_reg_config = grad_reg_settings(self.args, self._gr_overrides, host=hosts)
        return self.grad_reg_config

    def _grad_reg_check_supported(self) -> None:
        acc = getattr(self, "accelerator", None)
        if getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "grkernels GradReg with FSDP/FSDP2 through the Trainer is not supported yet (untested with "
                "sharded DTensor parameters and deferred gradient reduction). Use DDP, DeepSpeed, or a single device."
            )
        if self._grad_reg_settings().subset_fraction < 1.0:
            if getattr(self, "is_deepspeed_enabled", False):
                raise NotImplementedError(
                    "GR setting subset_fraction < 1 (the sub-batch pass) is not offered under DeepSpeed through the "
                    "Trainer; use grad_reg_subset_fraction=1 or grad_reg_every / grad_reg_reuse for cheaper GR")
            if getattr(self.args, "world_size", 1) > 1:
                raise NotImplementedError(
                    "grad_reg_subset_fraction < 1 runs on one process only: under DDP the subset's gradient at "
                    "theta would be this rank's unreduced sum. Use grad_reg_subset_fraction=1, or the two-phase API "
                    "with GradReg.mark_subset (end the subset's backward synchronised)."
                )
        refuse_loss_scaling("a transformers Trainer", bool(getattr(self.args, "fp16", False))
                            or (acc is not None and getattr(acc, "scaler", None) is not None), "Use bf16 (or fp32).")
        if str(getattr(self.args, "optim", "")).lower().endswith("lomo"):
            raise NotImplementedError("grkernels GradReg cannot wrap LOMO optimizers (they step inside backward)")

    def _grad_reg_exclude(self, model: torch.nn.Module) -> list[Any]:
        return exclusions(self._grad_reg_settings(), model)

    def create_optimizer(self, model: torch.nn.Module | None = None):
        """The Trainer's optimizer wrapped in ``GradReg`` (an existing ``GradReg`` is kept as it is)."""
        self._grad_reg_check_supported()
        opt = super().create_optimizer(*(() if model is None else (model,)))
        if getattr(self, "is_deepspeed_enabled", False):
            return opt  # DeepSpeed wraps the plain optimizer; GR runs on its partitions (integrations/deepspeed.py)
        if isinstance(opt, GradReg):
            self._grad_reg = opt
            return opt
        self.optimizer = build_grad_reg(opt, self._grad_reg_settings(), self.model if model is None else model)
        self._grad_reg = self.optimizer
        return self.optimizer

    # ------------------------------------------------------------------ capture
    def _prepare_inputs(self, inputs: Any) -> Any:
        replay = self._gr_replay
        if replay is not None:  # second pass: the captured inputs of the first pass, pinned values added
            return {**replay.inputs, **replay.pinned} if replay.pinned else replay.inputs
        prepared = super()._prepare_inputs(inputs)
        if self._gr_capturing:
            # RNG state after generation (which samples) and right before the forward: replayed at theta'
            self._gr_window.record(inputs, inputs=prepared)
        return prepared

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        gr = self._grad_reg
        if gr is None and getattr(self, "is_deepspeed_enabled", False) and self._gr_replay is None:
            gr = self._grad_reg = trainer_grad_reg(self, self._grad_reg_settings(), self._grad_reg_exclude(self.model))
        if gr is None or self._gr_replay is not None:
            return super().training_step(model, inputs, num_items_in_batch)
        # DeepSpeed steps inside the boundary's backward: hold that step at every boundary (not only full GR steps:
        # the engine's finish also applies a reused correction and votes on finiteness before the real step)
        if hasattr(gr, "hold_step") and not self._gr_holding and self.accelerator.sync_gradients:
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
            self._gr_window.take()  # a failed micro-batch voids the window
            raise
        finally:
            self._gr_capturing = False
        if gr.active:
            if len(self._gr_window) != n_before + 1:
                self._gr_window.take()
                raise RuntimeError(
                    f"{type(self).__name__}: expected training_step to call _prepare_inputs exactly once per "
                    "micro-batch (GR replays the prepared inputs); this Trainer subclass does not."
                )
            self._gr_window.items[-1].kwargs["num_items_in_batch"] = num_items_in_batch
            subset = self._grad_reg_subset_size()
            if subset < self.args.gradient_accumulation_steps and len(self._gr_window) == subset:
                gr.mark_subset(subset / self.args.gradient_accumulation_steps)
        if self.accelerator.sync_gradients:  # last micro-batch of the accumulation window
            window = self._gr_window.take()
            if gr.active and getattr(gr, "subset_fraction", None) is not None:  # replay the subset only
                gr.subset_fraction = self._grad_reg_subset_share(window, self._grad_reg_subset_size())
                window = window[: self._grad_reg_subset_size()]
            # the pass(es) at θ' (or the exact / reused correction, or g1's diagnostics): before the Trainer's clip
            self._grad_reg_end_window(model, window)
        return loss

    def _grad_reg_subset_share(self, window: list[MicroBatch], subset: int) -> float:
        """The share f of the window that the first ``subset`` micro-batches stand for, in the sub-batch estimate
        g2 ≈ g1 + (g2_S − g1_S)/f: their count share (the window's micro-batches are a random split). Host
        integrations that order the window override it (e.g. by the share of a per-sequence score)."""
        return subset / len(window)

    def _grad_reg_subset_size(self) -> int:
        """Micro-batches of each window the second pass replays (``grad_reg_subset_fraction``)."""
        n = self.args.gradient_accumulation_steps
        f = self._grad_reg_settings().subset_fraction
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

    def _grad_reg_end_window(self, model: torch.nn.Module, window: list[MicroBatch]) -> None:
        stock_step = super().training_step

        def replay_one(entry: MicroBatch, last: bool) -> None:
            self._gr_replay = entry
            try:
                with sync_context(self.accelerator, model, last):
                    stock_step(model, *entry.args, **entry.kwargs)
            finally:
                self._gr_replay = None

        end_window(self._grad_reg, window, replay_one, guard=self._grad_reg_replay_guard)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if len(self._gr_log) and not any(k.startswith("eval_") for k in logs):
            logs.update({f"grad_reg/{k}": v for k, v in self._gr_log.flush().items()})
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


class GradRegConfigMixin:
    """What every config with the ``grad_reg_*`` fields does (the classes :func:`grad_reg_config` makes, and the
    ready configs of the host modules):

    - validates them with the schema when the config is built (:meth:`grad_reg_validate`, from ``__post_init__``)
      and writes back the parsed values (``"1e-3"`` → 0.001, a clip ``<= 0`` → None, ``exclude`` "none" → []);
    - refuses to be handed to a Trainer that is not a GR trainer while GR is on (``grad_reg_strength`` ≠ 0): the
      plain Trainer would train without GR and ignore every ``grad_reg_*`` field. The check runs when
      ``Trainer.__init__`` asks the arguments for its log level (``get_process_log_level``), so no Trainer class is
      patched. The message names :attr:`grad_reg_trainer_hint` (a host's ready GR trainer), else
      ``grad_reg_trainer(<the trainer>)``."""

    #: The GR trainer to name when this config reaches a trainer without GR (set by a host's ready config).
    grad_reg_trainer_hint: str | None = None

    def grad_reg_validate(self) -> GRSettings:
        settings = grad_reg_settings(self)
        for name in _FIELDS:  # the parsed values (the command line gives strings for "auto" fields and clips)
            object.__setattr__(self, name, settings.values[name[len(PREFIX):]])
        return settings

    def get_process_log_level(self) -> int:
        level = super().get_process_log_level()
        caller = sys._getframe(1).f_locals.get("self")
        if (isinstance(caller, Trainer) and not isinstance(caller, GradRegTrainerMixin)
                and getattr(self, PREFIX + "strength", 0.0) != 0.0):
            name = type(caller).__name__
            fix = self.grad_reg_trainer_hint or f"grkernels.integrations.hf.grad_reg_trainer({name})"
            raise TypeError(
                f"{name} got a {type(self).__name__} with grad_reg_strength={getattr(self, PREFIX + 'strength')!r}, "
                f"but {name} is not a GR trainer: it would train without GR and ignore every grad_reg_* field. Use "
                f"{fix} (or set grad_reg_strength=0).")
        return level


class _PicklableConfig(GradRegConfigMixin):
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

    E.g. ``grad_reg_config(TrainingArguments)(output_dir="out", grad_reg_strength="auto")``; parsable by
    ``HfArgumentParser``; instances pickle (and ``torch.save``) in any process as long as ``config_cls`` is
    importable. The result is cached per class.
    """

    def __post_init__(self) -> None:
        config_cls.__post_init__(self)
        self.grad_reg_validate()  # raises on bad values, with the schema's messages

    name = f"GradReg{config_cls.__name__}"
    cls = type(name, (_PicklableConfig, config_cls, GradRegArguments),
               {"__post_init__": __post_init__, "__module__": __name__, "__qualname__": name,
                "_grad_reg_base": config_cls})
    cls = dataclasses.dataclass(cls)
    if name not in globals():  # the class itself pickles by name in this process (the first one of that name)
        globals()[name] = cls
    return cls
