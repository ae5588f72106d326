"""Methods × worlds × seeds: set-up, RL runs (optionally over worker processes) and the summary.

Phase 0 (task worlds only): the policy pretrained on the synthetic language (or loaded from the
cache), once for all seeds. Phase 1, per seed (parallel over seeds): token values and Markov chain,
SFT of the chain worlds' initial policy, the worlds (the rare world needs the initial policy's token
frequencies), one reward model per world (a rule for the format world). Phase 2, per (world,
seed, method): one RL run from that world's initial policy against that world's reward model.
All methods of a (world, seed) start from the same policy and see the same prompt sequence
(paired comparison).

Summary per (world, method), mean ± std over seeds:
    peak_gold        max over steps of the smoothed per-step gold (moving average)
    final_gold       gold of the final policy on ``eval_samples`` fresh samples
    gold_at_kl       smoothed gold where smoothed KL(π‖π_init) first reaches K*, K* = the smallest
                     peak KL over all runs of the world (so every run reaches it)
    gold_at_proxy    smoothed gold where the smoothed proxy gain (proxy − proxy at the start) first
                     reaches G*, the smallest peak gain over all runs of the world
    *_gain           the four gold numbers minus the seed's initial gold (what the table shows)
    spearman_gn_acc  Spearman correlation over steps between ‖g1‖ and the proxy's pairwise accuracy
                     against gold on that step's samples. The GR paper's premise predicts < 0 (large
                     gradient norm where the reward model is inaccurate). Both drift over training, so
                     ``spearman_gn_acc_diff`` correlates their step-to-step changes (smoothed) instead.
    plus final proxy / KL / entropy / top-token fraction / hack feature, mean ‖GR − g1‖/‖g1‖, late RM accuracy.
With a sweep (``ExperimentConfig.sweep``) each world also gets ``frontier`` (:mod:`grkernels.demo.frontier`).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch

from grkernels._version import __version__
from grkernels.demo.frontier import frontier_summary
from grkernels.demo.grpo import DEFAULT_METHODS, GR_METHODS, RLConfig, run_rl
from grkernels.demo.language import Language
from grkernels.demo.policy import TinyTransformer, pretrain_policy, sample
from grkernels.demo.pretrain import pretrain_on_language
from grkernels.demo.reward_model import train_reward_model
from grkernels.demo.smoothing import smooth
from grkernels.demo.tasks import TASK_WORLDS, RuleReward, make_task_world, task_sizes
from grkernels.demo.worlds import WORLD_ALIASES, WORLDS, Sizes, make_base, make_world, random_prompts

ALL_WORLDS = (*WORLDS, *TASK_WORLDS)
# What a sweep varies per method (``--sweep kl:0.1,0.3``): the method's strength knob in RLConfig.
SWEEP_PARAMS = {"kl": "beta", "kl_reset": "reset_interval", "gr": "gamma", "gr_kl": "gamma", "gr_all": "gamma",
                "gr_every": "gamma", "gr_subset": "gamma", "gr_head": "gamma", "none_lowlr": "lowlr_scale",
                "gr_auto": "target_rel"}

SCHEMA = "grkernels.demo/v1"


@dataclass
class ExperimentConfig:
    """Everything one ``grkernels demo`` run needs (the CLI fills it)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    worlds: tuple[str, ...] = WORLDS
    seeds: tuple[int, ...] = (0, 1, 2)
    gammas: tuple[float, ...] = (10.0,)
    sizes: Sizes = field(default_factory=Sizes)
    rl: RLConfig = field(default_factory=RLConfig)
    sft_steps: int = 300
    rm_pairs: int = 2000
    rm_heldout: int = 500
    rm_steps: int = 150
    label_temp: float = 0.1
    rare_penalty: float = 0.3
    rare_bonus: float = 2.0
    device: str = "cpu"
    workers: int = 1
    backend: str = "auto"
    # Task worlds (format, judge): the language, its pretraining, the proxies' knobs.
    lang: Language = field(default_factory=Language)
    pretrain_steps: int = 3000
    pretrain_seed: int = 0         # one pretrained model for every RL seed, as one base LM for many RL runs
    cache_dir: str | None = None   # where pretrained policies are kept (the CLI: <out>/cache)
    format_weight: float = 1.0
    sure_right: float = 0.5
    sure_wrong: float = 0.05
    # Frontier mode: ((method, strengths), ...); replaces methods/gammas (``none`` is added unless sweep_none is
    # False: a sweep that is merged with another that ran ``none`` on the same seeds need not run it again).
    sweep: tuple[tuple[str, tuple[float, ...]], ...] | None = None
    sweep_none: bool = True

    def variants(self) -> list[tuple[str, RLConfig]]:
        """(label, config) per run kind. Without a sweep: one per method, GR methods one per γ (label ``gr@γ``
        when several). With a sweep: ``none`` and one per (method, strength), labelled ``method@strength``."""
        if self.sweep is not None:
            out = [("none", replace(self.rl, method="none"))] if self.sweep_none else []
            for m, values in self.sweep:
                kind = int if SWEEP_PARAMS[m] == "reset_interval" else float
                out += [(f"{m}@{v:g}", replace(self.rl, method=m, **{SWEEP_PARAMS[m]: kind(v)})) for v in values]
            return out
        out = []
        for m in self.methods:
            if m in GR_METHODS and m != "gr_auto":  # gr_auto has no γ: its knob is rl.target_rel
                for g in self.gammas:
                    label = m if len(self.gammas) == 1 else f"{m}@{g:g}"
                    out.append((label, replace(self.rl, method=m, gamma=g)))
            else:
                out.append((m, replace(self.rl, method=m)))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["variants"] = {label: cfg.to_dict() for label, cfg in self.variants()}
        return d


def canonical_world(name: str) -> str:
    name = WORLD_ALIASES.get(name.lower(), name.lower())
    if name not in ALL_WORLDS:
        raise ValueError(f"unknown world {name!r}; choose from {', '.join(ALL_WORLDS)} (aliases: 0, B)")
    return name


def pretrain_task_policy(cfg: ExperimentConfig) -> tuple[TinyTransformer, dict] | None:
    """The task worlds' initial policy (pretrained on the language, or loaded from ``cfg.cache_dir``); None when
    no task world is asked for. Runs single-threaded on CPU, so the weights do not depend on --workers."""
    if not any(w in TASK_WORLDS for w in cfg.worlds):
        return None
    threads = torch.get_num_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(1)
    try:
        policy, info = pretrain_on_language(cfg.lang, task_sizes(cfg.lang, cfg.sizes), cfg.pretrain_seed,
                                            steps=cfg.pretrain_steps, device=cfg.device, cache_dir=cfg.cache_dir)
    finally:
        torch.set_num_threads(threads)
    return policy.cpu(), info


# ---------------------------------------------------------------------------------------------- workers
_PROGRESS_QUEUE = None


def _init_worker(queue, threads: int) -> None:  # runs in each worker process
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue
    torch.set_num_threads(threads)


def _report(n: int) -> None:
    if _PROGRESS_QUEUE is not None:
        _PROGRESS_QUEUE.put(n)


def setup_seed(cfg: ExperimentConfig, seed: int, progress: Callable[[int], None] | None = None,
               task_policy: tuple[TinyTransformer, dict] | None = None) -> dict:
    """Phase 1 for one seed: initial policies, worlds and their reward models (moved to CPU for pickling).

    ``task_policy``: the pretrained policy and its info from :func:`pretrain_task_policy` (task worlds only).
    """
    out: dict = {"seed": seed, "worlds": {}}
    if any(w in WORLDS for w in cfg.worlds):
        _setup_chain_worlds(cfg, seed, out, progress)
    for wname in (w for w in cfg.worlds if w in TASK_WORLDS):
        if task_policy is None:
            raise ValueError("task worlds need the pretrained policy (pretrain_task_policy)")
        policy, pre_info = task_policy
        world = make_task_world(wname, task_sizes(cfg.lang, cfg.sizes), format_weight=cfg.format_weight,
                                sure_right=cfg.sure_right, sure_wrong=cfg.sure_wrong)
        info = dict(pre_info)
        if wname == "format":
            rm = RuleReward(world)
        else:
            rm, rm_info = train_reward_model(world, policy, seed, n_pairs=cfg.rm_pairs, n_heldout=cfg.rm_heldout,
                                             steps=cfg.rm_steps, label_temp=cfg.label_temp, device=cfg.device)
            rm.to("cpu")
            info.update(rm_info)
        g = torch.Generator(device=cfg.device).manual_seed(4_000_037 * seed + 2)
        prompts = world.prompts(1024, g, cfg.device)
        comps = sample(policy.to(cfg.device), prompts, world.sizes.completion_len, g)
        info["init_gold"] = float(world.gold(prompts, comps).mean())
        info["init_proxy"] = float(rm.to(cfg.device).proxy(prompts, comps).mean())
        info["init_hack"] = float(world.hack(comps).mean())
        rm.to("cpu")
        out["worlds"][wname] = {"world": world, "rm": rm, "info": info, "policy": policy.cpu()}
        if progress is not None:
            progress(1)
    return out


def _setup_chain_worlds(cfg: ExperimentConfig, seed: int, out: dict, progress: Callable[[int], None] | None
                        ) -> None:
    """The Markov-chain worlds (collapse, rare) of one seed: SFT policy, worlds, reward models, into ``out``."""
    dev = cfg.device
    base = make_base(cfg.sizes, seed)
    policy, sft = pretrain_policy(base, seed, steps=cfg.sft_steps, device=dev)
    g = torch.Generator(device=dev).manual_seed(4_000_037 * seed + 1)
    prompts = random_prompts(cfg.sizes, 1024, g, dev)
    comps = sample(policy, prompts, cfg.sizes.completion_len, g)
    freq = torch.bincount(comps.flatten(), minlength=cfg.sizes.vocab).float() / comps.numel()
    for wname in (w for w in cfg.worlds if w in WORLDS):
        world = make_world(wname, base, freq, rare_penalty=cfg.rare_penalty, rare_bonus=cfg.rare_bonus)
        rm, info = train_reward_model(world, policy, seed, n_pairs=cfg.rm_pairs, n_heldout=cfg.rm_heldout,
                                      steps=cfg.rm_steps, label_temp=cfg.label_temp, device=dev)
        info.update(sft)
        info["init_gold"] = float(world.gold(prompts, comps).mean())
        info["init_entropy_tokens"] = float(-(freq * freq.clamp_min(1e-12).log()).sum())
        info["rare_tokens"] = world.rare.tolist()
        info["init_frac_rare"] = float(world.frac_rare(comps).mean())
        info["init_hack"] = float(world.hack(comps).mean())
        info["init_proxy"] = float(rm.proxy(prompts, comps).mean())
        rm.to("cpu")
        out["worlds"][wname] = {"world": world.to("cpu"), "rm": rm, "info": info, "policy": policy}
        if progress is not None:
            progress(1)
    policy.cpu()


def _setup_task(cfg: ExperimentConfig, seed: int, task_policy) -> dict:
    return setup_seed(cfg, seed, _report, task_policy)


def _rl_task(cfg: ExperimentConfig, wname: str, label: str, rl: RLConfig, seed: int, setup: dict,
             weight: int) -> dict:
    return rl_run(cfg, wname, label, rl, seed, setup, lambda n: _report(n * weight))


def rl_run(cfg: ExperimentConfig, wname: str, label: str, rl: RLConfig, seed: int, setup: dict,
           progress: Callable[[int], None] | None = None) -> dict:
    """Phase 2: one RL run; returns the run record that goes into results.json."""
    dev = cfg.device
    w = setup["worlds"][wname]
    world = w["world"].to(dev)
    rm = w["rm"].to(dev)
    t0 = time.perf_counter()
    res = run_rl(world, w["policy"], rm, rl, seed, device=dev, progress=progress, backend=cfg.backend)
    res.update({"world": wname, "method": label, "seed": seed, "wall_s": time.perf_counter() - t0})
    return res


# ---------------------------------------------------------------------------------------------- driver
def run_experiment(cfg: ExperimentConfig, show_progress: bool = True) -> dict:
    """Run every (world, seed, method); returns the results dict (see :mod:`grkernels.demo.report`)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    source = source_revision()  # at the start: the tree may change while a long sweep runs
    variants = cfg.variants()
    n_setup = len(cfg.seeds) * len(cfg.worlds)
    n_steps = len(cfg.worlds) * len(cfg.seeds) * sum(v.steps * (2 if v.uses_gr else 1) for _, v in variants)
    bar = tqdm(total=n_setup + n_steps, disable=not show_progress, unit="u", dynamic_ncols=True,
               desc="set-up", smoothing=0.05, mininterval=1.0)
    weights = {label: 2 if v.uses_gr else 1 for label, v in variants}  # GR steps cost ~2 plain ones
    setups: dict[int, dict] = {}
    runs: list[dict] = []
    rl_tasks = [(w, label, v, s) for s in cfg.seeds for w in cfg.worlds for label, v in variants]
    # Longest first: GR runs cost ~2x, so start them early for better packing over workers.
    rl_tasks.sort(key=lambda t: -weights[t[1]] * t[2].steps)

    task_policy = pretrain_task_policy(cfg)
    if cfg.workers <= 1:
        if cfg.device == "cpu":
            torch.set_num_threads(1)  # same arithmetic as in workers: results do not depend on --workers
        for s in cfg.seeds:
            setups[s] = setup_seed(cfg, s, bar.update, task_policy)
        bar.set_description("RL")
        for w, label, v, s in rl_tasks:
            wt = weights[label]
            runs.append(rl_run(cfg, w, label, v, s, setups[s], lambda n, wt=wt: bar.update(n * wt)))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, 1)) as pool:
            futs = [pool.submit(_setup_task, cfg, s, task_policy) for s in cfg.seeds]
            _drain(futs, queue, bar, lambda f: setups.__setitem__(f.result()["seed"], f.result()))
            bar.set_description("RL")
            futs = [pool.submit(_rl_task, cfg, w, label, v, s, setups[s], weights[label])
                    for w, label, v, s in rl_tasks]
            _drain(futs, queue, bar, lambda f: runs.append(f.result()))
    bar.close()
    results = summarize(cfg, setups, runs)
    results["env"]["source"] = source
    results["wall_s"] = time.perf_counter() - t_start
    return results


def _drain(futs, queue, bar, on_done) -> None:
    """Wait for futures while moving worker progress (step counts, GR steps weighted 2) onto the bar."""
    import queue as queue_mod

    def pump() -> None:
        while True:
            try:
                bar.update(queue.get_nowait())
            except queue_mod.Empty:
                return

    pending = set(futs)
    while pending:
        done = {f for f in pending if f.done()}
        for f in done:
            on_done(f)  # re-raises a worker's exception here
        pending -= done
        pump()
        if pending:
            time.sleep(0.2)
    pump()


# ---------------------------------------------------------------------------------------------- summary
def value_at_first_crossing(xs: list[float], ys: list[float], level: float) -> float:
    """y where x first reaches ``level`` (linear interpolation between steps); NaN if it never does."""
    for i, x in enumerate(xs):
        if x >= level:
            if i == 0:
                return ys[0]
            x0, x1 = xs[i - 1], x
            f = 0.0 if x1 == x0 else (level - x0) / (x1 - x0)
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    return math.nan


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for constant or non-finite input."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    rx, ry = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _stats(values: list[float]) -> dict:
    v = [x for x in values if math.isfinite(x)]
    n = len(v)
    mean = sum(v) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else (0.0 if n else math.nan)
    return {"mean": mean, "std": std, "n": n, "values": values}


def source_revision() -> str | None:
    """The git commit of the grkernels checkout that ran (``+dirty`` with uncommitted changes to tracked files),
    or None outside a git checkout: which tree a committed figure came from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def summarize(cfg: ExperimentConfig, setups: dict[int, dict], runs: list[dict]) -> dict:
    """Turn the raw runs into the results dict (schema ``grkernels.demo/v1``)."""
    variants = [label for label, _ in cfg.variants()]
    window = max(5, cfg.rl.steps // 25)
    out = {
        "schema": SCHEMA,
        "config": cfg.to_dict(),
        "env": {"torch": torch.__version__, "grkernels": __version__, "device": cfg.device, "workers": cfg.workers,
                "cpu_count": os.cpu_count()},
        "smoothing_window": window,
        "worlds": {},
    }
    for wname in cfg.worlds:
        wruns = [r for r in runs if r["world"] == wname]
        for r in wruns:
            c = r["curves"]
            r["smooth"] = {k: smooth(c[k], window) for k in ("gold", "proxy", "kl")}
            r["smooth"]["proxy_gain"] = [p - r["smooth"]["proxy"][0] for p in r["smooth"]["proxy"]]
        k_star = min((max(r["smooth"]["kl"]) for r in wruns), default=math.nan)
        g_star = min((max(r["smooth"]["proxy_gain"]) for r in wruns), default=math.nan)
        methods = {}
        for label in variants:
            mruns = sorted((r for r in wruns if r["method"] == label), key=lambda r: r["seed"])
            per = {
                "peak_gold": [max(r["smooth"]["gold"]) for r in mruns],
                "peak_step": [float(r["smooth"]["gold"].index(max(r["smooth"]["gold"]))) for r in mruns],
                "final_gold": [r["final"]["gold"] for r in mruns],
                "final_proxy": [r["final"]["proxy"] for r in mruns],
                "final_kl": [r["final"]["kl"] for r in mruns],
                "final_entropy": [r["final"]["entropy"] for r in mruns],
                "final_top_token_frac": [r["final"]["top_token_frac"] for r in mruns],
                "final_frac_rare": [r["final"]["frac_rare"] for r in mruns],
                "final_hack": [r["final"]["hack"] for r in mruns],
                "gold_at_kl": [value_at_first_crossing(r["smooth"]["kl"], r["smooth"]["gold"], k_star)
                               for r in mruns],
                "gold_at_proxy": [value_at_first_crossing(r["smooth"]["proxy_gain"], r["smooth"]["gold"], g_star)
                                  for r in mruns],
                "spearman_gn_acc": [spearman(r["curves"]["g1_norm"], r["curves"]["rm_acc"]) for r in mruns],
                "spearman_gn_acc_diff": [spearman(_diff(smooth(r["curves"]["g1_norm"], window)),
                                                  _diff(smooth(r["curves"]["rm_acc"], window))) for r in mruns],
                "gr_rel_mean": [sum(r["curves"]["gr_rel"]) / len(r["curves"]["gr_rel"]) for r in mruns],
                "rm_acc_late": [_tail_mean(r["curves"]["rm_acc"]) for r in mruns],
                "wall_s": [r["wall_s"] for r in mruns],
            }
            # Gains over each seed's initial gold: seeds are different worlds (token values), so the
            # absolute level varies between seeds far more than methods differ within one seed.
            g0 = [setups[r["seed"]]["worlds"][wname]["info"]["init_gold"] for r in mruns]
            for k in ("peak_gold", "final_gold", "gold_at_kl", "gold_at_proxy"):
                per[k + "_gain"] = [v - b for v, b in zip(per[k], g0)]
            methods[label] = {
                "config": next((v.to_dict() for lab, v in cfg.variants() if lab == label), {}),
                "summary": {k: _stats(v) for k, v in per.items()},
                "runs": [{"seed": r["seed"], "wall_s": r["wall_s"], "final": r["final"], "curves": r["curves"],
                          "gr_skipped": r["gr_skipped"]} for r in mruns],
            }
        pooled_g = [x for r in wruns for x in r["curves"]["g1_norm"]]
        pooled_a = [x for r in wruns for x in r["curves"]["rm_acc"]]
        out["worlds"][wname] = {
            "setup": [{"seed": s, **{k: v for k, v in setups[s]["worlds"][wname]["info"].items()}}
                      for s in sorted(setups)],
            "matched": {"kl": k_star, "proxy_gain": g_star},
            "spearman_gn_acc_pooled": spearman(pooled_g, pooled_a),
            "methods": methods,
        }
        if cfg.sweep is not None:
            info = {s: setups[s]["worlds"][wname]["info"] for s in setups}
            out["worlds"][wname]["frontier"] = frontier_summary(
                methods, {s: i["init_gold"] for s, i in info.items()}, {s: i["init_proxy"] for s, i in info.items()},
                window, _stats)
    return out


def _diff(x: list[float]) -> list[float]:
    return [b - a for a, b in zip(x[:-1], x[1:])]


def _tail_mean(x: list[float], frac: float = 0.2) -> float:
    k = max(1, int(len(x) * frac))
    tail = [v for v in x[-k:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else math.nan
