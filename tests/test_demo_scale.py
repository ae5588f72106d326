"""The scale study's driver (grkernels.demo.scale) at a tiny size: both parts run, a rerun of a cell is bitwise the
first, the ×1 lr cell is the size cell, and the tables are what an independent recomputation from the cells'
results.json gives."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from grkernels.demo import scale
from grkernels.demo.experiment import spearman
from grkernels.demo.smoothing import smooth

TINY = ["--steps", "6", "--sft-steps", "5", "--rm-steps", "3", "--rm-pairs", "32", "--eval-samples", "16",
        "--prompts", "2", "--group", "4", "--vocab", "8", "--prompt-len", "2", "--completion-len", "4",
        "--layers", "1", "--heads", "2", "--pretrain-steps", "10", "--task-len", "4", "--device", "cpu"]
DRIVER = ["--workers", "1", "--no-plot"]
# size: 4 seeds at width 8 (a first run of 3, a merged second of 1), 3 at width 16; lr: 3 seeds (its x1 cells are
# the size part's first runs, which have 3)
SIZE = ["--widths", "8,16", "--seeds", "4", "--seeds-at", "16:3"]
LR = ["--widths", "8", "--seeds", "3"]


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0


def _env(run: dict, g0: float, window: int, k: float) -> float:
    """E(k) of one run recomputed here: max smoothed Δgold over steps from the first full window with KL ≤ k, or 0."""
    kl, gold = smooth(run["curves"]["kl"], window), smooth(run["curves"]["gold"], window)
    start = min(window, len(kl)) - 1
    return max([0.0] + [g - g0 for x, g in zip(kl[start:], gold[start:]) if x <= k])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    assert scale.main(["--part", "size", "--out", str(out), *SIZE, *DRIVER, "--", *TINY]) == 0
    assert scale.main(["--part", "lr", "--out", str(out), *LR, *DRIVER, "--", *TINY]) == 0
    return out


def test_cells_and_flags():
    names = [f"{c.part}/{c.name}" for c in scale.cells_of("lr")]
    assert names == ["lr/collapse_x0.5", "size/collapse_w64", "lr/collapse_x2",
                     "lr/format_x0.5", "size/format_w64", "lr/format_x2"]
    c = scale.cells_of("lr")[2]
    assert c.argv() == ["--worlds", "collapse", "--sweep", "kl:0.1;gr:10", "--width", "64", "--lr", "4e-4"]
    assert c.runs(3) == [("", [*c.argv(), "--seeds", "3"])]
    assert [f"{c.part}/{c.name}" for c in scale.cells_of("size")] == [
        f"size/{w}_w{k}" for w in ("collapse", "format") for k in (64, 128, 256)]
    c = scale.cells_of("size")[1]
    assert c.argv() == ["--worlds", "collapse", "--sweep", "kl:0.1;gr:10", "--width", "128"]
    # the first run is the first study's cell; the second strengths and gr_auto on the same seeds without none; seeds
    # 3 and 4 with every method
    assert c.runs(5) == [
        ("", [*c.argv(), "--seeds", "3"]),
        ("more", ["--worlds", "collapse", "--sweep", "kl:0.3;gr:100;gr_auto:3", "--sweep-without-none", "--width",
                  "128", "--seeds", "3"]),
        ("seeds3", ["--worlds", "collapse", "--sweep", "kl:0.1,0.3;gr:10,100;gr_auto:3", "--width", "128",
                    "--seed", "3", "--seeds", "2"])]
    assert [sub for sub, _ in c.runs(2)] == ["", "more"] and c.runs(2)[0][1][-1] == "2"
    assert scale.join_sweeps("kl:0.1;gr:10", "gr:10,1;gr_auto:3") == "kl:0.1;gr:10,1;gr_auto:3"
    assert float(scale.LR_FLAGS[0.5]) == scale.BASE_LR * 0.5 and float(scale.LR_FLAGS[2.0]) == scale.BASE_LR * 2
    with pytest.raises(ValueError, match="unknown part"):
        scale.cells_of("depth")
    with pytest.raises(SystemExit, match="unknown"):
        scale.main(["--part", "lr", "--worlds", "judge", "--tables-only"])
    with pytest.raises(SystemExit):
        scale.main(["--part", "size", "--seeds-at", "256:0", "--tables-only"])


def _cell_runs(d, wname: str) -> tuple[dict, dict, int]:
    """Every label's runs of a size cell, read from its runs' results.json files directly (not through the
    merge), the initial gold per seed, and the smoothing window; checks the runs are disjoint as planned."""
    labels: dict[str, list] = {}
    g0: dict[int, float] = {}
    win = None
    for sub in ("", "more", "seeds3"):
        f = d / sub / "results.json" if sub else d / "results.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        win = res["smoothing_window"]
        w = res["worlds"][wname]
        assert (sub == "more") == ("none" not in w["methods"])  # the second run does not repeat none
        for s in w["setup"]:
            assert g0.setdefault(s["seed"], s["init_gold"]) == s["init_gold"]  # one initial policy per seed
        for lab, m in w["methods"].items():
            for run in m["runs"]:
                assert all(r["seed"] != run["seed"] for r in labels.get(lab, []))
                labels.setdefault(lab, []).append(run)
    return labels, g0, win


def test_size_table_from_results(study):
    summary = json.loads((study / "size" / "summary.json").read_text())
    assert not summary["missing"] and set(summary["cells"]) == {f"size/{w}_w{k}" for w in scale.WORLDS
                                                                for k in (8, 16)}
    for wname in scale.WORLDS:
        rows = summary["table"][wname]["rows"]
        assert [r["width"] for r in rows] == [8, 16]
        gaps: dict[str, list[dict[int, float]]] = {"gr": [], "gr_auto": []}
        for r, n_seeds in zip(rows, (4, 3)):
            labels, g0, win = _cell_runs(study / "size" / f"{wname}_w{r['width']}", wname)
            assert r["seeds"] == sorted(g0) == list(range(n_seeds))
            fams = {"none": ["none"], **{m: [f"{m}@{v}"] for m, v in scale.LR_STRENGTHS[wname].items()}}
            for m, v in scale.SIZE_EXTRA[wname].items():
                fams.setdefault(m, []).append(f"{m}@{v}")
            assert set(labels) == {lab for labs in fams.values() for lab in labs}
            assert all(len(runs) == n_seeds for runs in labels.values())
            # K* recomputed: the smallest over methods of the largest smoothed KL reached (from the first full window)
            reach = {f: max(x for lab in labs for run in labels[lab]
                            for x in smooth(run["curves"]["kl"], win)[min(win, len(run["curves"]["kl"])) - 1:])
                     for f, labs in fams.items()}
            k_star = min(reach.values())
            assert r["k_star"] == pytest.approx(k_star, rel=1e-12)
            per = {f: {s: max(_env(run, g0[s], win, k_star) for lab in labs for run in labels[lab] if run["seed"] == s)
                       for s in sorted(g0)} for f, labs in fams.items()}
            for f in fams:
                m, sd = _mean_std(list(per[f].values()))
                assert r["methods"][f]["e_kstar"]["mean"] == pytest.approx(m, abs=1e-12)
                assert r["methods"][f]["e_kstar"]["std"] == pytest.approx(sd, abs=1e-12)
            for f, key in (("gr", "gap_gr_kl"), ("gr_auto", "gap_auto_gr_kl")):
                gap = {s: per[f][s] - per["kl"][s] for s in sorted(g0)}
                assert r[key]["mean"] == pytest.approx(_mean_std(list(gap.values()))[0], abs=1e-12)
                gaps[f].append(gap)
            # best final: the strength with the highest mean final Δgold; per label: final and the correction
            finals = {lab: [run["final"]["gold"] - g0[run["seed"]] for run in labels[lab]] for lab in fams["gr"]}
            top = max(finals, key=lambda lab: sum(finals[lab]))
            assert r["methods"]["gr"]["best_final_label"] == top
            assert r["methods"]["gr"]["best_final"]["mean"] == pytest.approx(_mean_std(finals[top])[0], abs=1e-12)
            for lab, runs in labels.items():
                got = r["labels"][lab]
                assert got["final_kl"]["mean"] == pytest.approx(_mean_std([x["final"]["kl"] for x in runs])[0])
                if lab.startswith("gr"):
                    rel = [sum(x["curves"]["gr_rel"]) / len(x["curves"]["gr_rel"]) for x in runs]
                    assert got["gr_rel"]["mean"] == pytest.approx(_mean_std(rel)[0], rel=1e-12)
            # ρ pooled over every run of the cell (all seeds, all parts)
            allruns = [x for runs in labels.values() for x in runs]
            rho = spearman([v for x in allruns for v in x["curves"]["g1_norm"]],
                           [v for x in allruns for v in x["curves"]["rm_acc"]])
            assert r["rho_pooled"] == pytest.approx(rho, abs=1e-12) or (math.isnan(rho) and math.isnan(r["rho_pooled"]))
        # slope per seed of the gap against log2(width), over the seeds both widths have: one doubling, a difference
        for f, key in (("gr", "gap_slope_per_doubling"), ("gr_auto", "gap_auto_slope_per_doubling")):
            slopes = [gaps[f][1][s] - gaps[f][0][s] for s in range(3)]
            got = summary["table"][wname][key]
            assert got["n"] == 3 and got["mean"] == pytest.approx(_mean_std(slopes)[0], abs=1e-12)
    text = (study / "size" / "table.md").read_text()
    assert "| collapse | 8 | 4 |" in text and "| format | 16 | 3 |" in text and "gr_auto@3" in text


def test_lr_table_from_results(study):
    summary = json.loads((study / "lr" / "summary.json").read_text())
    assert not summary["missing"]
    # the ×1 cell is the size part's cell of the first width, run once
    assert "size/collapse_w8" in summary["cells"] and not (study / "lr" / "collapse_x1").exists()
    for wname in scale.WORLDS:
        t = summary["table"][wname]
        assert [(r["method"], r["lr_scale"]) for r in t["rows"]] == [(m, s) for m in scale.METHOD_ORDER
                                                                     for s in scale.LR_SCALES]
        labels = {"none": "none", **{m: f"{m}@{v}" for m, v in scale.LR_STRENGTHS[wname].items()}}
        dirs = {0.5: study / "lr" / f"{wname}_x0.5", 1.0: study / "size" / f"{wname}_w8",
                2.0: study / "lr" / f"{wname}_x2"}
        res = {s: json.loads((d / "results.json").read_text()) for s, d in dirs.items()}
        assert res[2.0]["config"]["rl"]["lr"] == 4e-4 and res[0.5]["config"]["rl"]["lr"] == 1e-4
        win = res[1.0]["smoothing_window"]
        g0 = {s["seed"]: s["init_gold"] for s in res[1.0]["worlds"][wname]["setup"]}
        runs = {(m, s): res[s]["worlds"][wname]["methods"][lab]["runs"] for m, lab in labels.items() for s in res}
        k_star = min(max(x for run in rs for x in smooth(run["curves"]["kl"], win)[win - 1:]) for rs in runs.values())
        assert t["k_star"] == pytest.approx(k_star, rel=1e-12)
        for r in t["rows"]:
            rs = runs[r["method"], r["lr_scale"]]
            fin = [run["final"]["gold"] - g0[run["seed"]] for run in rs]
            assert r["final_gold"]["mean"] == pytest.approx(_mean_std(fin)[0], abs=1e-12)
            e = [_env(run, g0[run["seed"]], win, k_star) for run in rs]
            assert r["e_kstar"]["values"] == pytest.approx(e, abs=1e-12)
        gap = [a - b for a, b in zip(t["rows"][8]["final_gold"]["values"], t["rows"][4]["final_gold"]["values"])]
        assert t["gaps"]["gr_x2_vs_kl_x1_final"]["mean"] == pytest.approx(_mean_std(gap)[0], abs=1e-12)


def test_cell_rerun_is_bitwise(study, tmp_path):
    """A cell rerun from scratch (no cache of the pretrained policy) gives every curve and final value bitwise."""
    cell = scale.cells_of("lr", ("format",), (8,))[2]
    first = json.loads((study / "lr" / "format_x2" / "results.json").read_text())
    out = tmp_path / "again"
    scale.run_cell(str(out), cell, ["--workers", "1", *TINY], seeds=3)
    again = json.loads((out / "lr" / "format_x2" / "results.json").read_text())
    for label, m in first["worlds"]["format"]["methods"].items():
        for a, b in zip(m["runs"], again["worlds"]["format"]["methods"][label]["runs"]):
            assert a["curves"] == b["curves"] and a["final"] == b["final"]
    # and a finished cell is not rerun: its results.json is kept as it is
    before = (out / "lr" / "format_x2" / "results.json").stat().st_mtime_ns
    scale.run_cell(str(out), cell, ["--workers", "1", *TINY], seeds=3)
    assert (out / "lr" / "format_x2" / "results.json").stat().st_mtime_ns == before
    shutil.rmtree(out)


def test_sweep_without_none_needs_a_sweep(capsys):
    from grkernels.demo.cli import main as demo_main

    with pytest.raises(SystemExit):
        demo_main(["--sweep-without-none", "--worlds", "collapse"])
    assert "--sweep-without-none needs --sweep" in capsys.readouterr().err
