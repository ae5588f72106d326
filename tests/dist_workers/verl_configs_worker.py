"""One verl policy update with LoRA, remove-padding and gradient checkpointing together, 2 CPU processes with gloo:
``torchrun --nproc_per_node 2 verl_configs_worker.py IN OUT`` (``IN`` as for verl_worker.py: a tiny model and a
global batch whose prompts and responses hold real padding).

verl's FSDP2 engine with ``lora_rank=4`` (target "all-linear"), ``use_remove_padding=True`` (sequences packed, padding
removed) and ``enable_gradient_checkpointing=True``, grkernels' GR engine. Writes ``OUT/lora_rank<r>.pt``: θ before
the step (every parameter, gathered), the gradient the base optimizer steps with, the parameters after, verl's
metrics and the PEFT config verl built; ``OUT/done_rank<r>`` when done, ``OUT/error_rank<r>.txt`` on an error.
"""

from __future__ import annotations

import os
import sys
import traceback
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verl_worker as W  # noqa: E402

LORA = dict(lora_rank=4, lora_alpha=8, target_modules="all-linear")


def make_worker(model_dir: str, grad_reg: dict):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, HFModelConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    from grkernels.integrations.verl import GradRegFSDPOptimizerConfig

    os.environ["VERL_ENGINE_VENDOR"] = "cpu"
    model = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"}, use_remove_padding=True,
                          enable_gradient_checkpointing=True, external_lib="grkernels.integrations.verl", **LORA)
    engine = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                              micro_batch_size_per_gpu=W.MICRO, mixed_precision={"param_dtype": "fp32"})
    optim = GradRegFSDPOptimizerConfig(lr=W.LR, clip_grad=W.CLIP_GRAD, total_training_steps=10, grad_reg=grad_reg)
    worker = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model,
                                                 engine_config=engine, optimizer_config=optim,
                                                 checkpoint_config=CheckpointConfig()))
    worker.reset()
    worker.set_loss_fn(partial(W._ppo_loss(), config=W.actor_config(W.KL)))
    return worker


def main() -> None:
    in_dir, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        from grkernels.integrations.verl_cpu import use_cpu_platform

        use_cpu_platform()
        batch = torch.load(os.path.join(in_dir, "batch.pt"))
        td = W.local_batch(batch, rank, world)
        td_cfg = {"use_remove_padding": True}
        from verl.utils import tensordict_utils as tu

        tu.assign_non_tensor(td, **td_cfg)
        worker = make_worker(os.path.join(in_dir, "model"), dict(W.GR))
        module = worker.engine.module
        theta = {n: W.full(p) for n, p in module.named_parameters()}
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        peft_config = {k: (sorted(v) if isinstance(v, set) else v)
                       for k, v in module.peft_config["default"].to_dict().items()}
        result = W.run_step(worker, td)
        result.update(theta=theta, trainable=trainable, peft_config=peft_config,
                      checkpointing=bool(getattr(module, "is_gradient_checkpointing", False)),
                      gr_engine=type(worker.engine).__name__)
        torch.save(result, os.path.join(out_dir, f"lora_rank{rank}.pt"))
        open(os.path.join(out_dir, f"done_rank{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
