"""GR outside Trainers: the plain-loop, Accelerate and Lightning-style examples, and ReferenceReset."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from grkernels.integrations.reference_reset import ReferenceReset, mix_into_reference

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- plain loop
def test_plain_loop_two_phase_accumulation_equals_closure_on_full_batch():
    pytest.importorskip("transformers")
    ex = load_example("plain_loop")
    common = ["--steps", "4", "--batch", "8", "--quiet", "--strength", "0.1", "--reset-every", "2"]
    acc = ex.main([*common, "--grad-accum", "2"])
    full = ex.main([*common, "--grad-accum", "1"])
    # equal-size micro-batches with loss/GA: the same loss, hence the same GR step as the closure on the batch
    assert torch.allclose(torch.tensor(acc["loss"]), torch.tensor(full["loss"]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.tensor(acc["gr_rel"]), torch.tensor(full["gr_rel"]), rtol=1e-3, atol=1e-6)
    assert acc["resets"] == 2 and all(r > 0 for r in acc["gr_rel"])  # GR was active, resets happened
    assert acc["loss"][-1] < acc["loss"][0]


# ---------------------------------------------------------------- accelerate
def test_accelerate_loop_accumulation_matches_single_batch():
    pytest.importorskip("accelerate")
    ex = load_example("accelerate_loop")
    a = ex.main(["--steps", "3", "--micro-batch", "4", "--grad-accum", "2", "--quiet", "--strength", "0.1"])
    b = ex.main(["--steps", "3", "--micro-batch", "8", "--grad-accum", "1", "--quiet", "--strength", "0.1"])
    assert torch.allclose(torch.tensor(a["loss"]), torch.tensor(b["loss"]), rtol=1e-5, atol=1e-6)
    # (parameters are not compared elementwise: AdamW's first steps turn fp32 rounding noise in near-zero
    # gradient entries into ±lr updates; the losses above depend on all parameters)
    assert torch.allclose(torch.tensor(a["gr_rel"]), torch.tensor(b["gr_rel"]), rtol=1e-3, atol=1e-6)
    assert all(r > 0 for r in a["gr_rel"])


def test_accelerate_loop_adaptive_strength():
    """--strength auto: the window's settings reach the engine; the logged γ moves between steps."""
    pytest.importorskip("accelerate")
    ex = load_example("accelerate_loop")
    out = ex.main(["--steps", "3", "--micro-batch", "4", "--grad-accum", "2", "--quiet", "--strength", "auto",
                   "--target-rel", "0.3"])
    assert out["strength"][0] == pytest.approx(1e-2) and len(set(out["strength"])) == 3  # strength_init: 1e-2


# ---------------------------------------------------------------- Lightning (the gradient: test_integration_lightning)
def test_lightning_example_trains_with_accumulation():
    pytest.importorskip("lightning")
    ex = load_example("lightning_loop")
    out = ex.main(["--epochs", "2", "--accumulate", "3", "--clip", "1.0"])
    assert out["global_step"] == 2 * 5  # 15 micro-batches per epoch, windows of 3: one optimizer step each
    assert out["gr_rel"] > 0 and out["losses"][-1] < out["losses"][0]
    bf16 = ex.main(["--epochs", "1", "--accumulate", "3", "--clip", "1.0", "--precision", "bf16-mixed",
                    "--strength", "auto"])  # the documented recipe: bf16-mixed, clipping, the adaptive strength
    assert bf16["global_step"] == 5 and bf16["gr_rel"] > 0 and bf16["strength"] != pytest.approx(1e-2)


# ---------------------------------------------------------------- reference resets
def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    pol = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    ref = copy.deepcopy(pol).to(dtype)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(torch.randn_like(p))
    return ref, pol


def test_reference_reset_hard_every_n():
    ref, pol = _pair()
    before = copy.deepcopy(ref.state_dict())
    rr = ReferenceReset(ref, pol, every=3)
    assert [rr.step() for _ in range(6)] == [False, False, True, False, False, True]
    assert rr.resets == 2
    for (n, r), p in zip(ref.named_parameters(), pol.parameters()):
        assert torch.equal(r, p), n
    assert not all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_mixup_alpha(dtype):
    ref, pol = _pair(dtype)
    r0 = [p.detach().float().clone() for p in ref.parameters()]
    mix_into_reference(ref, pol, alpha=0.6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for r, a, p in zip(ref.parameters(), r0, pol.parameters()):
        assert r.dtype == dtype
        torch.testing.assert_close(r.float(), 0.6 * p.detach() + 0.4 * a, rtol=tol, atol=tol)


def test_reference_reset_errors():
    ref, pol = _pair()
    with pytest.raises(ValueError, match="alpha"):
        ReferenceReset(ref, pol, every=2, alpha=0.0)
    with pytest.raises(ValueError, match="every"):
        ReferenceReset(ref, pol, every=0)
    with pytest.raises(ValueError, match="same module"):
        ReferenceReset(pol, pol, every=1)
    other = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 4))
    with pytest.raises(ValueError, match="shape"):
        mix_into_reference(other, pol)
    with pytest.raises(ValueError, match="names"):
        mix_into_reference(nn.Linear(4, 5), pol)
    rr = ReferenceReset(ref, pol, every=2)
    rr.step()
    rr2 = ReferenceReset(ref, pol, every=2)
    rr2.load_state_dict(rr.state_dict())
    assert rr2.step() is True
