"""GR in a Hugging Face Accelerate loop, with gradient accumulation (works the same under DDP launches).

    python examples/accelerate_loop.py --steps 20 --grad-accum 2
    accelerate launch --num_processes 2 --cpu examples/accelerate_loop.py     # DDP

``accelerator.prepare`` wraps the ``GradReg`` in an ``AcceleratedOptimizer`` whose ``step()`` calls
``GradReg.step()``; the two-phase API (``perturb``) is called on the ``GradReg`` itself. Micro-batches other
than the last of a window run under ``accelerator.no_sync`` in BOTH passes, so g1 and g2 are each all-reduced
exactly once per optimizer step.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from grkernels import GradReg, paper_exclude

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
    ap.add_argument("--strength", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = tiny_lm(args.seed)
    gr = GradReg(torch.optim.AdamW(model.parameters(), lr=args.lr), strength=args.strength, eps=args.eps,
                 exclude=paper_exclude(model))  # exclude the tensors before prepare() may wrap the model
    data = cyclic_data(args.steps * args.grad_accum * args.micro_batch * accelerator.num_processes, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch, shuffle=False)
    model, opt, loader = accelerator.prepare(model, gr, loader)  # opt: AcceleratedOptimizer around gr

    def window_backward(window: list[torch.Tensor]) -> torch.Tensor:
        """Forward/backward over one accumulation window; only the last micro-batch all-reduces (DDP)."""
        total = 0.0
        for k, ids in enumerate(window):
            last = k == len(window) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = nll(model, ids) / len(window)
                accelerator.backward(loss)
            total += loss.detach()
        return total

    history: dict[str, list[float]] = {"loss": [], "gr_rel": []}
    it = iter(loader)
    for step in range(args.steps):
        window = [next(it) for _ in range(args.grad_accum)]
        loss = window_backward(window)  # g1
        for _ in range(gr.extra_passes):
            gr.perturb()
            window_backward(window)  # g2 at θ + ε·clip(g1)
        opt.step()  # AcceleratedOptimizer -> GradReg.step(): restore θ, combine, AdamW step
        opt.zero_grad()
        m = gr.metrics()
        history["loss"].append(float(accelerator.reduce(loss, reduction="mean")))
        history["gr_rel"].append(m.get("gr_rel", 0.0))
        if accelerator.is_main_process and not args.quiet and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {history['loss'][-1]:.4f}  |GR-g1|/|g1| {history['gr_rel'][-1]:.3g}")
    history["params"] = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    return history


if __name__ == "__main__":
    main()
