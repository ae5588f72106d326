"""Gradient regularization in PyTorch Lightning (the ``lightning`` package, 2.x): :class:`GradRegCallback`.

Lightning's automatic optimization calls ``optimizer.step(closure)`` once per accumulation window, with a
closure for the *last* micro-batch only: the earlier ones ran their forward/backward outside any step. A
``GradReg`` handed that closure re-runs only the last micro-batch at θ', and ``step(closure)`` zeroes the
gradients accumulated before it: GR of the last micro-batch, silently. The callback makes the window right:

1. every micro-batch runs through Lightning as usual (``.grad`` accumulates g1 with Lightning's ``loss /
   accumulate_grad_batches`` scaling); the callback records each ``training_step``'s arguments and the RNG
   state right before it (:class:`grkernels.rng.RNGState`);
2. in ``on_before_optimizer_step`` (after the last micro-batch's backward, before Lightning clips):
   ``GradReg.perturb()`` (θ' = θ + ε·clip(g1)), every recorded micro-batch is replayed at θ' with its RNG state
   (same dropout masks) through the strategy's ``training_step`` (precision context included), the module's
   ``backward`` and the same scaling, with ``self.log`` muted; then ``GradReg.restore_and_combine()`` puts θ
   back bitwise and writes g1 + (γ/ε)(g2 − g1) into ``.grad`` (excluded parameters keep g1);
3. Lightning then clips the *combined* gradient (``gradient_clip_val``) and steps once: ``global_step`` counts
   optimizer steps, not passes.

Lightning sees a :class:`LightningGradReg` in place of the ``GradReg`` (the callback swaps it in at fit start):
its ``step(closure)`` runs the closure and then finishes the two-phase step (``GradReg.step()``). The same
object makes manual optimization work: ``opt = self.optimizers()``, then ``opt.perturb()`` / ``opt.step()``
act on the real ``GradReg`` (Lightning's ``LightningOptimizer`` proxy would otherwise keep the phase in a copy
and leave the weights perturbed).

Usage::

    import lightning as L
    from grkernels.integrations.lightning import GradRegCallback

    class Module(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return loss                                    # as usual: no GR code here
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    L.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0, precision="bf16-mixed",
              callbacks=[GradRegCallback(strength="auto", target_rel=0.3)]).fit(Module(), dl)

The callback takes the schema's GR settings (``grkernels.settings``; ``exclude=None``: the paper's embeddings and
output head) and wraps the optimizer ``configure_optimizers`` returns; or ``configure_optimizers`` returns a
``grkernels.GradReg``, which carries its own settings (then the callback takes none). The exact estimator works:
the callback makes Lightning's backward keep the graph (``create_graph=True``) on the steps that need it.

Metrics: ``grad_reg/<name>`` after every optimizer step, by the integrations' one averaging rule
(``grkernels.integrations.common.MetricsLog``): what the logger writes every ``log_every_n_steps`` is the mean of each
value over the steps since its previous write (``step`` and ``skipped``: after the last of them); device tensors,
no host read in the step.

Not supported (refused at fit start): more than one optimizer, multi-process strategies (untested), fp16 with a
gradient scaler (``precision="16-mixed"``: use ``"bf16-mixed"``). Replayed ``training_step`` calls may change
module state that is not a logged metric (e.g. a torchmetrics object updated in ``training_step``, BatchNorm
running statistics): they are not rolled back. ``on_before_backward``/``on_after_backward`` hooks run for the
first pass only.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior

from grkernels.integrations.common import (
    MetricsLog,
    MicroBatch,
    Window,
    build_grad_reg,
    end_window,
    host_settings,
    refuse_loss_scaling,
    refuse_subset,
)
from grkernels.optim import GradReg

__all__ = ["GradRegCallback", "LightningGradReg", "guard_callbacks"]


class LightningGradReg(torch.optim.Optimizer):
    """What Lightning steps in place of a :class:`grkernels.GradReg` (shares its param groups and state).

    ``step(closure)`` runs the closure once (Lightning's: the last micro-batch's forward/backward, the
    ``on_before_optimizer_step`` hooks, gradient clipping) and then finishes GR's two-phase step
    (``GradReg.step()``: restore and combine if still perturbed, skip a non-finite step, step the base optimizer).
    The passes at θ' come from :class:`GradRegCallback` (automatic optimization) or from the user (manual).

    Every method reads ``self.grad_reg`` and writes nothing on ``self``: Lightning's ``LightningOptimizer``
    proxy calls them with itself as ``self`` and forwards missing attributes, so they reach the real GradReg.
    """

    #: Lightning's mixed-precision plugin refuses gradient clipping for optimizers that unscale gradients inside
    #: ``step`` (fused optimizers). GR's step never touches a loss scale (fp16 scaling is refused), so Lightning
    #: clips the combined gradient itself: bf16-mixed with ``gradient_clip_val`` works.
    _step_supports_amp_scaling = False

    def __init__(self, grad_reg: GradReg) -> None:  # no super().__init__: the groups are the GradReg's
        if not isinstance(grad_reg, GradReg):
            raise TypeError(f"LightningGradReg wraps a grkernels.GradReg, got {type(grad_reg).__name__}")
        self.grad_reg = grad_reg

    # the GradReg's groups, state and hooks (LR schedulers, checkpoints, Lightning's device moves)
    param_groups = property(lambda self: self.grad_reg.param_groups)
    state = property(lambda self: self.grad_reg.state)
    defaults = property(lambda self: self.grad_reg.defaults)

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        gr = self.grad_reg
        loss = None
        if closure is not None:
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                gr.restore()  # θ back bitwise if the closure raised between perturb() and here
                raise
        gr.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad_reg.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.grad_reg.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grad_reg.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # perturb, restore, metrics, active, extra_passes, ...
        if name == "grad_reg":
            raise AttributeError(name)
        return getattr(self.grad_reg, name)

    def __repr__(self) -> str:
        return f"LightningGradReg({self.grad_reg!r})"


def _grad_reg_of(opt: Any) -> GradReg | None:
    opt = opt.optimizer if isinstance(opt, LightningOptimizer) else opt
    if isinstance(opt, LightningGradReg):
        return opt.grad_reg
    return opt if isinstance(opt, GradReg) else None


class GradRegCallback(pl.Callback):
    """GR over whole accumulation windows in Lightning's automatic optimization (see the module docstring).

    Args:
        log_metrics: log GR's metrics as ``grad_reg/<name>`` after every optimizer step (device tensors: no host
            read in the step).
        **settings: the GR settings (``grkernels.settings.SETTINGS``, e.g. ``strength="auto"``, ``eps=0.02``,
            ``exclude=["lm_head"]``), validated here; used when ``configure_optimizers`` returns a plain optimizer.
    """

    def __init__(self, log_metrics: bool = True, **settings: Any) -> None:
        self.log_metrics = log_metrics
        self.settings = host_settings(settings, host="lightning")
        refuse_subset(self.settings, "Lightning")
        self._settings_given = bool(settings)
        self.grad_reg: GradReg | None = None
        self._window = Window()
        self._log = MetricsLog()
        self._replaying = False
        self._stepped = False
        self._module: pl.LightningModule | None = None

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.strategy.optimizers)
        if len(optimizers) != 1:
            raise TypeError("GradRegCallback: configure_optimizers must return exactly one optimizer (got "
                            f"{[type(o).__name__ for o in optimizers]})")
        if trainer.world_size > 1:
            raise NotImplementedError(
                "GradRegCallback is tested on a single device only; for DDP write the loop with the two-phase "
                "API (examples/accelerate_loop.py) or use the Hugging Face Trainer integration"
            )
        refuse_loss_scaling("Lightning", getattr(trainer.precision_plugin, "scaler", None) is not None,
                            "Use precision='bf16-mixed' (or 32).")
        gr = _grad_reg_of(optimizers[0])
        if gr is not None and self._settings_given:
            raise TypeError("GradRegCallback: configure_optimizers returned a GradReg, which carries its own GR "
                            "settings; give the callback none (or return the plain optimizer)")
        if gr is None:
            base = optimizers[0].optimizer if isinstance(optimizers[0], LightningOptimizer) else optimizers[0]
            if not isinstance(base, torch.optim.Optimizer):
                raise TypeError(f"GradRegCallback: cannot wrap {type(base).__name__} in GradReg")
            gr = build_grad_reg(base, self.settings, pl_module)
        host_settings(gr.engine.settings, host="lightning")
        self.grad_reg = gr
        trainer.strategy.optimizers = [LightningGradReg(gr)]
        self._window.take()
        self._replaying, self._stepped, self._log = False, False, MetricsLog()
        self._install(pl_module)

    def _install(self, pl_module: pl.LightningModule) -> None:
        """Instance attributes over two bound methods of the module, so that Lightning's own calls (through the
        strategy, the precision context and any wrapper) are the ones seen: ``training_step`` records each
        first-pass call (automatic optimization), ``backward`` keeps the graph on steps of the exact estimator."""
        step = type(pl_module).training_step.__get__(pl_module)
        backward = type(pl_module).backward.__get__(pl_module)

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            gr = self.grad_reg
            if not self._replaying and gr is not None and gr.active:
                self._window.record(*args, **kwargs)  # with the RNG state right before the user's forward
            return step(*args, **kwargs)

        @functools.wraps(backward)
        def keep_graph(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.grad_reg is not None and self.grad_reg.needs_graph:
                kwargs.setdefault("create_graph", True)
            return backward(loss, *args, **kwargs)

        if pl_module.automatic_optimization:
            pl_module.training_step = training_step
        pl_module.backward = keep_graph
        self._module = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take the wrappers off the module again (also after an exception: :meth:`on_exception`)."""
        if self._module is not None:
            for name in ("training_step", "backward"):
                self._module.__dict__.pop(name, None)
        self._module = None
        self._window.take()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ the pass at θ'
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        gr = self.grad_reg
        if gr is None:
            return
        self._stepped = True
        if not pl_module.automatic_optimization:
            return  # manual optimization: the user's two-phase code did the passes
        # after the window's last backward, before Lightning's clip: the GR gradient (or the exact / reused one, or
        # g1 with its diagnostics)
        end_window(gr, self._window.take(), lambda mb, last: self._replay(trainer, pl_module, optimizer, mb, last))

    def _replay(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, mb: MicroBatch,
                last: bool) -> None:
        """One micro-batch at θ': Lightning's training_step call, loss scaling and backward, logging muted."""
        with self._muted(pl_module), _block_parallel_sync_behavior(trainer.strategy, block=not last):
            out = trainer.strategy.training_step(*mb.args, **mb.kwargs)
            loss = ClosureResult.from_training_step_output(out, trainer.accumulate_grad_batches).closure_loss
            if loss is not None:  # a skipped micro-batch (None) contributed nothing at θ either
                trainer.precision_plugin.backward(loss, pl_module, optimizer)

    @contextlib.contextmanager
    def _muted(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """The replay runs the user's training_step again: its ``self.log`` calls must not count twice."""
        self._replaying = True
        pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = lambda *a, **k: None
        try:
            yield
        finally:
            self._replaying = False
            del pl_module.__dict__["log"], pl_module.__dict__["log_dict"]

    # ------------------------------------------------------------------ logging
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped, self._stepped = self._stepped, False
        if not (self.log_metrics and stepped and self.grad_reg is not None):
            return
        self._log.record(self.grad_reg)
        # the mean since the logger's last write (Lightning writes the latest logged value when it logs)
        logs = {f"grad_reg/{k}": v for k, v in self._log.summary(sync=False).items()}
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
        if trainer._logger_connector.should_update_logs:  # as Lightning's LearningRateMonitor asks
            self._log.flush(sync=False)


class _GradRegGuard(pl.Callback):
    """Added to every Lightning Trainer by the ``lightning.pytorch.callbacks_factory`` entry point of grkernels:
    refuses (or warns about) a ``GradReg`` handed to Lightning without :class:`GradRegCallback` where Lightning's
    optimizer contract cannot give the GR gradient. Does nothing when no optimizer is a GradReg."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(cb, GradRegCallback) for cb in trainer.callbacks):
            return
        raw = [o for o in trainer.strategy.optimizers if isinstance(o, GradReg)]
        if not raw:
            return
        fix = "add callbacks=[grkernels.integrations.lightning.GradRegCallback()] to the Trainer"
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "GradReg under Lightning's manual optimization: self.optimizers() is a LightningOptimizer proxy that "
                "keeps perturb()'s state in a copy, so step() fails and the weights stay perturbed; " + fix
            )
        if trainer.accumulate_grad_batches > 1:
            raise RuntimeError(
                f"GradReg with accumulate_grad_batches={trainer.accumulate_grad_batches}: Lightning calls "
                "optimizer.step(closure) with the last micro-batch's closure only, and step(closure) zeroes the "
                "gradients accumulated before it, so GR would see the last micro-batch alone; " + fix
            )
        if trainer.gradient_clip_val:
            warnings.warn(
                "GradReg with gradient_clip_val: Lightning clips inside the closure, i.e. g1 and g2 separately, not "
                f"the combined GR gradient; {fix} (or clip with GradReg's g1_clip/g2_clip)",
                UserWarning,
                stacklevel=2,
            )


def guard_callbacks() -> list[pl.Callback]:
    """The ``lightning.pytorch.callbacks_factory`` entry point: the guard above, for every Lightning Trainer."""
    return [_GradRegGuard()]
