"""A bounded scale study of the demo (issue 27): does GR's standing against KL change with a per-method learning
rate or with the policy's size?

Two parts, each one command (``python -m grkernels.demo.scale --part lr|size --out DIR``, or ``make scale-study``),
each a list of *cells* (one world, one width, one learning rate). A cell is one to three ``grkernels demo --sweep``
invocations whose ``results.json`` files are merged (:func:`grkernels.demo.report.merge_results`, frontiers
recomputed over all methods): the first on seeds 0–2 in ``DIR/<part>/<cell>/``, the size part's second strengths and
adaptive strength on the same seeds without repeating ``none`` in ``<cell>/more/``, and seeds 3 and up with every
method in ``<cell>/seeds3/``. An invocation that already has its ``results.json`` is not rerun (``--force`` reruns
it), so an interrupted study resumes where it stopped, and a larger one extends a smaller one. Every cell shares one
cache of the pretrained task policies (``DIR/cache``, keyed by size), as ``grkernels demo`` does.

``size``  collapse and format worlds, policy and reward model width 64, 128 and 256 (2 layers), methods ``none``,
          KL at two β, GR at two γ (:data:`LR_STRENGTHS` and :data:`SIZE_EXTRA`) and ``gr_auto`` at the recommended
          target 3, learning rate 2e-4 for all; 5 seeds at width 64, 3 at 128 and 256 (``--seeds``,
          ``--seeds-at``). Per (world, width): the frontier summary of :mod:`grkernels.demo.frontier` (E(K*) per
          method family, the envelope over its strengths; K* the smallest largest-KL-reached over the families of
          that cell), the best final Δgold, the GR − KL gaps paired by seed (fixed γ and adaptive), the correction
          ‖GR − g1‖/‖g1‖ and the final γ per GR variant, and the premise's ρ (Spearman over steps between ‖g1‖ and
          the reward model's accuracy; pooled over the cell's runs, and per method).
``lr``    collapse and format worlds at width 64, ``none``, KL and GR each at one strength (collapse: β 0.1, γ 10;
          format: β 0.3, γ 1), learning rate 2e-4 × {0.5, 1, 2} for every method, 5 seeds. The × 1 cell of a world
          is the ``size`` part's cell of that world at width 64 (its first run: the same flags). Per (world, method,
          lr scale): final Δgold and KL, and E(K*) at one K* common to the nine (method, lr) pairs of the world, so
          that a GR at 2× the learning rate can be set against a KL at 1×.

Δgold = gold − the initial policy's gold, per seed; mean ± sample std over seeds (n − 1). The tables are computed
from the cells' ``results.json`` (:func:`size_table`, :func:`lr_table`) and written to ``DIR/<part>/summary.json``
and ``DIR/<part>/table.md``; ``scale_<part>.png`` draws them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

from grkernels.demo.cli import main as demo_main
from grkernels.demo.experiment import spearman
from grkernels.demo.frontier import envelope, family, seed_points
from grkernels.demo.report import merge_results

SCHEMA = "grkernels.demo.scale/v2"
WORLDS = ("collapse", "format")
SIZE_WORLDS = WORLDS
WIDTHS = (64, 128, 256)
# The lr part: each method at one strength per world (the committed four-world sweep's best final point for KL and
# GR in collapse; in format GR's best final point is γ 0.01, whose correction is 0.06·‖g1‖ and which ends as `none`
# does, so γ 1, the smallest γ that acts, stands for GR there; every γ ≥ 0.1 ended within 0.01 of it).
LR_STRENGTHS = {"collapse": {"kl": "0.1", "gr": "10"}, "format": {"kl": "0.3", "gr": "1"}}
# The size part adds a second strength per method (the committed sweep's neighbour on the side that brakes more for
# GR, whose correction at a fixed γ shrinks as the policy grows; the other side for KL in format, whose β 0.3 was the
# largest swept) and the adaptive strength at the recommended target (grkernels.settings: target_rel 3), which holds
# the correction ‖GR − g1‖/‖g1‖ fixed across sizes where a fixed γ does not.
SIZE_EXTRA = {"collapse": {"kl": "0.3", "gr": "100", "gr_auto": "3"},
              "format": {"kl": "0.1", "gr": "10", "gr_auto": "3"}}
LR_SCALES = (0.5, 1.0, 2.0)
BASE_LR = 2e-4  # RLConfig's default; the flag values are written out so that the floats are exactly the flags'
LR_FLAGS = {0.5: "1e-4", 2.0: "4e-4"}
METHOD_ORDER = ("none", "kl", "gr")
SIZE_ORDER = ("none", "kl", "gr", "gr_auto")
BASE_SEEDS = 3  # seeds 0..2: the first run of every cell; more seeds (--seeds 5) are a separate run, merged
SEEDS = 5
SEEDS_AT = {128: 3, 256: 3}  # the size part's default: 5 seeds at width 64, 3 above (the time box: README, the sizing)


def join_sweeps(*specs: str) -> str:
    """``"kl:0.1;gr:10"`` + ``"kl:0.3"`` → ``"kl:0.1,0.3;gr:10"`` (methods in first-seen order)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        for part in (p for p in spec.split(";") if p):
            m, _, vals = part.partition(":")
            out.setdefault(m, []).extend(v for v in vals.split(",") if v not in out.get(m, []))
    return ";".join(f"{m}:{','.join(v)}" for m, v in out.items())


@dataclass(frozen=True)
class Cell:
    """One (world, width, learning rate) of the study: one or more ``grkernels demo`` invocations, merged."""

    part: str            # the directory under --out it is written to ("size" or "lr")
    name: str            # e.g. "collapse_w128", "format_x2"
    world: str
    width: int
    lr_scale: float
    sweep: str
    extra: str = ""      # a second sweep on the same seeds, run without none ("more/")

    def argv(self) -> list[str]:
        """The cell's own flags (the driver adds seeds, workers, cache, output and any pass-through flags)."""
        out = ["--worlds", self.world, "--sweep", self.sweep, "--width", str(self.width)]
        if self.lr_scale != 1.0:
            out += ["--lr", LR_FLAGS[self.lr_scale]]
        return out

    def runs(self, seeds: int) -> list[tuple[str, list[str]]]:
        """(sub-directory, flags) per invocation: the sweep on seeds 0..min(seeds, 3)−1 (the cell's directory; the
        first study's cells are these), the extra sweep without ``none`` on the same seeds (``more``), and both
        sweeps with ``none`` on seeds 3..seeds−1 (``seeds3``). Merged, they are every method on every seed."""
        first = min(seeds, BASE_SEEDS)
        out = [("", [*self.argv(), "--seeds", str(first)])]
        if self.extra:
            out.append(("more", ["--worlds", self.world, "--sweep", self.extra, "--sweep-without-none",
                                 "--width", str(self.width), "--seeds", str(first)]))
        if seeds > BASE_SEEDS:
            flags = self.argv()
            flags[flags.index("--sweep") + 1] = join_sweeps(self.sweep, self.extra)
            out.append((f"seeds{BASE_SEEDS}", [*flags, "--seed", str(BASE_SEEDS), "--seeds", str(seeds - BASE_SEEDS)]))
        return out


def lr_sweep(world: str) -> str:
    s = LR_STRENGTHS[world]
    return f"kl:{s['kl']};gr:{s['gr']}"


def extra_sweep(world: str) -> str:
    return ";".join(f"{m}:{v}" for m, v in SIZE_EXTRA[world].items())


def size_cells(worlds=SIZE_WORLDS, widths=WIDTHS) -> list[Cell]:
    return [Cell("size", f"{w}_w{width}", w, width, 1.0, lr_sweep(w), extra_sweep(w))
            for w in worlds for width in widths]


def lr_cells(worlds=WORLDS, width: int = 64, scales=LR_SCALES) -> list[Cell]:
    """The lr part's cells; the × 1 cell of a world is the size part's cell of that width (its first run: same
    flags, same runs)."""
    out = []
    for w in worlds:
        for sc in scales:
            out.append(size_cells((w,), (width,))[0] if sc == 1.0
                       else Cell("lr", f"{w}_x{sc:g}", w, width, sc, lr_sweep(w)))
    return out


def cells_of(part: str, worlds=None, widths=WIDTHS) -> list[Cell]:
    """The cells of one part; ``worlds`` None: both worlds."""
    if part == "size":
        return size_cells(worlds or SIZE_WORLDS, widths)
    if part == "lr":
        return lr_cells(worlds or WORLDS, widths[0])
    raise ValueError(f"unknown part {part!r}; choose from size, lr")


def cell_dir(out: str, cell: Cell, sub: str = "") -> str:
    return os.path.join(out, cell.part, cell.name, sub) if sub else os.path.join(out, cell.part, cell.name)


def run_cell(out: str, cell: Cell, common: list[str], force: bool = False, seeds: int = BASE_SEEDS,
             parts: tuple[str, ...] | None = None) -> list[str]:
    """Run the cell's invocations (:meth:`Cell.runs`; only ``parts`` when given) that have no results.json (all
    with ``force``); returns their results.json paths."""
    paths = []
    for sub, flags in cell.runs(seeds):
        if parts is not None and sub not in parts:
            continue
        d = cell_dir(out, cell, sub)
        path = os.path.join(d, "results.json")
        paths.append(path)
        if os.path.exists(path) and not force:
            continue
        os.makedirs(d, exist_ok=True)
        argv = [*flags, *common, "--cache-dir", os.path.join(out, "cache"), "--no-plot", "--no-progress", "--out", d]
        with open(os.path.join(d, "argv.json"), "w") as f:
            json.dump(argv, f)
        where = f"{cell.part}/{cell.name}" + (f"/{sub}" if sub else "")
        print(f"[scale] {time.strftime('%H:%M:%S')} {where}: grkernels demo {' '.join(argv)}", file=sys.stderr)
        rc = demo_main(argv)
        if rc != 0 or not os.path.exists(path):
            raise RuntimeError(f"cell {where} failed (exit status {rc})")
    return paths


def load_cell(out: str, cell: Cell, seeds: int = BASE_SEEDS, parts: tuple[str, ...] | None = None) -> dict | None:
    """The cell's finished invocations merged (:func:`grkernels.demo.report.merge_results`: frontiers recomputed
    over all methods); None until its first run has finished. ``parts``: only these sub-directories."""
    found = []
    for sub, _ in cell.runs(seeds):
        path = os.path.join(cell_dir(out, cell, sub), "results.json")
        if (parts is None or sub in parts) and os.path.exists(path):
            with open(path) as f:
                found.append((sub, json.load(f)))
    if not found or found[0][0] != "":
        return None
    return found[0][1] if len(found) == 1 else merge_results([r for _, r in found])


def missing_runs(out: str, cell: Cell, seeds: int, parts: tuple[str, ...] | None = None) -> list[str]:
    return [f"{cell.part}/{cell.name}" + (f"/{sub}" if sub else "") for sub, _ in cell.runs(seeds)
            if (parts is None or sub in parts)
            and not os.path.exists(os.path.join(cell_dir(out, cell, sub), "results.json"))]


# ---------------------------------------------------------------------------------------------- statistics
def stats(values: list[float]) -> dict:
    """mean and sample std (n − 1) of the finite values; the values kept."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    n = len(v)
    mean = sum(v) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else (0.0 if n else math.nan)
    return {"mean": mean, "std": std, "n": n, "values": values}


def _world(res: dict) -> tuple[str, dict]:
    (name, w), = res["worlds"].items()
    return name, w


def _g0(w: dict) -> dict[int, float]:
    return {s["seed"]: s["init_gold"] for s in w["setup"]}


def _rho(w: dict, labels: list[str]) -> float:
    """The premise's ρ of a method: the mean over its runs of the Spearman correlation over steps between ‖g1‖ and
    the reward model's accuracy (recomputed from the runs: a merged cell's per-method summaries hold one part)."""
    return stats([spearman(r["curves"]["g1_norm"], r["curves"]["rm_acc"])
                  for lab in labels for r in w["methods"][lab]["runs"]])["mean"]


def _label_row(w: dict, label: str, g0: dict[int, float]) -> dict:
    """One method at one strength: final Δgold and KL, the correction ‖GR − g1‖/‖g1‖ (the run's mean over steps)
    and the γ in use at the last step (the adaptive strength's; a fixed γ's is its own)."""
    runs = w["methods"][label]["runs"]
    out = {"final_gold": stats([r["final"]["gold"] - g0[r["seed"]] for r in runs]),
           "final_kl": stats([r["final"]["kl"] for r in runs])}
    if family(label).startswith("gr"):
        out["gr_rel"] = stats([stats(r["curves"]["gr_rel"])["mean"] for r in runs])
        out["final_strength"] = stats([r["curves"]["gr_strength"][-1] for r in runs
                                       if r["curves"].get("gr_strength")])
    return out


def size_row(res: dict) -> dict:
    """The size table's numbers for one cell (one world, one width) from its (merged) results."""
    wname, w = _world(res)
    fr = w["frontier"]
    g0 = _g0(w)
    runs = [r for m in w["methods"].values() for r in m["runs"]]
    row: dict = {"world": wname, "width": res["config"]["sizes"]["width"], "layers": res["config"]["sizes"]["layers"],
                 "seeds": sorted(g0), "k_star": fr["k_star"], "methods": {},
                 "rho_pooled": spearman([x for r in runs for x in r["curves"]["g1_norm"]],
                                        [x for r in runs for x in r["curves"]["rm_acc"]]),
                 "labels": {lab: _label_row(w, lab, g0) for lab in w["methods"]},
                 "wall_s": res.get("wall_s"), "source": res["env"].get("source")}
    for f, m in fr["methods"].items():
        row["methods"][f] = {"e_kstar": m["best_gold_at_kl"], "best_final": m["best_final_gold"],
                             "best_final_label": m["best_final_label"], "rho": _rho(w, m["labels"])}
    for f in ("gr", "gr_auto"):
        if f in fr["methods"] and "kl" in fr["methods"]:
            key = "" if f == "gr" else "_auto"
            a, b = (fr["methods"][x]["best_gold_at_kl"]["values"] for x in (f, "kl"))
            row[f"gap{key}_gr_kl"] = stats([x - y for x, y in zip(a, b)])
            a, b = (fr["methods"][x]["best_final_gold"]["values"] for x in (f, "kl"))
            row[f"gap_final{key}_gr_kl"] = stats([x - y for x, y in zip(a, b)])
    return row


def size_table(rows: list[dict]) -> dict:
    """Per world: the rows in width order and the least-squares slope against log2(width) of the paired GR − KL gap
    of E(K*) (fixed γ: ``gap_slope_per_doubling``; adaptive: ``gap_auto_slope_per_doubling``), per seed over the
    seeds every width has, then mean ± std over seeds: > 0 means GR gains on KL as the policy grows."""
    out: dict = {}
    for wname in dict.fromkeys(r["world"] for r in rows):
        wr = sorted((r for r in rows if r["world"] == wname), key=lambda r: r["width"])
        out[wname] = {"rows": wr}
        for key in ("", "_auto"):
            slope: dict | float = math.nan
            gk = f"gap{key}_gr_kl"
            if len(wr) >= 2 and all(gk in r for r in wr):
                xs = [math.log2(r["width"]) for r in wr]
                common = sorted(set.intersection(*(set(r["seeds"]) for r in wr)))
                slope = stats([_slope(xs, [r[gk]["values"][r["seeds"].index(s)] for r in wr]) for s in common])
            out[wname][f"gap{key}_slope_per_doubling"] = slope
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else math.nan


def lr_table(cells: list[tuple[Cell, dict]]) -> dict:
    """Per world: for each (method, lr scale) the final Δgold and KL, and E(K*) at one K* for the world: the smallest
    largest-KL-reached over its (method, lr) pairs. Also per method the best lr (by mean final Δgold) and E(K*) of
    the envelope over all three learning rates (a method tuned over lr), with GR − KL paired by seed."""
    out: dict = {}
    for wname in dict.fromkeys(c.world for c, _ in cells):
        merged: dict[str, dict] = {}
        groups: dict[tuple[str, float], list[str]] = {}
        g0: dict[int, float] = {}
        window = None
        for c, res in ((c, r) for c, r in cells if c.world == wname):
            _, w = _world(res)
            g0 = _g0(w)
            window = res["smoothing_window"]
            keep = {"none", *(f"{m}@{v}" for m, v in LR_STRENGTHS[wname].items())}
            for label, m in w["methods"].items():
                if label not in keep:
                    continue
                key = f"{label}|x{c.lr_scale:g}"
                merged[key] = m
                groups.setdefault((family(label), c.lr_scale), []).append(key)
        seeds = sorted(g0)

        def env_at(labels: list[str], k: float) -> list[float]:
            return [envelope(seed_points(merged, labels, s, g0[s], window), k) for s in seeds]

        def reach(labels: list[str]) -> float:
            return max(x for s in seeds for x, _ in seed_points(merged, labels, s, 0.0, window))

        k_star = min(reach(labs) for labs in groups.values())
        rows = []
        for (f, sc), labs in sorted(groups.items(), key=lambda t: (METHOD_ORDER.index(t[0][0]), t[0][1])):
            runs = [r for lab in labs for r in merged[lab]["runs"]]
            rows.append({"method": f, "label": labs[0].split("|")[0], "lr_scale": sc,
                         "final_gold": stats([r["final"]["gold"] - g0[r["seed"]] for r in runs]),
                         "final_kl": stats([r["final"]["kl"] for r in runs]),
                         "e_kstar": stats(env_at(labs, k_star))})
        tuned_labels = {f: [lab for (ff, _), labs in groups.items() if ff == f for lab in labs]
                        for f in dict.fromkeys(f for f, _ in groups)}
        k_tuned = min(reach(labs) for labs in tuned_labels.values())
        tuned = {f: {"e_kstar": stats(env_at(labs, k_tuned)),
                     "best_lr": max((r for r in rows if r["method"] == f), key=lambda r: r["final_gold"]["mean"])}
                 for f, labs in tuned_labels.items()}
        gaps = {}
        if "gr" in tuned and "kl" in tuned:
            gaps["tuned_e_kstar"] = stats([a - b for a, b in zip(tuned["gr"]["e_kstar"]["values"],
                                                                 tuned["kl"]["e_kstar"]["values"])])
            by = {(r["method"], r["lr_scale"]): r for r in rows}
            for sc in LR_SCALES:
                if ("gr", sc) in by and ("kl", 1.0) in by:
                    gaps[f"gr_x{sc:g}_vs_kl_x1_final"] = stats(
                        [a - b for a, b in zip(by["gr", sc]["final_gold"]["values"],
                                               by["kl", 1.0]["final_gold"]["values"])])
                    gaps[f"gr_x{sc:g}_vs_kl_x1_e_kstar"] = stats(
                        [a - b for a, b in zip(by["gr", sc]["e_kstar"]["values"], by["kl", 1.0]["e_kstar"]["values"])])
        out[wname] = {"k_star": k_star, "k_star_tuned": k_tuned, "rows": rows, "tuned": tuned, "gaps": gaps}
    return out


# ---------------------------------------------------------------------------------------------- output
def _pm(st: dict, fmt: str = "{:+.3f}") -> str:
    if not st or st["n"] == 0 or not math.isfinite(st["mean"]):
        return "n/a"
    return fmt.format(st["mean"]) + ("±" + fmt.format(st["std"]).lstrip("+") if st["n"] > 1 else "")


def format_size(table: dict) -> str:
    lines = ["| world | width | seeds | K* | E(K*) none | E(K*) KL | E(K*) GR | E(K*) GR auto | GR − KL | auto − KL | "
             "best final KL | best final GR | GR auto final | GR − KL final | ρ pooled | ρ none / KL / GR / auto |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for wname, t in table.items():
        for r in t["rows"]:
            m = r["methods"]
            na = {"e_kstar": {}, "best_final": {}, "best_final_label": "n/a", "rho": math.nan}

            def fam(f: str) -> dict:
                return m.get(f, na)  # noqa: B023 - used in this iteration only
            lines.append(
                f"| {wname} | {r['width']} | {len(r['seeds'])} | {r['k_star']:.2f} | {_pm(fam('none')['e_kstar'])} | "
                f"{_pm(fam('kl')['e_kstar'])} | {_pm(fam('gr')['e_kstar'])} | {_pm(fam('gr_auto')['e_kstar'])} | "
                f"{_pm(r.get('gap_gr_kl'))} | {_pm(r.get('gap_auto_gr_kl'))} | "
                f"{_pm(fam('kl')['best_final'])} ({fam('kl')['best_final_label']}) | "
                f"{_pm(fam('gr')['best_final'])} ({fam('gr')['best_final_label']}) | "
                f"{_pm(fam('gr_auto')['best_final'])} | "
                f"{_pm(r.get('gap_final_gr_kl'))} | {r['rho_pooled']:+.2f} | "
                + " / ".join(f"{fam(f)['rho']:+.2f}" for f in SIZE_ORDER) + " |")
    lines += ["", "| world | width | method | final Δgold | final KL | ‖GR−g1‖/‖g1‖ | γ at the end |",
              "|---|---|---|---|---|---|---|"]
    for wname, t in table.items():
        for r in t["rows"]:
            for lab, v in r["labels"].items():
                lines.append(f"| {wname} | {r['width']} | {lab} | {_pm(v['final_gold'])} | "
                             f"{_pm(v['final_kl'], '{:.1f}')} | {_pm(v.get('gr_rel', {}), '{:.2f}')} | "
                             f"{_pm(v.get('final_strength', {}), '{:.3g}')} |")
    for wname, t in table.items():
        for key, what in (("", "GR (fixed γ)"), ("_auto", "GR (auto)")):
            sl = t.get(f"gap{key}_slope_per_doubling")
            if isinstance(sl, dict):
                lines.append(f"\n{wname}: slope of the {what} − KL gap of E(K*) per doubling of the width "
                             f"{_pm(sl)} (per seed, mean ± std over {sl['n']} seeds)")
    return "\n".join(lines)


def format_lr(table: dict) -> str:
    lines = ["| world | method | lr × | final Δgold | final KL | E(K*) |", "|---|---|---|---|---|---|"]
    for wname, t in table.items():
        for r in t["rows"]:
            lines.append(f"| {wname} (K* = {t['k_star']:.2f}) | {r['label']} | {r['lr_scale']:g} | "
                         f"{_pm(r['final_gold'])} | {_pm(r['final_kl'], '{:.1f}')} | {_pm(r['e_kstar'])} |")
    for wname, t in table.items():
        tuned = ", ".join(f"{f} {_pm(v['e_kstar'])} (best final at lr × {v['best_lr']['lr_scale']:g})"
                          for f, v in t["tuned"].items())
        lines.append(f"\n{wname}: E(K*) over all three learning rates (K* = {t['k_star_tuned']:.2f}): {tuned}")
        for k, v in t["gaps"].items():
            lines.append(f"{wname}: {k.replace('_', ' ')}: {_pm(v)} (paired by seed)")
    return "\n".join(lines)


def plot(part: str, table: dict, path: str) -> str:
    """size: E(K*) and best final Δgold against width per method; lr: final Δgold and E(K*) against lr scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(table)
    fig, axes = plt.subplots(len(worlds), 2, figsize=(11, 4 * len(worlds)), squeeze=False)
    for i, wname in enumerate(worlds):
        t = table[wname]
        for f in (SIZE_ORDER if part == "size" else METHOD_ORDER):
            if part == "size":
                rows = [r for r in t["rows"] if f in r["methods"]]
                xs = [r["width"] for r in rows]
                for ax, key in ((axes[i][0], "e_kstar"), (axes[i][1], "best_final")):
                    ax.errorbar(xs, [r["methods"][f][key]["mean"] for r in rows],
                                yerr=[r["methods"][f][key]["std"] for r in rows], marker="o", capsize=3, label=f)
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel("width (2 layers)")
            else:
                rows = [r for r in t["rows"] if r["method"] == f]
                xs = [r["lr_scale"] for r in rows]
                for ax, key in ((axes[i][0], "e_kstar"), (axes[i][1], "final_gold")):
                    ax.errorbar(xs, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], marker="o",
                                capsize=3, label=rows[0]["label"] if rows else f)
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel("learning rate / 2e-4")
        axes[i][0].set_title(f"{wname}: E(K*) (best Δgold at KL ≤ K*)")
        axes[i][1].set_title(f"{wname}: " + ("best final Δgold" if part == "size" else "final Δgold"))
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.set_ylabel("gold − initial gold")
            ax.legend(fontsize=8)
    fig.suptitle(f"grkernels demo scale study, part {part}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


LR_PARTS = ("", f"seeds{BASE_SEEDS}")  # the lr part's runs of a cell (a size cell's "more" is not its business)


def summarize(out: str, part: str, cells: list[Cell], make_plot: bool = True,
              seeds: dict[Cell, int] | None = None) -> dict:
    """Tables of one part from whatever cells have finished; writes summary.json, table.md (and the figure).
    ``seeds``: per cell, the seeds its runs should have (default 3), for the list of missing runs."""
    parts = LR_PARTS if part == "lr" else None
    n = {c: (seeds or {}).get(c, BASE_SEEDS) for c in cells}
    done = [(c, res) for c in cells if (res := load_cell(out, c, n[c], parts)) is not None]
    missing = [m for c in cells for m in missing_runs(out, c, n[c], parts)]
    if part == "size":
        table = size_table([size_row(res) for _, res in done])
        text = format_size(table)
    else:
        table = lr_table(done)
        text = format_lr(table)
    summary = {"schema": SCHEMA, "part": part, "cells": {f"{c.part}/{c.name}": {
        "runs": [flags for sub, flags in c.runs(n[c]) if parts is None or sub in parts],
        "source": res["env"].get("source"), "wall_s": res.get("wall_s"),
        "seeds": sorted(s["seed"] for s in _world(res)[1]["setup"]), "steps": res["config"]["rl"]["steps"]}
        for c, res in done}, "missing": missing, "table": table}
    d = os.path.join(out, part)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    with open(os.path.join(d, "table.md"), "w") as f:
        f.write(text + ("\n\nmissing runs: " + ", ".join(missing) if missing else "") + "\n")
    if make_plot and done:
        plot(part, table, os.path.join(d, f"scale_{part}.png"))
    return summary


def _seeds_at(text: str) -> dict[int, int]:
    try:
        out = {int(w): int(n) for w, _, n in (t.partition(":") for t in text.split(",") if t)}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected WIDTH:SEEDS[,WIDTH:SEEDS], got {text!r}") from err
    if any(n < 1 for n in out.values()):
        raise argparse.ArgumentTypeError(f"seeds must be >= 1, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grkernels.demo.scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", choices=("size", "lr"), required=True)
    p.add_argument("--out", default="scale_out", help="the study's directory (cells, shared cache, tables)")
    p.add_argument("--worlds", default=None, help="comma list from collapse,format (default: both)")
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                   help="size part: the widths; lr part: its width is the first")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per cell (default {SEEDS}; size: see --seeds-at); seeds {BASE_SEEDS} and up are a "
                   "second run of the cell, merged")
    p.add_argument("--seeds-at", type=_seeds_at, default=None, metavar="WIDTH:N,...",
                   help="size part: other seed counts at some widths (default: "
                   + ",".join(f"{w}:{n}" for w, n in SEEDS_AT.items()) + ")")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tables-only", action="store_true", help="run nothing: the tables of the finished runs")
    p.add_argument("--force", action="store_true", help="rerun cells that have a results.json")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one part of the study (every missing run, cell by cell), then write its tables. Flags after ``--`` go to
    every ``grkernels demo`` unchanged (e.g. ``-- --steps 20`` for a quick look)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    worlds = tuple(w for w in args.worlds.split(",") if w) if args.worlds else None
    bad = [w for w in worlds or () if w not in LR_STRENGTHS]
    if bad:
        raise SystemExit(f"--worlds: unknown {bad}; the study's worlds are {', '.join(WORLDS)}")
    widths = tuple(int(x) for x in args.widths.split(",") if x)
    cells = cells_of(args.part, worlds, widths)
    if args.part == "size":
        at = SEEDS_AT if args.seeds_at is None else args.seeds_at
        seeds = {c: at.get(c.width, args.seeds or SEEDS) for c in cells}
    else:
        seeds = {c: args.seeds or SEEDS for c in cells}
    if not args.tables_only:
        common = ["--workers", str(args.workers), *extra]
        for c in cells:
            run_cell(args.out, c, common, force=args.force, seeds=seeds[c],
                     parts=LR_PARTS if args.part == "lr" else None)
    summary = summarize(args.out, args.part, cells, make_plot=not args.no_plot, seeds=seeds)
    print(open(os.path.join(args.out, args.part, "table.md")).read())
    return 1 if summary["missing"] and not args.tables_only else 0


if __name__ == "__main__":
    raise SystemExit(main())
