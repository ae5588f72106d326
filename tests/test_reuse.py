"""The correction reuse (grkernels.reuse.CorrectionReuse) against an independent float64 recomputation, for each
implementation (the torch reference, the C++ passes, the Triton kernels under the interpreter): the stored
correction, ρ and reuse_cos of a full step, the gradient of a step in between, at odd sizes, many tensors, mixed
dtypes, elements of 3e19 and 1e-25, a zero g1, c parallel to g1, positions that changed, a non-finite full step,
sharded sums (two threads all-reducing); bitwise undo (bf16 NaN payloads included); the C++ ops' opcheck and
thread-count independence.
"""

from __future__ import annotations

import threading

import pytest
import torch
from gr_helpers import bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import grkernels.reuse as reuse_module
from grkernels.backends.base import Shards
from grkernels.kernels import cpp_reuse, triton_usable
from grkernels.reuse import CorrectionReuse

IMPLS = ["torch",
         pytest.param("cpp", marks=pytest.mark.skipif(not cpp_reuse.available(),
                                                      reason="grkernels._C without the reuse ops")),
         pytest.param("triton", marks=pytest.mark.skipif(reuse_module.triton_reuse is None or not triton_usable("cpu"),
                                                         reason="triton (interpreter) not available here"))]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


# ------------------------------------------------------------------------------------------------ drivers
def _params(grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g.clone()
        out.append(p)
    return out


def _full_step(r, positions, g1, gr, finite=True, gamma=1.0, shards=None, commit=True):
    """capture at g1, the combine writes gr, store; returns (metrics, params)."""
    shards = shards or Shards()
    ps = _params(g1)
    r.capture(ps, positions, shards)
    for p, x in zip(ps, gr):
        p.grad.copy_(x)
    out = r.store(ps, positions, shards, torch.tensor(finite), gamma)
    if commit:
        r.commit()
    return out, ps


def _reuse_step(r, positions, g1, gamma=1.0, shards=None):
    """apply on fresh parameters holding g1; returns (the gradients after it, metrics, undo)."""
    ps = _params(g1)
    m, undo = r.apply(ps, positions, gamma, shards or Shards())
    return [p.grad for p in ps], m, undo


def _rand(gen, shape, dtype, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------- the float64 recomputation
def _flat(ts):
    return torch.cat([t.double().reshape(-1) for t in ts]) if ts else torch.zeros(0, dtype=torch.float64)


def _rho64(c, g1):
    """ρ = ‖c⊥‖/‖g1‖, c⊥ = c − (⟨c, g1⟩/‖g1‖²)·g1 (flat float64)."""
    gg = g1 @ g1
    perp = c - (c @ g1) / gg * g1
    return float(perp.norm() / gg.sqrt())


def _reused64(g1, c, rho, scale):
    """g1 + scale·ρ·‖g1‖·d/‖d‖, d = c − (⟨c, g1⟩/‖g1‖²)·g1 (flat float64); g1 where g1 = 0 or d = 0."""
    gg = g1 @ g1
    if gg == 0:
        return g1.clone()
    d = c - (c @ g1) / gg * g1
    if d.norm() <= 2.0**-20 * c.norm():
        return g1.clone()
    return g1 + scale * rho * gg.sqrt() * d / d.norm()


def _stored(r, positions, like):
    """The stored correction laid out like ``like`` at ``positions`` (float64; zeros where none matches)."""
    sd = r.state()
    by_pos = dict(zip(sd["index"], sd["c"]))
    out = []
    for i, g in zip(positions, like):
        c = by_pos.get(i)
        out.append(c.double() if c is not None and c.shape == g.shape else torch.zeros(g.shape, dtype=torch.float64))
    return out


def _close(got, expected, tol):
    got = _flat(got)
    scale = expected.norm()
    return float((got - expected).norm()) <= tol * float(scale) + 1e-300


def _tol(dtypes):
    return max(8 * EPS[d] for d in dtypes) if torch.bfloat16 not in dtypes else 2e-2


def _check_cycle(impl, specs, seed, scale=1.0, gamma_full=1.0, gamma_now=1.0):
    """A full step then a step in between at ``specs`` [(dtype, shape)]; every result against float64."""
    gen = torch.Generator().manual_seed(seed)
    positions = list(range(len(specs)))
    g0 = [_rand(gen, s, d, scale) for d, s in specs]
    gr = [(g.double() + _rand(gen, s, torch.float64, 0.7 * scale)).to(d) for g, (d, s) in zip(g0, specs)]
    r = CorrectionReuse(impl)
    _full_step(r, positions, g0, gr, gamma=gamma_full)
    if impl != "torch" and all(d != torch.float64 for d, _ in specs):
        assert r.last_path == impl
    sd = r.state()
    exact_c = [x.double() - g.double() for x, g in zip(gr, g0)]
    for c, e, (d, _) in zip(sd["c"], exact_c, specs):  # c = GR − g1, rounded once onto the gradient's dtype
        assert c.dtype == d
        assert torch.all((c.double() - e).abs() <= EPS[d] * e.abs() + torch.finfo(d).tiny)
    c64, g064 = _flat(sd["c"]), _flat(g0)
    rho = _rho64(c64, g064) if g064.norm() > 0 else 0.0
    assert float(sd["rho"]) == pytest.approx(rho, rel=1e-5, abs=1e-30)
    g1 = [_rand(gen, s, d, scale) for d, s in specs]
    got, m, undo = _reuse_step(r, positions, g1, gamma=gamma_now)
    expected = _reused64(_flat(g1), c64, rho, gamma_now / gamma_full)
    dtypes = [d for d, _ in specs]
    assert _close(got, expected, _tol(dtypes))
    if all(d in (torch.float32, torch.float64) for d in dtypes):  # the correction itself, not just the sum
        assert _close([a.double() - b.double() for a, b in zip(got, g1)], expected - _flat(g1), 1e-4)
    assert float(m["gr_rel"]) == pytest.approx(gamma_now / gamma_full * rho, rel=1e-5)
    assert bitwise_equal([g for _, g in undo], g1)
    return r


# ------------------------------------------------------------------------------------------------ the cases
@pytest.mark.parametrize("impl", IMPLS)
def test_a_cycle_matches_float64_at_odd_sizes_and_many_tensors(impl):
    specs = [(torch.float32, (n,)) for n in (1, 3, 17, 511, 513, 1000, 65537)]
    specs += [(torch.float32, (7, 13)), (torch.float32, (0,))] + [(torch.float32, (5,))] * 30
    _check_cycle(impl, specs, seed=1, gamma_full=2.0, gamma_now=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,), (torch.float16,), (torch.float32, torch.bfloat16),
                                    (torch.float64, torch.float32)])
def test_a_cycle_matches_float64_with_each_dtype_and_mixed(impl, dtypes):
    specs = [(dtypes[i % len(dtypes)], (n,)) for i, n in enumerate((33, 700, 9, 1025))]
    r = _check_cycle(impl, specs, seed=2)
    if impl != "torch" and torch.float64 in dtypes:  # the kernels do not take float64: the reference, said so
        assert r.last_path.startswith("torch (float64")


def test_the_reference_in_small_chunks_matches_float64(monkeypatch):
    """The torch reference works a chunk of ``_CHUNK`` elements at a time: with chunks of 100, tensors cross many
    chunk boundaries (odd tails, bf16 through float32 chunk by chunk)."""
    monkeypatch.setattr(reuse_module, "_CHUNK", 100)
    specs = [(torch.float32, (1001,)), (torch.bfloat16, (333,)), (torch.float16, (99,)), (torch.float32, (100,))]
    _check_cycle("torch", specs, seed=13)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_gradients_match_float64(impl):
    """Transposed gradients (the C++ passes do not take them: the step runs the reference, and says so)."""
    gen = torch.Generator().manual_seed(14)
    shapes = [(13, 7), (40, 3)]
    g0 = [_rand(gen, s, torch.float32).t() for s in shapes]
    gr = [(g + _rand(gen, s, torch.float32).t()) for g, s in zip(g0, shapes)]
    r = CorrectionReuse(impl)
    _full_step(r, [0, 1], g0, gr)
    if impl != "torch":
        assert r.last_path.startswith("torch (")
    c = r.state()["c"]
    assert [tuple(x.shape) for x in c] == [(7, 13), (3, 40)]
    rho = _rho64(_flat(c), _flat(g0))
    g1 = [_rand(gen, s, torch.float32).t() for s in shapes]
    got, m, _ = _reuse_step(r, [0, 1], g1)
    assert not got[0].is_contiguous()
    assert _close(got, _reused64(_flat(g1), _flat(c), rho, 1.0), 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [3e19 / 4, 1e-25])
def test_huge_and_tiny_elements_match_float64(impl, scale):
    """Elements of ~3e19 (Σg² overflows float32) and ~1e-25 (the squares underflow it)."""
    specs = [(torch.float32, (n,)) for n in (300, 41, 2000)]
    _check_cycle(impl, specs, seed=3, scale=scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,power", [(torch.float32, 60), (torch.float32, -80), (torch.float64, 700),
                                         (torch.float64, -700)])
def test_a_step_in_between_is_homogeneous_in_g1_bitwise(impl, dtype, power):
    """Scaling g1 by a power of two scales the reused gradient by it exactly (float32 at 2^60 / 2^-80; float64 at
    2^±700, where unscaled float64 products would overflow or underflow)."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(257,), (3, 5), (1,)]
    g0 = [_rand(gen, s, dtype) for s in shapes]
    gr = [g + _rand(gen, s, dtype, 0.5) for g, s in zip(g0, shapes)]
    g1 = [_rand(gen, s, dtype) for s in shapes]
    runs = []
    for f in (1.0, 2.0**power):
        r = CorrectionReuse(impl)
        _full_step(r, [0, 1, 2], g0, gr)
        got, m, _ = _reuse_step(r, [0, 1, 2], [g * f for g in g1])
        assert float(m["gr_rel"]) > 0
        runs.append(got)
    assert bitwise_equal([g * 2.0**power for g in runs[0]], runs[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_g1_and_c_parallel_to_g1_apply_nothing(impl):
    gen = torch.Generator().manual_seed(5)
    shapes = [(100,), (31,)]
    g0 = [_rand(gen, s, torch.float32) for s in shapes]
    gr = [g + _rand(gen, s, torch.float32) for g, s in zip(g0, shapes)]
    r = CorrectionReuse(impl)
    _full_step(r, [0, 1], g0, gr)
    c = r.state()["c"]
    for g1 in ([torch.zeros(s) for s in shapes], [x * 0.5 for x in c], [x * 3.0 for x in c]):  # d = 0 / rounding
        got, m, _ = _reuse_step(r, [0, 1], g1)
        assert bitwise_equal(got, g1)  # nothing applied: every bit of g1 kept, no NaN
        assert float(m["gr_rel"]) == 0.0
    # a full step whose g1 is zero stores ρ = 0 (no finite ratio to ‖g1‖): reuse then applies nothing
    _full_step(r, [0, 1], [torch.zeros(s) for s in shapes], gr)
    assert float(r.state()["rho"]) == 0.0
    g1 = [_rand(gen, s, torch.float32) for s in shapes]
    got, m, _ = _reuse_step(r, [0, 1], g1)
    assert bitwise_equal(got, g1) and float(m["gr_rel"]) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_positions_that_changed_use_what_matches(impl):
    """Stored at positions 0, 1, 2; the step in between has 2, 0, 5 and 1 with another shape: c of 2 and 0 apply,
    5 (none stored) and 1 (shape changed) count as zeros in ⟨c, g1⟩ and ‖d‖ and get the (1 − k·β)·g1 part."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(40,), (9,), (77,)]
    g0 = [_rand(gen, s, torch.float32) for s in shapes]
    gr = [g + _rand(gen, s, torch.float32) for g, s in zip(g0, shapes)]
    r = CorrectionReuse(impl)
    _full_step(r, [0, 1, 2], g0, gr)
    rho = _rho64(_flat(r.state()["c"]), _flat(g0))
    positions, new_shapes = [2, 0, 5, 1], [(77,), (40,), (12,), (3, 3)]
    g1 = [_rand(gen, s, torch.float32) for s in new_shapes]
    c = _stored(r, positions, g1)
    assert float(c[2].abs().sum()) == 0 and float(c[3].abs().sum()) == 0 and float(c[0].abs().sum()) > 0
    got, m, _ = _reuse_step(r, positions, g1)
    assert _close(got, _reused64(_flat(g1), _flat(c), rho, 1.0), 1e-6)
    # a store at the new layout replaces the old one; nothing of the old layout matches: no reuse_cos
    out, _ = _full_step(r, [7], [torch.ones(4)], [torch.full((4,), 2.0)])
    assert out == {} and r.state()["index"] == [7]
    got, m, undo = _reuse_step(r, [0, 1], [torch.ones(40), torch.ones(9)])
    assert m == {} and undo == []  # nothing stored matches: a no-op


@pytest.mark.parametrize("impl", IMPLS)
def test_reuse_cos_is_the_cosine_of_the_predicted_and_the_full_correction(impl):
    gen = torch.Generator().manual_seed(7)
    specs = [(torch.float32, (300,)), (torch.bfloat16, (45,))]
    g0 = [_rand(gen, s, d) for d, s in specs]
    gr0 = [(g.double() + _rand(gen, s, torch.float64)).to(d) for g, (d, s) in zip(g0, specs)]
    r = CorrectionReuse(impl)
    out, _ = _full_step(r, [0, 1], g0, gr0)
    assert out == {}  # nothing stored before: no prediction
    c_old = _flat(r.state()["c"])
    g1 = [_rand(gen, s, d) for d, s in specs]
    gr1 = [(g.double() + 0.5 * c.double() + _rand(gen, s, torch.float64, 0.5)).to(d)
           for g, c, (d, s) in zip(g1, r.state()["c"], specs)]
    out, _ = _full_step(r, [0, 1], g1, gr1)
    n, g = _flat(r.state()["c"]), _flat(g1)
    d = c_old - (c_old @ g) / (g @ g) * g
    cos = float((d @ n) / (d.norm() * n.norm()))
    assert float(out["reuse_cos"]) == pytest.approx(cos, abs=1e-5)
    assert 0.2 < cos < 0.95  # a real test: neither orthogonal nor parallel


@pytest.mark.parametrize("impl", IMPLS)
def test_a_non_finite_full_step_keeps_the_previous_correction_and_rollback_leaves_no_trace(impl):
    gen = torch.Generator().manual_seed(8)
    shapes = [(64,), (5,)]
    g0 = [_rand(gen, s, torch.float32) for s in shapes]
    gr = [g + _rand(gen, s, torch.float32) for g, s in zip(g0, shapes)]
    r = CorrectionReuse(impl)
    _full_step(r, [0, 1], g0, gr, gamma=2.0)
    before = r.state()
    bad = [x.clone() for x in gr]
    bad[1][2] = float("nan")
    _full_step(r, [0, 1], g0, bad, finite=False, gamma=3.0)
    after = r.state()
    assert bitwise_equal(after["c"], before["c"]) and torch.equal(after["rho"], before["rho"])
    assert float(after["gamma"]) == 2.0
    # an aborted full step (stored, not committed): rollback puts the committed correction back
    g1 = [_rand(gen, s, torch.float32) for s in shapes]
    _full_step(r, [0, 1], g1, [g * 2 for g in g1], commit=False)
    assert r.state()["index"] == [0, 1] and bitwise_equal(r.state()["c"], before["c"])  # pending: not in state()
    assert r.extra_bytes() == 2 * sum(4 * s[0] for s in shapes)  # the new correction and the old one
    r.rollback()
    assert bitwise_equal(r.state()["c"], before["c"]) and torch.equal(r.state()["rho"], before["rho"])
    assert r.extra_bytes() == sum(4 * s[0] for s in shapes)
    # a capture without a store (aborted before the combine) is dropped too
    r.capture(_params(g1), [0, 1], Shards())
    r.rollback()
    assert r.extra_bytes() == sum(4 * s[0] for s in shapes)


@pytest.mark.parametrize("impl", IMPLS)
def test_undo_gives_g1_back_bitwise_including_bf16_nan_payloads(impl):
    gen = torch.Generator().manual_seed(9)
    shapes = [(50,), (7,)]
    g0 = [_rand(gen, s, torch.bfloat16) for s in shapes]
    gr = [(g.double() + _rand(gen, s, torch.float64)).to(torch.bfloat16) for g, s in zip(g0, shapes)]
    r = CorrectionReuse(impl)
    _full_step(r, [0, 1], g0, gr)
    finite_g1 = [_rand(gen, s, torch.bfloat16) for s in shapes]
    nan_g1 = [x.clone() for x in finite_g1]
    bits = nan_g1[0].view(torch.int16)
    bits[3] = torch.tensor(0xFFA5 - 0x10000, dtype=torch.int16)  # a negative signalling NaN with a payload
    bits[4] = torch.tensor(-0x8000, dtype=torch.int16)  # −0
    for g1 in (finite_g1, nan_g1):
        got, m, undo = _reuse_step(r, [0, 1], g1)
        for grad, saved in undo:
            grad.copy_(saved)  # what the engine's abort does
        assert bitwise_equal(got, g1)
        assert r.extra_bytes() == sum(2 * s[0] for s in shapes) * 2  # c and the undo copy, until the step ends
        r.commit()
        assert r.extra_bytes() == sum(2 * s[0] for s in shapes)


class _ThreadShards(Shards):
    """Two "ranks" as threads: sum_across all-reduces through a barrier (what FSDP2's Shards does with NCCL)."""

    sharded = True

    def __init__(self, box, barrier, rank):
        self.box, self.barrier, self.rank = box, barrier, rank

    def sum_across(self, x):
        self.box[self.rank] = x.clone()
        self.barrier.wait()
        total = self.box[0] + self.box[1]
        self.barrier.wait()
        return total


@pytest.mark.parametrize("impl", IMPLS)
def test_sharded_sums_match_the_unsharded_float64_rule(impl, monkeypatch):
    """Each of two ranks holds half of every tensor (different sizes per rank): ρ, reuse_cos and the step in
    between equal the float64 rule on the whole tensors."""
    if impl == "triton":  # Triton's CPU interpreter is not thread-safe: one launch at a time (never across a sum)
        lock = threading.Lock()
        for name in ("reuse_sums", "reuse_update", "reuse_store"):
            fn = getattr(reuse_module.triton_reuse, name)

            def locked(*a, _fn=fn):
                with lock:
                    return _fn(*a)

            monkeypatch.setattr(reuse_module.triton_reuse, name, locked)
    gen = torch.Generator().manual_seed(10)
    whole = [(101,), (64,), (9,)]
    cut = [50, 40, 4]
    g0 = [_rand(gen, s, torch.float32) for s in whole]
    gr0 = [g + _rand(gen, s, torch.float32) for g, s in zip(g0, whole)]
    g1 = [_rand(gen, s, torch.float32) for s in whole]
    gr1 = [g + _rand(gen, s, torch.float32) for g, s in zip(g1, whole)]
    g2 = [_rand(gen, s, torch.float32) for s in whole]

    def part(ts, rank):
        return [t[:k].clone() if rank == 0 else t[k:].clone() for t, k in zip(ts, cut)]

    box, barrier, results, errors = [None, None], threading.Barrier(2), [None, None], []

    def rank_main(rank):
        try:
            sh = _ThreadShards(box, barrier, rank)
            r = CorrectionReuse(impl)
            _full_step(r, [0, 1, 2], part(g0, rank), part(gr0, rank), shards=sh)
            out, _ = _full_step(r, [0, 1, 2], part(g1, rank), part(gr1, rank), shards=sh)
            got, m, _ = _reuse_step(r, [0, 1, 2], part(g2, rank), shards=sh)
            results[rank] = (float(r.state()["rho"]), float(out["reuse_cos"]), got, float(m["gr_rel"]))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    c0 = _flat(gr0) - _flat(g0)
    c1 = _flat(gr1) - _flat(g1)
    rho1 = _rho64(c1, _flat(g1))
    d = c0 - (c0 @ _flat(g1)) / (_flat(g1) @ _flat(g1)) * _flat(g1)
    cos = float((d @ c1) / (d.norm() * c1.norm()))
    got = [torch.cat([a, b]) for a, b in zip(results[0][2], results[1][2])]
    for rank in range(2):
        assert results[rank][0] == pytest.approx(rho1, rel=1e-5)
        assert results[rank][1] == pytest.approx(cos, abs=1e-5)
        assert results[rank][3] == pytest.approx(rho1, rel=1e-5)
    assert _close(got, _reused64(_flat(g2), c1, rho1, 1.0), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_state_round_trip_and_the_flat_pickle_of_0_2(impl):
    """state() → load() reuses the correction bitwise (into each gradient's dtype); an old checkpoint (fp32 c of a
    bf16 gradient, no gamma) loads; a pickled 0.2 CorrectionReuse (flat _c) unpickles into the per-tensor layout."""
    gen = torch.Generator().manual_seed(11)
    specs = [(torch.float32, (30,)), (torch.bfloat16, (6,))]
    g0 = [_rand(gen, s, d) for d, s in specs]
    gr = [(g.double() + _rand(gen, s, torch.float64)).to(d) for g, (d, s) in zip(g0, specs)]
    r = CorrectionReuse(impl)
    _full_step(r, [0, 1], g0, gr, gamma=2.0)
    sd = r.state()
    twin = CorrectionReuse(impl)
    twin.load(sd, _params(g0), 5.0)
    g1 = [_rand(gen, s, d) for d, s in specs]
    a, _, _ = _reuse_step(r, [0, 1], g1)
    b, _, _ = _reuse_step(twin, [0, 1], g1)
    assert bitwise_equal(a, b)
    old = {"index": [0, 1], "c": [c.float() for c in sd["c"]], "rho": sd["rho"].float()}  # 0.2.0: no gamma
    twin.load(old, _params(g0), 2.0)
    assert [c.dtype for c in twin.state()["c"]] == [torch.float32, torch.bfloat16]
    c, _, _ = _reuse_step(twin, [0, 1], g1)
    assert bitwise_equal(a, c)
    flat = CorrectionReuse.__new__(CorrectionReuse)
    flat.__setstate__({"_c": torch.cat([x.float().reshape(-1) for x in sd["c"]]), "_index": (0, 1),
                       "_shapes": [torch.Size([30]), torch.Size([6])], "_rho": sd["rho"], "_gamma": sd["gamma"],
                       "_g1": None, "_pred": None, "_undo": None})
    assert [tuple(x.shape) for x in flat.state()["c"]] == [(30,), (6,)]
    assert torch.equal(flat.state()["c"][0], sd["c"][0])


_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
_sizes = st.one_of(st.integers(0, 40), st.integers(500, 1100), st.just(65536 + 3))


def _hypothesis_cycle(impl, specs, seed):
    specs = [(d, (n,)) for d, n in specs]
    if sum(n for _, (n,) in specs) < 2:
        return  # a single element: g1 ∥ c always (nothing to apply), covered above
    _check_cycle(impl, specs, seed=seed)


@pytest.mark.parametrize("impl", IMPLS[:2])
@settings(max_examples=30, deadline=None)
@given(specs=st.lists(st.tuples(_dtypes, _sizes), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_cycles_match_float64(impl, specs, seed):
    _hypothesis_cycle(impl, specs, seed)


@pytest.mark.parametrize("impl", IMPLS[2:])
@settings(max_examples=8, deadline=None)  # the Triton interpreter is slow: fewer, smaller cases
@given(specs=st.lists(st.tuples(_dtypes, st.integers(0, 1100)), min_size=1, max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_hypothesis_cycles_match_float64_triton(impl, specs, seed):
    _hypothesis_cycle(impl, specs, seed)


# ------------------------------------------------------------------------------------------------ the C++ ops
cpp_only = pytest.mark.skipif(not cpp_reuse.available(), reason="grkernels._C without the reuse ops")


def _op_args():
    gen = torch.Generator().manual_seed(12)
    g = [_rand(gen, (70000,), torch.float32), _rand(gen, (33,), torch.bfloat16), _rand(gen, (5,), torch.float16)]
    c = [_rand(gen, (70000,), torch.float32), torch.empty(0, dtype=torch.bfloat16), _rand(gen, (5,), torch.float32)]
    return g, c


@cpp_only
def test_opcheck_the_reuse_ops():
    ops = torch.ops.grkernels_cpp
    g, c = _op_args()
    torch.library.opcheck(ops.gr_reuse_sums, (g, c, []))
    torch.library.opcheck(ops.gr_reuse_sums, (g, c, [torch.empty_like(x) for x in g]))
    torch.library.opcheck(ops.gr_reuse_update, (g, c, torch.tensor(0.75, dtype=torch.float64),
                                                torch.tensor(0.3, dtype=torch.float64)))
    for finite in (True, False):
        gr = [x + 1 for x in g]
        torch.library.opcheck(ops.gr_reuse_store, (gr, [x.clone() for x in g], c, torch.tensor(finite)))


@cpp_only
def test_the_reuse_ops_refuse_what_they_do_not_take():
    ops = torch.ops.grkernels_cpp
    g, c = _op_args()
    with pytest.raises(RuntimeError, match="float64 runs the torch reference"):
        ops.gr_reuse_sums([g[0].double()], [c[0].double()], [])
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.gr_reuse_sums([g[0].view(700, 100).t()], [c[0]], [])
    with pytest.raises(RuntimeError, match="expected 70000"):
        ops.gr_reuse_sums([g[0]], [c[0][:10]], [])
    with pytest.raises(RuntimeError, match="undo 0 must have g's dtype"):
        ops.gr_reuse_sums([g[0]], [c[0]], [torch.empty(70000, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="has 1 tensors, expected 2"):
        ops.gr_reuse_update(g[:2], c[:1], torch.tensor(1.0), torch.tensor(0.0))


@cpp_only
def test_the_reuse_sums_do_not_depend_on_the_thread_count():
    g, c = _op_args()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        undo = [torch.empty_like(x) for x in g]
        one = cpp_reuse.reuse_sums(g, c, undo)
        gr, buf1 = [x + 1 for x in g], [x.clone() for x in g]
        s1 = cpp_reuse.reuse_store(gr, buf1, c, torch.tensor(True))
        torch.set_num_threads(2)
        two = cpp_reuse.reuse_sums(g, c)
        buf2 = [x.clone() for x in g]
        s2 = cpp_reuse.reuse_store(gr, buf2, c, torch.tensor(True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(s1, s2) and bitwise_equal(buf1, buf2)
    assert bitwise_equal(undo, g)  # the undo copy written by the same pass
    exact = [sum(float((a.double() * b.double()).sum()) for a, b in pairs) for pairs in (
        list(zip(g, g)), [(a, b) for a, b in zip(g, c) if b.numel()], [(b, b) for b in c if b.numel()])]
    assert one.tolist() == pytest.approx(exact, rel=1e-12)
