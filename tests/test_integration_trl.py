"""GradReg inside TRL's GRPOTrainer (and a plain transformers.Trainer): the gradient the optimizer gets.

The optimizer's gradient is captured right before the base optimizer steps (after the Trainer's clipping,
which is off here) and compared with an independent recomputation over the same prepared inputs:
a hand-written GRPO loss (per loss type) at θ and at θ' = θ + ε·g1 (GR parameters only), with the old
log-probs pinned at θ where TRL did not store them, GR = g1 + (γ/ε)(g2 − g1), excluded parameters g1.
Tiny Llama from a config, tokenizer built in code, CPU, fp32: no downloads.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from torch.func import functional_call  # noqa: E402
from transformers import (  # noqa: E402
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import GRPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from grpo_reference import CHARS, make_tokenizer  # noqa: E402,F401  (the one tiny tokenizer)

from grkernels.integrations.hf import grad_reg_settings, grad_reg_trainer  # noqa: E402
from grkernels.integrations.trl import GradRegGRPOConfig, GradRegGRPOTrainer, grad_reg_config  # noqa: E402

GAMMA, EPS = 1.0, 1e-2  # large γ/ε: the GR correction is a sizeable part of the gradient (test sensitivity)
EXCLUDED = ("model.embed_tokens.weight", "lm_head.weight")  # what the paper leaves out (default exclusion)


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=4 + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def reward_fn(completions, **kwargs):
    return [float(c.count("a") + 0.5 * c.count("b")) - 0.2 * len(c) for c in completions]


def grpo_args(tmp_path, **kw) -> GradRegGRPOConfig:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, learning_rate=3e-3, bf16=False, use_cpu=True, use_vllm=False, report_to="none",
        logging_steps=1, save_strategy="no", beta=0.0, max_grad_norm=0.0, seed=0,
        grad_reg_strength=GAMMA, grad_reg_eps=EPS, grad_reg_eps_mode="absolute", grad_reg_g1_clip=None,
        grad_reg_g2_clip=None,  # absolute ε: the recomputations perturb θ + ε·g1
    )
    base.update(kw)
    return GradRegGRPOConfig(**base)


class RecordingGRPO(GRPOTrainer):
    """Records every prepared micro-batch (first passes only: the GR replay does not call this)."""

    def __init__(self, *a, **k):
        self.rec_inputs: list[dict] = []
        self.rec_entropy_counts: list[int] = []
        super().__init__(*a, **k)

    def _prepare_inputs(self, generation_batch):
        out = super()._prepare_inputs(generation_batch)
        self.rec_inputs.append(out)
        return out

    def log(self, logs, start_time=None):
        if "loss" in logs:
            self.rec_entropy_counts.append(len(self._metrics["train"]["entropy"]))
        return super().log(logs, start_time)


class Snapshots(TrainerCallback):
    """θ at step begin; θ, .grad and the window's prepared inputs right before optimizer.step()."""

    def __init__(self):
        self.trainer = None
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        t = self.trainer
        ga = t.current_gradient_accumulation_steps
        self.steps.append(dict(
            theta_begin=self._theta,
            theta={n: p.detach().clone() for n, p in model.named_parameters()},
            grad={n: p.grad.detach().clone() for n, p in model.named_parameters()},
            window=list(t.rec_inputs[-ga:]),
        ))


def run_grpo(tmp_path, trainer_cls=None, **kw):
    trainer_cls = trainer_cls or grad_reg_trainer(RecordingGRPO)
    snaps = Snapshots()
    ds = Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh", "ha", "bd", "ca", "ge"] * 4})
    tr = trainer_cls(
        model=make_model(), reward_funcs=reward_fn, args=grpo_args(tmp_path, **kw), train_dataset=ds,
        processing_class=make_tokenizer(), callbacks=[snaps],
    )
    snaps.trainer = tr
    tr.train()
    # the reference below uses torch.func.functional_call, which (re-entrant) activation checkpointing would
    # bypass in backward: recompute without it (TRL trains with it on by default)
    tr.model.gradient_checkpointing_disable()
    return tr, snaps


# ---------------------------------------------------------------- the independent reference
def completion_logps(model, params, inp, with_entropy=False):
    ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], dim=1)
    am = torch.cat([inp["prompt_mask"], inp["completion_mask"]], dim=1)
    logits = functional_call(model, params, (), {"input_ids": ids, "attention_mask": am}).logits
    n = inp["completion_ids"].size(1)
    lp = torch.log_softmax(logits[:, -n - 1 : -1].float(), dim=-1)  # temperature 1
    out = lp.gather(-1, inp["completion_ids"].unsqueeze(-1)).squeeze(-1)
    if with_entropy:
        return out, -(lp.exp() * lp).sum(-1)
    return out


def window_loss(model, params, window, old, tr, ent_masks=None, only=None) -> torch.Tensor:
    """Σ over micro-batches of TRL's per-micro-batch loss (GA-scaled as TRL scales it), written independently.
    ``only``: the terms of those micro-batches (scaled as in the whole window's loss)."""
    ga, loss_type = len(window), tr.loss_type
    total_tokens = sum(inp["completion_mask"].sum() for inp in window)  # spg == GA: window == generation batch
    loss = 0.0
    for k, (inp, old_lp) in enumerate(zip(window, old)):
        if only is not None and k not in only:
            continue
        lp = completion_logps(model, params, inp)
        mask = inp["completion_mask"].float()
        adv = inp["advantages"].unsqueeze(1)
        c1 = torch.exp(lp - old_lp)
        c2 = torch.clamp(c1, 1 - tr.epsilon_low, 1 + tr.epsilon_high)
        ptl = -torch.min(c1 * adv, c2 * adv)
        if ent_masks is not None:  # high-entropy tokens only, the mask taken at θ
            ptl = ptl * ent_masks[k]
        if loss_type == "grpo":
            mb = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
        elif loss_type == "bnpo":
            mb = (ptl * mask).sum() / mask.sum().clamp(min=1.0) / ga
        elif loss_type == "dr_grpo":
            mb = (ptl * mask).sum() / (ptl.size(0) * tr.max_completion_length) / ga
        elif loss_type == "dapo":
            mb = (ptl * mask).sum() / total_tokens
        else:
            raise AssertionError(loss_type)
        loss = loss + mb
    return loss


def expected_gradients(tr, step, pin_old=True):
    """(GR gradient, g1) per parameter name, recomputed from the snapshot of one optimizer step."""
    model = tr.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: step["theta"][n].clone().requires_grad_(True) for n in names}
    window = step["window"]
    with torch.no_grad():
        lp_ent = [completion_logps(model, theta, inp, with_entropy=True) for inp in window]
    lp_theta = [a for a, _ in lp_ent]
    ent_masks = None
    if tr.top_entropy_quantile < 1.0:  # TRL's own quantile rule, applied to entropies at θ
        ent_masks = [GRPOTrainer.get_high_entropy_mask(tr, e, inp["completion_mask"], 1 - tr.top_entropy_quantile)
                     for (_, e), inp in zip(lp_ent, window)]
    old = [inp["old_per_token_logps"] if inp.get("old_per_token_logps") is not None else lpt
           for inp, lpt in zip(window, lp_theta)]

    def loss(params, old):
        return window_loss(model, params, window, old, tr, ent_masks)

    g1 = dict(zip(names, torch.autograd.grad(loss(theta, old), list(theta.values()))))
    theta2 = {n: (theta[n] + EPS * g1[n] if n not in EXCLUDED else theta[n]).detach().requires_grad_(True)
              for n in names}
    if not pin_old:  # what an unpinned replay would differentiate: log π_θ'.detach() as "old"
        with torch.no_grad():
            old = [inp["old_per_token_logps"] if inp.get("old_per_token_logps") is not None
                   else completion_logps(model, theta2, inp) for inp in window]
    g2 = dict(zip(names, torch.autograd.grad(loss(theta2, old), list(theta2.values()))))
    gr = {n: g1[n] if n in EXCLUDED else g1[n] + (GAMMA / EPS) * (g2[n] - g1[n]) for n in names}
    return gr, g1


def rel(a: dict, b: dict, keys=None) -> float:
    keys = list(a) if keys is None else keys
    num = math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))
    den = math.sqrt(sum(float(b[k].double().square().sum()) for k in keys))
    return num / den


# ---------------------------------------------------------------- tests
CASES = [  # (gradient_accumulation_steps, num_iterations, loss_type): every GA x ni pair, every loss at GA 2
    (1, 1, "grpo"),
    (2, 1, "dapo"),
    (1, 2, "dr_grpo"),
    (2, 2, "grpo"),
    (2, 1, "dr_grpo"),
    (2, 2, "dapo"),
    (2, 1, "bnpo"),
    (2, 1, "grpo", 0.5),  # top_entropy_quantile: the entropy mask of θ is reused at θ'
]


def check_gradients(tr, snaps, num_iterations):
    assert len(snaps.steps) == 2
    stored_old = any(inp.get("old_per_token_logps") is not None for s in snaps.steps for inp in s["window"])
    assert stored_old == (num_iterations > 1)  # TRL stores old log-probs only when steps are misaligned
    names = [n for n, _ in tr.model.named_parameters()]
    gr_names = [n for n in names if n not in EXCLUDED]
    for step in snaps.steps:
        # parameters are back at θ (bitwise) when the optimizer steps
        for n in names:
            assert torch.equal(step["theta"][n], step["theta_begin"][n]), n
        exp, g1 = expected_gradients(tr, step)
        err = rel(step["grad"], exp)
        assert err < 1e-4, f"optimizer gradient vs recomputed GR gradient: rel err {err:.2e}"
        # excluded parameters get the plain gradient g1
        assert rel(step["grad"], g1, list(EXCLUDED)) < 1e-4
        # the GR correction is large here, so a missing or wrong second pass could not pass the check above
        assert rel(exp, g1, gr_names) > 0.05
        if not stored_old:  # and pinning the old log-probs at θ matters at this γ/ε
            exp_unpinned, _ = expected_gradients(tr, step, pin_old=False)
            assert rel(step["grad"], exp_unpinned) > 10 * max(err, 1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_grpo_gradient_matches_independent_recomputation(tmp_path, case):
    ga, num_iterations, loss_type, *rest = case
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=ga, num_iterations=num_iterations,
                         loss_type=loss_type, top_entropy_quantile=rest[0] if rest else 1.0)
    check_gradients(tr, snaps, num_iterations)


@pytest.mark.parametrize("ga,num_iterations,loss_type", [(2, 1, "grpo"), (2, 2, "dapo"), (1, 1, "dr_grpo")])
def test_grpo_fused_loss_gradient_matches_independent_recomputation(tmp_path, ga, num_iterations, loss_type):
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=ga, num_iterations=num_iterations,
                         loss_type=loss_type, grad_reg_fused_loss=True)
    assert tr._gr_fused
    check_gradients(tr, snaps, num_iterations)
    logs = [h for h in tr.state.log_history if "loss" in h]
    for k in ("entropy", "clip_ratio/region_mean", "grad_reg/gr_rel"):
        assert all(k in h for h in logs), k
    assert tr.rec_entropy_counts == [ga, ga]  # TRL's metrics appended once per micro-batch, not per pass


def _subset_gradient(tr, step, only, share):
    """g1 + (γ/ε)(g2_S − g1_S)/f recomputed: g1 over the window at θ, g1_S and g2_S of the micro-batches ``only``
    at θ and θ' = θ + ε·g1 (the whole batch's direction), f = ``share``; excluded parameters get g1."""
    model, window = tr.model, step["window"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: step["theta"][n].clone().requires_grad_(True) for n in names}
    with torch.no_grad():
        old = [completion_logps(model, theta, inp) for inp in window]

    def grad(params, which):
        return dict(zip(names, torch.autograd.grad(window_loss(model, params, window, old, tr, only=which),
                                                   list(params.values()))))

    g1 = grad(theta, None)
    g1_s = grad(theta, only)
    theta2 = {n: (theta[n] + EPS * g1[n] if n not in EXCLUDED else theta[n]).detach().requires_grad_(True)
              for n in names}
    g2_s = grad(theta2, only)
    return {n: g1[n] if n in EXCLUDED else g1[n] + (GAMMA / EPS) * (g2_s[n] - g1_s[n]) / share for n in names}


@pytest.mark.parametrize("subset_by", ["advantage", "random"])
def test_grpo_sub_batch_pass_by_advantage_matches_independent_recomputation(tmp_path, monkeypatch, subset_by):
    """grad_reg_subset_fraction=0.5 with 2 micro-batches: the second pass replays micro-batch 0. By |advantage|:
    each window's 8 sequences re-split so that micro-batch 0 holds the 4 with the largest |advantage| (the same
    rows, every column moved together), and the estimate divides by their share of Σ|advantage|; at random:
    TRL's order, divided by 1/2. The optimizer's gradient equals the recomputation on the window it saw."""
    import grkernels.integrations.trl as T

    seen = []
    order = T._order_windows_by_advantage
    monkeypatch.setattr(T, "_order_windows_by_advantage", lambda b, w: seen.append((b, order(b, w))) or seen[-1][1])
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=2, grad_reg_subset_fraction=0.5,
                         grad_reg_subset_by=subset_by)
    assert len(seen) == (2 if subset_by == "advantage" else 0)  # one generation batch per optimizer step

    def rows(batches):
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
        return sorted(tuple(tuple(b[k][i].reshape(-1).tolist()) for k in keys)
                      for b in batches for i in range(len(b["advantages"])))

    for before, after in seen:
        assert rows(before) == rows(after)  # the same sequences, nothing mixed between columns
    for step in snaps.steps:
        a0, a1 = (inp["advantages"].abs() for inp in step["window"])
        if subset_by == "advantage":
            assert float(a0.min()) >= float(a1.max())
            share = float(a0.sum() / (a0.sum() + a1.sum()))
            assert 0.5 < share < 1.0
        else:
            share = 0.5
        exp = _subset_gradient(tr, step, [0], share)
        assert rel(step["grad"], exp) < 1e-4
        full, _ = expected_gradients(tr, step)
        assert rel(step["grad"], full) > 1e-3  # really a subset


def test_grpo_subset_by_is_validated(tmp_path):
    with pytest.raises(ValueError, match="GR setting subset_by='loss'"):
        grpo_args(tmp_path, grad_reg_subset_by="loss")
    from grkernels.integrations.trl import _order_windows_by_advantage

    b = {"advantages": torch.tensor([1.0, -3.0]), "x": torch.tensor([[1], [2]]), "n": torch.tensor(5), "s": ["p", "q"]}
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        _order_windows_by_advantage([b, b, b], 2)
    (one,) = _order_windows_by_advantage([b], 1)
    assert one["x"].tolist() == [[2], [1]] and one["s"] == ["q", "p"] and int(one["n"]) == 5


def test_grpo_fused_loss_refuses_unsupported(tmp_path):
    with pytest.raises(ValueError, match="grad_reg_fused_loss=True does not support: loss_type='sapo'"):
        run_grpo(tmp_path, loss_type="sapo", grad_reg_fused_loss=True, max_steps=1)


def test_grpo_trainer_clipping_acts_on_the_combined_gradient(tmp_path):
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.5, max_steps=1)
    (step,) = snaps.steps
    exp, _ = expected_gradients(tr, step)
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in exp.values()))
    assert norm > 0.5  # so the Trainer's clip is active
    clipped = {n: v * (0.5 / (norm + 1e-6)) for n, v in exp.items()}
    assert rel(step["grad"], clipped) < 1e-4


def test_rloo_replay_logs_once(tmp_path):
    from trl import RLOOTrainer

    from grkernels.integrations.trl import GradRegRLOOConfig

    class Rec(RLOOTrainer):
        counts: list[int] = []

        def log(self, logs, start_time=None):
            if "loss" in logs:
                self.counts.append(len(self._metrics["train"]["entropy"]))
            return super().log(logs, start_time)

    args = GradRegRLOOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, gradient_accumulation_steps=2, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", beta=0.0, grad_reg_strength=GAMMA, grad_reg_eps=EPS,
    )
    ds = Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"] * 4})
    tr = grad_reg_trainer(Rec)(model=make_model(), reward_funcs=reward_fn, args=args, train_dataset=ds,
                               processing_class=make_tokenizer())
    tr.train()
    assert tr._step == 4 and Rec.counts == [2, 2]
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all(h["grad_reg/gr_rel"] > 0 for h in logs)


def test_grpo_replay_leaves_trainer_state_and_logs_once(tmp_path):
    ga = 2
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=ga, max_steps=3)
    # TRL's micro-step counter advanced once per micro-batch (not again by the replay)
    assert tr._step == 3 * ga
    # entropy appended once per micro-batch per logged step (logging_steps=1): no duplicates from the replay
    assert tr.rec_entropy_counts == [ga] * 3
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for k in ("grad_reg/g1_norm", "grad_reg/g2_norm", "grad_reg/gr_rel", "grad_reg/strength"):
            assert k in h and math.isfinite(h[k]), (k, h)
        assert h["grad_reg/strength"] == pytest.approx(GAMMA)
    # and the trainer's own prepared inputs were only produced by first passes
    assert len(tr.rec_inputs) == 3 * ga


def test_grpo_replay_does_not_advance_adaptive_entropy_controller(tmp_path):
    # entropy (~2.5 nats) stays below the target, so the controller adds entropy_coef_delta once per optimizer step
    tr, _ = run_grpo(tmp_path, gradient_accumulation_steps=2, max_steps=3, use_adaptive_entropy=True,
                     entropy_coef=0.1, entropy_coef_delta=0.005, entropy_target=10.0)
    assert tr.entropy_coef == pytest.approx(0.1 + 3 * 0.005)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [round(h["entropy_coef"], 6) for h in logs] == [0.105, 0.11, 0.115]


def test_grpo_warmup_gives_plain_gradient_then_gr(tmp_path):
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=2, grad_reg_warmup_steps=1)
    (s0, s1) = snaps.steps
    exp0, g10 = expected_gradients(tr, s0)
    assert rel(s0["grad"], g10) < 1e-4  # warmup step: no GR, no second pass
    exp1, _ = expected_gradients(tr, s1)
    assert rel(s1["grad"], exp1) < 1e-4


def test_default_config_runs_the_recommended_set(tmp_path):
    """GradRegGRPOConfig and grad_reg_config(TrainingArguments) with no grad_reg_* field set: the GradReg each
    trainer builds runs strength "auto" at target 3 with a radius ε 0.02; in GRPO γ starts at 1e-2 and moves."""
    args = GradRegGRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, learning_rate=3e-3, bf16=False, use_cpu=True, use_vllm=False, report_to="none",
        logging_steps=1, save_strategy="no", beta=0.0, seed=0)
    tr = GradRegGRPOTrainer(model=make_model(), reward_funcs=reward_fn, args=args, processing_class=make_tokenizer(),
                            train_dataset=Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"] * 4}))
    tr.train()
    s = tr.grad_reg.engine.settings
    assert (s.strength, s.target_rel, s.eps_mode, s.eps) == ("auto", 3.0, "radius", 0.02)
    gammas = [h["grad_reg/strength"] for h in tr.state.log_history if "grad_reg/strength" in h]
    assert len(gammas) == 2 and gammas[0] == pytest.approx(1e-2) and gammas[1] != pytest.approx(1e-2)
    hf_args = grad_reg_config(TrainingArguments)(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none")
    hf = grad_reg_trainer(Trainer)(model=make_model(), args=hf_args)
    hf.create_optimizer()
    s = hf.grad_reg.engine.settings
    assert (s.strength, s.target_rel, s.eps_mode, s.eps) == ("auto", 3.0, "radius", 0.02)


def test_ready_class_is_the_recipe():
    assert issubclass(GradRegGRPOTrainer, GRPOTrainer)
    cls = grad_reg_trainer(GRPOTrainer)
    assert cls is grad_reg_trainer(GRPOTrainer)  # cached
    assert [c.__name__ for c in cls.__mro__[1:4]] == ["GradRegGRPOMixin", "GradRegTrainerMixin", "GRPOTrainer"]
    from grkernels.integrations import trl as gtrl

    for name in ("RLOO", "SFT", "DPO", "KTO", "Reward"):
        t, c = getattr(gtrl, f"GradReg{name}Trainer"), getattr(gtrl, f"GradReg{name}Config")
        assert t is not None and c is not None
        assert hasattr(c(output_dir="x", use_cpu=True, report_to="none"), "grad_reg_strength")


#: a command-line spelling per GR setting (not its default) and the value it must give: every schema setting is a
#: grad_reg_* field that HfArgumentParser parses (a new setting without a row here fails the test)
CLI = {
    "strength": (["auto"], "auto"),
    "target_rel": (["0.5"], 0.5),
    "strength_init": (["0.002"], 0.002),
    "eps": (["0.002"], 0.002),
    "eps_mode": (["radius"], "radius"),
    "g1_clip": (["0"], None),
    "g2_clip": (["2.5"], 2.5),
    "estimator": (["central"], "central"),
    "warmup_steps": (["3"], 3),
    "every": (["2"], 2),
    "reuse": (["orthogonal"], "orthogonal"),
    "rounding": (["nearest"], "nearest"),
    "backend": (["torch"], "torch"),
    "lean": (["true"], True),
    "skip_nonfinite": (["false"], False),
    "seed": (["7"], 7),
    "exclude": (["embed", "lm_head"], ["embed", "lm_head"]),
    "subset_fraction": (["0.5"], 0.5),
    "subset_by": (["random"], "random"),
}


@pytest.mark.parametrize("config", ["grpo", "training_arguments"])
def test_every_setting_parses_from_the_command_line(tmp_path, config):
    """Each field of the schema, spelled as on a command line, reaches the config and the resolved settings."""
    from transformers import TrainingArguments

    from grkernels.settings import SETTINGS

    assert sorted(CLI) == sorted(s.name for s in SETTINGS)
    cls = GradRegGRPOConfig if config == "grpo" else grad_reg_config(TrainingArguments)
    parser = HfArgumentParser(cls)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    for name, (words, value) in CLI.items():
        (args,) = parser.parse_args_into_dataclasses([*base, f"--grad_reg_{name}", *words])
        assert getattr(args, f"grad_reg_{name}") == value, name
        assert grad_reg_settings(args).values[name] == value, name
    (args,) = parser.parse_args_into_dataclasses([*base, "--grad_reg_exclude", "none"])
    assert args.grad_reg_exclude == [] and grad_reg_settings(args).exclude == []  # GR on every parameter
    (args,) = parser.parse_args_into_dataclasses([*base, "--grad_reg_strength", "0.25"])
    assert args.grad_reg_strength == 0.25  # a number, not the string the parser saw


def test_config_values_are_validated_with_the_schemas_messages(tmp_path):
    from transformers import TrainingArguments

    (args,) = HfArgumentParser(GradRegGRPOConfig).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", "--grad_reg_eps_mode", "radius"])
    with pytest.raises(ValueError, match="GR setting eps_mode='relative': must be one of"):
        grad_reg_settings(args, {"eps_mode": "relative"})
    with pytest.raises(ValueError, match="GR setting strength=-1.0"):
        grad_reg_settings(args, {"grad_reg_strength": -1.0})
    with pytest.raises(TypeError, match="unknown GR setting 'grad_reg_stength'"):
        grad_reg_settings(args, {"stength": 1.0})
    kw = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    for cls in (GradRegGRPOConfig, grad_reg_config(TrainingArguments)):
        with pytest.raises(ValueError, match="GR setting eps=0.0"):
            cls(**kw, grad_reg_eps=0.0)
        with pytest.raises(ValueError, match="GR setting strength='autox'"):
            cls(**kw, grad_reg_strength="autox")
        # a value the Trainer cannot run is refused when the config is built, not inside train()
        with pytest.raises(ValueError, match="estimator='exact': not supported under hf"):
            cls(**kw, grad_reg_estimator="exact")
        with pytest.raises(ValueError, match="subset_by='loss'"):
            cls(**kw, grad_reg_subset_by="loss")
    # under DeepSpeed also what DeepSpeed cannot run (checked before any engine exists)
    with pytest.raises(ValueError, match="lean=True: not supported under deepspeed"):
        grad_reg_config(TrainingArguments)(**kw, deepspeed={"zero_optimization": {"stage": 2}}, grad_reg_lean=True)


def test_gradreg_gets_every_engine_setting(tmp_path):
    """The optimizer the Trainer builds carries each engine setting of the config (none dropped)."""
    from transformers import TrainingArguments

    from grkernels.settings import SETTINGS

    chosen = {"strength": "auto", "target_rel": 0.5, "strength_init": 0.002, "eps": 0.02, "eps_mode": "radius",
              "g1_clip": 3.0, "g2_clip": 3.0, "estimator": "central", "warmup_steps": 2, "every": 3,
              "reuse": "orthogonal", "rounding": "nearest", "backend": "torch", "lean": True,
              "skip_nonfinite": False, "seed": 11}
    assert sorted(chosen) == sorted(s.name for s in SETTINGS if s.scope == "engine")
    args = grad_reg_config(TrainingArguments)(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                              **{f"grad_reg_{k}": v for k, v in chosen.items()})
    tr = grad_reg_trainer(Trainer)(model=make_model(), args=args, train_dataset=LMData())
    tr.create_optimizer()
    assert tr.grad_reg.engine.settings.as_dict("engine") == chosen
    assert tr.grad_reg.engine.controller is not None  # strength="auto" reached the engine


# ---------------------------------------------------------------- a GR config handed to a trainer without GR
def test_gr_config_in_a_plain_trainer_is_refused(tmp_path):
    """A GradRegGRPOConfig given to the plain trl.GRPOTrainer (or a GR TrainingArguments to the plain Trainer) would
    train without GR: refused when the trainer is built, naming the GR trainer to use. With GR off it is fine."""
    from transformers import TrainingArguments

    ds = Dataset.from_dict({"prompt": ["ab", "cd"] * 4})
    with pytest.raises(TypeError, match="GRPOTrainer is not a GR trainer.*GradRegGRPOTrainer"):
        GRPOTrainer(model=make_model(), reward_funcs=reward_fn, args=grpo_args(tmp_path), train_dataset=ds,
                    processing_class=make_tokenizer())
    GRPOTrainer(model=make_model(), reward_funcs=reward_fn, args=grpo_args(tmp_path, grad_reg_strength=0.0),
                train_dataset=ds, processing_class=make_tokenizer())
    args = grad_reg_config(TrainingArguments)(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match=r"grad_reg_trainer\(Trainer\)"):
        Trainer(model=make_model(), args=args, train_dataset=LMData())
    grad_reg_trainer(Trainer)(model=make_model(), args=args, train_dataset=LMData())  # the GR trainer takes it


# ---------------------------------------------------------------- the adaptive strength through the config
def test_grpo_adaptive_strength_reaches_the_engine(tmp_path):
    """grad_reg_strength="auto", grad_reg_target_rel: the engine runs the controller; γ starts at strength_init
    and moves after each GR step (logged per step: logging_steps=1, so each log is that step's γ)."""
    tr, snaps = run_grpo(tmp_path, gradient_accumulation_steps=2, max_steps=3, grad_reg_strength="auto",
                         grad_reg_target_rel=0.5, grad_reg_strength_init=0.2)
    assert tr.grad_reg.engine.controller is not None and tr.grad_reg.engine.controller.updates == 3
    gammas = [h["grad_reg/strength"] for h in tr.state.log_history if "grad_reg/strength" in h]
    assert len(gammas) == 3 and gammas[0] == pytest.approx(0.2)
    assert len(set(gammas)) == 3  # γ changed between steps
    rels = [h["grad_reg/gr_rel"] for h in tr.state.log_history if "grad_reg/gr_rel" in h]
    for g, g_next, r in zip(gammas, gammas[1:], rels):  # moved towards the target: up when gr_rel was below it
        assert (g_next > g) == (r < 0.5)


# ---------------------------------------------------------------- any transformers.Trainer
class LMData(torch.utils.data.Dataset):
    def __init__(self, n=16, length=7, vocab=13, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Rec(Trainer):
    """A plain Trainer that records every prepared micro-batch (first passes only)."""

    def __init__(self, *a, **k):
        self.rec = []
        super().__init__(*a, **k)

    def _prepare_inputs(self, inputs):
        out = super()._prepare_inputs(inputs)
        self.rec.append(out)
        return out


def test_plain_hf_trainer_gradient(tmp_path):
    """grad_reg_trainer(Trainer) on a causal LM: the Trainer's token-count loss scaling over 2 micro-batches."""
    from transformers import TrainingArguments

    args = grad_reg_config(TrainingArguments)(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", max_grad_norm=0.0,
        logging_steps=1, grad_reg_strength=GAMMA, grad_reg_eps=EPS, grad_reg_eps_mode="absolute",
        grad_reg_g1_clip=None, grad_reg_g2_clip=None, grad_reg_exclude=["none"], dataloader_drop_last=True,
    )  # absolute ε: the recomputation below perturbs θ + ε·g1
    data = LMData()

    snaps = Snapshots()
    tr = grad_reg_trainer(Rec)(model=make_model(), args=args, train_dataset=data, callbacks=[snaps])
    tr.rec_inputs = tr.rec  # Snapshots reads rec_inputs
    snaps.trainer = tr
    tr.train()
    model = tr.model
    for step in snaps.steps:
        names = list(step["theta"])
        window = step["window"]
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)

        def loss_at(params):
            tot = 0.0
            for b in window:
                logits = functional_call(model, params, (), {"input_ids": b["input_ids"]}).logits
                lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["labels"][:, 1:, None])
                tot = tot - lp.sum() / n_tok
            return tot

        theta = {n: step["theta"][n].clone().requires_grad_(True) for n in names}
        g1 = dict(zip(names, torch.autograd.grad(loss_at(theta), list(theta.values()))))
        theta2 = {n: (theta[n] + EPS * g1[n]).detach().requires_grad_(True) for n in names}
        g2 = dict(zip(names, torch.autograd.grad(loss_at(theta2), list(theta2.values()))))
        exp = {n: g1[n] + (GAMMA / EPS) * (g2[n] - g1[n]) for n in names}
        assert rel(step["grad"], exp) < 1e-4
        assert rel(exp, g1) > 0.05
    assert all("grad_reg/g1_norm" in h for h in tr.state.log_history if "loss" in h)


@pytest.mark.parametrize("flag,match", [("is_fsdp_enabled", "FSDP")])
def test_unsupported_backends_raise_clear_errors(tmp_path, flag, match):
    from transformers import TrainingArguments

    # DeepSpeed ZeRO-1/2/3 run, with accumulation too (tests/test_deepspeed.py; its refusals are tested there)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             gradient_accumulation_steps=2)
    tr = grad_reg_trainer(Trainer)(model=make_model(), args=args, train_dataset=LMData())
    setattr(tr, flag, True)
    with pytest.raises(NotImplementedError, match=match):
        tr.create_optimizer()
    assert tr.grad_reg is None


# ---------------------------------------------------------------- configs pickle; Trainer checkpoints resume
def _ready_configs():
    from transformers import TrainingArguments

    from grkernels.integrations import trl as gtrl

    made = [grad_reg_config(TrainingArguments), GradRegGRPOConfig]
    return made + [getattr(gtrl, f"GradReg{n}Config") for n in ("RLOO", "SFT", "DPO", "KTO", "Reward")]


@pytest.mark.parametrize("cls", _ready_configs(), ids=lambda c: c.__name__)
def test_every_config_pickles_and_deepcopies(tmp_path, cls):
    import copy
    import pickle

    args = cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", grad_reg_strength=0.375,
               grad_reg_exclude=["embed"], save_steps=7)
    for clone in (pickle.loads(pickle.dumps(args)), copy.deepcopy(args)):
        assert type(clone) is cls
        assert clone.to_dict() == args.to_dict()
        assert grad_reg_settings(clone) == grad_reg_settings(args)


def _run_checkpointed(out, max_steps, resume=None):
    from transformers import TrainingArguments

    args = grad_reg_config(TrainingArguments)(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps,
        learning_rate=1e-2, use_cpu=True, report_to="none", save_steps=1, logging_steps=1, max_grad_norm=1.0,
        grad_reg_strength=GAMMA, grad_reg_eps=EPS, dataloader_drop_last=True, seed=0, disable_tqdm=True,
    )
    tr = grad_reg_trainer(Trainer)(model=make_model(), args=args, train_dataset=LMData())
    tr.train(resume_from_checkpoint=resume)
    return tr


def test_trainer_checkpoints_and_resume_exactly(tmp_path):
    """save_steps=1: every step writes a checkpoint (training_args.bin is torch.save of the GR config); resuming
    from the first one reproduces the uninterrupted run bitwise (GR's step counter is in the optimizer state)."""
    import subprocess
    import sys

    full = _run_checkpointed(tmp_path / "a", 3)
    resumed = _run_checkpointed(tmp_path / "b", 3, resume=str(tmp_path / "a" / "checkpoint-1"))
    assert (tmp_path / "a" / "checkpoint-3" / "training_args.bin").exists()
    assert resumed.grad_reg.metrics()["step"] == full.grad_reg.metrics()["step"] == 3
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    # another process can read the saved arguments back (the class is re-made from its importable base)
    code = ("import sys, torch; a = torch.load(sys.argv[1], weights_only=False); "
            "print(type(a).__name__, a.grad_reg_strength, a.save_steps)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a" / "checkpoint-2" / "training_args.bin")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["GradRegTrainingArguments", str(GAMMA), "1"]


# ---------------------------------------------------------------- no import cycle hf <-> trl
def test_hf_layer_does_not_import_trl():
    """The generic layer names no host: no import of trl in hf.py (static), and it works with trl unimportable;
    a GRPOTrainer subclass still gets the GRPO pinning, registered by grkernels.integrations.trl itself."""
    import ast
    import pathlib
    import subprocess
    import sys

    import grkernels.integrations.hf as hf

    tree = ast.parse(pathlib.Path(hf.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "trl" or m.endswith("integrations.trl")}
    assert "GRPO" not in "".join(ast.unparse(n) for n in tree.body if not isinstance(n, ast.Expr))

    code = (
        "import sys; sys.modules['trl'] = None\n"  # `import trl` now raises ImportError
        "from transformers import Trainer\n"
        "from grkernels.integrations.hf import grad_reg_trainer\n"
        "cls = grad_reg_trainer(Trainer)\n"
        "assert [c.__name__ for c in cls.__mro__[1:3]] == ['GradRegTrainerMixin', 'Trainer'], cls.__mro__\n"
        "assert 'grkernels.integrations.trl' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

    class MyGRPO(GRPOTrainer):
        pass

    from grkernels.integrations.trl import GradRegGRPOMixin

    assert grad_reg_trainer(MyGRPO).__mro__[1] is GradRegGRPOMixin
