"""GR under FSDP2 (``fully_shard``), 2 CPU processes with gloo: ``torchrun --nproc_per_node 2 fsdp2_worker.py OUT``.

One process start runs every case (start-up dominates the cost). For each case in ``CASES`` the worker trains a
fully-sharded copy of ``make_model()`` for ``STEPS`` AdamW steps on its half of each global batch and writes the
gathered parameters and the metrics of every step to ``OUT/<case>_rank<r>.pt``; ``tests/test_fsdp2.py`` compares
them with a single-process run over the whole batch (``train_single``). The bf16 mixed-precision, FSDP1 and
exact-estimator checks write their findings to ``OUT/checks_rank<r>.pt``. ``OUT/done_rank<r>`` marks a worker
that got to the end.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton case on CPU tensors (before triton is imported)

from torch import nn  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
LR = 1e-2

#: case -> GradReg settings (+ "mesh": "hsdp", "reshard_after_forward": False, "micro": 2 for accumulation,
#: "subset": True for the sub-batch pass on the first micro-batch); ε absolute unless a case says radius (the
#: schema's default)
ABS = dict(strength=0.5, eps=1e-2, eps_mode="absolute")
CASES: dict[str, dict[str, Any]] = {
    "plain": dict(ABS, g1_clip=None, g2_clip=None),
    "clip": dict(ABS, g1_clip=0.3, g2_clip=0.3),
    "radius": dict(strength=0.5, eps=1e-2, g1_clip=0.3, g2_clip=0.3, eps_mode="radius"),
    "central": dict(ABS, g1_clip=0.3, g2_clip=0.3, estimator="central"),
    "hsdp": dict(strength=0.5, eps=1e-2, g1_clip=0.3, g2_clip=0.3, eps_mode="radius", mesh="hsdp"),
    "no_reshard": dict(ABS, g1_clip=0.3, g2_clip=0.3, reshard_after_forward=False),
    "accumulate": dict(ABS, g1_clip=0.3, g2_clip=0.3, micro=2),
    "triton": dict(strength=0.5, eps=1e-2, g1_clip=0.3, g2_clip=0.3, eps_mode="radius", backend="triton"),
    # cheaper GR (issue 13): steps full, reuse, full (the stored correction is each rank's shard of it)
    "reuse": dict(ABS, g1_clip=0.3, g2_clip=0.3, every=2, reuse="orthogonal"),
    "subset": dict(ABS, g1_clip=0.3, g2_clip=0.3, micro=2, subset=True),
    # GradReg built on the unsharded model, its parameters then swapped for the sharded ones the way Accelerate's
    # FSDP2 prepare does it (the exclusion must follow the swap)
    "late_shard": dict(ABS, g1_clip=0.3, g2_clip=0.3, late_shard=True),
}
_WORKER_ONLY = ("mesh", "reshard_after_forward", "micro", "subset", "late_shard")


def accelerate_style_shard(model: nn.Module, opt, shard: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Shard ``model`` after ``opt`` was built, as ``Accelerator.prepare`` does under FSDP2 (accelerate 1.x
    ``_prepare_fsdp2``): the optimizer's parameters become placeholders carrying the old data pointers, the model
    is sharded, and accelerate's own ``fsdp2_switch_optimizer_parameters`` puts the sharded parameters in place."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    old = {n: p.data_ptr() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            group["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
            group["params"][i].data_ptr = p.data_ptr()
    model = shard(model)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(opt, {old[n]: new[n] for n in old})
    return model


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Odd widths, so that shards are uneven (13 rows: 7 + 6)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 9), nn.Tanh(), nn.Linear(9, 2)).to(dtype)


def make_data(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=dtype)
    return x, torch.sin(3 * x[:, :2])


def make_opt(model: nn.Module, settings: dict[str, Any]):
    from grkernels import GradReg

    kw = {k: v for k, v in settings.items() if k not in _WORKER_ONLY}
    return GradReg(torch.optim.AdamW(model.parameters(), lr=LR), exclude=[model[4].bias], **kw)


def run_steps(model: nn.Module, opt, batches, micro: int, before_perturb: Callable[[], None] | None = None,
              sync: Callable[[bool], None] | None = None, subset: bool = False) -> list[dict[str, float]]:
    """Two-phase GR steps; ``batches[s]`` = this process's (x, y) of step s, split into ``micro`` micro-batches.
    Loss: mean over the process's rows (FSDP2 averages gradients over ranks: the global mean). ``subset``:
    sub-batch GR, the perturbed pass on the first micro-batch only (taken first, ``mark_subset(1 / micro)``)."""
    out = []
    for x, y in batches:
        parts = list(zip(x.chunk(micro), y.chunk(micro)))

        def window(ks):
            for k in ks:
                if sync is not None:
                    sync(k == micro - 1)  # reduce gradients on the last micro-batch only, in both passes
                (nn.functional.mse_loss(model(parts[k][0]), parts[k][1]) / micro).backward()

        if subset:
            window([0])
            opt.mark_subset(1 / micro)
            window(range(1, micro))
        else:
            window(range(micro))
        for _ in range(opt.extra_passes):
            if before_perturb is not None:
                before_perturb()
            opt.perturb()
            window([0] if subset else range(micro))
        opt.step()
        opt.zero_grad()
        out.append(opt.metrics())
    return out


def train_single(case: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """The reference: one process over the global batch, torch backend."""
    settings = {**CASES[case], "backend": "torch"}
    model = make_model()
    opt = make_opt(model, settings)
    micro, data = settings.get("micro", 1), [make_data(s) for s in range(STEPS)]
    if settings.get("subset"):  # the rows of the 2 ranks' first micro-batches first: the same global subset
        order = torch.arange(GLOBAL_BATCH).view(2, micro, -1).transpose(0, 1).reshape(-1)
        data = [(x[order], y[order]) for x, y in data]
    metrics = run_steps(model, opt, data, micro, subset=settings.get("subset", False))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, metrics


def _shard(model: nn.Module, mesh, reshard_after_forward: bool = True, mp=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def run_case(case: str, rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    settings = CASES[case]
    if settings.get("mesh") == "hsdp":  # 2 replicas of 1 shard: the norm must not be summed over replicas
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    if settings.get("late_shard"):
        model = make_model()
        opt = make_opt(model, settings)
        model = accelerate_style_shard(model, opt, lambda m: _shard(m, mesh))
    else:
        model = _shard(make_model(), mesh, settings.get("reshard_after_forward", True))
        opt = make_opt(model, settings)
    micro = settings.get("micro", 1)
    batches = [tuple(t.chunk(world)[rank] for t in make_data(s)) for s in range(STEPS)]
    before = None
    if settings.get("reshard_after_forward") is False:
        def before():  # leaves the parameters unsharded: GR must reshard before writing the shards
            with torch.no_grad():
                model(batches[0][0])
    # the sub-batch pass needs the subset's gradient reduced when it is marked: every micro-batch synchronised
    sync = model.set_requires_gradient_sync if micro > 1 and not settings.get("subset") else None
    metrics = run_steps(model, opt, batches, micro, before, sync, settings.get("subset", False))
    torch.save({"params": _full(model), "metrics": metrics}, os.path.join(out, f"{case}_rank{rank}.pt"))


def run_checks(rank: int, world: int, out: str) -> None:
    """bf16 mixed precision (perturbation survives the cast, fp32 shards restored bitwise), FSDP1 and
    exact-estimator refusals."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy

    from grkernels import GradReg

    found: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world,))
    x, y = (t.chunk(world)[rank] for t in make_data(0))
    for rounding in ("stochastic", "nearest"):
        model = make_model()
        with torch.no_grad():  # fp32 masters off the bf16 grid, as after a few optimizer steps
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = _shard(model, mesh, mp=mp)
        opt = GradReg(torch.optim.AdamW(model.parameters(), lr=LR), strength=0.5, eps=1e-3, eps_mode="absolute",
                      g1_clip=None, g2_clip=None, rounding=rounding, backend="torch")
        nn.functional.mse_loss(model(x), y).backward()
        before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        opt.perturb()
        moved = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        nn.functional.mse_loss(model(x), y).backward()
        opt.restore_and_combine()
        after = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        found[rounding] = {
            "perturb_ratio": float(opt.metrics(sync=False)["perturb_ratio"]),
            "on_bf16_grid": all(torch.equal(m, m.bfloat16().float()) for m in moved.values()),
            "restored_bitwise": all(torch.equal(before[n], after[n]) for n in before),
            "moved": sum(int((moved[n] != before[n].bfloat16().float()).sum()) for n in before),
        }
        opt.step()
    # the exact estimator needs the gradient's graph, which FSDP2's reduction does not keep: refused clearly
    model = _shard(make_model(), mesh)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=LR), strength=0.5, eps=1e-2, estimator="exact")
    nn.functional.mse_loss(model(x), y).backward(create_graph=True)
    try:
        opt.step()
        found["exact"] = "accepted"
    except NotImplementedError as err:
        found["exact"] = str(err)
    # FSDP1: flat local shards; refused at construction
    fsdp1 = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))
    try:
        GradReg(torch.optim.SGD(fsdp1.parameters(), lr=LR), strength=0.5, eps=1e-2)
        found["fsdp1"] = "accepted"
    except NotImplementedError as err:
        found["fsdp1"] = str(err)
    del fsdp1
    dist.barrier()
    torch.save(found, os.path.join(out, f"checks_rank{rank}.pt"))


def main(out: str) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for case in CASES:
            run_case(case, rank, world, out)
        run_checks(rank, world, out)
        open(os.path.join(out, f"done_rank{rank}"), "w").close()
    except BaseException:
        traceback.print_exc()
        with open(os.path.join(out, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
