"""The GR step through the C++ CPU kernels (``csrc/gr_step.cpp``, ``torch.ops.grkernels_cpp.gr_*``).

Same methods and semantics as ``grkernels.backends.reference.TorchGRStep`` (the specification) and the same
lean-mode and central-point conventions as ``grkernels.backends.triton.TritonGRStep`` (read its module docstring): one
fused pass over all tensors per pass of the algorithm — sum of squares of g1, perturb (saves θ and g1, writes θ',
zeroes the gradient, sums the realised perturbation), sum of squares of g2, restore + combine — threaded with
``at::parallel_for`` over chunks of 65,536 elements, deterministic whatever the thread count.

Bitwise agreement with the torch backend (``rounding="nearest"``, clip factors exactly 1): θ', the combined
gradient and the keep parameters' gradients are the same bits (the same float32/float64 expressions in the same
order). Norms are summed in another order (per chunk, in 16 double lanes, chunks in float64): ~1e-7 relative.

Numeric extremes: the kernels square 32-bit and narrower values in double (no overflow or underflow: elements
of 3e19 or 1e-25 have their true norm); float64 tensors' norms are taken by ``arith.sumsq_parts`` (scaled), so
every norm goes through ``arith.norm_from_parts`` and the finite flag is a property of the elements. The
metrics of float64 tensors (‖θ' − θ‖, ‖grad − g1‖) are summed unscaled (exact below 1e150 per element).
Stochastic rounding uses the Triton kernel's Philox stream, so CPU and GPU runs of one seed agree bitwise.

Extra memory per GR parameter: as the Triton backend (g1 in the gradient's dtype, or bf16 for fp32 gradients
when ``lean``, plus θ in the weight's dtype; the central estimator adds g₊), per keep parameter its gradient.

What the kernels do not take runs the torch reference for that step (stated by ``last_path``): non-contiguous
parameters or gradients, dtypes other than fp64/fp32/bf16/fp16, per-parameter mixed-precision grids that
differ within one step. The exact estimator's combine is the reference's (it is dominated by double backprop).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
from grkernels.kernels import cpp_loaded, cpp_status
from grkernels.kernels.cpp_gr_step import CPP_DTYPES, ops, sumsq
from grkernels.rounding import SEED_MASK


class CppGRStep(ExactViaReference):
    """C++ backend of ``GradReg`` for CPU tensors: the methods of ``TorchGRStep``.

    Args:
        lean: save g1 (and g₊) of fp32 gradients in bf16; the gradient buffer then carries g − g1 between
            perturb and combine (as ``TritonGRStep(lean=True)``). An in-place write to it in between is an error
            at the combine (``backends.lean``). Abort: g1 bitwise while the buffer still holds −g1 untouched
            (forward estimator, before the backward at θ' reached it), else b = g1 rounded to bf16 (within
            2⁻⁸·|g1| per element); after the combine b.
    """

    name = "cpp"

    def __init__(self, *, lean: bool = False) -> None:
        if not cpp_loaded():  # also loads grkernels._C, which registers torch.ops.grkernels_cpp
            raise RuntimeError(f"CppGRStep needs the C++ kernels: {cpp_status()}")
        self.lean = bool(lean)
        self.metrics: dict[str, torch.Tensor] = {}
        self.last_path = "cpp"  # "cpp", or "torch (<why>)" when the last step ran the reference
        self._torch = TorchGRStep()
        self._delegate = False
        self._theta: list[torch.Tensor] = []
        self._g1: list[torch.Tensor] = []
        self._gplus: list[torch.Tensor] = []
        self._g1_keep: list[torch.Tensor] = []
        self._n1_parts = self._n1 = self._s1 = self._vnorm = self._finite = self._s_plus = None
        self._grid: torch.dtype | None = None
        self._saved = ""  # as TorchGRStep: "", "theta" (θ and g1 saved) or "grads" (combined; g1 still saved)
        self._lean_active = False  # g1 saved rounded (lean): the gradient buffers carry a difference
        self._exact_abort = False  # the lean buffers hold −g1 exactly (forward, point 0): abort can negate them
        self._guard = LeanGuard()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _unsupported(plan: StepPlan, weights: Sequence[torch.Tensor], grads: Sequence) -> str | None:
        """Why the kernels cannot take this plan (None: they can)."""
        if type(plan.shards) is not Shards and len({plan.shards.compute_dtype(p) for p in plan.params}) > 1:
            return "parameters with different mixed-precision compute dtypes"
        for w, g in zip(weights, grads):
            if g is None:
                return None  # the caller's error path reports it
            for t in (w, g):
                if t.device.type != "cpu":
                    return f"a tensor on {t.device}"
                if t.dtype not in CPP_DTYPES:
                    return f"dtype {t.dtype}"
                if not t.is_contiguous():
                    return "a non-contiguous parameter or gradient"
        return None

    def _save_dtype(self, g: torch.Tensor) -> torch.dtype:
        return torch.bfloat16 if self.lean and g.dtype == torch.float32 else g.dtype

    def extra_bytes(self) -> int:
        """Bytes held by this backend's buffers right now."""
        bufs = self._theta + self._g1 + self._gplus + self._g1_keep
        return sum(b.numel() * b.element_size() for b in bufs) + self._torch.extra_bytes()

    def _parts(self, grads: Sequence[torch.Tensor], mode: int, wide: bool) -> torch.Tensor:
        """The local float64 parts of ‖g‖² (``arith``): mode 0 the buffers (float64 tensors scaled by ``arith``),
        1 the buffers plus the saved b (lean central), 2 Σ (d² + 2·d·b) (lean forward, added to ‖g1‖²)."""
        if mode:
            return parts_of_sumsq(sumsq(grads, self._g1, mode, wide))
        narrow = [g for g in grads if g.dtype != torch.float64]
        parts = parts_of_sumsq(sumsq(narrow, (), 0, wide))
        f64 = [g for g in grads if g.dtype == torch.float64]
        return parts + sumsq_parts(f64) if f64 else parts

    @staticmethod
    def _norm(plan: StepPlan, parts: torch.Tensor, grads: Sequence[torch.Tensor], dtype: torch.dtype):
        """(norm, finite) of summed local parts, over all processes."""
        return norm_from_parts(plan.shards.sum_across(parts), sum(g.numel() for g in grads), dtype)

    # ------------------------------------------------------------------ the step
    def perturb(self, plan: StepPlan, point: int) -> None:
        """Move P to perturbation point ``point`` (0: θ + ε·v; 1, central only: θ − ε·v); zero P's grads."""
        grads, weights = plan.grads(), plan.weights()
        if point == 0:
            why = self._unsupported(plan, weights, grads)
            self._delegate = why is not None
            self.last_path = "cpp" if why is None else f"torch ({why})"
        if self._delegate:
            self._torch.perturb(plan, point)
            self.metrics = self._torch.metrics
            return
        if any(g is None for g in grads):
            raise RuntimeError("GradReg: a GR parameter has no gradient at the perturbation point")
        dtype = accum_dtype(grads)
        wide = dtype == torch.float64
        central = plan.estimator == "central"
        if point == 0:
            self._saved = ""  # the slots hold another step's θ until the pass below wrote them
            self._guard.clear()
            identity = type(plan.shards) is Shards or not plan.params  # no compute grid to write onto
            self._grid = None if identity else plan.shards.compute_dtype(plan.params[0])
            reusable_buffers(weights, self._theta)
            reusable_buffers(grads, self._g1, [self._save_dtype(g) for g in grads])
            self._lean_active = any(b.dtype != g.dtype for b, g in zip(self._g1, grads))
            keep = plan.grads(plan.keep)
            reusable_buffers(keep, self._g1_keep)
            if keep:
                torch._foreach_copy_(self._g1_keep, keep)
            self._n1_parts = plan.shards.sum_across(self._parts(grads, 0, wide))
            self._n1, self._finite = norm_from_parts(self._n1_parts, sum(g.numel() for g in grads), dtype)
            self._s1 = clip_scale(self._n1, plan.g1_clip)
            self._vnorm = v_norm(plan, self._s1, self._n1)
            self.metrics = {"g1_norm": self._n1}
            sign = 1.0
            gplus: list[torch.Tensor] = []
            plus = None
        else:
            if self._finite is None or not self._saved:
                raise RuntimeError("GradReg: perturbation point 1 before point 0")
            self._check_lean(plan, grads)
            gplus = reusable_buffers(self._g1, self._gplus)
            sign = -1.0
            # ‖g₊‖ comes from the pass below, except for float64 tensors, whose squares need the scaled parts
            plus = self._parts(grads, 1 if self._lean_active else 0, wide) if wide else None
        preload = 0 if not self._lean_active else (1 if point == 0 and not central else 2)
        step = torch.where(self._finite, perturb_scale(plan, self._s1, self._vnorm, sign), torch.zeros_like(self._s1))
        seed = int(plan.seed) & SEED_MASK
        rounding = 1 if plan.rounding == "stochastic" else 0
        total = ops().gr_perturb(
            weights, grads, self._theta, self._g1, gplus, step, self._finite, point, rounding, seed, preload,
            self._grid, wide,
        )  # fmt: skip
        self._saved = "theta"
        self._exact_abort = preload == 1
        if self._lean_active:
            self._guard.arm(plan.params, grads, plan.shards.local)
        if point == 0:
            intended = perturb_scale(plan, self._s1, self._vnorm, 1.0) * self._n1
            realised = plan.shards.sum_across(total).sqrt().to(dtype)
            self.metrics["perturb_ratio"] = realised / intended.clamp_min(torch.finfo(dtype).tiny)
        else:
            n_plus, finite_plus = self._norm(plan, parts_of_sumsq(total) if plus is None else plus, grads, dtype)
            self._s_plus = clip_scale(n_plus, plan.g2_clip)
            self._finite = self._finite & finite_plus

    def restore(self, plan: StepPlan) -> None:
        """Abort: θ back bitwise, every saved gradient (GR and keep parameters) back to g1; after the combine only
        the gradients (θ is back). Lean mode: see the class. Idempotent; a no-op before this step saved θ."""
        if self._delegate:
            self._torch.restore(plan)
            return
        saved, self._saved = self._saved, ""
        if saved == "theta":
            for p in plan.params:
                if p.grad is None:
                    p.grad = plan.shards.wrap_grad(p, torch.zeros_like(plan.shards.local(p.detach())))
            grads, weights = plan.grads(), plan.weights()
            negate = self._lean_active and self._exact_abort
            exact = {i for i in range(len(grads)) if negate and self._guard.untouched(i)}
            rest = [i for i in range(len(grads)) if i not in exact]
            if rest:
                ops().gr_combine(
                    [weights[i] for i in rest], [grads[i] for i in rest], [self._theta[i] for i in rest],
                    [self._g1[i] for i in rest], [], [], *(torch.ones((), dtype=torch.float64),) * 2, 2,
                    self._lean_active, accum_dtype(grads) == torch.float64,
                )  # fmt: skip
            for i in exact:  # the buffer still holds −g1 as perturb wrote it: negating it is exact
                weights[i].copy_(self._theta[i])
                grads[i].neg_()
        elif saved == "grads":
            for p, g1 in zip(plan.params, self._g1):
                plan.set_grad(p, g1)
        if saved:
            self._restore_keep(plan)
        self._guard.clear()

    def _check_lean(self, plan: StepPlan, grads: Sequence[torch.Tensor]) -> None:
        """Lean mode: the backward at the last point accumulated onto what perturb left, else restore and raise."""
        err = self._guard.violation(grads) if self._lean_active and self._guard.armed else None
        if err is not None:
            self.restore(plan)
            raise err

    def _restore_keep(self, plan: StepPlan) -> None:
        for p, g1 in zip(plan.keep, self._g1_keep):
            plan.set_grad(p, g1)

    def restore_and_combine(self, plan: StepPlan) -> None:
        """θ back bitwise; ``.grad`` ← the GR gradient (forward or central estimator); keep params ← g1."""
        if self._delegate:
            self._torch.restore_and_combine(plan)
            self.metrics = self._torch.metrics
            return
        require_second_gradients(plan, self.restore)
        grads = plan.grads()
        self._check_lean(plan, grads)
        self._guard.clear()
        dtype = accum_dtype(grads)
        wide = dtype == torch.float64
        central = plan.estimator == "central"
        count = sum(g.numel() for g in grads)
        if self._lean_active and not central:
            # the buffers hold d = g2 − g1: ‖g2‖² = ‖g1‖² + Σ (d² + 2·d·b), in float64 (exact range)
            n2sq = self._n1_parts[1] + plan.shards.sum_across(sumsq(grads, self._g1, 2, wide))
            n2, finite2 = norm_from_parts(parts_of_sumsq(n2sq.clamp_min(0)), count, dtype)
        else:  # central lean: the buffers hold g₋ − b
            n2, finite2 = self._norm(plan, self._parts(grads, 1 if self._lean_active else 0, wide), grads, dtype)
        s2 = clip_scale(n2, plan.g2_clip)
        self._finite = self._finite & finite2
        if central:
            mode, sa, sb, div = 1, self._s_plus, s2, 2.0 * plan.eps
        else:
            mode, sa, sb, div = 0, s2, self._s1, plan.eps
        sa, sb = combine_scales(sa, sb, self._vnorm)
        diff_sq = ops().gr_combine(
            plan.weights(), grads, self._theta, self._g1, self._gplus if mode == 1 else [],
            [gamma / div for gamma in plan.coefs], sa, sb, mode, self._lean_active, wide,
        )  # fmt: skip
        self._restore_keep(plan)
        self._saved = "grads"
        self.metrics["g2_norm"] = n2
        diff = plan.shards.sum_across(diff_sq).sqrt().to(dtype)
        self.metrics["gr_rel"] = diff / self._n1.clamp_min(torch.finfo(dtype).tiny)
        self.metrics["finite"] = self._finite
