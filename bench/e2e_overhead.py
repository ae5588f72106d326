"""End-to-end GR overhead: time of a GR step over a plain step on a real transformer, per backend and estimator.

    python bench/e2e_overhead.py                          # GPU: a ~110M-parameter model in bf16
    python bench/e2e_overhead.py --dim 128 --layers 2     # CPU-sized
    (writes bench/results/<device>_overhead.json; --out PATH to choose another file)

A plain step = zero_grad, forward, backward, AdamW step. A GR step (forward estimator) = the same plus a second
forward/backward at θ + ε·g1 and the perturb / restore / combine work; its floor is ~2× for a model whose step time
is forward/backward. "GR math" is the time of the GR-only work (perturb + restore_and_combine) measured alone,
which is what the kernels reduce; reported also as a fraction of the plain step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grkernels import GradReg, __version__, paper_exclude  # noqa: E402
from grkernels.kernels import cpp_loaded  # noqa: E402
from grkernels.quickstart import TinyLM  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_result(result: dict, out: str | None, name: str) -> str:
    """Write ``result`` as JSON to ``out``, default ``bench/results/<device>_<name>.json``; returns the path."""
    path = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{result['device']}_{name}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)
    return path


def timer(device: str):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def measure(fn, repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    return measure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dim", type=int, default=768 if cuda else 128)
    ap.add_argument("--layers", type=int, default=12 if cuda else 2)
    ap.add_argument("--vocab", type=int, default=32000 if cuda else 512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512 if cuda else 64)
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=20 if cuda else 8)
    ap.add_argument("--backends", default="torch,triton" if cuda else ("torch,cpp" if cpp_loaded() else "torch"))
    ap.add_argument("--every", default="", help="also time every-k GR with orthogonal reuse, e.g. 4,8 (per step, "
                    "averaged over whole k-step cycles)")
    ap.add_argument("--fractions", default="", help="also time the sub-batch second pass on these shares of the "
                    "sequences, e.g. 0.125,0.25 (two-phase: subset backward, mark_subset, rest, perturbed subset)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>_overhead.json)")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    measure = timer(args.device)
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
            opt = GradReg(base, strength=0.1, eps=1e-3, exclude=paper_exclude(model), estimator=estimator,
                          backend=backend)
            opts[f"gr-{estimator}-{backend}"] = opt
            variants[f"gr-{estimator}-{backend}"] = lambda opt=opt: opt.step(closure)
        # The GR-only work alone (perturb + restore_and_combine, no second backward) on g1 of one backward.
        # γ = ε and no clipping keep the repeated combine bounded (grad ← g1 − g1); the same bytes move.
        math_opt = GradReg(base, strength=1e-3, eps=1e-3, g1_clip=None, g2_clip=None,
                           exclude=paper_exclude(model), backend=backend)

        def gr_math(math_opt=math_opt):
            math_opt.perturb()
            math_opt.restore_and_combine()
            math_opt.restore()  # back to idle without stepping

        variants[f"math-{backend}"] = gr_math
    # The cheaper modes (issue 13), on the auto backend: whole every-k cycles per call (divided by k below), and
    # the sub-batch pass in two phases on the first ⌈f·B⌉ sequences.
    cycles: dict[str, int] = {}
    for k in [int(x) for x in args.every.split(",") if x]:
        opt = GradReg(base, strength=0.1, eps=1e-3, exclude=paper_exclude(model), every=k, reuse="orthogonal")
        opts[f"every{k}-orthogonal"], cycles[f"every{k}-orthogonal"] = opt, k
        variants[f"every{k}-orthogonal"] = lambda opt=opt, k=k: [opt.step(closure) for _ in range(k)]
    for f in [float(x) for x in args.fractions.split(",") if x]:
        m = max(1, math.ceil(f * args.batch))
        opt = GradReg(base, strength=0.1, eps=1e-3, exclude=paper_exclude(model))

        def sub_batch(opt=opt, m=m):
            opt.zero_grad()
            closure(slice(0, m))
            opt.mark_subset(m / args.batch)
            if m < args.batch:
                closure(slice(m, None))
            opt.perturb()
            closure(slice(0, m))
            opt.step()

        opts[f"subset{f:g}"], variants[f"subset{f:g}"] = opt, sub_batch
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(2 + args.repeats):
        for name, fn in variants.items():
            if name.startswith("math-"):
                base.zero_grad()
                closure()  # a fresh g1 (not timed)
            t = measure(fn, 1)[0]
            if r >= 2:  # two warm-up rounds
                times[name].append(t)
    t_plain = statistics.median(times["plain"])
    rows = [{"variant": "plain", "median_s": t_plain, "ratio": 1.0}]
    for name, opt in opts.items():
        t = statistics.median(times[name]) / cycles.get(name, 1)
        backend = name.split("-", 2)[2] if name.startswith("gr-") else "auto"
        t_math = statistics.median(times[f"math-{backend}"]) if name.startswith("gr-forward") else float("nan")
        rows.append({"variant": name, "median_s": t, "ratio": t / t_plain,
                     "gr_math_s": t_math, "gr_math_over_plain": t_math / t_plain,
                     "extra_bytes_per_param": opt.extra_memory_bytes() / n_params})
    result = {
        "benchmark": "e2e_overhead", "grkernels": __version__, "torch": torch.__version__,
        "device": device_name(args.device), "params": n_params, "config": vars(args), "rows": rows,
        "command": "python bench/e2e_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{n_params / 1e6:.1f}M params, {args.dtype}, batch {args.batch}x{args.seq} on {result['device']}")
    print(f"{'variant':<22} {'median ms':>10} {'x plain':>8} {'GR math ms':>11} {'B/param':>8}")
    for r in rows:
        print(f"{r['variant']:<22} {1e3 * r['median_s']:>10.2f} {r['ratio']:>8.2f} "
              f"{1e3 * r.get('gr_math_s', float('nan')):>11.2f} {r.get('extra_bytes_per_param', 0):>8.2f}")
    write_result(result, args.out, "overhead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
