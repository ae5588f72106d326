"""End-to-end GR overhead: time of a GR step over a plain step on a real transformer, per backend and estimator,
and the cheaper modes beside their floors.

    python bench/e2e_overhead.py --device cuda            # a ~110M-parameter model in bf16
    python bench/e2e_overhead.py --device cpu             # CPU-sized (TinyLM 2x128, vocab 512, fp32)
    python bench/e2e_overhead.py --device cpu --every 4 --fractions 0.125,0.25
    (writes bench/results/<device>_overhead.json; --out PATH to choose another file)

A plain step = zero_grad, forward, backward, AdamW step. A GR step (forward estimator) = the same plus a second
forward/backward at θ + ε·g1 and the perturb / restore / combine work; its floor is ~2× for a model whose step time
is forward/backward. "GR math" is the time of the GR-only work (perturb + restore_and_combine) measured alone,
which is what the kernels reduce; reported also as a fraction of the plain step.

Floors of the cheaper modes, each timed as one call in the same round-robin:
    sub-batch f   the plain step + a forward/backward on the subset alone + the GR math (a GR step whose second
                  pass runs on the subset: the work the mode cannot avoid, without its sub-batch bookkeeping and
                  without splitting the first pass in two); beside it the same with the first pass split as the mode
                  splits it (subset, then the rest), which divides the gap into the split's cost and the rest
                  (mark_subset's copy of the subset's g1 and the estimate)
    every-k       one full GR step and k − 1 plain steps, per step (the reuse bookkeeping is what it leaves out)
"gap" = (mode − floor) / plain step: what the mode spends above its floor, in plain steps.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Run, round_robin  # noqa: E402

from grkernels import GradReg, paper_exclude  # noqa: E402
from grkernels.kernels import cpp_loaded  # noqa: E402
from grkernels.quickstart import TinyLM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dim", type=int, default=None, help="default 768 on CUDA, 128 on CPU")
    ap.add_argument("--layers", type=int, default=None, help="default 12 on CUDA, 2 on CPU")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 on CUDA, 512 on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="default 512 on CUDA, 64 on CPU")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default 20 on CUDA, 8 on CPU")
    ap.add_argument("--backends", default=None, help="default torch,triton on CUDA, torch,cpp on CPU")
    ap.add_argument("--every", default="", help="also time every-k GR with orthogonal reuse, e.g. 4,8 (per step, "
                    "averaged over whole k-step cycles)")
    ap.add_argument("--fractions", default="", help="also time the sub-batch second pass on these shares of the "
                    "sequences, e.g. 0.125,0.25 (two-phase: subset backward, mark_subset, rest, perturbed subset)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time, or the process's CPU time "
                    "(a machine shared with other jobs; with --threads 1)")
    ap.add_argument("--variant", default=None, help="suffix of the result file: <device>_overhead_<variant>.json")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>_overhead.json)")
    args = ap.parse_args(argv)
    on_gpu = args.device == "cuda"
    defaults = dict(dim=768, layers=12, vocab=32000, seq=512, dtype="bfloat16", repeats=20,
                    backends="torch,triton") if on_gpu else dict(
        dim=128, layers=2, vocab=512, seq=64, dtype="float32", repeats=8,
        backends="torch,cpp" if cpp_loaded() else "torch")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run("overhead", args.device, argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.layers, max(1, args.dim // 64), args.seq, dropout=0.0)
    model = model.to(args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    base = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def closure(rows: slice = slice(None)):
        """The batch's loss, or the share of it that ``rows`` contribute (their terms over the whole batch)."""
        chunk = ids[rows]
        logits = model(chunk[:, :-1]).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), chunk[:, 1:].reshape(-1), reduction="sum")
        loss = loss / (ids.shape[0] * args.seq)
        loss.backward()
        return loss

    def plain():
        base.zero_grad()
        closure()
        base.step()

    # Every variant is timed round-robin (one call of each per round, medians), so that a machine whose speed
    # drifts (shared cores, turbo) slows all variants alike and the ratios stay meaningful.
    variants: dict[str, object] = {"plain": plain}
    opts: dict[str, GradReg] = {}
    for backend in args.backends.split(","):
        for estimator in ("forward", "central"):
            opt = GradReg(base, strength=0.1, eps=1e-3, eps_mode="absolute", exclude=paper_exclude(model),
                          estimator=estimator, backend=backend)
            opts[f"gr-{estimator}-{backend}"] = opt
            variants[f"gr-{estimator}-{backend}"] = lambda opt=opt: opt.step(closure)
        # The GR-only work alone (perturb + restore_and_combine, no second backward) on g1 of one backward.
        # γ = ε and no clipping keep the repeated combine bounded (grad ← g1 − g1); the same bytes move.
        math_opt = GradReg(base, strength=1e-3, eps=1e-3, eps_mode="absolute", g1_clip=None, g2_clip=None,
                           exclude=paper_exclude(model), backend=backend)

        def gr_math(math_opt=math_opt):
            math_opt.perturb()
            math_opt.restore_and_combine()
            math_opt.restore()  # back to idle without stepping

        variants[f"math-{backend}"] = gr_math
    # The cheaper modes (issue 13), on the auto backend: whole every-k cycles per call (divided by k below), and
    # the sub-batch pass in two phases on the first ⌈f·B⌉ sequences; each beside its floor.
    floor_opt = GradReg(base, strength=0.1, eps=1e-3, eps_mode="absolute", exclude=paper_exclude(model))
    cycles: dict[str, int] = {}
    floors: dict[str, str] = {}  # mode -> its floor's variant
    for k in [int(x) for x in args.every.split(",") if x]:
        opt = GradReg(base, strength=0.1, eps=1e-3, eps_mode="absolute", exclude=paper_exclude(model), every=k,
                      reuse="orthogonal")
        opts[f"every{k}-orthogonal"], cycles[f"every{k}-orthogonal"] = opt, k
        variants[f"every{k}-orthogonal"] = lambda opt=opt, k=k: [opt.step(closure) for _ in range(k)]
        # the floor: one full GR step and k - 1 plain steps (no reuse bookkeeping)
        variants[f"floor-every{k}"] = lambda k=k: [floor_opt.step(closure), *(plain() for _ in range(k - 1))]
        cycles[f"floor-every{k}"], floors[f"every{k}-orthogonal"] = k, f"floor-every{k}"
    for f in [float(x) for x in args.fractions.split(",") if x]:
        m = max(1, math.ceil(f * args.batch))
        opt = GradReg(base, strength=0.1, eps=1e-3, eps_mode="absolute", exclude=paper_exclude(model))

        def sub_batch(opt=opt, m=m):
            opt.zero_grad()
            closure(slice(0, m))
            opt.mark_subset(m / args.batch)
            if m < args.batch:
                closure(slice(m, None))
            opt.perturb()
            closure(slice(0, m))
            opt.step()

        def sub_floor(m=m):
            # the plain step's forward/backward, the GR math, a forward/backward on the subset alone, the step
            floor_opt.zero_grad()
            closure()
            floor_opt.perturb()
            closure(slice(0, m))
            floor_opt.step()

        def sub_floor_split(m=m):
            # the floor with the first pass split as the mode splits it (subset, then the rest): what the split costs
            floor_opt.zero_grad()
            closure(slice(0, m))
            if m < args.batch:
                closure(slice(m, None))
            floor_opt.perturb()
            closure(slice(0, m))
            floor_opt.step()

        opts[f"subset{f:g}"], variants[f"subset{f:g}"] = opt, sub_batch
        variants[f"floor-subset{f:g}"], floors[f"subset{f:g}"] = sub_floor, f"floor-subset{f:g}"
        variants[f"floor-split-subset{f:g}"] = sub_floor_split

    def fresh_g1(name: str) -> None:
        if name.startswith("math-"):
            base.zero_grad()
            closure()  # a fresh g1 (not timed)

    times = round_robin(variants, args.repeats, warmup=2, device=args.device, before=fresh_g1, clock=args.clock)
    per_step = {k: [t / cycles.get(k, 1) for t in v] for k, v in times.items()}
    t_plain = statistics.median(per_step["plain"])
    rows = [{"variant": "plain", "median_s": t_plain, "ratio": 1.0}]
    for name, opt in opts.items():
        t = statistics.median(per_step[name])
        backend = name.split("-", 2)[2] if name.startswith("gr-") else "auto"
        t_math = statistics.median(per_step[f"math-{backend}"]) if name.startswith("gr-forward") else float("nan")
        row = {"variant": name, "median_s": t, "ratio": t / t_plain, "gr_math_s": t_math,
               "gr_math_over_plain": t_math / t_plain, "extra_bytes_per_param": opt.extra_memory_bytes() / n_params}
        if name in floors:
            t_floor = statistics.median(per_step[floors[name]])
            row.update(floor_s=t_floor, floor_ratio=t_floor / t_plain, gap_over_plain=(t - t_floor) / t_plain,
                       gap_over_plain_per_round=statistics.median(
                           (a - b) / p for a, b, p in zip(per_step[name], per_step[floors[name]], per_step["plain"])))
            if f"floor-split-{name}" in per_step:  # the gap in two: splitting the first pass, the sub-batch math
                t_split = statistics.median(per_step[f"floor-split-{name}"])
                row.update(split_floor_s=t_split, split_cost_over_plain=(t_split - t_floor) / t_plain,
                           bookkeeping_over_plain=(t - t_split) / t_plain)
        rows.append(row)
    result = {"params": n_params, "config": vars(args), "rows": rows}
    print(f"{run.header()}\n{n_params / 1e6:.2f}M params, {args.dtype}, batch {args.batch}x{args.seq}")
    print(f"{'variant':<22} {'median ms':>10} {'x plain':>8} {'GR math ms':>11} {'B/param':>8} {'floor':>7} {'gap':>7}")
    for r in rows:
        print(f"{r['variant']:<22} {1e3 * r['median_s']:>10.2f} {r['ratio']:>8.2f} "
              f"{1e3 * r.get('gr_math_s', float('nan')):>11.2f} {r.get('extra_bytes_per_param', 0):>8.2f} "
              f"{r.get('floor_ratio', float('nan')):>7.2f} {r.get('gap_over_plain', float('nan')):>7.3f}")
    run.write(result, args.out, args.variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
