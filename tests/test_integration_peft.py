"""GR on LoRA adapters (PEFT): TRL GRPO with ``peft_config`` and a plain ``transformers.Trainer`` with a PeftModel.

The gradient handed to the optimizer is compared with an independent float64 recomputation
(tests/grpo_reference.py) on the snapshot of each step: GR on the adapter parameters, the plain gradient g1 on the
trainable parameters the paper's default leaves out (an adapted or copied output head), nothing on the frozen base.
LoRA dropout is on (0.1): the recomputation restores the RNG state TRL's forward started from, so the masks at θ
and θ' are the ones of the run (GR's RNG replay). Tiny Llama, CPU, no downloads.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from grpo_reference import (  # noqa: E402
    PROMPTS,
    Snapshots,
    completion_logps,
    gr_reference,
    make_model,
    make_tokenizer,
    recording,
    rel,
    reward_fn,
)
from peft import LoraConfig  # noqa: E402
from torch.func import functional_call  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer  # noqa: E402
from grkernels.integrations.trl import GradRegGRPOConfig  # noqa: E402

GAMMA, EPS = 1.0, 1e-2
ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


def grpo_args(tmp_path, **kw) -> GradRegGRPOConfig:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=2, learning_rate=3e-3, bf16=False, use_cpu=True, use_vllm=False, report_to="none",
                logging_steps=1, save_strategy="no", beta=0.0, max_grad_norm=0.0, seed=0, loss_type="grpo",
                gradient_accumulation_steps=2, gradient_checkpointing=False, grad_reg_strength=GAMMA,
                grad_reg_eps=EPS, grad_reg_eps_mode="absolute", grad_reg_g1_clip=None, grad_reg_g2_clip=None)
    base.update(kw)
    return GradRegGRPOConfig(**base)


def run_grpo(tmp_path, lora: LoraConfig, **kw):
    snaps = Snapshots()
    tr = grad_reg_trainer(recording(GRPOTrainer))(
        model=make_model(), reward_funcs=reward_fn, args=grpo_args(tmp_path, **kw),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=make_tokenizer(), callbacks=[snaps],
        peft_config=lora)
    snaps.trainer = tr
    base_before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    tr.train()
    return tr, snaps, base_before


def check_steps(tr, snaps, base_before, excluded: set[str], beta: float = 0.0) -> None:
    model = tr.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(excluded) <= set(trainable)
    gr_names = [n for n in trainable if n not in excluded]
    assert gr_names and all("lora_" in n for n in gr_names)
    ref_fn = None
    if beta:
        def ref_fn(inp):  # TRL's reference under PEFT: the same model with the adapters disabled, at θ
            with torch.no_grad(), model.disable_adapter():
                return completion_logps(model, dict(model.named_parameters()), inp)

    assert len(snaps.steps) == 2
    for step in snaps.steps:
        assert set(step["grad"]) == set(trainable)  # nothing on the frozen base
        exp = gr_reference(model, step, trainable, excluded, gamma=GAMMA, eps=EPS, loss_type="grpo", beta=beta,
                           kl_bias_correction=tr.args.use_bias_correction_kl, use_rng=True, ref_fn=ref_fn)
        err = rel(step["grad"], exp["gr"])
        assert err < 1e-4, f"optimizer gradient vs recomputed GR gradient: rel err {err:.2e}"
        if excluded:  # the head's trainable parameters get the plain gradient g1
            assert rel(step["grad"], exp["g1"], excluded) < 1e-4
        assert rel(exp["gr"], exp["g1"], gr_names) > 0.05  # the correction is large: a wrong pass could not pass
    for n, p in model.named_parameters():  # the frozen base: untouched by GR's perturb/restore and by the update
        if n in base_before:
            assert torch.equal(p.detach(), base_before[n]), n
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all(h["grad_reg/gr_rel"] > 0 for h in logs) and len(logs) == 2


def lora(**kw) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ATTN_MLP, task_type="CAUSAL_LM")
    base.update(kw)
    return LoraConfig(**base)


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no-kl", "kl-adapters-off-reference"])
def test_grpo_lora_attention_mlp_head_frozen(tmp_path, beta):
    """LoRA on attention and MLP, head and embeddings frozen: GR on every adapter parameter (the default exclusions
    name only frozen parameters). β > 0: TRL's reference is the model with its adapters disabled."""
    tr, snaps, base = run_grpo(tmp_path, lora(), beta=beta)
    check_steps(tr, snaps, base, excluded=set(), beta=beta)


def test_grpo_lora_on_the_head_is_refused_by_trl(tmp_path):
    """TRL 1.16's GRPO computes log-probs from ``lm_head.weight`` directly (its fused head), so it refuses a LoRA
    adapter on the head; an adapted head is tested with the plain Trainer below, a trained head copy next."""
    with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
        run_grpo(tmp_path, lora(target_modules=[*ATTN_MLP, "lm_head"]))


def test_grpo_lora_with_a_trained_head_copy(tmp_path):
    """``modules_to_save=["lm_head"]``: PEFT trains a full copy of the head beside the adapters; it gets g1."""
    tr, snaps, base = run_grpo(tmp_path, lora(modules_to_save=["lm_head"]))
    head = {n for n, p in tr.model.named_parameters() if p.requires_grad and "lm_head" in n}
    assert head and all("modules_to_save" in n for n in head)
    check_steps(tr, snaps, base, excluded=head)


# ---------------------------------------------------------------- a plain transformers.Trainer with a PeftModel
class LMData(torch.utils.data.Dataset):
    def __init__(self, n=16, length=7, vocab=13, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("head", [False, True], ids=["head-frozen", "head-adapted"])
def test_plain_trainer_with_a_peft_model(tmp_path, head):
    """grad_reg_trainer(Trainer) on ``get_peft_model(...)``: the causal-LM loss (token mean over the window's two
    micro-batches), GR on the adapters, LoRA dropout replayed. With LoRA on the output head too, the head's adapters
    are the output layer the paper's default leaves out: they get g1."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    args = grad_reg_config(TrainingArguments)(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", max_grad_norm=0.0, logging_steps=1,
        grad_reg_strength=GAMMA, grad_reg_eps=EPS, grad_reg_eps_mode="absolute", grad_reg_g1_clip=None,
        grad_reg_g2_clip=None, dataloader_drop_last=True)
    model = get_peft_model(make_model(), lora(target_modules=[*ATTN_MLP, "lm_head"] if head else ATTN_MLP))
    snaps = Snapshots()
    tr = grad_reg_trainer(recording(Trainer))(model=model, args=args, train_dataset=LMData(), callbacks=[snaps])
    snaps.trainer = tr
    tr.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    excluded = {n for n in trainable if "lm_head" in n}
    assert len(excluded) == (2 if head else 0)
    for step in snaps.steps:
        window, rngs = step["window"], step["rng"]
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        frozen = {n: v.double() for n, v in step["theta"].items() if n not in trainable}

        def loss_at(params):
            tot = 0.0
            for b, rng in zip(window, rngs):
                torch.set_rng_state(rng)
                logits = functional_call(model, {**frozen, **params}, (), {"input_ids": b["input_ids"]}).logits
                lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, b["labels"][:, 1:, None])
                tot = tot - lp.sum() / n_tok
            return tot

        model.train()
        theta = {n: step["theta"][n].double().requires_grad_(True) for n in trainable}
        g1 = dict(zip(trainable, torch.autograd.grad(loss_at(theta), list(theta.values()))))
        theta2 = {n: (theta[n] + EPS * g1[n] if n not in excluded else theta[n]).detach().requires_grad_(True)
                  for n in trainable}
        g2 = dict(zip(trainable, torch.autograd.grad(loss_at(theta2), list(theta2.values()))))
        exp = {n: g1[n] + (GAMMA / EPS) * (g2[n] - g1[n]) if n not in excluded else g1[n] for n in trainable}
        assert rel(step["grad"], exp) < 1e-4
        assert rel(exp, g1) > 0.01
    assert all(math.isfinite(h["grad_reg/gr_rel"]) for h in tr.state.log_history if "loss" in h)
