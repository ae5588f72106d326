"""The trailing moving average that the demo's summary (:mod:`grkernels.demo.experiment`) and its frontiers
(:mod:`grkernels.demo.frontier`) both smooth per-step curves with: one definition, so the two agree."""

from __future__ import annotations


def smooth(x: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` steps (the window shrinks at the start: step i averages the
    min(i + 1, window) values up to it)."""
    out, acc = [], 0.0
    for i, v in enumerate(x):
        acc += v
        if i >= window:
            acc -= x[i - window]
        out.append(acc / min(i + 1, window))
    return out
