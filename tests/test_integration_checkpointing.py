"""Gradient checkpointing in TRL's GRPO under GR, with dropout on.

Checkpointing recomputes each block's forward during backward from a stashed RNG state; GR replays the RNG state
of the first pass for the pass at θ'. Composed, the pass at θ' must recompute its activations at θ' with the
first pass's dropout masks. Checked against an independent float64 recomputation that restores the recorded RNG
state before each micro-batch's forward (tests/grpo_reference.py), for non-reentrant and reentrant checkpointing,
and against the same run without checkpointing (the same gradients, step by step). Tiny Llama with attention
dropout 0.1, CPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from grpo_reference import (  # noqa: E402
    PROMPTS,
    Snapshots,
    gr_reference,
    make_model,
    make_tokenizer,
    recording,
    rel,
    reward_fn,
)
from trl import GRPOTrainer  # noqa: E402

from grkernels.integrations.hf import grad_reg_trainer  # noqa: E402
from grkernels.integrations.trl import GradRegGRPOConfig  # noqa: E402

GAMMA, EPS, DROPOUT = 1.0, 1e-2, 0.1


def run(tmp_path, checkpointing: dict | None):
    args = GradRegGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, learning_rate=3e-3, bf16=False, use_cpu=True, use_vllm=False, report_to="none",
        logging_steps=1, save_strategy="no", beta=0.0, max_grad_norm=0.0, seed=0, loss_type="dapo",
        gradient_accumulation_steps=2, gradient_checkpointing=checkpointing is not None,
        gradient_checkpointing_kwargs=checkpointing, grad_reg_strength=GAMMA, grad_reg_eps=EPS,
        grad_reg_eps_mode="absolute", grad_reg_g1_clip=None, grad_reg_g2_clip=None)  # gr_reference's θ + ε·g1
    snaps = Snapshots()
    tr = grad_reg_trainer(recording(GRPOTrainer))(
        model=make_model(attention_dropout=DROPOUT), reward_funcs=reward_fn, args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=make_tokenizer(), callbacks=[snaps])
    snaps.trainer = tr
    tr.train()
    assert tr.model.is_gradient_checkpointing == (checkpointing is not None)
    # the recomputation calls the model through torch.func.functional_call, which reentrant checkpointing would
    # bypass in backward: recompute without it (the masks come from the recorded RNG states)
    tr.model.gradient_checkpointing_disable()
    return tr, snaps


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain"), None)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_replays_dropout_at_theta_prime(tmp_path, plain, reentrant):
    tr, snaps = run(tmp_path, {"use_reentrant": reentrant})
    names = [n for n, _ in tr.model.named_parameters()]
    excluded = {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(snaps.steps) == 2
    for k, step in enumerate(snaps.steps):
        exp = gr_reference(tr.model, step, names, excluded, gamma=GAMMA, eps=EPS, loss_type="dapo", use_rng=True)
        err = rel(step["grad"], exp["gr"])
        assert err < 1e-4, f"step {k}: checkpointed GR gradient vs recomputation with the same masks: {err:.2e}"
        # dropout matters at this size: without the masks (eval mode) the recomputation is far off
        no_masks = gr_reference(tr.model, step, names, excluded, gamma=GAMMA, eps=EPS, loss_type="dapo")
        assert rel(step["grad"], no_masks["gr"]) > 100 * max(err, 1e-6)
        assert rel(exp["gr"], exp["g1"], [n for n in names if n not in excluded]) > 0.05
        # and the run without checkpointing took the same step: same batch, same θ, same gradient
        p_step = plain[1].steps[k]
        for a, b in zip(p_step["window"], step["window"]):
            assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert rel(step["theta"], p_step["theta"]) < 1e-6
        assert rel(step["grad"], p_step["grad"]) < 1e-5
