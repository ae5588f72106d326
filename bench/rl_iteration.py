"""What GR costs per RL iteration, against the KL penalty it replaces: one GRPO iteration end to end in TRL and in
verl, per phase, per variant, in time and memory.

    python bench/rl_iteration.py --device cpu                 # both hosts, CPU sizes -> <device>_rl_iteration.json
    python bench/rl_iteration.py --device cpu --hosts trl --variants none,kl,gr --rounds 4
    python bench/rl_iteration.py --preset gpu                 # on a GPU: a Qwen2.5-0.5B-shaped model, bf16
    python bench/rl_iteration.py --preset gpu --model /path/to/Qwen2.5-0.5B   # real weights and tokenizer

Hosts.
    trl   TRL's ``GRPOTrainer`` (no regularisation, KL) against grkernels' ``GradRegGRPOTrainer`` (GR), each running its
          own ``trainer.train()``; generation by transformers' ``generate`` (TRL without vLLM).
    verl  a stand-in for verl's ``RayPPOTrainer.fit`` built from verl's own pieces, without Ray: verl's
          ``TrainingWorker`` (its FSDP2 engine through ``EngineRegistry``; grkernels' GR engine for GR) as the actor and
          as the reference, verl's ``HFRollout`` for generation (bf16 autocast, as verl does), verl's
          ``NaiveRewardManager``, ``compute_grpo_outcome_advantage``, and the trainer's own sequence: old log-probs
          (``infer_batch``), reference log-probs, advantages, ``train_mini_batch`` with verl's ``ppo_loss``. On CPU
          through ``grkernels.integrations.verl_cpu`` (one gloo process).

Variants (GR variants have β = 0, i.e. no reference model): ``none`` (β = 0), ``kl`` (β > 0: TRL's k3 KL term with
the reference model; verl's ``use_kl_loss`` with ``low_var_kl``), ``gr`` (full GR), ``gr_every4`` (every 4th step,
orthogonal reuse between), ``gr_sub0.25`` and ``gr_sub0.125`` (the pass at θ' on that share of the sequences, by
largest |advantage|, in whole micro-batches), ``gr_auto`` (the adaptive strength, ``strength="auto"``, where the host
accepts it). Head-only GR (``grkernels.head``) needs the final hidden states of the pass at θ, which neither host
integration caches: it is listed as unavailable.

How it is measured. Every variant lives in a process of its own (started from a fork server), so that its peak
memory is its own: the OS's high-water mark of resident memory (VmHWM), and on CUDA the allocator's peak. The
processes take turns (round-robin, one turn = ``--cycle`` iterations, the starting variant rotating each round;
``--warmup`` rounds first, not kept): only one runs at a time, and a machine whose speed drifts slows every variant
of a round alike. Per variant: the median over rounds of the turn's mean iteration time and of each phase; "× KL"
and "× none" are medians over rounds of the per-round ratios. Phases (exclusive time: a phase nested in another is
taken out of it), through the hosts' own methods:

    generation      TRL ``_generate``; verl ``HFRollout.generate_sequences``
    reward          TRL ``_calculate_rewards``; verl ``NaiveRewardManager.__call__``
    old_logp        the policy's no-grad forward for "old" log-probs (verl ``compute_log_prob``; TRL only off-policy)
    ref_forward     the reference model's forward (TRL ``_get_per_token_logps_and_entropies(ref_model)``; verl
                    ``compute_ref_log_prob``)
    rollout_other   the rest of scoring (tokenising, advantages, masks, metrics)
    first_pass      the forward/backward at θ (TRL ``training_step``; verl ``train_mini_batch``), less the above
    gr_pass         the forward/backward at θ' (from ``GradReg.perturb`` to the combine)
    gr_math         inside ``GradReg``'s calls: perturb, combine, mark_subset, restore, its step less the base step
    optimizer       gradient clipping and the base optimizer's step
    other           the rest of the iteration (zero_grad, LR schedule, callbacks, bookkeeping)

GR's share = (gr_pass + gr_math) / iteration. Floors of the cheaper modes, from the same rounds: sub-batch f
= none + gr_pass(full)·(m/M) + gr_math(full) (m of the M micro-batches replayed), every-k = none + (gr − none)/k;
"gap" = (mode − floor) / none. Memory per variant: peak RSS, the policy's and the reference's parameter bytes, the
optimizer state, ``GradReg.extra_memory_bytes()`` (saved θ and g1, the stored correction; not the sub-batch pass's
transient copy of the subset's g1, which the OS peak includes), and beside them GR's extra bytes per parameter per
mode and dtype measured in the parent on the same model (``memory_by_dtype``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Run, peak_rss_bytes, tensor_bytes  # noqa: E402

BETA = 0.04  # the KL variant's coefficient (TRL's k3 term; verl's kl_loss_coef)
PHASES = ("generation", "reward", "old_logp", "ref_forward", "rollout_other", "first_pass", "gr_pass", "gr_math",
          "optimizer", "other")
GR_VARIANTS: dict[str, dict[str, Any]] = {
    "gr": {},
    "gr_every4": dict(every=4, reuse="orthogonal"),
    "gr_sub0.25": dict(subset_fraction=0.25, subset_by="advantage"),
    "gr_sub0.125": dict(subset_fraction=0.125, subset_by="advantage"),
    "gr_auto": dict(strength="auto"),
}
VARIANTS = ("none", "kl", *GR_VARIANTS)
UNAVAILABLE = {"gr_head": "head-only GR (grkernels.head) needs the final hidden states of the pass at θ; neither the "
                          "TRL nor the verl integration caches them (their pass at θ' reruns the whole model)"}
PRESETS = {
    "cpu": dict(device="cpu", dtype="float32", hidden=128, layers=4, heads=4, kv_heads=2, inter=256, vocab=512,
                tied=False, prompts=8, generations=4, micro=4, prompt_len=16, completion_len=32),
    # Qwen2.5-0.5B's shapes (tied embeddings), 16 prompts x 8 completions of 256 tokens, micro-batches of 16
    "gpu": dict(device="cuda", dtype="bfloat16", hidden=896, layers=24, heads=14, kv_heads=2, inter=4864,
                vocab=151936, tied=True, prompts=16, generations=8, micro=16, prompt_len=128, completion_len=256),
}


# ------------------------------------------------------------------------------------------------ phases
class Phases:
    """Exclusive time per phase within one iteration: entering a phase stops the clock of the one it is nested in.
    On CUDA every boundary synchronises (the attribution needs it; it adds the sync's cost to the iteration).
    ``clock="cpu"``: the process's CPU time (``time.process_time``) instead of wall time, for a machine shared with
    other jobs (with one torch thread it is the work done, whatever the others take); the iteration's wall time is
    recorded beside it either way."""

    def __init__(self, cuda: bool, clock: str = "wall") -> None:
        self.cuda = cuda
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.acc: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, since]
        self.t0 = self.wall0 = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock()

    def top(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def push(self, name: str) -> None:
        now = self._now()
        if self.stack:
            self.acc[self.stack[-1][0]] += now - self.stack[-1][1]
        self.stack.append([name, now])

    def pop(self, name: str) -> None:
        now = self._now()
        top = self.stack.pop()
        if top[0] != name:
            raise RuntimeError(f"phase {name!r} ended inside {top[0]!r}")
        self.acc[name] += now - top[1]
        if self.stack:
            self.stack[-1][1] = now

    @contextlib.contextmanager
    def phase(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop(name)

    def wrap(self, fn: Callable, name: str | Callable[..., str | None]) -> Callable:
        def wrapped(*args, **kwargs):
            n = name(*args, **kwargs) if callable(name) else name
            if n is None:
                return fn(*args, **kwargs)
            with self.phase(n):
                return fn(*args, **kwargs)

        return wrapped

    def start(self) -> None:
        self.acc.clear()
        self.stack.clear()
        self.t0 = self._now()
        self.wall0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        total = self._now() - self.t0
        wall = time.perf_counter() - self.wall0
        if self.stack:
            raise RuntimeError(f"iteration ended inside phases {[f[0] for f in self.stack]}")
        out = {k: self.acc.get(k, 0.0) for k in PHASES if k != "other"}
        out["other"] = total - sum(out.values())
        out["iteration"] = total
        out["wall"] = wall
        return out

    def instrument_gradreg(self) -> None:
        """GradReg's calls as ``gr_math``; from ``perturb`` to the combine (or restore) the pass at θ' (``gr_pass``).
        Patched on the class: this process holds one trainer."""
        from grkernels import GradReg

        P = self

        def opening(orig):
            def perturb(opt, *args, **kwargs):
                if P.top() == "gr_pass":  # the central estimator's second point
                    P.pop("gr_pass")
                with P.phase("gr_math"):
                    out = orig(opt, *args, **kwargs)
                P.push("gr_pass")
                return out

            return perturb

        def closing(orig):
            def call(opt, *args, **kwargs):
                if P.top() == "gr_pass":
                    P.pop("gr_pass")
                with P.phase("gr_math"):
                    return orig(opt, *args, **kwargs)

            return call

        GradReg.perturb = opening(GradReg.perturb)
        for name in ("restore_and_combine", "combine", "restore", "mark_subset", "step"):
            setattr(GradReg, name, closing(getattr(GradReg, name)))

    def instrument_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The base optimizer's step as ``optimizer`` (through its step hooks); returns the base optimizer."""
        while hasattr(optimizer, "optimizer"):  # accelerate's wrapper, GradReg
            optimizer = optimizer.optimizer
        optimizer.register_step_pre_hook(lambda *a: self.push("optimizer"))
        optimizer.register_step_post_hook(lambda *a: self.pop("optimizer"))
        return optimizer


# ------------------------------------------------------------------------------------------------ model and task
def build_model_dir(path: str, a: argparse.Namespace) -> None:
    """A Qwen2 model from a config (random weights; the head scaled up so that log-probs vary) and a word-level
    tokenizer t0 .. t{V-1} (t0 pad, t1 eos, t2 bos), saved for both hosts (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(a.vocab)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", bos_token="t2", unk_token="t3")
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=2 * (a.prompt_len + a.completion_len) + 8, tie_word_embeddings=a.tied,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def prompt_texts(n: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{int(i)}" for i in torch.randint(4, vocab, (length,), generator=g)) for _ in range(n)]


def even_share(text: str) -> float:
    """The reward: the share of the completion's tokens whose id is even (a stand-in for a verifier)."""
    ids = [int(w[1:]) for w in text.split() if w[1:].isdigit()]
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


def trl_reward(completions, **kwargs) -> list[float]:
    return [even_share(c) for c in completions]


def verl_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    return even_share(solution_str)


# ------------------------------------------------------------------------------------------------ children
def _memory(cuda: bool) -> dict[str, float]:
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if cuda:
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _gr_memory(gr, params: list[torch.Tensor]) -> dict[str, Any]:
    if gr is None:
        return {}
    n = sum(_local(p).numel() for p in params)
    return {"gr_extra_bytes": gr.extra_memory_bytes(), "gr_extra_bytes_per_param": gr.extra_memory_bytes() / n,
            "gr_metrics": {k: float(v) for k, v in gr.metrics().items()}}


def trl_child(conn, variant: str, a: argparse.Namespace, model_dir: str) -> None:
    """One TRL trainer, its ``train()`` paused between turns (a callback waits for the parent's "go")."""
    cuda = a.device == "cuda"
    P = Phases(cuda, a.clock)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(a.seed)
    ga = a.prompts * a.generations // a.micro
    steps = (a.warmup + a.rounds) * a.cycle
    kw = dict(output_dir=os.path.join(a.workdir, f"trl_{variant}"), per_device_train_batch_size=a.micro,
                  gradient_accumulation_steps=ga, num_generations=a.generations,
                  max_completion_length=a.completion_len, max_steps=steps, learning_rate=1e-6, temperature=1.0,
                  use_cpu=not cuda, bf16=a.dtype == "bfloat16", model_init_kwargs={"dtype": a.dtype},
                  report_to="none", logging_steps=10**9, save_strategy="no", seed=a.seed, disable_tqdm=True,
                  max_grad_norm=1.0, beta=BETA if variant == "kl" else 0.0)
    if variant in GR_VARIANTS:
        from grkernels.integrations.trl import GradRegGRPOConfig, GradRegGRPOTrainer

        gr = {"strength": a.gr_strength, "eps": a.gr_eps, "eps_mode": "radius", **GR_VARIANTS[variant]}
        cfg = GradRegGRPOConfig(**kw, **{f"grad_reg_{k}": v for k, v in gr.items()})
        cls = GradRegGRPOTrainer
        P.instrument_gradreg()
    else:
        cfg, cls = GRPOConfig(**kw), GRPOTrainer
    ds = Dataset.from_dict({"prompt": prompt_texts(max(64, a.prompts * 8), a.prompt_len, a.vocab, a.seed)})
    trainer = cls(model=model_dir, reward_funcs=trl_reward, args=cfg, train_dataset=ds,
                  processing_class=AutoTokenizer.from_pretrained(model_dir))
    t = trainer

    def logps_phase(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        if model is t.ref_model and model is not None:
            return "ref_forward"
        return "old_logp" if P.top() == "rollout_other" else None

    t._generate = P.wrap(t._generate, "generation")
    t._calculate_rewards = P.wrap(t._calculate_rewards, "reward")
    t._get_per_token_logps_and_entropies = P.wrap(t._get_per_token_logps_and_entropies, logps_phase)
    t._generate_and_score_completions = P.wrap(t._generate_and_score_completions, "rollout_other")
    t.training_step = P.wrap(t.training_step, "first_pass")
    t.accelerator.clip_grad_norm_ = P.wrap(t.accelerator.clip_grad_norm_, "optimizer")
    state: dict[str, Any] = {"count": 0, "pending": []}

    class Turns(TrainerCallback):
        def on_train_begin(self, args, st, control, **kwargs):
            state["base"] = P.instrument_optimizer(t.optimizer)

        def on_step_begin(self, args, st, control, **kwargs):
            if state["count"] % a.cycle == 0:
                if cuda:  # between turns: the cached blocks back to the device (the other variants share it)
                    torch.cuda.empty_cache()
                if state["count"]:
                    conn.send(("turn", state.pop("pending")))
                    state["pending"] = []
                if conn.recv() != "go":
                    raise RuntimeError("rl_iteration child: expected 'go'")
            P.start()

        def on_step_end(self, args, st, control, **kwargs):
            state["pending"].append(P.stop())
            state["count"] += 1

    t.add_callback(Turns())
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # the end-of-training log line
        t.remove_callback(quiet)
    policy = list(t.model.parameters())
    info = {"policy_params": sum(p.numel() for p in policy), "policy_param_bytes": tensor_bytes(policy),
            "ref_param_bytes": tensor_bytes(t.ref_model.parameters()) if t.ref_model is not None else 0,
            "micro_batches": ga, "sequences": a.prompts * a.generations}
    conn.send(("ready", info))
    t.train()
    conn.send(("turn", state["pending"]))
    info.update(_memory(cuda), optimizer_state_bytes=_state_bytes(state["base"]),
                **_gr_memory(getattr(t, "grad_reg", None), policy))
    conn.send(("done", info))


def verl_child(conn, variant: str, a: argparse.Namespace, model_dir: str) -> None:
    """verl's pieces in one process (world 1), an explicit iteration loop in RayPPOTrainer.fit's order."""
    cuda = a.device == "cuda"
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(a.port), TOKENIZERS_PARALLELISM="false")
    import numpy as np
    import torch.distributed as dist

    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=0,
                            world_size=1)
    if not cuda:
        from grkernels.integrations.verl_cpu import use_cpu_platform

        use_cpu_platform()
    from functools import partial

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.config import CheckpointConfig
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import (
        ActorConfig,
        FSDPEngineConfig,
        FSDPOptimizerConfig,
        HFModelConfig,
        TrainingWorkerConfig,
    )
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.reward_manager.naive import NaiveRewardManager
    from verl.workers.rollout.hf_rollout import HFRollout
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    from grkernels.integrations.verl import GradRegFSDPOptimizerConfig

    torch.manual_seed(a.seed)
    P = Phases(cuda, a.clock)
    n = a.prompts * a.generations
    kl = variant == "kl"

    def worker(gr: dict | None, vendor: str):
        os.environ["VERL_ENGINE_VENDOR"] = vendor  # "none": verl's own engine
        model = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"},
                              use_remove_padding=False, external_lib="grkernels.integrations.verl")
        mixed = {"param_dtype": "fp32"} if a.dtype == "float32" else None  # None: verl's default bf16 compute
        engine = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                                  micro_batch_size_per_gpu=a.micro, infer_micro_batch_size_per_gpu=a.micro,
                                  mixed_precision=mixed)
        kw = dict(lr=1e-6, clip_grad=1.0, total_training_steps=10**6)
        optim = FSDPOptimizerConfig(**kw) if gr is None else GradRegFSDPOptimizerConfig(**kw, grad_reg=gr)
        w = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model, engine_config=engine,
                                                optimizer_config=optim, checkpoint_config=CheckpointConfig()))
        w.reset()
        return w

    gr_cfg = None
    if variant in GR_VARIANTS:
        gr_cfg = {"strength": a.gr_strength, "eps": a.gr_eps, "eps_mode": "radius", **GR_VARIANTS[variant]}
        P.instrument_gradreg()
    actor = worker(gr_cfg, "cpu" if not cuda and gr_cfg else ("nvidia" if gr_cfg else "none"))
    loss = dict(loss_agg_mode="token-mean", use_kl_loss=kl, kl_loss_coef=BETA, kl_loss_type="low_var_kl")
    actor.set_loss_fn(partial(ppo_loss, config=ActorConfig(
        strategy="fsdp2", rollout_n=a.generations, ppo_mini_batch_size=n, ppo_micro_batch_size_per_gpu=a.micro,
        use_dynamic_bsz=False, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, entropy_coeff=0.0, **loss)))
    ref = worker(None, "none") if kl else None
    engine = actor.engine
    engine.optimizer_step = P.wrap(engine.optimizer_step, "optimizer")
    base = P.instrument_optimizer(engine.optimizer)
    tok = AutoTokenizer.from_pretrained(model_dir)
    class SharedModuleRollout(HFRollout):
        """verl's HFRollout (its ``generate_sequences``), generating with the actor's own module (colocated: nothing
        to sync). verl 0.9.1's HFRollout does not construct (its ``__init__`` calls ``BaseRollout.__init__`` without
        the arguments it now takes, and the weight-sync hooks are abstract): set its two attributes here, no-op hooks.
        """

        def __init__(self, module, config) -> None:
            self.module, self.config = module, config

        async def resume(self, tags: list[str]) -> None:
            pass

        async def update_weights(self, weights, **kwargs) -> None:
            pass

        async def release(self) -> None:
            pass

    rollout = SharedModuleRollout(engine.module, OmegaConf.create(dict(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, response_length=a.completion_len, micro_batch_size=n)))
    reward_fn = NaiveRewardManager(tok, num_examine=0, compute_score=verl_score)
    texts = prompt_texts(max(64, a.prompts * 8), a.prompt_len, a.vocab, a.seed)

    def prompts_batch(it: int) -> DataProto:
        chosen = [texts[(it * a.prompts + i) % len(texts)] for i in range(a.prompts)]
        ids = torch.tensor([[int(w[1:]) for w in s.split()] for s in chosen], dtype=torch.long)
        ids = ids.repeat_interleave(a.generations, dim=0)  # verl repeats each prompt n times (rollout.n)
        mask = torch.ones_like(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        uid = np.array([str(i // a.generations) for i in range(n)], dtype=object)
        dev = "cuda" if cuda else "cpu"
        return DataProto.from_dict(
            tensors={"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": pos.to(dev)},
            non_tensors={"uid": uid, "data_source": np.array(["even"] * n, dtype=object),
                         "reward_model": np.array([{"ground_truth": ""}] * n, dtype=object)},
            meta_info={"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})

    def log_probs(w, batch: DataProto) -> torch.Tensor:
        td = left_right_2_no_padding(batch.to_tensordict())
        tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False, temperature=1.0)
        out = w.infer_batch(td)
        return no_padding_2_padding(tu.get(out, "log_probs"), td).float()

    def iteration(it: int) -> None:
        prompts = prompts_batch(it)
        with P.phase("generation"):
            gen = rollout.generate_sequences(prompts)
        with P.phase("rollout_other"):
            batch = DataProto(batch=gen.batch, non_tensor_batch=prompts.non_tensor_batch, meta_info={})
            batch.batch["response_mask"] = batch.batch["attention_mask"][:, -a.completion_len:]
            with P.phase("reward"):
                rewards = reward_fn(batch)
            with P.phase("old_logp"):
                batch.batch["old_log_probs"] = log_probs(actor, batch)
            if ref is not None:
                with P.phase("ref_forward"):
                    batch.batch["ref_log_prob"] = log_probs(ref, batch)
            adv, _ = compute_grpo_outcome_advantage(rewards, batch.batch["response_mask"],
                                                    batch.non_tensor_batch["uid"])
            batch.batch["advantages"] = adv
            td = left_right_2_no_padding(batch.to_tensordict())
            tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False, global_batch_size=n,
                                 mini_batch_size=n, epochs=1, seed=a.seed, dataloader_kwargs={"shuffle": False},
                                 compute_loss=True)
        with P.phase("first_pass"):
            actor.train_mini_batch(td)

    policy = list(engine.module.parameters())
    info = {"policy_params": sum(_local(p).numel() for p in policy),
            "policy_param_bytes": tensor_bytes(_local(p) for p in policy),
            "ref_param_bytes": tensor_bytes(_local(p) for p in ref.engine.module.parameters()) if ref else 0,
            "micro_batches": n // a.micro, "sequences": n,
            "engine": type(engine).__name__}
    conn.send(("ready", info))
    it = 0
    for _ in range(a.warmup + a.rounds):
        if conn.recv() != "go":
            raise RuntimeError("rl_iteration child: expected 'go'")
        records = []
        for _ in range(a.cycle):
            P.start()
            iteration(it)
            records.append(P.stop())
            it += 1
        if cuda:  # between turns: the cached blocks back to the device (the other variants share it)
            torch.cuda.empty_cache()
        conn.send(("turn", records))
    info.update(_memory(cuda), optimizer_state_bytes=_state_bytes(base),
                **_gr_memory(getattr(engine, "grad_reg", None), policy))
    conn.send(("done", info))
    dist.destroy_process_group()


def child_main(conn, host: str, variant: str, a: argparse.Namespace, model_dir: str, log: str) -> None:
    # the hosts' own chatter (verl's prints, warnings) goes to a log file; the parent shows its tail on an error
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        if a.device == "cpu" and a.threads:
            torch.set_num_threads(a.threads)
        (trl_child if host == "trl" else verl_child)(conn, variant, a, model_dir)
    except BaseException as err:  # the parent records why (e.g. a variant the host does not accept)
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()[-3000:]))
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------------ parent
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def run_host(host: str, a: argparse.Namespace, model_dir: str, ctx, logs: str) -> dict:
    """Start one process per variant (one at a time: set-up does not overlap), take turns, collect."""
    procs, conns, ready, skipped = {}, {}, {}, dict(UNAVAILABLE)
    for v in a.variants:
        here, there = ctx.Pipe()
        cfg = argparse.Namespace(**vars(a), port=_free_port(), workdir=logs)
        log = os.path.join(logs, f"{host}_{v}.log")
        p = ctx.Process(target=child_main, args=(there, host, v, cfg, model_dir, log), daemon=True)
        p.start()
        there.close()
        msg = _recv(here, p)
        if msg[0] == "ready":
            procs[v], conns[v], ready[v] = p, here, msg[1]
            print(f"[{host}] {v}: ready ({msg[1]['policy_params'] / 1e6:.2f}M params)", flush=True)
        else:
            skipped[v] = msg[1]
            print(f"[{host}] {v}: unavailable: {msg[1]}", flush=True)
            if os.environ.get("GRKERNELS_BENCH_DEBUG"):
                print(_tail(log), file=sys.stderr)
            p.join()
    turns: dict[str, list[list[dict]]] = {v: [] for v in procs}
    names = list(procs)
    for r in range(a.warmup + a.rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for v in order:
            conns[v].send("go")
            msg = _recv(conns[v], procs[v])
            if msg[0] != "turn":
                raise RuntimeError(f"[{host}] {v}: {msg[1]}\n{_tail(os.path.join(logs, f'{host}_{v}.log'))}")
            turns[v].append(msg[1])
        print(f"[{host}] round {r + 1}/{a.warmup + a.rounds}" + (" (warm-up)" if r < a.warmup else ""), flush=True)
    final = {}
    for v in names:
        msg = _recv(conns[v], procs[v])
        if msg[0] != "done":
            raise RuntimeError(f"[{host}] {v}: {msg[1]}\n{_tail(os.path.join(logs, f'{host}_{v}.log'))}")
        final[v] = msg[1]
        procs[v].join(timeout=60)
    return summarise(host, a, turns, ready, final, skipped)


def _recv(conn, proc, timeout: float = 3600.0):
    if not conn.poll(timeout):
        raise TimeoutError(f"no message from the child process {proc.pid} in {timeout:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        proc.join(timeout=5)
        raise RuntimeError(f"the child process {proc.pid} ended (exit code {proc.exitcode})") from None


def summarise(host: str, a, turns, ready, final, skipped) -> dict:
    """Per variant: medians over the kept rounds of each turn's mean; ratios per round; floors and gaps."""
    keys = (*PHASES, "iteration", "wall")
    kept = {v: [{k: statistics.fmean(rec.get(k, rec["iteration"]) for rec in turn) for k in keys}
                for turn in ts[a.warmup:]] for v, ts in turns.items()}
    rows = {}
    for v, rounds in kept.items():
        row = {k: statistics.median(r[k] for r in rounds) for k in keys}
        row["gr_share"] = statistics.median((r["gr_pass"] + r["gr_math"]) / r["iteration"] for r in rounds)
        for base in ("kl", "none"):
            if base in kept:
                row[f"x_{base}"] = statistics.median(r["iteration"] / b["iteration"]
                                                     for r, b in zip(rounds, kept[base]))
        row["memory"] = {**ready[v], **final.get(v, {})}
        rows[v] = row
    floors = {}
    if "none" in kept and "gr" in kept:
        none, full = kept["none"], kept["gr"]
        m_total = ready["gr"]["micro_batches"]
        for v in kept:
            spec = GR_VARIANTS.get(v, {})
            if "subset_fraction" in spec:
                m = max(1, math.ceil(spec["subset_fraction"] * m_total))
                floor = [nr["iteration"] + fr["gr_pass"] * m / m_total + fr["gr_math"] for nr, fr in zip(none, full)]
            elif "every" in spec:
                k = spec["every"]
                floor = [nr["iteration"] + (fr["iteration"] - nr["iteration"]) / k for nr, fr in zip(none, full)]
            else:
                continue
            floors[v] = {"floor_s": statistics.median(floor),
                         "floor_x_none": statistics.median(f / nr["iteration"] for f, nr in zip(floor, none)),
                         "gap_x_none": statistics.median((r["iteration"] - f) / nr["iteration"]
                                                         for r, f, nr in zip(kept[v], floor, none))}
    return {"variants": rows, "floors": floors, "unavailable": skipped, "rounds": a.rounds, "cycle": a.cycle,
            "clock": getattr(a, "clock", "wall")}


def memory_by_dtype(model_dir: str, a: argparse.Namespace) -> list[dict]:
    """GR's extra bytes per parameter per mode and dtype (``GradReg.extra_memory_bytes()`` after a step on the
    benchmark's model), beside the reference model's bytes per parameter (the KL penalty's memory)."""
    from transformers import AutoModelForCausalLM

    from grkernels import GradReg, head_gr_step, head_param_groups, paper_exclude

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        n = sum(p.numel() for p in model.parameters())
        ids = torch.randint(4, a.vocab, (4, 12), generator=torch.Generator().manual_seed(0))

        def loss() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

        row = {"dtype": str(dtype).replace("torch.", ""), "params": n,
               "reference_model_bytes_per_param": tensor_bytes(model.parameters()) / n}
        for mode, kw in (("full", {}), ("every4", dict(every=4, reuse="orthogonal")), ("sub0.25", {}),
                         ("central", dict(estimator="central"))):
            opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.0), strength=0.1, eps=0.02, eps_mode="radius",
                          exclude=paper_exclude(model), **kw)
            opt.zero_grad()
            loss().backward()
            if mode == "sub0.25":
                opt.mark_subset(0.25)
            for _ in range(opt.extra_passes):
                opt.perturb()
                loss().backward()
            opt.step()
            row[f"gr_{mode}_bytes_per_param"] = opt.extra_memory_bytes() / n
        if not a.tied:
            opt = GradReg(torch.optim.SGD(head_param_groups(model, 0.1), lr=0.0), strength=0.1, eps=0.02,
                          eps_mode="absolute")
            head_gr_step(opt, lambda: model.model(input_ids=ids).last_hidden_state,
                         lambda h: torch.nn.functional.cross_entropy(model.lm_head(h).flatten(0, 1).float(),
                                                                     ids.flatten()))
            row["gr_head_bytes_per_param"] = opt.extra_memory_bytes() / n
        rows.append(row)
    return rows


def print_table(host: str, res: dict) -> None:
    print(f"\n{host}: ms per iteration (median; {res['clock']} clock), phases, × KL, GR share, peak RSS")
    cols = ("generation", "reward", "old_logp", "ref_forward", "rollout_other", "first_pass", "gr_pass", "gr_math",
            "optimizer", "other")
    print(f"{'variant':<12} {'iter':>8} " + " ".join(f"{c[:8]:>8}" for c in cols) + f" {'×KL':>6} {'×none':>6} "
          f"{'GR%':>5} {'RSS MiB':>8}")
    for v, r in res["variants"].items():
        print(f"{v:<12} {1e3 * r['iteration']:>8.1f} " + " ".join(f"{1e3 * r[c]:>8.1f}" for c in cols)
              + f" {r.get('x_kl', float('nan')):>6.2f} {r.get('x_none', float('nan')):>6.2f}"
              f" {100 * r['gr_share']:>5.1f} {r['memory'].get('peak_rss_bytes', 0) / 2**20:>8.0f}")
    for v, f in res["floors"].items():
        print(f"  {v}: floor {f['floor_x_none']:.3f}× none, gap {f['gap_x_none']:+.3f}× none")
    for v, why in res["unavailable"].items():
        print(f"  {v}: unavailable: {why[:160]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="sizes and device: cpu (default without a GPU) or gpu (a Qwen2.5-0.5B-shaped model, bf16)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--hosts", default="trl,verl")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--model", default=None, help="a Hugging Face model folder (default: one built from the sizes)")
    for name in ("hidden", "layers", "heads", "kv_heads", "inter", "vocab", "prompts", "generations", "micro",
                 "prompt_len", "completion_len"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--gr-strength", type=float, default=0.1)
    ap.add_argument("--gr-eps", type=float, default=0.02, help="radius mode")
    ap.add_argument("--rounds", type=int, default=5, help="rounds kept (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cycle", type=int, default=4, help="iterations per turn (a multiple of every-k's k)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads per process")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="the phases' clock: wall time, or the process's CPU time (a machine shared with other jobs; "
                         "with --threads 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory-table", action="store_true", help="skip memory_by_dtype")
    ap.add_argument("--variant", default=None, help="suffix of the result file: <device>_rl_iteration_<variant>.json")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    preset = PRESETS[a.preset or ("gpu" if a.device == "cuda" else "cpu")]
    for k, v in preset.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(a.variants) - set(VARIANTS) - set(UNAVAILABLE))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    a.variants = [v for v in a.variants if v in VARIANTS]
    if (a.prompts * a.generations) % a.micro:
        ap.error("--prompts x --generations must be a multiple of --micro")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rl_iteration.py --device cuda needs a CUDA device (--device cpu for the CPU sizes)")
    hosts = [h.strip() for h in a.hosts.split(",") if h.strip()]
    run = Run("rl_iteration", a.device, argv)
    print(run.header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="rl_iteration_") as tmp:
        model_dir = a.model or os.path.join(tmp, "model")
        if a.model is None:
            build_model_dir(model_dir, a)
        ctx = mp.get_context("forkserver")
        # the fork server imports these once; verl is imported by its children (after choosing verl's platform)
        ctx.set_forkserver_preload(["torch", "transformers", *(["trl"] if "trl" in hosts else [])])
        results = {"config": {k: v for k, v in vars(a).items()}, "hosts": {}}
        for host in hosts:
            results["hosts"][host] = run_host(host, a, model_dir, ctx, tmp)
            print_table(host, results["hosts"][host])
        if not a.no_memory_table and a.model is None:
            results["memory_by_dtype"] = memory_by_dtype(model_dir, a)
            for r in results["memory_by_dtype"]:
                print(r)
    run.write(results, a.out, a.variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
