"""Tests of ``grkernels demo``: the pieces (rewards, sampling, metrics), a tiny end-to-end run, the
results.json schema and determinism for a seed. Sizes are tiny so the whole file runs in seconds on CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch

from grkernels.demo import cli
from grkernels.demo.experiment import (
    ExperimentConfig,
    run_experiment,
    smooth,
    spearman,
    value_at_first_crossing,
)
from grkernels.demo.grpo import METRICS, RLConfig, run_rl
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
    return run_rl(w["world"], setup["policy"], w["rm"], cfg, seed=0)


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
