"""What the host integrations share, once. Each host module (:mod:`.hf`, :mod:`.trl`, :mod:`.lightning`,
:mod:`.accelerate`, :mod:`.verl`) is this plus the host's own hooks.

- **Settings** (:func:`host_settings`, :func:`build_grad_reg`): a host's GR settings are the schema's
  (``grkernels.settings``), validated by ``resolve(..., host=...)`` when its config is built; the ``GradReg`` a host
  builds gets every engine setting, and ``exclude`` None means the paper's exclusion
  (:func:`grkernels.params.paper_exclude`).
- **The micro-batch record and the RNG replay** (:class:`MicroBatch`, :class:`Window`, :func:`end_window`): a host
  that owns the step records each micro-batch of an accumulation window at θ with the RNG state before its
  forward; at the window's end the pass(es) at θ' replay every micro-batch with its RNG state (same dropout
  masks), then GR combines. Either the integration replays the records itself (:func:`end_window`, Trainer /
  Lightning / Accelerate), or the host's own loop runs the micro-batches again and calls
  :meth:`Window.at_micro_batch` before each (verl).
- **The fp16 refusal** (:func:`refuse_loss_scaling`): one message for every host.
- **Metric logging with one averaging rule** (:class:`MetricsLog`): what a host logs as ``grad_reg/<name>`` is, for
  a measured value (``g1_norm``, ``g2_norm``, ``gr_rel``, ``perturb_ratio``, ``reuse_cos``, ``strength``), its mean
  over the optimizer steps since the previous log that measured it (a NaN, e.g. ``g2_norm`` on a step without a
  pass at θ', is "not measured"), and for a counter (``step``, ``skipped``) its value after the last of those steps.
- **The gradient-sync switch of a replay** (:func:`sync_context`): the replayed micro-batches reduce their gradient
  exactly where the first pass did (DDP ``no_sync`` / DeepSpeed's accumulation-boundary mark).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grkernels.integrations.deepspeed import accumulation_boundary
from grkernels.optim import GradReg
from grkernels.params import paper_exclude
from grkernels.rng import RNGState
from grkernels.settings import GRSettings, resolve

__all__ = [
    "COUNTERS",
    "MetricsLog",
    "MicroBatch",
    "Window",
    "build_grad_reg",
    "end_window",
    "exclusions",
    "host_settings",
    "refuse_loss_scaling",
    "refuse_subset",
    "replay_window",
    "sync_context",
]


# ---------------------------------------------------------------------------------------------------- settings
def host_settings(values: Mapping[str, Any] | GRSettings | None, *, host: str | Sequence[str] | None = None,
                  prefix: str = "") -> GRSettings:
    """The schema's validated settings from ``values`` (setting names, with or without ``prefix``; missing ones
    take the schema's defaults), checked against what each of ``host`` cannot run
    (``grkernels.settings.HOST_LIMITS``). Raises the schema's ValueError / TypeError naming the bad value."""
    if isinstance(values, GRSettings):
        values = values.values
    hosts = [host] if host is None or isinstance(host, str) else list(host)
    settings = resolve(values, host=hosts[0], prefix=prefix)
    for other in hosts[1:]:
        resolve(settings.values, host=other)
    return settings


def refuse_subset(settings: GRSettings, host: str) -> None:
    """Hosts whose helper replays whole windows only: a sub-batch setting would be ignored, so it is refused."""
    if settings.subset_fraction < 1.0:
        raise ValueError(
            f"GR setting subset_fraction={settings.subset_fraction}: not supported under {host}: its helper replays "
            "whole accumulation windows; use subset_fraction=1 (or every / reuse for a cheaper GR), or the "
            "two-phase API with GradReg.mark_subset")


def exclusions(settings: GRSettings, module: torch.nn.Module) -> list[torch.Tensor | str]:
    """What ``GradReg(exclude=...)`` gets from the ``exclude`` setting: None → the paper's (embeddings and output
    head of ``module``), ``[]`` → nothing, else the name substrings."""
    if settings.exclude is None:
        return list(paper_exclude(module))
    return list(settings.exclude)


def build_grad_reg(optimizer: torch.optim.Optimizer, settings: GRSettings, module: torch.nn.Module) -> GradReg:
    """``GradReg`` around ``optimizer`` with every engine setting of ``settings`` and its exclusions resolved on
    ``module`` (whose parameters the optimizer steps)."""
    return GradReg(optimizer, exclude=exclusions(settings, module), named_parameters=list(module.named_parameters()),
                   **settings.as_dict("engine"))


# ---------------------------------------------------------------------------------------------------- fp16
def refuse_loss_scaling(host: str, scaled: bool, fix: str) -> None:
    """Raise NotImplementedError when ``scaled`` (the host trains in fp16 with a loss scaler): g1 would be the
    scaled gradient and set a perturbation ``scale`` times too large, and the scaler would unscale ``.grad`` in the
    middle of the GR step. ``fix`` says what to set instead (bf16 needs no scaler)."""
    if scaled:
        raise NotImplementedError(
            f"GR under {host}: fp16 with a loss scaler is not supported: g1 would be the scaled gradient and set the "
            f"perturbation, and the scaler unscales the gradient in the middle of the GR step. {fix}")


# ---------------------------------------------------------------------------------------------------- micro-batches
@dataclass
class MicroBatch:
    """One micro-batch of an accumulation window, as the pass at θ saw it.

    ``rng`` is the RNG state right before its forward (replayed before its forward at θ'); ``args``/``kwargs`` how
    the host called its step on it; ``inputs`` what the loss saw when the host transforms ``args`` first (the
    Trainer's ``_prepare_inputs``); ``pinned``: first-pass values handed to the replay as extra inputs (TRL's old
    log-probs at θ); ``aux``: other first-pass values a host reuses at θ' (TRL's entropy mask)."""

    rng: RNGState
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None
    pinned: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, Any] = field(default_factory=dict)


class Window:
    """The micro-batches of the current accumulation window, and the cursor of a replay driven by the host's loop.

    Recording: :meth:`record` (or :meth:`at_micro_batch` outside a replay) appends a :class:`MicroBatch` with the RNG
    state now. Replaying from the host's own loop: :meth:`rewind` (the first ``count`` micro-batches), then
    :meth:`at_micro_batch` before each micro-batch's forward sets the RNG to the recorded state, in order, and
    :meth:`check_complete` after the pass."""

    def __init__(self) -> None:
        self.items: list[MicroBatch] = []
        self.replaying = False
        self.index = 0
        self.expected = 0

    def __len__(self) -> int:
        return len(self.items)

    def record(self, *args: Any, **payload: Any) -> MicroBatch:
        """A new record with the RNG state now (call it right before the micro-batch's forward)."""
        item = MicroBatch(RNGState(), args, **payload)
        self.items.append(item)
        return item

    def take(self) -> list[MicroBatch]:
        """The window's records; the window starts empty again."""
        items, self.items = self.items, []
        self.replaying, self.index, self.expected = False, 0, 0
        return items

    def at_micro_batch(self) -> None:
        """Before a micro-batch's forward: record its RNG state (pass at θ), or replay the recorded one (at θ')."""
        if not self.replaying:
            self.record()
            return
        if self.index >= self.expected:
            raise RuntimeError(f"GR: the pass at θ' ran more micro-batches than the {self.expected} recorded for it "
                               "in the pass at θ; the micro-batch split must not depend on the parameters")
        self.items[self.index].rng.replay()
        self.index += 1

    def rewind(self, count: int | None = None) -> None:
        """Start a replay from the first micro-batch; it runs the first ``count`` (default: all) again."""
        self.replaying, self.index = True, 0
        self.expected = len(self.items) if count is None else count

    def check_complete(self) -> None:
        if self.index != self.expected:
            raise RuntimeError(f"GR: the pass at θ' ran {self.index} micro-batches, the pass at θ {self.expected}")


def replay_window(gr: Any, window: Sequence[MicroBatch], replay_one: Callable[[MicroBatch, bool], Any],
                  guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """The pass(es) at θ' over a window whose backward passes at θ are done (``.grad`` = g1 of the window): per
    extra pass of the estimator ``gr.perturb()`` and ``replay_one(item, last)`` for every micro-batch after its RNG
    state is replayed (``last``: the window's last micro-batch, whose backward reduces under DDP; ``guard()`` wraps
    each perturbed point's replays), then ``gr.restore_and_combine()``: θ back bitwise, ``.grad`` = the GR gradient.
    On any exception θ is restored (``.grad`` = g1) before it propagates; the RNG continues where the caller left
    it in every case."""
    rng_after = RNGState()
    try:
        for _ in range(gr.extra_passes):
            gr.perturb()
            with guard():
                for k, item in enumerate(window):
                    item.rng.replay()
                    replay_one(item, k == len(window) - 1)
        gr.restore_and_combine()
    except BaseException:
        gr.restore()  # θ back bitwise, .grad = g1
        raise
    finally:
        rng_after.replay()


def end_window(gr: Any, window: Sequence[MicroBatch], replay_one: Callable[[MicroBatch, bool], Any],
               guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """At the end of an accumulation window, before the host's clip and step: the pass(es) at θ' when this step
    has any (:func:`replay_window`), else ``gr.combine()`` (the exact estimator's H·v, a reused correction, or g1's
    diagnostics). Afterwards ``.grad`` is what the base optimizer steps with."""
    if gr.extra_passes:
        if not window:
            gr.restore()
            raise RuntimeError("GR: no micro-batch of this accumulation window was recorded, so the pass at θ' has "
                               "nothing to replay (was the integration installed after training started?)")
        replay_window(gr, window, replay_one, guard)
    else:
        gr.combine()


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def sync_context(accelerator: Any, model: Any, last: bool) -> contextlib.AbstractContextManager:
    """Gradient reduction of a replayed micro-batch, as in the pass at θ (each of g1 and g2 reduced once per
    window): under DeepSpeed the engine's accumulation-boundary mark (set iff ``last``); otherwise
    ``accelerator.no_sync(model)`` for all but the last micro-batch, unless Accelerate syncs every micro-batch
    (``sync_each_batch``)."""
    if accelerator.distributed_type == "DEEPSPEED":  # DistributedType is a str enum
        return accumulation_boundary(accelerator, last)
    if last or accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False):
        return _nothing()
    return accelerator.no_sync(model=model)


# ---------------------------------------------------------------------------------------------------- metrics
#: Metrics logged as their value after the last step of a logging interval; every other one is averaged.
COUNTERS = ("step", "skipped")


class MetricsLog:
    """GR metrics between two logs, by the one averaging rule (module docstring). :meth:`record` after every
    optimizer step (no host read); :meth:`summary` / :meth:`flush` when the host logs."""

    def __init__(self) -> None:
        self._steps: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def record(self, gr: Any) -> None:
        """The metrics of the step just taken (``gr.metrics(sync=False)``; copies: a backend may reuse its buffers)."""
        m = gr.metrics(sync=False)
        self._steps.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in m.items()})

    def summary(self, sync: bool = True) -> dict[str, Any]:
        """The interval's value per metric: floats (one host read) or, with ``sync=False``, 0-d float32 tensors on
        the metrics' device (no host read). Empty when no step was recorded."""
        if not self._steps:
            return {}
        device = next((v.device for s in self._steps for v in s.values() if isinstance(v, torch.Tensor)),
                      torch.device("cpu"))
        names = list(dict.fromkeys(k for s in self._steps for k in s))
        out: dict[str, torch.Tensor] = {}
        for name in names:
            seen = [torch.as_tensor(s[name], dtype=torch.float64).to(device).reshape(())
                    for s in self._steps if name in s]
            out[name] = seen[-1] if name in COUNTERS else torch.nanmean(torch.stack(seen))
        out.setdefault("skipped", torch.zeros((), dtype=torch.float64, device=device))
        if not sync:
            return {k: v.float() for k, v in out.items()}
        values = torch.stack(list(out.values())).tolist()  # the one host read of a log
        return dict(zip(out, values))

    def flush(self, sync: bool = True) -> dict[str, Any]:
        """:meth:`summary`, then start a new interval."""
        out = self.summary(sync)
        self._steps = []
        return out
