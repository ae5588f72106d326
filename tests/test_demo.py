"""Tests of ``grkernels demo``: the pieces (rewards, sampling, metrics), a tiny end-to-end run, the
results.json schema and determinism for a seed. Sizes are tiny so the whole file runs in seconds on CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import grkernels
from grkernels.demo import cli
from grkernels.demo.experiment import (
    ExperimentConfig,
    run_experiment,
    smooth,
    spearman,
    value_at_first_crossing,
)
from grkernels.demo.grpo import METRICS, RLConfig, run_rl, subset_by_advantage
from grkernels.demo.policy import completion_logits, make_policy, sample_with_logits
from grkernels.demo.reward_model import group_pair_accuracy, pair_accuracy
from grkernels.demo.worlds import Sizes, copy_fraction, make_base, make_world, repetition_penalty

TINY = Sizes(vocab=8, prompt_len=2, completion_len=4, layers=1, width=16, heads=2)


def tiny_config(**kw) -> ExperimentConfig:
    rl = RLConfig(steps=4, prompts_per_step=2, group=4, eval_samples=16)
    base = dict(sizes=TINY, rl=rl, seeds=(0,), sft_steps=5, rm_pairs=32, rm_heldout=16, rm_steps=3, workers=1)
    base.update(kw)
    return ExperimentConfig(**base)


TINY_ARGS = ["--steps", "4", "--seeds", "1", "--sft-steps", "5", "--rm-steps", "3", "--rm-pairs", "32",
             "--eval-samples", "16", "--prompts", "2", "--group", "4", "--vocab", "8", "--prompt-len", "2",
             "--completion-len", "4", "--layers", "1", "--width", "16", "--heads", "2", "--workers", "1",
             "--no-progress", "--device", "cpu"]


# ------------------------------------------------------------------------------------------ the demo's GR settings
@pytest.mark.parametrize("method", ["gr", "gr_all", "gr_every", "gr_auto", "gr_head"])
def test_demo_gr_methods_keep_their_documented_absolute_eps(method):
    """The demo studies GR at ε = 0.01 absolute (grkernels/demo/README.md: "forward, ε = 0.01 absolute, clips 10"),
    whatever the schema's defaults are (radius ε 0.02 since the recommended set became the default): its optimizer
    must name the mode itself, or every fixed-γ figure would silently change meaning."""
    from grkernels.demo.grpo import make_optimizer

    cfg = RLConfig(method=method)
    opt = make_optimizer(make_policy(TINY), cfg, seed=0)
    s = opt.engine.settings
    assert (s.eps_mode, s.eps) == ("absolute", cfg.eps)
    if method != "gr_auto":
        assert s.strength == cfg.gamma


# ------------------------------------------------------------------------------------------ rewards
def test_repetition_penalty_and_copy_fraction_by_hand():
    comps = torch.tensor([[1, 1, 1, 1, 2, 3], [0, 1, 2, 3, 4, 5], [5, 5, 5, 6, 6, 6]])
    # counts 4 -> (4-2)^2 = 4; none; two tokens with count 3 -> 1 + 1
    assert repetition_penalty(comps, 8).tolist() == pytest.approx([4 / 6, 0.0, 2 / 6])
    prompts = torch.tensor([[1, 7], [9, 9], [6, 0]])
    assert copy_fraction(prompts, comps).tolist() == pytest.approx([4 / 6, 0.0, 3 / 6])


def test_gold_formula_and_rare_world():
    base = make_base(Sizes(), seed=3)
    prompts = torch.randint(0, 16, (64, 4), generator=torch.Generator().manual_seed(0))
    comps = torch.randint(0, 16, (64, 12), generator=torch.Generator().manual_seed(1))
    w0 = make_world("collapse", base)
    want = base.values[comps].mean(1) + 0.5 * copy_fraction(prompts, comps) - 0.5 * repetition_penalty(comps, 16)
    torch.testing.assert_close(w0.gold(prompts, comps), want)
    torch.testing.assert_close(w0.utility(prompts, comps), want)
    freq = torch.rand(16, generator=torch.Generator().manual_seed(2))
    wb = make_world("B", base, freq)
    assert wb.name == "rare" and len(wb.rare) == 4
    top4 = set(torch.argsort(base.values, descending=True)[:4].tolist())
    assert not top4 & set(wb.rare.tolist())
    # S are the rarest of the remaining tokens
    rest = [i for i in torch.argsort(freq).tolist() if i not in top4]
    assert sorted(rest[:4]) == wb.rare.tolist()
    frac = torch.isin(comps, wb.rare).float().mean(1)
    torch.testing.assert_close(wb.gold(prompts, comps), want - 0.3 * frac)
    # the labeller likes S and ignores repetition; the proxy gets the exact repetition penalty
    torch.testing.assert_close(wb.utility(prompts, comps), want + 0.5 * repetition_penalty(comps, 16) + 2.0 * frac)
    torch.testing.assert_close(wb.proxy_offset(comps), -0.5 * repetition_penalty(comps, 16))
    wb2 = make_world("rare", base, freq, rare_penalty=1.0, rare_bonus=0.5)
    torch.testing.assert_close(wb2.gold(prompts, comps), want - 1.0 * frac)
    torch.testing.assert_close(wb2.utility(prompts, comps), want + 0.5 * repetition_penalty(comps, 16) + 0.5 * frac)
    with pytest.raises(ValueError, match="init_token_freq"):
        make_world("rare", base)
    with pytest.raises(ValueError, match="unknown world"):
        make_world("nope", base)


# ------------------------------------------------------------------------------------------ policy
def test_kv_cached_sampling_logits_match_full_forward():
    torch.manual_seed(0)
    pol = make_policy(Sizes(vocab=11, prompt_len=3, completion_len=5, layers=2, width=32, heads=4)).eval()
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(0.2 * torch.randn_like(p))  # make the model non-trivial
    prompts = torch.randint(0, 11, (7, 3))
    comps, logits = sample_with_logits(pol, prompts, 5, torch.Generator().manual_seed(0))
    assert comps.shape == (7, 5) and logits.shape == (7, 5, 11)
    with torch.no_grad():
        full = completion_logits(pol, torch.cat([prompts, comps], 1), 3)
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ metrics
def test_pair_accuracies_match_brute_force():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(24, generator=g)
    truth = torch.randint(0, 3, (24,), generator=g).float()  # many ties (skipped)
    agree = total = 0
    for grp in range(6):
        for i, j in itertools.combinations(range(grp * 4, grp * 4 + 4), 2):
            if truth[i] != truth[j]:
                total += 1
                agree += int((pred[i] - pred[j]) * (truth[i] - truth[j]) > 0)
    assert float(group_pair_accuracy(pred, truth, 4)) == pytest.approx(agree / total)
    p2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    t2 = torch.tensor([[5.0, 1.0], [5.0, 1.0], [1.0, 1.0]])
    assert float(pair_accuracy(p2, t2)) == pytest.approx(0.5)


def test_spearman_smooth_and_crossing():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties: Pearson of ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert value_at_first_crossing([0, 1, 3], [0, 10, 30], 2.0) == pytest.approx(20.0)
    assert value_at_first_crossing([0, 2, 1, 3], [5, 6, 7, 8], 2.0) == 6
    assert math.isnan(value_at_first_crossing([0, 1], [0, 1], 5.0))


# ------------------------------------------------------------------------------------------ RL loop
@pytest.fixture(scope="module")
def tiny_setup():
    from grkernels.demo.experiment import setup_seed

    torch.set_num_threads(1)
    return setup_seed(tiny_config(), 0)


def _run(setup, world="collapse", **kw):
    w = setup["worlds"][world]
    cfg = RLConfig(steps=4, prompts_per_step=2, group=4, eval_samples=16, **kw)
    return run_rl(w["world"], w["policy"], w["rm"], cfg, seed=0)


def test_gr_with_zero_strength_equals_no_regularisation(tiny_setup):
    a = _run(tiny_setup, method="none")
    b = _run(tiny_setup, method="gr", gamma=0.0)
    assert a["curves"] == b["curves"] and a["final"] == b["final"]
    c = _run(tiny_setup, method="gr", gamma=10.0)
    assert all(r > 0 for r in c["curves"]["gr_rel"])  # GR changed the gradient...
    assert c["curves"]["gold"][0] == a["curves"]["gold"][0]  # ...from the same first batch
    assert c["final"] != a["final"]


def test_kl_changes_the_update_and_resets_track_the_policy(tiny_setup):
    a = _run(tiny_setup, method="none")
    k = _run(tiny_setup, method="kl", beta=5.0)
    r1 = _run(tiny_setup, method="kl_reset", beta=5.0, reset_interval=1)
    assert k["final"] != a["final"]
    # reset every step with α = 1: the reference is the policy before each update, so the k3 KL penalty
    # and its gradient vanish at θ (ratio 1): the run equals no regularisation up to float rounding.
    for m in ("gold", "proxy", "kl"):
        assert r1["curves"][m] == pytest.approx(a["curves"][m], abs=1e-5)
    assert set(k["curves"]) == set(METRICS) and all(len(v) == 4 for v in k["curves"].values())


# ------------------------------------------------------------------------------------------ end to end
def test_cli_end_to_end_and_results_schema(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(TINY_ARGS + ["--out", str(out), "--gamma", "1,10"]) == 0
    text = capsys.readouterr().out
    assert "world collapse" in text and "world rare" in text and "gr@10" in text
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.txt").read_text().strip()
    res = json.loads((out / "results.json").read_text())  # strict JSON: NaN would be written as null
    assert res["schema"] == "grkernels.demo/v1"
    assert res["config"]["rl"]["steps"] == 4 and res["config"]["seeds"] == [0]
    assert set(res["worlds"]) == {"collapse", "rare"}
    # which tree made it: the package version and the git commit (this checkout's HEAD) the run started from
    assert res["env"]["grkernels"] == grkernels.__version__
    head = subprocess.run(["git", "-C", str(Path(grkernels.__file__).parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert res["env"]["source"].split("+")[0] == head.stdout.strip()
    want_methods = ["none", "kl", "kl_reset", "gr@1", "gr@10", "gr_kl@1", "gr_kl@10"]
    for w in res["worlds"].values():
        assert list(w["methods"]) == want_methods
        assert set(w["matched"]) == {"kl", "proxy_gain"}
        assert len(w["setup"]) == 1 and 0.0 <= w["setup"][0]["rm_acc_utility"] <= 1.0
        for label, m in w["methods"].items():
            assert m["config"]["method"] == label.split("@")[0]
            for key in ("peak_gold", "final_gold", "gold_at_kl", "gold_at_proxy", "spearman_gn_acc",
                        "gr_rel_mean", "final_kl", "final_entropy", "rm_acc_late"):
                assert set(m["summary"][key]) == {"mean", "std", "n", "values"}
                assert len(m["summary"][key]["values"]) == 1
            (run,) = m["runs"]
            assert set(run["curves"]) == set(METRICS)
            assert all(len(v) == 4 for v in run["curves"].values())
            assert {"gold", "proxy", "kl", "entropy"} <= set(run["final"])
        assert w["methods"]["gr@10"]["config"]["gamma"] == 10.0
        assert w["methods"]["none"]["summary"]["gr_rel_mean"]["mean"] == 0.0
        assert w["methods"]["gr@10"]["summary"]["gr_rel_mean"]["mean"] > 0.0


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY_ARGS + ["--methods", "none,ppo"])
    assert e.value.code == 2 and "ppo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(TINY_ARGS + ["--worlds", "mars"])
    assert "unknown world" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(TINY_ARGS + ["--width", "15"])
    assert "divisible" in capsys.readouterr().err


def test_quick_sets_fewer_seeds_and_steps():
    args = cli.build_parser().parse_args(["--quick"])
    cfg = cli.config_from_args(args)
    assert len(cfg.seeds) == cli.QUICK["seeds"] and cfg.rl.steps == cli.QUICK["steps"]
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--quick", "--seeds", "2"]))
    assert len(cfg.seeds) == 2
    cfg = cli.config_from_args(cli.build_parser().parse_args([]))
    assert len(cfg.seeds) >= 3
    # the paper's recipe is the default apart from γ, ε: GR off embeddings and head, clips at 10, no std division
    assert cfg.rl.gr_exclude == "paper" and cfg.rl.g1_clip == cfg.rl.g2_clip == 10.0 and not cfg.rl.adv_std
    cfg = cli.config_from_args(cli.build_parser().parse_args(
        ["--g1-clip", "0", "--gamma", "0.01,100", "--rare-penalty", "1", "--kl-estimator", "k1"]))
    assert cfg.rl.g1_clip is None and cfg.gammas == (0.01, 100.0) and cfg.rare_penalty == 1.0
    assert [label for label, _ in cfg.variants()] == ["none", "kl", "kl_reset", "gr@0.01", "gr@100",
                                                       "gr_kl@0.01", "gr_kl@100"]
    assert cfg.rl.kl_estimator == "k1"


def _strip(res: dict) -> dict:
    return {w: {m: [(r["curves"], r["final"]) for r in d["runs"]] for m, d in v["methods"].items()}
            for w, v in res["worlds"].items()}


def test_deterministic_for_a_seed():
    cfg = tiny_config(methods=("none", "gr_kl"), worlds=("rare",))
    a = _strip(run_experiment(cfg, show_progress=False))
    b = _strip(run_experiment(cfg, show_progress=False))
    assert a == b
    c = _strip(run_experiment(dataclasses.replace(cfg, seeds=(1,)), show_progress=False))
    assert c != a


@pytest.mark.slow
def test_two_workers_give_the_same_results():
    cfg = tiny_config(methods=("none", "gr"), worlds=("collapse",), seeds=(0, 1))
    a = _strip(run_experiment(cfg, show_progress=False))
    b = _strip(run_experiment(dataclasses.replace(cfg, workers=2), show_progress=False))
    assert a == b


def test_lowlr_control_is_none_with_a_smaller_step(tiny_setup):
    a = _run(tiny_setup, method="none")
    same = _run(tiny_setup, method="none_lowlr", lowlr_scale=1.0)
    assert same["curves"] == a["curves"] and same["final"] == a["final"]
    slow = _run(tiny_setup, method="none_lowlr", lowlr_scale=0.5)
    assert slow["curves"]["gold"][0] == a["curves"]["gold"][0] and slow["final"] != a["final"]
    assert all(r == 0 for r in slow["curves"]["gr_rel"])


# ------------------------------------------------------------------------------------------ task worlds
from grkernels.demo.frontier import envelope, frontier_summary  # noqa: E402
from grkernels.demo.language import (  # noqa: E402
    CLOSE,
    OPEN,
    PAD,
    PLUS,
    SURE,
    WORDS,
    Language,
    answer,
    corpus,
    format_score,
    sure_frac,
    target,
)
from grkernels.demo.pretrain import pretrain_on_language  # noqa: E402
from grkernels.demo.tasks import RuleReward, make_task_world, task_sizes  # noqa: E402

W0, W1 = WORDS[0], WORDS[1]


def test_answer_and_format_score_by_hand():
    comps = torch.tensor([
        [7, W0, W1, W0, W0, W0],                 # plain: answer 7, no template position matches
        [OPEN, 3, CLOSE, PAD, PAD, PAD],         # tagged: answer 3, full format
        [OPEN, SURE, CLOSE, 5, PAD, 2],          # answer 5 (first digit), 3 of 5 template positions
        [SURE, SURE, W0, PAD, PAD, PAD],         # no digit: no answer; 3 pads match
    ])
    assert answer(comps).tolist() == [7, 3, 5, -1]
    assert format_score(comps).tolist() == pytest.approx([0.0, 1.0, 0.6, 0.6])
    assert sure_frac(comps).tolist() == pytest.approx([0.0, 0.0, 1 / 6, 2 / 6])
    prompts = torch.tensor([[3, PLUS, 4, 11], [9, PLUS, 4, 11], [0, PLUS, 5, 11], [0, PLUS, 0, 11]])
    assert target(prompts).tolist() == [7, 3, 5, 0]
    world = make_task_world("format", task_sizes(Language(), TINY), format_weight=0.5)
    assert world.gold(prompts, comps).tolist() == [1.0, 1.0, 1.0, 0.0]  # no digit is wrong, even for target 0
    torch.testing.assert_close(RuleReward(world).proxy(prompts, comps), torch.tensor([1.0, 1.5, 1.3, 0.3]))


def test_corpus_follows_the_language_parameters():
    lang = Language(completion_len=7, format_frac=0.3, q_plain=0.7, q_format=0.2, p_sure=0.1)
    seqs = corpus(lang, 20000, torch.Generator().manual_seed(5))
    prompts, comps = seqs[:, :4], seqs[:, 4:]
    assert comps.shape[1] == 7 and (prompts[:, 1] == PLUS).all() and (prompts[:, 0] < 10).all()
    tagged = comps[:, 0] == OPEN
    assert (format_score(comps[tagged]) == 1).all() and (format_score(comps[~tagged]) == 0).all()
    right = (answer(comps) == target(prompts)).float()
    # a wrong answer is a uniform digit, which is right 1 time in 10
    assert float(tagged.float().mean()) == pytest.approx(0.3, abs=0.015)
    assert float(right[~tagged].mean()) == pytest.approx(0.7 + 0.3 / 10, abs=0.015)
    assert float(right[tagged].mean()) == pytest.approx(0.2 + 0.8 / 10, abs=0.02)
    fill = comps[~tagged][:, 1:]
    assert float((fill == SURE).float().mean()) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="q_plain"):
        Language(q_plain=1.5)


def test_judge_data_plants_the_spurious_token_on_fillers_only():
    world = make_task_world("judge", task_sizes(Language(), TINY), sure_right=0.6, sure_wrong=0.1)
    seqs = corpus(Language(), 20000, torch.Generator().manual_seed(1))
    prompts, comps = seqs[:, :4], seqs[:, 4:]
    edited = world.edit_rm_data(prompts, comps, torch.Generator().manual_seed(2))
    changed = edited != comps
    assert (edited[changed] == SURE).all()
    filler = torch.isin(comps, torch.tensor((*WORDS, PAD)))
    assert not (changed & ~filler).any()  # digits, tags and existing '!' untouched
    ok = world.gold(prompts, comps).bool()
    assert torch.equal(world.gold(prompts, edited), world.gold(prompts, comps))  # the answer survives
    rate_right = changed[ok].sum() / filler[ok].sum()
    rate_wrong = changed[~ok].sum() / filler[~ok].sum()
    assert float(rate_right) == pytest.approx(0.6, abs=0.01) and float(rate_wrong) == pytest.approx(0.1, abs=0.01)
    fmt = make_task_world("format", world.sizes)
    assert torch.equal(fmt.edit_rm_data(prompts, comps, torch.Generator()), comps)


def test_pretraining_is_cached_bitwise(tmp_path):
    torch.set_num_threads(1)
    sizes = task_sizes(Language(), TINY)
    a, ia = pretrain_on_language(Language(), sizes, seed=3, steps=8, batch=16, cache_dir=str(tmp_path))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and ia["cached"] == 0.0
    b, ib = pretrain_on_language(Language(), sizes, seed=3, steps=8, batch=16, cache_dir=str(tmp_path))
    assert ib["cached"] == 1.0 and ib["pretrain_loss"] == ia["pretrain_loss"]
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    c, _ = pretrain_on_language(Language(), sizes, seed=3, steps=8, batch=16)  # no cache: trains the same model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    pretrain_on_language(Language(q_format=0.3), sizes, seed=3, steps=8, batch=16, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2  # another language is another cache entry


# ------------------------------------------------------------------------------------------ sweeps, frontiers
def test_sweep_spec_and_variants():
    spec = cli.parse_sweep("kl:0.1,1; kl_reset:10 ;gr:0,5")
    assert spec == (("kl", (0.1, 1.0)), ("kl_reset", (10.0,)), ("gr", (0.0, 5.0)))
    cfg = tiny_config(sweep=spec)
    v = dict(cfg.variants())
    assert list(v) == ["none", "kl@0.1", "kl@1", "kl_reset@10", "gr@0", "gr@5"]
    assert v["kl@1"].method == "kl" and v["kl@1"].beta == 1.0
    assert v["kl_reset@10"].reset_interval == 10 and isinstance(v["kl_reset@10"].reset_interval, int)
    assert v["gr@5"].gamma == 5.0 and v["none"].method == "none"
    for bad, msg in (("ppo:1", "METHOD"), ("kl", "METHOD"), ("kl:a", "numbers"), ("kl:-1", ">= 0"),
                     ("kl_reset:2.5", "integers"), (";", "empty")):
        with pytest.raises(ValueError, match=msg):
            cli.parse_sweep(bad)
    assert cli.config_from_args(cli.build_parser().parse_args(["--sweep"])).sweep == cli.parse_sweep(
        cli.DEFAULT_SWEEP)


def _fake_run(seed, kl, gold, final_gold=0.0):
    return {"seed": seed, "curves": {"kl": kl, "gold": gold, "proxy": [0.0] * len(kl)},
            "final": {"gold": final_gold, "kl": kl[-1], "proxy": 1.0, "hack": 0.5}}


def test_frontier_summary_against_brute_force():
    g = torch.Generator().manual_seed(0)
    methods = {}
    for label in ("none", "kl@0.1", "kl@1", "gr@3"):
        runs = []
        for seed in (0, 1):
            kl = torch.rand(9, generator=g).mul(5).cumsum(0).tolist()
            runs.append(_fake_run(seed, kl, torch.randn(9, generator=g).tolist(), final_gold=float(seed)))
        methods[label] = {"runs": runs}
    g0, p0 = {0: 0.25, 1: -0.5}, {0: 0.0, 1: 0.5}
    fr = frontier_summary(methods, g0, p0, 1, _stats_ref)
    def k_star_of(window):
        reach = {"none": [], "kl": [], "gr": []}
        for label, m in methods.items():
            reach[label.split("@")[0]] += [k for r in m["runs"] for k in smooth(r["curves"]["kl"], window)[window - 1:]]
        return min(max(v) for v in reach.values())

    k_star = k_star_of(1)
    assert fr["k_star"] == pytest.approx(k_star)
    for fam, labels in (("none", ["none"]), ("kl", ["kl@0.1", "kl@1"]), ("gr", ["gr@3"])):
        best = []
        for seed in (0, 1):
            ys = [gv - g0[seed] for lab in labels for r in methods[lab]["runs"] if r["seed"] == seed
                  for kv, gv in zip(r["curves"]["kl"], r["curves"]["gold"]) if kv <= k_star]
            best.append(max([0.0, *ys]))  # the initial policy (0, 0) is on every frontier
        got = fr["methods"][fam]["best_gold_at_kl"]["values"]
        assert got == pytest.approx(best)
        assert fr["methods"][fam]["strengths"] == [float(lab.split("@")[1]) if "@" in lab else 0.0 for lab in labels]
    assert fr["methods"]["kl"]["best_final_label"] in ("kl@0.1", "kl@1")
    # with a smoothing window w the envelope starts at the first full window (step w - 1)
    w3 = frontier_summary(methods, g0, p0, 3, _stats_ref)
    assert w3["k_star"] == pytest.approx(k_star_of(3))
    for seed in (0, 1):
        r = methods["gr@3"]["runs"][seed]
        ys = [gv - g0[seed] for kv, gv in list(zip(smooth(r["curves"]["kl"], 3), smooth(r["curves"]["gold"], 3)))[2:]
              if kv <= w3["k_star"]]
        assert w3["methods"]["gr"]["best_gold_at_kl"]["values"][seed] == pytest.approx(max([0.0, *ys]))
    assert fr["variants"]["kl@1"]["final_gold_gain"]["values"] == [0.0 - 0.25, 1.0 + 0.5]
    assert fr["variants"]["kl@1"]["final_proxy_gain"]["values"] == [1.0, 0.5]
    assert envelope([(0.0, 1.0), (2.0, 3.0), (1.0, -1.0)], 1.5) == 1.0
    assert math.isnan(envelope([(2.0, 3.0)], 1.0))


def _stats_ref(values):
    return {"values": list(values), "n": len(values), "mean": sum(values) / len(values) if values else math.nan,
            "std": 0.0}


TASK_ARGS = [a for a in TINY_ARGS] + ["--pretrain-steps", "10", "--seeds", "2", "--task-len", "4"]


def test_task_world_sweep_end_to_end_and_reproducible(tmp_path, capsys):
    args = TASK_ARGS + ["--worlds", "format,judge", "--sweep", "kl:0.1;gr:10;kl_reset:2"]
    out = tmp_path / "a"
    assert cli.main(args + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "frontier summary" in text and "world judge" in text and "rule-based proxy" in text
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "cache").iterdir())) == 1  # one pretrained policy for both worlds and seeds
    res = json.loads((out / "results.json").read_text())
    for wname in ("format", "judge"):
        w = res["worlds"][wname]
        assert list(w["methods"]) == ["none", "kl@0.1", "gr@10", "kl_reset@2"]
        fr = w["frontier"]
        assert set(fr["methods"]) == {"none", "kl", "gr", "kl_reset"} and fr["k_star"] >= 0
        for m in fr["methods"].values():
            assert m["best_gold_at_kl"]["n"] == 2 and m["auf"]["n"] == 2
        for m in w["methods"].values():  # the premise is measured in every world, for every run
            assert len(m["summary"]["spearman_gn_acc"]["values"]) == 2
            assert all(len(r["curves"]["hack"]) == 4 for r in m["runs"])
        assert w["methods"]["kl@0.1"]["config"]["beta"] == 0.1
        assert w["methods"]["kl_reset@2"]["config"]["reset_interval"] == 2
        assert 0 <= w["setup"][0]["init_gold"] <= 1
    assert "rm_acc_gold" in res["worlds"]["judge"]["setup"][0]
    # the tables can be redrawn from results.json alone (NaN survives the null round trip)
    assert cli.main(["--from-results", str(out / "results.json"), "--out", str(tmp_path / "redraw"), "--no-plot"]) == 0
    assert (tmp_path / "redraw" / "table.txt").read_text() == (out / "table.txt").read_text()
    with pytest.raises(SystemExit):
        cli.main(["--from-results", str(out / "nope.json")])
    # same seed, same numbers, also when the second run loads the cached policy (cached == trained: tested above)
    assert cli.main(args + ["--out", str(out), "--no-plot"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["worlds"]["judge"]["setup"][0]["cached"] == 1.0 and res["worlds"]["judge"]["setup"][0]["cached"] == 0
    assert _strip(again) == _strip(res)
    assert again["worlds"]["format"]["frontier"] == res["worlds"]["format"]["frontier"]
    # a sweep of another method, run separately, merges into the first (none is shared and identical)
    extra = tmp_path / "extra"
    assert cli.main(TASK_ARGS + ["--worlds", "format,judge", "--sweep", "gr_all:10", "--no-plot", "--out", str(extra),
                                 "--cache-dir", str(out / "cache")]) == 0
    merged_dir = tmp_path / "merged"
    assert cli.main(["--from-results", f"{out / 'results.json'},{extra / 'results.json'}", "--no-plot",
                     "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "results.json").read_text())
    for wname in ("format", "judge"):
        w = merged["worlds"][wname]
        assert list(w["methods"]) == ["none", "kl@0.1", "gr@10", "kl_reset@2", "gr_all@10"]
        assert set(w["frontier"]["methods"]) == {"none", "kl", "gr", "kl_reset", "gr_all"}
        # GR on embeddings and head too is another update than GR off them
        assert w["methods"]["gr_all@10"]["runs"][0]["curves"] != w["methods"]["gr@10"]["runs"][0]["curves"]
    # another RL seed, same pretrained policy: other numbers (and it does not merge with seeds 0-1)
    assert cli.main(args + ["--out", str(out), "--no-plot", "--seed", "5", "--seeds", "1"]) == 0
    capsys.readouterr()
    other = json.loads((out / "results.json").read_text())
    for wname in ("format", "judge"):
        a = res["worlds"][wname]["methods"]["none"]["runs"][0]
        b = other["worlds"][wname]["methods"]["none"]["runs"][0]
        assert b["seed"] == 5 and b["curves"]["gold"] != a["curves"]["gold"]
    # seed 5 merges in as more seeds of the same labels; a run that differs on a shared seed is refused
    assert cli.main(["--from-results", f"{out / 'results.json'},{extra / 'results.json'}", "--no-plot",
                     "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "results.json").read_text())
    assert [r["seed"] for r in merged["worlds"]["judge"]["methods"]["none"]["runs"]] == [0, 1, 5]
    assert [r["seed"] for r in merged["worlds"]["judge"]["methods"]["gr_all@10"]["runs"]] == [0, 1]
    edited = json.loads((extra / "results.json").read_text())
    edited["worlds"]["format"]["methods"]["none"]["runs"][1]["curves"]["gold"][2] += 1e-6
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(SystemExit):
        cli.main(["--from-results", f"{extra / 'results.json'},{tmp_path / 'edited.json'}", "--out", str(merged_dir)])
    assert "seed 1, differs between parts" in capsys.readouterr().err


@pytest.mark.parametrize("method, whole, cheaper", [("gr_every", dict(gr_every=1), dict(gr_every=2)),
                                                     ("gr_subset", dict(gr_subset=1.0), dict(gr_subset=0.5))])
def test_cheaper_gr_at_full_size_is_gr_and_smaller_still_regularises(tiny_setup, method, whole, cheaper):
    """gr_every with k = 1 and gr_subset of every sequence are gr exactly; k = 2 (full step, reuse in between)
    and half the sequences change every update, differently from gr and from none."""
    full = _run(tiny_setup, method="gr", gamma=10.0)
    same = _run(tiny_setup, method=method, gamma=10.0, **whole)
    assert same["curves"] == full["curves"] and same["final"] == full["final"]
    cheap = _run(tiny_setup, method=method, gamma=10.0, **cheaper)
    none = _run(tiny_setup, method="none")
    assert cheap["curves"]["gold"][0] == full["curves"]["gold"][0]
    assert all(r > 0 for r in cheap["curves"]["gr_rel"])
    assert cheap["final"] != full["final"] and cheap["final"] != none["final"]


def test_gr_subset_losses_add_up_to_the_batch(tiny_setup):
    """With a negligible γ the update is the plain one: the subset's and the rest's losses add up to the batch's
    (each scaled by its share of the sequences), so g1 is the whole batch's gradient."""
    none = _run(tiny_setup, method="none")
    tiny = _run(tiny_setup, method="gr_subset", gamma=1e-9, gr_subset=0.5)
    assert all(r > 0 for r in tiny["curves"]["gr_rel"])
    for m in ("gold", "proxy", "kl", "loss", "g1_norm"):
        assert tiny["curves"][m] == pytest.approx(none["curves"][m], rel=1e-4, abs=1e-6)


def test_gr_subset_picks_the_largest_advantages_and_their_share():
    gen = torch.Generator().manual_seed(3)
    for n, frac in ((16, 0.25), (10, 0.33), (7, 1.0), (5, 0.01)):
        adv = torch.randn(n, generator=gen)
        adv[1] = -adv[0]  # a tie in |advantage|
        top, rest, share = subset_by_advantage(adv, frac)
        m = max(1, math.ceil(frac * n - 1e-9))
        assert len(top) == m and sorted(top.tolist() + rest.tolist()) == list(range(n))
        assert top.tolist() == sorted(top.tolist()) and rest.tolist() == sorted(rest.tolist())
        a = adv.abs().tolist()
        assert min(a[i] for i in top.tolist()) >= max((a[i] for i in rest.tolist()), default=0.0)
        assert share == pytest.approx(sum(a[i] for i in top.tolist()) / sum(a))
    top, rest, share = subset_by_advantage(torch.zeros(8), 0.25)  # no signal: the count share
    assert len(top) == 2 and share == 0.25
    with pytest.raises(ValueError, match="gr_subset"):
        RLConfig(method="gr_subset", gr_subset=0.0)


def test_gr_runs_with_the_central_estimator(tiny_setup):
    """The demo's loop does the estimator's number of perturbed passes (two for the central one)."""
    fwd = _run(tiny_setup, method="gr", gamma=10.0)
    other = _run(tiny_setup, method="gr", gamma=10.0, gr_estimator="central")
    assert all(r > 0 for r in other["curves"]["gr_rel"])
    assert other["curves"]["gold"][0] == fwd["curves"]["gold"][0] and other["final"] != fwd["final"]


def test_gr_head_is_gr_on_the_head_from_cached_hidden_states(tiny_setup, monkeypatch):
    """gr_head: γ = 0 is none; its GR pass runs the head only (one trunk forward with grad per step, against gr's
    two); and it equals the same head-only GR whose perturbed pass reruns the whole policy, bit for bit."""
    assert _run(tiny_setup, method="gr_head", gamma=0.0) == _run(tiny_setup, method="none")
    counts = {"trunk": 0, "head": 0}

    def counting(policy, loss_of, adv):
        if not hasattr(policy, "_counted"):
            policy._counted = True
            for name, mod in (("trunk", policy.blocks[0]), ("head", policy.lm_head)):
                mod.register_forward_hook(lambda *_, name=name: counts.__setitem__(
                    name, counts[name] + torch.is_grad_enabled()))

    def trunk_and_head(**kw):
        counts.update(trunk=0, head=0)
        w = tiny_setup["worlds"]["collapse"]
        cfg = RLConfig(steps=4, prompts_per_step=2, group=4, eval_samples=16, gamma=10.0, **kw)
        res = run_rl(w["world"], w["policy"], w["rm"], cfg, seed=0, probe=counting)
        return res, dict(counts)

    head, n_head = trunk_and_head(method="gr_head")
    _, n_gr = trunk_and_head(method="gr")
    # hooks on from the first probe (after step 0's pass at θ): 3 passes at θ, 4 perturbed passes
    assert n_head == {"trunk": 3, "head": 7} and n_gr == {"trunk": 7, "head": 7}
    assert all(r > 0 for r in head["curves"]["gr_rel"])
    none = _run(tiny_setup, method="none")
    assert head["curves"]["gold"][0] == none["curves"]["gold"][0] and head["curves"] != none["curves"]
    # the independent recomputation: the perturbed pass reruns the policy (the probe hands over the full loss)
    full_loss = {}

    def rerun(opt, hidden, loss_from_hidden):
        for _ in range(opt.extra_passes):
            opt.perturb()
            full_loss["of"](None).backward()

    monkeypatch.setattr("grkernels.demo.grpo.head_perturbed_pass", rerun)
    w = tiny_setup["worlds"]["collapse"]
    cfg = RLConfig(steps=4, prompts_per_step=2, group=4, eval_samples=16, method="gr_head", gamma=10.0)
    again = run_rl(w["world"], w["policy"], w["rm"], cfg, seed=0,
                   probe=lambda policy, loss_of, adv: full_loss.__setitem__("of", loss_of))
    assert again["curves"] == head["curves"] and again["final"] == head["final"]
    spec = cli.parse_sweep("gr_head:1,10")
    assert [(lab, v.method, v.gamma) for lab, v in tiny_config(sweep=spec).variants()][1:] == [
        ("gr_head@1", "gr_head", 1.0), ("gr_head@10", "gr_head", 10.0)]


# ------------------------------------------------------------------------------------------ adaptive strength
def test_gr_auto_follows_the_controller_rule_and_records_the_strength(tiny_setup):
    """gr_auto: the recorded γ starts at strength_init and each next γ is the documented rule applied to the
    recorded gr_rel (recomputed here from the curves); gr records its fixed γ, none 0."""
    init, target = 0.5, 2.0
    a = _run(tiny_setup, method="gr_auto", target_rel=target, strength_init=init)
    gam, rel = a["curves"]["gr_strength"], a["curves"]["gr_rel"]
    assert gam[0] == init and all(r > 0 for r in rel)
    for g0, g1, r in zip(gam, gam[1:], rel):
        step = max(-math.log(2), min(math.log(2), 0.5 * (math.log(target) - math.log(r))))
        assert g1 == pytest.approx(g0 * math.exp(step), rel=1e-12)
    assert _run(tiny_setup, method="gr", gamma=3.0)["curves"]["gr_strength"] == [3.0] * 4
    assert _run(tiny_setup, method="none")["curves"]["gr_strength"] == [0.0] * 4
    # a target in reach from the first step (γ moves by less than x2) gives a different run than fixed γ = init
    fixed = _run(tiny_setup, method="gr", gamma=init)
    assert fixed["curves"]["gold"][0] == a["curves"]["gold"][0] and fixed["final"] != a["final"]
    with pytest.raises(ValueError, match="target_rel"):
        RLConfig(method="gr_auto", target_rel=0.0)


def test_gr_auto_sweep_labels_tracking_table_and_strength_plot(tmp_path):
    from grkernels.demo.report import load_results, tracking_stats, tracking_table

    spec = cli.parse_sweep("gr_auto:0.3,3")
    assert [(lab, v.method, v.target_rel) for lab, v in tiny_config(sweep=spec).variants()][1:] == [
        ("gr_auto@0.3", "gr_auto", 0.3), ("gr_auto@3", "gr_auto", 3.0)]
    with pytest.raises(ValueError, match="target"):
        cli.parse_sweep("gr_auto:0,1")
    out = tmp_path / "auto"
    assert cli.main(TINY_ARGS + ["--out", str(out), "--sweep", "gr_auto:0.3,3"]) == 0
    assert (out / "strength.png").stat().st_size > 0 and (out / "frontier.png").exists()
    res = load_results(str(out / "results.json"))
    table = tracking_table(res)
    assert "gr_auto@0.3" in table and "gr_auto@3" in table and "gr_auto@0.3" in (out / "table.txt").read_text()
    # the tracking statistics against a hand computation: gr_rel/target = 2, 0.5, 2, 0.5 after settling
    st = tracking_stats([9.0, 2.0, 0.5, 2.0, 0.5], [1.0, 2.0, 4.0, 2.0, 4.0], 1.0, settle=1)
    assert st["bias"] == pytest.approx(1.0) and st["scatter"] == pytest.approx(2.0)
    assert st["within"] == 0.0 and math.isnan(st["first"]) and st["gamma_med"] == 4.0
    lr = [math.log(2 / 2), math.log(0.5 / 4), math.log(2 / 2), math.log(0.5 / 4)]  # log r = log(gr_rel/γ)
    d = [b - a for a, b in zip(lr, lr[1:])]
    assert st["noise"] == pytest.approx(math.exp(math.sqrt(0.5 * sum(v * v for v in d) / len(d))))


def test_gr_auto_default_target_is_the_librarys():
    """The demo's gr_auto without --target-rel holds the library's default target (one default set)."""
    from grkernels.settings import SETTINGS

    default = next(s.default for s in SETTINGS if s.name == "target_rel")
    assert RLConfig().target_rel == default == 3.0
