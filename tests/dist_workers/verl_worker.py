"""One verl policy update per case, 2 CPU processes with gloo: ``torchrun --nproc_per_node 2 verl_worker.py IN OUT``.

``IN`` (written by ``tests/test_integration_verl.py``) holds a tiny Hugging Face model with its tokenizer
(``IN/model``) and a global batch of rollouts (``IN/batch.pt``: left-padded prompts, right-padded responses, old
and reference log-probs, advantages). Each rank takes its half of the batch, builds verl's ``TrainingWorker``
(verl's FSDP2 engine, through verl's ``EngineRegistry``) and runs verl's update path ``train_mini_batch`` →
``BaseEngine.train_batch`` with verl's ``ppo_loss``, on several micro-batches per rank.

Per case it writes ``OUT/<case>_rank<r>.pt``: the gradient the base optimizer steps with (gathered full tensors,
captured by a step pre-hook), the parameters after the step and verl's metrics; ``faults`` (an exception and a NaN
in the pass at θ'), ``resume`` (through verl's checkpoint) and ``fsdp1`` (refused) write what they pass through.
``OUT/done_rank<r>`` marks a worker that got to the end; ``OUT/error_rank<r>.txt`` holds a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

MICRO = 2  # sequences per micro-batch and rank: 3 micro-batches per rank with the test's 12 sequences
LR = 1e-3
CLIP_GRAD = 0.5  # verl's optim.clip_grad, on the combined gradient

#: case -> settings: "engine" ("verl": verl's own FSDPEngineWithLMHead; "gr": grkernels' engine), "grad_reg"
#: (GradRegConfig fields, None: plain FSDPOptimizerConfig), "loss" (ActorConfig loss fields), "steps".
#: absolute ε written out: the references recompute θ' = θ + ε·clip(g1) (the schema's default is radius ε)
GR = dict(strength=15.0, eps=5e-2, eps_mode="absolute", g1_clip=0.05, g2_clip=0.05)
AUTO_TARGET = 0.05  # the adaptive strength's target gr_rel
KL = dict(loss_agg_mode="token-mean", use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="low_var_kl")
CASES: dict[str, dict[str, Any]] = {
    "verl": dict(engine="verl", grad_reg=None, loss=KL),
    "off": dict(engine="gr", grad_reg=dict(strength=0.0), loss=KL),
    "gr_kl": dict(engine="gr", grad_reg=GR, loss=KL),
    "gr_seq_central": dict(
        engine="gr",
        grad_reg=dict(strength=0.02, eps=2e-2, eps_mode="absolute", g1_clip=None, g2_clip=None, estimator="central",
                      exclude=[]),
        loss=dict(loss_agg_mode="seq-mean-token-mean", use_kl_loss=False),
    ),
    "gr_sum_radius": dict(
        engine="gr",
        grad_reg=dict(strength=60.0, eps=1e-2, g1_clip=0.05, g2_clip=0.05, eps_mode="radius", exclude=["lm_head"]),
        loss=dict(loss_agg_mode="seq-mean-token-sum", use_kl_loss=True, kl_loss_coef=0.2, kl_loss_type="k2"),
    ),
    # verl's default mixed precision: bf16 compute over fp32 shards (FSDP2 MixedPrecisionPolicy, autocast)
    "gr_bf16": dict(engine="gr", grad_reg=dict(strength=15.0, eps=2e-2, g1_clip=0.05, g2_clip=0.05,
                                               eps_mode="radius"), loss=KL, bf16=True),
}
RESUME = dict(engine="gr", grad_reg=dict(GR, warmup_steps=1), loss=KL)
#: the cheaper GR (not "gr_"-named: their references differ): the sub-batch pass (per rank 2 of 6 sequences by
#: |advantage|, or 4 of 6 at random) and every-2 reuse over 2 steps
CHEAP: dict[str, dict[str, Any]] = {
    "subset_adv": dict(engine="gr", grad_reg=dict(GR, subset_fraction=0.3), loss=KL),
    "subset_random": dict(engine="gr", grad_reg=dict(GR, subset_fraction=0.5, subset_by="random"),
                          loss=dict(loss_agg_mode="seq-mean-token-mean", use_kl_loss=False)),
    "every_orth": dict(engine="gr", grad_reg=dict(GR, every=2, reuse="orthogonal"), loss=KL, steps=2),
    # the adaptive strength from verl's config: γ starts at strength_init and moves towards target_rel after step 1
    "auto_strength": dict(engine="gr", grad_reg=dict(GR, strength="auto", target_rel=AUTO_TARGET,
                                                     strength_init=GR["strength"]), loss=KL, steps=2),
}
CASES.update(CHEAP)
#: verl's dynamic batch size (micro-batches packed up to a token budget, rearranged by length): full GR, and the
#: sub-batch pass whose subset is then any number of sequences
DYNAMIC_TOKENS = 12
CASES.update({
    "gr_dynamic": dict(engine="gr", grad_reg=GR, loss=KL, dynamic=True),
    "subset_adv_dynamic": dict(engine="gr", grad_reg=dict(GR, subset_fraction=0.3), loss=KL, dynamic=True),
})


#: attention dropout on: the pass at θ' must see the masks of the pass at θ (RNG replayed per micro-batch)
DROPOUT = {"replay_eps1e-2": 1e-2, "replay_eps1e-3": 1e-3, "no_replay_eps1e-3": 1e-3}


def make_worker(model_dir: str, case: dict[str, Any], strategy: str = "fsdp2", dropout: float = 0.0):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    from grkernels.integrations.verl import GradRegFSDPOptimizerConfig

    # verl's own engine: a vendor with no GR registration falls back to the device-wide default
    os.environ["VERL_ENGINE_VENDOR"] = "none" if case["engine"] == "verl" else "cpu"
    override = {"attn_implementation": "sdpa", **({"attention_dropout": dropout} if dropout else {})}
    model = HFModelConfig(path=model_dir, override_config=override, use_remove_padding=False,
                          external_lib="grkernels.integrations.verl")
    dynamic = dict(use_dynamic_bsz=True, max_token_len_per_gpu=DYNAMIC_TOKENS) if case.get("dynamic") else dict(
        use_dynamic_bsz=False, micro_batch_size_per_gpu=MICRO)
    engine = FSDPEngineConfig(strategy=strategy, use_torch_compile=False, **dynamic,
                              mixed_precision=None if case.get("bf16") else {"param_dtype": "fp32"})
    optim_kw = dict(lr=LR, clip_grad=CLIP_GRAD, total_training_steps=10)
    if case["grad_reg"] is None:
        optim = FSDPOptimizerConfig(**optim_kw)
    else:
        optim = GradRegFSDPOptimizerConfig(**optim_kw, grad_reg=case["grad_reg"])
    worker = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model,
                                                 engine_config=engine, optimizer_config=optim,
                                                 checkpoint_config=CheckpointConfig()))
    worker.reset()
    worker.set_loss_fn(partial(_ppo_loss(), config=actor_config(case["loss"])))
    return worker


def _ppo_loss():
    from verl.workers.utils.losses import ppo_loss

    return ppo_loss


def actor_config(loss: dict[str, Any]):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=12, ppo_micro_batch_size_per_gpu=MICRO,
                       use_dynamic_bsz=False, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
                       entropy_coeff=0.0, **loss)


def local_batch(batch: dict[str, torch.Tensor], rank: int, world: int):
    """This rank's share of the global batch as verl's trainer hands it to ``update_actor`` (no padding)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    n = batch["prompts"].shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    attn = batch["attention_mask"][sl]
    fields = {k: batch[k][sl] for k in ("prompts", "responses", "attention_mask", "response_mask", "old_log_probs",
                                        "advantages", "ref_log_prob")}
    fields["input_ids"] = torch.cat([fields["prompts"], fields["responses"]], dim=1)
    fields["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)
    td = TensorDict(fields, batch_size=[attn.shape[0]])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False, global_batch_size=n, mini_batch_size=n,
                         epochs=1, seed=0, dataloader_kwargs={"shuffle": False}, compute_loss=True)
    return td


def base_optimizer(engine):
    from grkernels import GradReg

    return engine.optimizer.optimizer if isinstance(engine.optimizer, GradReg) else engine.optimizer


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_step(worker, td) -> dict[str, Any]:
    """One ``train_mini_batch``: the gradient at the base optimizer's step, parameters after, metrics."""
    engine = worker.engine
    captured: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in engine.module.named_parameters()}

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    captured[names[id(p)]] = full(p.grad)

    from grkernels.integrations import verl as gr_verl

    split, splits = gr_verl.split_mini_batch, []

    def recorded_split(*args, **kwargs):
        out = split(*args, **kwargs)
        splits.append(None if out is None else {"rows": out.rows, "fraction": out.fraction})
        return out

    sizes: list[int] = []  # sequences per micro-batch of each training forward, in order (both passes)

    def counted_forward_step(micro_batch, loss_function, forward_only):
        if not forward_only:
            sizes.append(micro_batch.batch_size[0])
        return type(engine).forward_step(engine, micro_batch, loss_function=loss_function, forward_only=forward_only)

    handle = base_optimizer(engine).register_step_pre_hook(hook)
    gr_verl.split_mini_batch = recorded_split
    engine.forward_step = counted_forward_step
    try:
        out = worker.train_mini_batch(td.clone())
    finally:
        handle.remove()
        gr_verl.split_mini_batch = split
        del engine.forward_step
    metrics = {} if out is None else {k: [float(x) for x in v] for k, v in out["metrics"].items()}
    return {"grad": captured, "params": {n: full(p) for n, p in engine.module.named_parameters()},
            "metrics": metrics, "splits": splits, "micro_batches": sizes}


class FaultyLoss:
    """verl's ppo_loss, failing in the pass at θ': raising at its ``raise_at``-th call, or returning NaN from
    call ``nan_after`` + 1 on (3 micro-batches per pass and rank)."""

    def __init__(self, loss, raise_at: int | None = None, nan_after: int | None = None) -> None:
        self.loss, self.raise_at, self.nan_after, self.calls = loss, raise_at, nan_after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError("loss failed in the pass at theta'")
        loss, metrics = self.loss(*args, **kwargs)
        if self.nan_after is not None and self.calls > self.nan_after:
            loss = loss * float("nan")
        return loss, metrics


#: fault runs: the case, and the loss call that raises (in the pass at θ', after the pass at θ's micro-batches)
FAULTS = {"faults": ("gr_kl", 3 + 2), "faults_subset": ("subset_adv", 3 + 1)}


def faults(model_dir: str, td, case: str = "gr_kl", raise_at: int = 5) -> dict[str, Any]:
    """An exception in the pass at θ', then a NaN there (verl skips the step), then a normal GR step."""
    worker = make_worker(model_dir, CASES[case])
    loss = worker.loss_fn
    initial = {n: full(p) for n, p in worker.engine.module.named_parameters()}
    worker.set_loss_fn(FaultyLoss(loss, raise_at=raise_at))
    try:
        worker.train_mini_batch(td.clone())
        raised = ""
    except RuntimeError as err:
        raised = str(err)
    after_error = {n: full(p) for n, p in worker.engine.module.named_parameters()}
    worker.set_loss_fn(loss)
    after_error_step = run_step(worker, td)  # the step the exception aborted, now done
    worker = make_worker(model_dir, CASES[case])
    worker.set_loss_fn(FaultyLoss(loss, nan_after=3))
    nan_step = run_step(worker, td)
    worker.set_loss_fn(loss)
    return {"initial": initial, "raised": raised, "after_error": after_error, "after_error_step": after_error_step,
            "nan_step": nan_step, "after_nan_step": run_step(worker, td)}


def dropout_runs(model_dir: str, td) -> dict[str, dict[str, list[float]]]:
    """GR metrics with attention dropout 0.3 at two ε, and with the RNG replay switched off."""
    from grkernels.integrations import verl as gr_verl

    out = {}
    window = gr_verl.Window  # the micro-batch record verl's GR engine uses (grkernels.integrations.common)

    def no_replay(self) -> None:  # record and count, but never set the RNG back before a micro-batch at θ'
        if self.replaying:
            self.index += 1
        else:
            self.record()

    for name, eps in DROPOUT.items():
        replay = window.at_micro_batch
        if name.startswith("no_replay"):
            window.at_micro_batch = no_replay
        try:
            worker = make_worker(model_dir, dict(CASES["gr_kl"], grad_reg=dict(GR, eps=eps)), dropout=0.3)
            torch.manual_seed(1234)  # the same masks at θ in every run: only ε and the replay differ
            out[name] = run_step(worker, td)["metrics"]
        finally:
            window.at_micro_batch = replay
    return out


def main() -> None:
    in_dir, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        from grkernels.integrations.verl_cpu import use_cpu_platform

        use_cpu_platform()
        batch = torch.load(os.path.join(in_dir, "batch.pt"))
        td = local_batch(batch, rank, world)
        model_dir = os.path.join(in_dir, "model")
        only = os.environ.get("VERL_WORKER_CASES")
        for name, case in CASES.items():
            if only and name not in only.split(","):
                continue
            worker = make_worker(model_dir, case)
            steps = [run_step(worker, td) for _ in range(case.get("steps", 1))]
            result = steps[0] if len(steps) == 1 else {"steps": steps}
            result["gr_engine"] = type(worker.engine).__name__
            torch.save(result, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
            del worker
        if not only or "dropout" in only.split(","):
            torch.save(dropout_runs(model_dir, td), os.path.join(out_dir, f"dropout_rank{rank}.pt"))
        if not only or "fsdp1" in only.split(","):
            try:
                make_worker(model_dir, CASES["gr_kl"], strategy="fsdp")
                refused = ""
            except NotImplementedError as err:
                refused = str(err)
            torch.save({"refused": refused}, os.path.join(out_dir, f"fsdp1_rank{rank}.pt"))
        for name, (case, raise_at) in FAULTS.items():
            if not only or name in only.split(","):
                torch.save(faults(model_dir, td, case, raise_at), os.path.join(out_dir, f"{name}_rank{rank}.pt"))
        if not only or "resume" in only.split(","):
            # warmup step, checkpoint, GR step; then a fresh worker loads the checkpoint and redoes the GR step
            ckpt = os.path.join(out_dir, "ckpt")
            worker = make_worker(model_dir, RESUME)
            first = run_step(worker, td)
            worker.save_checkpoint(ckpt)
            second = run_step(worker, td)
            del worker
            worker = make_worker(model_dir, RESUME)
            worker.load_checkpoint(ckpt)
            resumed = run_step(worker, td)
            torch.save({"first": first, "second": second, "resumed": resumed},
                       os.path.join(out_dir, f"resume_rank{rank}.pt"))
        open(os.path.join(out_dir, f"done_rank{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
