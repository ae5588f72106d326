"""``grkernels`` command line: ``demo`` (the reward-hacking experiment), ``quickstart``, ``bench``, ``info`` and
``--version``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from grkernels import bench_cli, quickstart
from grkernels.about import info_main, version_line
from grkernels.argtypes import device, nonnegative_float, positive_float, positive_int
from grkernels.demo import cli as demo_cli

# The flag types live in grkernels.argtypes (the subcommands' parsers use them without importing this dispatcher);
# re-exported here, where they were first defined.
__all__ = ["device", "main", "nonnegative_float", "positive_float", "positive_int"]


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


def _demo_missing(rest: list[str]) -> str | None:
    """Why ``grkernels demo`` with these flags cannot run here, or None. The demo draws its figures with
    matplotlib (the ``demo`` extra, not a dependency of the library): say so before hours of training, not
    after them."""
    if {"-h", "--help", "--no-plot"} & set(rest) or importlib.util.find_spec("matplotlib") is not None:
        return None
    return ("matplotlib is not installed and the demo draws demo.png with it: "
            "pip install 'grkernels[demo]' (or matplotlib), or pass --no-plot for the tables and results.json only")


def main(argv: list[str] | None = None) -> int:
    """``grkernels COMMAND [flags]``: exit status 0 on success, 1 on an error inside a command, 2 on bad flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "the reward-hacking experiment: none / KL / KL+resets / GR / GR+KL (see README)",
        "quickstart": "a tiny model trained a few dozen steps with GradReg(AdamW), printing GR diagnostics",
        "bench": "GPU benchmarks of the GR-step and loss kernels (writes JSON under bench/results)",
        "info": "versions of grkernels, torch, triton and the host packages found; which implementation "
        "(torch / cpp / triton) each op uses here, and why",
    }
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        return 0
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="grkernels", description="Gradient regularization for RL fine-tuning")
        parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
        parser.add_argument(
            "command", choices=sorted(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items())
        )
        parser.parse_args(argv[:1])
        return 2
    command, rest = argv[0], argv[1:]
    if command == "quickstart":
        run = quickstart.main
    elif command == "demo":
        missing = _demo_missing(rest)
        if missing:
            print(f"grkernels demo: error: {missing}", file=sys.stderr)
            return 1
        run = demo_cli.main
    elif command == "info":
        run = info_main
    else:
        run = bench_cli.main
    return _run_cleanly(command, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
