"""Flag types shared by the ``grkernels`` subcommands (``quickstart``, ``demo``, ``bench``, ``info``).

A bad value is refused while parsing, so the user sees ``argument --x: ...`` and exit status 2, not a traceback.
They live apart from :mod:`grkernels.cli` so that a subcommand's parser can use them without importing the
dispatcher that imports the subcommand.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["device", "nonnegative_float", "positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, repeats, sizes)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
    if not (math.isfinite(v) and ok(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (ε, learning rates)."""
    return _float(text, lambda v: v > 0, "> 0")


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (γ: 0 turns GR off)."""
    return _float(text, lambda v: v >= 0, ">= 0")


def device(text: str) -> str:
    """A torch device this process can allocate on (``cpu``, ``cuda``, ``cuda:1`` ...)."""
    import torch

    try:
        torch.empty(0, device=torch.device(text))
    except Exception as err:  # bad name, CPU-only torch, index out of range: each raises its own type
        hint = " (this torch has no usable CUDA device: use --device cpu)" if "cuda" in text.lower() else ""
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise argparse.ArgumentTypeError(f"device {text!r} is not usable here{hint}: {first}") from None
    return text
