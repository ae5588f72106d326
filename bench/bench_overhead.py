"""End-to-end cost of a GR step over a plain step on a small transformer (CPU-sized; runs on GPU too).

    make bench            # or: .venv/bin/python -m pytest bench/bench_overhead.py --benchmark-enable

A plain step is one forward/backward and an AdamW step; a GR step (forward estimator) adds a second
forward/backward at θ + ε·g1 plus the perturb/restore/combine work, so the floor of the ratio is about 2 for
models whose step time is dominated by forward/backward. The ratio is printed at the end of the run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grkernels import GradReg, paper_exclude
from grkernels.quickstart import TinyLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB, BATCH, SEQ = 256, 8, 64
_means: dict[str, float] = {}


def _setup(kind: str):
    torch.manual_seed(0)
    model = TinyLM(vocab=VOCAB, dim=128, layers=2, heads=4, ctx=SEQ).to(DEVICE)
    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=DEVICE)

    def closure():
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    if kind == "plain":

        def step():
            base.zero_grad()
            closure()
            base.step()

    else:
        opt = GradReg(base, strength=0.1, eps=1e-2, exclude=paper_exclude(model),
                      estimator=kind.split("-")[1], backend="torch")
        def step():
            opt.step(closure)

    return step


@pytest.mark.parametrize("kind", ["plain", "gr-forward", "gr-central"])
def test_step_time(benchmark, kind):
    step = _setup(kind)
    step()  # warm-up (allocations, first-call overheads)
    benchmark.group = f"GR overhead, TinyLM 2x128, batch {BATCH}x{SEQ}, {DEVICE}"
    benchmark.pedantic(step, rounds=15 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        _means[kind] = benchmark.stats.stats.median


def test_print_ratio(benchmark):
    benchmark.pedantic(lambda: None, rounds=1)  # keeps this test in --benchmark-only runs
    if {"plain", "gr-forward"} <= _means.keys():
        for kind in ("gr-forward", "gr-central"):
            if kind in _means:
                print(f"\n{kind}: {_means[kind] * 1e3:.2f} ms vs plain {_means['plain'] * 1e3:.2f} ms "
                      f"-> ratio {_means[kind] / _means['plain']:.2f}x (median of rounds, {DEVICE})")
