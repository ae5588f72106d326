"""GR with a Lightning-style closure: ``optimizer.step(closure)`` (Lightning is not needed to run this).

PyTorch Lightning's automatic optimization hands the optimizer a closure and calls
``optimizer.step(closure=closure)``; the closure runs ``training_step`` (forward), ``optimizer.zero_grad()``,
then ``backward`` and returns the loss. ``GradReg.step(closure)`` calls it twice (at θ and at θ + ε·clip(g1),
with the RNG replayed), restores θ and steps the base optimizer: so in Lightning, return
``GradReg(torch.optim.AdamW(self.parameters(), ...), strength=..., eps=...)`` from
``configure_optimizers`` and nothing else changes. This file reproduces that contract without importing
Lightning, so it runs (and is tested) anywhere:

    python examples/lightning_style.py

Caveats with Lightning itself: gradient clipping configured on the Trainer (``gradient_clip_val``) runs inside
Lightning's closure wrapper, i.e. on g1 and g2 separately, not on the combined gradient (use GradReg's
``g1_clip``/``g2_clip``); ``accumulate_grad_batches > 1`` only replays the last micro-batch (use manual
optimization with the two-phase API, as in ``examples/plain_loop.py``); fp16 ``precision="16-mixed"`` uses a
GradScaler, which GradReg refuses (use ``"bf16-mixed"``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from grkernels import GradReg


class TinyModule(nn.Module):
    """What a LightningModule would be: a model, ``training_step`` and ``configure_optimizers``."""

    def __init__(self, strength: float = 1e-1, eps: float = 1e-3, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
        self.strength, self.eps, self.lr = strength, eps, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return GradReg(torch.optim.AdamW(self.parameters(), lr=self.lr), strength=self.strength, eps=self.eps,
                       g1_clip=None, g2_clip=None)


def fit(module: TinyModule, batches: list, epochs: int = 1) -> list[float]:
    """Lightning's automatic-optimization loop, reduced to its optimizer contract."""
    optimizer = module.configure_optimizers()
    module.train()
    losses = []
    for _ in range(epochs):
        for batch_idx, batch in enumerate(batches):
            def closure(batch=batch, batch_idx=batch_idx):
                loss = module.training_step(batch, batch_idx)  # forward
                optimizer.zero_grad()  # Lightning zeroes inside the closure, before backward
                loss.backward()
                return loss

            losses.append(float(optimizer.step(closure=closure).detach()))  # GradReg calls the closure twice
    return losses


def make_batches(n: int = 10, size: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=g)
        out.append((x, torch.sin(x @ w) + 0.05 * torch.randn(size, generator=g)))
    return out


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--strength", type=float, default=1e-1)
    args = ap.parse_args(argv)
    losses = fit(TinyModule(strength=args.strength), make_batches(), epochs=args.epochs)
    print(f"first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
