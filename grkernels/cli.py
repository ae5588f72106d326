"""``grkernels`` command line: ``demo`` (the reward-hacking experiment), ``quickstart`` and ``bench``."""

from __future__ import annotations

import argparse
import math
import os
import sys

# ---------------------------------------------------------------- flag types shared by the subcommands
# A bad value is refused while parsing, so the user sees "argument --x: ..." and exit status 2, not a traceback.


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, repeats, sizes)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _float(text: str, ok, what: str) -> float:
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


def _run_cleanly(command: str, run, rest: list[str]) -> int:
    """Run a subcommand; an error it raises becomes one line on stderr and exit status 1 (set GRKERNELS_DEBUG=1
    for the traceback). argparse's own errors (status 2) and --help (0) pass through."""
    try:
        status = run(rest)
    except KeyboardInterrupt:
        print(f"grkernels {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("GRKERNELS_DEBUG", "0") not in ("", "0"):
            raise
        print(f"grkernels {command}: error: {type(err).__name__}: {err} (GRKERNELS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return int(status or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "the reward-hacking experiment: none / KL / KL+resets / GR / GR+KL (see README)",
        "quickstart": "a tiny model trained a few dozen steps with GradReg(AdamW), printing GR diagnostics",
        "bench": "GPU benchmarks of the GR-step and loss kernels (writes JSON under bench/results)",
        "info": "which implementation (torch / cpp / triton) each op uses here, and why",
    }
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="grkernels", description="Gradient regularization for RL fine-tuning")
        parser.add_argument(
            "command", choices=sorted(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items())
        )
        parser.parse_args(argv[:1])
        return 2
    command, rest = argv[0], argv[1:]
    if command == "quickstart":
        from grkernels.quickstart import main as run
    elif command == "demo":
        from grkernels.demo.cli import main as run
    elif command == "info":
        from grkernels.library import info_main as run
    else:
        from grkernels.bench_cli import main as run
    return _run_cleanly(command, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
