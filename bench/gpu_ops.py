"""GPU benchmark of the policy-loss head: forward + backward time and peak memory, against the bytes floor.

    python bench/gpu_ops.py                         # 16k tokens x {32k, 152k} vocab, bf16
    python bench/gpu_ops.py --vocab 32768 --quick   # one vocab, fewer repetitions

Logits head (``logits [B, T, V]`` bf16 -> GRPO/DAPO token-level loss with k3 KL, gradient w.r.t. logits):
  eager torch (TRL 1.16's formulas, grkernels' torch backend), torch.compile of the same, TRL's own fused
  log-prob/entropy path (``trl.trainer.utils.selective_log_softmax_and_entropy``), Liger-Kernel's
  ``triton_grpo_loss`` (in place), grkernels' Triton kernels (out of place, in place, with an entropy bonus).
LM-head variant (``hidden [N, H] @ W^T``, gradients for hidden and W): materialised logits + our kernel,
  materialised + eager, grkernels' ``fused_linear_policy_loss``, Liger's ``LigerFusedLinearGRPOLoss``.

Bytes floor: the logits are read once forward, once backward and their gradient written once:
``3 * N * V * itemsize`` bytes over the device-to-device copy bandwidth measured here (``copy_`` of a
1 GiB buffer: read + write bytes / time). Time: ``triton.testing.do_bench`` median (ms) of one forward +
backward (``torch.autograd.grad``, nothing accumulates). Peak memory: ``torch.cuda.max_memory_allocated``
during one forward + backward minus what was allocated before it (inputs excluded, outputs included).
Unavailable baselines (not installed, API mismatch, out of memory) are recorded with the reason and skipped.
Writes ``bench/results/<device-name>_ops.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grkernels.ops as ops  # noqa: E402

BETA, EPS_LOW, EPS_HIGH, TEMP = 0.04, 0.2, 0.28, 1.0
# "cuda" for real runs; "cpu" only for --smoke (a tiny run of every code path, Triton in its interpreter)
DEV = {"name": "cuda"}


# ------------------------------------------------------------------------------------------------ helpers
def _cuda() -> bool:
    return DEV["name"] == "cuda"


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _bench(fn, warmup: int, rep: int, quantiles=None):
    """triton.testing.do_bench on CUDA; a plain wall-clock loop on CPU (smoke runs only)."""
    if _cuda():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[1], times[0], times[2]] if quantiles else times[1]


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    if not _cuda():
        nbytes = 1 << 24
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV["name"]).normal_()
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x), warmup=50, rep=200)
    return 2 * nbytes / (ms * 1e-3)  # the buffers are freed on return (the caller empties the cache)


def time_and_memory(run, quick: bool) -> dict:
    """Median/p20/p80 ms via do_bench, and the peak extra memory of one call (MiB)."""
    _free()
    _sync()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if _cuda() else 0
    out = run()
    _sync()
    peak = torch.cuda.max_memory_allocated() - base if _cuda() else None  # no allocator stats on CPU
    del out
    _free()
    q = _bench(run, warmup=3 if quick else 10, rep=10 if quick else 50, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], "peak_mib": None if peak is None else peak / 2**20}


def guarded(name: str, fn, results: dict, quick: bool) -> None:
    """Run one benchmark entry; record skips (missing package, API mismatch, OOM) instead of failing."""
    t0 = time.time()
    try:
        run = fn()
        if run is None:
            return
        if isinstance(run, str):  # a skip reason
            results[name] = {"skipped": run}
        else:
            results[name] = time_and_memory(run, quick)
    except torch.cuda.OutOfMemoryError:
        results[name] = {"skipped": "out of memory"}
    except ImportError as e:
        results[name] = {"skipped": f"not importable: {e}"}
    except Exception as e:  # a baseline whose API differs from what this script expects
        results[name] = {"skipped": f"failed: {type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    _free()
    results.setdefault(name, {})["wall_s"] = round(time.time() - t0, 1)
    print(f"  {name:32s} {_fmt(results[name])}", flush=True)


def _fmt(r: dict) -> str:
    if "ms" in r:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:9.1f} MiB"
        return f"{r['ms']:8.3f} ms  peak {peak}"
    return r.get("skipped", "")


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(n_tokens: int, V: int, seq_len: int, dtype: torch.dtype, extra_position: bool = False):
    B = max(1, n_tokens // seq_len)
    T = n_tokens // B
    g = torch.Generator(device=DEV["name"]).manual_seed(0)
    logits = torch.randn(B, T + int(extra_position), V, device=DEV["name"], dtype=dtype, generator=g) * 2
    ids = torch.randint(0, V, (B, T), device=DEV["name"], generator=g)
    mask = torch.rand(B, T, device=DEV["name"], generator=g) > 0.1
    adv = torch.randn(B, device=DEV["name"], generator=g)
    with torch.no_grad():  # old/ref policies close to the current one, as in training (ratios near 1)
        lp = ops.selective_log_softmax(logits[:, :T], ids, TEMP)
    old = lp + 0.1 * torch.randn(B, T, device=DEV["name"], generator=g)
    ref = lp + 0.1 * torch.randn(B, T, device=DEV["name"], generator=g)
    return logits, ids, mask, adv, old, ref


def trl_epilogue(lp, adv, mask, old, ref):
    """TRL 1.16 token-level loss (bnpo/dapo aggregation over this batch) from per-token log-probs."""
    m = mask.to(lp.dtype)
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    d = ref - lp
    per_token = per_token + BETA * (torch.exp(d) - d - 1)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def eager_trl(logits, ids, mask, adv, old, ref):
    logp_all = torch.log_softmax(logits.float() / TEMP, -1)
    lp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    return trl_epilogue(lp, adv, mask, old, ref)


def _grad_runner(loss_fn, logits, *args):
    leaf = logits.requires_grad_()

    def run():
        loss = loss_fn(leaf, *args)
        return torch.autograd.grad(loss, leaf)[0]

    return run


# ------------------------------------------------------------------------------------------------ suites
def bench_logits_head(n_tokens, V, seq_len, dtype, quick, check) -> dict:
    res: dict = {}
    logits, ids, mask, adv, old, ref = make_inputs(n_tokens, V, seq_len, dtype)
    kw = dict(beta=BETA, clip_low=EPS_LOW, clip_high=EPS_HIGH, temperature=TEMP, loss_agg="token_mean")

    def ours(backend, **extra):
        def loss(x, i, m, a, o, r):
            return ops.policy_loss(x, i, a, m, old_logp=o, ref_logp=r, backend=backend, **kw, **extra)[0]

        return lambda: _grad_runner(loss, logits, ids, mask, adv, old, ref)

    guarded("eager_torch", lambda: _grad_runner(eager_trl, logits, ids, mask, adv, old, ref), res, quick)
    guarded("grkernels_torch_backend", ours("torch"), res, quick)

    def compiled():
        if not _cuda():
            return "skipped on CPU smoke runs (inductor's C++ compile takes minutes here)"
        fn = torch.compile(eager_trl, dynamic=False)
        run = _grad_runner(fn, logits, ids, mask, adv, old, ref)
        run()  # compile outside the timed region
        return run

    guarded("torch_compile", compiled, res, quick)

    def trl_fused():
        from trl.trainer import utils as trl_utils

        if not hasattr(trl_utils, "selective_log_softmax_and_entropy"):
            from trl.trainer.utils import selective_log_softmax

            return _grad_runner(
                lambda x, i, *a: trl_epilogue(selective_log_softmax(x, i, TEMP), *a), logits, ids, adv, mask, old, ref
            )

        def loss(x, i, a, m, o, r):
            lp, _ = trl_utils.selective_log_softmax_and_entropy(x, i, entropy_requires_grad=False, temperature=TEMP)
            return trl_epilogue(lp, a, m, o, r)

        return _grad_runner(loss, logits, ids, adv, mask, old, ref)

    guarded("trl_selective_log_softmax", trl_fused, res, quick)

    def liger():
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        # Liger takes the unshifted logits [B, T + 1, V]
        lg, *_ = make_inputs(n_tokens, V, seq_len, dtype, extra_position=True)
        params = inspect.signature(triton_grpo_loss).parameters
        extra = {"inplace": True} if "inplace" in params else {}

        def loss(x, i, a, m, o, r):
            out = triton_grpo_loss(x, o, r, i, a, m, TEMP, BETA, EPS_LOW, EPS_HIGH, **extra)
            per_token = out[0]
            mf = m.to(per_token.dtype)
            return (per_token * mf).sum() / mf.sum().clamp(min=1.0)

        return _grad_runner(loss, lg, ids, adv, mask, old, ref)

    guarded("liger_triton_grpo_loss", liger, res, quick)
    guarded("grkernels_triton", ours("triton"), res, quick)
    guarded("grkernels_triton_inplace", ours("triton", inplace_backward=True), res, quick)
    guarded("grkernels_triton_entropy_bonus", ours("triton", entropy_coef=0.01), res, quick)

    if check:  # the fast path computes the eager gradient (on fresh logits: in-place runs overwrote them)
        fresh = make_inputs(n_tokens, V, seq_len, dtype)
        g_ref = _grad_runner(eager_trl, *fresh)()
        x = fresh[0].detach().clone().requires_grad_()
        f = fresh
        loss = ops.policy_loss(x, f[1], f[3], f[2], f[4], f[5], backend="triton", **kw)[0]
        g = torch.autograd.grad(loss, x)[0]
        res["check_max_abs_grad_diff_vs_eager"] = (g.float() - g_ref.float()).abs().max().item()
        res["check_max_abs_grad"] = g_ref.float().abs().max().item()
    return res


def bench_fused_linear(n_tokens, V, H, seq_len, dtype, quick, chunk) -> dict:
    res: dict = {}
    g = torch.Generator(device=DEV["name"]).manual_seed(1)
    _, ids, mask, adv, old, ref = make_inputs(n_tokens, 8, seq_len, dtype)  # tiny logits: only the rest is used
    ids = torch.randint(0, V, ids.shape, device=DEV["name"], generator=g)
    B, T = ids.shape
    hidden = (torch.randn(B, T, H, device=DEV["name"], generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEV["name"], generator=g) / H**0.5).to(dtype).requires_grad_()
    kw = dict(beta=BETA, clip_low=EPS_LOW, clip_high=EPS_HIGH, temperature=TEMP, loss_agg="token_mean")

    def runner(loss_fn):
        def run():
            return torch.autograd.grad(loss_fn(), (hidden, weight))

        return run

    guarded(
        "materialised_grkernels_triton_inplace",
        lambda: runner(
            lambda: ops.policy_loss(
                hidden @ weight.t(), ids, adv, mask, old, ref, inplace_backward=True, backend="triton", **kw
            )[0]  # fmt: skip
        ),
        res,
        quick,
    )
    guarded(
        "materialised_eager_torch",
        lambda: runner(lambda: eager_trl(hidden @ weight.t(), ids, mask, adv, old, ref)),
        res,
        quick,
    )
    for fp32_acc, tag in ((True, ""), (False, "_bf16_dW")):
        for c in sorted({chunk, max(chunk // 4, 256)}, reverse=True):
            guarded(
                f"grkernels_fused_linear_chunk{c}{tag}",
                lambda c=c, fp32_acc=fp32_acc: runner(
                    lambda: ops.fused_linear_policy_loss(
                        hidden, weight, None, ids, adv, mask, old, ref, chunk_size=c, fp32_grad_weight=fp32_acc,
                        backend="triton", **kw,
                    )[0]
                ),
                res,
                quick,
            )  # fmt: skip

    def liger():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        params = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
        cfg = {k: v for k, v in dict(beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="bnpo",
                                     temperature=TEMP, use_ref_model=True).items() if k in params}  # fmt: skip
        mod = LigerFusedLinearGRPOLoss(**cfg)
        fwd = inspect.signature(mod.forward).parameters
        if "selected_token_ids" not in fwd:
            return f"unsupported LigerFusedLinearGRPOLoss.forward signature: {list(fwd)}"

        def loss():
            out = mod(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out

        return runner(loss)

    guarded("liger_fused_linear_grpo", liger, res, quick)
    return res


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 152064])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=4096, help="token chunk of the fused-linear path")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--skip-fused-linear", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>_ops.json)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, runs on CPU without a GPU (Triton interpreter; torch.compile skipped): checks the script",
    )
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.vocab, args.hidden, args.seq_len, args.chunk, args.quick = 32, [40, 75], 16, 16, 8, True
        if not torch.cuda.is_available():
            DEV["name"] = "cpu"
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
            args.dtype = "float32"  # the CPU interpreter path of the test suite
        if args.out is None:
            args.out = str(Path(tempfile.gettempdir()) / "grkernels_gpu_ops_smoke.json")
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu_ops.py needs a CUDA device (use bench/bench_ops.py on CPU, or --smoke)")
    import triton

    dtype = getattr(torch, args.dtype)
    dev_name = torch.cuda.get_device_name() if _cuda() else f"cpu-smoke-{platform.machine()}"
    bw = measure_copy_bandwidth()
    _free()
    print(f"{dev_name}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    report = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "copy_bandwidth_GBps": bw / 1e9,
        "loss": f"token-level PPO-clip (eps {EPS_LOW}/{EPS_HIGH}) + {BETA} * k3 KL, token mean",
        "results": {},
    }
    for V in args.vocab:
        elt = torch.empty((), dtype=dtype).element_size()
        floor_bytes = 3 * args.tokens * V * elt
        floor_ms = floor_bytes / bw * 1e3
        print(f"\nV = {V}: bytes floor {floor_bytes / 2**30:.2f} GiB -> {floor_ms:.3f} ms")
        entry = {"bytes_floor_GiB": floor_bytes / 2**30, "floor_ms": floor_ms}
        entry["logits_head"] = bench_logits_head(args.tokens, V, args.seq_len, dtype, args.quick, check=True)
        _free()
        if not args.skip_fused_linear:
            print(f"  -- LM head, H = {args.hidden}")
            entry["fused_linear"] = bench_fused_linear(
                args.tokens, V, args.hidden, args.seq_len, dtype, args.quick, args.chunk
            )
            _free()
        head = entry["logits_head"]
        ours = head.get("grkernels_triton_inplace", {}).get("ms")
        if ours:
            summary = {"ours_over_floor": ours / floor_ms}
            for base in ("eager_torch", "torch_compile", "liger_triton_grpo_loss", "trl_selective_log_softmax"):
                if "ms" in head.get(base, {}):
                    summary[f"speedup_vs_{base}"] = head[base]["ms"] / ours
            fl = entry.get("fused_linear", {})
            fused = fl.get(f"grkernels_fused_linear_chunk{args.chunk}", {}).get("peak_mib")
            for base in ("materialised_grkernels_triton_inplace", "materialised_eager_torch"):
                mat = fl.get(base, {}).get("peak_mib")
                if mat and fused:
                    summary[f"fused_linear_peak_over_{base}"] = fused / mat
            entry["summary"] = summary
            print("  summary:", json.dumps({k: round(v, 3) for k, v in summary.items()}))
        report["results"][str(V)] = entry
    safe_name = re.sub(r"[^A-Za-z0-9]+", "_", dev_name).strip("_")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{safe_name}_ops.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
