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
the LR scheduler if given, ``optimizer.zero_grad()``. One optimizer step per window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from grkernels.integrations.window import accelerate_sync_context, replay_window
from grkernels.optim import GradReg
from grkernels.rng import RNGState

__all__ = ["GradRegWindow"]


@dataclass
class _MicroBatch:
    batch: Any
    rng: RNGState  # before the forward at θ


class GradRegWindow:
    """GR over Accelerate's accumulation windows (see the module docstring).

    Args:
        accelerator: the ``Accelerator`` (its ``gradient_accumulation_steps`` sets the window).
        model: the prepared model.
        optimizer: the prepared optimizer around a :class:`grkernels.GradReg` (or the ``GradReg`` itself).
        max_grad_norm: clip the combined gradient to this norm before the step (``None``: no clipping).
        lr_scheduler: stepped after each optimizer step (optional).
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, *,
                 max_grad_norm: float | None = None, lr_scheduler: Any = None) -> None:
        gr = optimizer if isinstance(optimizer, GradReg) else getattr(optimizer, "optimizer", None)  # prepared
        if not isinstance(gr, GradReg):
            raise TypeError(f"GradRegWindow: the optimizer must be a grkernels.GradReg (as prepared), "
                            f"got {type(gr).__name__}")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError("GradRegWindow: DeepSpeed steps inside accelerator.backward; not supported")
        if getattr(accelerator, "scaler", None) is not None:
            raise NotImplementedError("GradRegWindow: fp16 with a gradient scaler is not supported (the scaled g1 "
                                      "would set the perturbation); use mixed_precision='bf16' or 'no'")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"GradRegWindow: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.grad_reg: GradReg = gr
        self.max_grad_norm, self.lr_scheduler = max_grad_norm, lr_scheduler
        self._window: list[_MicroBatch] = []

    def step(self, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> torch.Tensor:
        """One micro-batch: backward at θ; at the end of the window also the pass at θ' and the optimizer step.

        Returns the micro-batch's loss (detached, as ``loss_fn`` returned it). ``loss_fn`` must compute the same
        function of (model, batch) when called again: GR replays it with the RNG state of the first call.
        """
        acc, gr = self.accelerator, self.grad_reg
        with acc.accumulate(self.model):
            rng = RNGState()
            loss = loss_fn(self.model, batch)
            acc.backward(loss)
            if gr.active:
                self._window.append(_MicroBatch(batch, rng))
            if acc.sync_gradients:
                window, self._window = self._window, []
                self._finish(window, loss_fn)
        return loss.detach()

    def _finish(self, window: list[_MicroBatch], loss_fn: Callable) -> None:
        acc, gr = self.accelerator, self.grad_reg
        if gr.active:
            def replay_one(mb: _MicroBatch, last: bool) -> None:
                with accelerate_sync_context(acc, self.model, last):
                    acc.backward(loss_fn(self.model, mb.batch))

            try:
                replay_window(gr, window, replay_one)
            except BaseException:
                self.optimizer.zero_grad()  # θ is back; the window is void, the next one starts clean
                raise
        else:
            gr.observe_g1()  # before the clip, as GR steps record g1_norm
        if self.max_grad_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad()
