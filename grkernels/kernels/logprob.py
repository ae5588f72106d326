"""Fused chosen-token log-prob + entropy over the vocabulary: Triton kernels, launchers, autograd.Function.

Forward, one program per token (a flat 1-D grid over all tokens: no 65,535 grid-dim limit on sequence
length), one pass over the vocabulary in ``BLOCK_V`` slices with an online log-sum-exp:

    z_j = logits_j * inv_temp (fp32)     m = running max     s = sum_j exp(z_j - m)
    a = sum_j exp(z_j - m) (z_j - m)     (rescaled when m grows, like s)
    logp = (z_y - m) - log s      H = -sum_j p_j log p_j = log s - a / s      (lse = m + log s)

Working relative to the running max keeps |logits| up to 1e4 exact in fp32 (m and log s are saved as two
numbers: m + log s alone would carry an absolute error of ulp(1e4) ~ 1e-3); -inf logits contribute
exp(-inf) = 0 and are kept out of ``a`` (0 * -inf would be NaN). One exp per element (the SFU is close to
being the limit at H100 bandwidth, so per-lane running maxima, which cost two, are not used): the max is one
block reduction per slice, while ``s`` and ``a`` are per-lane vectors rescaled by the shared factor and summed
once at the end. Compiled for sm_90 (bf16, BLOCK_V 4096, 8 warps): 64 registers, no spills, 128-bit loads.
Saved for backward (by the op's autograd in ``grkernels/ops/custom_ops.py``, where these launchers are registered
as the CUDA kernels of ``torch.ops.grkernels``): the logits themselves plus ``m``, ``log s`` and ``H``, fp32
``[tokens]`` (O(tokens)).

Backward, one pass reading the logits and writing their gradient (optionally into the logits buffer):

    log p_j = (z_j - m) - log s      p_j = exp(log p_j)
    dL/dlogits_j = inv_temp * ( g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H) )

where ``g_lp``, ``g_H`` are the upstream gradients of logp and H. Tokens that are inactive, or whose
upstream gradients are both zero (masked tokens of a policy loss), load no logits and store zeros; except that
a row whose saved log-sum-exp is not finite (its logits hold a NaN or +inf, or are -inf everywhere) stores NaN
whatever the upstream gradient (p_j is NaN: the rule for non-finite rows of ``grkernels/ops/spec.py``).
The chosen id is clamped into [0, V) inside the kernel: ids are range-checked by the caller (a host check on
CPU, ``torch._assert_async`` on CUDA, which does not synchronise), and padding ids of masked tokens must
never address memory.

Launch heuristic (documented, keyed on V and the element size): ``BLOCK_V`` = the next power of two of V
(at least 16), capped at 4096 elements for 2-byte dtypes / 2048 for fp32 (8 KiB per slice, enough in flight per SM for
bandwidth, small enough to keep registers for the fp32 temporaries), 8 warps from 2048 elements, else 4.
Runtime scalars (inv_temp, V, strides) are plain kernel arguments: new values never recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# a finite "minus infinity" for the running max, so that m - m_new is never inf - inf (NaN)
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_logp_entropy(base, y, act, V, inv_temp, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over a row of logits: (logp of id y, running max m, log s, entropy), all fp32 scalars.

    ``act`` False: no memory is read and (0, 0, 0, 0) comes back (m = log s = 0, not -inf, so that a backward
    exp(z - m - log s) of such a row stays 0 instead of NaN).
    """
    offs = tl.arange(0, BLOCK_V)
    v_read = tl.where(act, V, 0)  # inactive tokens: every load is masked off, so no memory is read
    # one block-wide reduction per slice (the max); s and a are kept per lane, rescaled by the shared
    # alpha, and summed once after the loop (three barrier-reductions per slice would be the alternative)
    m = tl.full((), _NEG_BIG, tl.float32)
    s_vec = tl.zeros((BLOCK_V,), tl.float32)
    a_vec = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        d = z - m_new
        e = tl.exp(d)
        if WITH_ENTROPY:
            # a(new shift) = alpha * (a + s (m - m_new)) + e (z - m_new); keep -inf lanes out of it
            a_vec = alpha * (a_vec + s_vec * (m - m_new)) + e * tl.where(e > 0.0, d, 0.0)
        s_vec = s_vec * alpha + e
        m = m_new
    s = tl.sum(s_vec, axis=0)
    a = tl.sum(a_vec, axis=0)
    s = tl.where(act, s, 1.0)
    m = tl.where(act, m, 0.0)
    log_s = tl.log(s)
    # lse = m + log s is kept as its two parts: (z - m) - log s is exact to fp32 rounding of the *small*
    # numbers even at |z| ~ 1e4, where m + log s alone would carry an absolute error of ulp(1e4) ~ 1e-3
    z_y = tl.load(base + y, mask=act, other=0.0).to(tl.float32) * inv_temp
    logp = tl.where(act, (z_y - m) - log_s, 0.0)
    if WITH_ENTROPY:
        ent = tl.where(act, log_s - a / s, 0.0)
    else:
        ent = tl.zeros((), tl.float32)
    return logp, m, log_s, ent


@triton.jit
def _logp_entropy_fwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    n_inner,
    ids_ptr,
    active_ptr,
    logp_ptr,
    max_ptr,
    logs_ptr,
    ent_ptr,
    V,
    inv_temp,
    HAS_ACTIVE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # logits are [outer, inner, V] with arbitrary row strides (e.g. a logits[:, :-1] slice, no copy)
    base = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    if HAS_ACTIVE:
        act = tl.load(active_ptr + row) != 0
    else:
        act = tl.full((), 1, tl.int1)
    y = tl.load(ids_ptr + row).to(tl.int64)
    # ids were range-checked by the caller (host check on CPU, torch._assert_async on CUDA); clamp anyway so
    # that an inactive padding id (e.g. -100) can never address memory outside the row
    y = tl.minimum(tl.maximum(y, 0), V - 1)
    logp, m, log_s, ent = _row_logp_entropy(base, y, act, V, inv_temp, WITH_ENTROPY, BLOCK_V)
    tl.store(logp_ptr + row, logp)
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, ent)


@triton.jit
def _logp_entropy_bwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    n_inner,
    grad_ptr,
    gstride_outer,
    gstride_inner,
    ids_ptr,
    active_ptr,
    max_ptr,
    logs_ptr,
    ent_ptr,
    g_lp_ptr,
    g_ent_ptr,
    V,
    inv_temp,
    HAS_ACTIVE: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    base = logits_ptr + outer * stride_outer + inner * stride_inner
    gbase = grad_ptr + outer * gstride_outer + inner * gstride_inner
    g_lp = tl.load(g_lp_ptr + row).to(tl.float32)
    if HAS_G_ENT:
        g_h = tl.load(g_ent_ptr + row).to(tl.float32)
        h = tl.load(ent_ptr + row)
    else:
        g_h = tl.zeros((), tl.float32)
        h = tl.zeros((), tl.float32)
    if HAS_ACTIVE:
        act = tl.load(active_ptr + row) != 0
        g_lp = tl.where(act, g_lp, 0.0)
        g_h = tl.where(act, g_h, 0.0)
    # a token whose upstream gradients are both zero (masked in the loss) has zero gradient: read nothing
    work = (g_lp != 0.0) | (g_h != 0.0)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logs_ptr + row)
    y = tl.load(ids_ptr + row).to(tl.int64)
    v_read = tl.where(work, V, 0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        z = tl.load(base + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_temp
        logp = (z - m) - log_s
        p = tl.exp(logp)
        dz = -g_lp * p
        if HAS_G_ENT:
            dz = dz - g_h * p * tl.where(p > 0.0, logp + h, 0.0)
        dz = tl.where(cols == y, dz + g_lp, dz) * inv_temp
        tl.store(gbase + cols, dz.to(grad_ptr.dtype.element_ty), mask=inb)


def launch_config(V: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V entries of ``element_size`` bytes (see module docstring)."""
    cap = 4096 if element_size <= 2 else 2048
    block = max(16, min(triton.next_power_of_2(V), cap))  # >= 16: no degenerate 1-lane ranges for tiny V
    return block, (8 if block >= 2048 else 4)


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """The launchers' output dtype: fp64 for fp64 logits (computed in fp32 here), else fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def logp_entropy_forward(
    logits3: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor | None,
    inv_temp: float,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Launch the forward kernel on ``[outer, inner, V]`` logits (ids int64, ``active`` bool, ``[tokens]``).

    Returns ``[tokens]`` tensors ``(logp, (max, log_sum_exp_minus_max), entropy)``, computed in fp32 and given
    in the accumulation dtype (fp64 for fp64 logits, else fp32), as the C++ launcher of ``cpp_losses.py``.
    """
    outer, inner, V = logits3.shape
    n = outer * inner
    dev = logits3.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    mx = torch.empty(n, dtype=torch.float32, device=dev)
    log_s = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else torch.zeros(n, device=dev)
    act = None if active is None else active.view(torch.uint8)
    block, warps = launch_config(V, logits3.element_size())
    _logp_entropy_fwd_kernel[(n,)](
        logits3, logits3.stride(0), logits3.stride(1), inner,
        ids, act if act is not None else ids, logp, mx, log_s, ent,
        V, inv_temp,
        HAS_ACTIVE=act is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
    acc = _acc_dtype(logits3)
    return logp.to(acc), (mx.to(acc), log_s.to(acc)), ent.to(acc)


def logp_entropy_backward(
    logits3: torch.Tensor,
    grad3: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor | None,
    lse: tuple[torch.Tensor, torch.Tensor],
    ent: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
) -> None:
    """Launch the backward kernel: writes d(logits) into ``grad3`` (which may be ``logits3`` itself).

    Per-token vectors in the accumulation dtype (read in fp32), ``active`` bool or None."""
    outer, inner, V = logits3.shape
    mx, log_s, ent, g_lp = (v.float() for v in (lse[0], lse[1], ent, g_lp))
    g_ent = None if g_ent is None else g_ent.float()
    act = None if active is None else active.view(torch.uint8)
    block, warps = launch_config(V, logits3.element_size())
    _logp_entropy_bwd_kernel[(outer * inner,)](
        logits3, logits3.stride(0), logits3.stride(1), inner,
        grad3, grad3.stride(0), grad3.stride(1),
        ids, act if act is not None else ids, mx, log_s, ent,
        g_lp, g_ent if g_ent is not None else g_lp,
        V, inv_temp,
        HAS_ACTIVE=act is not None, HAS_G_ENT=g_ent is not None, BLOCK_V=block, num_warps=warps,
    )  # fmt: skip


# Whether these kernels were built for Triton's CPU interpreter: decided by TRITON_INTERPRET when this module
# was imported (``triton.jit`` reads it then), so setting the variable later cannot make them run on CPU.
INTERPRETED = not isinstance(_logp_entropy_fwd_kernel, triton.JITFunction)
