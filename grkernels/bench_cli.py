"""``grkernels bench``: run the benchmark scripts in ``bench/`` (a source checkout) and collect their JSON.

    grkernels bench                                # every script that exists
    grkernels bench --only overhead,gr_step        # a subset
    grkernels bench --only fidelity -- --quick     # flags after `--` go to the (one) selected script

The scripts live in the repository, not in the wheel: they compare against baselines (torch.compile, Liger-Kernel,
TRL) that grkernels does not depend on. Each writes ``bench/results/<device>_<name>.json``. Each runs in a process
of its own, with its own output and exit status: a script's message (e.g. "needs a CUDA device (--smoke ...)") is
shown as it prints it, and one script's imports cannot change another's (Triton's interpreter, on CPU, must be
switched on before triton is first imported in a process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SCRIPTS = {  # name -> script in bench/
    "overhead": "e2e_overhead.py",
    "gr_step": "gpu_gr_step.py",
    "ops": "gpu_ops.py",
    "fidelity": "fidelity.py",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="grkernels bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {sorted(SCRIPTS)}")
    ap.add_argument("--bench-dir", default="bench", help="the repository's bench/ folder")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = build_parser()
    args = ap.parse_args(ours)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names:
        ap.error(f"--only: no benchmark named; choose from {sorted(SCRIPTS)}")
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(SCRIPTS)}")
    if script_args and len(names) != 1:
        ap.error(f"flags after '--' ({' '.join(script_args)}) go to one script: pick it with --only NAME")
    if not os.path.isdir(args.bench_dir):
        ap.error(f"--bench-dir {args.bench_dir!r} is not a folder (run from a source checkout, or point it at bench/)")
    failed = []
    for name in names:
        path = os.path.join(args.bench_dir, SCRIPTS[name])
        if not os.path.exists(path):
            print(f"[bench] {name}: {path} not found (run from a source checkout)", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[bench] {name}: {path} {' '.join(script_args)}".rstrip(), flush=True)
        code = subprocess.call([sys.executable, path, *script_args])
        if code != 0:
            print(f"[bench] {name} exited with status {code}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"[bench] failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
