"""Gradient regularization in a Hugging Face Accelerate loop with gradient accumulation: :class:`GradRegWindow`.

``accelerator.accumulate()`` skips ``optimizer.step()`` on the micro-batches that do not end a window, and with
it any closure: ``optimizer.step(closure)`` there never runs the closure, so GR sees the last micro-batch only.
The helper owns the window instead. One call per micro-batch::

    from grkernels.integrations.accelerate import GradRegWindow

    accelerator = Accelerator(gradient_accumulation_steps=4)
    gr = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-4), strength=1e-2, eps=1e-3)
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

Under DeepSpeed ZeRO-1/2/3 prepare the plain optimizer and pass the GR settings as ``grad_reg=dict(...)``: the
window drives a :class:`grkernels.integrations.deepspeed.DeepSpeedGR` on the engine's partitions and holds the
engine's step (which Accelerate runs inside ``accelerator.backward`` at the window's end) until GR has combined;
the replay marks the accumulation boundary as the first pass did instead of ``no_sync``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from grkernels.integrations.window import accelerate_sync_context, replay_window
from grkernels.optim import GradReg
from grkernels.rng import RNGState

if TYPE_CHECKING:
    from grkernels.integrations.deepspeed import DeepSpeedGR

__all__ = ["GradRegWindow"]


@dataclass
class _MicroBatch:
    batch: Any
    rng: RNGState  # before the forward at θ


class GradRegWindow:
    """GR over Accelerate's accumulation windows (see the module docstring).

    Args:
        accelerator: the ``Accelerator`` (its ``gradient_accumulation_steps`` sets the window).
        model: the prepared model (under DeepSpeed: the engine ``prepare`` returned).
        optimizer: the prepared optimizer around a :class:`grkernels.GradReg` (or the ``GradReg`` itself); under
            DeepSpeed the prepared plain optimizer, with the GR settings in ``grad_reg``.
        max_grad_norm: clip the combined gradient to this norm before the step (``None``: no clipping; not
            offered under DeepSpeed, whose step does no clipping GR can allow).
        lr_scheduler: stepped after each optimizer step (optional).
        grad_reg: DeepSpeed only: the settings of :class:`grkernels.integrations.deepspeed.DeepSpeedGR`
            (``strength``, ``eps``, ``g1_clip``, ``g2_clip``, ``exclude`` as tensors or name substrings,
            ``estimator``, ``eps_mode``, ``rounding``, ``seed``, ``warmup_steps``).
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, *,
                 max_grad_norm: float | None = None, lr_scheduler: Any = None,
                 grad_reg: dict[str, Any] | None = None) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"GradRegWindow: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if getattr(accelerator, "scaler", None) is not None:
            raise NotImplementedError("GradRegWindow: fp16 with a gradient scaler is not supported (the scaled g1 "
                                      "would set the perturbation); use mixed_precision='bf16' or 'no'")
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            gr = self._deepspeed_grad_reg(accelerator, optimizer, grad_reg, max_grad_norm)
        else:
            gr = optimizer if isinstance(optimizer, GradReg) else getattr(optimizer, "optimizer", None)  # prepared
            if not isinstance(gr, GradReg):
                raise TypeError(f"GradRegWindow: the optimizer must be a grkernels.GradReg (as prepared), "
                                f"got {type(gr).__name__}")
            if grad_reg is not None:
                raise TypeError("GradRegWindow: grad_reg= is for DeepSpeed, where GR cannot wrap the optimizer; "
                                "here the GradReg optimizer carries the settings")
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.grad_reg: GradReg | DeepSpeedGR = gr
        self.max_grad_norm, self.lr_scheduler = max_grad_norm, lr_scheduler
        self._window: list[_MicroBatch] = []

    @staticmethod
    def _deepspeed_grad_reg(accelerator: Accelerator, optimizer: Any, settings: dict[str, Any] | None,
                            max_grad_norm: float | None) -> DeepSpeedGR:
        from grkernels.integrations.deepspeed import engine_grad_reg

        base = getattr(getattr(optimizer, "optimizer", None), "optimizer", None)  # Accelerate's -> ZeRO's -> client
        if isinstance(base, GradReg) or isinstance(optimizer, GradReg):
            raise TypeError("GradRegWindow under DeepSpeed: prepare the plain optimizer (DeepSpeed's ZeRO optimizer "
                            "wraps it and steps on its partitions) and pass the GR settings as grad_reg=dict(...)")
        if settings is None:
            raise TypeError("GradRegWindow under DeepSpeed needs the GR settings: grad_reg=dict(strength=..., "
                            "eps=..., ...)")
        if max_grad_norm is not None:
            raise NotImplementedError(
                "GradRegWindow under DeepSpeed: max_grad_norm is not offered (Accelerate leaves clipping to the "
                "DeepSpeed config, whose gradient_clipping GR refuses); use grad_reg g1_clip / g2_clip")
        return engine_grad_reg(accelerator.deepspeed_engine_wrapped.engine, **settings)

    def step(self, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> torch.Tensor:
        """One micro-batch: backward at θ; at the end of the window also the pass at θ' and the optimizer step.

        Returns the micro-batch's loss (detached, as ``loss_fn`` returned it). ``loss_fn`` must compute the same
        function of (model, batch) when called again: GR replays it with the RNG state of the first call.
        """
        acc, gr = self.accelerator, self.grad_reg
        with acc.accumulate(self.model):
            rng = RNGState()
            loss = loss_fn(self.model, batch)
            # DeepSpeed steps inside the backward at the window's end: hold that step until the GR passes are done
            held = self.deepspeed and gr.active and acc.sync_gradients
            with gr.hold_step() if held else contextlib.nullcontext():
                acc.backward(loss)
                if gr.active:
                    self._window.append(_MicroBatch(batch, rng))
                if acc.sync_gradients:
                    window, self._window = self._window, []
                    self._second_pass(window, loss_fn)
            if acc.sync_gradients:
                self._step()
        return loss.detach()

    def _second_pass(self, window: list[_MicroBatch], loss_fn: Callable) -> None:
        acc, gr = self.accelerator, self.grad_reg
        if not gr.active:
            gr.combine()  # g1 diagnostics, the reused correction (every > 1): before the clip, as in a GR step
            return

        def replay_one(mb: _MicroBatch, last: bool) -> None:
            with self._sync_context(last):
                acc.backward(loss_fn(self.model, mb.batch))

        try:
            replay_window(gr, window, replay_one)
        except BaseException:  # θ is back; the window is void, the next one starts clean
            if self.deepspeed:
                gr.discard_gradients()  # the engine's step stays held: nothing steps
            else:
                self.optimizer.zero_grad()
            raise

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        if self.deepspeed:  # the engine reduces per its accumulation-boundary mark, not per no_sync
            from grkernels.integrations.deepspeed import accumulation_boundary

            return accumulation_boundary(self.accelerator, last)
        return accelerate_sync_context(self.accelerator, self.model, last)

    def _step(self) -> None:
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()  # under DeepSpeed a no-op: the engine stepped as hold_step ended
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad()
