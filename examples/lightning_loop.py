"""GR in PyTorch Lightning with gradient accumulation and clipping: ``GradRegCallback``.

    python examples/lightning_loop.py --epochs 5 --accumulate 3 --clip 1.0

``configure_optimizers`` returns a plain AdamW and the callback (grkernels.integrations.lightning) gets the GR
settings (``grkernels.settings``; ``--strength auto`` holds gr_rel at ``--target-rel``). It wraps the optimizer,
replays every micro-batch of each accumulation window at θ + ε·clip(g1) with its RNG state (same dropout masks),
restores θ bitwise and hands Lightning g1 + (γ/ε)(g2 − g1): Lightning then clips that combined gradient
(``gradient_clip_val``) and steps once per window (``global_step`` counts optimizer steps). ``training_step`` is
plain Lightning. Use ``--precision bf16-mixed`` (or 32), not ``"16-mixed"`` (GR refuses a GradScaler).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from grkernels.integrations.lightning import GradRegCallback


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # GradRegCallback wraps it in GradReg


def make_loader(n: int = 240, batch: int = 16, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, generator=g)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ w) + 0.05 * torch.randn(n, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--accumulate", type=int, default=3)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val (on the combined gradient)")
    # GR's flags default to the schema's defaults (grkernels.settings): the recommended set
    ap.add_argument("--strength", type=lambda t: t if t == "auto" else float(t), default="auto",
                    help='γ, or "auto" (held at --target-rel)')
    ap.add_argument("--target-rel", type=float, default=3.0)
    ap.add_argument("--eps", type=float, default=0.02, help="ε, a radius ‖θ' − θ‖ (eps_mode radius, the default)")
    ap.add_argument("--precision", default="32-true", help='"32-true" or "bf16-mixed"')
    args = ap.parse_args(argv)
    module, losses = Regressor(), []

    class EpochLoss(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["train_loss"]))

    # the output layer ("net.3") gets the plain gradient, as the paper leaves the head out of GR
    gr = GradRegCallback(strength=args.strength, target_rel=args.target_rel, eps=args.eps, exclude=["net.3"])
    trainer = L.Trainer(max_epochs=args.epochs, accumulate_grad_batches=args.accumulate,
                        gradient_clip_val=args.clip, precision=args.precision, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[gr, EpochLoss()])
    trainer.fit(module, make_loader())
    gr_rel = float(trainer.callback_metrics["grad_reg/gr_rel"])
    print(f"epoch loss {losses[0]:.4f} -> {losses[-1]:.4f}; {trainer.global_step} optimizer steps; "
          f"last |GR-g1|/|g1| {gr_rel:.3g}")
    return {"losses": losses, "global_step": trainer.global_step, "gr_rel": gr_rel,
            "strength": float(trainer.callback_metrics["grad_reg/strength"])}


if __name__ == "__main__":
    main()
