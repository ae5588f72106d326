"""GR in verl: one policy update of verl's FSDP2 engine on 2 gloo processes against an independent recomputation.

The worker (``tests/dist_workers/verl_worker.py``) runs verl's own update path (``TrainingWorker.train_mini_batch``
→ ``BaseEngine.train_batch``, verl's ``ppo_loss``) with 3 micro-batches per rank. Here, in float64 and without
verl, the same update is recomputed from the saved weights and batch: per-token log-probs of a plain Hugging Face
model, the PPO-clip loss (dual clip), verl's KL estimators and loss aggregation over the global batch, g1, the
perturbed point, g2, ``g1 + (γ/ε)(clip(g2) − clip(g1))`` on the GR parameters (g1 on the excluded ones), and
verl's gradient clipping. The gradient the base optimizer steps with must match it (relative error < 1e-5).
Also: γ = 0 and warmup are verl's own update bitwise; resume from verl's checkpoint; an exception and a NaN in the
pass at θ'; dropout masks replayed; verl's bf16 mixed precision; FSDP1 refused; config, registry and the GPU example
config (in-process, no torchrun).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install 'grkernels[verl]'; `make test` installs it)")

sys.path.insert(0, str(Path(__file__).parent / "dist_workers"))
import verl_worker as W  # noqa: E402

VOCAB, PROMPT, RESPONSE, BATCH = 48, 5, 7, 12
GR_OFF = dict(strength=0.0)


def make_model_dir(path: Path) -> torch.nn.Module:
    """A tiny Qwen2 (random weights, untied head) and a word-level tokenizer, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", bos_token="t2",
                                  unk_token="t0")
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      attention_dropout=0.0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so that log-probs (and GR) vary
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def make_batch(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rollouts as verl's trainer holds them: prompts left-padded, responses right-padded (odd lengths), "old" and
    reference log-probs near the model's own (so that ratios fall on both sides of the PPO clip)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(1, PROMPT + 1, (BATCH,), generator=g)
    r_len = torch.randint(1, RESPONSE + 1, (BATCH,), generator=g)
    r_len[0] = RESPONSE
    prompts = torch.zeros(BATCH, PROMPT, dtype=torch.long)
    responses = torch.zeros(BATCH, RESPONSE, dtype=torch.long)
    attn = torch.zeros(BATCH, PROMPT + RESPONSE, dtype=torch.long)
    for i in range(BATCH):
        prompts[i, PROMPT - p_len[i]:] = torch.randint(3, VOCAB, (int(p_len[i]),), generator=g)
        responses[i, : r_len[i]] = torch.randint(3, VOCAB, (int(r_len[i]),), generator=g)
        attn[i, PROMPT - p_len[i]: PROMPT + r_len[i]] = 1
    batch = {"prompts": prompts, "responses": responses, "attention_mask": attn,
             "response_mask": attn[:, PROMPT:].clone()}
    mask = batch["response_mask"].double()
    with torch.no_grad():
        logp = response_logprobs(model, dict(model.named_parameters()), batch)
    noise = lambda scale: scale * torch.randn(BATCH, RESPONSE, generator=g, dtype=torch.float64)  # noqa: E731
    batch["old_log_probs"] = ((logp + noise(0.3)) * mask).float()
    batch["ref_log_prob"] = ((logp + noise(0.5)) * mask).float()
    batch["advantages"] = (torch.randn(BATCH, 1, generator=g, dtype=torch.float64) * mask).float()
    return batch


# ---------------------------------------------------------------------------------------------------- reference
def response_logprobs(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
    """(B, R) log π(response token) at ``params``, one unpadded sequence at a time; 0 past each response."""
    rows = []
    for i in range(BATCH):
        keep = batch["attention_mask"][i].bool()
        ids = torch.cat([batch["prompts"][i], batch["responses"][i]])[keep]
        n_resp = int(batch["response_mask"][i].sum())
        logits = torch.func.functional_call(model, params, (ids[None],), {"use_cache": False}).logits[0]
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[1:, None])[:, 0]  # position t predicts t + 1
        rows.append(torch.nn.functional.pad(logp[len(ids) - 1 - n_resp:], (0, RESPONSE - n_resp)))
    return torch.stack(rows)


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """verl's loss_agg_mode over the whole global batch (what the sum over ranks and micro-batches must give);
    ``rows`` (0/1 per sequence): only those sequences' terms, normalised as in the whole batch's loss."""
    keep = torch.ones(x.shape[0], dtype=x.dtype) if rows is None else rows.to(x.dtype)
    if mode == "token-mean":
        return (x * mask * keep[:, None]).sum() / mask.sum()
    per_seq = (x * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1)
    assert mode in ("seq-mean-token-mean", "seq-mean-token-sum"), mode
    return (per_seq * keep).sum() / x.shape[0]


def ppo_loss(logp: torch.Tensor, batch: dict, loss: dict[str, Any], rows: torch.Tensor | None = None
             ) -> torch.Tensor:
    """PPO-clip with dual clip (c = 3), plus the KL loss to the reference policy (k3 = low_var_kl, or k2)."""
    mask = batch["response_mask"].double()
    adv, old = batch["advantages"].double(), batch["old_log_probs"].double()
    ratio = torch.exp((logp - old).clamp(-20, 20))
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    pg = torch.where(adv < 0, torch.minimum(clipped, -adv * 3.0), clipped)
    total = aggregate(pg, mask, loss["loss_agg_mode"], rows)
    if loss["use_kl_loss"]:
        d = batch["ref_log_prob"].double() - logp
        if loss["kl_loss_type"] == "low_var_kl":
            kl = (torch.exp(d.clamp(-20, 20)) - d.clamp(-20, 20) - 1).clamp(-10, 10)
        else:
            assert loss["kl_loss_type"] == "k2"
            kl = 0.5 * d.square()
        total = total + loss["kl_loss_coef"] * aggregate(kl, mask, loss["loss_agg_mode"], rows)
    return total


def reference_step(model_dir: Path, batch: dict, case: dict[str, Any],
                   theta: dict[str, torch.Tensor] | None = None, subset: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The gradient the base optimizer must step with, recomputed in float64: GR on the GR parameters, then verl's
    clip to ``clip_grad``. Also g1 (for the size of the correction), GR's g1 norm and the GR gradient before the
    clip. ``subset`` ({"rows": 0/1 per sequence, "fraction": f}): the sub-batch pass, g2 ≈ g1 + (g2_S − g1_S)/f."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager").double()
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    if theta is not None:
        params = {n: theta[n].double() for n in params}
    names = list(params)

    def grad_at(point: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in point.items()}
        loss = ppo_loss(response_logprobs(model, leaves, batch), batch, case["loss"], rows)
        return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))

    def norm(g: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        return torch.sqrt(sum(g[k].square().sum() for k in keys))

    def clip(n: torch.Tensor, c: float | None) -> torch.Tensor:
        return torch.ones((), dtype=torch.float64) if c is None else (c / (n + 1e-6)).clamp(max=1.0)

    gr = {**dict(strength=1e-3, eps=1e-3, g1_clip=10.0, g2_clip=10.0, exclude=None, estimator="forward",
                 eps_mode="absolute"), **case["grad_reg"]}
    exclude = ["embed_tokens", "lm_head"] if gr["exclude"] is None else gr["exclude"]
    P = [n for n in names if not any(e in n for e in exclude)]
    g1 = grad_at(params)
    n1 = norm(g1, P)
    s1 = clip(n1, gr["g1_clip"])
    vnorm = s1 * n1 if gr["eps_mode"] == "radius" else torch.ones((), dtype=torch.float64)
    step = gr["eps"] / vnorm  # θ' = θ + step·v: ε (absolute) or ε/‖v‖ (radius)

    def at(sign: float) -> dict[str, torch.Tensor]:
        return {n: params[n] + sign * step * s1 * g1[n] if n in P else params[n] for n in names}

    gamma = gr["strength"]
    g2 = grad_at(at(+1.0))
    if subset is not None:
        g1_s, g2_s = grad_at(params, subset["rows"]), grad_at(at(+1.0), subset["rows"])
        g2 = {n: g1[n] + (g2_s[n] - g1_s[n]) / subset["fraction"] for n in names}
    s2 = clip(norm(g2, P), gr["g2_clip"])
    if gr["estimator"] == "central":
        gm = grad_at(at(-1.0))
        sm = clip(norm(gm, P), gr["g2_clip"])
        corr = {n: gamma / (2 * step) * (s2 * g2[n] - sm * gm[n]) for n in P}
    else:
        corr = {n: gamma / step * (s2 * g2[n] - s1 * g1[n]) for n in P}
    full = {n: g1[n] + corr[n] if n in P else g1[n] for n in names}
    coef = clip(norm(full, names), W.CLIP_GRAD)  # verl's optimizer_step: clip_grad_norm_ of the combined grad
    return {"grad": {n: full[n] * coef for n in names}, "g1": g1, "g1_norm": float(n1),
            "gr_rel": float(norm(corr, P) / n1), "full": full, "gr_params": P}


def reference_reuse_step(model_dir: Path, batch: dict, case: dict[str, Any], first: dict[str, Any],
                         theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step between full GR steps with reuse="orthogonal", in float64: the last full step's correction
    c = GR − g1 (``first``, a reference_step), ρ = ‖c⊥‖/‖g1‖ (⊥: to that step's g1); at ``theta`` with gradient
    g: grad = g + ρ·‖g‖·d/‖d‖, d = c − (⟨c, g⟩/‖g‖²)·g, on the GR parameters; then verl's clip."""
    plain = reference_step(model_dir, batch, dict(case, grad_reg=dict(case["grad_reg"], strength=0.0)), theta)
    P, g = first["gr_params"], plain["g1"]
    dot = lambda a, b: sum((a[k] * b[k]).sum() for k in P)  # noqa: E731
    c = {k: first["full"][k] - first["g1"][k] for k in P}
    g0 = first["g1"]
    rho = torch.sqrt(dot(c, c) - dot(c, g0) ** 2 / dot(g0, g0)) / torch.sqrt(dot(g0, g0))
    d = {k: c[k] - dot(c, g) / dot(g, g) * g[k] for k in P}
    scale = rho * torch.sqrt(dot(g, g)) / torch.sqrt(dot(d, d))
    full = {k: g[k] + scale * d[k] if k in P else g[k] for k in g}
    norm = torch.sqrt(sum(v.square().sum() for v in full.values()))
    coef = (W.CLIP_GRAD / (norm + 1e-6)).clamp(max=1.0)
    return {k: v * coef for k, v in full.items()}


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    diff = sum((a[k].double() - b[k].double()).square().sum() for k in a)
    return float(torch.sqrt(diff / sum(b[k].double().square().sum() for k in b)))


# ---------------------------------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    """Model, batch, one torchrun of the worker (every case); the results of both ranks."""
    root = tmp_path_factory.mktemp("verl")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    out.mkdir()
    model = make_model_dir(inp / "model")
    batch = make_batch(model.double())
    torch.save(batch, inp / "batch.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    worker = Path(__file__).parent / "dist_workers" / "verl_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(inp), str(out)], env=env, capture_output=True, text=True, timeout=900)
    errors = "".join(f.read_text() for f in out.glob("error_rank*.txt"))
    # judged by what the workers wrote: a finished run is one whose ranks both reached the end
    assert all((out / f"done_rank{r}").exists() for r in range(2)), errors or proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]
               for name in [*W.CASES, *W.FAULTS, "resume", "fsdp1", "dropout"]}
    return {"dir": inp / "model", "batch": batch, "results": results}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_gr_off_is_verls_own_update_bitwise(run):
    """γ = 0 through grkernels' engine and config = verl's FSDPEngineWithLMHead with a plain optimizer config."""
    for verl, off in zip(run["results"]["verl"], run["results"]["off"]):
        assert verl["gr_engine"] == "FSDPEngineWithLMHead" and off["gr_engine"] == "GradRegFSDPEngineWithLMHead"
        assert _equal(verl["grad"], off["grad"]) and _equal(verl["params"], off["params"])
        assert verl["metrics"]["loss"] == off["metrics"]["loss"]
        assert not any(k.startswith("grad_reg/") for k in off["metrics"])
    from safetensors.torch import load_file

    initial = load_file(run["dir"] / "model.safetensors")
    moved = run["results"]["verl"][0]["params"]
    assert sorted(initial) == sorted(moved) and not any(torch.equal(initial[k], moved[k]) for k in initial)


@pytest.mark.parametrize("case", [c for c in W.CASES if c.startswith("gr_") and not W.CASES[c].get("bf16")])
def test_gr_update_equals_independent_recomputation(run, case):
    """The gradient verl's optimizer steps with = g1 + (γ/ε)(clip(g2) − clip(g1)), verl-clipped (fp32 vs fp64)."""
    ref = reference_step(run["dir"], run["batch"], W.CASES[case])
    assert ref["gr_rel"] > 1e-2  # the GR correction is far above the tolerance: skipping GR would fail
    for rank in run["results"][case]:
        assert rank["gr_engine"] == "GradRegFSDPEngineWithLMHead"
        assert rel_error(rank["grad"], ref["grad"]) < 1e-5
        m = rank["metrics"]
        assert m["grad_reg/step"] == [1.0, 1.0] and m["grad_reg/strength"][0] == W.CASES[case]["grad_reg"]["strength"]
        assert math.isclose(m["grad_reg/g1_norm"][0], ref["g1_norm"], rel_tol=1e-5)
        assert math.isclose(m["grad_reg/gr_rel"][0], ref["gr_rel"], rel_tol=1e-3)
    if W.CASES[case].get("dynamic"):  # verl packed the micro-batches by tokens (one sequence each here)
        assert all(r["micro_batches"] == [1] * 12 for r in run["results"][case])
    elif W.CASES[case]["loss"] == W.CASES["verl"]["loss"]:  # verl's loss metrics are those of the pass at θ
        for key in ("loss", "actor/pg_loss", "kl_loss", "actor/pg_clipfrac"):
            assert run["results"][case][0]["metrics"][key] == run["results"]["verl"][0]["metrics"][key]


def _global_rows(splits: list[list[dict]], per_rank: int) -> torch.Tensor:
    """0/1 per sequence of the global batch: the sub-batch pass's subset, from each rank's recorded split."""
    rows = torch.zeros(BATCH, dtype=torch.float64)
    for rank, (split,) in enumerate(splits):
        rows[[rank * per_rank + i for i in split["rows"]]] = 1.0
    return rows


@pytest.mark.parametrize("case", ["subset_adv", "subset_adv_dynamic"])
def test_sub_batch_pass_by_advantage_equals_independent_recomputation(run, case):
    """``subset_fraction=0.3``: on each rank the 2 of 6 sequences with the largest Σ|A|·mask (whole micro-batches;
    with verl's dynamic batch size any number), f = their share of the global Σ|A|; the pass at θ' runs on them
    only; the stepped gradient = g1 + (γ/ε)(clip(g1 + (g2_S − g1_S)/f) − clip(g1)), verl-clipped, with the
    subset's loss terms normalised as in the whole batch (verl's global token count)."""
    ranks = run["results"][case]
    assert all(sum(r["micro_batches"]) == 6 + 2 for r in ranks)  # both parts at θ, then the subset at θ'
    if W.CASES[case].get("dynamic"):
        assert all(r["micro_batches"] == [1] * 8 for r in ranks)
    batch, per_rank = run["batch"], BATCH // 2
    score = (batch["advantages"].double().abs() * batch["response_mask"]).sum(-1)
    for rank, res in enumerate(ranks):
        local = score[rank * per_rank:(rank + 1) * per_rank]
        assert sorted(res["splits"][0]["rows"]) == sorted(torch.topk(local, 2).indices.tolist())
    rows = _global_rows([r["splits"] for r in ranks], per_rank)
    fraction = float((score * rows).sum() / score.sum())
    assert 0.3 < fraction < 0.9 and all(math.isclose(r["splits"][0]["fraction"], fraction, rel_tol=1e-7)
                                        for r in ranks)
    ref = reference_step(run["dir"], batch, W.CASES[case], subset={"rows": rows, "fraction": fraction})
    full = reference_step(run["dir"], batch, W.CASES[case])
    assert rel_error(ref["grad"], full["grad"]) > 1e-3  # the sub-batch estimate is not full GR: a real test
    for rank in ranks:
        assert rel_error(rank["grad"], ref["grad"]) < 1e-5
        assert math.isclose(rank["metrics"]["grad_reg/gr_rel"][0], ref["gr_rel"], rel_tol=1e-3)


def test_sub_batch_pass_at_random_equals_independent_recomputation(run):
    """``subset_by="random"`` with seq-mean-token-mean: 4 of 6 sequences per rank, f = 8/12 (the count share)."""
    ranks = run["results"]["subset_random"]
    assert all(len(r["splits"][0]["rows"]) == 4 and r["splits"][0]["fraction"] == 8 / 12 for r in ranks)
    assert all(r["micro_batches"] == [2] * 5 for r in ranks)  # 2 + 1 micro-batches at θ, 2 at θ'
    rows = _global_rows([r["splits"] for r in ranks], BATCH // 2)
    case = W.CASES["subset_random"]
    ref = reference_step(run["dir"], run["batch"], case, subset={"rows": rows, "fraction": 8 / 12})
    assert rel_error(ref["grad"], reference_step(run["dir"], run["batch"], case)["grad"]) > 1e-4
    for rank in ranks:
        assert rel_error(rank["grad"], ref["grad"]) < 1e-5


def test_every_two_with_orthogonal_reuse(run):
    """``every=2, reuse="orthogonal"``: step 1 is the full GR step (bitwise the gr_kl case); step 2 has no extra
    pass and steps with g1 + ρ·‖g1‖·d/‖d‖ (the stored correction made orthogonal to the new g1), recomputed in
    float64 at the parameters after step 1."""
    case = W.CASES["every_orth"]
    first_ref = reference_step(run["dir"], run["batch"], case)
    for res, full in zip(run["results"]["every_orth"], run["results"]["gr_kl"]):
        first, second = res["steps"]
        assert _equal(first["grad"], full["grad"]) and _equal(first["params"], full["params"])
        assert second["metrics"]["grad_reg/step"] == [2.0, 2.0]
        assert math.isnan(second["metrics"]["grad_reg/g2_norm"][0])  # no pass at θ'
        assert second["metrics"]["grad_reg/gr_rel"][0] > 1e-2  # a correction was applied
        ref = reference_reuse_step(run["dir"], run["batch"], case, first_ref, theta=first["params"])
        plain = reference_step(run["dir"], run["batch"], dict(case, grad_reg=dict(GR_OFF)), theta=first["params"])
        assert rel_error(ref, plain["grad"]) > 1e-2
        assert rel_error(second["grad"], ref) < 1e-5


def test_gr_under_verls_bf16_mixed_precision(run):
    """verl's default precision (bf16 compute over fp32 shards): the perturbation survives FSDP2's cast to bf16
    (perturb_ratio ≈ 1) and the stepped gradient is the GR gradient to bf16 accuracy: its distance to the fp64
    recomputation (~1e-2, bf16 forward) is well below the size of the GR correction (gr_rel > 0.1)."""
    ref = reference_step(run["dir"], run["batch"], W.CASES["gr_bf16"])
    assert ref["gr_rel"] > 0.1
    for rank in run["results"]["gr_bf16"]:
        assert rel_error(rank["grad"], ref["grad"]) < 3e-2
        # the perturbation survives the cast (round-to-nearest would erase most of it: ratio ≪ 1); above 1 by the
        # stochastic-rounding noise, which on this small model depends on the draw (one seed gave 1.03 on the torch
        # reference's stream and 1.16 on the Philox stream of the C++/Triton kernels; an FSDP2 model of this size
        # spread 1.37-1.66 over 5 seeds on both streams)
        assert 0.9 < rank["metrics"]["grad_reg/perturb_ratio"][0] < 1.3
        assert math.isclose(rank["metrics"]["grad_reg/gr_rel"][0], ref["gr_rel"], rel_tol=0.05)


def test_resume_from_verls_checkpoint_is_exact(run):
    """warmup step (= verl's own step, bitwise), checkpoint, GR step; a fresh worker that loads the checkpoint
    redoes the GR step bitwise (GR's step counter travels in the optimizer state); the GR step matches the
    recomputation at the parameters after the first step."""
    for r, res in enumerate(run["results"]["resume"]):
        first, second, resumed = res["first"], res["second"], res["resumed"]
        assert _equal(first["params"], run["results"]["verl"][r]["params"])
        assert first["metrics"]["grad_reg/strength"][0] == 0.0 and second["metrics"]["grad_reg/strength"][0] > 0
        assert _equal(second["grad"], resumed["grad"]) and _equal(second["params"], resumed["params"])
        assert second["metrics"]["grad_reg/step"] == resumed["metrics"]["grad_reg/step"] == [2.0, 2.0]
    ref = reference_step(run["dir"], run["batch"], W.RESUME, theta=run["results"]["resume"][0]["first"]["params"])
    assert rel_error(run["results"]["resume"][0]["second"]["grad"], ref["grad"]) < 1e-5


@pytest.mark.parametrize("name", ["faults", "faults_subset"])
def test_faults_in_the_pass_at_theta_prime(run, name):
    """Full GR and the sub-batch pass: an exception in the pass at θ' leaves θ bitwise and the engine usable: redoing
    the step gives the clean GR step bitwise (no gradient left over from the aborted accumulation). A NaN there:
    verl skips the step, θ stays, and the next step is the clean GR step."""
    for f, clean in zip(run["results"][name], run["results"][W.FAULTS[name][0]]):
        assert "theta'" in f["raised"]
        assert _equal(f["after_error"], f["initial"])
        assert _equal(f["after_error_step"]["grad"], clean["grad"])
        assert _equal(f["after_error_step"]["params"], clean["params"])
        assert f["nan_step"]["grad"] == {} and math.isnan(f["nan_step"]["metrics"]["grad_norm"][0])
        assert _equal(f["nan_step"]["params"], f["initial"])
        assert _equal(f["after_nan_step"]["params"], clean["params"])


def test_adaptive_strength_from_verls_config(run):
    """``optim.grad_reg.strength: auto``: step 1 runs at strength_init (the fixed-γ recomputation), and after it γ
    moves towards ``target_rel`` (up when gr_rel was below it); the γ in use is the logged grad_reg/strength."""
    case = W.CASES["auto_strength"]
    first_ref = reference_step(run["dir"], run["batch"], dict(case, grad_reg=dict(W.GR)))
    for rank in run["results"]["auto_strength"]:
        first, second = rank["steps"]
        g_first, g_second = first["metrics"]["grad_reg/strength"][0], second["metrics"]["grad_reg/strength"][0]
        assert g_first == pytest.approx(W.GR["strength"]) and g_second != g_first
        assert (g_second > g_first) == (first["metrics"]["grad_reg/gr_rel"][0] < W.AUTO_TARGET)
        assert rel_error(first["grad"], first_ref["grad"]) < 1e-5


def test_dropout_masks_are_replayed_per_micro_batch(run):
    """With attention dropout, GR's correction (γ/ε)(g2 − g1) estimates γ·H·v only if g2 sees g1's masks: then it
    does not change when ε shrinks 10×; with the replay switched off it grows like 1/ε (different masks)."""
    for r in run["results"]["dropout"]:
        rel = {name: m["grad_reg/gr_rel"][0] for name, m in r.items()}
        assert rel["replay_eps1e-2"] > 1e-2, rel  # a correction that matters
        assert abs(rel["replay_eps1e-3"] / rel["replay_eps1e-2"] - 1) < 0.05, rel
        assert rel["no_replay_eps1e-3"] > 10 * rel["replay_eps1e-3"], rel


def test_fsdp1_strategy_is_refused(run):
    """``strategy: fsdp`` (FSDP1: flat local shards, local norms) with GR on: refused when the engine is built."""
    for r in run["results"]["fsdp1"]:
        assert "FSDP1" in r["refused"]


# ---------------------------------------------------------------------------------------------------- in-process
@pytest.fixture
def cpu_verl():
    from grkernels.integrations.verl_cpu import use_cpu_platform

    use_cpu_platform()  # before verl's engine modules are imported


def test_config_in_verls_style(cpu_verl):
    """``optim._target_`` + ``optim.grad_reg`` through verl's own conversion (Hydra instantiate, or the merge
    into the structured dataclass), with the command line's "<= 0 disables a clip"."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from grkernels.integrations.verl import GradRegConfig, GradRegFSDPOptimizerConfig, grad_reg_config

    raw = OmegaConf.create({"_target_": "grkernels.integrations.verl.GradRegFSDPOptimizerConfig", "lr": 1e-6,
                            "clip_grad": 2.0,
                            "grad_reg": {"strength": 0.02, "g1_clip": 0, "g2_clip": -1, "exclude": ["lm_head"]}})
    for cfg in (omega_conf_to_dataclass(raw), omega_conf_to_dataclass(raw, dataclass_type=GradRegFSDPOptimizerConfig)):
        assert isinstance(cfg, GradRegFSDPOptimizerConfig) and isinstance(cfg.grad_reg, GradRegConfig)
        assert (cfg.lr, cfg.clip_grad) == (1e-6, 2.0)
        assert (cfg.grad_reg.strength, cfg.grad_reg.g1_clip, cfg.grad_reg.g2_clip) == (0.02, None, None)
        assert cfg.grad_reg.exclude == ["lm_head"] and grad_reg_config(cfg) is cfg.grad_reg
    assert grad_reg_config(GradRegFSDPOptimizerConfig(grad_reg={"strength": 0.0})) is None
    assert grad_reg_config(GradRegFSDPOptimizerConfig(grad_reg=None)) is None


@pytest.mark.parametrize(("settings", "error", "match"), [
    (dict(estimator="exact"), ValueError, "GR setting estimator='exact': not supported under verl: FSDP2"),
    (dict(strength=-1.0), ValueError, "GR setting strength=-1.0"),
    (dict(strength="atuo"), ValueError, "GR setting strength='atuo'"),
    (dict(eps=0.0), ValueError, "GR setting eps=0.0"),
    (dict(eps_mode="relative"), ValueError, "GR setting eps_mode='relative'"),
    (dict(warmup_steps=-2), ValueError, "GR setting warmup_steps=-2"),
    (dict(gamma=0.1), TypeError, "unknown GR setting 'gamma'"),
    (dict(subset_fraction=0.0), ValueError, "GR setting subset_fraction=0.0"),
    (dict(subset_fraction=1.5), ValueError, "GR setting subset_fraction=1.5"),
    (dict(subset_by="loss"), ValueError, "GR setting subset_by='loss'"),
    (dict(subset_fraction=0.5, lean=True), ValueError, "lean"),
    (dict(lean="yes"), TypeError, "GR setting lean='yes'"),
])
def test_bad_settings_fail_at_config_time(cpu_verl, settings, error, match):
    """Every bad value fails when verl builds the config, with the schema's message (grkernels.settings), whether
    the config comes as a mapping or as GradRegConfig itself."""
    from grkernels.integrations.verl import GradRegConfig, GradRegFSDPOptimizerConfig

    with pytest.raises(error, match=match):
        GradRegFSDPOptimizerConfig(grad_reg=settings)
    if error is ValueError:
        with pytest.raises(error, match=match):
            GradRegConfig(**settings)


def test_config_is_the_schema(cpu_verl):
    """GradRegConfig's fields are the schema's settings with its defaults; every engine setting reaches the
    settings the engine's GradReg is built from; strength "auto" (as a Hydra override gives it) is the adaptive
    strength."""
    import dataclasses

    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from grkernels.integrations.verl import GradRegConfig, GradRegFSDPOptimizerConfig, grad_reg_config
    from grkernels.settings import SETTINGS

    fields = {f.name: f.default for f in dataclasses.fields(GradRegConfig) if f.name != "_target_"}
    assert fields == {s.name: s.default for s in SETTINGS}
    chosen = {"strength": "auto", "target_rel": 0.5, "strength_init": 0.002, "eps": 0.02, "eps_mode": "radius",
              "g1_clip": 3.0, "g2_clip": 3.0, "estimator": "central", "warmup_steps": 2, "every": 3,
              "reuse": "orthogonal", "rounding": "nearest", "backend": "torch", "lean": True,
              "skip_nonfinite": False, "seed": 11}
    assert sorted(chosen) == sorted(s.name for s in SETTINGS if s.scope == "engine")
    raw = OmegaConf.create({"_target_": "grkernels.integrations.verl.GradRegFSDPOptimizerConfig", "lr": 1e-6,
                            "grad_reg": {**chosen, "exclude": "none"}})
    cfg = omega_conf_to_dataclass(raw)
    assert isinstance(cfg, GradRegFSDPOptimizerConfig) and grad_reg_config(cfg) is cfg.grad_reg
    assert cfg.grad_reg.settings().as_dict("engine") == chosen and cfg.grad_reg.exclude == []


def test_default_config_runs_the_recommended_set(cpu_verl):
    """``optim._target_`` with no ``grad_reg`` fields: GR is on, and the GradReg the engine builds from the config
    (``build_grad_reg(optimizer, grad_reg.settings(), module)``, as GradRegFSDPEngine does) runs strength "auto" at
    target 3 with a radius ε 0.02, its controller in place."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from grkernels.integrations.common import build_grad_reg
    from grkernels.integrations.verl import grad_reg_config

    cfg = omega_conf_to_dataclass(OmegaConf.create(
        {"_target_": "grkernels.integrations.verl.GradRegFSDPOptimizerConfig", "lr": 1e-6}))
    gr_cfg = grad_reg_config(cfg)
    assert gr_cfg is not None  # GR on at the defaults
    module = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 5))
    gr = build_grad_reg(torch.optim.SGD(module.parameters(), lr=0.0), gr_cfg.settings(), module)
    s = gr.engine.settings
    assert (s.strength, s.target_rel, s.eps_mode, s.eps) == ("auto", 3.0, "radius", 0.02)
    assert gr.engine.controller is not None and gr.strength == pytest.approx(1e-2)


def test_engine_registration(cpu_verl, monkeypatch):
    """The GR engines sit under vendor-specific keys, verl's own under the device-wide ones (still selectable)."""
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    from grkernels.integrations.verl import GradRegFSDPEngineWithLMHead, GradRegFSDPEngineWithValueHead

    for device, vendor in (("cpu", "cpu"), ("cuda", "nvidia"), ("cuda", "amd"), ("npu", "huawei")):
        monkeypatch.setenv("VERL_ENGINE_DEVICE", device)
        for backend in ("fsdp", "fsdp2"):
            monkeypatch.setenv("VERL_ENGINE_VENDOR", vendor)
            assert EngineRegistry.get_engine_cls("language_model", backend) is GradRegFSDPEngineWithLMHead
            assert EngineRegistry.get_engine_cls("value_model", backend) is GradRegFSDPEngineWithValueHead
            monkeypatch.setenv("VERL_ENGINE_VENDOR", "other")
            assert EngineRegistry.get_engine_cls("language_model", backend) is FSDPEngineWithLMHead
            assert EngineRegistry.get_engine_cls("value_model", backend) is FSDPEngineWithValueHead


def test_gpu_example_config_composes(cpu_verl):
    """examples/verl_grpo_gpu.yaml composes over verl's ppo_trainer.yaml and gives the GR optimizer config."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    from grkernels.integrations.verl import GradRegFSDPOptimizerConfig

    examples = Path(__file__).parents[1] / "examples"
    with initialize_config_dir(config_dir=str(examples), version_base=None):
        cfg = compose(config_name="verl_grpo_gpu", overrides=["data.train_files=t.parquet", "data.val_files=v.parquet"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    actor.validate(cfg.trainer.n_gpus_per_node, cfg.data.train_batch_size, cfg.actor_rollout_ref.model)
    assert isinstance(actor.optim, GradRegFSDPOptimizerConfig)
    g = actor.optim.grad_reg  # the recommended set (the schema's defaults), written out in the recipe
    assert (g.strength, g.target_rel, g.eps, g.eps_mode, actor.optim.lr) == ("auto", 3.0, 0.02, "radius", 1e-6)
    assert cfg.actor_rollout_ref.model.external_lib == "grkernels.integrations.verl"
    assert cfg.algorithm.adv_estimator == "grpo" and actor.strategy == "fsdp2"


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _mini_batch(advantages: torch.Tensor, lengths: list[int], **non_tensor: Any):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    n, width = advantages.shape
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    td = TensorDict({"advantages": advantages, "loss_mask": mask, "row": torch.arange(n)}, batch_size=[n])
    tu.assign_non_tensor(td, **{"use_dynamic_bsz": False, "micro_batch_size_per_gpu": 2, **non_tensor})
    return td


def test_split_mini_batch_choice_and_share(cpu_verl, one_process_group):
    """The subset: the largest Σ|A|·mask, rounded up to whole micro-batches (any size with dynamic batches), in
    the batch's order; f = its |advantage| share (the count share when every advantage is 0); whole batch: None.
    Refused: grouped micro-batches, model outputs kept, the advantage rule without advantages."""
    from grkernels.integrations.verl import split_mini_batch

    adv = torch.tensor([[1.0, 1.0, 1.0], [-5.0, 0.0, 0.0], [0.5, 9.0, 9.0], [2.0, -2.0, 0.0], [0.1, 0.0, 0.0],
                        [3.0, 3.0, 3.0], [0.0, 0.0, 0.0]])[:6]
    lengths = [3, 1, 1, 2, 1, 3]  # scores: 3, 5, 0.5, 4, 0.1, 9
    split = split_mini_batch(_mini_batch(adv, lengths), 0.3, "advantage")  # ⌈1.8⌉ = 2: one micro-batch of 2
    assert split.rows == [1, 5] and split.subset["row"].tolist() == [1, 5]
    assert split.rest["row"].tolist() == [0, 2, 3, 4] and split.num_tokens == sum(lengths)
    assert math.isclose(split.fraction, 14 / 21.6, rel_tol=1e-7)
    dynamic = split_mini_batch(_mini_batch(adv, lengths, use_dynamic_bsz=True), 0.4, "advantage")  # ⌈2.4⌉
    assert dynamic.rows == [1, 3, 5] and math.isclose(dynamic.fraction, 18 / 21.6, rel_tol=1e-7)
    zero = split_mini_batch(_mini_batch(torch.zeros(6, 3), lengths), 0.5, "advantage")
    assert len(zero.rows) == 4 and zero.fraction == 4 / 6
    rand = [split_mini_batch(_mini_batch(adv, lengths), 0.5, "random", seed=(0, step)).rows for step in range(4)]
    assert all(len(r) == 4 for r in rand) and len({tuple(r) for r in rand}) > 1  # a new draw each step
    assert split_mini_batch(_mini_batch(adv, lengths), 0.9, "advantage") is None  # ⌈5.4⌉ → 6 of 6
    for key, value in (("force_group_size", 2), ("return_model_output", True)):
        with pytest.raises(NotImplementedError, match=key):
            split_mini_batch(_mini_batch(adv, lengths, **{key: value}), 0.5, "advantage")
    no_adv = _mini_batch(adv, lengths)
    del no_adv["advantages"]
    with pytest.raises(ValueError, match="subset_by='random'"):
        split_mini_batch(no_adv, 0.5, "advantage")
