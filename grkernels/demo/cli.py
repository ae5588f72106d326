"""``grkernels demo``: command-line front end of the reward-hacking experiment."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from grkernels.demo.experiment import SWEEP_PARAMS, ExperimentConfig, canonical_world, run_experiment
from grkernels.demo.grpo import DEFAULT_METHODS, METHODS, RLConfig
from grkernels.demo.language import Language
from grkernels.demo.report import full_table, load_results, merge_results, write_results
from grkernels.demo.worlds import WORLDS, Sizes

# What --quick changes (each still overridable by its own flag).
QUICK = {"seeds": 1, "steps": 150}
DEFAULTS = {"seeds": 3, "steps": 250}
# --sweep without a value: three strengths per method (β for KL, reset period for resets, γ for GR).
DEFAULT_SWEEP = "kl:0.03,0.1,0.3;kl_reset:25,50,100;gr:1,10,100"


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from err
    return parse


def parse_sweep(text: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``"kl:0.03,0.1;gr:1,10"`` → ``(("kl", (0.03, 0.1)), ("gr", (1.0, 10.0)))`` (validated)."""
    out = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        method, sep, values = part.partition(":")
        method = method.strip()
        if not sep or method not in SWEEP_PARAMS:
            raise ValueError(f"--sweep: expected METHOD:V1,V2,... with METHOD in {', '.join(SWEEP_PARAMS)}; "
                             f"got {part!r}")
        try:
            vals = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError as err:
            raise ValueError(f"--sweep: strengths of {method} must be numbers, got {values!r}") from err
        if not vals or any(not v >= 0 for v in vals):
            raise ValueError(f"--sweep: {method} needs one or more strengths >= 0, got {values!r}")
        if SWEEP_PARAMS[method] == "reset_interval" and any(v < 1 or v != int(v) for v in vals):
            raise ValueError(f"--sweep: kl_reset strengths are reset periods in steps (integers >= 1), got {values!r}")
        if SWEEP_PARAMS[method] == "target_rel" and any(v <= 0 for v in vals):
            raise ValueError(f"--sweep: gr_auto strengths are target ‖GR − g1‖/‖g1‖ values > 0, got {values!r}")
        out.append((method, vals))
    if not out:
        raise ValueError("--sweep: empty specification")
    return tuple(out)


def _clip(text: str) -> float | None:
    v = float(text)
    return None if v <= 0 else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grkernels demo",
        description="Reward-hacking experiment: GRPO on a learned proxy reward with a hidden gold reward, "
        "comparing no regularisation, KL, KL with reference resets, gradient regularisation (GR) and GR+KL. "
        "Prints a table and writes results.json, table.txt and demo.png into --out (with --sweep also "
        "frontier.png and the frontier tables).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = RLConfig()
    s = Sizes()
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help=f"a ~3-minute version: {QUICK} (flags override)")
    g.add_argument("--out", default="demo_out", help="output directory")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: min(2, CPU count) on CPU, 1 on CUDA)")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="backend of grkernels' policy loss (auto: Triton on CUDA, torch on CPU)")
    g.add_argument("--no-plot", action="store_true", help="skip demo.png")
    g.add_argument("--from-results", metavar="JSON[,JSON...]", type=_csv(str), default=None,
                   help="run nothing: redraw the tables and plots of earlier results.json files into --out; several "
                   "(same worlds and seeds, e.g. sweeps of different methods) are merged, frontiers recomputed")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("experiment")
    g.add_argument("--methods", type=_csv(str), default=DEFAULT_METHODS,
                   help=f"comma list from {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; none_lowlr is "
                   "the 'smaller step' control: no regularisation, lr × --lowlr-scale; gr_head: GR on the output head "
                   "only, its perturbed pass from the cached hidden states; gr_auto: GR with the adaptive strength "
                   "at --target-rel)")
    g.add_argument("--worlds", "--world", type=_csv(str), default=WORLDS,
                   help="comma list from collapse (world 0), rare (world B), format (a verifiable task whose "
                   "reward adds a format term), judge (a learned judge with a spurious feature)")
    g.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None, metavar="SPEC",
                   help="frontier mode: runs none plus each METHOD at each strength, SPEC = "
                   "'METHOD:V1,V2;...' (strength = β for kl, reset period for kl_reset, γ for gr, gr_kl, "
                   f"gr_all, gr_every, gr_subset, gr_head, target ‖GR − g1‖/‖g1‖ for gr_auto, lr scale for "
                   f"none_lowlr); without SPEC: {DEFAULT_SWEEP!r}. "
                   "Replaces --methods, --gamma")
    g.add_argument("--sweep-without-none", action="store_true",
                   help="with --sweep: do not run none (for a sweep merged later, --from-results, with one that did)")
    g.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {DEFAULTS['seeds']})")
    g.add_argument("--seed", type=int, default=0, help="first seed")
    g.add_argument("--steps", type=int, default=None, help=f"RL steps per run (default {DEFAULTS['steps']})")
    g = p.add_argument_group("KL penalty and reference resets")
    g.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (kl, kl_reset, gr_kl)")
    g.add_argument("--kl-estimator", default=d.kl_estimator, choices=("k1", "k2", "k3"))
    g.add_argument("--reset-interval", type=int, default=d.reset_interval, help="steps between reference resets")
    g.add_argument("--reset-alpha", type=float, default=d.reset_alpha, help="ref ← α·policy + (1−α)·ref")
    g = p.add_argument_group("gradient regularisation (grkernels.GradReg)")
    g.add_argument("--gamma", type=_csv(float), default=(10.0,),
                   help="GR strength γ; a comma list runs one GR variant per value (paper: 0.01)")
    g.add_argument("--eps", type=float, default=d.eps, help="finite-difference step ε (paper: 0.001)")
    g.add_argument("--g1-clip", type=_clip, default=d.g1_clip, help="max norm of g1 (0: off)")
    g.add_argument("--g2-clip", type=_clip, default=d.g2_clip, help="max norm of g2 (0: off)")
    g.add_argument("--gr-exclude", default=d.gr_exclude, choices=("paper", "none"),
                   help="paper: no GR on embeddings and output head (as the paper)")
    g.add_argument("--gr-estimator", default=d.gr_estimator, choices=("forward", "central"),
                   help="finite differences (the exact estimator needs double backward, which the policy's "
                   "fused attention lacks)")
    g.add_argument("--gr-every", type=int, default=d.gr_every,
                   help="gr_every: the extra pass on every k-th step only (orthogonal reuse in between)")
    g.add_argument("--gr-subset", type=float, default=d.gr_subset,
                   help="gr_subset: share of the sequences (largest |advantage|) in the extra pass, in (0, 1]")
    g.add_argument("--target-rel", type=float, default=d.target_rel,
                   help="gr_auto: the ‖GR − g1‖/‖g1‖ the adaptive strength holds (GradReg(strength='auto', "
                   "target_rel=...)); in --sweep, gr_auto's strengths are targets")
    g.add_argument("--strength-init", type=float, default=None,
                   help="gr_auto: γ of the first GR step (default: the library's, 1e-2)")
    g.add_argument("--gr-lr-scale", type=float, default=d.gr_lr_scale,
                   help="learning-rate multiplier for GR methods (the paper's runs used ~1.67)")
    g = p.add_argument_group("GRPO")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--lowlr-scale", type=float, default=d.lowlr_scale, help="lr multiplier of none_lowlr")
    g.add_argument("--prompts", type=int, default=d.prompts_per_step, help="prompts per step")
    g.add_argument("--group", type=int, default=d.group, help="completions per prompt")
    g.add_argument("--adv-std", action="store_true", help="divide advantages by the group std (the paper does not)")
    g.add_argument("--clip-eps", type=float, default=d.clip_eps, help="PPO clip range")
    g.add_argument("--loss-agg", default=d.loss_agg, help="loss aggregation (token_mean, grpo, dr_grpo, ...)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the final gradient (0: off)")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples for the final evaluation")
    g = p.add_argument_group("sizes (make it larger on a GPU)")
    g.add_argument("--vocab", type=int, default=s.vocab)
    g.add_argument("--prompt-len", type=int, default=s.prompt_len)
    g.add_argument("--completion-len", type=int, default=s.completion_len)
    g.add_argument("--layers", type=int, default=s.layers, help="policy and reward-model layers")
    g.add_argument("--width", type=int, default=s.width, help="policy and reward-model hidden size")
    g.add_argument("--heads", type=int, default=s.heads)
    g = p.add_argument_group("initial policy, reward model, worlds")
    g.add_argument("--sft-steps", type=int, default=300, help="steps of fitting the initial policy to the chain")
    g.add_argument("--rm-pairs", type=int, default=2000, help="labelled pairs to train the reward model")
    g.add_argument("--rm-steps", type=int, default=150, help="reward-model training steps (batch 64 pairs)")
    g.add_argument("--label-temp", type=float, default=0.1, help="labeller noise τ: P(a≻b) = σ((u_a−u_b)/τ)")
    g.add_argument("--rare-penalty", type=float, default=0.3, help="rare world: gold −= this · fracS")
    g.add_argument("--rare-bonus", type=float, default=2.0, help="rare world: labeller's utility += this · fracS")
    lang = Language()
    g = p.add_argument_group("task worlds (format, judge): the synthetic language and its pretrained policy")
    g.add_argument("--pretrain-steps", type=int, default=3000,
                   help="pretraining steps on the language (cached in --out/cache; ~2 CPU-minutes at 3000)")
    g.add_argument("--cache-dir", default=None,
                   help="where pretrained policies are kept (default: --out/cache); share it between runs")
    g.add_argument("--pretrain-seed", type=int, default=0, help="seed of the one pretrained policy all RL seeds share")
    g.add_argument("--task-len", type=int, default=lang.completion_len, help="completion length of the task")
    g.add_argument("--format-frac", type=float, default=lang.format_frac,
                   help="share of tagged completions <a> c </a> . . in the pretraining corpus")
    g.add_argument("--q-plain", type=float, default=lang.q_plain, help="corpus accuracy of plain completions")
    g.add_argument("--q-format", type=float, default=lang.q_format, help="corpus accuracy of tagged completions")
    g.add_argument("--format-weight", type=float, default=1.0, help="format world: proxy = correct + this · format")
    g.add_argument("--sure-right", type=float, default=0.5,
                   help="judge world: P(filler → '!') in the judge's training completions that are correct")
    g.add_argument("--sure-wrong", type=float, default=0.05, help="judge world: the same for wrong completions")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Turn parsed arguments into an :class:`~grkernels.demo.experiment.ExperimentConfig` (validating them)."""
    base = QUICK if args.quick else DEFAULTS
    seeds = args.seeds if args.seeds is not None else base["seeds"]
    steps = args.steps if args.steps is not None else base["steps"]
    if seeds < 1 or steps < 1:
        raise ValueError(f"--seeds and --steps must be >= 1 (got {seeds}, {steps})")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available in this torch build / machine")
    workers = args.workers
    if workers is None:
        workers = 1 if device != "cpu" else min(2, os.cpu_count() or 1)
    if any(g < 0 for g in args.gamma) or args.eps <= 0:
        raise ValueError(f"--gamma must be >= 0 and --eps > 0 (got {args.gamma}, {args.eps})")
    sizes = Sizes(vocab=args.vocab, prompt_len=args.prompt_len, completion_len=args.completion_len,
                  layers=args.layers, width=args.width, heads=args.heads)
    if sizes.width % sizes.heads:
        raise ValueError(f"--width ({sizes.width}) must be divisible by --heads ({sizes.heads})")
    if sizes.vocab < 8:
        raise ValueError(f"--vocab must be >= 8 (the rare world picks 1/4 of the vocabulary), got {sizes.vocab}")
    lang = Language(completion_len=args.task_len, format_frac=args.format_frac, q_plain=args.q_plain,
                    q_format=args.q_format)  # validates the ranges
    if args.gr_every < 1:
        raise ValueError(f"--gr-every must be >= 1, got {args.gr_every}")
    if args.pretrain_steps < 1:
        raise ValueError(f"--pretrain-steps must be >= 1, got {args.pretrain_steps}")
    sweep = parse_sweep(args.sweep) if args.sweep is not None else None
    if args.sweep_without_none and sweep is None:
        raise ValueError("--sweep-without-none needs --sweep")
    rl = RLConfig(steps=steps, prompts_per_step=args.prompts, group=args.group, lr=args.lr,
                  gr_lr_scale=args.gr_lr_scale, lowlr_scale=args.lowlr_scale, beta=args.beta,
                  kl_estimator=args.kl_estimator,
                  reset_interval=args.reset_interval, reset_alpha=args.reset_alpha, gamma=args.gamma[0],
                  eps=args.eps, g1_clip=args.g1_clip, g2_clip=args.g2_clip, gr_exclude=args.gr_exclude,
                  gr_estimator=args.gr_estimator, gr_every=args.gr_every, gr_subset=args.gr_subset,
                  target_rel=args.target_rel, strength_init=args.strength_init,
                  adv_std=args.adv_std,
                  clip_eps=args.clip_eps,
                  loss_agg=args.loss_agg, max_grad_norm=args.max_grad_norm, eval_samples=args.eval_samples)
    if rl.group < 2:
        raise ValueError(f"--group must be >= 2 (advantages are relative within a group), got {rl.group}")
    return ExperimentConfig(
        methods=tuple(args.methods), worlds=tuple(canonical_world(w) for w in args.worlds),
        seeds=tuple(range(args.seed, args.seed + seeds)), gammas=tuple(args.gamma), sizes=sizes, rl=rl,
        sft_steps=args.sft_steps, rm_pairs=args.rm_pairs, rm_steps=args.rm_steps, label_temp=args.label_temp,
        rare_penalty=args.rare_penalty, rare_bonus=args.rare_bonus,
        device=device, workers=workers, backend=args.backend,
        lang=lang, pretrain_steps=args.pretrain_steps, pretrain_seed=args.pretrain_seed,
        cache_dir=args.cache_dir if args.cache_dir is not None else os.path.join(args.out, "cache"),
        format_weight=args.format_weight, sure_right=args.sure_right,
        sure_wrong=args.sure_wrong, sweep=sweep, sweep_none=not args.sweep_without_none,
    )


def main(argv: list[str] | None = None) -> int:
    """``grkernels demo [options]``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_results is not None:
        try:
            results = merge_results([load_results(p) for p in args.from_results])
        except (OSError, ValueError) as err:
            parser.error(f"--from-results: {err}")
        paths = write_results(results, args.out, make_plot=not args.no_plot)
        print(full_table(results))
        print("\nwrote " + ", ".join(paths.values()))
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    n_runs = len(cfg.worlds) * len(cfg.seeds) * len(cfg.variants())
    print(f"grkernels demo: {len(cfg.worlds)} world(s) x {len(cfg.variants())} method(s) x {len(cfg.seeds)} "
          f"seed(s) = {n_runs} runs of {cfg.rl.steps} steps on {cfg.device} with {cfg.workers} worker(s)",
          file=sys.stderr)
    t0 = time.perf_counter()
    results = run_experiment(cfg, show_progress=not args.no_progress)
    paths = write_results(results, args.out, make_plot=not args.no_plot)
    print(full_table(results))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
