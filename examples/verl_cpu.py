"""GR in verl on a CPU: a few GRPO-style policy updates of verl's FSDP2 engine, 2 processes over gloo.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 examples/verl_cpu.py --steps 4

(``make test`` installs verl 0.9.1 into ``.venv`` beside the CPU torch; run from the repository root.)

verl's trainer needs Ray and a rollout engine (vLLM/SGLang, GPU only). This example drives the part GR changes
directly, the way the trainer does: per step it samples responses of a tiny model (built in code), scores them
with a toy reward (the fraction of even tokens), forms GRPO advantages per group of ``--group`` responses,
computes the old log-probs with verl's ``infer_batch`` and updates the policy with verl's ``train_mini_batch``
(verl's ``ppo_loss``, k3 KL to the initial policy, 2 micro-batches per rank). GR is configured exactly as in a
real run: ``GradRegFSDPOptimizerConfig(grad_reg=...)``. The GR metrics print per step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from functools import partial

import torch
import torch.distributed as dist

VOCAB, PROMPT, RESPONSE = 32, 4, 6


def tiny_model_dir(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", bos_token="t2",
                            unk_token="t0").save_pretrained(path)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                 bos_token_id=2)).save_pretrained(path)


def rollouts(model: torch.nn.Module, n_prompts: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    """Sample ``group`` responses per prompt from the current weights (all ranks draw the same batch)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (n_prompts, PROMPT), generator=g).repeat_interleave(group, 0)
    ids = prompts
    with torch.no_grad():
        for _ in range(RESPONSE):
            probs = torch.softmax(model(ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    responses = ids[:, PROMPT:]
    reward = (responses % 2 == 0).float().mean(-1).view(-1, group)
    adv = ((reward - reward.mean(-1, keepdim=True)) / (reward.std(-1, keepdim=True) + 1e-6)).view(-1, 1)
    n = prompts.shape[0]
    return {"prompts": prompts, "responses": responses, "attention_mask": torch.ones(n, PROMPT + RESPONSE,
            dtype=torch.long), "response_mask": torch.ones(n, RESPONSE, dtype=torch.long),
            "advantages": adv.expand(n, RESPONSE).contiguous(), "reward": reward.mean()}


def to_verl(batch: dict[str, torch.Tensor], rank: int, world: int):
    """This rank's share, in verl's no-padding layout (what the trainer sends to the actor)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    n = batch["prompts"].shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    keys = [k for k in batch if k != "reward"]
    fields = {k: batch[k][sl] for k in keys}
    fields["input_ids"] = torch.cat([fields["prompts"], fields["responses"]], 1)
    fields["position_ids"] = (fields["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    td = left_right_2_no_padding(TensorDict(fields, batch_size=[sl.stop - sl.start]))
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False, global_batch_size=n, mini_batch_size=n,
                         epochs=1, seed=0, dataloader_kwargs={"shuffle": False}, compute_loss=False)
    return td


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    # GR's flags default to the schema's defaults (grkernels.settings): the recommended set
    parser.add_argument("--strength", type=lambda t: t if t == "auto" else float(t), default="auto",
                        help="γ (0: verl's own update), or auto (held at --target-rel)")
    parser.add_argument("--target-rel", type=float, default=3.0, help="strength auto: the gr_rel to hold")
    parser.add_argument("--eps", type=float, default=0.02, help="ε, a radius ‖θ' − θ‖ (--eps-mode)")
    parser.add_argument("--eps-mode", choices=["radius", "absolute"], default="radius")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from grkernels.integrations.verl_cpu import use_cpu_platform

    use_cpu_platform()  # before verl's engine modules are imported
    from transformers import AutoModelForCausalLM
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, FSDPEngineConfig, HFModelConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    from grkernels.integrations.verl import GradRegFSDPOptimizerConfig

    shared = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(shared)  # one directory for both ranks
    try:
        path = os.path.join(shared[0], "model")
        if rank == 0:
            tiny_model_dir(path)
        dist.barrier()
        n = args.prompts * args.group
        actor = ActorConfig(strategy="fsdp2", rollout_n=args.group, ppo_mini_batch_size=n,
                            ppo_micro_batch_size_per_gpu=n // world // 2, use_dynamic_bsz=False, use_kl_loss=True,
                            kl_loss_coef=0.05, kl_loss_type="low_var_kl", loss_agg_mode="token-mean")
        worker = TrainingWorker(TrainingWorkerConfig(
            model_type="language_model",
            model_config=HFModelConfig(path=path, override_config={"attn_implementation": "sdpa"},
                                       use_remove_padding=False, external_lib="grkernels.integrations.verl"),
            engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                                           micro_batch_size_per_gpu=n // world // 2,
                                           infer_micro_batch_size_per_gpu=n // world,
                                           mixed_precision={"param_dtype": "fp32"}),
            optimizer_config=GradRegFSDPOptimizerConfig(
                lr=3e-3, clip_grad=1.0, total_training_steps=args.steps,
                grad_reg=dict(strength=args.strength, target_rel=args.target_rel, eps=args.eps,
                              eps_mode=args.eps_mode, g1_clip=10.0, g2_clip=10.0)),
            checkpoint_config=CheckpointConfig()))
        worker.reset()
        worker.set_loss_fn(partial(ppo_loss, config=actor))
        sampler = AutoModelForCausalLM.from_pretrained(path)  # a full copy for sampling (the "rollout engine")
        reference = AutoModelForCausalLM.from_pretrained(path)  # the initial policy, for the KL loss
        for step in range(args.steps):
            batch = rollouts(sampler, args.prompts, args.group, seed=step)
            td = to_verl(batch, rank, world)
            old = worker.infer_batch(td.clone())  # log-probs at θ, as verl's compute_log_prob
            if old is None:
                raise RuntimeError("infer_batch returned nothing on this rank")
            td["old_log_probs"] = _response_logprobs(old, td)
            td["ref_log_prob"] = _reference_logprobs(reference, batch)[rank * len(td):(rank + 1) * len(td)]
            tu.assign_non_tensor(td, compute_loss=True)
            metrics = worker.train_mini_batch(td)["metrics"]
            state = {k: v.full_tensor() for k, v in worker.engine.module.state_dict().items()}
            sampler.load_state_dict(state)
            if rank == 0:
                gr = {k.split("/")[-1]: v[0] for k, v in metrics.items() if k.startswith("grad_reg/")}
                print(f"step {step}: reward {float(batch['reward']):.3f}  loss {metrics['loss'][0]:+.4f}  "
                      f"grad_norm {metrics['grad_norm'][0]:.3f}  g1_norm {gr['g1_norm']:.3f}  "
                      f"gr_rel {gr['gr_rel']:.3f}  perturb_ratio {gr['perturb_ratio']:.3f}  γ {gr['strength']:.3g}",
                      flush=True)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(shared[0], ignore_errors=True)
        dist.destroy_process_group()


def _response_logprobs(out, td) -> torch.Tensor:
    """verl's per-token log-probs (no-padding layout) → the (batch, response) layout of ``old_log_probs``."""
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(out["log_probs"], td).float()


@torch.no_grad()
def _reference_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = torch.cat([batch["prompts"], batch["responses"]], 1)
    logp = torch.log_softmax(model(ids).logits[:, PROMPT - 1:-1].float(), -1)
    return logp.gather(-1, batch["responses"][..., None])[..., 0]


if __name__ == "__main__":
    main()
