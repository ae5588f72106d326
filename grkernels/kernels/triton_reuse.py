"""The Triton kernels of the correction reuse (``grkernels.reuse``) and their launchers: the same three passes as
the C++ ones (``grkernels.kernels.cpp_reuse``), one launch per tensor and pass.

    sums     [Σ g², Σ c·g, Σ c²]                               (a step in between's reduction)
    update   g ← a·g + k·c                                      (a step in between's update; float32 arithmetic)
    store    n = gr − buf rounded onto buf's dtype;  [Σ g1², Σ n·g1, Σ n², Σ o·n, Σ o·g1, Σ o²];
             buf ← n where finite, else o                       (a full step; buf holds g1)

Tensors: contiguous fp32/bf16/fp16, on the device Triton runs on (CUDA, or CPU under ``TRITON_INTERPRET=1``); a
``c`` / ``old`` of None reads as zeros. Products are widened to float64 before they are summed (exact range: elements
of 3e19 or 1e-25 give their true sums); each program writes its partial sums, and the partials are added in a fixed
order (deterministic). The update and store keep FMA contraction off (``enable_fp_fusion=False``): a·g and k·c
are each rounded, as in the C++ kernels and the torch reference. Stores round to bf16 with ``gr_step._cvt``
(round-to-nearest-even, as torch).

Not timed here (no GPU on the machine that wrote it): checked against the float64 rule under the interpreter
(tests/test_reuse.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grkernels.kernels.gr_step import TL, _cvt

BLOCK = 1024
ITERS = 4  # blocks per program of the reductions: fewer partials to add
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _sums_kernel(g_ptr, c_ptr, part_ptr, n, HAS_C: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    gg = tl.zeros([BLOCK], dtype=tl.float64)
    cg = tl.zeros([BLOCK], dtype=tl.float64)
    cc = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(ITERS):
        idx = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = idx < n
        g = tl.load(g_ptr + idx, mask=m, other=0).to(tl.float64)
        gg += g * g
        if HAS_C:
            c = tl.load(c_ptr + idx, mask=m, other=0).to(tl.float64)
            cg += c * g
            cc += c * c
    tl.store(part_ptr + pid * 3, tl.sum(gg, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(cg, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(cc, axis=0))


@triton.jit
def _update_kernel(g_ptr, c_ptr, a_ptr, k_ptr, n, HAS_C: tl.constexpr, G_DT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    a = tl.load(a_ptr).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=m, other=0).to(tl.float32)
    out = a * g
    if HAS_C:
        k = tl.load(k_ptr).to(tl.float32)
        c = tl.load(c_ptr + idx, mask=m, other=0).to(tl.float32)
        out = out + k * c
    tl.store(g_ptr + idx, _cvt(out, G_DT), mask=m)


@triton.jit
def _store_kernel(gr_ptr, buf_ptr, old_ptr, fin_ptr, part_ptr, n, HAS_OLD: tl.constexpr, BUF_DT: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    finite = tl.load(fin_ptr) != 0
    s0 = tl.zeros([BLOCK], dtype=tl.float64)
    s1 = tl.zeros([BLOCK], dtype=tl.float64)
    s2 = tl.zeros([BLOCK], dtype=tl.float64)
    s3 = tl.zeros([BLOCK], dtype=tl.float64)
    s4 = tl.zeros([BLOCK], dtype=tl.float64)
    s5 = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(ITERS):
        idx = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = idx < n
        x = tl.load(gr_ptr + idx, mask=m, other=0).to(tl.float32)
        g = tl.load(buf_ptr + idx, mask=m, other=0).to(tl.float32)
        nb = _cvt(x - g, BUF_DT)  # the correction as the buffer will hold it
        nv = nb.to(tl.float64)
        gv = g.to(tl.float64)
        s0 += gv * gv
        s1 += nv * gv
        s2 += nv * nv
        if HAS_OLD:
            o = tl.load(old_ptr + idx, mask=m, other=0).to(tl.float32)
            ov = o.to(tl.float64)
            s3 += ov * nv
            s4 += ov * gv
            s5 += ov * ov
            tl.store(buf_ptr + idx, tl.where(finite, nb, _cvt(o, BUF_DT)), mask=m)
        else:
            tl.store(buf_ptr + idx, tl.where(finite, nb, _cvt(tl.zeros([BLOCK], dtype=tl.float32), BUF_DT)),
                     mask=m)
    tl.store(part_ptr + pid * 6, tl.sum(s0, axis=0))
    tl.store(part_ptr + pid * 6 + 1, tl.sum(s1, axis=0))
    tl.store(part_ptr + pid * 6 + 2, tl.sum(s2, axis=0))
    tl.store(part_ptr + pid * 6 + 3, tl.sum(s3, axis=0))
    tl.store(part_ptr + pid * 6 + 4, tl.sum(s4, axis=0))
    tl.store(part_ptr + pid * 6 + 5, tl.sum(s5, axis=0))


def takes(tensors) -> bool:
    """Whether the kernels take these tensors (contiguous fp32/bf16/fp16; the device is the caller's check)."""
    return all(t.is_contiguous() and t.dtype in TRITON_DTYPES for t in tensors)


def _programs(n: int, per: int) -> int:
    return max(1, triton.cdiv(n, per))


def reuse_sums(g, c) -> torch.Tensor:
    """[Σ g², Σ c·g, Σ c²] over all tensors (float64, shape (3,)); ``c`` entries None read as zeros."""
    device = g[0].device
    parts = []
    for gi, ci in zip(g, c):
        if gi.numel() == 0:
            continue
        grid = _programs(gi.numel(), BLOCK * ITERS)
        part = torch.empty(grid, 3, dtype=torch.float64, device=device)
        _sums_kernel[(grid,)](gi, gi if ci is None else ci, part, gi.numel(), HAS_C=ci is not None, BLOCK=BLOCK,
                              ITERS=ITERS)
        parts.append(part)
    if not parts:
        return torch.zeros(3, dtype=torch.float64, device=device)
    return torch.cat(parts).sum(0)


def reuse_update(g, c, a: torch.Tensor, k: torch.Tensor) -> None:
    """In place: g ← a·g + k·c in float32, rounded once onto g's dtype (a, k: 0-d device tensors)."""
    for gi, ci in zip(g, c):
        if gi.numel() == 0:
            continue
        _update_kernel[(_programs(gi.numel(), BLOCK),)](gi, gi if ci is None else ci, a, k, gi.numel(),
                                                         HAS_C=ci is not None, G_DT=TL[gi.dtype], BLOCK=BLOCK,
                                                         enable_fp_fusion=False)


def reuse_store(gr, buf, old, finite: torch.Tensor) -> torch.Tensor:
    """The full step's pass (see the module docstring); returns the six sums (float64, shape (6,))."""
    device = gr[0].device
    fin = finite.to(device=device, dtype=torch.int32)
    parts = []
    for x, b, o in zip(gr, buf, old):
        if x.numel() == 0:
            continue
        grid = _programs(x.numel(), BLOCK * ITERS)
        part = torch.empty(grid, 6, dtype=torch.float64, device=device)
        _store_kernel[(grid,)](x, b, b if o is None else o, fin, part, x.numel(), HAS_OLD=o is not None,
                               BUF_DT=TL[b.dtype], BLOCK=BLOCK, ITERS=ITERS, enable_fp_fusion=False)
        parts.append(part)
    if not parts:
        return torch.zeros(6, dtype=torch.float64, device=device)
    return torch.cat(parts).sum(0)
