"""GR through ``grad_reg_trainer(Trainer)`` and ``GradRegGRPOTrainer`` under DeepSpeed ZeRO-1/2/3 equals the same
run under DDP (2 processes, torchrun, gloo, CPU; one start for every mode, see ``dist_workers/deepspeed_worker.py``).

Checks: fp32 parameters after 3 GR steps (clipping active, one excluded parameter) under ZeRO-1, 2 and 3, with
gradient_accumulation_steps 1 and 2, equal DDP's with the same accumulation (relative error < 1e-5); identical on
both ranks; GR metrics identical on both ranks and equal to DDP's; in every DeepSpeed run (fp32, bf16, bf16 with fp32
gradient accumulation) the gradient the engine steps with is the GR combination of the g1 and g2 it held, and the
fp32 master partitions are bitwise unchanged by every perturb (checked with θ' in place) and restore; bf16 norms
follow the fp32 run's; GR's extra memory on each rank is that of its partition; a replay that raises leaves the
weights, g1 and the masters as they were; unsupported set-ups are refused.
The run is judged by the files the worker writes when each mode is done, not by the exit code: DeepSpeed on CPU
aborts at teardown in about 1 of 20 runs, after finishing (a failure inside a mode leaves its traceback, which is
reported).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_workers"))
import deepspeed_worker as W  # noqa: E402
from launch import torchrun  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("deepspeed", "transformers", "accelerate")),
        reason="needs deepspeed, transformers and accelerate (make test installs them)",
    ),
]

WORKER = Path(__file__).parent / "dist_workers" / "deepspeed_worker.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    # DeepSpeed JIT-compiles a small CPU op on first use: cache it with the venv, so that only the first run pays
    proc = torchrun(WORKER, out, env={"TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")})
    missing = [f"done_{m}_rank{r}" for m in W.MODES for r in (0, 1) if not (out / f"done_{m}_rank{r}").exists()]
    if missing:
        errors = sorted(out.glob("error_rank*.txt"))
        detail = errors[0].read_text() if errors else proc.stdout[-4000:] + proc.stderr[-4000:]
        pytest.fail(f"DeepSpeed worker did not finish {missing} (exit {proc.returncode}):\n{detail}")
    return out


def _load(run, mode):
    return torch.load(run / f"{mode}_rank0.pt"), torch.load(run / f"{mode}_rank1.pt")


def _rel_errors(got: dict, ref: dict) -> dict[str, float]:
    return {n: float((got["params"][n] - p).norm() / p.norm()) for n, p in ref["params"].items()}


def _check_metrics(got: dict, ref: dict) -> None:
    steps = [m for m in got["metrics"] if "grad_reg/gr_rel" in m]
    want = [m for m in ref["metrics"] if "grad_reg/gr_rel" in m]
    assert len(steps) == len(want) == W.STEPS
    for a, b in zip(steps, want):
        for key in ("grad_reg/g1_norm", "grad_reg/g2_norm", "grad_reg/gr_rel"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, nan_ok=True), key  # reuse steps: g2_norm NaN


def _same_metrics(a: list[dict], b: list[dict]) -> bool:
    """Equal logged metrics, NaN equal to NaN (g2_norm and perturb_ratio are NaN on steps without a perturbed pass)."""
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x) for x, y in zip(a, b))


def _last_gr(metrics: list[dict]) -> dict:
    return [m for m in metrics if "grad_reg/step" in m][-1]


def _assert_equals_ddp(run, mode: str, ref: str) -> None:
    ddp, _ = _load(run, ref)
    r0, r1 = _load(run, mode)
    assert r0["gr_class"] == "DeepSpeedGradReg" and ddp["gr_class"] == "GradReg"  # the engines did run
    init = dict(W.Reg().named_parameters())
    for name, rel in _rel_errors(r0, ddp).items():
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{mode}: {name} differs between ranks"
        assert rel < 1e-5, f"{mode}: {name} relative error {rel:.2e} against {ref}"
        assert not torch.equal(ddp["params"][name], init[name].detach())
    assert _same_metrics(r0["metrics"], r1["metrics"])
    _check_metrics(r0, ddp)
    for m in r0["metrics"]:
        if "grad_reg/gr_rel" in m:  # GR did act, with the clip at 0.3 active (‖g1‖ ≈ 0.4–0.5)
            assert m["grad_reg/gr_rel"] > 0.01 and m["grad_reg/g1_norm"] > 0.35


@pytest.mark.parametrize("mode, ref", [("zero1", "ddp"), ("zero2", "ddp"), ("zero3", "ddp"),
                                       ("zero1_ga2", "ddp_ga2"), ("zero2_ga2", "ddp_ga2"),
                                       ("zero3_ga2", "ddp_ga2")])
def test_zero_trainer_equals_ddp(run, mode, ref):
    _assert_equals_ddp(run, mode, ref)


@pytest.mark.parametrize("mode", [m for m in W.MODES if m.startswith("acc_zero")])
def test_zero_accelerate_loop_equals_ddp(run, mode):
    """A plain Accelerate loop with GradRegWindow under ZeRO-1/2/3 (accumulation 1 and 2, central estimator,
    radius mode, a replay that raises and voids its window) equals the same loop under DDP."""
    _assert_equals_ddp(run, mode, "acc_ddp" + mode[len("acc_zero") + 1:])
    if mode.endswith("_raise"):
        for r in _load(run, mode):
            assert r["errors"] == 1 and len(r["metrics"]) == W.STEPS  # one void window, then 3 GR steps


def test_accelerate_loop_equals_the_trainer_under_ddp(run):
    """GradRegWindow under DDP sees the Trainer's batches (8 rows a step, 4 per rank) and steps like it; a window
    voided by a failed replay is not a step (the raise run differs: it took a different third batch)."""
    trainer, _ = _load(run, "ddp")
    for mode in ("acc_ddp", "acc_ddp_ga2"):
        loop, _ = _load(run, mode)
        assert max(_rel_errors(loop, trainer).values()) < 1e-5, mode
        _check_metrics(loop, trainer)
    raised, _ = _load(run, "acc_ddp_raise")
    assert raised["errors"] == 1 and max(_rel_errors(raised, trainer).values()) > 1e-3


def test_accumulation_changes_nothing_under_ddp(run):
    """The ga2 runs see the same 8 rows per step as the ga1 runs: the windows' GR equals the one-batch GR."""
    ga1, _ = _load(run, "ddp")
    ga2, _ = _load(run, "ddp_ga2")
    assert max(_rel_errors(ga2, ga1).values()) < 1e-5
    _check_metrics(ga2, ga1)


@pytest.mark.parametrize("mode, ref", [(f"grpo_zero{z}{ga}", f"grpo_ddp{ga}") for ga in ("", "_ga2")
                                       for z in (1, 2, 3)])
def test_grpo_trainer_under_zero_equals_ddp(run, mode, ref):
    """GRPO steps with SGD here (see the worker's GRPO_OPT), so the whole update of the 3 steps is compared too."""
    ddp, _ = _load(run, ref)
    r0, r1 = _load(run, mode)
    assert r0["gr_class"] == "DeepSpeedGradReg" and ddp["gr_class"] == "GradReg"
    for name, rel in _rel_errors(r0, ddp).items():
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{name} differs between ranks"
        assert rel < 1e-5, f"GRPO {mode}: {name} relative error {rel:.2e} against DDP"
    init = ddp["init"]
    err = torch.stack([(r0["params"][n] - p).norm() for n, p in ddp["params"].items()]).norm()
    update = torch.stack([(p - init[n]).norm() for n, p in ddp["params"].items()]).norm()
    assert float(err / update) < 5e-5, f"GRPO {mode}: update relative error {float(err / update):.2e}"
    _check_metrics(r0, ddp)
    assert all(m["grad_reg/gr_rel"] > 0.01 for m in r0["metrics"] if "grad_reg/gr_rel" in m)


DS_MODES = [m for m in W.MODES if "zero" in m and not m.endswith("_raise")]


@pytest.mark.parametrize("mode", ["zero2_raise", "zero3_raise"])
def test_zero_replay_error_restores_everything(run, mode):
    """The first replay raises inside the Trainer: the weights the next forward would use (ZeRO-3: gathered) equal
    the masters bitwise, the engine's gradients are g1 bitwise, the masters untouched, and the engine still steps."""
    for r in _load(run, mode):
        assert r["gr_class"] == "DeepSpeedGradReg"
        assert r["after_error"] == {"weights_restored": True, "grads_are_g1": True, "masters_untouched": True,
                                    "point": 0, "steps_after": True}


def _full_steps(mode: str) -> int:
    return (W.STEPS + 1) // 2 if "_reuse" in mode else W.STEPS  # every=2: steps 0 and 2


@pytest.mark.parametrize("mode", DS_MODES)
def test_zero_masters_untouched_by_perturb_and_restore(run, mode):
    r0, r1 = _load(run, mode)
    for r in (r0, r1):
        assert r["masters_untouched"] == [True] * _full_steps(mode)
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name])
        assert torch.isfinite(r0["params"][name]).all()


@pytest.mark.parametrize("mode", [m for m in DS_MODES if not m.endswith(("_central", "_radius"))])
def test_zero_engine_steps_with_the_gr_gradient(run, mode):
    """The whole gradient the engine steps with (DeepSpeed's own gather) is g1 + (γ/ε)(s2·g2 − s1·g1), recomputed
    from the whole g1 and g2 the engine held: up to the rounding of the gradient partition's dtype. (The central
    estimator and radius mode combine differently; their runs are checked by their equality with DDP.)"""
    tol = 4e-3 if mode.endswith("_bf16") else 2e-5  # bf16 gradient partitions: one bf16 rounding (2^-8)
    for r in _load(run, mode):
        assert len(r["combine_errors"]) == _full_steps(mode)
        assert max(r["combine_errors"]) < tol, r["combine_errors"]


def test_default_config_runs_the_recommended_set_under_zero2(run):
    """A Trainer config with every grad_reg_* field at its default under ZeRO-2: the engine's resolved settings are
    the recommended set (strength "auto" at target 3, radius ε 0.02), γ starts at 1e-2 and moves every step, equally
    on both ranks (the combine itself: test_zero_engine_steps_with_the_gr_gradient)."""
    r0, r1 = _load(run, "zero2_defaults")
    assert r0["gr_class"] == "DeepSpeedGradReg"
    s = r0["settings"]
    assert (s["strength"], s["target_rel"], s["eps_mode"], s["eps"]) == ("auto", 3.0, "radius", 0.02)
    gammas = [m["grad_reg/strength"] for m in r0["metrics"] if "grad_reg/strength" in m]
    assert len(gammas) == W.STEPS and gammas[0] == pytest.approx(1e-2) and len(set(gammas)) == W.STEPS
    assert _same_metrics(r0["metrics"], r1["metrics"])


@pytest.mark.parametrize("mode", [m for m in DS_MODES if "bf16" in m])
def test_zero_bf16_norms_follow_fp32(run, mode):
    """bf16 weights: each step's ‖g1‖ and ‖g2‖ within 2% of the fp32 run's (g2 left on top of g1 would double it;
    gr_rel is not compared: the stochastic rounding of θ' differs between the partitionings)."""
    ddp, _ = _load(run, "ddp")
    r0, r1 = _load(run, mode)
    assert _same_metrics(r0["metrics"], r1["metrics"])
    steps = [m for m in r0["metrics"] if "grad_reg/gr_rel" in m]
    want = [m for m in ddp["metrics"] if "grad_reg/gr_rel" in m]
    assert len(steps) == len(want) == W.STEPS
    for a, b in zip(steps, want):
        for key in ("grad_reg/g1_norm", "grad_reg/g2_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-2), key


@pytest.mark.parametrize("mode", [m for m in DS_MODES if not m.startswith("grpo") and not m.endswith("_reuse")])
def test_zero_extra_memory_is_the_partitions(run, mode):
    """Saved weight + g1 of the rank's partition: 8 B per element in fp32, 4 B in bf16 (bf16 gradients), 6 B with
    fp32 gradient accumulation of bf16 weights; 12 B in fp32 with the central estimator (the gradient at θ + εv
    too); and the partition is about half the model."""
    per_elem = 6 if mode.endswith("bf16acc") else 4 if "bf16" in mode else 12 if mode.endswith("_central") else 8
    for r in _load(run, mode):
        mem = r["memory"]
        assert mem["partition_numel"] <= mem["model_numel"] // 2 + 8  # + alignment padding
        assert 0.9 * per_elem * mem["partition_numel"] <= mem["extra_bytes"] <= per_elem * mem["partition_numel"]


class _Offload:
    def __init__(self, device: str) -> None:
        self.device = device


def _engine(stage=3, offload=None, fp16=False, clip=0.0, qw=False, hpz=1, qg=False):
    from types import SimpleNamespace

    return SimpleNamespace(
        zero_optimization_stage=lambda: stage, zero_offload_optimizer=lambda: offload,
        zero_offload_param=lambda: None, fp16_enabled=lambda: fp16, gradient_clipping=lambda: clip,
        zero_quantized_weights=lambda: qw, zero_quantized_nontrainable_weights=lambda: False,
        zero_hpz_partition_size=lambda: hpz, zero_quantized_gradients=lambda: qg,
    )


@pytest.mark.parametrize("kw, words", [
    (dict(stage=0), "stage 0"), (dict(offload=_Offload("cpu")), "offload"), (dict(fp16=True), "fp16"),
    (dict(qw=True), "quantized weights"), (dict(hpz=2), "hpZ"),
    (dict(qg=True), "quantized gradients"),
])
def test_unsupported_deepspeed_setups_are_refused(kw, words):
    from grkernels.integrations.deepspeed import check_supported

    check_supported(_engine(offload=_Offload("none")))  # the supported set-up passes
    check_supported(_engine(offload=_Offload("none"), clip=1.0))  # DeepSpeed's clip acts on the GR gradient
    with pytest.raises(NotImplementedError, match=words):
        check_supported(_engine(**kw))


def test_settings_deepspeed_cannot_run_are_refused_when_resolved():
    """The sub-batch pass (no reduced g1_S before the boundary) and the exact estimator (no graph through the flat
    partitions) are refused with the schema's message; every/reuse and the C++ backend are offered."""
    from grkernels.integrations.deepspeed import trainer_grad_reg
    from grkernels.settings import resolve

    with pytest.raises(ValueError, match="estimator='exact'.*deepspeed"):
        resolve({"estimator": "exact"}, host="deepspeed")
    with pytest.raises(ValueError, match="subset_fraction=0.5: not supported under deepspeed"):
        resolve({"subset_fraction": 0.5}, host="deepspeed")
    with pytest.raises(ValueError, match="subset_fraction=0.5: not supported under deepspeed"):
        trainer_grad_reg(object(), resolve({"subset_fraction": 0.5}), [])  # resolved for no host: refused here
    resolve({"every": 4, "reuse": "orthogonal", "backend": "cpp"}, host="deepspeed")


@pytest.mark.parametrize("mode", ["zero1", "zero2", "zero3", "zero1_ga2", "zero2_ga2", "zero3_ga2"])
def test_deepspeed_clip_binds_and_acts_on_the_gr_gradient(run, mode):
    """max_grad_norm=1.0 ("gradient_clipping": "auto") binds in every step (the pre-clip norm of the GR gradient the
    Trainer logs is above 1), and the DeepSpeed runs equal DDP's Trainer clip (test_zero_trainer_equals_ddp)."""
    ddp, _ = _load(run, "ddp_ga2" if mode.endswith("_ga2") else "ddp")
    r0, _ = _load(run, mode)
    norms = [m["grad_norm"] for m in r0["metrics"] if "grad_norm" in m]
    want = [m["grad_norm"] for m in ddp["metrics"] if "grad_norm" in m]
    assert len(norms) == len(want) == W.STEPS and all(n > W.MAX_GRAD_NORM for n in want), want
    assert norms == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("mode, ref", [("zero2_reuse", "ddp_reuse"), ("zero3_reuse", "ddp_reuse"),
                                       ("zero1_cpp", "ddp_cpp"), ("zero2_cpp", "ddp_cpp"), ("zero3_cpp", "ddp_cpp")])
def test_zero_cheaper_gr_and_cpp_backend_equal_ddp(run, mode, ref):
    """every=2 with the orthogonal reuse, and the C++ backend, under ZeRO equal the same Trainer run under DDP (the
    one engine runs on the partitions: every feature of GradReg is there)."""
    _assert_equals_ddp(run, mode, ref)
    if "reuse" in mode:
        r0, _ = _load(run, mode)
        rels = [m["grad_reg/gr_rel"] for m in r0["metrics"] if "grad_reg/gr_rel" in m]
        assert all(r > 0.01 for r in rels)  # the step in between applied the reused correction


def test_zero_adaptive_strength_through_the_config_equals_ddp(run):
    """grad_reg_strength="auto" in the Trainer's config reaches the engine under ZeRO-2: γ moves every step (the
    controller's rule) and the run equals DDP's, γ for γ."""
    _assert_equals_ddp(run, "zero2_auto", "ddp_auto")
    for mode in ("zero2_auto", "ddp_auto"):
        r0, _ = _load(run, mode)
        gammas = [m["grad_reg/strength"] for m in r0["metrics"] if "grad_reg/strength" in m]
        assert gammas[0] == 0.5 and len(set(gammas)) == len(gammas) == W.STEPS, gammas
    ds, ddp = _load(run, "zero2_auto")[0], _load(run, "ddp_auto")[0]
    assert [m["grad_reg/strength"] for m in ds["metrics"] if "grad_reg/strength" in m] == pytest.approx(
        [m["grad_reg/strength"] for m in ddp["metrics"] if "grad_reg/strength" in m], rel=1e-5)


@pytest.mark.parametrize("mode", ["zero2_nan", "zero3_nan"])
def test_zero_nonfinite_step_is_skipped_by_every_rank(run, mode):
    """A NaN in one gradient element of rank 1's partition after the combine of step 1: both ranks vote to skip,
    nothing reaches the masters at that step (the run equals DDP's with that step skipped), training goes on."""
    _assert_equals_ddp(run, mode, "ddp_nan")
    for r in _load(run, mode):
        assert _last_gr(r["metrics"])["grad_reg/skipped"] == 1.0
        assert all(torch.isfinite(p).all() for p in r["params"].values())
    ddp, _ = _load(run, "ddp_nan")
    assert _last_gr(ddp["metrics"])["grad_reg/skipped"] == 1.0
