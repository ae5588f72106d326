"""GR under FSDP2 (``fully_shard``) on CPU: 2 processes (torchrun, gloo), one start for every check.

Each case trains a fully-sharded MLP (uneven shards) for a few AdamW steps with ``GradReg`` on half of each global
batch per rank; the gathered parameters must equal a single-process run over the global batch (fp32, relative
error < 1e-5) and the metrics must be identical on both ranks. Cases: clipping off, active clipping, radius
mode, the central estimator, HSDP (2 replicas × 1 shard: the norms must not be summed over replicas),
``reshard_after_forward=False`` with a no-grad forward before ``perturb()`` (the shards must be resharded before
they are edited), gradient accumulation with ``set_requires_gradient_sync``, and the Triton backend on the local
shards, and the cheaper GR (every-2 steps with orthogonal reuse; the sub-batch pass on each rank's first
micro-batch). Beside them: bf16 mixed precision (the perturbed fp32 shard lies on the bf16 grid, so FSDP2's cast keeps
it, and the shard is restored bitwise), and the refusals of FSDP1 and of the exact estimator.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_workers"))
import fsdp2_worker as W  # noqa: E402
from launch import torchrun  # noqa: E402

WORKER = Path(__file__).parent / "dist_workers" / "fsdp2_worker.py"
pytestmark = pytest.mark.slow

_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    proc = torchrun(WORKER, out)
    errors = sorted(out.glob("error_rank*.txt"))
    if errors or not all((out / f"done_rank{r}").exists() for r in (0, 1)):
        detail = errors[0].read_text() if errors else proc.stdout[-4000:] + proc.stderr[-4000:]
        pytest.fail(f"FSDP2 worker failed (exit {proc.returncode}):\n{detail}")
    return out


def _nan_equal(metrics: list[dict]) -> list[dict]:
    """The metrics with NaN (g2_norm, perturb_ratio of a reuse step) as a marker, so that NaN equals NaN."""
    return [{k: "nan" if v != v else v for k, v in m.items()} for m in metrics]


@pytest.mark.parametrize("case", list(W.CASES))
def test_fsdp2_equals_single_process(run, case):
    if case == "triton" and not _TRITON:
        pytest.skip("triton not installed")
    r0, r1 = torch.load(run / f"{case}_rank0.pt"), torch.load(run / f"{case}_rank1.pt")
    single, single_metrics = W.train_single(case)
    init = dict(W.make_model().named_parameters())
    for name, p in single.items():
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{case}: {name} differs between ranks"
        rel = float((r0["params"][name] - p).norm() / p.norm())
        assert rel < 1e-5, f"{case}: {name} relative error {rel:.2e} against the single-process run"
        assert not torch.equal(p, init[name].detach())
    assert _nan_equal(r0["metrics"]) == _nan_equal(r1["metrics"]), f"{case}: metrics differ between ranks"
    for got, want in zip(r0["metrics"], single_metrics):
        for key in ("g1_norm", "g2_norm", "gr_rel", "perturb_ratio", "reuse_cos"):
            if key in want:  # g2_norm, perturb_ratio: NaN on a reuse step
                assert got[key] == pytest.approx(want[key], rel=1e-4, nan_ok=True), f"{case}: {key}"
    if case == "reuse":  # full, reuse (a correction applied without a second pass), full
        assert single_metrics[1]["gr_rel"] > 0 and single_metrics[1]["g2_norm"] != single_metrics[1]["g2_norm"]
        assert "reuse_cos" in single_metrics[2] and "reuse_cos" in r0["metrics"][2]


def test_fsdp2_bf16_mixed_precision_perturbation_survives_the_cast(run):
    c0, c1 = torch.load(run / "checks_rank0.pt"), torch.load(run / "checks_rank1.pt")
    for rounding in ("stochastic", "nearest"):
        for c in (c0, c1):
            assert c[rounding]["on_bf16_grid"], f"{rounding}: θ' written into the fp32 shard is not bf16-exact"
            assert c[rounding]["restored_bitwise"], f"{rounding}: fp32 shard not restored bitwise"
        assert c0[rounding]["perturb_ratio"] == c1[rounding]["perturb_ratio"]
    assert c0["stochastic"]["moved"] + c1["stochastic"]["moved"] > 0


def test_fsdp2_refusals(run):
    c0 = torch.load(run / "checks_rank0.pt")
    assert "FSDP1" in c0["fsdp1"] and "fully_shard" in c0["fsdp1"]
    assert "estimator='exact'" in c0["exact"] and "'forward'" in c0["exact"]
