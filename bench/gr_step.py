"""The GR-step math (perturb + restore_and_combine, forward estimator, clipping on) on a parameter set: our backends
against a ``torch._foreach`` implementation and a per-parameter loop, and against the device's copy bandwidth.

    python bench/gr_step.py --device cpu                    # -> bench/results/<device>_gr_step.json
    python bench/gr_step.py --device cuda                   # TinyLlama-1.1B-shaped set, 22 layers
    python bench/gr_step.py --device cpu --smoke --out /tmp/s.json   # every code path at toy sizes

CPU (2.63M parameters, transformer-shaped: 2 layers of hidden 256, MLP 688, vocab 2048): the torch backend
(``TorchGRStep``, the specification), the C++ kernels (``CppGRStep``, what ``backend="auto"`` picks on CPU), the
loop and foreach baselines below; bf16 and fp32 (parameters and gradients alike; stochastic-rounding rows ``-sr``
for bf16, GradReg's default there) and bf16 parameters with fp32 gradient buffers (``main_grad``: the baselines
only, the torch and C++ backends read ``.grad`` of the parameter dtype). All timed round-robin in one run (one call
of each per round, each from the same g1, medians). Bandwidth: each C++ pass timed alone, its bytes (what it must
read and write, from the dtypes) over its time, against ``Tensor.copy_`` of the same bytes timed alternately with it
(same footprint, so both see the same caches); a 256 MiB copy gives the DRAM figure.

CUDA (TinyLlama-1.1B-shaped: hidden 2048, MLP 5632, 22 layers, 4 KV heads of 64, vocab 32000; 201 tensors, 1.10e9
parameters; bf16 parameters with fp32 ``main_grad`` and with bf16 gradients): the Triton kernels (stochastic and
nearest rounding), foreach, loop; ``triton.testing.do_bench`` medians; bytes moved by the fused path over time
against a 1 GiB device copy; extra memory per parameter (the backend's buffers, and the allocator's peak growth in
a step); a bitwise-restore check on the device. Targets (issue 3): >= 85% of copy bandwidth, >= 3x foreach, >= 20x
the loop, <= 6 B/param. Fused-path bytes per parameter (P param, G grad, S saved-g1 bytes): 6G + 2S + 5P, i.e.
42 B for bf16 params with fp32 grads, 26 B with bf16 grads.

The baselines, for this benchmark only, take explicit ``params`` and ``grads`` lists, with g = grads:

    perturb:  n1 = ‖g‖, s1 = min(1, c1/(n1 + 1e-6)); save θ and g1; θ ← rn(θ + ε·s1·g1); g ← 0
    combine:  n2 = ‖g‖, s2 = ...; θ ← saved θ; g ← g1 + (γ/ε)·(s2·g − s1·g1)

``ForeachGRStep``: ``torch._foreach_*`` ops, device-side scalars (no host sync), an fp32 temporary per pass: what a
careful PyTorch implementation without custom kernels does. ``LoopGRStep``: a per-parameter Python loop in the
style of the public reference implementation (fp32 copies of g1 and the perturbed weights, a full parameter clone,
norms read back with ``.item()``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Run, round_robin  # noqa: E402

EPS, GAMMA = 1e-3, 1e-2


# ------------------------------------------------------------------------------------------------ baselines
def _clip(norm: torch.Tensor, c: float | None) -> torch.Tensor:
    return torch.ones_like(norm) if c is None else torch.clamp(c / (norm + 1e-6), max=1.0)


class _Baseline:
    """What both baselines keep: the settings, the saved θ and g1 (their extra memory)."""

    def __init__(self, eps: float, gamma: float, g1_clip: float | None = 10.0, g2_clip: float | None = 10.0):
        self.eps, self.gamma, self.g1_clip, self.g2_clip = eps, gamma, g1_clip, g2_clip
        self.theta: list[torch.Tensor] = []
        self.g1: list[torch.Tensor] = []

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.theta + self.g1)


class ForeachGRStep(_Baseline):
    """The GR step with ``torch._foreach`` ops (one kernel per op per dtype group, roughly)."""

    @staticmethod
    def _norm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(ts), 2, dtype=torch.float32)))

    def perturb(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if len(self.theta) != len(params):
            self.theta = [torch.empty_like(p) for p in params]
            self.g1 = [torch.empty_like(g) for g in grads]
        self.s1 = _clip(self._norm(grads), self.g1_clip)
        torch._foreach_copy_(self.theta, params)
        torch._foreach_copy_(self.g1, grads)
        delta = torch._foreach_mul([g.float() for g in grads], self.s1 * self.eps)  # fp32 temporaries
        torch._foreach_add_(delta, [p.float() for p in params])
        torch._foreach_copy_(params, delta)  # rounds to the parameter dtype
        torch._foreach_zero_(grads)

    def combine(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        s2 = _clip(self._norm(grads), self.g2_clip)
        torch._foreach_copy_(params, self.theta)
        a = torch._foreach_mul([g.float() for g in grads], s2)
        b = torch._foreach_mul([g.float() for g in self.g1], self.s1)
        torch._foreach_sub_(a, b)
        torch._foreach_mul_(a, self.gamma / self.eps)
        torch._foreach_add_(a, [g.float() for g in self.g1])
        torch._foreach_copy_(grads, a)


class LoopGRStep(_Baseline):
    """The GR step as a per-parameter loop with host reads, like the public reference implementation."""

    def _scale(self, grads: list[torch.Tensor], c: float | None) -> float:
        norm = sum(float(g.float().norm()) ** 2 for g in grads) ** 0.5  # one host read per tensor
        return 1.0 if c is None else min(1.0, c / (norm + 1e-6))

    def perturb(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.g1 = [g.detach().float().clone() for g in grads]
        self.s1 = self._scale(grads, self.g1_clip)
        self.theta = [p.detach().clone() for p in params]
        for p, g in zip(params, self.g1):
            p.copy_((p.float() + self.eps * self.s1 * g).to(p.dtype))
        for g in grads:
            g.zero_()

    def combine(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        s2 = self._scale(grads, self.g2_clip)
        for p, t, g, g1 in zip(params, self.theta, grads, self.g1):
            p.copy_(t)
            g.copy_(g1 + (self.gamma / self.eps) * (s2 * g.float() - self.s1 * g1))


# ------------------------------------------------------------------------------------------------ parameter sets
def small_shapes(hidden: int = 256, inter: int = 688, layers: int = 2, vocab: int = 2048) -> list[tuple]:
    """The CPU set: 2.63M parameters in a transformer's shapes (embedding, per layer 4 attention + 3 MLP matrices
    and 2 norms, final norm, head)."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return shapes + [(hidden,), (vocab, hidden)]


def tinyllama_shapes(layers: int = 22, hidden: int = 2048, inter: int = 5632, kv: int = 256, vocab: int = 32000):
    """The GPU set: TinyLlama-1.1B's shapes."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def make_set(shapes, p_dtype: torch.dtype, g_dtype: torch.dtype, device: str, g_scale: float = 1e-3):
    """Parameters N(0, 0.02) and gradients N(0, g_scale²); ``p.main_grad`` is the gradient buffer (the Triton
    backend's ``grad_attr``), ``p.grad`` too where the dtypes agree."""
    gen = torch.Generator(device=device).manual_seed(0)
    params, grads = [], []
    for s in shapes:
        p = torch.empty(s, device=device, dtype=p_dtype).normal_(0.0, 0.02, generator=gen)
        g = torch.empty(s, device=device, dtype=g_dtype).normal_(0.0, g_scale, generator=gen)
        if g_dtype == p_dtype:
            p.grad = g
        p.main_grad = g
        params.append(p)
        grads.append(g)
    return params, grads


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


def fused_bytes(p_bytes: int, g_bytes: int, s_bytes: int) -> int:
    """Bytes per parameter of the fused GPU path (norm g1, perturb, norm g2, combine)."""
    return g_bytes + (g_bytes + p_bytes) + (s_bytes + p_bytes + p_bytes + g_bytes) + g_bytes + \
        (g_bytes + s_bytes + p_bytes) + (p_bytes + g_bytes)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second (read + write) of dst.copy_(src) for buffers of nbytes / 2 each (median of repeats)."""
    n = max(1, nbytes // 2)
    src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    dst.copy_(src)
    return 2 * n / statistics.median(_time(lambda: dst.copy_(src)) for _ in range(repeats))


# ------------------------------------------------------------------------------------------------ CPU
def run_cpu(args) -> dict:
    from grkernels.backends.base import StepPlan
    from grkernels.backends.reference import TorchGRStep
    from grkernels.kernels import cpp_loaded

    shapes = small_shapes(layers=1, hidden=32, inter=48, vocab=64) if args.smoke else small_shapes()
    rows = []
    for mix, (pd, gd) in {"bf16": (torch.bfloat16,) * 2, "fp32": (torch.float32,) * 2,
                          "bf16-fp32grad": (torch.bfloat16, torch.float32)}.items():
        params, grads = make_set(shapes, pd, gd, "cpu")
        n = sum(p.numel() for p in params)
        calls, impls = {}, {}
        if pd == gd:  # the torch and C++ backends read .grad, of the parameter dtype
            plan = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=EPS, rounding="nearest")
            impls["torch-backend"] = TorchGRStep()
            if cpp_loaded():
                from grkernels.backends.cpp import CppGRStep

                impls["cpp"] = CppGRStep()
            for name, b in impls.items():
                calls[name] = lambda b=b: (b.perturb(plan, 0), b.restore_and_combine(plan))
            if pd == torch.bfloat16:  # GradReg's default rounding for bf16 weights: stochastic
                sr = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=EPS, rounding="stochastic")
                for name in list(impls):
                    b = type(impls[name])()
                    calls[f"{name}-sr"] = lambda b=b: (b.perturb(sr, 0), b.restore_and_combine(sr))
        for name, cls in (("loop", LoopGRStep), ("foreach", ForeachGRStep)):
            b = cls(EPS, GAMMA)
            calls[name] = lambda b=b: (b.perturb(params, grads), b.combine(params, grads))
        g_orig = [g.clone() for g in grads]

        def fresh(_name: str = "") -> None:
            # every timed call starts from the same g1 (not timed): repeated combines would otherwise drive the
            # gradients to overflow or the corrections into denormals, neither of which a training step sees
            torch._foreach_copy_(grads, g_orig)

        with torch.no_grad():
            times = round_robin(calls, args.repeats, warmup=1, before=fresh)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"mix": mix, "params": n, "median_s": med}
        if "cpp" in impls:
            row.update(cpp_bandwidth(impls["cpp"], params, grads, g_orig, fresh, pd, gd, args.repeats))
            row["cpp_speedup_over"] = {k: med[k] / med["cpp"] for k in med if not k.startswith("cpp")}
            if "cpp-sr" in med:
                row["cpp_sr_speedup_over_torch_sr"] = med["torch-backend-sr"] / med["cpp-sr"]
            row["step_GBps"] = row["step_bytes"] / med["cpp"] / 1e9
            row["step_of_copy"] = row["step_bytes"] / med["cpp"] / cpu_copy_bandwidth(row["step_bytes"], args.repeats)
        rows.append(row)
        print(f"[{mix}] {n / 1e6:.2f}M params: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items()))
        for k, v in row.get("passes", {}).items():
            print(f"   {k:<9} {1e3 * v['median_s']:6.2f} ms  {v['GBps']:5.1f} GB/s  copy {v['copy_GBps']:5.1f} GB/s"
                  f"  = {100 * v['of_copy']:.0f}%")
    dram = cpu_copy_bandwidth((1 << 20) if args.smoke else 256 * 2**20, max(3, args.repeats // 5))
    print(f"256 MiB copy: {dram / 1e9:.1f} GB/s")
    return {"set": "small", "dram_copy_GBps_256MiB": dram / 1e9, "rows": rows}


def cpp_bandwidth(cpp, params, grads, g_orig, fresh, pd, gd, repeats: int) -> dict:
    """Each C++ pass alone (the calls CppGRStep makes), its bytes over its time against a paired copy."""
    from grkernels.kernels.cpp_gr_step import ops

    n = sum(p.numel() for p in params)
    w, g = [p.detach() for p in params], [p.grad for p in params]
    one, yes, step = torch.ones(()), torch.tensor(True), torch.tensor(0.0)
    passes = {
        "sumsq_g1": lambda: ops().gr_sumsq(g, [], 0, False),
        "perturb": lambda: ops().gr_perturb(w, g, cpp._theta, cpp._g1, [], step, yes, 0, 0, 0, 0, None, False),
        "sumsq_g2": lambda: ops().gr_sumsq(g, [], 0, False),
        "combine": lambda: ops().gr_combine(w, g, cpp._theta, cpp._g1, [], [GAMMA / EPS] * len(w), one, one, 0,
                                            False, False),
    }
    nbytes = pass_bytes(n, pd, gd)
    out = {}
    with torch.no_grad():
        for name, fn in passes.items():
            half = max(1, nbytes[name] // 2)
            src, dst = torch.ones(half, dtype=torch.uint8), torch.empty(half, dtype=torch.uint8)
            ts, tc = [], []
            for _ in range(repeats + 1):
                fresh()
                if name == "combine":  # as after a second backward: g2 in the buffers, g1 saved
                    torch._foreach_copy_(cpp._g1, g_orig)
                    torch._foreach_mul_(grads, 1.01)
                ts.append(_time(fn))
                tc.append(_time(lambda: dst.copy_(src)))
            t, t_copy = statistics.median(ts[1:]), statistics.median(tc[1:])
            bw, copy_bw = nbytes[name] / t, 2 * half / t_copy
            out[name] = {"median_s": t, "bytes": nbytes[name], "GBps": bw / 1e9, "copy_GBps": copy_bw / 1e9,
                         "of_copy": bw / copy_bw}
    return {"passes": out, "step_bytes": sum(nbytes.values())}


# ------------------------------------------------------------------------------------------------ CUDA
def time_ms(fn, device: torch.device, rep: int = 50) -> float:
    """Median ms of ``fn``: triton.testing.do_bench on CUDA, a 3-call wall-clock median otherwise (smoke runs)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=3, rep=rep)
    return 1e3 * sorted(_time(fn) for _ in range(3))[1]


def gpu_copy_bandwidth(device: torch.device, n: int = 1 << 29) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write); 2**29 fp16 elements: two 1 GiB buffers."""
    a = torch.empty(n, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    return 2 * n * 2 / (time_ms(lambda: b.copy_(a), device, rep=200) * 1e-3)


def bench_one(name: str, params, grads, device: torch.device) -> dict:
    from grkernels.backends.base import StepPlan

    if name in ("triton", "triton-nearest"):
        from grkernels.backends.triton import TritonGRStep

        impl = TritonGRStep(device, grad_attr="main_grad")
        rounding = "nearest" if name == "triton-nearest" else "stochastic"
        plan = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=EPS, rounding=rounding)

        def step():
            impl.perturb(plan, 0)
            impl.restore_and_combine(plan)
    else:
        impl = (ForeachGRStep if name == "foreach" else LoopGRStep)(EPS, GAMMA)

        def step():
            impl.perturb(params, grads)
            impl.combine(params, grads)

    cuda = device.type == "cuda"
    with torch.no_grad():
        step()  # compile / allocate
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        step()
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
        ms = time_ms(step, device, rep=50 if name != "loop" else 10)
    n = sum(p.numel() for p in params)
    return {"ms": ms, "extra_bytes_per_param": impl.extra_bytes() / n, "peak_growth_bytes_per_param": peak / n}


def check_restore_bitwise(params, device: torch.device) -> bool:
    """θ is bitwise restored on the device, and the kernels compile for every path."""
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    return all(torch.equal(a, b) for a, b in zip(small, before))


def run_cuda(args, device: torch.device) -> dict:
    import triton

    if args.smoke:
        shapes = tinyllama_shapes(1, hidden=64, inter=96, kv=16, vocab=100)
    else:
        shapes = tinyllama_shapes(args.layers)
    copy_bw = gpu_copy_bandwidth(device, n=1 << 20 if args.smoke else 1 << 29)
    results = {"set": "tinyllama", "triton": triton.__version__, "n_tensors": len(shapes),
               "copy_bandwidth_GBps": copy_bw / 1e9, "mixes": {}}
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s, {len(shapes)} tensors")
    for mix, (pd, gd) in {"bf16 params, fp32 grads": (torch.bfloat16, torch.float32),
                          "bf16 params, bf16 grads": (torch.bfloat16, torch.bfloat16)}.items():
        params, grads = make_set(shapes, pd, gd, str(device), g_scale=1e-4)
        n = sum(p.numel() for p in params)
        if "restore_bitwise_checked" not in results:
            results["restore_bitwise_checked"] = check_restore_bitwise(params, device)
        nbytes = fused_bytes(params[0].element_size(), grads[0].element_size(), grads[0].element_size())
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
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=30, help="CPU: rounds of the round-robin")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=22, help="CUDA: layers of the TinyLlama-shaped set")
    ap.add_argument("--impls", default="triton,triton-nearest,foreach,loop", help="CUDA: implementations")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, every code path (CUDA path on CPU: Triton "
                    "interpreted); numbers meaningless, write with --out")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>_gr_step.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit("gr_step.py --device cuda needs a CUDA device (--smoke checks the code paths on CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    run = Run("gr_step", "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu", argv)
    print(run.header())
    if args.device == "cuda":
        result = run_cuda(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        result = run_cpu(args)
    run.write({"config": vars(args), **result}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
