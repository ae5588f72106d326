"""bench/: one script per subject, one naming rule for result files, and every script run at toy sizes (their numbers
are judged in BENCHMARKS.md; here: that they run, report every row, and that what they compute from their timings
is what they say)."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

from grkernels.bench_cli import SCRIPTS, SUBJECTS  # noqa: E402


def _run(main, args: list[str], out: Path) -> dict:
    """Run a bench script's ``main`` writing its JSON to ``out``; the JSON, with the common fields checked."""
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("subject", "device", "grkernels", "torch", "command", "loadavg_start", "loadavg_end", "started_utc"):
        assert key in result, key
    assert common.parse_result_name(f"{result['device']}_{result['subject']}.json") is not None
    return result


# ------------------------------------------------------------------------------------------------ layout and names
def test_every_result_file_follows_the_one_naming_rule():
    files = sorted(p.name for p in (BENCH / "results").iterdir())
    assert files
    bad = [f for f in files if common.parse_result_name(f) is None]
    assert not bad, f"not <device>_<subject>[_<variant>].json: {bad}"
    for f in files:
        parsed = common.parse_result_name(f)
        assert parsed["subject"] in SUBJECTS and f == f.lower()


@pytest.mark.parametrize("name,parsed", [
    ("cpu-x86_64-2cores_gr_step.json", ("cpu-x86_64-2cores", "gr_step", None)),
    ("cpu-x86_64-2cores_cheap_gr_worlds_f0.125.json", ("cpu-x86_64-2cores", "cheap_gr", "worlds_f0.125")),
    ("nvidia-h100_ops_gpu.json", ("nvidia-h100", "ops", "gpu")),
    ("cpu-aarch64-64cores_overhead_lr3e-4.json", ("cpu-aarch64-64cores", "overhead", "lr3e-4")),
    # the naming rules this one replaced, and near misses
    ("cpu_fidelity.json", None), ("cpu-x86_64-2cores_bench_gr.json", None), ("NVIDIA-H100_ops.json", None),
    ("nvidia_h100_gr_step.json", None), ("cpu-x86_64-2cores_gr_step_.json", None),
    ("cpu-x86_64-2cores_gr_step.txt", None), ("cpu-x86_64-2cores_gr_stepper.json", None),
])
def test_the_naming_rule(name, parsed):
    got = common.parse_result_name(name)
    assert (None if got is None else (got["device"], got["subject"], got["variant"])) == parsed


def test_result_path_refuses_a_name_outside_the_rule():
    assert common.result_path("cpu-x86_64-2cores", "ops", "w128").name == "cpu-x86_64-2cores_ops_w128.json"
    for device, subject, variant in (("cpu", "nope", None), ("CPU", "ops", None), ("cpu-x86_64-2cores", "ops", "A")):
        with pytest.raises(ValueError, match="does not follow"):
            common.result_path(device, subject, variant)


def test_device_name_is_the_names_device_part():
    name = common.device_name("cpu")
    assert name.startswith("cpu-") and name.endswith("cores")
    assert common.parse_result_name(f"{name}_ops.json")["device"] == name


def test_one_script_per_subject_and_grkernels_bench_lists_them(capsys):
    from grkernels.bench_cli import main

    scripts = {p.name for p in BENCH.glob("*.py")} - {"common.py"}
    assert scripts == set(SCRIPTS.values())
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed and script in listed for name, script in SCRIPTS.items())


def test_no_benchmark_imports_another_script_or_a_private_function():
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    for path in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in scripts, f"{path.name} imports bench/{node.module}.py"
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not (private and (node.module.startswith("grkernels.demo") or node.module == "common")), \
                    f"{path.name} imports {private} from {node.module}"
            elif isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & scripts, f"{path.name} imports another bench script"


# ------------------------------------------------------------------------------------------------ smoke runs
def test_e2e_overhead_times_the_cheaper_modes_beside_their_floors(tmp_path):
    """Every variant is timed, every-k as a per-step average over its cycles, the sub-batch pass two-phase; each
    cheaper mode's floor and gap follow from the timings."""
    import e2e_overhead

    res = _run(e2e_overhead.main, ["--device", "cpu", "--dim", "32", "--layers", "1", "--vocab", "40", "--seq", "9",
                                   "--batch", "4", "--repeats", "2", "--backends", "torch", "--every", "3",
                                   "--fractions", "0.25,1"], tmp_path / "o.json")
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"plain", "gr-forward-torch", "gr-central-torch", "every3-orthogonal", "subset0.25",
                         "subset1"}
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows.values())
    plain = rows["plain"]["median_s"]
    for name in ("every3-orthogonal", "subset0.25", "subset1"):
        r = rows[name]
        assert r["floor_s"] > 0 and math.isclose(r["floor_ratio"], r["floor_s"] / plain)
        assert math.isclose(r["gap_over_plain"], (r["median_s"] - r["floor_s"]) / plain)
    for name in ("subset0.25", "subset1"):  # the gap split in two parts that add up
        r = rows[name]
        assert math.isclose(r["split_cost_over_plain"] + r["bookkeeping_over_plain"], r["gap_over_plain"])


def test_cheap_gr_cost_part_runs_every_mode(tmp_path):
    import cheap_gr

    res = _run(cheap_gr.main, ["--parts", "cost", "--dim", "16", "--layers", "1", "--vocab", "20", "--batch", "8",
                               "--length", "5", "--micro", "2", "--repeats", "2", "--every", "2", "--fractions",
                               "0.5"], tmp_path / "c.json")
    rows = {r["mode"]: r for r in res["cost"]}
    assert set(rows) == {"plain", "gradreg-off", "full", "every2-orthogonal", "subset0.5", "head-only"}
    assert rows["plain"]["ratio"] == 1.0 and rows["plain"]["extra_bytes_per_param"] == 0.0
    assert rows["full"]["extra_bytes_per_param"] > rows["head-only"]["extra_bytes_per_param"] > 0
    assert rows["full"]["backend"] != "none"


def test_gr_step_cpu_times_every_implementation(tmp_path):
    import gr_step

    from grkernels.kernels import cpp_loaded

    res = _run(gr_step.main, ["--device", "cpu", "--smoke"], tmp_path / "g.json")
    rows = {r["mix"]: r for r in res["rows"]}
    assert set(rows) == {"bf16", "fp32", "bf16-fp32grad"}
    assert set(rows["bf16-fp32grad"]["median_s"]) == {"loop", "foreach"}  # the backends read .grad
    want = {"torch-backend", "loop", "foreach"} | ({"cpp"} if cpp_loaded() else set())
    assert want <= set(rows["fp32"]["median_s"])
    if cpp_loaded():
        r = rows["bf16"]
        assert {"cpp-sr", "torch-backend-sr"} <= set(r["median_s"])
        assert set(r["passes"]) == {"sumsq_g1", "perturb", "sumsq_g2", "combine"}
        assert r["step_bytes"] == sum(p["bytes"] for p in r["passes"].values())
        assert math.isclose(r["cpp_speedup_over"]["loop"], r["median_s"]["loop"] / r["median_s"]["cpp"])


def test_ops_cpu_runs_every_suite_and_our_gradient_is_eagers(tmp_path):
    import ops

    res = _run(ops.main, ["--device", "cpu", "--smoke", "--vocab", "40"], tmp_path / "p.json")
    entry = res["results"]["40"]
    assert {"logp_entropy", "logits_head", "fused_linear", "summary"} <= set(entry)
    assert "grkernels_triton" not in entry["logits_head"]  # not timed interpreted on the CPU path
    for suite in ("logp_entropy", "logits_head", "fused_linear"):
        for name, r in entry[suite].items():
            if name != "check":
                assert "ms" in r or "skipped" in r, (suite, name)
    assert entry["logits_head"]["eager_torch"]["ms"] > 0
    check = entry["logits_head"]["check"]
    assert check["max_abs_grad_diff_vs_eager"] <= 1e-5 * max(1.0, check["max_abs_grad"])


def test_fidelity_smoke_estimates_the_hessian_vector_product(tmp_path):
    """fp32 weights at ε = 1e-2: the forward estimate of H·g1 has cos > 0.95 to float64 double backprop (the table
    in BENCHMARKS.md: 0.99); bf16 weights (stochastic rounding) > 0.9 (the table: 0.97)."""
    import fidelity

    res = _run(fidelity.main, ["--device", "cpu", "--smoke"], tmp_path / "f.json")
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["fp32 weights, forward"]["eps"]["0.01"]["cos"] > 0.95
    assert rows["bf16, forward, stochastic"]["eps"]["0.01"]["cos"] > 0.9


# ------------------------------------------------------------------------------------------------ rl_iteration
def test_rl_iteration_phases_are_exclusive_and_sum_to_the_iteration():
    """Nested phases take their time out of the enclosing one; the open gr_pass phase runs from perturb to the
    combine; 'other' is the rest: checked on a fake clock against a hand count."""
    import rl_iteration

    clock = iter(range(100))
    P = rl_iteration.Phases(cuda=False)
    P.clock = lambda: float(next(clock))  # a fake clock: one tick per reading
    P.start()                                   # t=0
    with P.phase("first_pass"):                 # 1
        with P.phase("generation"):             # 2: first_pass 1
            pass                                # 3: generation 1
        P.push("gr_math")                       # 4: first_pass 2
        P.pop("gr_math")                        # 5: gr_math 1
        P.push("gr_pass")                       # 6: first_pass 3
        with P.phase("optimizer"):              # 7: gr_pass 1
            pass                                # 8: optimizer 1
        P.pop("gr_pass")                        # 9: gr_pass 2
    #                                             10: first_pass 4
    out = P.stop()                              # 11: iteration 11, other = 11 - 9 (0-1 and 10-11)
    assert (out["first_pass"], out["generation"], out["gr_math"], out["gr_pass"], out["optimizer"]) == (4, 1, 1, 2, 1)
    assert out["iteration"] == 11 and out["other"] == 2
    with pytest.raises(RuntimeError, match="ended inside"):
        P.start()
        P.push("a")
        P.pop("b")


def test_rl_iteration_summary_ratios_floors_and_gaps():
    """Per round means, medians over the kept rounds, per-round ratios, and the floors of the cheaper modes, against
    a recomputation from the records."""
    import argparse
    import random

    import rl_iteration

    rng = random.Random(0)
    a = argparse.Namespace(warmup=1, rounds=3, cycle=2)

    def rec(it, gr_pass=0.0, gr_math=0.0):
        r = {k: 0.0 for k in rl_iteration.PHASES}
        r.update(generation=it * 0.5, gr_pass=gr_pass, gr_math=gr_math, iteration=it)
        return r

    base = {"none": 1.0, "kl": 1.3, "gr": 2.0, "gr_sub0.25": 1.4, "gr_every4": 1.3}
    turns = {v: [[rec(t * rng.uniform(0.9, 1.1), gr_pass=0.8 * (v == "gr"), gr_math=0.1 * (v != "none"))
                  for _ in range(a.cycle)] for _ in range(a.warmup + a.rounds)] for v, t in base.items()}
    ready = {v: {"micro_batches": 8} for v in base}
    res = rl_iteration.summarise("trl", a, turns, ready, {}, {})
    mean = {v: [sum(r["iteration"] for r in turn) / a.cycle for turn in ts[a.warmup:]] for v, ts in turns.items()}
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731  (3 rounds: the middle one)
    for v in base:
        assert math.isclose(res["variants"][v]["iteration"], med(mean[v]))
        assert math.isclose(res["variants"][v]["x_kl"], med([x / k for x, k in zip(mean[v], mean["kl"])]))
    full = [sum(r["gr_pass"] for r in turn) / a.cycle for turn in turns["gr"][a.warmup:]]
    floor = [n + p * 2 / 8 + 0.1 for n, p in zip(mean["none"], full)]  # ⌈0.25 · 8⌉ = 2 of 8 micro-batches
    assert math.isclose(res["floors"]["gr_sub0.25"]["floor_s"], med(floor))
    assert math.isclose(res["floors"]["gr_sub0.25"]["gap_x_none"],
                        med([(s - f) / n for s, f, n in zip(mean["gr_sub0.25"], floor, mean["none"])]))
    floor4 = [n + (g - n) / 4 for n, g in zip(mean["none"], mean["gr"])]
    assert math.isclose(res["floors"]["gr_every4"]["floor_s"], med(floor4))
    assert math.isclose(res["variants"]["gr"]["gr_share"], med([(0.8 + 0.1) / m for m in mean["gr"]]))


def test_rl_iteration_runs_trl_and_verl(tmp_path):
    """Toy sizes, 2 variants per host, one kept round: every phase recorded, the reference forward only with KL, the
    pass at θ' only with GR, memory from the OS."""
    import rl_iteration

    res = _run(rl_iteration.main, ["--device", "cpu", "--hosts", "trl,verl", "--variants", "kl,gr_sub0.25",
                                   "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--inter",
                                   "32", "--vocab", "40", "--prompts", "2", "--generations", "4", "--micro", "2",
                                   "--prompt-len", "3", "--completion-len", "4", "--rounds", "1", "--warmup", "0",
                                   "--cycle", "1", "--threads", "1"], tmp_path / "r.json")
    for host in ("trl", "verl"):
        h = res["hosts"][host]
        assert set(h["variants"]) == {"kl", "gr_sub0.25"} and "gr_head" in h["unavailable"], host
        kl, gr = h["variants"]["kl"], h["variants"]["gr_sub0.25"]
        for r in (kl, gr):
            assert math.isclose(sum(r[k] for k in rl_iteration.PHASES), r["iteration"], rel_tol=1e-9)
            assert r["generation"] > 0 and r["first_pass"] > 0 and r["memory"]["peak_rss_bytes"] > 2**20
        assert kl["ref_forward"] > 0 and gr["ref_forward"] == 0 and kl["memory"]["ref_param_bytes"] > 0
        assert gr["gr_pass"] > 0 and kl["gr_pass"] == 0 and 0 < gr["gr_share"] < 1
        assert gr["memory"]["gr_extra_bytes"] > 0 and kl["x_kl"] == 1.0
    rows = {r["dtype"]: r for r in res["memory_by_dtype"]}
    assert rows["float32"]["reference_model_bytes_per_param"] == 4 and rows["bfloat16"][
        "reference_model_bytes_per_param"] == 2
    assert rows["float32"]["gr_full_bytes_per_param"] > rows["bfloat16"]["gr_full_bytes_per_param"] > 0
