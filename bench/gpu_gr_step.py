"""GPU benchmark of the GR-step math on a 1B-shaped parameter set: our Triton kernels vs foreach vs a loop.

    PYTHONPATH=. python bench/gpu_gr_step.py [--layers 22] [--out bench/results/<device>_gr_step.json]
    PYTHONPATH=. python bench/gpu_gr_step.py --smoke --out /tmp/smoke.json   # no GPU: code paths only

Parameter set shaped like TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, 4 KV heads of 64, vocab 32000):
201 tensors, 1.10e9 parameters, bf16 parameters with fp32 gradient buffers (``main_grad``) and with bf16
gradients. One measured step = perturb (point 0) + restore_and_combine, forward estimator, clipping on.

Reported per implementation and dtype mix: time (ms, ``triton.testing.do_bench``, median), bytes moved per
parameter by the fused path (its minimum traffic), achieved bandwidth = bytes / time, the ratio to the measured
device-to-device copy bandwidth (a large ``copy_``, read + write counted), and extra memory per parameter (the
backend's own buffers, and the peak allocator growth during a step). Writes JSON to
``bench/results/<device>_gr_step.json``. Targets (issue 3): ≥ 85% of copy bandwidth, ≥ 3x foreach, ≥ 20x the
loop, ≤ 6 B/param.

Bytes per parameter of the fused path (P = param bytes, G = grad bytes, S = saved-g1 bytes):
    norm of g1: G;  perturb: read G + P, write S + P (saved θ) + P (θ') + G (zero);  norm of g2: G;
    combine: read G + S + P, write P + G            → 6G + 2S + 5P in all (``fused_bytes``):
    42 B for bf16 params with fp32 grads, 26 B with bf16 grads.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


def tinyllama_shapes(layers: int = 22, hidden: int = 2048, inter: int = 5632, kv: int = 256, vocab: int = 32000):
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def make_set(shapes, p_dtype, g_dtype, device):
    params, grads = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for s in shapes:
        p = torch.empty(s, device=device, dtype=p_dtype).normal_(0.0, 0.02, generator=gen)
        g = torch.empty(s, device=device, dtype=g_dtype).normal_(0.0, 1e-4, generator=gen)
        p.main_grad = g  # fp32 gradient buffers next to bf16 params; the Triton backend reads this attribute
        params.append(p)
        grads.append(g)
    return params, grads


def fused_bytes(p_bytes: int, g_bytes: int, s_bytes: int) -> int:
    norm1 = g_bytes
    perturb = (g_bytes + p_bytes) + (s_bytes + p_bytes + p_bytes + g_bytes)
    norm2 = g_bytes
    combine = (g_bytes + s_bytes + p_bytes) + (p_bytes + g_bytes)
    return norm1 + perturb + norm2 + combine


def time_ms(fn, device, rep: int = 50) -> float:
    """Median time of ``fn`` in ms: triton.testing.do_bench on CUDA, a wall-clock loop in --smoke mode."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=3, rep=rep)
    import time

    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, n: int = 1 << 29) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted); 2**29 fp16 elements: two 1 GiB
    buffers, far beyond any cache."""
    a = torch.empty(n, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, rep=200)
    return 2 * n * 2 / (ms * 1e-3)


def bench_one(name, params, grads, device, eps=1e-3, gamma=1e-2):
    from baselines_gr_step import ForeachGRStep, LoopGRStep

    from grkernels.backends.base import StepPlan

    if name in ("triton", "triton-nearest"):
        from grkernels.backends.triton import TritonGRStep

        impl = TritonGRStep(device, grad_attr="main_grad")
        rounding = "nearest" if name == "triton-nearest" else "stochastic"
        plan = StepPlan(params=params, coefs=[gamma] * len(params), eps=eps, rounding=rounding)

        def step():
            impl.perturb(plan, 0)
            impl.restore_and_combine(plan)
    else:
        impl = (ForeachGRStep if name == "foreach" else LoopGRStep)(eps, gamma)

        def step():
            impl.perturb(params, grads)
            impl.combine(params, grads)

    cuda = device.type == "cuda"
    with torch.no_grad():
        step()  # compile / allocate
        sync(device)
        base = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
        ms = time_ms(step, device, rep=50 if name != "loop" else 10)
    n = sum(p.numel() for p in params)
    return {"ms": ms, "extra_bytes_per_param": impl.extra_bytes() / n, "peak_growth_bytes_per_param": peak / n}


def check_restore_bitwise(params, device):
    """Sanity on the device: θ is bitwise restored and the kernels compile for every path."""
    from grkernels.backends.base import StepPlan
    from grkernels.backends.triton import TritonGRStep

    small = [p[:3] if p.dim() == 1 else p[:3, :5].contiguous() for p in params[:4]]
    for p in small:
        p.main_grad = torch.randn_like(p, dtype=torch.float32)
    before = [p.clone() for p in small]
    for est in ("forward", "central"):
        impl = TritonGRStep(device, grad_attr="main_grad")
        plan = StepPlan(params=small, coefs=[1.0] * len(small), eps=1e-1, estimator=est)
        impl.perturb(plan, 0)
        if est == "central":
            impl.perturb(plan, 1)
        impl.restore_and_combine(plan)
    sync(device)
    return all(torch.equal(a, b) for a, b in zip(small, before))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--impls", default="triton,triton-nearest,foreach,loop")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: run every code path on tiny shapes on CPU (Triton interpreted), numbers meaningless")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        device, dev_name = torch.device("cpu"), "cpu-smoke"
        shapes = tinyllama_shapes(1, hidden=64, inter=96, kv=16, vocab=100)
        copy_bw = copy_bandwidth(device, n=1 << 20)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_gr_step.py needs a CUDA device (--smoke checks the code paths on CPU)")
        device = torch.device("cuda")
        dev_name = torch.cuda.get_device_name(device)
        shapes = tinyllama_shapes(args.layers)
        copy_bw = copy_bandwidth(device)
    results = {"device": dev_name, "torch": torch.__version__, "n_tensors": len(shapes),
               "copy_bandwidth_GBps": copy_bw / 1e9, "mixes": {}}
    import triton

    results["triton"] = triton.__version__
    print(f"{dev_name}: copy bandwidth {copy_bw / 1e9:.0f} GB/s, {len(shapes)} tensors")
    for mix, (pd, gd) in {"bf16 params, fp32 grads": (torch.bfloat16, torch.float32),
                          "bf16 params, bf16 grads": (torch.bfloat16, torch.bfloat16)}.items():
        params, grads = make_set(shapes, pd, gd, device)
        n = sum(p.numel() for p in params)
        if not results.get("restore_bitwise_checked"):
            results["restore_bitwise_checked"] = check_restore_bitwise(params, device)
        pb, gb = params[0].element_size(), grads[0].element_size()
        nbytes = fused_bytes(pb, gb, gb)
        row = {"params": n, "fused_bytes_per_param": nbytes, "impls": {}}
        for name in args.impls.split(","):
            r = bench_one(name, params, grads, device)
            r["achieved_GBps"] = nbytes * n / (r["ms"] * 1e-3) / 1e9
            r["fraction_of_copy_bw"] = r["achieved_GBps"] * 1e9 / copy_bw
            row["impls"][name] = r
            print(f"  {mix:24s} {name:15s} {r['ms']:9.2f} ms  {r['achieved_GBps']:7.0f} GB/s "
                  f"({100 * r['fraction_of_copy_bw']:5.1f}% of copy)  extra {r['extra_bytes_per_param']:.2f} B/param"
                  f"  peak +{r['peak_growth_bytes_per_param']:.2f} B/param")
        t = row["impls"].get("triton", {}).get("ms")
        if t:
            row["speedup_vs_foreach"] = row["impls"].get("foreach", {}).get("ms", float("nan")) / t
            row["speedup_vs_loop"] = row["impls"].get("loop", {}).get("ms", float("nan")) / t
        results["mixes"][mix] = row
        params = grads = None  # free before the next mix
        if device.type == "cuda":
            torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "_", dev_name.lower()).strip("_")
    out = Path(args.out or Path(__file__).parent / "results" / f"{slug}_gr_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
