"""GR through ``grad_reg_trainer(Trainer)`` under DeepSpeed ZeRO-1/2 and under DDP, 2 CPU processes with gloo:
``torchrun --nproc_per_node 2 deepspeed_worker.py OUT``.

One process start runs every mode of ``MODES`` in turn (the Accelerate state is reset between them) and writes the
final fp32 parameters (DeepSpeed: the masters), the GR metrics of every step and the masters check to
``OUT/<mode>_rank<r>.pt``, then ``OUT/done_<mode>_rank<r>``. ``tests/test_deepspeed.py`` judges the run by these
files, not by the exit code: DeepSpeed on CPU aborts at process teardown in about 1 of 20 runs, after the work.

The masters check: ``DeepSpeedGR.perturb`` / ``restore_and_combine`` are wrapped so that the fp32 master partitions
are snapshotted before the perturbation and compared bitwise after the restore, on the Trainer's real path.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch import nn

# the DDP runs first: a Trainer with a DeepSpeed config leaves process-wide state behind (ACCELERATE_USE_DEEPSPEED)
MODES = ("ddp", "grpo_ddp", "zero1", "zero2", "zero2_bf16", "grpo_zero2")
STEPS = 3
GR = dict(grad_reg_strength=0.5, grad_reg_eps=1e-2, grad_reg_g1_clip=0.3, grad_reg_g2_clip=0.3,
          grad_reg_exclude=["net.4.bias"])


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 9), nn.Tanh(), nn.Linear(9, 2))


class Reg(nn.Module):
    """A model a Trainer can train: returns {"loss": mse} (computed in fp32 whatever the weights' dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x, y):
        out = self.net(x.to(self.net[0].weight.dtype))
        return {"loss": nn.functional.mse_loss(out.float(), y.float())}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.sin(3 * self.x[:, :2])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


MASTERS_CHECK: list[bool] = []


def _watch_masters() -> None:
    from grkernels.integrations.deepspeed import DeepSpeedGR

    perturb, combine = DeepSpeedGR.perturb, DeepSpeedGR.restore_and_combine

    def perturb_watched(self):
        if self._point == 0:
            self._masters_before = [t.detach().clone() for t in self.opt.single_partition_of_fp32_groups]
        perturb(self)

    def combine_watched(self):
        combine(self)
        MASTERS_CHECK.append(all(torch.equal(a, b) for a, b in
                                 zip(self._masters_before, self.opt.single_partition_of_fp32_groups)))

    DeepSpeedGR.perturb, DeepSpeedGR.restore_and_combine = perturb_watched, combine_watched


def _ds_config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "steps_per_print": 10**9}


def train_grpo(mode: str, out: str) -> dict:
    """GradRegGRPOTrainer (TRL) on the tiny character Llama of test_integration_trl, under DDP or ZeRO-2."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from datasets import Dataset
    from test_integration_trl import grpo_args, make_model, make_tokenizer, reward_fn

    from grkernels.integrations.trl import GradRegGRPOTrainer

    args = grpo_args(os.path.join(out, mode), per_device_train_batch_size=4, num_generations=4, max_steps=STEPS,
                     ddp_backend="gloo", deepspeed=_ds_config(2) if mode.endswith("zero2") else None,
                     grad_reg_g1_clip=0.3, grad_reg_g2_clip=0.3)
    ds = Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh", "ha", "bd", "ca", "ge"] * 4})
    model = make_model()
    tr = GradRegGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds,
                            processing_class=make_tokenizer())
    tr.train()
    metrics = [{k: v for k, v in h.items() if k.startswith("grad_reg/")} for h in tr.state.log_history]
    if args.deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param

        engine = tr.accelerator.deepspeed_engine_wrapped.engine
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "metrics": metrics, "gr_class": type(tr.grad_reg).__name__}


def train(mode: str, out: str) -> dict:
    from transformers import Trainer, TrainingArguments

    if mode.startswith("grpo"):
        return train_grpo(mode, out)

    from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer

    class SeqTrainer(Trainer):  # the same global batches whatever the engine
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    bf16 = mode.endswith("bf16")
    ds = None
    if mode.startswith("zero"):
        ds = _ds_config(int(mode[4]))
    args = grad_reg_config(TrainingArguments)(
        output_dir=os.path.join(out, mode), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_steps=STEPS, learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=0.0,
        use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no", dataloader_drop_last=True, seed=0,
        bf16=bf16, deepspeed=ds, logging_steps=1, **GR,
    )
    model = Reg()
    tr = grad_reg_trainer(SeqTrainer)(model=model, args=args, train_dataset=Rows())
    metrics: list[dict] = []

    orig_log = tr.log

    def log(logs, *a, **k):  # the GR metrics as the mixin logs them (global: equal on every rank)
        orig_log(logs, *a, **k)
        metrics.append({k2: v for k2, v in logs.items() if k2.startswith("grad_reg/")})

    tr.log = log
    tr.train()
    if ds is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        engine = tr.accelerator.deepspeed_engine_wrapped.engine
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
        memory = {"extra_bytes": tr.grad_reg.extra_memory_bytes(),  # what GR holds on this rank, per element
                  "partition_numel": sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups),
                  "model_numel": sum(p.numel() for p in engine.module.parameters())}
        return {"params": params, "metrics": metrics, "memory": memory, "gr_class": type(tr.grad_reg).__name__}
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "metrics": metrics, "gr_class": type(tr.grad_reg).__name__}


def main(out: str) -> int:
    import deepspeed
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    _watch_masters()
    try:
        for mode in MODES:
            MASTERS_CHECK.clear()
            result = train(mode, out)
            result["masters_untouched"] = list(MASTERS_CHECK)
            torch.save(result, os.path.join(out, f"{mode}_rank{rank}.pt"))
            open(os.path.join(out, f"done_{mode}_rank{rank}"), "w").close()
            AcceleratorState._reset_state(True)
    except BaseException:
        traceback.print_exc()
        with open(os.path.join(out, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
