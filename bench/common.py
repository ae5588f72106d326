"""What every benchmark in bench/ shares: the device's name, the one naming rule of result files, the result writer
(with the machine's load beside the numbers), the OS's peak memory of a process, and round-robin timing.

Result files: ``bench/results/<device>_<subject>[_<variant>].json``, all lower case, where

    <device>   ``device_name()``: ``cpu-<machine>-<n>cores`` (e.g. cpu-x86_64-2cores) or the GPU's vendor and
               model (the first two words of ``torch.cuda.get_device_name``, e.g. nvidia-h100)
    <subject>  one of ``SUBJECTS`` (a benchmark script of bench/, see ``grkernels bench --list``)
    <variant>  optional: what distinguishes this run from the subject's default one (e.g. ``w128``, ``seed1``)

Not a benchmark itself (``grkernels bench`` lists only the subjects).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"



def _subjects() -> dict[str, tuple[str, str]]:
    """``grkernels.bench_cli.SUBJECTS``, read without importing the grkernels package: importing it imports
    triton, and a benchmark that runs Triton on CPU must switch the interpreter on before that."""
    package = importlib.util.find_spec("grkernels")
    path = Path(package.submodule_search_locations[0]) / "bench_cli.py"
    spec = importlib.util.spec_from_file_location("_grkernels_bench_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUBJECTS


#: subject -> (script in bench/, what it measures): grkernels bench's list, the one place subjects are named.
SUBJECTS: dict[str, tuple[str, str]] = _subjects()

# a CPU: cpu-<machine>-<n>cores; a GPU: <vendor>-<model>[-...] (at least two parts, the vendor not "cpu")
_DEVICE = r"(?:cpu-[a-z0-9_]+-[0-9]+cores|(?!cpu-)[a-z]+-[a-z0-9]+(?:-[a-z0-9]+)*)"
_PART = r"[a-z0-9][a-z0-9.+-]*"
RESULT_NAME = re.compile(
    rf"^(?P<device>{_DEVICE})_(?P<subject>{'|'.join(sorted(SUBJECTS, key=len, reverse=True))})"
    rf"(?:_(?P<variant>{_PART}(?:_{_PART})*))?\.json$"
)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: str | torch.device = "cpu") -> str:
    """The ``<device>`` part of result names: ``cpu-<machine>-<n>cores`` for a CPU, the GPU's vendor and model
    (first two words of its name, e.g. "NVIDIA H100 80GB HBM3" -> ``nvidia-h100``) for a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        return _slug(" ".join(torch.cuda.get_device_name(device).split()[:2]))
    return f"cpu-{platform.machine().lower()}-{os.cpu_count()}cores"


def device_full_name(device: str | torch.device = "cpu") -> str:
    """The device as its driver names it (the GPU's whole name; the CPU's model from /proc/cpuinfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_result_name(name: str) -> dict[str, str | None] | None:
    """``{"device", "subject", "variant"}`` of a result file name that follows the rule, else None."""
    m = RESULT_NAME.match(name)
    return None if m is None else m.groupdict()


def result_path(device: str, subject: str, variant: str | None = None) -> Path:
    """``bench/results/<device>_<subject>[_<variant>].json``; raises ValueError for a name outside the rule."""
    name = f"{device}_{subject}{'_' + variant if variant else ''}.json"
    if subject not in SUBJECTS or parse_result_name(name) is None:
        raise ValueError(f"result name {name!r} does not follow <device>_<subject>[_<variant>].json (lower case; "
                         f"subjects: {sorted(SUBJECTS)})")
    return RESULTS_DIR / name


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages of the machine (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Run:
    """One benchmark run: what it was (subject, device, command) and the machine's state at its start and end.

    ``Run(subject, device)`` at the start of ``main``; ``run.write(result)`` at the end fills in the common fields
    (device, versions, threads, command, UTC times, load averages at start and end) and writes the JSON.
    """

    def __init__(self, subject: str, device: str | torch.device = "cpu", argv: Sequence[str] | None = None) -> None:
        if subject not in SUBJECTS:
            raise ValueError(f"unknown subject {subject!r}; known: {sorted(SUBJECTS)}")
        self.subject = subject
        self.device = device_name(device)
        self.device_full = device_full_name(device)
        args = list(sys.argv[1:] if argv is None else argv)
        self.command = " ".join(["python", f"bench/{SUBJECTS[subject][0]}", *args])
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.load_start = loadavg()
        self.t0 = time.perf_counter()

    def header(self) -> str:
        return f"{self.device} ({self.device_full}), load average at start {self.load_start}"

    def write(self, result: dict, out: str | os.PathLike | None = None, variant: str | None = None) -> Path:
        """Write ``result`` with the common fields to ``out`` (default: the named result file); returns the path."""
        from grkernels import __version__

        meta = {
            "subject": self.subject, "device": self.device, "device_full": self.device_full,
            "grkernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "command": self.command, "started_utc": self.started,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self.t0, 1),
            "loadavg_start": self.load_start, "loadavg_end": loadavg(),
        }
        path = Path(out) if out else result_path(self.device, self.subject, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**meta, **result}, indent=1, default=_json_default) + "\n")
        print(f"wrote {path} (load average {meta['loadavg_start']} -> {meta['loadavg_end']})")
        return path


def _json_default(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, (Path, torch.device)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ------------------------------------------------------------------------------------------------ memory
def peak_rss_bytes() -> int:
    """This process's peak resident set size, from the OS: VmHWM of /proc/self/status (Linux), else
    ``resource.getrusage`` (whose ``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied weight counts once; a DTensor: its local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and hasattr(t, "to_local"):
            t = t.to_local()
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ timing
def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: str | torch.device = "cpu", before: Callable[[str], None] | None = None,
                clock: str = "wall") -> dict[str, list[float]]:
    """Seconds of each call, one call of each per round (``warmup`` rounds first, not kept): a machine whose speed
    drifts (shared cores, turbo) slows every call of a round alike, so ratios within a round stay meaningful.
    ``before(name)`` runs untimed before each call (e.g. to restore its inputs). ``clock="cpu"``: the process's CPU
    time instead of wall time (a machine shared with other jobs; meaningful with one torch thread)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for name, fn in calls.items():
            if before is not None:
                before(name)
            sync(device)
            t0 = now()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(now() - t0)
    return times


def median_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of each round's ratio (a load change between rounds cancels)."""
    return statistics.median(t / b for t, b in zip(times, base))
