"""Cheaper GR through a real ``transformers.Trainer`` (issue 13): ``grad_reg_every`` / ``grad_reg_reuse`` and
``grad_reg_subset_fraction``, against an independent recomputation over the same prepared micro-batches."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_integration_trl import EPS, GAMMA, LMData, Rec, Snapshots, make_model, rel  # noqa: E402
from torch.func import functional_call  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer  # noqa: E402


def train(tmp_path, ga, steps, **gr):
    args = grad_reg_config(TrainingArguments)(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ga, max_steps=steps,
        learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", max_grad_norm=0.0,
        logging_steps=1, grad_reg_strength=GAMMA, grad_reg_eps=EPS, grad_reg_eps_mode="absolute",
        grad_reg_g1_clip=None, grad_reg_g2_clip=None, grad_reg_exclude=["none"], dataloader_drop_last=True, **gr,
    )
    snaps = Snapshots()
    tr = grad_reg_trainer(Rec)(model=make_model(), args=args, train_dataset=LMData(n=32), callbacks=[snaps])
    tr.rec_inputs = tr.rec
    snaps.trainer = tr
    tr.train()
    return tr, snaps


def window_grads(model, step, micro):
    """g1 of the window and ∇ of the terms of the micro-batches ``micro``, at θ and at θ' = θ + ε·g1."""
    names = list(step["theta"])
    window = step["window"]
    n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)

    def loss_at(params, which):
        tot = 0.0
        for k in which:
            b = window[k]
            logits = functional_call(model, params, (), {"input_ids": b["input_ids"]}).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["labels"][:, 1:, None])
            tot = tot - lp.sum() / n_tok
        return tot

    def grad(params, which):
        return dict(zip(names, torch.autograd.grad(loss_at(params, which), list(params.values()))))

    theta = {n: step["theta"][n].clone().requires_grad_(True) for n in names}
    g1 = grad(theta, range(len(window)))
    theta2 = {n: (theta[n] + EPS * g1[n]).detach().requires_grad_(True) for n in names}
    return g1, grad(theta, micro), grad(theta2, micro)


def test_subset_fraction_replays_part_of_the_window(tmp_path):
    tr, snaps = train(tmp_path, ga=4, steps=2, grad_reg_subset_fraction=0.5, grad_reg_subset_by="random")
    for step in snaps.steps:
        g1, g1_s, g2_s = window_grads(tr.model, step, [0, 1])  # the first ceil(0.5·4) micro-batches
        exp = {n: g1[n] + (GAMMA / EPS) * (g2_s[n] - g1_s[n]) / 0.5 for n in g1}
        assert rel(step["grad"], exp) < 1e-4
        g1_all, _, g2_all = window_grads(tr.model, step, range(4))
        full = {n: g1_all[n] + (GAMMA / EPS) * (g2_all[n] - g1_all[n]) for n in g1}
        assert rel(step["grad"], full) > 1e-3  # really a subset


def test_every_2_with_orthogonal_reuse(tmp_path):
    tr, snaps = train(tmp_path, ga=2, steps=2, grad_reg_every=2, grad_reg_reuse="orthogonal")
    first, second = snaps.steps
    g1, _, g2 = window_grads(tr.model, first, range(2))
    c = {n: (GAMMA / EPS) * (g2[n] - g1[n]) for n in g1}
    assert rel(first["grad"], {n: g1[n] + c[n] for n in g1}) < 1e-4

    def dot(a, b):
        return sum(float((a[n].double() * b[n].double()).sum()) for n in a)

    rho = ((dot(c, c) - dot(c, g1) ** 2 / dot(g1, g1)) / dot(g1, g1)) ** 0.5
    h1, _, _ = window_grads(tr.model, second, range(2))  # no second pass on this step
    beta = dot(c, h1) / dot(h1, h1)
    d = {n: c[n] - beta * h1[n] for n in c}
    scale = rho * dot(h1, h1) ** 0.5 / dot(d, d) ** 0.5
    assert rel(second["grad"], {n: h1[n] + scale * d[n] for n in h1}) < 1e-4


def test_cheap_settings_are_validated(tmp_path):
    for bad, name in ((dict(grad_reg_every=0), "every"), (dict(grad_reg_reuse="x"), "reuse"),
                      (dict(grad_reg_subset_fraction=0.0), "subset_fraction")):
        with pytest.raises(ValueError, match=f"GR setting {name}="):
            train(tmp_path, ga=2, steps=1, **bad)
    # a plain Trainer has no per-sequence advantages to order the window by: the schema's default rule is refused
    # when the trainer is built (it would otherwise silently replay the first micro-batches)
    with pytest.raises(ValueError, match="subset_by='advantage': not supported by GradRegRec"):
        train(tmp_path, ga=2, steps=1, grad_reg_subset_fraction=0.5)
