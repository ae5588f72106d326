"""The policy-loss head, forward + backward: time and memory against eager torch, TRL, torch.compile and Liger.

    python bench/ops.py --device cpu                  # 512 tokens x 32k vocab, fp32 -> bench/results/<device>_ops.json
    python bench/ops.py --device cuda                 # 16k tokens x {32k, 152k} vocab, bf16
    python bench/ops.py --device cuda --vocab 32768 --quick
    python bench/ops.py --device cpu --smoke --out /tmp/o.json      # every code path at toy sizes

Three suites on the same inputs per vocabulary size:

``logp_entropy``: chosen-token log-prob + entropy, forward and backward with upstream gradients on both: eager
  torch (full log-softmax, gather, entropy) against grkernels (torch backend = the specification; the C++ kernels on
  CPU; Triton on CUDA).
``logits_head``: the GRPO/DAPO token-level loss with k3 KL from ``logits [B, T, V]``, gradient w.r.t. the logits:
  eager torch written as TRL 1.16 computes it, TRL's own log-prob path (``selective_log_softmax``), torch.compile of
  the eager code (CUDA; on CPU only with ``--compile``: ~40 s of compilation on 2 cores), Liger-Kernel's
  ``triton_grpo_loss`` (CUDA), grkernels (torch backend, C++ on CPU, Triton on CUDA: out of place, in place, with an
  entropy bonus).
``fused_linear``: the LM-head variant (``hidden [N, H] @ W^T``, gradients for hidden and W): materialised logits +
  our loss, materialised + eager, grkernels' ``fused_linear_policy_loss`` (chunked), Liger's
  ``LigerFusedLinearGRPOLoss`` (CUDA).

Time: ``triton.testing.do_bench`` median on CUDA, the median of ``--repeats`` wall-clock calls on CPU, of one
forward + backward (``torch.autograd.grad``, nothing accumulates). Memory: on CUDA the allocator's peak during one
forward + backward minus what was allocated before it (inputs excluded, outputs included); everywhere "saved": the
MiB autograd keeps between forward and backward (unique storages, inputs included). Bytes floor (CUDA): the logits
read once forward, once backward and their gradient written once, ``3·N·V·itemsize`` bytes over the measured copy
bandwidth. Unavailable baselines (not installed, API mismatch, out of memory) are recorded with the reason.
Under TRITON_INTERPRET (CPU) the Triton kernels are a correctness tool, orders of magnitude slower: timed only in
``--smoke`` runs of the CUDA path.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Run  # noqa: E402

BETA, EPS_LOW, EPS_HIGH, TEMP = 0.04, 0.2, 0.28, 1.0
KW = dict(beta=BETA, clip_low=EPS_LOW, clip_high=EPS_HIGH, temperature=TEMP, loss_agg="token_mean")


class Bench:
    """Device, repetitions and the CPU/CUDA differences in timing and memory."""

    def __init__(self, device: str, quick: bool, repeats: int, compile_cpu: bool) -> None:
        self.device, self.quick, self.repeats, self.compile_cpu = device, quick, repeats, compile_cpu
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def bench(self, fn, warmup: int, rep: int, quantiles=None):
        """triton.testing.do_bench on CUDA; the median (and p20/p80) of ``self.repeats`` calls on CPU."""
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles)
        fn()  # warm-up
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if quantiles is None:
            return statistics.median(times)
        qs = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        return [statistics.median(times), qs[1], qs[7]]

    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        """Copy bandwidth in bytes/s (bytes read + bytes written per second)."""
        if not self.cuda:
            nbytes = 1 << 24
        x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device).normal_()
        y = torch.empty_like(x)
        return 2 * nbytes / (self.bench(lambda: y.copy_(x), warmup=50, rep=200) * 1e-3)

    def time_and_memory(self, run, saved) -> dict:
        """Median/p20/p80 ms, the allocator's peak extra memory of one call (CUDA) and what autograd saves."""
        self.free()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if self.cuda else 0
        out = run()
        self.sync()
        peak = torch.cuda.max_memory_allocated() - base if self.cuda else None
        del out
        self.free()
        q = self.bench(run, warmup=3 if self.quick else 10, rep=10 if self.quick else 50, quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], "peak_mib": None if peak is None else peak / 2**20,
                "saved_mib": None if saved is None else saved_mib(saved)}

    def guarded(self, name: str, fn, results: dict) -> None:
        """Run one entry; record a skip (missing package, API mismatch, OOM) instead of failing. ``fn`` returns
        (run, loss_fn or None), a skip reason, or None (not applicable here)."""
        t0 = time.time()
        try:
            got = fn()
            if got is None:
                return
            if isinstance(got, str):
                results[name] = {"skipped": got}
            else:
                run, loss_fn = got if isinstance(got, tuple) else (got, None)
                results[name] = self.time_and_memory(run, loss_fn)
        except torch.cuda.OutOfMemoryError:
            results[name] = {"skipped": "out of memory"}
        except ImportError as e:
            results[name] = {"skipped": f"not importable: {e}"}
        except Exception as e:  # a baseline whose API differs from what this script expects
            results[name] = {"skipped": f"failed: {type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        self.free()
        results.setdefault(name, {})["wall_s"] = round(time.time() - t0, 1)
        r = results[name]
        if "ms" in r:
            mem = f"peak {r['peak_mib']:9.1f} MiB" if r["peak_mib"] is not None else ""
            text = f"{r['ms']:9.3f} ms  {mem}  saved {r['saved_mib'] or 0:8.1f} MiB"
        else:
            text = r.get("skipped", "")
        print(f"  {name:38s} {text}", flush=True)


def saved_mib(loss_fn) -> float:
    """MiB autograd keeps for backward (unique storages, inputs included): what the loss head holds between
    forward and backward (measurable on CPU, where there are no allocator statistics)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(storages.values()) / 2**20


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(b: Bench, n_tokens: int, V: int, seq_len: int, dtype: torch.dtype, extra_position: bool = False):
    import grkernels.ops as ops

    B = max(1, n_tokens // seq_len)
    T = n_tokens // B
    g = torch.Generator(device=b.device).manual_seed(0)
    logits = torch.randn(B, T + int(extra_position), V, device=b.device, dtype=dtype, generator=g) * 2
    ids = torch.randint(0, V, (B, T), device=b.device, generator=g)
    mask = torch.rand(B, T, device=b.device, generator=g) > 0.1
    adv = torch.randn(B, device=b.device, generator=g)
    with torch.no_grad():  # old/ref policies close to the current one, as in training (ratios near 1)
        lp = ops.selective_log_softmax(logits[:, :T], ids, TEMP, backend="torch")
    old = lp + 0.1 * torch.randn(B, T, device=b.device, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, device=b.device, generator=g)
    return logits, ids, mask, adv, old, ref


def trl_epilogue(lp, adv, mask, old, ref):
    """TRL 1.16's token-level loss (bnpo/dapo aggregation over this batch) from per-token log-probs."""
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


def eager_logp_entropy(logits, ids):
    """Eager torch, as TRL-style code writes it: full fp32 log-softmax, gather, entropy from it."""
    logp_all = torch.log_softmax(logits.float(), -1)
    return logp_all.gather(-1, ids[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _grad_runner(loss_fn, logits, *args):
    leaf = logits.detach().requires_grad_()

    def loss():
        return loss_fn(leaf, *args)

    def run():
        return torch.autograd.grad(loss(), leaf)[0]

    return run, loss


def _our_backends(b: Bench, interpreted_triton: bool) -> list[str]:
    """grkernels' backends to time here: torch everywhere, C++ on CPU, Triton on CUDA (and interpreted in smoke runs
    of the CUDA path)."""
    from grkernels.kernels import cpp_loaded

    out = ["torch"]
    if b.cuda or interpreted_triton:
        out.append("triton")
    if not b.cuda and cpp_loaded():
        out.append("cpp")
    return out


# ------------------------------------------------------------------------------------------------ suites
def bench_logp_entropy(b: Bench, n_tokens, V, seq_len, dtype, backends) -> dict:
    import grkernels.ops as ops

    res: dict = {}
    logits, ids = make_inputs(b, n_tokens, V, seq_len, dtype)[:2]
    g = torch.Generator(device=b.device).manual_seed(2)
    g_lp, g_h = (torch.randn(ids.shape, device=b.device, generator=g) for _ in range(2))

    def entry(fn):
        x = logits.detach().requires_grad_()

        def loss():
            lp, h = fn(x, ids)
            return (lp * g_lp + h * g_h).sum()

        return lambda: (lambda: torch.autograd.grad(loss(), x)[0], loss)

    b.guarded("eager_torch", entry(eager_logp_entropy), res)
    for be in backends:
        b.guarded(f"grkernels_{be}", entry(lambda x, i, be=be: ops.logp_and_entropy(x, i, backend=be)), res)
    return res


def bench_logits_head(b: Bench, n_tokens, V, seq_len, dtype, backends) -> dict:
    import grkernels.ops as ops

    res: dict = {}
    logits, ids, mask, adv, old, ref = make_inputs(b, n_tokens, V, seq_len, dtype)

    def ours(backend, **extra):
        def loss(x, i, m, a, o, r):
            return ops.policy_loss(x, i, a, m, old_logp=o, ref_logp=r, backend=backend, **KW, **extra)[0]

        return lambda: _grad_runner(loss, logits, ids, mask, adv, old, ref)

    b.guarded("eager_torch", lambda: _grad_runner(eager_trl, logits, ids, mask, adv, old, ref), res)
    b.guarded("grkernels_torch_backend", ours("torch"), res)
    if "cpp" in backends:
        b.guarded("grkernels_cpp", ours("cpp"), res)

    def compiled():
        if not b.cuda and not b.compile_cpu:
            return "skipped on CPU (inductor's C++ compile takes ~40 s here): --compile includes it"
        fn = torch.compile(eager_trl, dynamic=False)
        run, loss = _grad_runner(fn, logits, ids, mask, adv, old, ref)
        run()  # compile outside the timed region
        return run, loss

    b.guarded("torch_compile", compiled, res)

    def trl_log_softmax():
        from trl.trainer import utils as trl_utils

        if not hasattr(trl_utils, "selective_log_softmax_and_entropy"):
            return _grad_runner(lambda x, i, *a: trl_epilogue(trl_utils.selective_log_softmax(x, i, TEMP), *a),
                                logits, ids, adv, mask, old, ref)

        def loss(x, i, a, m, o, r):
            lp, _ = trl_utils.selective_log_softmax_and_entropy(x, i, entropy_requires_grad=False, temperature=TEMP)
            return trl_epilogue(lp, a, m, o, r)

        return _grad_runner(loss, logits, ids, adv, mask, old, ref)

    b.guarded("trl_selective_log_softmax", trl_log_softmax, res)

    def liger():
        if not b.cuda:
            return None
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        lg = make_inputs(b, n_tokens, V, seq_len, dtype, extra_position=True)[0]  # Liger: unshifted [B, T + 1, V]
        extra = {"inplace": True} if "inplace" in inspect.signature(triton_grpo_loss).parameters else {}

        def loss(x, i, a, m, o, r):
            per_token = triton_grpo_loss(x, o, r, i, a, m, TEMP, BETA, EPS_LOW, EPS_HIGH, **extra)[0]
            mf = m.to(per_token.dtype)
            return (per_token * mf).sum() / mf.sum().clamp(min=1.0)

        return _grad_runner(loss, lg, ids, adv, mask, old, ref)

    b.guarded("liger_triton_grpo_loss", liger, res)
    if "triton" in backends:
        b.guarded("grkernels_triton", ours("triton"), res)
        b.guarded("grkernels_triton_inplace", ours("triton", inplace_backward=True), res)
        b.guarded("grkernels_triton_entropy_bonus", ours("triton", entropy_coef=0.01), res)

    # the fastest path of ours computes the eager gradient (fresh logits: in-place runs overwrote them)
    best = "triton" if "triton" in backends else ("cpp" if "cpp" in backends else "torch")
    f = make_inputs(b, n_tokens, V, seq_len, dtype)
    g_ref = _grad_runner(eager_trl, *f)[0]()
    x = f[0].detach().clone().requires_grad_()
    g = torch.autograd.grad(ops.policy_loss(x, f[1], f[3], f[2], f[4], f[5], backend=best, **KW)[0], x)[0]
    res["check"] = {"backend": best, "max_abs_grad_diff_vs_eager": (g.float() - g_ref.float()).abs().max().item(),
                    "max_abs_grad": g_ref.float().abs().max().item()}
    return res


def bench_fused_linear(b: Bench, n_tokens, V, H, seq_len, dtype, chunk) -> dict:
    import grkernels.ops as ops

    res: dict = {}
    g = torch.Generator(device=b.device).manual_seed(1)
    _, ids, mask, adv, old, ref = make_inputs(b, n_tokens, 8, seq_len, dtype)  # tiny logits: only the rest is used
    ids = torch.randint(0, V, ids.shape, device=b.device, generator=g)
    B, T = ids.shape
    hidden = (torch.randn(B, T, H, device=b.device, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=b.device, generator=g) / H**0.5).to(dtype).requires_grad_()

    def runner(loss_fn):
        return lambda: (lambda: torch.autograd.grad(loss_fn(), (hidden, weight)), loss_fn)

    b.guarded("materialised_grkernels", runner(lambda: ops.policy_loss(
        hidden @ weight.t(), ids, adv, mask, old, ref, inplace_backward=b.cuda, backend="auto", **KW)[0]), res)
    b.guarded("materialised_eager_torch", runner(lambda: eager_trl(hidden @ weight.t(), ids, mask, adv, old, ref)),
              res)
    for fp32_acc, tag in ((True, ""), (False, "_bf16_dW")):
        if not fp32_acc and dtype == torch.float32:
            continue  # the same path as the fp32 accumulation
        for c in sorted({chunk, max(chunk // 4, 8)}, reverse=True):
            b.guarded(f"grkernels_fused_linear_chunk{c}{tag}", runner(
                lambda c=c, fp32_acc=fp32_acc: ops.fused_linear_policy_loss(
                    hidden, weight, None, ids, adv, mask, old, ref, chunk_size=c, fp32_grad_weight=fp32_acc,
                    backend="auto", **KW)[0]), res)

    def liger():
        if not b.cuda:
            return None
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        params = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
        cfg = {k: v for k, v in dict(beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="bnpo",
                                     temperature=TEMP, use_ref_model=True).items() if k in params}
        mod = LigerFusedLinearGRPOLoss(**cfg)
        fwd = inspect.signature(mod.forward).parameters
        if "selected_token_ids" not in fwd:
            return f"unsupported LigerFusedLinearGRPOLoss.forward signature: {list(fwd)}"

        def loss():
            out = mod(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out

        return runner(loss)()

    b.guarded("liger_fused_linear_grpo", liger, res)
    return res


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=None, help="default: 16384 on CUDA, 512 on CPU")
    ap.add_argument("--vocab", type=int, nargs="+", default=None, help="default: 32768 152064 on CUDA, 32000 on CPU")
    ap.add_argument("--hidden", type=int, default=None, help="LM-head suite; default 4096 on CUDA, 256 on CPU")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    ap.add_argument("--chunk", type=int, default=None, help="token chunk of the fused-linear path (4096 / 128)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per entry (median)")
    ap.add_argument("--suites", default="logp_entropy,logits_head,fused_linear")
    ap.add_argument("--compile", action="store_true", help="CPU: include torch.compile (~40 s to compile here)")
    ap.add_argument("--quick", action="store_true", help="CUDA: fewer repetitions")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, every code path (the CUDA path runs on CPU "
                    "with Triton interpreted; torch.compile skipped); numbers meaningless, write with --out")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>_ops.json)")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not cuda and not args.smoke:
        raise SystemExit("ops.py --device cuda needs a CUDA device (--device cpu times the CPU paths; --smoke "
                         "checks the code paths)")
    defaults = dict(tokens=16384, vocab=[32768, 152064], hidden=4096, seq_len=1024, chunk=4096, dtype="bfloat16") \
        if gpu else dict(tokens=512, vocab=[32000], hidden=256, seq_len=128, chunk=128, dtype="float32")
    if args.smoke:
        defaults = dict(tokens=32, vocab=[40, 75], hidden=16, seq_len=16, chunk=8, dtype="float32")
        args.repeats, args.quick = 2, True
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = "cuda" if gpu and cuda else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (smoke runs only)
    run = Run("ops", device, argv)
    b = Bench(device, args.quick, args.repeats, args.compile)
    dtype = getattr(torch, args.dtype)
    backends = _our_backends(b, gpu and args.smoke)
    bw = b.copy_bandwidth()
    b.free()
    print(f"{run.header()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write); ours: {backends}")
    report = {"config": vars(args), "backends": backends, "copy_bandwidth_GBps": bw / 1e9,
              "loss": f"token-level PPO-clip (eps {EPS_LOW}/{EPS_HIGH}) + {BETA} * k3 KL, token mean", "results": {}}
    suites = args.suites.split(",")
    for V in args.vocab:
        floor_bytes = 3 * args.tokens * V * torch.empty((), dtype=dtype).element_size()
        floor_ms = floor_bytes / bw * 1e3
        print(f"\nV = {V}: bytes floor {floor_bytes / 2**30:.3f} GiB -> {floor_ms:.3f} ms")
        entry = {"bytes_floor_GiB": floor_bytes / 2**30, "floor_ms": floor_ms}
        if "logp_entropy" in suites:
            print("  -- log-prob + entropy")
            entry["logp_entropy"] = bench_logp_entropy(b, args.tokens, V, args.seq_len, dtype, backends)
        if "logits_head" in suites:
            print("  -- policy loss from logits")
            entry["logits_head"] = bench_logits_head(b, args.tokens, V, args.seq_len, dtype, backends)
        if "fused_linear" in suites:
            print(f"  -- LM head, H = {args.hidden}")
            entry["fused_linear"] = bench_fused_linear(b, args.tokens, V, args.hidden, args.seq_len, dtype,
                                                       args.chunk)
        head = entry.get("logits_head", {})
        ours = head.get("grkernels_triton_inplace", head.get("grkernels_cpp", {})).get("ms")
        if ours:
            summary = {"ours_over_floor": ours / floor_ms}
            for base in ("eager_torch", "torch_compile", "liger_triton_grpo_loss", "trl_selective_log_softmax"):
                if "ms" in head.get(base, {}):
                    summary[f"speedup_vs_{base}"] = head[base]["ms"] / ours
            fl = entry.get("fused_linear", {})
            fused = fl.get(f"grkernels_fused_linear_chunk{args.chunk}", {}).get("peak_mib")
            for base in ("materialised_grkernels", "materialised_eager_torch"):
                mat = fl.get(base, {}).get("peak_mib")
                if mat and fused:
                    summary[f"fused_linear_peak_over_{base}"] = fused / mat
            entry["summary"] = summary
            print("  summary:", {k: round(v, 3) for k, v in summary.items()})
        report["results"][str(V)] = entry
        b.free()
    run.write(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
