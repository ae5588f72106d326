"""The benchmark scripts run and report what they say, at toy sizes (their numbers are judged in BENCHMARKS.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def _rows(main, args: list[str], out: Path, table: str, key: str) -> dict[str, dict]:
    """Run a bench script's ``main`` writing JSON to ``out``; its ``table`` rows by their ``key``."""
    assert main([*args, "--out", str(out)]) == 0
    return {r[key]: r for r in json.loads(out.read_text())[table]}


def test_e2e_overhead_times_the_cheaper_modes(tmp_path):
    """Every variant is timed, every-k as a per-step average over its cycles, the sub-batch pass two-phase."""
    import e2e_overhead

    rows = _rows(e2e_overhead.main, ["--device", "cpu", "--dim", "32", "--layers", "1", "--vocab", "40", "--seq", "9",
                                     "--batch", "4", "--repeats", "2", "--backends", "torch", "--every", "3",
                                     "--fractions", "0.25,1"], tmp_path / "o.json", "rows", "variant")
    assert set(rows) == {"plain", "gr-forward-torch", "gr-central-torch", "every3-orthogonal", "subset0.25",
                         "subset1"}
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows.values())


def test_cheap_gr_cost_part_runs_every_mode(tmp_path):
    import cheap_gr

    rows = _rows(cheap_gr.main, ["--parts", "cost", "--dim", "16", "--layers", "1", "--vocab", "20", "--batch", "8",
                                 "--length", "5", "--micro", "2", "--repeats", "2", "--every", "2", "--fractions",
                                 "0.5"], tmp_path / "c.json", "cost", "mode")
    assert set(rows) == {"plain", "gradreg-off", "full", "every2-orthogonal", "subset0.5", "head-only"}
    assert rows["plain"]["ratio"] == 1.0 and rows["plain"]["extra_bytes_per_param"] == 0.0
    assert rows["full"]["extra_bytes_per_param"] > rows["head-only"]["extra_bytes_per_param"] > 0
    assert rows["full"]["backend"] != "none"
