"""Multi-tensor launch tables: one Triton launch covers every tensor of a dtype group.

A group is a list of parameters that share (parameter dtype, gradient dtype). For a group we build, on the host
and from tensor metadata only (no device values are read):

    tab    int64 [6, T]: param address, grad address, numel, offset into the group's flat save buffers (padded
           to a multiple of 8 elements, so that every slot is 16-byte aligned), index of the tensor in the
           step's parameter list (it keys the stochastic-rounding stream), and the address of the weight the
           model computes with (the parameter itself, or its low-precision copy when the parameter is an fp32
           master weight: see ``TritonGRStep(model_attr=...)``).
    chunks int64 [2, C]: for each chunk, the tensor (row of ``tab``) and the element where the chunk starts.

Each program of a launch handles one chunk of at most ``chunk`` elements, so a tensor of 1 element and one of a
billion balance equally well (the big one is simply cut into many chunks). Tables are uploaded once and reused
while the storage does not move (the cache key is every address and size); on CUDA the upload is a
non-blocking copy from pinned memory, so building a table never waits on the device either.

Triton reads and writes through the table as integer pointers of the element width (int16/int32/int64) and
bitcasts to the float type in registers: it costs nothing on the GPU, and Triton's CPU interpreter mishandles
bf16 stores through a pointer built from an integer address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: floating dtypes the kernels cover, and the integer type of the same width used to move their bits
INT_OF: dict[torch.dtype, torch.dtype] = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


#: save-buffer slots start at multiples of this many elements (16 bytes for 2-byte types; the kernels assume it)
SAVE_ALIGN = 8


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Upload a small host tensor without a host synchronisation (pinned + non_blocking on CUDA)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def dense_same_layout(p: torch.Tensor, g: torch.Tensor) -> bool:
    """True when ``p`` and ``g`` cover their storage densely in the same element order (contiguous, or the
    same permutation of a contiguous layout, e.g. channels_last), so flat index i means the same element."""
    if p.is_contiguous() and g.is_contiguous():
        return True
    if p.stride() != g.stride():
        return False
    order = sorted(range(p.dim()), key=lambda d: (-p.stride(d), -p.shape[d]))
    return p.permute(order).is_contiguous()


def check_tensor(p: torch.Tensor, g: torch.Tensor, what: str) -> None:
    """Raise a clear error for a (param, grad) pair the kernels cannot handle (dtype, shape, layout)."""
    for name, t in (("parameter", p), ("gradient", g)):
        if t.dtype not in INT_OF:
            raise TypeError(
                f"{what}: {name} dtype {t.dtype} (shape {tuple(p.shape)}) is not covered by the Triton GR-step "
                f"kernels (float64/float32/bfloat16/float16); use backend='torch'"
            )
    if g.shape != p.shape:
        raise ValueError(f"{what}: gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{what}: gradient on {g.device} but parameter on {p.device}")
    if not dense_same_layout(p, g):
        raise ValueError(
            f"{what}: parameter of shape {tuple(p.shape)} (strides {p.stride()}) and its gradient (strides "
            f"{g.stride()}) are not dense in the same layout; the Triton GR step works on dense storage. "
            "Make the parameter contiguous or use backend='torch'"
        )


@dataclass
class Group:
    """The launch tables of one (param dtype, grad dtype) group. ``rows`` index the step's parameter list."""

    p_dtype: torch.dtype  # dtype of the weight that is perturbed, saved and restored (the model's)
    g_dtype: torch.dtype
    src_dtype: torch.dtype  # dtype of the parameter the perturbation is computed from (== p_dtype, or a master)
    rows: list[int]
    numels: list[int]
    offsets: list[int]
    total: int
    n_chunks: int
    chunk_base: int  # first slot of this group's chunks in the step's partial-sum buffers
    aligned: bool  # every parameter and gradient address is 16-byte aligned (vectorised access)
    tab: torch.Tensor
    chunks: torch.Tensor
    key: tuple = field(default_factory=tuple)

    @property
    def n_tensors(self) -> int:
        return len(self.rows)

    def table_bytes(self) -> int:
        return self.tab.numel() * 8 + self.chunks.numel() * 8


def build_group(
    p_dtype: torch.dtype,
    g_dtype: torch.dtype,
    rows: Sequence[int],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    chunk: int,
    chunk_base: int,
    device: torch.device,
    models: Sequence[torch.Tensor] | None = None,
) -> Group:
    """Build the tables of one group from the tensors' addresses and sizes (host metadata only)."""
    models = params if models is None else models
    numels = [params[r].numel() for r in rows]
    offsets, chunk_t, chunk_s, total = [], [], [], 0
    for t, n in enumerate(numels):
        offsets.append(total)
        total += -(-n // SAVE_ALIGN) * SAVE_ALIGN  # each tensor's save slot starts 16-byte aligned
        for s in range(0, n, chunk):
            chunk_t.append(t)
            chunk_s.append(s)
    tab = torch.tensor(
        [
            [params[r].data_ptr() for r in rows],
            [grads[r].data_ptr() for r in rows],
            numels,
            offsets,
            list(rows),
            [models[r].data_ptr() for r in rows],
        ],
        dtype=torch.int64,
    ).reshape(6, len(rows))
    chunks = torch.tensor([chunk_t, chunk_s], dtype=torch.int64).reshape(2, len(chunk_t))
    return Group(
        p_dtype=models[rows[0]].dtype,
        g_dtype=g_dtype,
        src_dtype=p_dtype,
        rows=list(rows),
        numels=numels,
        offsets=offsets,
        total=total,
        n_chunks=len(chunk_t),
        chunk_base=chunk_base,
        aligned=all(t[r].data_ptr() % 16 == 0 for t in (params, grads, models) for r in rows),
        tab=to_device(tab, device),
        chunks=to_device(chunks, device),
    )


def layout_key(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], models: Sequence[torch.Tensor] | None = None
) -> tuple:
    """What the tables depend on: every address, size and dtype (a moved or resized tensor rebuilds them)."""
    models = params if models is None else models
    return tuple(
        (p.data_ptr(), g.data_ptr(), m.data_ptr(), p.numel(), p.dtype, g.dtype, m.dtype)
        for p, g, m in zip(params, grads, models)
    )


def build_groups(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    chunk: int,
    device: torch.device,
    models: Sequence[torch.Tensor] | None = None,
) -> list[Group]:
    """Split the step's parameters into dtype groups (first-seen order) and build each group's tables."""
    models = params if models is None else models
    order: dict[tuple[torch.dtype, torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, models)):
        if p.numel() == 0:
            continue  # nothing to do, and no chunk to launch
        order.setdefault((p.dtype, g.dtype, m.dtype), []).append(i)
    groups, base = [], 0
    for (pd, gd, _md), rows in order.items():
        grp = build_group(pd, gd, rows, params, grads, chunk, base, device, models)
        base += grp.n_chunks
        groups.append(grp)
    return groups
