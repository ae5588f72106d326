"""The pass(es) at θ' over a whole accumulation window: the one loop the host integrations share.

Each micro-batch of the window ran its forward/backward at θ (``.grad`` holds g1 of the window) and kept the RNG
state from before its forward. :func:`replay_window` then does, per extra pass of the estimator,
``GradReg.perturb()`` and every micro-batch again with its RNG state (same dropout masks), and finally
``GradReg.restore_and_combine()``: θ back bitwise, ``.grad`` = g1 + (γ/ε)(g2 − g1). On any exception θ is restored
(``.grad`` = g1) before it propagates; the RNG is put back to where the caller left it in every case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from grkernels.optim import GradReg
from grkernels.rng import RNGState

__all__ = ["replay_window", "accelerate_sync_context"]


class _HasRNG(Protocol):
    rng: RNGState


T = TypeVar("T", bound=_HasRNG)


def replay_window(gr: GradReg, window: Sequence[T], replay_one: Callable[[T, bool], Any],
                  guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Run ``replay_one(item, last)`` for every micro-batch of ``window`` at each perturbed point, then combine.

    ``last`` is True for the window's last micro-batch (the one whose backward may all-reduce under DDP);
    ``guard()`` wraps each perturbed point's replays (e.g. a trainer-state guard).
    """
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


def accelerate_sync_context(accelerator: Any, model: Any, last: bool) -> contextlib.AbstractContextManager:
    """``accelerator.no_sync(model)`` for all but the window's last micro-batch (so g2 is all-reduced once, like
    g1), unless Accelerate syncs every micro-batch (``sync_each_batch``)."""
    if last or accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False):
        return contextlib.nullcontext()
    return accelerator.no_sync(model=model)
