"""``grkernels`` command line: ``demo`` (the reward-hacking experiment), ``quickstart`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "the reward-hacking experiment: none / KL / KL+resets / GR / GR+KL (see README)",
        "quickstart": "a tiny model trained a few dozen steps with GradReg(AdamW), printing GR diagnostics",
        "bench": "GPU benchmarks of the GR-step and loss kernels (writes JSON under bench/results)",
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
    else:
        from grkernels.bench_cli import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
