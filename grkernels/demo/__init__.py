"""``grkernels demo``: a reward-hacking experiment small enough for a 2-core CPU.

A tiny policy is trained with GRPO against a learned proxy reward while a hidden gold reward
measures what the proxy was meant to capture (Gao et al. 2022, "Scaling laws for reward model
overoptimization"). Methods compared: no regularisation, a KL penalty, KL with reference resets,
gradient regularisation (GR, ``grkernels.GradReg``) and GR + KL, in several "worlds" (ways for the
proxy to be wrong): two over a Markov-chain policy (collapse, rare) and two over a policy pretrained
on a small synthetic language (format: a verifiable reward with a format term; judge: a learned
judge with a spurious feature). ``--sweep`` compares methods as frontiers over their strength.
Everything is built in code; nothing is downloaded.

Entry point: :func:`grkernels.demo.cli.main` (``grkernels demo --help``).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the demo from command-line arguments (see ``grkernels demo --help``)."""
    from grkernels.demo.cli import main as _main

    return _main(argv)
