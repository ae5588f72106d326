"""A real quick-start: a tiny causal transformer trained a few dozen steps with GradReg around AdamW.

GR runs at the schema's defaults (``grkernels.settings``: the adaptive strength holding gr_rel at target_rel, a
radius ε) unless the flags say otherwise. Prints the loss and GR's diagnostics per step: ‖g1‖, ‖GR − g1‖/‖g1‖ (how
much GR changes the gradient), the γ in use, and the realised perturbation ratio ‖θ' − θ‖/‖ε·v‖ (how much of the
perturbation survived rounding).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from grkernels import GradReg, paper_exclude
from grkernels.argtypes import device, nonnegative_float, positive_float, positive_int
from grkernels.settings import EPS_MODES, SETTINGS

DEFAULTS = {s.name: s.default for s in SETTINGS}


def strength(text: str) -> float | str:
    """``--strength``: "auto" (the adaptive strength) or γ, a finite number >= 0 (0: no GR)."""
    return "auto" if text == "auto" else nonnegative_float(text)


class TinyLM(nn.Module):
    """Token embedding, a stack of pre-norm transformer blocks with dropout, and an untied output head."""

    def __init__(
        self, vocab: int = 32, dim: int = 64, layers: int = 2, heads: int = 4, ctx: int = 32, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.lm_head(self.norm(self.blocks(x, mask=causal, is_causal=True)))


def markov_batch(gen: torch.Generator, trans: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Sequences from a fixed random Markov chain: something learnable, built in code (no downloads)."""
    ids = torch.empty(batch, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, trans.shape[0], (batch,), generator=gen)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(trans[ids[:, t - 1]], 1, generator=gen).squeeze(1)
    return ids


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="grkernels quickstart", description=__doc__)
    ap.add_argument("--steps", type=positive_int, default=40, help="optimizer steps (>= 1)")
    ap.add_argument("--strength", type=strength, default=DEFAULTS["strength"],
                    help='γ (0: no GR), or "auto": γ adjusted each step so that ‖GR − g1‖/‖g1‖ holds --target-rel '
                         f"(default {DEFAULTS['strength']!r})")
    ap.add_argument("--target-rel", type=positive_float, default=DEFAULTS["target_rel"],
                    help=f"--strength auto: the ‖GR − g1‖/‖g1‖ to hold (default {DEFAULTS['target_rel']})")
    ap.add_argument("--eps", type=positive_float, default=DEFAULTS["eps"],
                    help=f"ε (default {DEFAULTS['eps']}; a radius ‖θ' − θ‖ with --eps-mode radius)")
    ap.add_argument("--eps-mode", choices=EPS_MODES, default=DEFAULTS["eps_mode"],
                    help=f"how ε sets the perturbation (default {DEFAULTS['eps_mode']!r})")
    ap.add_argument("--lr", type=positive_float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = 32
    trans = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=gen), dim=-1)
    model = TinyLM(vocab).to(args.device)
    opt = GradReg(
        torch.optim.AdamW(model.parameters(), lr=args.lr),
        strength=args.strength,
        target_rel=args.target_rel,
        eps=args.eps,
        eps_mode=args.eps_mode,
        exclude=paper_exclude(model),
    )
    gamma = f"auto, target ‖GR − g1‖/‖g1‖ = {args.target_rel}" if args.strength == "auto" else args.strength
    print(f"TinyLM: {sum(p.numel() for p in model.parameters()):,} parameters on {args.device}; "
          f"GradReg(γ={gamma}, ε={args.eps} {args.eps_mode}) around AdamW(lr={args.lr}), embeddings and head "
          "excluded")
    print(f"{'step':>4} {'loss':>8} {'|g1|':>8} {'|GR-g1|/|g1|':>13} {'γ':>9} {'realised/intended':>17} {'ms':>6}")
    for step in range(args.steps):
        ids = markov_batch(gen, trans, 16, 24).to(args.device)

        def closure() -> torch.Tensor:
            logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
            loss.backward()
            return loss

        t0 = time.perf_counter()
        loss = opt.step(closure)
        ms = 1e3 * (time.perf_counter() - t0)
        m = opt.metrics()
        print(f"{step:>4} {loss.item():>8.4f} {m['g1_norm']:>8.4f} {m['gr_rel']:>13.4f} {m['strength']:>9.3g} "
              f"{m['perturb_ratio']:>17.4f} {ms:>6.1f}")
    entropy_floor = -(trans * trans.log()).sum(-1).mean().item()
    print(f"done: final loss {loss.item():.4f} (the chain's mean entropy, the floor, is {entropy_floor:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
