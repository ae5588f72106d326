"""The warnings that name the knob (``grkernels.diagnostics.Watch``, fed by ``GREngine.finish``'s one host read).

Each fires once, and only in its case: gr_rel < 1% averaged over 20 full GR steps at a fixed strength; perturb_ratio
outside the estimator's band on bf16/fp16 weights (from the first GR step, median of the last ≤ 10). None with the
adaptive strength, none on fp32 weights, none when gr_rel is healthy. gr_rel is set exactly here: on L = s·½θᵀHθ
with clips inactive, gr_rel = γ·s·‖H²θ‖/‖Hθ‖, computed independently in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from grkernels import GradReg
from grkernels.diagnostics import BANDS, Watch

WEAK = "doing almost nothing"
RATIO = "perturbation of the low-precision weights"


class Quadratic:
    """L = s·½θᵀHθ (float64, H diagonal with entries in [1, 10]); ‖g1‖ < 1, so the clips at 10 are inactive."""

    def __init__(self, n: int = 9, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.h = torch.linspace(1.0, 10.0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        self.theta = torch.nn.Parameter(0.01 * torch.randn(n, generator=g, dtype=torch.float64))
        self.scale = 1.0

    def r(self) -> float:
        """gr_rel per unit γ: ‖H·g1‖/‖g1‖ with g1 = s·H·θ."""
        g1 = self.scale * self.h * self.theta.detach()
        return float((self.h * g1).norm() / g1.norm())

    def closure(self):
        def run() -> torch.Tensor:
            loss = self.scale * 0.5 * (self.h * self.theta.square()).sum()
            loss.backward()
            return loss

        return run


def steps(opt: GradReg, closure, n: int, before=None) -> list[list[str]]:
    """Run n steps; the GradReg warnings of each (``before(i)`` runs ahead of step i)."""
    out = []
    for i in range(n):
        if before is not None:
            before(i)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            opt.step(closure)
        out.append([str(w.message) for w in got if "GradReg" in str(w.message)])
    return out


def fixed(q: Quadratic, gamma: float, **kw) -> GradReg:
    return GradReg(torch.optim.SGD([q.theta], lr=0.0), strength=gamma, exclude=[], backend="torch", **kw)


# ---------------------------------------------------------------------------------------------- GR doing nothing
def test_weak_gr_warns_once_at_the_twentieth_gr_step_naming_the_knob():
    q = Quadratic()
    opt = fixed(q, 0.004 / q.r())  # gr_rel = 0.4%
    got = steps(opt, q.closure(), 45)
    assert opt.metrics()["gr_rel"] == pytest.approx(0.004, rel=1e-9)
    assert [i for i, w in enumerate(got) if w] == [19]
    (msg,) = got[19]
    assert WEAK in msg and "Raise strength" in msg and "strength='auto'" in msg and "target_rel" in msg


def test_warnings_point_at_the_callers_step():
    """The warning is attributed to the line that called step(), on the closure and the two-phase paths."""
    q = Quadratic(seed=5)
    opt = fixed(q, 0.001 / q.r())
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(20):
            opt.step(q.closure())
    (w,) = [w for w in got if WEAK in str(w.message)]
    assert w.filename == __file__ and w.category is UserWarning
    m = LowPrecision(torch.bfloat16, 0.05)
    opt = GradReg(torch.optim.SGD([m.theta], lr=0.0), strength=1.0, eps=1e-3, eps_mode="absolute", exclude=[],
                  rounding="nearest")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        m.closure()()
        opt.perturb()
        m.closure()()
        opt.step()
    (w,) = [w for w in got if RATIO in str(w.message)]
    assert w.filename == __file__


@pytest.mark.parametrize("rel, fires", [(0.0099, True), (0.0101, False), (0.3, False), (30.0, False)])
def test_weak_gr_threshold(rel, fires):
    q = Quadratic(seed=1)
    got = steps(fixed(q, rel / q.r()), q.closure(), 25)
    assert any(WEAK in m for w in got for m in w) == fires
    assert not any(RATIO in m for w in got for m in w)  # fp32 weights: never the perturbation warning


def test_weak_gr_uses_the_mean_of_the_last_twenty_gr_steps():
    """gr_rel changes with the loss scale (H·g1 scales with s², g1 with s): high for 12 steps, then low. The warning
    fires at the first step whose last-20 mean, computed here from the exact gr_rel per step, is below 1%."""
    q = Quadratic(seed=2)
    gamma = 0.05 / q.r()  # gr_rel = 5% at s = 1
    scales = [1.0] * 12 + [0.02] * 60  # then gr_rel = 0.1%

    def before(i):
        q.scale = scales[i]

    opt = fixed(q, gamma)
    rels = [0.05 * s for s in scales]  # γ·r(s), r(s) = r(1)·s
    expect = next(i for i in range(19, len(scales)) if sum(rels[i - 19:i + 1]) / 20 < 0.01)
    got = steps(opt, q.closure(), len(scales), before)
    assert [i for i, w in enumerate(got) if w] == [expect]


def test_only_full_gr_steps_count():
    q = Quadratic(seed=3)
    opt = fixed(q, 0.002 / q.r(), every=3, warmup_steps=4)
    got = steps(opt, q.closure(), 4 + 3 * 20)
    assert [i for i, w in enumerate(got) if w] == [4 + 3 * 19]  # the 20th full GR step


@pytest.mark.parametrize("target", [0.001, 0.3])
def test_no_warning_with_the_adaptive_strength(target):
    q = Quadratic(seed=4)
    opt = GradReg(torch.optim.SGD([q.theta], lr=0.0), strength="auto", target_rel=target, exclude=[],
                  backend="torch")
    got = steps(opt, q.closure(), 60)
    assert opt.metrics()["gr_rel"] == pytest.approx(target, rel=1e-6)
    assert not any(got)


# ---------------------------------------------------------------------------------------------- perturb_ratio
class LowPrecision:
    """L = ½Σ h·θ² in float32 over weights of ``dtype`` ~ N(0, 0.02²) (LLM-like magnitudes: ulp(0.02) ≈ 1.2e-4 in
    bf16), n = 4096, ‖g1‖ ≈ s·0.7·√n·0.02·mean(h)."""

    def __init__(self, dtype: torch.dtype, scale: float = 1.0, n: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.h = torch.linspace(1.0, 3.0, n)
        self.theta = torch.nn.Parameter((0.02 * torch.randn(n, generator=g)).to(dtype))
        self.scale = scale

    def closure(self):
        def run() -> torch.Tensor:
            loss = self.scale * 0.5 * (self.h * self.theta.float().square()).sum()
            loss.backward()
            return loss

        return run


def ratio_run(dtype, n_steps=12, scale=1.0, **kw):
    m = LowPrecision(dtype, scale)
    opt = GradReg(torch.optim.SGD([m.theta], lr=0.0), strength=1.0, exclude=[], **kw)
    got = steps(opt, m.closure(), n_steps)
    return got, opt.metrics()["perturb_ratio"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding, what", [("nearest", "erased"), ("stochastic", "noisy")])
def test_absolute_eps_on_low_precision_weights_gets_the_pointer_at_the_first_step(dtype, rounding, what):
    """The paper's ε = 1e-3 with ‖g1‖ ≈ 0.1 on bf16/fp16 weights: ‖ε·v‖ per weight ≈ 2e-6, far below the weights'
    ulp. Round-to-nearest erases the perturbation, stochastic rounding drowns it in noise; the first GR step
    warns, naming eps_mode='radius' and its ε, once."""
    got, ratio = ratio_run(dtype, eps=1e-3, eps_mode="absolute", rounding=rounding, scale=0.05)
    lo, hi = BANDS["forward"]
    assert (ratio < lo) if what == "erased" else (ratio > hi)
    assert [i for i, w in enumerate(got) if w] == [0]
    (msg,) = got[0]
    assert RATIO in msg and what in msg and "eps_mode='radius'" in msg and "eps=0.02" in msg


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_safe_settings_on_low_precision_weights_are_quiet(rounding):
    """Radius ε = 0.02 (the recommended setting), and absolute ε where ε·‖clip(g1)‖ is large (g1 clipped at 10,
    ε = 1e-2: ‖θ' − θ‖ = 0.1), keep perturb_ratio in band: no warning. The same settings on fp32: none either."""
    for dtype in (torch.bfloat16, torch.float32):
        got, ratio = ratio_run(dtype, n_steps=15, eps=0.02, eps_mode="radius", rounding=rounding, scale=0.05)
        assert BANDS["forward"][0] <= ratio <= BANDS["forward"][1] and not any(got)
        got, ratio = ratio_run(dtype, n_steps=15, eps=1e-2, eps_mode="absolute", rounding=rounding, scale=30.0)
        assert BANDS["forward"][0] <= ratio <= BANDS["forward"][1] and not any(got)
    # fp32 weights are not watched (the brief's "none on fp32"), even where a tiny ε meets fp32's own rounding
    got, ratio = ratio_run(torch.float32, eps=1e-9, eps_mode="absolute", rounding=rounding, scale=0.05)
    assert not BANDS["forward"][0] <= ratio <= BANDS["forward"][1] and not any(got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.05, 30.0])
def test_low_precision_weights_at_the_defaults_keep_the_perturbation(dtype, scale):
    """``GradReg(opt)`` with nothing set on bf16/fp16 weights: the defaults (radius ε = 0.02, stochastic rounding)
    keep perturb_ratio in the forward band at small and large gradients alike, so the perturbation warning stays
    quiet; the same weights at the paper's absolute ε = 1e-3 and the small gradients warn (test above)."""
    m = LowPrecision(dtype, scale)
    opt = GradReg(torch.optim.SGD([m.theta], lr=0.0), exclude=[])
    assert (opt.eps_mode, opt.eps, opt.rounding, opt.estimator) == ("radius", 0.02, "stochastic", "forward")
    got = steps(opt, m.closure(), 15)
    lo, hi = BANDS["forward"]
    assert lo <= opt.metrics()["perturb_ratio"] <= hi
    assert not any(RATIO in msg for w in got for msg in w), got


def test_radius_mode_pointer_says_raise_eps():
    got, _ = ratio_run(torch.bfloat16, eps=1e-5, eps_mode="radius", rounding="nearest")
    (msg,) = [m for w in got for m in w]
    assert "erased" in msg and "raise eps" in msg and "eps_mode='radius'" not in msg


# ---------------------------------------------------------------------------------------------- the Watch alone
def host(rel=0.3, ratio=1.0, low=True):
    return {"gr_rel": rel, "perturb_ratio": ratio, "low_precision": low, "finite": True}


@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_ratio_band_edges_per_estimator(estimator):
    lo, hi = BANDS[estimator]
    for value, fires in [(lo, False), (hi, False), (lo * 0.99, True), (hi * 1.01, True), (math.nan, False)]:
        w = Watch()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            w.observe(host(ratio=value), auto=False, eps_mode="absolute", estimator=estimator)
        assert bool(got) == fires, (value, estimator)
    assert BANDS["central"][1] > BANDS["forward"][1]  # central tolerates more rounding noise (BENCHMARKS.md)


def test_ratio_is_the_median_of_the_last_ten_and_fires_once():
    w = Watch()
    values = [1.0] * 10 + [5.0] * 4 + [5.0] * 10  # the median leaves the band at the 6th high value (of the last 10)
    fired = []
    for i, v in enumerate(values):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            w.observe(host(ratio=v), auto=True, eps_mode="radius")
        if got:
            fired.append(i)
    window = [values[max(0, i - 9):i + 1] for i in range(len(values))]
    expect = next(i for i, win in enumerate(window) if sorted(win)[len(win) // 2] > BANDS["forward"][1])
    assert fired == [expect]


def test_no_ratio_warning_on_fp32_or_the_exact_estimator():
    for kw in ({"low": False}, {}):
        w = Watch()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            for _ in range(15):
                w.observe(host(ratio=50.0, **kw), auto=False, eps_mode="absolute",
                          estimator="forward" if kw else "exact")
        assert not got
