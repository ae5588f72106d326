"""The GR step in fused multi-tensor Triton kernels: norms, perturb, restore + combine, without host syncs.

Same semantics as ``grkernels.backends.reference.TorchGRStep`` (the specification; read its docstring for the
math). The kernels are in ``grkernels.kernels.gr_step``.
Per dtype group (see ``multi_tensor``) every pass is ONE launch over all tensors of the group, one program per
chunk of at most ``chunk`` elements. With P the GR parameters, g the gradient, and per element:

    sumsq      reads g                         partial[c] = Σ g²            (accumulated in fp64)
    perturb@0  reads g, θ                      saves g1 (→ S dtype), θ (bits); θ ← round(θ + step·g);
                                               g ← 0; partial[c] = Σ (θ' − θ)²    (the realised perturbation)
    perturb@1  reads g₊, saved θ, saved g1     saves g₊; θ ← round(θ − ε·s1·g1); g ← 0; partial[c] = Σ g₊²
    combine    reads g2, saved g1, saved θ     θ ← saved bits; g ← g1 + coef·(sa·ga − sb·gb);
               (+ saved g₊ for central)        partial[c] = Σ correction²
    restore    reads saved θ, saved g1         θ ← saved bits; g ← g1  (abort; after the combine: g ← g1 only)

where step = ε·s1 when g1 is finite (else 0 and θ stays θ), coef = γ_p/ε (forward: ga = g2, sa = s2, gb = g1,
sb = s1) or γ_p/2ε (central: ga = g₊, sa = s₊, gb = g₋, sb = s₋). The partial sums are per chunk (fixed
order inside a program); the second stage is a sum over the chunk buffer in a fixed order on the device, and
norms, clip factors min(1, c/(‖g‖ + 1e-6)), the finite flag and ``step`` are 0-d device tensors computed by the
same torch expressions as the reference. Nothing in the step reads a value back to the host.

Numeric extremes: every partial sum of squares is accumulated in float64, where no square of a 32-bit or
narrower value overflows or underflows (elements of 3e19 or 1e-25 have their true norm), and read through
``arith.norm_from_parts``, which also gives the finite flag (a property of the elements). float64 gradients'
norms are taken by ``arith.sumsq_parts`` (scaled); their metric sums (‖θ' − θ‖, ‖grad − g1‖) are unscaled
(exact below 1e150 per element).

Rounding of the perturbed parameter (low-precision parameters, ``rounding="stochastic"``): x = θ + step·g in
fp32; for bf16 the fp32 bit pattern plus a uniform 16-bit random integer, truncated to the upper 16 bits
(P(round up) = the discarded fraction, exactly unbiased); for fp16 the two neighbours lo = rn(x) and
next(lo toward x) and P(other) = |x − lo| / |other − lo| against a 24-bit uniform. The random integers are
Philox4x32-10 keyed by the step seed with counter (element index / 4, tensor index, point): deterministic for a
seed, independent of chunking, one Philox call per 4 elements. Restore never recomputes anything: it writes the
saved bit patterns back, so it is bitwise whatever the rounding.

Bitwise agreement with the torch backend (``rounding="nearest"``): the element-wise arithmetic is the same
expression in the same order (FMA contraction disabled), so θ', the combined gradient and keep parameters'
gradients are bitwise equal whenever the clip factors are exactly 1 (clipping off or inactive). The norms
themselves are summed in a different order (per chunk here, per tensor there): they agree to ~1e-6 relative,
and so do θ' and the gradient when clipping is active (the clip factor then differs in its last bits).

Extra memory per GR parameter (bytes; what ``extra_bytes`` counts, plus the small tables):

    | param / grad dtype | default (g1 in grad dtype + θ) | lean (g1 in bf16 + θ) | central adds (g₊) |
    | bf16 / fp32        | 6                              | 4                     | 4 (lean 2)        |
    | bf16 / bf16        | 4                              | 4                     | 2                 |
    | fp16 / fp16        | 4                              | 4                     | 2                 |
    | fp32 / fp32        | 8                              | 6                     | 4 (lean 2)        |
    | fp64 / fp64        | 16                             | 16                    | 8                 |

plus, per keep parameter, one copy of its gradient (grad bytes). Each tensor's save slot is padded to a multiple
of 8 elements (16-byte aligned slots; ≤ 7 elements per tensor).

Lean mode (``lean=True``; only fp32 gradients are affected): g1 is saved in bf16, b = rn_bf16(g1). Saving g1
rounded naively would put its rounding error r = g1 − b (≤ 2^-8·|g1|) into the difference g2 − g1 and amplify
it by γ/ε (``bench/fidelity.py``, fp32 weights: cos 0.93 instead of 1.00 at ε = 1e-3 when tried). Instead
the perturb kernel leaves the difference itself in the gradient buffer: it writes −g1 (forward; exact, g1 is
still in registers) or −b (central, both points) instead of zeros, so the second backward, which accumulates,
leaves d = g2 − g1 (or g± − b) in fp32 (measured: cos/rel identical to the fp32 row at every ε). Then

    forward:  ‖g2‖² = ‖g1‖² + Σ(d² + 2·d·b)  (error 2·<d, r>, negligible),  grad = b + (γ/ε)·(s2·d + (s2 − s1)·b)
    central:  g₊ = d₊ + b (d₊ saved in bf16: its error is 2^-8 of a small number), g₋ = d₋ + b

so the correction keeps fp32 accuracy and only the g1 term of the result carries the bf16 error (≤ 2^-8·|g1|
per element, not amplified while the clip factors agree; with both clips active and s2 ≠ s1 the forward term
(s2 − s1)·b carries it times (γ/ε)·|s2 − s1|). The price: between ``perturb`` and ``restore_and_combine`` the
GR parameters' gradient buffers hold −g1 (or −b) plus what the second backward accumulated, not g2 (a hook that
reads ``.grad`` in the second pass sees the difference). Anything that writes the buffers in between other than
the backward's accumulation (``zero_grad(set_to_none=False)``, a replaced buffer) is an error at the combine or
at the central estimator's second point (``backends.lean``). Abort (``restore``) in lean mode gives back g1 bitwise
where the buffer still holds −g1 untouched (forward estimator, before the backward at θ' reached it: negated),
else b, g1 rounded to bf16 (within 2^-8·|g1| per element); after the combine b.

Deviation from the reference, on purpose: at the second point of the central estimator the parameters move to
θ − ε·s1·g1 even when g₊ is not finite (the reference leaves them at θ). Only g1 enters that point, which is
finite there, so no NaN can reach the weights; the step's finite flag and result are the same.

Fallbacks and errors: non-dense or differently laid-out parameter/gradient pairs, dtypes other than
fp64/fp32/bf16/fp16 and CPU tensors outside the interpreter raise a clear error (use ``backend="torch"``). The
exact estimator (double backprop) is dominated by the second backward; its cheap combine runs through the torch
reference code.

Launch heuristic: ``BLOCK`` = 2048 elements per loop iteration with 8 warps on CUDA (16 B/thread/iteration for
fp32 loads: enough bytes in flight per SM), 1024 in the interpreter; ``chunk`` = 65,536 elements per program
(16k programs per 1e9 elements). Each program runs its full blocks without masks, with the alignment facts
told to the compiler (chunk starts are multiples of BLOCK, save slots 16-byte aligned, parameter/gradient
addresses 16-byte aligned when the host saw them so: ``ALIGNED``), so that they compile to vector loads and
stores (checked in the sm_90 PTX); only the last partial block of a tensor is masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from grkernels.backends.arith import (
    accum_dtype,
    clip_scale,
    combine_scales,
    norm_from_parts,
    parts_of_sumsq,
    perturb_scale,
    require_second_gradients,
    reusable_buffers,
    sumsq_parts,
    v_norm,
)
from grkernels.backends.base import ExactViaReference, Shards, StepPlan
from grkernels.backends.lean import LeanGuard
from grkernels.backends.reference import TorchGRStep
from grkernels.kernels import check_triton_device, interpreter_on
from grkernels.kernels.gr_step import (
    MODE_ABORT,
    MODE_CENTRAL,
    MODE_FORWARD,
    ROUND_NEAREST,
    ROUND_SR_BF16,
    ROUND_SR_GENERIC,
    TL,
    combine_kernel,
    perturb_kernel,
    sumsq_kernel,
)
from grkernels.kernels.multi_tensor import INT_OF, Group, build_groups, check_tensor, layout_key, to_device
from grkernels.rounding import SEED_MASK


# ---------------------------------------------------------------------------------------------------- backend
class TritonGRStep(ExactViaReference):
    """Fused backend of ``GradReg``: same methods and semantics as ``TorchGRStep`` (see the module docstring
    for the kernels, the bitwise guarantees and the memory per parameter).

    Args:
        device: the device of the parameters (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        lean: save g1 (and g₊) of fp32 gradients in bf16: 4 instead of 6 bytes per bf16 parameter; the
            gradient buffer then carries g − g1 between perturb and combine (see the module docstring).
        chunk: elements per program (a multiple of ``block``); default 65,536.
        block: elements per loop iteration (a power of two ≥ 16); default 2048 on CUDA, 1024 interpreted.
        grad_attr: the attribute holding each parameter's gradient (``"grad"``; e.g. ``"main_grad"`` for
            fp32 gradient buffers kept next to bf16 parameters, as Megatron-style trainers do). Lean mode's
            check of in-place writes (``backends.lean``) watches ``"grad"`` only: another attribute is
            accumulated by the host's own hooks, which the check cannot tell from a stray write.
        model_attr: fp32 master weights (the hook): when the GR parameters are the optimizer's fp32 masters and
            ``getattr(master, model_attr)`` is the low-precision weight the model computes with, the kernels
            perturb that weight, ``w ← round(w + ε·v)`` (from w, where the gradient was taken: starting from the
            master would add master − w, up to half an ulp per element and far larger than ε·v), save and
            restore w bitwise, and never write the master. Extra memory per parameter: g1 + w bytes (6 B for
            fp32 grads, bf16 w).
    """

    name = "triton"

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        lean: bool = False,
        chunk: int | None = None,
        block: int | None = None,
        grad_attr: str = "grad",
        model_attr: str | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            check_triton_device(torch.empty(0, device=self.device), what="GradReg")
        on_gpu = self.device is not None and self.device.type == "cuda"
        self.block = int(block or (2048 if on_gpu and not interpreter_on() else 1024))
        self.chunk = int(chunk or 65536)
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"TritonGRStep: block must be a power of two >= 16, got {self.block}")
        if self.chunk < self.block or self.chunk % self.block:
            raise ValueError(f"TritonGRStep: chunk must be a positive multiple of block, got {self.chunk}")
        self.num_warps = 8 if self.block >= 2048 else 4
        self.lean = bool(lean)
        self.grad_attr = grad_attr
        self.model_attr = model_attr
        self.metrics: dict[str, torch.Tensor] = {}
        self._torch = TorchGRStep()  # the exact estimator's combine (see module docstring)
        self._groups: list[Group] = []
        self._key: tuple = ()
        self._saved: list[dict[str, torch.Tensor]] = []  # per group: g1, theta (, gplus) flat buffers
        self._keep_bufs: list[torch.Tensor] = []
        self._part: torch.Tensor | None = None
        self._coef_cache: dict[tuple, list[torch.Tensor]] = {}
        self._n1 = self._s1 = self._finite = self._n_plus = self._s_plus = self._vnorm = None
        self._shards = Shards()  # the current plan's (local shards and cross-process sums under FSDP2)
        self._armed: set[int] = set()  # groups whose θ of the current step is saved (restore writes only these)
        # as TorchGRStep: "" (nothing of this step saved), "theta" (point 0 ran: θ of the ``_armed`` groups and
        # the keep gradients saved), "grads" (combined: restore() puts the saved g1 back into the gradients only)
        self._state = ""
        self._acc = torch.float32  # the step's working precision (float64 when a gradient is float64)
        self._exact_abort = False  # lean forward: the buffers hold −g1 exactly until the backward at θ'
        self._guard = LeanGuard()
        self._guard_rows: list[int] = []  # the step's parameter index of each tensor the guard watches

    # ------------------------------------------------------------------ helpers
    def _grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The (local, for sharded parameters) gradients; None where a parameter has none."""
        grads = [getattr(p, self.grad_attr) for p in params]
        return [g if g is None else self._shards.local(g) for g in grads]

    def _total(self, row: int) -> torch.Tensor:
        """Σ of partial row ``row`` (float64) over the chunks, and over the processes holding other shards."""
        return self._shards.sum_across(self._part[row].sum())

    def _wide_parts(self, grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """``arith.sumsq_parts`` of the float64 groups' gradients (their squares need scaling; see the module)."""
        wide = [grads[r] for grp in self._groups if grp.g_dtype == torch.float64 for r in grp.rows]
        return sumsq_parts(wide, device)

    def _norm(self, row: int, wide_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm, finite) from partial row ``row`` of the narrow groups plus the float64 groups' parts."""
        for grp in self._groups:  # their chunks of this row are not a sum of squares the norm may use
            if grp.g_dtype == torch.float64:
                self._part[row, grp.chunk_base : grp.chunk_base + grp.n_chunks] = 0
        parts = self._shards.sum_across(parts_of_sumsq(self._part[row].sum()) + wide_parts)
        return norm_from_parts(parts, sum(sum(grp.numels) for grp in self._groups), self._acc)

    def _save_dtype(self, g_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.lean and g_dtype == torch.float32 else g_dtype

    def _layout(self, plan: StepPlan, grads: list[torch.Tensor]) -> list[Group]:
        """Launch tables for the plan's tensors (rebuilt only when an address or size changed)."""
        params = [self._shards.local(p.detach()) for p in plan.params]
        models = None
        if self.model_attr is not None:
            models = [getattr(p, self.model_attr, None) for p in plan.params]
            if any(m is None for m in models):
                raise RuntimeError(
                    f"TritonGRStep(model_attr={self.model_attr!r}): a GR parameter has no such attribute"
                )
            models = [m.detach() for m in models]
        key = layout_key(params, grads, models)
        if key != self._key:
            for i, (p, g) in enumerate(zip(params, grads)):
                check_tensor(p, g, "GradReg")
                if models is not None:
                    check_tensor(models[i], g, "GradReg (model weight of a master)")
                check_triton_device(p, what="GradReg")
            self._groups = build_groups(params, grads, self.chunk, plan.device, models)
            self._key = key
        return self._groups

    def _ensure_saved(self, acc: torch.dtype, central: bool, device: torch.device) -> None:
        """Flat save buffers per group (reused while sizes and dtypes stay), and the partial-sum buffer."""
        want = []
        for grp in self._groups:
            s = self._save_dtype(grp.g_dtype)
            want.append({"g1": (grp.total, s), "theta": (grp.total, grp.p_dtype)})
            if central:
                want[-1]["gplus"] = (grp.total, s)
        if len(self._saved) != len(want) or any(
            set(w) != set(b) or any(b[k].numel() != n or b[k].dtype != d for k, (n, d) in w.items())
            for w, b in zip(want, self._saved)
        ):
            self._saved = [{k: torch.empty(n, dtype=d, device=device) for k, (n, d) in w.items()} for w in want]
        n_chunks = max(1, sum(g.n_chunks for g in self._groups))
        if self._part is None or self._part.shape[1] != n_chunks or self._part.device != device:
            # rows: n1, realised, n+, corr, n2; float64 whatever the dtypes (sums of squares, see the module)
            self._part = torch.zeros(5, n_chunks, dtype=torch.float64, device=device)

    def _save_keep(self, plan: StepPlan) -> None:
        grads = self._grads(plan.keep)
        reusable_buffers(grads, self._keep_bufs)
        if grads:
            torch._foreach_copy_(self._keep_bufs, grads)

    def _restore_keep(self, plan: StepPlan) -> None:
        have = [(p, b) for p, b in zip(plan.keep, self._keep_bufs) if getattr(p, self.grad_attr) is not None]
        for p, b in zip(plan.keep, self._keep_bufs):
            if getattr(p, self.grad_attr) is None:
                setattr(p, self.grad_attr, self._shards.wrap_grad(p, b.clone()))
        if have:
            torch._foreach_copy_(self._grads([p for p, _ in have]), [b for _, b in have])

    def _delta(self, grp: Group) -> bool:
        """Lean mode on this group: g1 saved rounded, so the gradient buffer carries g − g1 (see the class)."""
        return self._save_dtype(grp.g_dtype) != grp.g_dtype

    def _sumsq(self, row: int, grads: Sequence[torch.Tensor], device: torch.device,
               estimator: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch the Σg² pass of every narrow group into partial row ``row``; returns (global norm, finite).

        ``estimator`` set: the norm of g2 at combine time (lean groups hold a difference, see the class)."""
        for gi, grp in enumerate(self._groups):
            if grp.g_dtype == torch.float64:
                continue  # scaled by arith instead (``_wide_parts``)
            norm = 0 if estimator is None or not self._delta(grp) else (1 if estimator == "central" else 2)
            g1s = self._saved[gi]["g1"] if self._saved else self._part
            s = g1s.dtype if norm else grp.g_dtype
            sumsq_kernel[(grp.n_chunks,)](
                grp.tab, grp.n_tensors, grp.chunks, grp.n_chunks, self._part[row, grp.chunk_base :],
                g1s.view(INT_OF[s]) if norm else g1s, self._part[0, grp.chunk_base :],
                G_INT=TL[INT_OF[grp.g_dtype]], G_FLT=TL[grp.g_dtype], S_INT=TL[INT_OF[s]], S_FLT=TL[s],
                ACC=tl.float64, NORM=norm, ALIGNED=grp.aligned,
                CHUNK=self.chunk, BLOCK=self.block, num_warps=self.num_warps,
            )  # fmt: skip
        return self._norm(row, self._wide_parts(grads, device))

    def _coefs(self, plan: StepPlan, div: float, acc: torch.dtype) -> list[torch.Tensor]:
        """γ_p/div per tensor, per group, as ACC device tables (cached by value: uploaded when γ changes)."""
        key = (tuple(plan.coefs), div, acc, self._key)
        hit = self._coef_cache.get(key)
        if hit is None:
            hit = [
                to_device(torch.tensor([plan.coefs[r] / div for r in grp.rows], dtype=acc), plan.device)
                for grp in self._groups
            ]
            self._coef_cache = {key: hit}  # one entry: a schedule changing γ every step must not grow it
        return hit

    def _launch_combine(self, mode: int, coefs: list[torch.Tensor] | None, sa, sb, skip=frozenset()) -> None:
        acc = self._acc
        for gi, grp in enumerate(self._groups):
            if gi not in self._armed or gi in skip:
                continue
            buf = self._saved[gi]
            s = buf["g1"].dtype
            gplus = buf.get("gplus", buf["g1"])
            coef = coefs[gi] if coefs is not None else self._part
            combine_kernel[(grp.n_chunks,)](
                grp.tab, grp.n_tensors, grp.chunks, grp.n_chunks,
                buf["g1"].view(INT_OF[s]), buf["theta"].view(INT_OF[grp.p_dtype]), gplus.view(INT_OF[s]),
                self._part[3, grp.chunk_base :], coef,
                sa if sa is not None else self._part, sb if sb is not None else self._part,
                P_INT=TL[INT_OF[grp.p_dtype]], G_INT=TL[INT_OF[grp.g_dtype]], G_FLT=TL[grp.g_dtype],
                S_INT=TL[INT_OF[s]], S_FLT=TL[s], ACC=TL[acc], SUM=tl.float64, MODE=mode, DELTA=self._delta(grp),
                ALIGNED=grp.aligned,
                CHUNK=self.chunk, BLOCK=self.block, num_warps=self.num_warps, enable_fp_fusion=False,
            )  # fmt: skip

    def extra_bytes(self) -> int:
        """Bytes held by this backend's buffers right now: saved g1/θ/g₊, keep gradients, tables, partials."""
        bufs = [b for d in self._saved for b in d.values()] + self._keep_bufs
        n = sum(b.numel() * b.element_size() for b in bufs)
        n += sum(g.table_bytes() for g in self._groups)
        if self._part is not None:
            n += self._part.numel() * self._part.element_size()
        return n + self._torch.extra_bytes()

    def saved_bytes(self) -> int:
        """Bytes of the per-parameter save buffers only (what the per-parameter budget counts)."""
        return sum(b.numel() * b.element_size() for d in self._saved for b in d.values())

    # ------------------------------------------------------------------ the step
    def perturb(self, plan: StepPlan, point: int) -> None:
        """Move P to perturbation point ``point`` (0: θ + ε·v; 1, central only: θ − ε·v); zero P's grads.

        Point 0 also saves θ, g1 (and keep parameters' g1) and computes n1, s1 and the realised perturbation
        ratio; point 1 saves g₊ and computes n₊, s₊ in the same pass.
        """
        self._shards = plan.shards
        if any(plan.shards.compute_dtype(p) is not None for p in plan.params):
            raise NotImplementedError(
                "GradReg(backend='triton') does not write perturbations onto a mixed-precision compute grid yet "
                "(FSDP2 MixedPrecisionPolicy with param_dtype != the parameters' dtype): use backend='torch'"
            )
        grads = self._grads(plan.params)
        if any(g is None for g in grads):
            raise RuntimeError("GradReg: a GR parameter has no gradient at the perturbation point")
        acc = accum_dtype(grads)
        if point == 1:
            self._check_lean(plan, grads)
        self._layout(plan, grads)
        central = plan.estimator == "central"
        if point == 0:
            self._armed, self._state = set(), ""  # the buffers hold another step's θ until this step's
            self._guard.clear()  # kernels wrote them
            self._acc = acc
            self._ensure_saved(acc, central, plan.device)
            self._save_keep(plan)
            self._n1, self._finite = self._sumsq(0, grads, plan.device)
            self._s1 = clip_scale(self._n1, plan.g1_clip)
            self._vnorm = v_norm(plan, self._s1, self._n1)
            self.metrics = {"g1_norm": self._n1}
            sign, row = 1.0, 1
            wide_plus = None
        else:
            if self._state != "theta":
                raise RuntimeError("GradReg: perturbation point 1 before point 0")
            self._ensure_saved(acc, True, plan.device)  # no-op when point 0 already allocated g+ buffers
            sign, row = -1.0, 2
            wide_plus = self._wide_parts(grads, plan.device)  # before the pass zeroes the float64 buffers
        step = torch.where(self._finite, perturb_scale(plan, self._s1, self._vnorm, sign), torch.zeros_like(self._s1))
        finite_i8 = self._finite.view(torch.int8)
        seed = int(plan.seed) & SEED_MASK
        self._state = "theta"  # from here restore() writes back the groups in ``_armed``
        try:
            self._launch_perturb(plan, point, step, finite_i8, seed, row, central)
        except BaseException:
            self.restore(plan)
            raise
        self._exact_abort = point == 0 and not central
        self._arm_guard(plan, grads)
        if point == 0:
            realised = self._total(1).sqrt().to(acc)
            intended = perturb_scale(plan, self._s1, self._vnorm, 1.0) * self._n1
            self.metrics["perturb_ratio"] = realised / intended.clamp_min(torch.finfo(acc).tiny)
        else:
            self._n_plus, finite_plus = self._norm(2, wide_plus)
            self._s_plus = clip_scale(self._n_plus, plan.g2_clip)
            self._finite = self._finite & finite_plus

    def _launch_perturb(self, plan: StepPlan, point: int, step, finite_i8, seed: int, row: int, central: bool):
        for gi, grp in enumerate(self._groups):
            buf = self._saved[gi]
            s = buf["g1"].dtype
            w = torch.float64 if grp.src_dtype == torch.float64 else torch.float32
            if plan.rounding == "stochastic" and grp.p_dtype == torch.bfloat16 and w == torch.float32:
                rnd = ROUND_SR_BF16
            elif plan.rounding == "stochastic" and grp.p_dtype == torch.float16:
                rnd = ROUND_SR_GENERIC
            else:
                rnd = ROUND_NEAREST
            gplus = buf.get("gplus", buf["g1"])
            perturb_kernel[(grp.n_chunks,)](
                grp.tab, grp.n_tensors, grp.chunks, grp.n_chunks,
                buf["g1"].view(INT_OF[s]), buf["theta"].view(INT_OF[grp.p_dtype]), gplus.view(INT_OF[s]),
                self._part[row, grp.chunk_base :], step, finite_i8, seed,
                P_INT=TL[INT_OF[grp.p_dtype]], P_FLT=TL[grp.p_dtype], G_INT=TL[INT_OF[grp.g_dtype]],
                G_FLT=TL[grp.g_dtype], S_INT=TL[INT_OF[s]], S_FLT=TL[s], SAVE_CAST=s != grp.g_dtype,
                W=TL[w], ACC=tl.float64, POINT=point, ROUND=rnd,
                PRELOAD=0 if not self._delta(grp) else (1 if point == 0 and not central else 2),
                ALIGNED=grp.aligned,
                CHUNK=self.chunk, BLOCK=self.block, num_warps=self.num_warps, enable_fp_fusion=False,
            )  # fmt: skip
            self._armed.add(gi)

    def _arm_guard(self, plan: StepPlan, grads: Sequence[torch.Tensor]) -> None:
        """Lean groups: watch their buffers for writes other than the backward's accumulation (``backends.lean``)
        and for replacement (any attribute)."""
        self._guard_rows = [r for grp in self._groups if self._delta(grp) for r in grp.rows]
        rows = self._guard_rows
        if rows:
            self._guard.arm([plan.params[r] for r in rows], [grads[r] for r in rows], plan.shards.local,
                            attr=self.grad_attr)
        else:
            self._guard.clear()

    def _check_lean(self, plan: StepPlan, grads: Sequence[torch.Tensor]) -> None:
        """Lean mode: the backward at the last point accumulated onto what perturb left, else restore and raise."""
        if not self._guard.armed:
            return
        err = self._guard.violation([grads[r] for r in self._guard_rows])
        if err is not None:
            self.restore(plan)
            raise err

    def _slot(self, gi: int, key: str, k: int, like: torch.Tensor) -> torch.Tensor:
        """The save slot of tensor ``k`` of group ``gi`` as a view laid out like ``like`` (the kernels save in
        storage order, which a dense layout shares)."""
        buf = self._saved[gi][key]
        return buf.as_strided(like.shape, like.stride(), buf.storage_offset() + self._groups[gi].offsets[k])

    def _weights(self, plan: StepPlan) -> list[torch.Tensor]:
        """The tensors the kernels perturb (table column 5): the parameters, or their model weights."""
        if self.model_attr is None:
            return [plan.shards.local(p.detach()) for p in plan.params]
        return [getattr(p, self.model_attr).detach() for p in plan.params]

    def restore(self, plan: StepPlan) -> None:
        """Abort: θ back bitwise, every saved gradient (GR and keep parameters) back to g1; after the combine only
        the gradients (θ is back). Lean mode: see the module docstring. Idempotent; a no-op before this step
        saved anything; writes only the groups whose θ this step saved."""
        if not self._state:
            return
        self._shards = plan.shards
        for p in plan.params:
            if getattr(p, self.grad_attr) is None:
                local = torch.zeros_like(plan.shards.local(p.detach()), memory_format=torch.preserve_format)
                setattr(p, self.grad_attr, plan.shards.wrap_grad(p, local))
        grads = self._grads(plan.params)
        self._layout(plan, grads)
        if self._state == "grads":  # θ is back: only the gradients
            for gi, grp in enumerate(self._groups):
                for k, r in enumerate(grp.rows):
                    grads[r].copy_(self._slot(gi, "g1", k, grads[r]))
        else:
            lean = {gi for gi, grp in enumerate(self._groups) if gi in self._armed and self._delta(grp)}
            self._launch_combine(MODE_ABORT, None, None, None, skip=lean)
            watched = {r: i for i, r in enumerate(self._guard_rows)} if self._guard.armed else {}
            weights = self._weights(plan)
            for gi in lean:  # per tensor: g1 exactly from the untouched −g1 buffer, else its bf16 copy b
                for k, r in enumerate(self._groups[gi].rows):
                    weights[r].copy_(self._slot(gi, "theta", k, weights[r]))
                    if self._exact_abort and r in watched and self._guard.untouched(watched[r]):
                        grads[r].neg_()
                    else:
                        grads[r].copy_(self._slot(gi, "g1", k, grads[r]))
        self._restore_keep(plan)
        self._armed, self._state = set(), ""
        self._guard.clear()

    def restore_and_combine(self, plan: StepPlan) -> None:
        """θ back bitwise; ``.grad`` ← the GR gradient (forward or central estimator); keep params ← g1."""
        self._shards = plan.shards
        require_second_gradients(plan, self.restore, self.grad_attr)
        grads = self._grads(plan.params)
        acc = self._acc
        self._check_lean(plan, grads)
        self._guard.clear()
        self._layout(plan, grads)
        n2, finite2 = self._sumsq(4, grads, plan.device, plan.estimator)
        s2 = clip_scale(n2, plan.g2_clip)
        self._finite = self._finite & finite2
        if plan.estimator == "central":
            mode, sa, sb, div = MODE_CENTRAL, self._s_plus, s2, 2.0 * plan.eps
        else:
            mode, sa, sb, div = MODE_FORWARD, s2, self._s1, plan.eps
        sa, sb = combine_scales(sa, sb, self._vnorm)
        self._launch_combine(mode, self._coefs(plan, div, acc), sa, sb)
        self._restore_keep(plan)
        self._armed, self._state = set(), "grads"
        self.metrics["g2_norm"] = n2
        self.metrics["gr_rel"] = self._total(3).sqrt().to(acc) / self._n1.clamp_min(torch.finfo(acc).tiny)
        self.metrics["finite"] = self._finite
