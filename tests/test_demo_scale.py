"""The scale study's driver (grkernels.demo.scale) at a tiny size: both parts run, a rerun of a cell is bitwise the
first, the ×1 lr cell is the size cell, and the tables are what an independent recomputation from the cells'
results.json gives."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from grkernels.demo import scale
from grkernels.demo.smoothing import smooth

TINY = ["--steps", "6", "--sft-steps", "5", "--rm-steps", "3", "--rm-pairs", "32", "--eval-samples", "16",
        "--prompts", "2", "--group", "4", "--vocab", "8", "--prompt-len", "2", "--completion-len", "4",
        "--layers", "1", "--heads", "2", "--pretrain-steps", "10", "--task-len", "4", "--device", "cpu"]
DRIVER = ["--seeds", "2", "--workers", "1", "--widths", "8,16", "--no-plot"]


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _env(run: dict, g0: float, window: int, k: float) -> float:
    """E(k) of one run recomputed here: max smoothed Δgold over steps from the first full window with KL ≤ k, or 0."""
    kl, gold = smooth(run["curves"]["kl"], window), smooth(run["curves"]["gold"], window)
    start = min(window, len(kl)) - 1
    return max([0.0] + [g - g0 for x, g in zip(kl[start:], gold[start:]) if x <= k])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    assert scale.main(["--part", "size", "--worlds", "collapse,format", "--out", str(out), *DRIVER, "--", *TINY]) == 0
    assert scale.main(["--part", "lr", "--out", str(out), *DRIVER, "--", *TINY]) == 0
    return out


def test_cells_and_flags():
    names = [f"{c.part}/{c.name}" for c in scale.cells_of("lr")]
    assert names == ["lr/collapse_x0.5", "size/collapse_w64", "lr/collapse_x2",
                     "lr/format_x0.5", "size/format_w64", "lr/format_x2"]
    c = scale.cells_of("lr")[2]
    assert c.argv() == ["--worlds", "collapse", "--sweep", "kl:0.1;gr:10", "--width", "64", "--lr", "4e-4"]
    assert [f"{c.part}/{c.name}" for c in scale.cells_of("size")] == ["size/collapse_w64", "size/collapse_w128"]
    assert scale.cells_of("size")[1].argv() == ["--worlds", "collapse", "--sweep", "kl:0.1;gr:10", "--width", "128"]
    assert float(scale.LR_FLAGS[0.5]) == scale.BASE_LR * 0.5 and float(scale.LR_FLAGS[2.0]) == scale.BASE_LR * 2
    with pytest.raises(ValueError, match="unknown part"):
        scale.cells_of("depth")
    with pytest.raises(SystemExit, match="unknown"):
        scale.main(["--part", "lr", "--worlds", "judge", "--tables-only"])


def test_size_table_from_results(study):
    summary = json.loads((study / "size" / "summary.json").read_text())
    assert not summary["missing"] and set(summary["cells"]) == {f"size/{w}_w{k}" for w in scale.WORLDS
                                                                for k in (8, 16)}
    for wname in scale.WORLDS:
        rows = summary["table"][wname]["rows"]
        assert [r["width"] for r in rows] == [8, 16]
        gaps = []
        for r in rows:
            res = json.loads((study / "size" / f"{wname}_w{r['width']}" / "results.json").read_text())
            assert res["config"]["sizes"]["width"] == r["width"]
            w = res["worlds"][wname]
            win = res["smoothing_window"]
            g0 = {s["seed"]: s["init_gold"] for s in w["setup"]}
            fams = {"none": ["none"], **{m: [f"{m}@{v}"] for m, v in scale.LR_STRENGTHS[wname].items()}}
            # K* recomputed: the smallest over methods of the largest smoothed KL reached (from the first full window)
            reach = {f: max(x for lab in labs for run in w["methods"][lab]["runs"]
                            for x in smooth(run["curves"]["kl"], win)[min(win, len(run["curves"]["kl"])) - 1:])
                     for f, labs in fams.items()}
            k_star = min(reach.values())
            assert r["k_star"] == pytest.approx(k_star, rel=1e-12)
            per = {f: [max(_env(run, g0[s], win, k_star) for lab in labs for run in w["methods"][lab]["runs"]
                           if run["seed"] == s) for s in sorted(g0)] for f, labs in fams.items()}
            for f in fams:
                m, sd = _mean_std(per[f])
                assert r["methods"][f]["e_kstar"]["mean"] == pytest.approx(m, abs=1e-12)
                assert r["methods"][f]["e_kstar"]["std"] == pytest.approx(sd, abs=1e-12)
            gap = [a - b for a, b in zip(per["gr"], per["kl"])]
            assert r["gap_gr_kl"]["mean"] == pytest.approx(_mean_std(gap)[0], abs=1e-12)
            gaps.append(gap)
            # best final: the strength with the highest mean final Δgold
            finals = {lab: [run["final"]["gold"] - g0[run["seed"]] for run in w["methods"][lab]["runs"]]
                      for lab in fams["gr"]}
            top = max(finals, key=lambda lab: sum(finals[lab]))
            assert r["methods"]["gr"]["best_final_label"] == top
            assert r["methods"]["gr"]["best_final"]["mean"] == pytest.approx(_mean_std(finals[top])[0], abs=1e-12)
            assert r["rho_pooled"] == w["spearman_gn_acc_pooled"] or (math.isnan(r["rho_pooled"]))
        # slope per seed of the gap against log2(width): two widths, so the difference over one doubling
        slopes = [b - a for a, b in zip(gaps[0], gaps[1])]
        assert summary["table"][wname]["gap_slope_per_doubling"]["mean"] == pytest.approx(_mean_std(slopes)[0],
                                                                                         abs=1e-12)
    text = (study / "size" / "table.md").read_text()
    assert "| collapse | 8 |" in text and "| format | 16 |" in text


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
    scale.run_cell(str(out), cell, ["--seeds", "2", "--workers", "1", *TINY])
    again = json.loads((out / "lr" / "format_x2" / "results.json").read_text())
    for label, m in first["worlds"]["format"]["methods"].items():
        for a, b in zip(m["runs"], again["worlds"]["format"]["methods"][label]["runs"]):
            assert a["curves"] == b["curves"] and a["final"] == b["final"]
    # and a finished cell is not rerun: its results.json is kept as it is
    before = (out / "lr" / "format_x2" / "results.json").stat().st_mtime_ns
    scale.run_cell(str(out), cell, ["--seeds", "2", "--workers", "1", *TINY])
    assert (out / "lr" / "format_x2" / "results.json").stat().st_mtime_ns == before
    shutil.rmtree(out)
