"""GR in a Hugging Face Accelerate loop with gradient accumulation: ``GradRegWindow``.

    python examples/accelerate_loop.py --steps 20 --grad-accum 2
    accelerate launch --num_processes 2 --cpu examples/accelerate_loop.py     # DDP

``accelerator.accumulate()`` skips ``optimizer.step()`` (and so any closure) on the micro-batches that do not end a
window: ``opt.step(closure)`` there would give GR of the last micro-batch only. ``GradRegWindow.step(batch,
loss_fn)`` is called once per micro-batch instead: it runs the backward at θ inside ``accelerator.accumulate``,
and at the end of each window replays the window's micro-batches at θ + ε·clip(g1) with their RNG states (all but
the last under ``no_sync``, so g1 and g2 are each all-reduced once), restores θ, clips the combined gradient and
steps once (grkernels.integrations.accelerate). The GR settings go to the window (``grad_reg=dict(...)``, the
schema's: ``grkernels.settings``; ``--strength auto`` holds gr_rel at ``--target-rel``), which wraps the prepared
AdamW in ``GradReg``; ``window.metrics()`` gives the logged values (means over the steps since its last call).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from grkernels.integrations.accelerate import GradRegWindow

VOCAB = 16


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def cyclic_data(n: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % VOCAB


def nll(model, ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    return -logp.gather(-1, ids[:, 1:, None]).mean()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    # GR's flags default to the schema's defaults (grkernels.settings): the recommended set
    ap.add_argument("--strength", type=lambda t: t if t == "auto" else float(t), default="auto",
                    help='γ, or "auto" (held at --target-rel)')
    ap.add_argument("--target-rel", type=float, default=3.0)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--eps-mode", choices=["radius", "absolute"], default="radius")
    ap.add_argument("--max-grad-norm", type=float, default=None, help="clip the combined gradient")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.grad_accum)
    model = tiny_lm(args.seed)
    data = cyclic_data(args.steps * args.grad_accum * args.micro_batch * accelerator.num_processes, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch, shuffle=False)
    model, opt, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=args.lr), loader)
    model.train()

    # exclude=None: the paper's exclusion (embeddings and output head get the plain gradient)
    window = GradRegWindow(accelerator, model, opt, max_grad_norm=args.max_grad_norm,
                           grad_reg=dict(strength=args.strength, target_rel=args.target_rel, eps=args.eps,
                                         eps_mode=args.eps_mode, exclude=None))
    history: dict[str, list[float]] = {"loss": [], "gr_rel": [], "strength": []}
    total = 0.0
    for k, ids in enumerate(loader):
        total += window.step(ids, nll) / args.grad_accum  # backward at θ; at a window's end also θ' and the step
        if (k + 1) % args.grad_accum:
            continue
        step = (k + 1) // args.grad_accum - 1
        history["loss"].append(float(accelerator.reduce(total, reduction="mean")))
        logged = window.metrics()  # this step's (one step since the last call)
        history["gr_rel"].append(logged["grad_reg/gr_rel"])
        history["strength"].append(logged["grad_reg/strength"])
        total = 0.0
        if accelerator.is_main_process and not args.quiet and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {history['loss'][-1]:.4f}  |GR-g1|/|g1| {history['gr_rel'][-1]:.3g}")
    history["params"] = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    return history


if __name__ == "__main__":
    main()
