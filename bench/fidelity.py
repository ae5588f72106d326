"""Fidelity of the GR Hessian-vector estimate: which ε (and estimator, rounding) to use with bf16 weights.

For a small Llama (random init N(0, 0.02), weights on the bf16 grid, LM cross-entropy on random tokens) this
compares, over an ε sweep, the correction each GR-step variant produces with the float64 double-backprop H·v
at the same weights (v = g1, clipping off):

    estimate = (GR gradient − g1) / γ        (γ large so that bf16 rounding of the result costs nothing)
    cos = <estimate, H·v> / (‖estimate‖‖H·v‖)        rel = ‖estimate − H·v‖ / ‖H·v‖

Variants: fp32 weights (the ideal, and the ``lean`` Triton mode that saves g1 in bf16), bf16 weights with the
forward and central estimators, each with round-to-nearest and stochastic rounding, and the exact estimator
(double backprop in bf16, no ε). ``perturb_ratio`` = ‖θ' − θ‖/‖ε·v‖ as the backend reports it.

    python bench/fidelity.py --device cpu           # CPU, a few minutes; -> bench/results/<device>_fidelity.json
    python bench/fidelity.py --device cpu --quick   # 3 values of ε, 1 seed
    python bench/fidelity.py --device cpu --fsdp2   # FSDP2, 2 gloo processes (below); -> ..._fidelity_fsdp2.json

The torch backend is the specification and is what runs here by default; ``--backend triton`` runs the same
sweep through the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1: slow). Rows marked [triton] always use
the Triton backend (the lean option exists only there; the other row checks the kernels' own stochastic
rounding); without Triton they are skipped, and on CPU (interpreted) they run at ε ∈ {1e-4, 1e-3, 1e-2} only
(``--full-triton`` for all).

``--fsdp2``: the same model, batch and float64 reference, trained as verl does: fp32 sharded parameters,
``fully_shard`` per decoder layer and at the root, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, 2
processes (gloo; the script starts them with torch.distributed.run unless already under torchrun), each holding
half of the batch. FSDP2 casts the fp32 shards to bf16 with round-to-nearest before the all-gather; GradReg writes
SR(rn_bf16(θ) + ε·v) into the fp32 shard (bf16-exact, so the cast keeps it) and restores the shard bitwise. Rows:
fp32 masters on the bf16 grid and off it (moved by N(0, 1e-4), as after optimizer steps), forward/central,
stochastic/nearest rounding, with ``perturb_ratio`` = ‖θ' − rn_bf16(θ)‖/‖ε·v‖; cos / rel against the float64 H·g1
at rn_bf16(θ). ``--memory-only``: GradReg's extra bytes per rank only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

# Triton rows on CPU tensors need the interpreter on before the FIRST `import triton` in the process (triton.language
# builds its own @jit helpers at import, compiled or interpreted): if something imported triton earlier with the
# interpreter off (another benchmark run in the same process, or grkernels' own "is triton installed?" check),
# setting the variable now is too late, and the [triton] rows fail inside the kernels.
_TRITON_TOO_EARLY = (not torch.cuda.is_available() and "triton" in sys.modules
                     and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Run  # noqa: E402

EPS_SWEEP = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
INTERPRETED_EPS = (1e-4, 1e-3, 1e-2)  # [triton] rows under TRITON_INTERPRET (CPU) run only these
GAMMA = 1e4


def make_model(seed: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, attn_implementation="eager", tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
            p.copy_(p.to(torch.bfloat16).float())  # on the bf16 grid, as after loading a bf16 checkpoint
    return model.to(device=device, dtype=dtype).eval()


def batch(seed: int, device: str):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 512, (8, 48), generator=g).to(device)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts])


def reference_hv(seed: int, device: str):
    """float64 double backprop: H·g1 at the bf16-grid weights, g1 in float64."""
    model = make_model(seed, torch.float64, device)
    ids = batch(seed, device)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss_of(model, ids), params, create_graph=True)
    v = [g.detach() for g in grads]
    hv = torch.autograd.grad(grads, params, grad_outputs=v)
    return flat(hv), float(flat(v).norm())


def make_backend(name: str, device: str, lean: bool = False):
    from grkernels.backends.reference import TorchGRStep

    if name == "torch" and not lean:
        return TorchGRStep()
    from grkernels.backends.triton import TritonGRStep

    return TritonGRStep(device, lean=lean)


def gr_estimate(seed, dtype, estimator, rounding, eps, backend, device, lean=False, eps_mode="absolute",
                loss_scale=1.0):
    """(estimate of H·g1 as a flat float64 vector, perturb_ratio) for one variant. ``loss_scale`` multiplies the
    loss (so g1 by s and H·g1 by s²): how a setting behaves when the gradient's scale changes."""
    from grkernels.backends.base import StepPlan

    model = make_model(seed, dtype, device)
    ids = batch(seed, device)
    params = list(model.parameters())

    def loss_fn(m, i):
        return loss_of(m, i) * loss_scale if loss_scale != 1.0 else loss_of(m, i)

    if estimator == "exact":
        grads = torch.autograd.grad(loss_fn(model, ids), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads])
        return flat(hv), 1.0
    impl = make_backend(backend, device, lean)
    model.zero_grad(set_to_none=True)
    loss_fn(model, ids).backward()
    g1 = flat(p.grad for p in params)
    plan = StepPlan(params=params, coefs=[GAMMA] * len(params), eps=eps, g1_clip=None, g2_clip=None,
                    estimator=estimator, rounding=rounding, seed=seed, eps_mode=eps_mode)
    for point in range(2 if estimator == "central" else 1):
        with torch.no_grad():
            impl.perturb(plan, point)
        loss_fn(model, ids).backward()
    with torch.no_grad():
        impl.restore_and_combine(plan)
    est = (flat(p.grad for p in params) - g1) / GAMMA
    return est, float(impl.metrics["perturb_ratio"])


LOSS_SCALES = (0.1, 1.0, 10.0)
SCALE_SETTINGS = [  # (label, estimator, eps, eps_mode)
    ("forward, ε = 1e-3 absolute (paper)", "forward", 1e-3, "absolute"),
    ("forward, ε = 0.02 radius", "forward", 2e-2, "radius"),
    ("central, ε = 1e-3 absolute", "central", 1e-3, "absolute"),
    ("central, ε = 0.01 radius", "central", 1e-2, "radius"),
]


def scale_sweep(seeds, refs, backend: str, device: str) -> list[dict]:
    """cos/rel of fixed settings as the loss (so the gradient) is scaled: absolute ε vs eps_mode='radius'."""
    rows = []
    for label, est_name, eps, mode in SCALE_SETTINGS:
        row = {"variant": label, "estimator": est_name, "eps": eps, "eps_mode": mode, "scale": {}}
        for sc in LOSS_SCALES:
            cs, rs = [], []
            for s in seeds:
                est, _ = gr_estimate(s, torch.bfloat16, est_name, "stochastic", eps, backend, device,
                                     eps_mode=mode, loss_scale=sc)
                c, r = cos_rel(est, refs[s] * sc * sc)  # H·g1 scales with s²
                cs.append(c)
                rs.append(r)
            row["scale"][f"{sc:g}"] = {"cos": sum(cs) / len(cs), "rel": sum(rs) / len(rs)}
        rows.append(row)
    return rows


def seed_mean(runs) -> dict:
    """Mean over seeds of cos / rel error against the reference and of the perturbation ratio; ``runs`` yields
    ((estimate, perturb_ratio), reference) per seed."""
    vals = [(*cos_rel(est, ref), ratio) for (est, ratio), ref in runs]
    return {k: sum(v[j] for v in vals) / len(vals) for j, k in enumerate(("cos", "rel", "perturb_ratio"))}


def cos_rel(est: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    cos = float(est @ ref / (est.norm() * ref.norm()).clamp_min(1e-300))
    rel = float((est - ref).norm() / ref.norm())
    return cos, rel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 values of ε, 1 seed")
    ap.add_argument("--smoke", action="store_true", help="the code paths only: ε = 1e-2, 1 seed, 2 rows, no exact row, "
                    "no scale sweep; write with --out")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-lean", action="store_true", help="skip the lean (Triton) rows")
    ap.add_argument("--full-triton", action="store_true", help="[triton] rows at every ε, also interpreted")
    ap.add_argument("--no-scale-sweep", action="store_true", help="skip the gradient-scale table (eps_mode)")
    ap.add_argument("--fsdp2", action="store_true", help="FSDP2 with bf16 mixed precision on 2 gloo processes")
    ap.add_argument("--memory-only", action="store_true", help="--fsdp2: GradReg's extra bytes per rank only")
    ap.add_argument("--nproc", type=int, default=2, help="--fsdp2: processes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.no_scale_sweep = args.no_lean = True
    if args.fsdp2:
        return main_fsdp2(args, argv)
    run = Run("fidelity", args.device, argv)
    interpreted = args.device == "cpu"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    eps_list = [1e-2] if args.smoke else [1e-3, 3e-3, 1e-2] if args.quick else EPS_SWEEP
    seeds = list(range(1 if args.quick or args.smoke else args.seeds))

    from grkernels.kernels import triton_usable

    if interpreted and _TRITON_TOO_EARLY:
        why = ("triton was imported in this process before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
               "CPU tensors here; run bench/fidelity.py in a process of its own (grkernels bench does)")
        if args.backend == "triton":
            raise SystemExit(f"fidelity.py --backend triton: {why}")
        print(f"[triton] rows skipped: {why}", file=sys.stderr)
    lean_ok = not args.no_lean and triton_usable(args.device) and not (interpreted and _TRITON_TOO_EARLY)
    variants = [  # (label, dtype, estimator, rounding, lean, backend)
        ("fp32 weights, forward", torch.float32, "forward", "nearest", False, args.backend),
    ]
    if lean_ok:
        variants.append(("fp32 weights, forward, lean (g1 saved in bf16) [triton]", torch.float32, "forward",
                         "nearest", True, "triton"))
    variants += [
        ("bf16, forward, nearest", torch.bfloat16, "forward", "nearest", False, args.backend),
        ("bf16, forward, stochastic", torch.bfloat16, "forward", "stochastic", False, args.backend),
        ("bf16, central, nearest", torch.bfloat16, "central", "nearest", False, args.backend),
        ("bf16, central, stochastic", torch.bfloat16, "central", "stochastic", False, args.backend),
    ]
    if lean_ok and args.backend == "torch":  # the kernels' own stochastic rounding (a different RNG stream)
        variants.append(("bf16, forward, stochastic [triton]", torch.bfloat16, "forward", "stochastic", False,
                         "triton"))
    if args.smoke:  # the code paths: one fp32 and one bf16 row
        variants = [v for v in variants if v[0] in ("fp32 weights, forward", "bf16, forward, stochastic")]
    t0 = time.time()
    refs, g1_norms = {}, []
    for s in seeds:
        refs[s], g1n = reference_hv(s, args.device)
        g1_norms.append(g1n)
    rows = []
    for label, dtype, est_name, rounding, lean, backend in variants:
        row = {"variant": label, "estimator": est_name, "rounding": rounding, "lean": lean, "backend": backend,
               "weights": str(dtype).replace("torch.", ""), "eps": {}}
        for eps in eps_list:
            if backend == "triton" and interpreted and not args.full_triton and eps not in INTERPRETED_EPS:
                continue  # the interpreter is slow: a few ε are enough to check the kernels
            row["eps"][f"{eps:g}"] = seed_mean(
                (gr_estimate(s, dtype, est_name, rounding, eps, backend, args.device, lean), refs[s]) for s in seeds
            )
        rows.append(row)
    if not args.smoke:
        ex_c, ex_r = zip(*(cos_rel(gr_estimate(s, torch.bfloat16, "exact", "nearest", 0.0, args.backend,
                                               args.device)[0], refs[s]) for s in seeds))
        rows.append({"variant": "bf16, exact (double backprop, no ε)", "estimator": "exact", "rounding": "-",
                     "lean": False, "weights": "bfloat16", "eps": {"-": {"cos": sum(ex_c) / len(ex_c),
                                                                        "rel": sum(ex_r) / len(ex_r)}}})
    scale_rows = [] if args.no_scale_sweep else scale_sweep(seeds, refs, args.backend, args.device)
    elapsed = time.time() - t0

    n_params = sum(p.numel() for p in make_model(0, torch.float32, "cpu").parameters())
    g1n = sum(g1_norms) / len(g1_norms)
    print(f"\nGR fidelity: Llama {n_params / 1e6:.2f}M params, batch 8x48, ‖g1‖ = {g1n:.2f} (clip off), estimate "
          f"of H·g1 vs float64 double backprop; cos / relative error (mean of {len(seeds)} seed(s)); "
          f"backend={args.backend}, device={args.device}, {elapsed:.0f} s")
    head = "| variant | " + " | ".join(f"ε={e:g}" for e in eps_list) + " |"
    print(head)
    print("|---|" + "---|" * len(eps_list))
    for row in rows:
        if "-" in row["eps"]:
            m = row["eps"]["-"]
            print(f"| {row['variant']} | " + " | ".join([f"{m['cos']:.3f}/{m['rel']:.3f}"] * len(eps_list)) + " |")
            continue
        cells = [f"{row['eps'][f'{e:g}']['cos']:.2f}/{row['eps'][f'{e:g}']['rel']:.2f}" if f"{e:g}" in row["eps"]
                 else "–" for e in eps_list]
        print(f"| {row['variant']} | " + " | ".join(cells) + " |")
    print("\nrealised perturbation ratio ‖θ'−θ‖/‖ε·v‖:")
    for row in rows:
        if "-" not in row["eps"]:
            print(f"  {row['variant']}: " + ", ".join(f"{e}: {v['perturb_ratio']:.2f}" for e, v in row["eps"].items()))
    if scale_rows:
        print(f"\nSame settings when the gradient's scale changes (loss × s, so ‖g1‖ ≈ {g1n:.2f}·s); bf16 weights, "
              "stochastic rounding; cos / relative error:")
        print("| setting | " + " | ".join(f"s={sc:g}" for sc in LOSS_SCALES) + " |")
        print("|---|" + "---|" * len(LOSS_SCALES))
        for row in scale_rows:
            cells = [f"{row['scale'][f'{sc:g}']['cos']:.2f}/{row['scale'][f'{sc:g}']['rel']:.2f}" for sc in LOSS_SCALES]
            print(f"| {row['variant']} | " + " | ".join(cells) + " |")
    run.write({"model_params": n_params, "g1_norm": g1n, "seeds": len(seeds), "backend": args.backend,
               "config": vars(args), "gamma": GAMMA, "rows": rows, "scale_rows": scale_rows}, args.out)
    return 0


# ------------------------------------------------------------------------------------------------ FSDP2
FSDP2_VARIANTS = [  # (label, estimator, rounding, off_grid)
    ("FSDP2 bf16 MP, forward, stochastic (default)", "forward", "stochastic", False),
    ("FSDP2 bf16 MP, forward, nearest", "forward", "nearest", False),
    ("FSDP2 bf16 MP, central, stochastic", "central", "stochastic", False),
    ("FSDP2 bf16 MP, masters off the grid, forward, stochastic", "forward", "stochastic", True),
]
FSDP2_SEEDS = (0, 1)


def masters(seed: int, off_grid: bool) -> torch.nn.Module:
    model = make_model(seed, torch.float32, "cpu")
    if off_grid:
        g = torch.Generator().manual_seed(77 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-4)
    return model


def reference_at_bf16(seed: int, off_grid: bool) -> torch.Tensor:
    """float64 H·g1 at the weights the bf16 model computes with, rn_bf16(θ), over the global batch."""
    model = masters(seed, off_grid)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model = model.double()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model, batch(seed, "cpu")), params, create_graph=True)
    return flat(torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads]))


def sharded_estimate(seed: int, estimator: str, rounding: str, off_grid: bool, eps: float, mesh,
                     memory: dict | None = None) -> tuple[torch.Tensor, float]:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from grkernels import GradReg

    model = masters(seed, off_grid)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    ids = batch(seed, "cpu").chunk(dist.get_world_size())[dist.get_rank()]
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.0), strength=GAMMA, eps=eps, eps_mode="absolute",
                  g1_clip=None, g2_clip=None, estimator=estimator, rounding=rounding, backend="torch", seed=seed)
    loss_of(model, ids).backward()
    params = list(model.parameters())
    g1 = flat(p.grad.full_tensor() for p in params)
    for _ in range(opt.extra_passes):
        opt.perturb()
        loss_of(model, ids).backward()
    opt.restore_and_combine()
    if memory is not None:  # bytes GradReg holds on this rank, against the parameters in the whole model
        memory["extra_bytes_rank"] = opt.extra_memory_bytes()
        memory["local_params"] = sum(p.to_local().numel() for p in params)
        memory["global_params"] = sum(p.numel() for p in params)
    est = (flat(p.grad.full_tensor() for p in params) - g1) / GAMMA
    return est, opt.metrics()["perturb_ratio"]


def main_fsdp2(args, argv: list[str] | None) -> int:
    """Under torchrun: the FSDP2 table on this rank (rank 0 writes). Otherwise: start ``--nproc`` processes."""
    if "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(cmd)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    run = Run("fidelity", "cpu", argv) if rank == 0 else None
    mem: dict = {}
    sharded_estimate(0, "forward", "stochastic", False, 1e-2, mesh, memory=mem)
    mems = [None] * dist.get_world_size()
    dist.all_gather_object(mems, mem)
    if rank == 0:
        print("extra bytes per rank:", [m["extra_bytes_rank"] for m in mems], "local params:",
              [m["local_params"] for m in mems], "global params:", mem["global_params"], flush=True)
    rows = []
    eps_list = [1e-2] if args.smoke else [1e-3, 1e-2] if args.quick else EPS_SWEEP
    seeds = FSDP2_SEEDS[:1] if args.quick or args.smoke else FSDP2_SEEDS
    if not args.memory_only:
        refs = {(s, off): reference_at_bf16(s, off) for s in seeds for off in (False, True)}
        for label, est_name, rounding, off in FSDP2_VARIANTS:
            row = {"variant": label, "eps": {}}
            for eps in eps_list:
                row["eps"][f"{eps:g}"] = seed_mean(
                    (sharded_estimate(s, est_name, rounding, off, eps, mesh), refs[(s, off)]) for s in seeds)
            rows.append(row)
            if rank == 0:
                cells = " | ".join(f"{v['cos']:.2f}/{v['rel']:.2f} ({v['perturb_ratio']:.2f})"
                                   for v in row["eps"].values())
                print(f"| {label} | {cells} |", flush=True)
    if rank == 0:
        run.write({"world": dist.get_world_size(), "gamma": GAMMA, "seeds": list(seeds), "eps": eps_list,
                   "config": vars(args), "rows": rows, "memory": mems}, args.out,
                  variant="fsdp2-memory" if args.memory_only else "fsdp2")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
