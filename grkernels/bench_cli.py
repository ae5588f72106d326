"""``grkernels bench``: run the benchmark scripts in ``bench/`` (a source checkout) and collect their JSON.

    grkernels bench                                # every script that exists
    grkernels bench --only overhead,gr_step        # a subset

The scripts live in the repository, not in the wheel: they compare against baselines (torch.compile, Liger-Kernel,
TRL) that grkernels does not depend on. Each writes ``bench/results/<device>_<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

SCRIPTS = {  # name -> script in bench/
    "overhead": "e2e_overhead.py",
    "gr_step": "gpu_gr_step.py",
    "ops": "gpu_ops.py",
    "fidelity": "fidelity.py",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="grkernels bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {sorted(SCRIPTS)}")
    ap.add_argument("--bench-dir", default="bench", help="the repository's bench/ folder")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(SCRIPTS)}")
    failed = []
    for name in names:
        path = os.path.join(args.bench_dir, SCRIPTS[name])
        if not os.path.exists(path):
            print(f"[bench] {name}: {path} not found (run from a source checkout)", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[bench] {name}: {path}", flush=True)
        saved = sys.argv
        sys.argv = [path]
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            if stop.code not in (0, None):
                failed.append(name)
        except Exception as err:  # report and go on: one broken baseline must not hide the others
            print(f"[bench] {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append(name)
        finally:
            sys.argv = saved
    if failed:
        print(f"[bench] failed: {failed}", file=sys.stderr)
    return 1 if failed else 0
