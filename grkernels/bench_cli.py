"""``grkernels bench``: the benchmarks of ``bench/`` (a source checkout), one script per subject, and their JSON.

    grkernels bench --list                         # the subjects and what each measures
    grkernels bench gr_step --device cpu           # one subject (several: gr_step ops; or --only gr_step,ops)
    grkernels bench rl_iteration -- --preset gpu   # flags after `--` go to the (one) selected script
    grkernels bench --device cuda                  # every subject, in turn (a GPU run)

The scripts live in the repository, not in the wheel: they compare against baselines (torch.compile, Liger-Kernel,
TRL, verl) that grkernels does not depend on. Each writes ``bench/results/<device>_<subject>[_<variant>].json``
(``<device>``: e.g. cpu-x86_64-2cores, nvidia-h100). Each runs in a process of its own, with its own output and exit
status: a script's message (e.g. "needs a CUDA device") is shown as it prints it, and one script's imports cannot
change another's (Triton's interpreter, on CPU, must be switched on before triton is first imported in a process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

#: subject -> (script in bench/, what it measures). Result files are named after the subject.
SUBJECTS: dict[str, tuple[str, str]] = {
    "gr_step": ("gr_step.py", "the GR-step math (perturb + restore/combine): our backends vs foreach vs a loop, "
                              "bandwidth against a copy"),
    "overhead": ("e2e_overhead.py", "a GR step over a plain step on a small transformer, per backend and "
                                    "estimator; the cheaper modes beside their floors"),
    "cheap_gr": ("cheap_gr.py", "fidelity and cost of every-k reuse, the sub-batch pass and head-only GR"),
    "ops": ("ops.py", "the policy-loss head (log-prob, entropy, GRPO loss) forward + backward against eager, TRL, "
                      "torch.compile, Liger"),
    "fidelity": ("fidelity.py", "the GR Hessian-vector estimate against float64 double backprop, over ε (one "
                                "process, or FSDP2 with bf16 mixed precision)"),
    "rl_iteration": ("rl_iteration.py", "one GRPO iteration end to end in TRL and verl, per phase: no "
                                        "regularisation, KL, GR full and cheaper; time and memory"),
}
SCRIPTS = {name: script for name, (script, _) in SUBJECTS.items()}  # subject -> script in bench/


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="grkernels bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("subjects", nargs="*", help=f"subjects to run (default: all); one of {sorted(SUBJECTS)}")
    ap.add_argument("--only", default=None, help="comma-separated subjects (the same as naming them)")
    ap.add_argument("--list", action="store_true", help="list the subjects and exit")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="passed to every script (default: each script's, cuda when available)")
    ap.add_argument("--bench-dir", default="bench", help="the repository's bench/ folder")
    return ap


def list_subjects(bench_dir: str) -> str:
    width = max(map(len, SUBJECTS))
    lines = [f"{name:<{width}}  bench/{script:<16}  {what}" for name, (script, what) in SUBJECTS.items()]
    lines.append(f"\nresults: {bench_dir}/results/<device>_<subject>[_<variant>].json; run one: grkernels bench "
                 "SUBJECT [--device cpu|cuda] [-- its flags]; its flags: python bench/<script> --help")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = build_parser()
    args = ap.parse_args(ours)
    if args.list:
        print(list_subjects(args.bench_dir))
        return 0
    names = list(args.subjects)
    if args.only is not None:
        names += [n.strip() for n in args.only.split(",") if n.strip()]
        if not names:
            ap.error(f"--only: no benchmark named; choose from {sorted(SUBJECTS)}")
    names = names or list(SUBJECTS)
    unknown = sorted(set(names) - set(SUBJECTS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(SUBJECTS)} (grkernels bench --list)")
    names = list(dict.fromkeys(names))
    if script_args and len(names) != 1:
        ap.error(f"flags after '--' ({' '.join(script_args)}) go to one script: name one subject")
    if not os.path.isdir(args.bench_dir):
        ap.error(f"--bench-dir {args.bench_dir!r} is not a folder (run from a source checkout, or point it at bench/)")
    device = ["--device", args.device] if args.device else []
    failed = []
    for name in names:
        path = os.path.join(args.bench_dir, SCRIPTS[name])
        if not os.path.exists(path):
            print(f"[bench] {name}: {path} not found (run from a source checkout)", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[bench] {name}: {path} {' '.join(device + script_args)}".rstrip(), flush=True)
        code = subprocess.call([sys.executable, path, *device, *script_args])
        if code != 0:
            print(f"[bench] {name} exited with status {code}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"[bench] failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
