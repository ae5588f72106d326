"""The GR-step math on CPU: the C++ kernels against the torch reference, the per-parameter loop, foreach ops,
and against this machine's copy bandwidth.

    .venv/bin/python bench/cpu_gr_step.py                  # writes bench/results/<device>_cpu_gr_step.json
    .venv/bin/python bench/cpu_gr_step.py --repeats 40 --threads 2

One GR step's math = perturb + restore_and_combine (the forward estimator; no second backward) on the
2.63M-parameter transformer-shaped set of ``bench_gr_step.py``, clipping on (the default 10, inactive for these
gradients). Implementations, timed round-robin in one run (one call of each per round, medians):

    torch-backend  ``TorchGRStep``, the specification (``GradReg(backend="torch")``); all rows round to nearest,
                   the ``-sr`` rows (bf16) stochastically, GradReg's default for low-precision weights
    cpp            ``CppGRStep``, csrc/gr_step.cpp (``GradReg(backend="cpp")``, what "auto" picks on CPU)
    loop           a reference-style per-parameter loop (bench/baselines_gr_step.py)
    foreach        the same math in torch._foreach ops (bench/baselines_gr_step.py)

Bandwidth: each C++ pass is timed alone and its bytes (what it must read and write, from the dtypes) divided by
its time, against the bandwidth of ``torch.Tensor.copy_`` moving the same number of bytes (a copy of half the
pass's bytes: the same footprint, so both see the same caches; a 256 MiB copy gives the DRAM figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines_gr_step import ForeachGRStep, LoopGRStep  # noqa: E402
from bench_gr_step import EPS, GAMMA, make_set  # noqa: E402
from e2e_overhead import device_name, write_result  # noqa: E402

from grkernels import __version__  # noqa: E402
from grkernels.backends.base import StepPlan
from grkernels.backends.cpp import CppGRStep  # noqa: E402
from grkernels.backends.reference import TorchGRStep  # noqa: E402

MIXES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _size(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()


def pass_bytes(n: int, p: torch.dtype, g: torch.dtype) -> dict[str, int]:
    """Bytes each pass of the forward estimator must move for n parameters (param dtype p, grad dtype g)."""
    P, G = _size(p), _size(g)
    return {
        "sumsq_g1": n * G,  # read g
        "perturb": n * (G + P + P + G + P + G),  # read g, θ; write θs, g1s, θ', g (zeros)
        "sumsq_g2": n * G,
        "combine": n * (P + G + G + P + G),  # read θs, g1s, g2; write θ, g
    }


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second (read + write) of dst.copy_(src) for buffers of nbytes / 2 each (median of repeats)."""
    n = max(1, nbytes // 2)
    src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    dst.copy_(src)
    return 2 * n / statistics.median(_time(lambda: dst.copy_(src)) for _ in range(repeats))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, usually the cores)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = torch.ops.grkernels_cpp
    rows = []
    for mix, dt in MIXES.items():
        params, grads = make_set(dt, dt)
        n = sum(p.numel() for p in params)
        plan = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=EPS, rounding="nearest")
        impls = {"torch-backend": TorchGRStep(), "cpp": CppGRStep()}
        calls = {name: (lambda b=b: (b.perturb(plan, 0), b.restore_and_combine(plan))) for name, b in impls.items()}
        if dt == torch.bfloat16:  # GradReg's default rounding for bf16 weights: stochastic (Philox per 4 elements)
            sr_plan = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=EPS, rounding="stochastic")
            for name, b in (("torch-backend-sr", TorchGRStep()), ("cpp-sr", CppGRStep())):
                calls[name] = lambda b=b: (b.perturb(sr_plan, 0), b.restore_and_combine(sr_plan))
        for name, cls in (("loop", LoopGRStep), ("foreach", ForeachGRStep)):
            b = cls(EPS, GAMMA)
            calls[name] = lambda b=b: (b.perturb(params, grads), b.combine(params, grads))
        g_orig = [g.clone() for g in grads]

        def fresh() -> None:
            # every timed call starts from the same g1 (not timed): repeated combines would otherwise drive the
            # gradients to overflow or the corrections into denormals, neither of which a training step sees
            torch._foreach_copy_(grads, g_orig)

        times: dict[str, list[float]] = {k: [] for k in calls}
        with torch.no_grad():
            for fn in calls.values():
                fresh()
                fn()  # warm-up: buffers allocated
            for _ in range(args.repeats):
                for name, fn in calls.items():
                    fresh()
                    times[name].append(_time(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        # the C++ passes alone (the same calls CppGRStep makes), bytes over time against a like-for-like copy
        cpp = impls["cpp"]
        w, g = [p.detach() for p in params], [p.grad for p in params]
        one, yes, step = torch.ones(()), torch.tensor(True), torch.tensor(0.0)
        passes = {
            "sumsq_g1": lambda: ops.gr_sumsq(g, [], 0, False),
            "perturb": lambda: ops.gr_perturb(w, g, cpp._theta, cpp._g1, [], step, yes, 0, 0, 0, 0, None, False),
            "sumsq_g2": lambda: ops.gr_sumsq(g, [], 0, False),
            "combine": lambda: ops.gr_combine(w, g, cpp._theta, cpp._g1, [], [GAMMA / EPS] * len(w), one, one, 0,
                                              False, False),
        }
        nbytes = pass_bytes(n, dt, dt)
        pass_rows = {}
        for name, fn in passes.items():
            # the pass and a copy of the same bytes, alternately (paired: a machine whose speed drifts moves both)
            half = max(1, nbytes[name] // 2)
            src, dst = torch.ones(half, dtype=torch.uint8), torch.empty(half, dtype=torch.uint8)
            ts, tc = [], []
            for _ in range(args.repeats + 1):
                fresh()
                if name == "combine":  # as after a second backward: g2 in the buffers, g1 saved
                    torch._foreach_copy_(cpp._g1, g_orig)
                    torch._foreach_mul_(grads, 1.01)
                ts.append(_time(fn))
                tc.append(_time(lambda: dst.copy_(src)))
            t, t_copy = statistics.median(ts[1:]), statistics.median(tc[1:])
            bw, copy_bw = nbytes[name] / t, 2 * half / t_copy
            pass_rows[name] = {"median_s": t, "bytes": nbytes[name], "GBps": bw / 1e9, "copy_GBps": copy_bw / 1e9,
                               "of_copy": bw / copy_bw}
        total_bytes = sum(nbytes.values())
        step_bw = total_bytes / med["cpp"]
        rows.append({
            "mix": mix, "params": n, "median_s": med,
            "cpp_speedup_over": {k: med[k] / med["cpp"] for k in med if not k.startswith("cpp")},
            "cpp_sr_speedup_over_torch_sr": med.get("torch-backend-sr", float("nan")) / med.get("cpp-sr", float("nan")),
            "passes": pass_rows,
            "step_bytes": total_bytes, "step_GBps": step_bw / 1e9,
            "step_of_copy": step_bw / copy_bandwidth(total_bytes, args.repeats),
        })  # fmt: skip
    dram = copy_bandwidth(256 * 2**20, max(3, args.repeats // 5))
    result = {
        "benchmark": "cpu_gr_step", "grkernels": __version__, "torch": torch.__version__,
        "device": device_name("cpu"), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "dram_copy_GBps_256MiB": dram / 1e9, "rows": rows,
        "command": "python bench/cpu_gr_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    print(f"{result['device']}, {result['threads']} threads; 256 MiB copy: {dram / 1e9:.1f} GB/s")
    for r in rows:
        m = r["median_s"]
        timing = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in m.items())
        print(f"[{r['mix']}] {r['params'] / 1e6:.2f}M params: {timing}")
        print("   cpp speed-up over: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["cpp_speedup_over"].items())
              + f"; stochastic rounding: {r['cpp_sr_speedup_over_torch_sr']:.2f}x")
        print(f"   whole step {r['step_GBps']:.1f} GB/s = {100 * r['step_of_copy']:.0f}% of copy")
        for k, v in r["passes"].items():
            print(f"   {k:<9} {1e3 * v['median_s']:6.2f} ms  {v['GBps']:5.1f} GB/s  copy {v['copy_GBps']:5.1f} GB/s"
                  f"  = {100 * v['of_copy']:.0f}%")
    write_result(result, args.out, "cpu_gr_step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
