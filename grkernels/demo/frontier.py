"""Frontiers: each method compared over a sweep of its strength, as Gao et al. (2022) compare them.

A sweep (``grkernels demo --sweep``) runs ``none`` plus every (method, strength) in every world and
seed. A method's *frontier* in one seed is the envelope of all its runs' smoothed trajectories:

    E(k) = max { Δgold_t : smoothed KL(π_t‖π_init) ≤ k, over the method's runs and steps t } ∪ {0}

(Δgold = gold minus the initial policy's gold; steps from the first full smoothing window on; the 0 is
the initial policy itself, so E ≥ 0: a method that only loses gold has the flat frontier E = 0).
Summary numbers per method, mean ± std over seeds:
    best_gold_at_kl   E(K*), K* = the smallest "largest KL reached" over all methods of the world,
                      so every method's envelope is defined up to K*
    auf               the mean of E over [0, K*] (area under the frontier divided by K*, Δgold units)
    peak_gold         the envelope's maximum at any KL
    best_final_gold   the final Δgold (fresh samples of the last policy) of the method's best strength
                      (best by the mean over seeds; ``best_final_label`` names it)
plus per variant the final point (Δgold, KL, Δproxy, hack feature) that the plot draws.
A method with more strengths has more runs to take a maximum over: compare methods with the same
number of strengths (the committed sweeps use three each).
"""

from __future__ import annotations

import math

from grkernels.demo.smoothing import smooth

GRID = 64  # points of the KL grid on which the envelope is averaged


def family(label: str) -> str:
    """``"gr@10"`` → ``"gr"``."""
    return label.split("@")[0]


def strength(label: str) -> float:
    """``"gr@10"`` → 10.0; ``"none"`` → 0.0."""
    return float(label.split("@")[1]) if "@" in label else 0.0


def envelope(points: list[tuple[float, float]], k: float) -> float:
    """max y over points with x ≤ k (NaN when none)."""
    ys = [y for x, y in points if x <= k]
    return max(ys) if ys else math.nan


def smoothed(run: dict, key: str, window: int) -> list[float]:
    """A run's curve ``key`` as the frontier uses it: trailing moving average over ``window`` steps."""
    return smooth(run["curves"][key], window)


def _trajectory(run: dict, g0: float, window: int) -> list[tuple[float, float]]:
    """(KL, Δgold) per step from the first full window on: the first ``window − 1`` trailing means average fewer
    steps, so they are noisier, and an envelope (a maximum) would pick up their noise. Runs shorter than a window
    keep their last step."""
    pts = list(zip(smoothed(run, "kl", window), smoothed(run, "gold", window)))
    return [(k, g - g0) for k, g in pts[min(window, len(pts)) - 1:]]


def seed_points(methods: dict, labels: list[str], seed: int, g0: float, window: int) -> list[tuple[float, float]]:
    """All (KL, Δgold) points of ``labels``' runs of ``seed``, plus the initial policy (0, 0) where every run
    starts (the infinite-strength limit of every method); empty when the seed has no runs."""
    pts = [p for lab in labels for r in methods[lab]["runs"] if r["seed"] == seed for p in _trajectory(r, g0, window)]
    return [(0.0, 0.0), *pts] if pts else []


def frontier_summary(methods: dict, g0: dict[int, float], p0: dict[int, float], window: int, stats) -> dict:
    """Per-method frontier numbers and per-variant final points of one world.

    ``methods``: label → {"runs": [run with "seed", "curves", "final"]}; ``g0``/``p0``: seed → initial
    gold / proxy; ``window``: smoothing window (steps); ``stats``: list of floats → {"mean", "std", "n", "values"}.
    """
    fams: dict[str, list[str]] = {}
    for label in methods:
        fams.setdefault(family(label), []).append(label)
    seeds = sorted({r["seed"] for m in methods.values() for r in m["runs"]})
    reach = {f: max((k for lab in labs for r in methods[lab]["runs"] for k, _ in _trajectory(r, 0.0, window)),
                    default=math.nan) for f, labs in fams.items()}
    k_star = min(reach.values()) if reach else math.nan
    out: dict = {"k_star": k_star, "methods": {}, "variants": {}}
    for f, labs in fams.items():
        best, auf, peak = [], [], []
        for s in seeds:
            pts = seed_points(methods, labs, s, g0[s], window)
            if not pts:
                continue
            best.append(envelope(pts, k_star))
            env = [envelope(pts, k) for k in kl_grid(k_star)]
            finite = [e for e in env if math.isfinite(e)]
            auf.append(sum(finite) / len(finite) if finite else math.nan)
            peak.append(max(y for _, y in pts))
        finals = {lab: stats([r["final"]["gold"] - g0[r["seed"]] for r in methods[lab]["runs"]]) for lab in labs}
        top = max(labs, key=lambda lab: finals[lab]["mean"] if math.isfinite(finals[lab]["mean"]) else -math.inf)
        out["methods"][f] = {"strengths": [strength(lab) for lab in labs], "labels": labs,
                             "best_gold_at_kl": stats(best), "auf": stats(auf), "peak_gold": stats(peak),
                             "best_final_gold": finals[top], "best_final_label": top}
    for label, m in methods.items():
        runs = m["runs"]
        out["variants"][label] = {
            "family": family(label), "strength": strength(label),
            "final_gold_gain": stats([r["final"]["gold"] - g0[r["seed"]] for r in runs]),
            "final_kl": stats([r["final"]["kl"] for r in runs]),
            "final_proxy_gain": stats([r["final"]["proxy"] - p0[r["seed"]] for r in runs]),
            "final_hack": stats([r["final"]["hack"] for r in runs]),
        }
    return out


def kl_grid(k_star: float) -> list[float]:
    """``GRID`` evenly spaced KL levels in [0, K*] (empty when K* is not finite)."""
    return [k_star * i / (GRID - 1) for i in range(GRID)] if math.isfinite(k_star) else []


def format_frontier_table(results: dict) -> str:
    """Plain-text frontier tables (one per world that has a ``frontier`` entry)."""
    def cell(st: dict, fmt: str) -> str:
        if st["n"] == 0 or not math.isfinite(st["mean"]):
            return "n/a"
        return fmt.format(st["mean"]) + ("±" + fmt.format(st["std"]).lstrip("+") if st["n"] > 1 else "")

    lines = []
    for wname, w in results["worlds"].items():
        fr = w.get("frontier")
        if not fr:
            continue
        lines.append(f"world {wname}: frontier summary (K* = {fr['k_star']:.2f} nats; Δgold over the initial policy)")
        rows = [["method", "strengths", "best Δgold @KL≤K*", "area/K*", "peak Δgold", "best final Δgold", "at",
                 "ρ(‖g1‖,acc)"]]
        for f, m in fr["methods"].items():
            rho = [v for lab in m["labels"] for v in w["methods"][lab]["summary"]["spearman_gn_acc"]["values"]]
            rho = [v for v in rho if v is not None and math.isfinite(v)]
            rows.append([f, ",".join(f"{s:g}" for s in m["strengths"]), cell(m["best_gold_at_kl"], "{:+.3f}"),
                         cell(m["auf"], "{:+.3f}"), cell(m["peak_gold"], "{:+.3f}"),
                         cell(m["best_final_gold"], "{:+.3f}"), m["best_final_label"],
                         f"{sum(rho) / len(rho):+.2f}" if rho else "n/a"])
        lines += _aligned(rows)
        rows = [["variant", "final Δgold", "final KL", "final Δproxy", "final hack"]]
        for label, v in fr["variants"].items():
            rows.append([label, cell(v["final_gold_gain"], "{:+.3f}"), cell(v["final_kl"], "{:.2f}"),
                         cell(v["final_proxy_gain"], "{:+.3f}"), cell(v["final_hack"], "{:.2f}")])
        lines += _aligned(rows) + [""]
    return "\n".join(lines)


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            out.append("  " + "  ".join("-" * wd for wd in widths))
    return out


def plot_frontiers(results: dict, path: str) -> str:
    """One row per world: Δgold vs KL and Δgold vs Δproxy (thin: every run's smoothed trajectory; markers:
    final points, mean ± std over seeds, one per strength, joined in strength order), and the envelope E(k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = results.get("smoothing_window", 10)
    worlds = [(n, w) for n, w in results["worlds"].items() if w.get("frontier")]
    fig, axes = plt.subplots(len(worlds), 3, figsize=(16, 4.6 * len(worlds)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (wname, w) in enumerate(worlds):
        fr = w["frontier"]
        g0 = {s["seed"]: s["init_gold"] for s in w["setup"]}
        p0 = {s["seed"]: s["init_proxy"] for s in w["setup"]}
        for j, (f, m) in enumerate(fr["methods"].items()):
            col = colors[j % len(colors)]
            finals = {"kl": [], "proxy": [], "gold": []}
            for lab in m["labels"]:
                for r in w["methods"][lab]["runs"]:
                    traj = _trajectory(r, g0[r["seed"]], window)
                    gain = [v - p0[r["seed"]] for v in smoothed(r, "proxy", window)][-len(traj):]
                    axes[row][0].plot([k for k, _ in traj], [g for _, g in traj], color=col, alpha=0.25,
                                      linewidth=0.7)
                    axes[row][1].plot(gain, [g for _, g in traj], color=col, alpha=0.25, linewidth=0.7)
                v = fr["variants"][lab]
                finals["kl"].append(v["final_kl"])
                finals["proxy"].append(v["final_proxy_gain"])
                finals["gold"].append(v["final_gold_gain"])
            label = f"{f} ({','.join(f'{x:g}' for x in m['strengths'])})"
            for ax, key in ((axes[row][0], "kl"), (axes[row][1], "proxy")):
                ax.errorbar([s["mean"] for s in finals[key]], [s["mean"] for s in finals["gold"]],
                            xerr=[s["std"] for s in finals[key]], yerr=[s["std"] for s in finals["gold"]],
                            color=col, marker="o", capsize=2, label=label)
            ks = kl_grid(fr["k_star"])
            envs = []
            for s in sorted(g0):
                pts = seed_points(w["methods"], m["labels"], s, g0[s], window)
                if pts:
                    envs.append([envelope(pts, k) for k in ks])
            if envs and ks:
                mean = [sum(e[i] for e in envs) / len(envs) for i in range(len(ks))]
                axes[row][2].plot(ks, mean, color=col, label=f)
                axes[row][2].fill_between(ks, [min(e[i] for e in envs) for i in range(len(ks))],
                                          [max(e[i] for e in envs) for i in range(len(ks))], color=col, alpha=0.15,
                                          linewidth=0)
        axes[row][0].set_title(f"{wname}: Δgold vs KL to the initial policy")
        axes[row][0].set_xlabel("KL(π‖π_init) per sequence [nats]")
        axes[row][0].set_xscale("symlog", linthresh=1.0)
        axes[row][1].set_title(f"{wname}: Δgold vs proxy gain")
        axes[row][1].set_xlabel("proxy − initial proxy")
        axes[row][2].set_title(f"{wname}: E(k) = best Δgold at KL ≤ k (band: seed min..max)")
        axes[row][2].set_xlabel("k [nats]")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.set_ylabel("gold − initial gold")
        axes[row][0].legend(fontsize=8)
    fig.suptitle("grkernels demo --sweep: thin lines = runs (smoothed, from the first full window), "
                 "markers = final point per strength (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
