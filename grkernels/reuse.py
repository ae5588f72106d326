"""Cheaper GR by reusing the last full correction between full GR steps (``GradReg(every=k, reuse=...)``).

A full GR step costs one more forward/backward. With ``every=k`` only every k-th step (counted from the end of
warmup) runs it; the steps between either take the plain gradient (``reuse="none"``) or reuse the last full step's
correction c = GR − g1 in the LookSAM way (Liu et al., CVPR 2022), ``reuse="orthogonal"``:

    full step t0:      c = GR − g1 (on the GR parameters), ρ = ‖c⊥‖/‖g1‖ with c⊥ = c − (⟨c, g1⟩/‖g1‖²)·g1
    step in between:   d = c − β·g1,  β = ⟨c, g1⟩/‖g1‖²     (the stored correction, orthogonal to the CURRENT g1)
                       grad = g1 + k·d = (1 − k·β)·g1 + k·c,  k = scale·ρ·‖g1‖/‖d‖

(scale: the γ multiplier now over that of the full step). The component along g1 (a rescaling of the step, which
adaptive optimizers largely undo) is dropped, and the orthogonal part keeps the size relative to ‖g1‖ it had at the
full step: LookSAM's rule with its α set by the measurement instead of a hyperparameter; ``gr_rel`` of the applied
correction is scale·ρ exactly. Diagnostic ``reuse_cos``: at each full step after the first, the cosine between the
correction reuse would have applied at that step (the direction d of the stored c against this step's g1) and the
full correction actually computed.

Cost (what this module is built around): no flat copy and no materialised d or prediction. A step in between is
one reduction pass over (g1, c) giving ‖g1‖², ⟨c, g1⟩, ‖c‖², the scalars from those (0-d device tensors, no host
read), and one update pass g1 ← (1 − k·β)·g1 + k·c; ‖d‖² = ‖c‖² − ⟨c, g1⟩²/‖g1‖² and reuse_cos come analytically
from inner products. A full step keeps a copy of g1 at ``capture`` (the backend's saved g1 is not reachable here,
and in lean mode it is rounded to bf16); ``store`` is one pass that writes c = GR − g1 into that copy's buffers,
which become the stored correction, and sums the six inner products ρ and reuse_cos need.

Memory (grad dtype): the stored correction (one tensor per GR parameter, kept between full steps); during a step in
between, one undo copy of g1 (what an abort puts back, bitwise); during a full step, the g1 copy that becomes the
new correction, and the old correction until the step is taken (what an abort or a non-finite step keeps).

Per-parameter state is keyed by position (the parameter's index in the optimizer's groups), never by tensor
identity, so a copy, a pickle or a checkpoint of the optimizer reuses the correction like the original. Only a
finite full step's correction is kept (a non-finite one leaves the previous one, chosen on the device). A step in
between applies the correction to the parameters that have a gradient (an unused branch or MoE expert without one
is simply left out); a parameter with a gradient but no stored correction gets the (1 − k·β)·g1 part only.
Sharded parameters (FSDP2, ZeRO): the stored correction is the local shard and every inner product is summed
through the step's ``Shards`` (one all-reduce of 3 numbers per step in between, of 6 per full step).

Implementations, chosen by the GR step's rule (``grkernels.kernels.resolve_backend`` of the ``backend`` setting):
the C++ passes (``grkernels.kernels.cpp_reuse``, CPU) where it resolves to "cpp", the Triton kernels
(``grkernels.kernels.triton_reuse``, CUDA; not yet timed on a GPU) where it resolves to "triton", both for contiguous
fp32/bf16/fp16 gradients; else the torch reference below (the specification), a chunk at a time. All three sum
products in float64 (exact range for 32-bit and narrower values: elements of 3e19 and 1e-25 give the right sums);
float64 gradients are first scaled by powers of two (exact) so that their products can neither overflow nor
underflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from grkernels.backends.arith import accum_dtype, norm_from_parts, sumsq_parts
from grkernels.backends.base import Shards
from grkernels.kernels import cpp_reuse, resolve_backend, triton_usable

try:  # triton is optional: without it backend="triton" is refused at construction (resolve_backend)
    from grkernels.kernels import triton_reuse
except ImportError:
    triton_reuse = None

REUSE_MODES = ("none", "orthogonal")

# Elements per chunk of the reference (its float64 upcasts and temporaries are a chunk each): 2^16 on CPU (512 KiB
# in float64, cache-sized), 2^22 elsewhere (fewer launches on a GPU, 32 MiB in float64).
_CHUNK = 1 << 16
_CHUNK_DEVICE = 1 << 22

# Below this relative size, ‖d‖ ≤ _NOISE·‖c‖, d is rounding noise: of the float64 sums (‖d‖² is a difference of
# sums of ~‖c‖², each with a relative error ≲ 1e-14 at 10⁷ terms), of the update in float32 (it cancels (1 − k·β)·g1
# against k·c, each ~‖c‖/‖d‖ times the result) or of c itself (stored in its dtype: ε = 2⁻⁷ for bf16). Then nothing
# is applied (c parallel to g1: no direction is left to apply).
_NOISE = 2.0**-20


def _chunk(t: torch.Tensor) -> int:
    return _CHUNK if t.device.type == "cpu" else _CHUNK_DEVICE


# ------------------------------------------------------------------------------------- the torch reference
def _up(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """x as a 1-D float64 tensor, times the power of two s (float64 values only: see :func:`_pow2_scale`)."""
    x = x.reshape(-1).double()
    return x if s is None else x * s


def _pow2_scale(parts: torch.Tensor, count: int, shards: Shards) -> torch.Tensor:
    """A power of two s (0-d float64) with ‖s·x‖ in [0.5, 1) over all processes, from x's float64 sum-of-squares
    parts (``arith.sumsq_parts``: overflow- and underflow-safe); 1 when x is zero or not finite."""
    norm, _ = norm_from_parts(shards.sum_across(parts), count, torch.float64)
    exp = torch.frexp(norm)[1].clamp(-1021, 1021)  # ‖x‖ = m·2^exp, m in [0.5, 1); 2^±1021 is a normal double
    one = torch.ones((), dtype=torch.float64, device=norm.device)
    return torch.where(torch.isfinite(norm) & (norm > 0), torch.ldexp(one, -exp), one)


def _wide(tensors: Iterable[torch.Tensor | None]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _present(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    return [t for t in ts if t is not None]


def reference_sums(g1: Sequence[torch.Tensor], c: Sequence[torch.Tensor | None],
                   shards: Shards) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reduction of a step in between: ([‖s_g·g1‖², ⟨s_c·c, s_g·g1⟩, ‖s_c·c‖²] (float64, local), s_c/s_g).

    Products in float64 (exact range for 32-bit and narrower values), a chunk (``_chunk``) widened at a
    time. s_g = s_c = 1 (and the ratio None) for 32-bit and narrower gradients; with float64 ones, the powers of
    two of :func:`_pow2_scale` (one more pass over each). ``c``: None where no correction is stored (zeros)."""
    sg = sc = ratio = None
    if _wide([*g1, *c]):
        sg = _pow2_scale(sumsq_parts(g1), sum(t.numel() for t in g1), shards)
        cs = _present(c)
        sc = _pow2_scale(sumsq_parts(cs, g1[0].device), sum(t.numel() for t in cs), shards)
        ratio = sc / sg
    terms: list[torch.Tensor] = []
    for g, ci in zip(g1, c):
        n = _chunk(g)
        for k, gk in enumerate(g.reshape(-1).split(n)):
            a = _up(gk, sg)
            if ci is None:
                terms.append(torch.stack([a @ a, a.new_zeros(()), a.new_zeros(())]))
            else:
                b = _up(ci.reshape(-1)[k * n:(k + 1) * n], sc)
                terms.append(torch.stack([a @ a, b @ a, b @ b]))
    if not terms:
        return torch.zeros(3, dtype=torch.float64, device=g1[0].device), ratio
    return torch.stack(terms).sum(0), ratio


def reference_update(g1: Sequence[torch.Tensor], c: Sequence[torch.Tensor | None], a: torch.Tensor,
                     k: torch.Tensor) -> None:
    """In place: g1 ← a·g1 + k·c per element in float32 (float64 for float64 gradients): a·g1 and k·c each rounded
    onto it, their sum too, then onto the gradient's dtype (c None: g1 ← a·g1). What the C++ update computes."""
    for g, ci in zip(g1, c):
        w = torch.float64 if g.dtype == torch.float64 else torch.float32
        aw, kw = a.to(w), k.to(w)
        if g.dtype == w:  # in place, no temporary: the same roundings
            g.mul_(aw)
            if ci is not None:
                g.addcmul_(ci if ci.dtype == w else ci.to(w), kw)
            continue
        if g.is_contiguous() and (ci is None or ci.is_contiguous()):  # bf16/fp16: via float32, a chunk at a time
            pieces = g.view(-1).split(_chunk(g))
            cps = [None] * len(pieces) if ci is None else ci.view(-1).split(_chunk(g))
        else:
            pieces, cps = [g], [ci]
        for gk, ck in zip(pieces, cps):
            new = gk.to(w) * aw
            if ck is not None:
                new = new + ck.to(w) * kw
            gk.copy_(new)


def reference_store(gr: Sequence[torch.Tensor], buf: Sequence[torch.Tensor], old: Sequence[torch.Tensor | None],
                    finite: torch.Tensor, shards: Shards) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full step's pass (``buf`` holds g1, contiguous): n = gr − g1 in the gradient's dtype (the new correction
    as stored); returns ([Σ g1², Σ n·g1, Σ n², Σ o·n, Σ o·g1, Σ o²] of the scaled vectors (float64, local; o =
    ``old``, zeros where None), s_g/s_n) and leaves ``buf`` ← n where ``finite`` (0-d bool) else o, a chunk at a
    time. Scales as in :func:`reference_sums` (g1: s_g, n: s_n, o: s_o; all 1 and the ratio None without
    float64)."""
    sg = sn = so = ratio = None
    device = gr[0].device
    if _wide([*gr, *old]):
        count = sum(t.numel() for t in gr)
        sg = _pow2_scale(sumsq_parts(buf), count, shards)
        parts = torch.zeros(3, dtype=torch.float64, device=device)
        for x, g in zip(gr, buf):  # ‖n‖ first (one tensor-sized temporary at a time)
            parts = parts + sumsq_parts([x - g])
        sn = _pow2_scale(parts, count, shards)
        olds = _present(old)
        so = _pow2_scale(sumsq_parts(olds, device), sum(t.numel() for t in olds), shards)
        ratio = sg / sn
    terms: list[torch.Tensor] = []
    for x, g, o in zip(gr, buf, old):
        n = _chunk(x)
        xs = x.reshape(-1).split(n)
        os_ = [None] * len(xs) if o is None else o.reshape(-1).split(n)
        for xk, gk, ok in zip(xs, g.view(-1).split(n), os_):
            nk = xk - gk  # one rounding onto the gradient's dtype, as the stored correction
            a, b = _up(gk, sg), _up(nk, sn)
            if ok is None:
                zero = a.new_zeros(())
                terms.append(torch.stack([a @ a, b @ a, b @ b, zero, zero, zero]))
                gk.copy_(torch.where(finite, nk, 0.0))
            else:
                e = _up(ok, so)
                terms.append(torch.stack([a @ a, b @ a, b @ b, e @ b, e @ a, e @ e]))
                gk.copy_(torch.where(finite, nk, ok.to(nk.dtype)))
    if not terms:
        return torch.zeros(6, dtype=torch.float64, device=device), ratio
    return torch.stack(terms).sum(0), ratio


# ------------------------------------------------------------------------------------------ the scalars
def _noise_floor(c: Sequence[torch.Tensor]) -> float:
    """(relative size of d below which nothing is applied)²: _NOISE, or the coarsest stored dtype's ε."""
    return max([_NOISE] + [torch.finfo(t.dtype).eps for t in c]) ** 2


def apply_coefficients(sums: torch.Tensor, rho: torch.Tensor, scale: torch.Tensor, ratio: torch.Tensor | None,
                       floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, k, gr_rel) of the update g1 ← a·g1 + k·c from the summed [A, B, Q] = [‖g1‖², ⟨c, g1⟩, ‖c‖²] (of the
    scaled vectors, ``ratio`` = s_c/s_g, None for 1), the stored ρ and ``scale`` (0-d float64):

        β = B/A,  ‖d‖² = Q − B²/A (≥ 0),  k = scale·ρ·√A/‖d‖,  a = 1 − k·β,  gr_rel = scale·ρ.

    ‖d‖² = Q − B²/A cancels when c is nearly parallel to g1: it loses log₁₀(Q/‖d‖²) of float64's 16 digits (a
    c at 1° from g1 keeps 12), against ‖d‖'s share of the float32 update's own rounding, far larger; below the
    noise floor (‖d‖² ≤ floor·Q) d is noise and nothing is applied (a = 1, k = 0, gr_rel = 0), nor with a zero or
    non-finite g1."""
    a_sq, cg, cc = sums.unbind()
    beta = cg / a_sq
    d_sq = (cc - cg * beta).clamp_min(0)
    applied = (a_sq > 0) & (d_sq > floor * cc) & torch.isfinite(a_sq) & torch.isfinite(d_sq)
    k_hat = scale * rho.double() * a_sq.sqrt() / d_sq.sqrt()
    one = torch.ones_like(a_sq)
    a = torch.where(applied, one - k_hat * beta, one)
    k = torch.where(applied, k_hat if ratio is None else k_hat * ratio, torch.zeros_like(a_sq))
    rel = torch.where(applied, scale * rho.double(), torch.zeros_like(a_sq))
    return a, k, rel


def store_scalars(sums: torch.Tensor, ratio: torch.Tensor | None, rho_old: torch.Tensor | None,
                  floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ of the new correction n, reuse_cos) from the summed [A, Bng, Qn, Bon, Bog, Qo] (scaled vectors; ``ratio``
    = s_g/s_n, None for 1):

        ρ = √(Qn − Bng²/A)/√A                       (‖n⊥‖/‖g1‖; 0 for a zero g1)
        reuse_cos = (Bon − (Bog/A)·Bng) / √((Qo − Bog²/A)·Qn)
                  = cos(d_old, n),  d_old = o − (⟨o, g1⟩/‖g1‖²)·g1   (what reuse would have applied, up to k > 0)

    reuse_cos is 0 where that reuse would have applied nothing (see :func:`apply_coefficients`) or n = 0; the
    scales cancel in it."""
    a_sq, ng, nn, on, og, oo = sums.unbind()
    perp = (nn - ng * ng / a_sq).clamp_min(0)
    rho = torch.where(a_sq > 0, perp.sqrt() / a_sq.sqrt(), torch.zeros_like(a_sq))
    if ratio is not None:
        rho = rho * ratio
    beta_old = og / a_sq
    d_old = (oo - og * beta_old).clamp_min(0)
    live = (a_sq > 0) & (d_old > floor * oo) & (nn > 0)
    if rho_old is not None:
        live = live & (rho_old > 0)
    cos = torch.where(live, (on - beta_old * ng) / (d_old * nn).sqrt(), torch.zeros_like(a_sq))
    return rho, cos


# ------------------------------------------------------------------------------------------- the state
class CorrectionReuse:
    """Keeps the correction of the last full GR step and applies it, projected and rescaled, in between.

    Args:
        backend: the GR step's ``backend`` setting ("auto", "torch", "cpp", "triton"): as it resolves
            (``resolve_backend``), the C++ passes or the Triton kernels where they take the tensors, else the torch
            reference. ``last_path`` says which ran last ("cpp", "triton" or "torch (<why>)").
    """

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self._reset()

    def _reset(self) -> None:
        self._c: list[torch.Tensor] = []  # last full correction, one tensor per position of _index (grad dtype)
        self._index: tuple[int, ...] = ()  # positions of the parameters the tensors of _c belong to
        self._rho: torch.Tensor | None = None
        self._gamma: torch.Tensor | None = None  # γ multiplier of the full step c belongs to (0-d float64, device)
        self._g1: list[torch.Tensor] | None = None  # g1 of the full step in progress (transient; becomes c)
        self._undo: tuple | None = None  # the committed correction while a step's store is pending (transient)
        self._pending = 0  # bytes of a step in between's undo copy of g1, until the step ends
        self.last_path = ""

    def __setstate__(self, state: dict) -> None:
        """Unpickles this layout and the flat one of 0.2 (one flat ``_c`` split by ``_shapes``)."""
        if "_shapes" in state:
            flat, shapes = state.pop("_c"), state.pop("_shapes")
            state["_c"] = [] if flat is None else [x.view(s).clone() for x, s in
                                                   zip(flat.split([s.numel() for s in shapes]), shapes)]
            state.pop("_pred", None)
            state["_g1"], state["_undo"] = None, None
        state.setdefault("backend", "auto")
        state.setdefault("_pending", 0)
        state.setdefault("last_path", "")
        self.__dict__.update(state)

    @property
    def ready(self) -> bool:
        """Whether a correction is stored (a full step has happened)."""
        return self._rho is not None

    def _fields(self) -> tuple:
        return self._c, self._index, self._rho, self._gamma

    def commit(self) -> None:
        """The step whose combine stored a correction was taken (or skipped as non-finite): keep it."""
        self._undo = None
        self._pending = 0

    def rollback(self) -> None:
        """The step was aborted: the correction committed before it is back, the step's transients dropped (a
        step that never happened leaves no trace; idempotent)."""
        if self._undo is not None:
            self._c, self._index, self._rho, self._gamma = self._undo
        self._undo = self._g1 = None
        self._pending = 0

    def state(self) -> dict | None:
        """The committed correction for a state dict: one tensor per parameter, named by its position, with ρ and
        the γ multiplier of its full step."""
        c, index, rho, gamma = self._fields() if self._undo is None else self._undo
        if rho is None:
            return None
        return {"index": list(index), "c": [x.clone() for x in c], "rho": rho.clone(), "gamma": gamma.clone()}

    def load(self, state: dict | None, params: Sequence[torch.Tensor], gamma: float = 1.0) -> None:
        """Inverse of :meth:`state`; ``params``: the tensors in position order (for device and dtype: the
        gradient's where there is one); ``gamma``: the γ multiplier when ``state`` has none (a checkpoint written
        before it was kept there)."""
        self._reset()
        if state:
            chosen = [params[i] for i in state["index"]]
            like = [p if p.grad is None else p.grad for p in chosen]
            device = chosen[0].device
            self._index = tuple(state["index"])
            self._c = [torch.empty(c.shape, dtype=lk.dtype, device=device).copy_(c)
                       for c, lk in zip(state["c"], like)]
            self._rho = state["rho"].to(device)
            self._gamma = torch.as_tensor(state.get("gamma", gamma), dtype=torch.float64).to(device)

    def extra_bytes(self) -> int:
        """Bytes held now: the stored correction, a full step's g1 copy and the correction it replaces until the
        step is taken, a step in between's undo copy of g1."""
        held = list(self._c) + list(self._g1 or [])
        if self._undo is not None:
            mine = {id(t) for t in held}
            held += [t for t in self._undo[0] if id(t) not in mine]
        return sum(t.numel() * t.element_size() for t in held) + self._pending

    def _matched(self, positions: Sequence[int], like: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The stored correction laid out like ``like`` (per position: its tensor, None where none is stored or
        its shape differs)."""
        if not self.ready:
            return [None] * len(like)
        if tuple(positions) == self._index and all(c.shape == g.shape for c, g in zip(self._c, like)):
            return list(self._c)
        stored = dict(zip(self._index, self._c))
        out: list[torch.Tensor | None] = []
        for i, g in zip(positions, like):
            c = stored.get(i)
            out.append(c if c is not None and c.shape == g.shape else None)
        return out

    def _impl(self, device: torch.device, tensors: Sequence[torch.Tensor]) -> str:
        """"cpp", "triton" or "torch" for this pass (the rule in the class docstring); sets ``last_path``."""
        name = resolve_backend(self.backend, device, what="GradReg reuse")
        why = ""
        if name == "cpp":
            if not cpp_reuse.available():
                why = "the loaded grkernels._C predates the reuse ops: rebuild it"
            elif not cpp_reuse.takes(tensors):
                why = "float64, non-contiguous or non-CPU tensors"
        elif name == "triton":
            if triton_reuse is None or not triton_usable(device):
                why = "triton cannot run on these tensors"
            elif not triton_reuse.takes(tensors) or any(t.device != device for t in tensors):
                why = "float64 or non-contiguous tensors"
        else:
            name = "torch"
        self.last_path = name if not why else f"torch ({why})"
        return name if not why else "torch"

    @torch.no_grad()
    def capture(self, params: Sequence[torch.Tensor], positions: Sequence[int], shards: Shards) -> None:
        """Full step, right after the backward at θ (``.grad`` = g1): keep a copy of g1 (grad dtype, contiguous),
        the buffer :meth:`store` turns into the new correction."""
        self._g1 = [shards.local(p.grad).clone(memory_format=torch.contiguous_format) for p in params]

    @torch.no_grad()
    def store(self, params: Sequence[torch.Tensor], positions: Sequence[int], shards: Shards,
              finite: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
        """Full step, after the combine (``.grad`` = GR): c = GR − g1, ρ and ``gamma`` (the step's γ multiplier),
        kept only where ``finite`` (a 0-d device flag: a non-finite step leaves the previous correction, or none);
        pending until :meth:`commit` (:meth:`rollback` on an abort). Returns ``reuse_cos`` (when a correction was
        stored before)."""
        grads = [shards.local(p.grad) for p in params]
        buf, self._g1 = self._g1, None
        if buf is None or [b.shape for b in buf] != [g.shape for g in grads]:
            raise RuntimeError("CorrectionReuse.store(): no g1 of this step was captured for these parameters "
                               "(capture() at the perturb, or before the exact combine, comes first)")
        self._undo = self._fields()
        old = self._matched(positions, grads)
        hit = any(o is not None for o in old)
        dtype = accum_dtype(grads)
        device = grads[0].device
        finite = finite.to(device)
        impl = self._impl(device, [*grads, *buf, *_present(old)])
        ratio = None
        if impl == "cpp":
            sums = cpp_reuse.reuse_store(grads, buf, [g.new_empty(0) if o is None else o for g, o in zip(grads, old)],
                                         finite)
        elif impl == "triton":
            sums = triton_reuse.reuse_store(grads, buf, old, finite)
        else:
            sums, ratio = reference_store(grads, buf, old, finite, shards)
        sums = shards.sum_across(sums.to(device))
        rho_old = self._rho.double() if hit else None
        rho_new, cos = store_scalars(sums, ratio, rho_old, _noise_floor(_present(old)))
        rho_keep = torch.zeros_like(rho_new) if rho_old is None else rho_old
        self._c, self._index = buf, tuple(positions)
        self._rho = torch.where(finite, rho_new, rho_keep).to(dtype)
        gamma_new = torch.tensor(gamma, dtype=torch.float64, device=device)  # a host-to-device copy: no read
        self._gamma = gamma_new if self._gamma is None else torch.where(finite, gamma_new, self._gamma)
        return {"reuse_cos": cos.to(dtype)} if hit else {}

    @torch.no_grad()
    def apply(self, params: Sequence[torch.Tensor], positions: Sequence[int], gamma: float,
              shards: Shards) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Step in between: ``.grad`` (= g1) ← (1 − k·β)·g1 + k·c, k = scale·ρ·‖g1‖/‖d‖ (scale: ``gamma``, the γ
        multiplier now, over that of the full step) on ``params`` (those with a gradient). Returns ``gr_rel`` of
        the applied correction (scale·ρ), and (gradient, g1 copy) pairs that put g1 back bitwise on an abort. A
        no-op (``{}, []``) when nothing stored matches."""
        g1 = [shards.local(p.grad) for p in params]
        c = self._matched(positions, g1) if g1 else []
        if not any(x is not None for x in c):
            return {}, []
        self._pending = sum(g.numel() * g.element_size() for g in g1)
        device = g1[0].device
        impl = self._impl(device, [*g1, *_present(c)])
        c_args = [g.new_empty(0) if x is None else x for g, x in zip(g1, c)] if impl == "cpp" else c
        if impl == "cpp":  # the undo copy is written by the reduction pass itself (one read of g1 fewer)
            saved = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in g1]
            sums, ratio = cpp_reuse.reuse_sums(g1, c_args, saved), None
        else:
            saved = [g.clone() for g in g1]
            if impl == "triton":
                sums, ratio = triton_reuse.reuse_sums(g1, c), None
            else:
                sums, ratio = reference_sums(g1, c, shards)
        undo = list(zip(g1, saved))
        sums = shards.sum_across(sums.to(device))
        stored = self._gamma
        scale = torch.where(stored > 0, gamma / stored, torch.zeros_like(stored))  # on the device: γ was chosen there
        a, k, rel = apply_coefficients(sums, self._rho, scale, ratio, _noise_floor(_present(c)))
        if impl == "cpp":
            cpp_reuse.reuse_update(g1, c_args, a, k)
        elif impl == "triton":
            triton_reuse.reuse_update(g1, c, a, k)
        else:
            reference_update(g1, c, a, k)
        return {"gr_rel": rel.to(accum_dtype(g1))}, undo
