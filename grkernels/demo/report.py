"""Reporting: the terminal table, the PNG plot (matplotlib, Agg) and ``results.json``.

results.json (schema ``grkernels.demo/v1``; NaN written as null)::

    {"schema", "config", "env", "wall_s", "smoothing_window",
     "worlds": {world: {"setup": [{seed, init_gold, init_proxy, init_hack, rm_acc_utility, rm_acc_gold, ...}],
                        "matched": {"kl": K*, "proxy_gain": G*},
                        "spearman_gn_acc_pooled": float,
                        "methods": {label: {"config": {...},
                                            "summary": {metric: {"mean", "std", "n", "values"}},
                                            "runs": [{"seed", "wall_s", "final": {...}, "gr_skipped",
                                                      "curves": {metric: [per step]}}]}},
                        "frontier": {...}}}}        (sweeps only: see grkernels.demo.frontier)

Runs of ``gr_auto`` (the adaptive strength) also get a tracking table (:func:`tracking_table`) and ``strength.png``
(γ and gr_rel per step, :func:`plot_strength`), both computed from the curves (so ``--from-results`` redraws them).

The format world has no reward model (no ``rm_acc_*`` in its setup); task worlds' setups carry the
pretraining diagnostics (``pretrain_loss``, ``init_correct``, ``init_format``, ``init_sure``, ``cached``).
"""

from __future__ import annotations

import json
import math
import os

from grkernels.demo.experiment import SCHEMA, _stats
from grkernels.demo.frontier import format_frontier_table, frontier_summary, plot_frontiers
from grkernels.demo.smoothing import smooth

# Columns of the table: (summary key, header, format).
COLUMNS = (
    ("peak_gold_gain", "peak", "{:+.2f}"),
    ("final_gold_gain", "final", "{:+.2f}"),
    ("gold_at_kl_gain", "@KL*", "{:+.2f}"),
    ("gold_at_proxy_gain", "@Δproxy*", "{:+.2f}"),
    ("final_proxy", "proxy", "{:+.2f}"),
    ("final_kl", "KL", "{:.1f}"),
    ("final_entropy", "entropy", "{:.2f}"),
    ("final_hack", "hack", "{:.2f}"),
    ("rm_acc_late", "RM acc", "{:.2f}"),
    ("spearman_gn_acc", "ρ(‖g‖,acc)", "{:+.2f}"),
    ("spearman_gn_acc_diff", "ρΔ", "{:+.2f}"),
    ("gr_rel_mean", "‖GR−g1‖/‖g1‖", "{:.2f}"),
)


def _cell(stat: dict, fmt: str) -> str:
    m, s, n = stat["mean"], stat["std"], stat["n"]
    if n == 0 or not math.isfinite(m):
        return "n/a"
    txt = fmt.format(m)
    if n > 1:
        txt += "±" + fmt.format(s).lstrip("+")
    return txt


def format_table(results: dict) -> str:
    """Plain-text table per world: mean ± std over seeds of every summary column."""
    lines = []
    for wname, w in results["worlds"].items():
        setup = w["setup"]
        g0 = sum(s["init_gold"] for s in setup) / len(setup)
        if all("rm_acc_utility" in s for s in setup):
            rm_u = sum(s["rm_acc_utility"] for s in setup) / len(setup)
            rm_g = sum(s["rm_acc_gold"] for s in setup) / len(setup)
            rm = f"reward model held-out pair accuracy {rm_u:.2f} vs labeller, {rm_g:.2f} vs gold"
        else:
            rm = "rule-based proxy (no reward model)"
        lines.append(
            f"world {wname}: initial gold {g0:+.2f}; {rm}; matched at KL*={w['matched']['kl']:.2f} nats, "
            f"Δproxy*={w['matched']['proxy_gain']:.2f}; pooled ρ(‖g1‖, RM acc) = "
            f"{w['spearman_gn_acc_pooled']:+.2f}"
        )
        rows = [["", "Δgold:", "", "", ""] + [""] * (len(COLUMNS) - 4), ["method"] + [h for _, h, _ in COLUMNS]]
        for label, m in w["methods"].items():
            rows.append([label] + [_cell(m["summary"][k], f) for k, _, f in COLUMNS])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for j, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                          for i, c in enumerate(r)))
            if j == 1:
                lines.append("  " + "  ".join("-" * wd for wd in widths))
        lines.append("")
    lines.append(
        "Δgold = gold minus the initial policy's gold (per seed). peak: max of the smoothed per-step gold; "
        "final: fresh samples of the last policy; @KL* / @Δproxy*: smoothed gold where KL to the initial "
        "policy / the proxy gain first reach the smallest peak of all runs of the world; proxy, KL (nats per "
        "sequence), entropy (nats per token), hack (the feature the proxy over-rewards: top token's share, "
        "fracS, format score, '!' share): final policy; RM acc: the proxy's pairwise accuracy against gold "
        "on the last 20% of steps; ρ: Spearman over steps between ‖g1‖ and the proxy's pairwise accuracy "
        "against gold (the GR paper's premise predicts < 0), ρΔ: the same on step-to-step changes; "
        "mean ± std over seeds."
    )
    return "\n".join(lines)


def _mean_band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    n = min(len(c) for c in curves)
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
    lo = [min(c[i] for c in curves) for i in range(n)]
    hi = [max(c[i] for c in curves) for i in range(n)]
    return mean, lo, hi


def plot(results: dict, path: str) -> str:
    """One row per world: gold vs step, proxy vs step (mean over seeds, min–max band), gold vs KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = results.get("smoothing_window", 10)
    worlds = list(results["worlds"].items())
    fig, axes = plt.subplots(len(worlds), 3, figsize=(15, 4.2 * len(worlds)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (wname, w) in enumerate(worlds):
        g0 = {s["seed"]: s["init_gold"] for s in w["setup"]}
        for j, (label, m) in enumerate(w["methods"].items()):
            if not m["runs"]:
                continue
            col = colors[j % len(colors)]
            ls = "--" if label.startswith("gr") else "-"  # GR variants dashed: overlaps stay visible
            for ax, key in ((axes[row][0], "gold"), (axes[row][1], "proxy")):
                base = {r["seed"]: g0[r["seed"]] if key == "gold" else 0.0 for r in m["runs"]}
                mean, lo, hi = _mean_band([[v - base[r["seed"]] for v in smooth(r["curves"][key], window)]
                                           for r in m["runs"]])
                steps = range(len(mean))
                ax.plot(steps, mean, color=col, linestyle=ls, label=label)
                if len(m["runs"]) > 1:
                    ax.fill_between(steps, lo, hi, color=col, alpha=0.15, linewidth=0)
            for i, r in enumerate(m["runs"]):  # one line per seed
                axes[row][2].plot(smooth(r["curves"]["kl"], window),
                                  [v - g0[r["seed"]] for v in smooth(r["curves"]["gold"], window)],
                                  color=col, linestyle=ls, alpha=0.8, linewidth=1, label=label if i == 0 else None)
        axes[row][0].set_title(f"{wname}: gold reward (hidden) − initial gold")
        axes[row][1].set_title(f"{wname}: proxy reward (optimised)")
        axes[row][2].set_title(f"{wname}: gold − initial gold vs KL to the initial policy")
        axes[row][0].set_xlabel("step")
        axes[row][1].set_xlabel("step")
        axes[row][2].set_xlabel("KL(π‖π_init) per sequence [nats]")
        axes[row][2].set_xscale("symlog", linthresh=1.0)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.suptitle(f"grkernels demo: mean over seeds, band = min..max, moving average of {window} steps")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _clean(x):
    """NaN/inf → None for strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _restore_nan(x):
    """None → NaN (the inverse of :func:`_clean` for numbers)."""
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _restore_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore_nan(v) for v in x]
    return x


def load_results(path: str) -> dict:
    """Read a ``results.json`` back (nulls become NaN), e.g. to redraw its tables and plots."""
    with open(path) as f:
        res = json.load(f)
    if res.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a grkernels demo results file (schema {res.get('schema')!r}, want {SCHEMA!r})")
    # Seeds are JSON object keys (strings) nowhere that matters; "values" lists keep their order.
    return _restore_nan(res)


def merge_results(parts: list[dict]) -> dict:
    """Several results of the same worlds and seeds (e.g. sweeps run separately) as one, frontiers recomputed.

    A method label present in two parts must hold the same run on every seed both have (``none`` of two sweeps
    does), its other seeds are added; the initial gold of each (world, seed) must agree. The per-method tables'
    columns stay as computed within each part; the frontier (K*, envelopes) is recomputed over all methods.
    """
    out = json.loads(json.dumps(parts[0]))  # deep copy
    out["merged_from"] = [p["config"] for p in parts]
    for part in parts[1:]:
        for wname, w in part["worlds"].items():
            if wname not in out["worlds"]:
                out["worlds"][wname] = json.loads(json.dumps(w))
                continue
            base = out["worlds"][wname]
            g0 = {s["seed"]: s["init_gold"] for s in base["setup"]}
            if any(g0.get(s["seed"], s["init_gold"]) != s["init_gold"] for s in w["setup"]):
                raise ValueError(f"merge: world {wname} has another initial policy in one part (other set-up)")
            base["setup"] = sorted([*base["setup"], *(s for s in w["setup"] if s["seed"] not in g0)],
                                   key=lambda s: s["seed"])
            for label, m in w["methods"].items():
                if label not in base["methods"]:
                    base["methods"][label] = m
                    continue
                have = {r["seed"]: r for r in base["methods"][label]["runs"]}
                for r in m["runs"]:  # a shared label: the same run on shared seeds, other seeds are added
                    if r["seed"] not in have:
                        base["methods"][label]["runs"].append(r)
                    elif have[r["seed"]]["curves"] != r["curves"]:
                        raise ValueError(f"merge: method {label!r} of world {wname}, seed {r['seed']}, differs "
                                         "between parts")
                base["methods"][label]["runs"].sort(key=lambda r: r["seed"])
    window = out.get("smoothing_window", 10)
    for wname, w in out["worlds"].items():
        if any(p["worlds"].get(wname, {}).get("frontier") for p in parts):
            g0 = {s["seed"]: s["init_gold"] for s in w["setup"]}
            p0 = {s["seed"]: s["init_proxy"] for s in w["setup"]}
            w["frontier"] = frontier_summary(w["methods"], g0, p0, window, _stats)
    return out


def full_table(results: dict) -> str:
    """The per-method table, then the frontier tables when the run was a sweep, then the adaptive strength's
    tracking when there are gr_auto runs."""
    frontier = format_frontier_table(results)
    tracking = tracking_table(results)
    return (format_table(results) + ("\n\n" + frontier if frontier else "")
            + ("\n\n" + tracking if tracking else ""))


SETTLE = 25  # steps the tracking statistics skip: from γ_0 = 1e-2 to γ* ~ 10 takes ~10 steps of ×2


def _target(label: str, m: dict) -> float:
    return float(m.get("config", {}).get("target_rel") or label.split("@")[1])


def tracking_stats(gr_rel: list[float], gamma: list[float], target: float, settle: int = SETTLE) -> dict:
    """How one run's measured gr_rel follows ``target`` after ``settle`` steps: the geometric mean of gr_rel/ρ*
    (bias), exp of the RMS of log(gr_rel/ρ*) (scatter, a factor), the share of steps within ×/÷1.5, the first step
    within ×/÷1.5, γ's median and 10th/90th percentiles over the same steps (1/loss units), and ``noise``: exp(σ)
    with σ² = ½·var(log r_{t+1} − log r_t), r_t = gr_rel_t/γ_t the step's own relative curvature: its step-to-step
    noise, which no controller acting on past steps can remove (for i.i.d. noise in log r the rule with gain k
    leaves a scatter of σ·√(2/(2 − k)) in log gr_rel: ×1.15 σ at k = 0.5)."""
    logs = [math.log(r / target) for r in gr_rel[settle:] if r > 0 and math.isfinite(r)]
    lr = [math.log(r / g) for r, g in zip(gr_rel[settle:], gamma[settle:]) if r > 0 and g > 0 and math.isfinite(r)]
    d = [b - a for a, b in zip(lr, lr[1:])]
    noise = math.exp(math.sqrt(0.5 * sum(v * v for v in d) / len(d))) if d else math.nan
    near = math.log(1.5)
    first = next((i for i, r in enumerate(gr_rel) if r > 0 and abs(math.log(r / target)) <= near), math.nan)
    gs = sorted(g for g in gamma[settle:] if math.isfinite(g))

    def pct(q: float) -> float:
        return gs[min(len(gs) - 1, int(q * len(gs)))] if gs else math.nan

    if not logs:
        return {"bias": math.nan, "scatter": math.nan, "within": math.nan, "first": first,
                "gamma_med": pct(0.5), "gamma_p10": pct(0.1), "gamma_p90": pct(0.9), "noise": noise}
    mean = sum(logs) / len(logs)
    return {"bias": math.exp(mean), "scatter": math.exp(math.sqrt(sum(v * v for v in logs) / len(logs))),
            "within": sum(abs(v) <= near for v in logs) / len(logs), "first": float(first),
            "gamma_med": pct(0.5), "gamma_p10": pct(0.1), "gamma_p90": pct(0.9), "noise": noise}


def tracking_table(results: dict) -> str:
    """Per world and gr_auto target, mean over seeds: how closely the measured gr_rel tracked the target (after
    the first SETTLE steps) and which γ the controller held."""
    rows = [["world", "variant", "gr_rel/target", "scatter ×/÷", "r noise ×/÷", "within ×1.5", "first within",
             "γ median", "γ p10..p90"]]
    for wname, w in results["worlds"].items():
        for label, m in w["methods"].items():
            if not label.startswith("gr_auto") or not m["runs"]:
                continue
            target = _target(label, m)
            per = [tracking_stats(r["curves"]["gr_rel"], r["curves"].get("gr_strength", []), target)
                   for r in m["runs"]]

            def avg(key: str, per=per) -> float:
                v = [p[key] for p in per if math.isfinite(p[key])]
                return sum(v) / len(v) if v else math.nan

            rows.append([wname, label, f"{avg('bias'):.3f}", f"{avg('scatter'):.2f}", f"{avg('noise'):.2f}",
                         f"{avg('within'):.0%}",
                         f"{avg('first'):.0f}", f"{avg('gamma_med'):.3g}",
                         f"{avg('gamma_p10'):.3g}..{avg('gamma_p90'):.3g}"])
    if len(rows) == 1:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"adaptive strength (gr_auto): measured gr_rel = ‖GR − g1‖/‖g1‖ against its target after step {SETTLE} "
             f"(mean over seeds)"]
    for j, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  " + "  ".join("-" * wd for wd in widths))
    lines.append("gr_rel/target: geometric mean of the ratio (1 = no bias); scatter: exp(RMS of log(gr_rel/target)); "
                 "r noise: exp(σ), σ the step-to-step noise of log(gr_rel/γ) (what no controller removes; gain 0.5 "
                 "leaves ≈ σ·1.15); within ×1.5: share of steps with gr_rel in [target/1.5, 1.5·target]; first "
                 "within: first step there; γ: the strength the controller applied (1/loss units).")
    return "\n".join(lines)


def plot_strength(results: dict, path: str, seed: int | None = None) -> str:
    """The adaptive strength's trace: one row per world with gr_auto runs, γ per step (left) and the measured gr_rel
    per step with its target (right, dashed), one run (``seed``; default: the lowest) per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [(n, w) for n, w in results["worlds"].items() if any(lab.startswith("gr_auto") and m["runs"]
                                                                   for lab, m in w["methods"].items())]
    fig, axes = plt.subplots(len(worlds), 2, figsize=(13, 3.6 * len(worlds)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (wname, w) in enumerate(worlds):
        autos = [(lab, m) for lab, m in w["methods"].items() if lab.startswith("gr_auto") and m["runs"]]
        for j, (label, m) in enumerate(autos):
            seeds = sorted(r["seed"] for r in m["runs"])
            pick = seed if seed in seeds else seeds[0]
            run = next(r for r in m["runs"] if r["seed"] == pick)
            target, col = _target(label, m), colors[j % len(colors)]
            gamma = run["curves"].get("gr_strength", [])
            axes[row][0].plot(range(len(gamma)), gamma, color=col, label=f"{label} (seed {pick})")
            rel = run["curves"]["gr_rel"]
            axes[row][1].plot(range(len(rel)), rel, color=col, linewidth=0.8, label=f"{label} (seed {pick})")
            axes[row][1].axhline(target, color=col, linestyle="--", linewidth=1)
        axes[row][0].set_title(f"{wname}: γ applied per step (strength='auto', from γ_0 = 1e-2)")
        axes[row][1].set_title(f"{wname}: measured ‖GR − g1‖/‖g1‖ per step (dashed: target)")
        for ax in axes[row]:
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
        axes[row][0].set_ylabel("γ [1/loss units]")
        axes[row][1].set_ylabel("gr_rel")
        axes[row][0].legend(fontsize=8)
    fig.suptitle("grkernels demo: the adaptive strength's trace, one run per target and world")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(results: dict, out_dir: str, make_plot: bool = True) -> dict[str, str]:
    """Write ``results.json``, ``table.txt`` and (optionally) ``demo.png`` (and ``frontier.png`` for a sweep)
    into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.txt")}
    with open(paths["json"], "w") as f:
        json.dump(_clean(results), f, allow_nan=False)
    with open(paths["table"], "w") as f:
        f.write(full_table(results) + "\n")
    if make_plot:
        paths["plot"] = plot(results, os.path.join(out_dir, "demo.png"))
        if any(w.get("frontier") for w in results["worlds"].values()):
            paths["frontier"] = plot_frontiers(results, os.path.join(out_dir, "frontier.png"))
        if any(lab.startswith("gr_auto") and m["runs"] for w in results["worlds"].values()
               for lab, m in w["methods"].items()):
            paths["strength"] = plot_strength(results, os.path.join(out_dir, "strength.png"))
    return paths
