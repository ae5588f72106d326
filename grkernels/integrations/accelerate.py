"""Gradient regularization in a Hugging Face Accelerate loop with gradient accumulation: :class:`GradRegWindow`.

``accelerator.accumulate()`` skips ``optimizer.step()`` on the micro-batches that do not end a window, and with
it any closure: ``optimizer.step(closure)`` there never runs the closure, so GR sees the last micro-batch only.
The helper owns the window instead. One call per micro-batch::

    from grkernels.integrations.accelerate import GradRegWindow

    accelerator = Accelerator(gradient_accumulation_steps=4)
    gr = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-4))   # the defaults: strength "auto", radius ε 0.02
    model, opt, loader = accelerator.prepare(model, gr, loader)
    window = GradRegWindow(accelerator, model, opt, max_grad_norm=1.0)
    for batch in loader:
        loss = window.step(batch, loss_fn)        # loss_fn(model, batch) -> loss (a mean, not divided by 4)

``step`` runs the micro-batch's forward/backward at θ inside ``accelerator.accumulate(model)`` (so
``accelerator.backward``'s division by the accumulation steps and DDP's ``no_sync`` apply) and keeps the batch and
the RNG state before its forward (:class:`grkernels.rng.RNGState`). When Accelerate ends the window
(``accelerator.sync_gradients``: every N-th call, or the end of the data loader): ``GradReg.perturb()``, every
kept micro-batch again at θ' = θ + ε·clip(g1) with its RNG state (same dropout masks; all but the last under
``accelerator.no_sync``, so g2 is all-reduced once), ``GradReg.restore_and_combine()`` (θ back bitwise, ``.grad``
= g1 + (γ/ε)(g2 − g1)), clipping of that combined gradient (``accelerator.clip_grad_norm_``), ``optimizer.step()``,
the LR scheduler if given, ``optimizer.zero_grad()``. One optimizer step per window. A replay that raises voids
the window (θ back, gradients dropped, no step) before the error propagates.

The GR settings: either prepare a ``GradReg`` as the optimizer (it carries them), or prepare the plain optimizer and
pass the schema's settings as ``grad_reg=dict(...)`` (``grkernels.settings``; e.g. ``strength="auto"``,
``target_rel=0.3``, ``exclude=None`` for the paper's embeddings and head): the window then wraps the prepared
optimizer's base in ``GradReg`` itself. Under DeepSpeed ZeRO-1/2/3 only the second way exists (DeepSpeed's ZeRO
optimizer wraps the plain optimizer and steps on its partitions): the window drives the GR object of
:mod:`grkernels.integrations.deepspeed` on the engine's partitions and holds the engine's step (which Accelerate runs
inside ``accelerator.backward`` at the window's end) until GR has combined; the replay marks the accumulation
boundary as the first pass did instead of ``no_sync``; DeepSpeed's ``gradient_clipping`` clips the combined gradient.

Metrics: :meth:`GradRegWindow.metrics` returns the GR metrics since its last call (``grad_reg/<name>``, the
integrations' one averaging rule: ``grkernels.integrations.common.MetricsLog``), e.g. for ``accelerator.log``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate import Accelerator

from grkernels.integrations.common import (
    MetricsLog,
    MicroBatch,
    Window,
    build_grad_reg,
    end_window,
    exclusions,
    host_settings,
    refuse_loss_scaling,
    refuse_subset,
    sync_context,
)
from grkernels.integrations.deepspeed import engine_grad_reg
from grkernels.optim import GradReg

__all__ = ["GradRegWindow"]


class GradRegWindow:
    """GR over Accelerate's accumulation windows (see the module docstring).

    Args:
        accelerator: the ``Accelerator`` (its ``gradient_accumulation_steps`` sets the window).
        model: the prepared model (under DeepSpeed: the engine ``prepare`` returned).
        optimizer: the prepared optimizer: around a :class:`grkernels.GradReg`, or around the plain optimizer with
            the GR settings in ``grad_reg``.
        max_grad_norm: clip the combined gradient to this norm before the step (``None``: no clipping). Under
            DeepSpeed the engine clips (its config's ``gradient_clipping``), so this must be None or that value.
        lr_scheduler: stepped after each optimizer step (optional).
        grad_reg: the GR settings (``grkernels.settings``: ``strength``, ``eps``, ``exclude`` as name substrings,
            ``None`` for the paper's ...), when the prepared optimizer is a plain one.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, *,
                 max_grad_norm: float | None = None, lr_scheduler: Any = None,
                 grad_reg: Mapping[str, Any] | None = None) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"GradRegWindow: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        refuse_loss_scaling("Accelerate", getattr(accelerator, "scaler", None) is not None,
                            "Use mixed_precision='bf16' or 'no'.")
        self.deepspeed = accelerator.distributed_type == "DEEPSPEED"
        base = getattr(optimizer, "optimizer", None)  # what Accelerate's AcceleratedOptimizer wraps
        if isinstance(optimizer, GradReg) or isinstance(base, GradReg) or (
                self.deepspeed and isinstance(getattr(base, "optimizer", None), GradReg)):
            if self.deepspeed:
                raise TypeError("GradRegWindow under DeepSpeed: prepare the plain optimizer (DeepSpeed's ZeRO "
                                "optimizer wraps it and steps on its partitions) and pass the GR settings as "
                                "grad_reg=dict(...)")
            if grad_reg is not None:
                raise TypeError("GradRegWindow: the prepared optimizer is a GradReg, which carries the GR settings; "
                                "do not pass grad_reg= as well")
            gr = optimizer if isinstance(optimizer, GradReg) else base
            settings = host_settings(gr.engine.settings, host=self._hosts(accelerator))
            refuse_subset(settings, "Accelerate")
        else:
            if grad_reg is None:
                raise TypeError(
                    f"GradRegWindow: the optimizer must be a grkernels.GradReg (as prepared), got "
                    f"{type(base or optimizer).__name__}; or prepare the plain optimizer and pass the GR settings as "
                    "grad_reg=dict(strength=..., eps=..., ...)")
            settings = host_settings(grad_reg, host=self._hosts(accelerator))
            refuse_subset(settings, "Accelerate")  # before anything is wrapped
            unwrapped = accelerator.unwrap_model(model)
            if self.deepspeed:
                engine = accelerator.deepspeed_engine_wrapped.engine
                clip = float(engine.gradient_clipping() or 0.0)
                if max_grad_norm is not None and max_grad_norm != clip:
                    raise ValueError(
                        f"GradRegWindow under DeepSpeed: max_grad_norm={max_grad_norm}, but the engine clips to its "
                        f"config's gradient_clipping ({clip}; Accelerate leaves clipping to DeepSpeed). Set "
                        "gradient_clipping in the DeepSpeed config (it clips the combined GR gradient) and "
                        "max_grad_norm=None")
                gr = engine_grad_reg(engine, settings, exclude=exclusions(settings, unwrapped))
            else:
                if not isinstance(base, torch.optim.Optimizer):
                    raise TypeError(f"GradRegWindow: prepare the optimizer with accelerator.prepare first (got "
                                    f"{type(optimizer).__name__})")
                gr = build_grad_reg(base, settings, unwrapped)
                optimizer.optimizer = gr  # AcceleratedOptimizer now steps (and checkpoints) the GradReg
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.grad_reg = gr
        self.settings = settings
        self.max_grad_norm, self.lr_scheduler = max_grad_norm, lr_scheduler
        self._window = Window()
        self._log = MetricsLog()

    @staticmethod
    def _hosts(accelerator: Accelerator) -> tuple[str, ...]:
        """Whose limits apply: DeepSpeed's; DDP's with several processes (gradients reduced outside autograd)."""
        if accelerator.distributed_type == "DEEPSPEED":
            return ("deepspeed",)
        return ("ddp",) if accelerator.num_processes > 1 else ("accelerate",)

    def step(self, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> torch.Tensor:
        """One micro-batch: backward at θ; at the end of the window also the pass at θ' and the optimizer step.

        Returns the micro-batch's loss (detached, as ``loss_fn`` returned it). ``loss_fn`` must compute the same
        function of (model, batch) when called again: GR replays it with the RNG state of the first call.
        """
        acc, gr = self.accelerator, self.grad_reg
        with acc.accumulate(self.model):
            if gr.active:
                self._window.record(batch)  # with the RNG state before the forward at θ
            loss = loss_fn(self.model, batch)
            # DeepSpeed steps inside the backward at the window's end: hold that step until GR is done with the
            # window (every window: the engine's finish applies a reused correction and votes on finiteness)
            held = self.deepspeed and acc.sync_gradients
            with gr.hold_step() if held else contextlib.nullcontext():
                self._backward(loss)
                if acc.sync_gradients:
                    self._end_window(self._window.take(), loss_fn)
            if acc.sync_gradients:
                self._step()
        return loss.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        if not self.deepspeed and self.grad_reg.needs_graph:  # the exact estimator differentiates the gradient
            self.accelerator.backward(loss, create_graph=True)
        else:
            self.accelerator.backward(loss)

    def _end_window(self, window: list[MicroBatch], loss_fn: Callable) -> None:
        def replay_one(mb: MicroBatch, last: bool) -> None:
            with sync_context(self.accelerator, self.model, last):
                self.accelerator.backward(loss_fn(self.model, *mb.args))

        try:
            end_window(self.grad_reg, window, replay_one)  # before the clip: the GR (or reused) gradient
        except BaseException:  # θ is back; the window is void, the next one starts clean
            if self.deepspeed:
                self.grad_reg.discard_gradients()  # the engine's step stays held: nothing steps
            else:
                self.optimizer.zero_grad()
            raise

    def _step(self) -> None:
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()  # under DeepSpeed a no-op: the engine stepped as hold_step ended
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self._log.record(self.grad_reg)

    def metrics(self, sync: bool = True) -> dict[str, Any]:
        """The GR metrics of the optimizer steps since the last call, as ``{"grad_reg/<name>": value}`` (values
        averaged over those steps, ``step`` and ``skipped`` as after the last; one host read, none with
        ``sync=False``). Empty before the first step."""
        return {f"grad_reg/{k}": v for k, v in self._log.flush(sync).items()}
