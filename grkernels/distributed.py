"""Sharded parameters in the GR step: FSDP2 / DTensor local shards, global norms, FSDP1 refusal.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter θ is a DTensor sharded ``Shard(0)`` over a
device mesh, and after the backward its gradient g is a DTensor with the same placements. Perturb, restore and
combine are element-wise in θ, g1 and g2, so they run on the local shards unchanged; only the norms need the
other ranks:

    ‖g‖² = Σ_ranks of the shard group Σ_local g²          (one all-reduce of a 0-d tensor per norm)

The sum runs over the mesh dimensions whose placement is ``Shard`` (each element is held by exactly one rank
there) and not over ``Replicate`` dimensions (HSDP's replicate dimension holds identical copies: summing over it
would count every element once per replica). The result is the same on every rank, so are the metrics.

Mixed precision (``MixedPrecisionPolicy(param_dtype=bf16)`` over fp32 sharded parameters): FSDP2 casts the fp32
shard to bf16 with round-to-nearest before the all-gather, which would erase most of ε·v (shared/docs/bf16.md).
``compute_dtype`` tells the GR step the dtype the model computes with, and the step writes into the fp32 shard
the bf16 value SR(rn_bf16(θ) + ε·v) (stochastically rounded, so exactly representable: the cast keeps it),
perturbing from the weight the first pass computed with; the fp32 shard is restored bitwise from its saved copy.

Edits of a local shard reach the model only through the next all-gather, i.e. while the parameters are sharded.
``reshard_after_forward=False`` (or ``set_reshard_after_backward(False)``) can leave them unsharded; the GR step
then reshards those FSDP groups before it writes (``before_write``), so the next forward gathers the new values.

FSDP1 (``FullyShardedDataParallel``) holds flat, padded local shards of concatenated parameters as plain
tensors: nothing tells the norm which ranks hold the rest, so :func:`check_not_fsdp1` refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grkernels.backends.base import Shards

__all__ = ["DTensorShards", "check_not_fsdp1", "is_dtensor", "shards_for"]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2, tensor parallel), without importing torch.distributed eagerly."""
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", t)).__name__ == "DTensor"


def check_not_fsdp1(params: Sequence[torch.Tensor]) -> None:
    """Raise for parameters of ``FullyShardedDataParallel`` (FSDP1): flat local shards whose norms would be local."""
    for p in params:
        if getattr(p, "_fsdp_flattened", False):
            raise NotImplementedError(
                "GradReg does not support FSDP1 (FullyShardedDataParallel): its parameters are flat local shards "
                "of concatenated tensors, so the norms of g1 and g2 (clipping, eps_mode='radius', metrics) would "
                "be taken over one rank's shard only. Use FSDP2 (torch.distributed.fsdp.fully_shard), which "
                "GradReg supports, or DDP."
            )


def _fsdp2_params() -> dict[int, tuple[Any, Any]]:
    """id(sharded parameter) -> (FSDPParam, FSDPParamGroup) for every live FSDP2 module (torch >= 2.6 internals:
    the composable-state registry). Empty when they are not there (then no mixed precision or reshard is seen)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - other torch versions
        return {}
    out: dict[int, tuple[Any, Any]] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for fp in group.fsdp_params:
                out[id(fp.sharded_param)] = (fp, group)
    return out


def _reduce_dims(t: torch.Tensor) -> tuple[Any, tuple[int, ...]]:
    """(mesh, mesh dimensions to sum a local sum of squares over) of a DTensor; refuses Partial placements."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    dims = []
    for d, pl in enumerate(t.placements):
        if isinstance(pl, Shard):
            dims.append(d)
        elif isinstance(pl, Partial):
            raise NotImplementedError(
                f"GradReg: a gradient of shape {tuple(t.shape)} has a Partial placement (not yet reduced); run "
                "the backward with gradient synchronisation on (FSDP2: set_requires_gradient_sync(True) on the "
                "last micro-batch of both passes)"
            )
        elif not isinstance(pl, Replicate):  # pragma: no cover - custom placements
            raise NotImplementedError(f"GradReg: DTensor placement {pl} is not supported")
    return t.device_mesh, tuple(dims)


class DTensorShards(Shards):
    """The GR step's view of DTensor parameters: local shards, norms summed over the sharded mesh dimensions.

    All tensors of one step must be DTensors on one mesh, sharded over the same mesh dimensions (FSDP2 or HSDP;
    tensor-parallel layouts that shard other dimensions of the same mesh too), with gradients placed like their
    parameters.
    """

    sharded = True

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        mesh, dims = None, None
        for p in tensors:
            if not is_dtensor(p):
                raise NotImplementedError(
                    "GradReg: some parameters are DTensors (FSDP2 / tensor parallel) and others plain tensors; one "
                    "GR step needs one layout. Shard the whole model (fully_shard on the root module too), or "
                    "leave the plain parameters out of GradReg."
                )
            g = p.grad
            if g is not None and (not is_dtensor(g) or tuple(g.placements) != tuple(p.placements)):
                where = tuple(g.placements) if is_dtensor(g) else "a plain tensor"
                raise NotImplementedError(
                    f"GradReg: the gradient of a DTensor parameter of shape {tuple(p.shape)} is {where}, not placed "
                    f"like the parameter ({tuple(p.placements)}); the GR step works on matching local shards"
                )
            m, d = _reduce_dims(p if g is None else g)
            if mesh is None:
                mesh, dims = m, d
            elif m != mesh or d != dims:
                raise NotImplementedError(
                    "GradReg: parameters are sharded over different meshes or mesh dimensions; one GR step "
                    "reduces its norms over one set of ranks. Use one GradReg per layout."
                )
        self._groups = [mesh.get_group(d) for d in dims] if mesh is not None else []
        self._fsdp = _fsdp2_params()

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The local shard of a DTensor (a view of its storage: in-place edits change the DTensor)."""
        with torch.no_grad():
            return t.to_local()

    def sum_across(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over the ranks that hold other shards of a local sum of squares (0-d or 1-D; one all-reduce per
        sharded mesh dimension: one for FSDP2 and HSDP)."""
        import torch.distributed as dist

        x = x.contiguous()
        for group in self._groups:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    def wrap_grad(self, like: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """A DTensor gradient for parameter ``like`` from its local shard."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())

    def compute_dtype(self, p: torch.Tensor) -> torch.dtype | None:
        """FSDP2's ``MixedPrecisionPolicy.param_dtype`` of ``p`` when it casts (None: computes in p's dtype)."""
        hit = self._fsdp.get(id(p))
        return None if hit is None else hit[0].param_dtype

    def before_write(self, params: Sequence[torch.Tensor]) -> None:
        """Reshard the FSDP2 groups of ``params`` that are not sharded now, so that edits of the local shards
        are what the next forward all-gathers (``reshard_after_forward=False`` after a forward without backward,
        ``set_reshard_after_backward(False)``)."""
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        seen: set[int] = set()
        for p in params:
            hit = self._fsdp.get(id(p))
            if hit is None or id(hit[1]) in seen:
                continue
            seen.add(id(hit[1]))
            if any(fp.sharded_state != ShardedState.SHARDED for fp in hit[1].fsdp_params):
                hit[1].reshard()


def shards_for(tensors: Sequence[torch.Tensor], estimator: str = "forward") -> Shards:
    """The :class:`~grkernels.backends.base.Shards` for one GR step over ``tensors`` (parameters with a gradient):
    plain (one process, DDP) or :class:`DTensorShards`. Refuses FSDP1 and, on DTensors, the exact estimator."""
    check_not_fsdp1(tensors)
    if not any(is_dtensor(p) for p in tensors):
        return Shards()
    if estimator == "exact":
        raise NotImplementedError(
            "GradReg(estimator='exact') is not supported on DTensor (FSDP2) parameters: FSDP2 reduces gradients "
            "outside autograd, so the gradient has no graph to differentiate again. Use estimator='forward' or "
            "'central'."
        )
    return DTensorShards(tensors)
