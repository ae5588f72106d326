"""Fidelity of the GR Hessian-vector estimate under FSDP2 with bf16 mixed precision (2 processes).

The model, batch and float64 reference of ``bench/fidelity.py`` (a 0.53M-parameter Llama, weights N(0, 0.02)),
but trained as verl does: fp32 sharded parameters, ``fully_shard`` per decoder layer and at the root,
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; each rank holds half of the batch. FSDP2 casts the
fp32 shards to bf16 with round-to-nearest before the all-gather; GradReg writes SR(rn_bf16(θ) + ε·v) into the
fp32 shard (bf16-exact, so the cast keeps it) and restores the shard bitwise. Per ε:

    estimate = (GR gradient − g1) / γ,   cos / rel against the float64 double-backprop H·g1 at rn_bf16(θ)

Rows: fp32 masters on the bf16 grid (as after loading a bf16 checkpoint: the single-process table's weights) and
off it (masters moved by N(0, 1e-4), as after optimizer steps), forward/central, stochastic/nearest rounding, and
``perturb_ratio`` = ‖θ' − rn_bf16(θ)‖/‖ε·v‖ as GradReg reports it.

    .venv/bin/torchrun --nproc_per_node 2 bench/fidelity_fsdp2.py   # CPU, ~2 min; results/cpu_fidelity_fsdp2.json
    .venv/bin/torchrun --nproc_per_node 2 bench/fidelity_fsdp2.py --memory-only   # GradReg's extra bytes per rank
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from fidelity import EPS_SWEEP, GAMMA, batch, flat, loss_of, make_model, seed_mean  # noqa: E402

VARIANTS = [  # (label, estimator, rounding, off_grid)
    ("FSDP2 bf16 MP, forward, stochastic (default)", "forward", "stochastic", False),
    ("FSDP2 bf16 MP, forward, nearest", "forward", "nearest", False),
    ("FSDP2 bf16 MP, central, stochastic", "central", "stochastic", False),
    ("FSDP2 bf16 MP, masters off the grid, forward, stochastic", "forward", "stochastic", True),
]
SEEDS = (0, 1)


def masters(seed: int, off_grid: bool) -> torch.nn.Module:
    model = make_model(seed, torch.float32, "cpu")
    if off_grid:
        g = torch.Generator().manual_seed(77 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-4)
    return model


def reference(seed: int, off_grid: bool) -> torch.Tensor:
    """float64 H·g1 at the weights the bf16 model computes with, rn_bf16(θ), over the global batch."""
    model = masters(seed, off_grid)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model = model.double()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model, batch(seed, "cpu")), params, create_graph=True)
    return flat(torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads]))


def estimate(seed: int, estimator: str, rounding: str, off_grid: bool, eps: float, mesh,
             memory: dict | None = None) -> tuple[torch.Tensor, float]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from grkernels import GradReg

    model = masters(seed, off_grid)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    ids = batch(seed, "cpu").chunk(dist.get_world_size())[dist.get_rank()]
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.0), strength=GAMMA, eps=eps, g1_clip=None, g2_clip=None,
                  estimator=estimator, rounding=rounding, backend="torch", seed=seed)
    loss_of(model, ids).backward()
    params = list(model.parameters())
    g1 = flat(p.grad.full_tensor() for p in params)
    for _ in range(opt.extra_passes):
        opt.perturb()
        loss_of(model, ids).backward()
    opt.restore_and_combine()
    if memory is not None:  # bytes GradReg holds on this rank, against the parameters in the whole model
        memory["extra_bytes_rank"] = opt.extra_memory_bytes()
        memory["local_params"] = sum(p.to_local().numel() for p in params)
        memory["global_params"] = sum(p.numel() for p in params)
    est = (flat(p.grad.full_tensor() for p in params) - g1) / GAMMA
    return est, opt.metrics()["perturb_ratio"]


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    mem: dict = {}
    estimate(0, "forward", "stochastic", False, 1e-2, mesh, memory=mem)
    mems = [None] * dist.get_world_size()
    dist.all_gather_object(mems, mem)
    if rank == 0:
        print("extra bytes per rank:", [m["extra_bytes_rank"] for m in mems], "local params:",
              [m["local_params"] for m in mems], "global params:", mem["global_params"], flush=True)
    if "--memory-only" in sys.argv:
        dist.destroy_process_group()
        return
    refs = {(s, off): reference(s, off) for s in SEEDS for off in (False, True)}
    rows = []
    for label, est_name, rounding, off in VARIANTS:
        row = {"variant": label, "eps": {}}
        for eps in EPS_SWEEP:
            row["eps"][f"{eps:g}"] = seed_mean(
                (estimate(s, est_name, rounding, off, eps, mesh), refs[(s, off)]) for s in SEEDS
            )
        rows.append(row)
        if rank == 0:
            cells = " | ".join(f"{v['cos']:.2f}/{v['rel']:.2f} ({v['perturb_ratio']:.2f})" for v in row["eps"].values())
            print(f"| {label} | {cells} |", flush=True)
    if rank == 0:
        out = Path(__file__).parent / "results" / "cpu_fidelity_fsdp2.json"
        out.write_text(json.dumps({"world": dist.get_world_size(), "gamma": GAMMA, "seeds": list(SEEDS),
                                   "eps": EPS_SWEEP, "rows": rows, "memory": mems}, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
