"""The Triton kernels of the GR step (``@triton.jit``): the sum-of-squares, perturb and restore/combine passes over
many tensors at once. The backend that launches them, its semantics, numerics and memory table are in
``grkernels.backends.triton`` (read its module docstring).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TL: dict[torch.dtype, tl.dtype] = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int64: tl.int64,
    torch.int32: tl.int32,
    torch.int16: tl.int16,
}
ROUND_NEAREST, ROUND_SR_BF16, ROUND_SR_GENERIC = 0, 1, 2
MODE_FORWARD, MODE_CENTRAL, MODE_ABORT = 0, 1, 2


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _chunk_info(tab_ptr, n_tensors, chunk_ptr, n_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor row, first element, end element, save-buffer offset, step-wide tensor index) of this program.

    ``start`` is a multiple of CHUNK (so of BLOCK) and ``off`` a multiple of 8 elements (the host pads the
    save buffers): told to the compiler so that full blocks get vectorised loads and stores."""
    c = tl.program_id(0)
    t = tl.load(chunk_ptr + c)
    start = tl.multiple_of(tl.load(chunk_ptr + n_chunks + c), BLOCK)
    numel = tl.load(tab_ptr + 2 * n_tensors + t)
    end = tl.minimum(start + CHUNK, numel)
    off = tl.multiple_of(tl.load(tab_ptr + 3 * n_tensors + t), 8)
    row = tl.load(tab_ptr + 4 * n_tensors + t)
    return t, start, end, off, row


@triton.jit
def _addr(tab_ptr, col, n_tensors, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in column ``col`` of the table, as a pointer to DT (16-byte aligned when ALIGNED)."""
    ptr = tl.load(tab_ptr + col * n_tensors + t).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _ld(ptr, m, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=m, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _st(ptr, v, m, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, v, mask=m)
    else:
        tl.store(ptr, v)


@triton.jit
def _cvt(x, DT: tl.constexpr):
    """x converted to DT with round-to-nearest-even, like torch's ``.to``/``copy_``.

    bf16 goes through fp32 (torch also rounds fp64 → fp32 → bf16) and is rounded with integer ops exactly as
    c10::BFloat16 does (bits + 0x7FFF + lsb, NaN → 0x7FC0): a few integer ops, and Triton's CPU interpreter
    does not round fp32 → bf16 to nearest-even.
    """
    if DT == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(xf != xf, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _sumsq_block(g_ptr, g1s_ptr, i, end, acc, G_FLT: tl.constexpr, S_FLT: tl.constexpr, ACC: tl.constexpr,
                 NORM: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    idx = i + tl.arange(0, BLOCK)
    m = idx < end
    g = _ld(g_ptr + idx, m, MASKED).to(G_FLT, bitcast=True).to(ACC)
    if NORM == 0:
        acc += g * g
    else:
        b = _ld(g1s_ptr + idx, m, MASKED).to(S_FLT, bitcast=True).to(ACC)
        if NORM == 1:
            gb = g + b
            acc += gb * gb
        else:
            acc += g * g + 2.0 * (g * b)
    return acc


@triton.jit
def sumsq_kernel(
    tab_ptr,
    n_tensors,
    chunk_ptr,
    n_chunks,
    part_ptr,
    g1s_ptr,
    base_ptr,
    G_INT: tl.constexpr,
    G_FLT: tl.constexpr,
    S_INT: tl.constexpr,
    S_FLT: tl.constexpr,
    ACC: tl.constexpr,
    NORM: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partial[c] over this program's chunk (ACC precision: float64 from the host, where no square of a 32-bit
    value overflows or underflows; fixed order) of, with d = the gradient buffer and
    b = the saved (bf16) g1:  NORM 0: Σ d²;  1: Σ (d + b)²;  2: base[c] + Σ (d² + 2·d·b) with base[c] = Σ g1²
    of the same chunk (lean forward: ‖d + g1‖² without g1, whose bf16 copy is inexact; see the class)."""
    t, start, end, off, row = _chunk_info(tab_ptr, n_tensors, chunk_ptr, n_chunks, CHUNK, BLOCK)
    g_ptr = _addr(tab_ptr, 1, n_tensors, t, G_INT, ALIGNED)
    acc = tl.zeros([BLOCK], ACC)
    n_full = (end - start) // BLOCK
    for j in range(0, n_full):
        i = tl.multiple_of(start + j * BLOCK, BLOCK)
        acc = _sumsq_block(g_ptr, g1s_ptr + off, i, end, acc, G_FLT, S_FLT, ACC, NORM, False, BLOCK)
    tail = start + n_full * BLOCK
    if tail < end:
        acc = _sumsq_block(g_ptr, g1s_ptr + off, tail, end, acc, G_FLT, S_FLT, ACC, NORM, True, BLOCK)
    total = tl.sum(acc, axis=0)
    if NORM == 2:
        total += tl.load(base_ptr + tl.program_id(0))
    tl.store(part_ptr + tl.program_id(0), total)


@triton.jit
def _round_to(x, seed, q, row, point, P_FLT: tl.constexpr, W: tl.constexpr, ROUND: tl.constexpr):
    """x (W precision, shape [R, 4]) rounded to P_FLT: to nearest, or stochastically (see module docstring).

    ``q`` [R, 1] is the element index / 4 (int64): one Philox call gives the 4 random words of a row.
    """
    if ROUND == 0:
        return _cvt(x, P_FLT)
    else:
        zero = (q * 0).to(tl.uint32)
        c0 = q.to(tl.uint32)
        c1 = (q >> 32).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + row.to(tl.uint32), zero + point)
        lane = tl.arange(0, 4)[None, :]
        r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        if ROUND == 1:
            # bf16 from fp32: add 16 random bits below the kept ones, then truncate (sign-magnitude: rounds the
            # magnitude up with probability = the discarded fraction, for either sign)
            bits = x.to(tl.uint32, bitcast=True) + (r & 0xFFFF)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            lo = _cvt(x, P_FLT)
            lo_w = lo.to(W)
            lo_b = lo.to(tl.int16, bitcast=True)
            away = tl.abs(x) > tl.abs(lo_w)
            # the neighbour of lo on x's side: one step of the magnitude (bits ± 1), or the smallest subnormal
            # of x's sign when lo is zero (0x8001 = -32767 as int16)
            other_b = tl.where(lo_w == 0, tl.where(x > 0, 1, -32767), tl.where(away, lo_b + 1, lo_b - 1))
            other = other_b.to(tl.int16).to(P_FLT, bitcast=True)
            gap = tl.abs(other.to(W) - lo_w)
            p_other = tl.where(gap > 0, tl.abs(x - lo_w) / gap, 0.0)
            u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
            return tl.where(u < p_other, other, lo)


@triton.jit
def _perturb_block(p_ptr, g_ptr, g1s_ptr, ths_ptr, gps_ptr, i, end, step, finite, seed, row, acc,
                   P_INT: tl.constexpr, P_FLT: tl.constexpr, G_INT: tl.constexpr, G_FLT: tl.constexpr,
                   S_INT: tl.constexpr, S_FLT: tl.constexpr, SAVE_CAST: tl.constexpr, W: tl.constexpr,
                   ACC: tl.constexpr, POINT: tl.constexpr, ROUND: tl.constexpr, PRELOAD: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK: tl.constexpr):
    R: tl.constexpr = BLOCK // 4
    rows = tl.arange(0, R)[:, None]
    idx = i + (rows * 4 + tl.arange(0, 4)[None, :])
    m = idx < end
    g_bits = _ld(g_ptr + idx, m, MASKED)
    g = g_bits.to(G_FLT, bitcast=True)
    if POINT == 0:
        th_bits = _ld(p_ptr + idx, m, MASKED)
        _st(ths_ptr + idx, th_bits, m, MASKED)
        if SAVE_CAST:
            _st(g1s_ptr + idx, _cvt(g, S_FLT).to(S_INT, bitcast=True), m, MASKED)
        else:
            _st(g1s_ptr + idx, g_bits, m, MASKED)
        d = g.to(W)  # the exact g1 (in lean mode too: the saved copy may be rounded, this is not)
    else:
        th_bits = _ld(ths_ptr + idx, m, MASKED)
        if SAVE_CAST:
            _st(gps_ptr + idx, _cvt(g, S_FLT).to(S_INT, bitcast=True), m, MASKED)
        else:
            _st(gps_ptr + idx, g_bits, m, MASKED)
        b = _ld(g1s_ptr + idx, m, MASKED).to(S_FLT, bitcast=True)
        if PRELOAD == 0:
            ga = g.to(ACC)
        else:
            ga = g.to(ACC) + b.to(ACC)
        acc += ga * ga
        d = b.to(W)
    th = th_bits.to(P_FLT, bitcast=True)
    x = th.to(W) + step * d
    new = _round_to(x, seed, i // 4 + rows, row, POINT, P_FLT, W, ROUND)
    new = tl.where(finite, new, th)  # never let a NaN/inf of g1 reach the weights
    _st(p_ptr + idx, new.to(P_INT, bitcast=True), m, MASKED)
    if POINT == 0:
        delta = new.to(ACC) - th.to(ACC)
        if MASKED:
            delta = tl.where(m, delta, 0.0)
        acc += delta * delta
    if PRELOAD == 0:
        _st(g_ptr + idx, tl.zeros([R, 4], G_INT), m, MASKED)
    elif PRELOAD == 1:
        _st(g_ptr + idx, (-g).to(G_INT, bitcast=True), m, MASKED)
    else:
        if POINT == 0:
            nb = -(_cvt(g, S_FLT).to(G_FLT))  # −b, b = the value just saved
        else:
            nb = -(b.to(G_FLT))
        _st(g_ptr + idx, nb.to(G_INT, bitcast=True), m, MASKED)
    return acc


@triton.jit(do_not_specialize=["seed"])
def perturb_kernel(
    tab_ptr,
    n_tensors,
    chunk_ptr,
    n_chunks,
    g1s_ptr,
    ths_ptr,
    gps_ptr,
    part_ptr,
    step_ptr,
    finite_ptr,
    seed,
    P_INT: tl.constexpr,
    P_FLT: tl.constexpr,
    G_INT: tl.constexpr,
    G_FLT: tl.constexpr,
    S_INT: tl.constexpr,
    S_FLT: tl.constexpr,
    SAVE_CAST: tl.constexpr,
    W: tl.constexpr,
    ACC: tl.constexpr,
    POINT: tl.constexpr,
    ROUND: tl.constexpr,
    PRELOAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Point 0: save g1 and θ, θ ← round(θ + step·g1), g ← 0, partial = Σ(θ' − θ)².
    Point 1: save g₊, θ ← round(θ_saved + step·g1_saved), g ← 0, partial = Σ g₊².
    Lean mode (PRELOAD 1: g ← −g1; 2: g ← −b, b = bf16(g1) as saved) instead of g ← 0; at point 1 the buffer
    then holds d₊ = g₊ − b: d₊ is saved and partial = Σ (d₊ + b)².
    ACC: the precision of the partial sums (float64 from the host: no square of a 32-bit value overflows or
    underflows there). The tile is [BLOCK/4, 4]: one Philox call gives the random words of a row of 4 elements.
    θ is table column 5: the parameter, or with fp32 masters the model's weight (the master, column 0, is never
    read or written here)."""
    t, start, end, off, row = _chunk_info(tab_ptr, n_tensors, chunk_ptr, n_chunks, CHUNK, BLOCK)
    p_ptr = _addr(tab_ptr, 5, n_tensors, t, P_INT, ALIGNED)
    g_ptr = _addr(tab_ptr, 1, n_tensors, t, G_INT, ALIGNED)
    step = tl.load(step_ptr).to(W)
    finite = tl.load(finite_ptr) != 0
    acc = tl.zeros([BLOCK // 4, 4], ACC)
    n_full = (end - start) // BLOCK
    for j in range(0, n_full):
        i = tl.multiple_of(start + j * BLOCK, BLOCK)
        acc = _perturb_block(
            p_ptr, g_ptr, g1s_ptr + off, ths_ptr + off, gps_ptr + off, i, end, step, finite, seed, row,
            acc, P_INT, P_FLT, G_INT, G_FLT, S_INT, S_FLT, SAVE_CAST, W, ACC, POINT,
            ROUND, PRELOAD, False, BLOCK,
        )  # fmt: skip
    tail = start + n_full * BLOCK
    if tail < end:
        acc = _perturb_block(
            p_ptr, g_ptr, g1s_ptr + off, ths_ptr + off, gps_ptr + off, tail, end, step, finite, seed, row,
            acc, P_INT, P_FLT, G_INT, G_FLT, S_INT, S_FLT, SAVE_CAST, W, ACC, POINT,
            ROUND, PRELOAD, True, BLOCK,
        )  # fmt: skip
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _combine_block(p_ptr, g_ptr, g1s_ptr, ths_ptr, gps_ptr, i, end, coef, sa, sb, acc,
                   G_INT: tl.constexpr, G_FLT: tl.constexpr, S_FLT: tl.constexpr, ACC: tl.constexpr,
                   SUM: tl.constexpr, MODE: tl.constexpr, DELTA: tl.constexpr, MASKED: tl.constexpr,
                   BLOCK: tl.constexpr):
    idx = i + tl.arange(0, BLOCK)
    m = idx < end
    _st(p_ptr + idx, _ld(ths_ptr + idx, m, MASKED), m, MASKED)
    g1 = _ld(g1s_ptr + idx, m, MASKED).to(S_FLT, bitcast=True)
    if MODE == 2:
        out = _cvt(g1, G_FLT)
    else:
        g1a = g1.to(ACC)
        g = _ld(g_ptr + idx, m, MASKED).to(G_FLT, bitcast=True).to(ACC)
        if MODE == 1:
            ga = _ld(gps_ptr + idx, m, MASKED).to(S_FLT, bitcast=True).to(ACC)
            gb = g
            if DELTA:
                ga = ga + g1a
                gb = gb + g1a
            corr = coef * (sa * ga - sb * gb)
        elif DELTA:
            corr = coef * (sa * g + (sa - sb) * g1a)
        else:
            corr = coef * (sa * g - sb * g1a)
        out = _cvt(g1a + corr, G_FLT)
        if MASKED:
            corr = tl.where(m, corr, 0.0)
        c = corr.to(SUM)
        acc += c * c
    _st(g_ptr + idx, out.to(G_INT, bitcast=True), m, MASKED)
    return acc


@triton.jit
def combine_kernel(
    tab_ptr,
    n_tensors,
    chunk_ptr,
    n_chunks,
    g1s_ptr,
    ths_ptr,
    gps_ptr,
    part_ptr,
    coef_ptr,
    sa_ptr,
    sb_ptr,
    P_INT: tl.constexpr,
    G_INT: tl.constexpr,
    G_FLT: tl.constexpr,
    S_INT: tl.constexpr,
    S_FLT: tl.constexpr,
    ACC: tl.constexpr,
    SUM: tl.constexpr,
    MODE: tl.constexpr,
    DELTA: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """θ ← saved bits; forward/central: g ← g1 + coef·(sa·ga − sb·gb), partial = Σ correction²; abort: g ← g1.
    ACC: the working precision of the correction; SUM: of the partial sum (float64, where a float32 correction
    squared cannot overflow or underflow).

    Lean mode (DELTA, the buffer holds d = g − g1 (forward) or d = g − b (central), b = saved bf16 g1):
    forward: correction = coef·(s2·d + (s2 − s1)·b); central: ga = d₊(saved) + b, gb = d₋ + b."""
    t, start, end, off, row = _chunk_info(tab_ptr, n_tensors, chunk_ptr, n_chunks, CHUNK, BLOCK)
    p_ptr = _addr(tab_ptr, 5, n_tensors, t, P_INT, ALIGNED)  # the model's weight (the parameter, or its copy)
    g_ptr = _addr(tab_ptr, 1, n_tensors, t, G_INT, ALIGNED)
    acc = tl.zeros([BLOCK], SUM)
    if MODE != 2:
        coef = tl.load(coef_ptr + t)
        sa = tl.load(sa_ptr)
        sb = tl.load(sb_ptr)
    else:
        coef = tl.zeros((), ACC)
        sa = coef
        sb = coef
    n_full = (end - start) // BLOCK
    for j in range(0, n_full):
        i = tl.multiple_of(start + j * BLOCK, BLOCK)
        acc = _combine_block(p_ptr, g_ptr, g1s_ptr + off, ths_ptr + off, gps_ptr + off, i, end, coef, sa, sb, acc,
                             G_INT, G_FLT, S_FLT, ACC, SUM, MODE, DELTA, False, BLOCK)
    tail = start + n_full * BLOCK
    if tail < end:
        acc = _combine_block(p_ptr, g_ptr, g1s_ptr + off, ths_ptr + off, gps_ptr + off, tail, end, coef, sa, sb,
                             acc, G_INT, G_FLT, S_FLT, ACC, SUM, MODE, DELTA, True, BLOCK)
    if MODE != 2:
        tl.store(part_ptr + tl.program_id(0), tl.sum(acc, axis=0))
