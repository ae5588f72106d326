"""GR under DDP on CPU: 2 processes (gloo, torch.multiprocessing spawn).

Each rank gets half of the global batch; DDP averages the gradients of both passes. After a few GR steps the
parameters must be identical on both ranks and equal to a single-process run over the global batch, with the
closure API and with the two-phase API under gradient accumulation (no_sync on all but the last micro-batch
of a window, in both passes): a skipped first-pass sync would make the ranks differ, a doubled or missing
one the single-process comparison. The same holds for the transformers.Trainer mixin (replay of the window
at θ' under the Trainer's DDP set-up).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from grkernels import GradReg

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
GAMMA, EPS = 0.5, 1e-2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def make_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(-1, keepdim=True))


def make_opt(model: nn.Module) -> GradReg:
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=GAMMA, eps=EPS, g1_clip=None,
                   g2_clip=None, exclude=[net[-1].bias])  # one excluded parameter: it must get g1


def train(model: nn.Module, opt: GradReg, batches, mode: str, no_sync=None) -> None:
    """batches[step] = list of (x, y) micro-batches of this process; loss = mean over the process's batch."""
    for micro in batches:
        if mode == "closure":
            (x, y), = micro

            def closure(x=x, y=y):
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            def window():
                for k, (x, y) in enumerate(micro):
                    last = k == len(micro) - 1
                    ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
                    with ctx:
                        (nn.functional.mse_loss(model(x), y) / len(micro)).backward()

            window()
            for _ in range(opt.extra_passes):
                opt.perturb()
                window()
            opt.step()
        opt.zero_grad()


def split(mode: str, rank: int | None):
    """Per step, this process's micro-batches: all of the global batch (rank None) or its half."""
    out = []
    for s in range(STEPS):
        x, y = make_data(s)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        n_micro = 1 if mode == "closure" else 2
        out.append(list(zip(x.chunk(n_micro), y.chunk(n_micro))))
    return out


# ---------------------------------------------------------------- the Trainer mixin under DDP
class _Reg(nn.Module):
    """A model a transformers.Trainer can train: returns {"loss": mse} (the Trainer divides by GA)."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.net(x), y)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        self.y = torch.sin(self.x.sum(-1, keepdim=True))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _train_hf(out_dir: str, per_device: int, ddp: bool) -> dict[str, torch.Tensor]:
    from transformers import Trainer, TrainingArguments

    from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer

    class SeqTrainer(Trainer):  # sequential sampling: the same global batches with 1 or 2 processes
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = grad_reg_config(TrainingArguments)(
        output_dir=out_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True,
        ddp_backend="gloo" if ddp else None, report_to="none", save_strategy="no", dataloader_drop_last=True, seed=0,
        grad_reg_strength=GAMMA, grad_reg_eps=EPS, grad_reg_g1_clip=None, grad_reg_g2_clip=None,
        grad_reg_exclude=["net.4.bias"],
    )
    model = _Reg().double()
    tr = grad_reg_trainer(SeqTrainer)(model=model, args=args, train_dataset=_Rows())
    tr.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str, with_hf: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for mode in ("closure", "accumulate"):
            model = make_model().double()
            ddp = nn.parallel.DistributedDataParallel(model)
            train(ddp, make_opt(ddp), split(mode, rank), mode, no_sync=ddp.no_sync)
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                       os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
        if with_hf:  # the Trainer (via Accelerate) finds the process group initialised and uses it
            torch.save(_train_hf(out_dir, per_device=2, ddp=True), os.path.join(out_dir, f"hf_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


WITH_HF = _has("transformers") and _has("accelerate")




@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process spawn for all DDP checks (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out), WITH_HF), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("mode", ["closure", "accumulate"])
def test_ddp_two_ranks_equal_single_process(ddp_run, mode):
    r0 = torch.load(ddp_run / f"{mode}_rank0.pt")
    r1 = torch.load(ddp_run / f"{mode}_rank1.pt")
    single = make_model().double()
    train(single, make_opt(single), split(mode, None), mode)
    init = dict(make_model().double().named_parameters())
    for n, p in single.named_parameters():
        assert torch.equal(r0[n], r1[n]), f"{mode}: {n} differs between ranks"
        torch.testing.assert_close(r0[n], p.detach(), rtol=1e-9, atol=1e-12, msg=f"{mode}: {n}")
        assert not torch.equal(p.detach(), init[n].detach())  # the run did move the parameters


@pytest.mark.skipif(not WITH_HF, reason="needs transformers and accelerate")
def test_ddp_trainer_mixin_equals_single_process(ddp_run, tmp_path):
    r0, r1 = torch.load(ddp_run / "hf_rank0.pt"), torch.load(ddp_run / "hf_rank1.pt")
    single = _train_hf(str(tmp_path / "single"), per_device=4, ddp=False)
    init = dict(_Reg().double().named_parameters())
    for n, p in single.items():
        assert torch.equal(r0[n], r1[n]), f"{n} differs between ranks"
        torch.testing.assert_close(r0[n], p, rtol=1e-9, atol=1e-12, msg=n)
        assert torch.isfinite(p).all() and not torch.equal(p, init[n].detach())
