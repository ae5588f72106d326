"""GR in a plain PyTorch loop: the closure API, the two-phase API with gradient accumulation, and the
reference-reset KL baseline.

    python examples/plain_loop.py --steps 30 --grad-accum 2          # GR at the defaults: --strength auto

A tiny causal LM (Llama from a config, no downloads) learns cyclic token sequences; the loss is next-token
cross-entropy plus ``beta`` times a KL penalty towards a reference model that ``ReferenceReset`` moves to the
policy every ``--reset-every`` steps. Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grkernels import GradReg, paper_exclude
from grkernels.integrations.reference_reset import ReferenceReset

VOCAB = 16


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def cyclic_batch(n: int, length: int = 12, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sequences start, start+step, start+2·step, ... (mod VOCAB): learnable next-token structure."""
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


def lm_loss(model, ref, ids: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean next-token cross-entropy + beta · KL(π ‖ π_ref) per token (exact KL over the vocabulary)."""
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    if beta == 0.0:
        return nll
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref(input_ids=ids).logits[:, :-1].float(), -1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
    return nll + beta * kl


def strength(text: str) -> float | str:
    """``--strength``: a number (γ) or "auto" (the adaptive strength, holding gr_rel at ``--target-rel``)."""
    return text if text == "auto" else float(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (1: closure API)")
    ap.add_argument("--lr", type=float, default=3e-3)
    # GR's flags default to the schema's defaults (grkernels.settings): the recommended set
    ap.add_argument("--strength", type=strength, default="auto", help='GR strength gamma, or "auto"')
    ap.add_argument("--target-rel", type=float, default=3.0, help='--strength auto: the gr_rel to hold')
    ap.add_argument("--eps", type=float, default=0.02, help="GR finite-difference step epsilon")
    ap.add_argument("--eps-mode", choices=["radius", "absolute"], default="radius",
                    help="radius: ‖θ' − θ‖ = eps; absolute: θ' − θ = eps·clip(g1)")
    ap.add_argument("--beta", type=float, default=0.05, help="KL penalty weight (0: no reference model)")
    ap.add_argument("--reset-every", type=int, default=10, help="reference reset period in steps")
    ap.add_argument("--alpha", type=float, default=1.0, help="reference mixing factor (1: hard reset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    model = tiny_lm(args.seed)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    resetter = ReferenceReset(ref, model, every=args.reset_every, alpha=args.alpha)
    # embeddings and output head get the plain gradient (paper_exclude)
    opt = GradReg(torch.optim.AdamW(model.parameters(), lr=args.lr), strength=args.strength, eps=args.eps,
                  eps_mode=args.eps_mode, target_rel=args.target_rel, exclude=paper_exclude(model))
    gen = torch.Generator().manual_seed(args.seed)
    history: dict[str, list[float]] = {"loss": [], "gr_rel": []}
    for step in range(args.steps):
        ids = cyclic_batch(args.batch, generator=gen)
        if args.grad_accum == 1:
            def closure():
                loss = lm_loss(model, ref, ids, args.beta)
                loss.backward()
                return loss

            loss = opt.step(closure).detach()  # evaluates at θ and at θ + ε·g1, restores θ, steps AdamW
        else:
            micro = ids.chunk(args.grad_accum)
            loss = 0.0
            for mb in micro:  # first pass at θ: .grad accumulates g1
                mb_loss = lm_loss(model, ref, mb, args.beta) / len(micro)
                mb_loss.backward()
                loss += mb_loss.detach()
            for _ in range(opt.extra_passes):  # 0 during warmup / strength 0
                opt.perturb()  # θ' = θ + ε·clip(g1) on GR parameters, .grad zeroed
                for mb in micro:  # the SAME micro-batches again: .grad accumulates g2
                    (lm_loss(model, ref, mb, args.beta) / len(micro)).backward()
            opt.step()  # restore θ bitwise, .grad = g1 + (γ/ε)(g2 − g1), AdamW step
        opt.zero_grad()
        resetter.step()
        m = opt.metrics()
        history["loss"].append(float(loss))
        history["gr_rel"].append(m.get("gr_rel", 0.0))
        if not args.quiet and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {float(loss):.4f}  |GR-g1|/|g1| {m.get('gr_rel', 0.0):.3g}  "
                  f"resets {resetter.resets}")
    history["resets"] = resetter.resets
    return history


if __name__ == "__main__":
    main()
