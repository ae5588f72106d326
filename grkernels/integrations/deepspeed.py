"""GR under DeepSpeed ZeRO-1/2/3: a parameter source of the one GR engine, and the hold of the engine's step.

DeepSpeed is not a second implementation of GR: :class:`ZeroSource` tells :class:`grkernels.engine.GREngine` where
the tensors are (each rank's partitions), how norms are summed (over the data-parallel group) and how changed weights
are published; :class:`DeepSpeedGradReg` holds ``engine.step()`` until the GR passes are done and hands the step to
the engine's ``finish``. So everything ``GradReg`` offers runs here too: the C++ / Triton backends, ``every`` /
``reuse``, the adaptive strength, the non-finite skip (every rank votes; a skipped step leaves the masters
untouched), the metrics with the same meaning, and DeepSpeed's own ``gradient_clipping`` (HF's ``max_grad_norm``
through ``"gradient_clipping": "auto"``), which clips the combined GR gradient inside the engine's step exactly as
the Trainer's clip does under DDP. Not offered: the sub-batch pass (DeepSpeed reduces gradients only at the
accumulation boundary, so the subset's reduced g1_S never exists) and the exact estimator (no autograd graph through
the flat partitions); both are refused when the settings are resolved.

After the backward at the accumulation boundary every rank holds its partition of the reduced gradient, next to its
partition of the fp32 master weights. GR is element-wise except for its norms, so it runs on the partition:

    g1, θ      the rank's partition of each parameter's gradient and low-precision (lp) weight
    ‖g‖²       Σ over the data-parallel group of the local Σ g²        (one all-reduce of a 0-d tensor per norm)
    θ'         written into the rank's lp partition and published, so that the next forward computes at θ';
               θ restored bitwise and published again
    grad       g1 + (γ/ε)(clip(g2) − clip(g1)), computed in fp32, written into the gradient partition the
               engine's step reads

Per stage (what "partition", "published" mean):

- ZeRO-1/2: every rank holds the full lp weights; the partition is the rank's fragment of each (DeepSpeed's
  ``_hp_mapping``). Publishing is the all-gather of the lp partitions that DeepSpeed's own step ends with.
- ZeRO-3: the partition is each parameter's ``ds_tensor`` (the forward all-gathers it per module); the gradient
  partition is the optimizer's per-parameter reduced-gradient buffer, accumulated by every backward until the step.
  Publishing releases every gathered parameter and re-gathers the persistent (small, always gathered) ones, as
  DeepSpeed's step does. The fp32 masters are a separate copy (``fp32_partitioned_groups_flat``) in fp32 and bf16
  alike; an engine that kept only one copy is refused rather than have θ' written into its master.

The fp32 masters are never written (the public recipe's ``refresh_fp32_params()`` copies bf16-rounded weights
over them twice per step). With bf16 weights the perturbation is stochastically rounded from the lp weight the
first pass computed with (w = rn_bf16(master)): SR(w + ε·v) is unbiased around w, whereas SR(master + ε·v) would
add master − w, up to half a bf16 ulp per element and far larger than ε·v, to the perturbation.

Gradient accumulation: the Trainer mixin replays the whole window at θ' with the accumulation boundary set as in the
first pass (:func:`accumulation_boundary`): the engine accumulates g2 over the window exactly as it accumulated g1.

Extra memory per rank, every stage: the backend's saved lp weight + g1 per partition element (8 B in fp32, 4 B in
bf16 with bf16 gradient partitions), i.e. the single-device bytes divided by the data-parallel world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from grkernels.backends.base import Shards
from grkernels.engine import GREngine
from grkernels.params import resolve_exclude
from grkernels.settings import GRSettings, resolve
from grkernels.sources import Entry

__all__ = ["DeepSpeedGradReg", "ZeroSource", "accumulation_boundary", "check_supported", "engine_grad_reg",
           "trainer_grad_reg"]

_WEIGHT = "_grkernels_ds_weight"  # attribute of a slot (see _slot): the weight partition the step writes


@contextlib.contextmanager
def accumulation_boundary(accelerator: Any, last: bool) -> Iterator[None]:
    """Inside: Accelerate marks the coming backward as the window's boundary iff ``last`` (it passes the mark to
    ``engine.set_gradient_accumulation_boundary``), as the Trainer did for that micro-batch's first pass. The GR
    replay of a window needs it: with the boundary mark left on every replayed micro-batch, ZeRO-2 rebuilds its
    gradient partition at each one and steps with a wrong g2 (tested: 0.42 relative error after 3 steps)."""
    state = accelerator.gradient_state
    before = state.sync_gradients
    state._set_sync_gradients(last)
    try:
        yield
    finally:
        state._set_sync_gradients(before)


def check_supported(engine: Any) -> None:
    """Raise a clear error for DeepSpeed set-ups the partition GR step does not cover."""
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise NotImplementedError(
            f"grkernels GradReg under DeepSpeed supports ZeRO stages 1, 2 and 3 (got stage {stage}): stage 0 has no "
            "partitioned optimizer. Use ZeRO-1/2/3, or DDP without DeepSpeed."
        )
    offload = [engine.zero_offload_optimizer(), engine.zero_offload_param()]
    if any(c is not None and getattr(c.device, "value", c.device) != "none" for c in offload):
        raise NotImplementedError("grkernels GradReg under DeepSpeed: optimizer / parameter offload is not supported")
    if engine.fp16_enabled():
        raise NotImplementedError("grkernels GradReg under DeepSpeed: fp16 loss scaling is not supported; use bf16")
    if stage == 3:
        if engine.zero_quantized_weights() or engine.zero_quantized_nontrainable_weights():
            raise NotImplementedError(
                "grkernels GradReg under ZeRO-3: quantized weights (ZeRO++ qwZ) would quantize θ' = θ + ε·v in the "
                "all-gather and lose the perturbation; disable zero_quantized_weights."
            )
        if engine.zero_hpz_partition_size() > 1:
            raise NotImplementedError(
                "grkernels GradReg under ZeRO-3: hierarchical partitioning (ZeRO++ hpZ) gathers from secondary "
                "copies that a perturbation of the primary partition does not reach; set zero_hpz_partition_size=1."
            )
        if engine.zero_quantized_gradients():
            raise NotImplementedError("grkernels GradReg under ZeRO-3: quantized gradients (ZeRO++ qgZ) are not "
                                      "supported (untested); disable zero_quantized_gradients.")


class _DPShards(Shards):
    """Partitions are local already; sums of squares are summed over the data-parallel group."""

    sharded = True

    def __init__(self, group: Any) -> None:
        self._group = group

    def sum_across(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self._group)
        return x


def _slot(weight: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """What the GR step works on for one partition: a storage-free stand-in whose ``.grad`` is the live gradient
    partition (set by :meth:`ZeroSource.refresh`) and whose ``_WEIGHT`` is the weight partition
    (``StepPlan.model_attr``). A stand-in, not the weight itself, because the gradient partition may have another
    dtype (fp32 accumulation of bf16 weights): the stand-in takes the dtype of ``like``, the gradient partition."""
    like = weight if like is None else like
    s = like.new_zeros(1).expand(like.shape)
    setattr(s, _WEIGHT, weight)
    return s


class _Zero12:
    """ZeRO-1/2: the rank's fragment of each full lp weight and of the reduced gradient."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.group = opt.dp_process_group

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.bit16_groups for p in g if getattr(p, "_hp_mapping", None) is not None]

    def weight(self, p: torch.nn.Parameter) -> torch.Tensor:
        a = p._hp_mapping.lp_fragment_address
        return p.data.view(-1).narrow(0, a.start, a.numel)

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        hp = p._hp_mapping
        g = hp.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        a = hp.lp_fragment_address
        if g.numel() != a.numel:  # bf16: a full-size accumulation buffer; this rank owns one fragment of it
            g = g.narrow(0, a.start, a.numel)
        return g

    def masters(self) -> list[torch.Tensor]:
        return list(self.opt.single_partition_of_fp32_groups)

    def publish(self) -> None:
        """Every rank's lp fragments to every rank (what DeepSpeed's step does after updating the masters)."""
        from deepspeed.runtime.utils import all_gather_dp_groups

        o = self.opt
        all_gather_dp_groups(
            groups_flat=o.bit16_groups_flat, partitioned_param_groups=o.parallel_partitioned_bit16_groups,
            dp_process_group=o.real_dp_process_group, start_alignment_factor=o.nccl_start_alignment_factor,
            allgather_bucket_size=o.allgather_bucket_size,
        )


class _Zero3:
    """ZeRO-3: each parameter's ``ds_tensor`` (its lp partition) and its reduced-gradient partition.

    Only the first ``_real(p)`` elements of a partition belong to the parameter (the last rank's is padded)."""

    def __init__(self, opt: Any) -> None:
        import torch.distributed as dist

        self.opt = opt
        self.group = opt.dp_process_group
        world = dist.get_world_size(group=self.group)
        if any(opt._get_param_partition_world_size(p) != world for p in self.params()):
            raise NotImplementedError(
                "grkernels GradReg under ZeRO-3: parameters partitioned over a subgroup of the data-parallel group "
                "(MiCS / hpZ) would have their norms over-counted; partition over the whole group."
            )
        for i, lp in enumerate(opt.fp16_partitioned_groups_flat):
            if lp is None or lp.data_ptr() == opt.fp32_partitioned_groups_flat[i].data_ptr():
                raise NotImplementedError(
                    "grkernels GradReg under ZeRO-3: this engine keeps no separate fp32 master of the parameter "
                    "partitions (or swaps them to NVMe), so θ' would have to be written into the master. Use bf16 "
                    "(separate fp32 masters), or ZeRO-1/2."
                )

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.fp16_groups for p in g if p.requires_grad]

    def _real(self, p: torch.nn.Parameter) -> int:
        n = p.partition_numel()
        return max(0, min(n, p.ds_numel - n * self.opt._get_param_partition_rank(p)))

    def weight(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor.data.view(-1).narrow(0, 0, self._real(p))

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        g, _ = self.opt._get_fp32_grad_state_partition(p, release_swap_buffers=False)  # the live buffer, no copy
        return g.view(-1).narrow(0, 0, self._real(p))

    def masters(self) -> list[torch.Tensor]:
        return list(self.opt.fp32_partitioned_groups_flat)

    def publish(self) -> None:
        """The forward gathers each module's parameters from ``ds_tensor``; the persistent ones stay gathered, so
        release everything and re-gather those (DeepSpeed's step does the same after writing the partitions)."""
        o = self.opt
        o._partition_all_parameters()
        if o.persistent_parameters:
            o.persistent_parameters[0].all_gather(o.persistent_parameters)


class ZeroSource:
    """The parameter source of a ZeRO-1/2/3 engine (:class:`grkernels.sources.ParamSource`): one stand-in per lp
    parameter this rank holds a partition of, in the ZeRO optimizer's group order (the positions), each pointed at the
    live weight and gradient partitions whenever the engine looks (``entries``), since DeepSpeed may rebuild its
    gradient buffers in each backward."""

    model_attr = _WEIGHT

    def __init__(self, engine: Any, excluded: set[int]) -> None:
        check_supported(engine)
        self.ds_engine, self.opt = engine, engine.optimizer
        self.stage = engine.zero_optimization_stage()
        self.parts: _Zero12 | _Zero3 = _Zero3(self.opt) if self.stage == 3 else _Zero12(self.opt)
        self.shards_ = _DPShards(self.parts.group)
        self._lp = self.parts.params()
        self._slots = [_slot(self.parts.weight(p)) for p in self._lp]
        self._entries = [Entry(s, excluded=id(p) in excluded) for s, p in zip(self._slots, self._lp)]
        if not any(s.numel() and not e.excluded for s, e in zip(self._slots, self._entries)):
            # this rank's partition holds no GR element: a zero-size stand-in keeps every rank in the collectives
            dev = self.parts.masters()[0].device
            stand_in = _slot(torch.zeros(0, device=dev))
            stand_in.grad = torch.zeros(0, device=dev)
            self._slots.append(stand_in)
            self._lp.append(None)
            self._entries.append(Entry(stand_in))

    def entries(self) -> list[Entry]:
        self.refresh(None)
        return self._entries

    def refresh(self, plan: Any) -> None:
        """Point every stand-in at the live weight and gradient partitions (None before the first reduction). A
        stand-in is rebuilt only when its gradient partition's dtype or shape changed (the first time: ``.grad``
        must match the tensor's dtype), so within a step the plan's tensors stay the same objects."""
        for i, (s, p) in enumerate(zip(self._slots, self._lp)):
            if p is None:
                continue
            weight = self.parts.weight(p)
            try:
                grad = self.parts.grad(p)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError, RuntimeError):
                grad = None  # no reduced gradient yet (before the boundary's backward)
            if grad is not None and (grad.dtype != s.dtype or grad.shape != s.shape or grad.device != s.device):
                s = self._slots[i] = _slot(weight, grad)
                self._entries[i] = Entry(s, excluded=self._entries[i].excluded)
            setattr(s, _WEIGHT, weight)
            s.grad = grad

    def step_tensors(self) -> list[torch.Tensor]:
        return [e.tensor for e in self.entries() if e.tensor.grad is not None]

    def shards(self, tensors: Any, estimator: str) -> Shards:
        return self.shards_

    def check(self, params: Any, keep: Any) -> None:
        """The partitions are DeepSpeed's: dense, floating point, one device (checked by DeepSpeed)."""

    def publish(self) -> None:
        self.parts.publish()

    def masters(self) -> list[torch.Tensor]:
        return self.parts.masters()


class DeepSpeedGradReg:
    """GR on a ZeRO-1/2/3 engine: the one engine (:class:`~grkernels.engine.GREngine`) over a :class:`ZeroSource`,
    driven between the backward at the accumulation boundary and ``engine.step()``.

    The host calls, per optimizer step: the backward(s) of the window inside :meth:`hold_step` (DeepSpeed steps inside
    the boundary's backward: the hold defers it); on a full GR step ``perturb()``, the window's backward(s) again,
    ``restore_and_combine()``; on other steps ``combine()``. Leaving :meth:`hold_step` cleanly runs the engine's
    ``finish``: the non-finite vote over every rank, then ``engine.step()`` (which applies DeepSpeed's own gradient
    clipping to the combined gradient), or a skip that drops the window's gradients. The settings are those of
    :func:`grkernels.settings.resolve` with ``host="deepspeed"``; the step counter starts at
    ``engine.global_steps`` (a resumed run continues its warmup, schedule and rounding seeds).
    """

    def __init__(self, engine: Any, settings: GRSettings, exclude: Iterable[torch.Tensor | str] = ()) -> None:
        check_settings(settings)
        named = list(engine.module.named_parameters())
        ids = resolve_exclude(list(exclude), named, [p for _, p in named])  # GradReg's rule: each entry must match
        self.engine = engine
        self.excluded_ids = ids  # ids of the module's parameters left out of GR
        self.source = ZeroSource(engine, ids)
        self.gr = GREngine(settings, self.source)
        self.gr.step_count = int(engine.global_steps)
        self.stage = self.source.stage

    # ------------------------------------------------------------------ the engine's step, held
    @contextlib.contextmanager
    def hold_step(self) -> Iterator[None]:
        """Inside: ``engine.step()`` does nothing (the boundary's backward reduces the gradients, the GR passes run);
        on a clean exit the GR engine finishes the step: ``engine.step()`` with the combined gradient, or a skip."""
        engine = self.engine
        engine.step = lambda *a, **k: None  # instance attribute: shadows the method until deleted
        try:
            yield
        finally:
            del engine.step
        stepped = []
        self.gr.finish(lambda: stepped.append(engine.step()))
        if not stepped:  # skipped (non-finite): the window's gradients must not reach the next step
            self.discard_gradients()

    # ------------------------------------------------------------------ the engine's calls
    active = property(lambda self: self.gr.active)
    extra_passes = property(lambda self: self.gr.extra_passes)
    subset_fraction = None  # the sub-batch pass is not offered here (see the module docstring)

    def perturb(self) -> None:
        self.gr.perturb()

    def restore_and_combine(self) -> None:
        self.gr.restore_and_combine()

    def combine(self) -> None:
        self.gr.combine()

    def restore(self) -> None:
        """Abort: θ back bitwise and published, gradients back to g1."""
        self.gr.abort()

    def metrics(self, sync: bool = True) -> dict[str, Any]:
        return self.gr.metrics(sync)

    def extra_memory_bytes(self) -> int:
        return self.gr.extra_bytes()

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions (the tensors only the optimizer step may write)."""
        return self.source.masters()

    @torch.no_grad()
    def discard_gradients(self) -> None:
        """Drop the window: this rank's gradient partitions zeroed in place and the module's ``.grad`` cleared, so
        the next window accumulates from zero and the held step never runs with it."""
        if self.gr.phase != "idle":
            self.gr.abort()
        for p in self.source.parts.params():
            self.source.parts.grad(p).zero_()
        self.source.opt.zero_grad(set_to_none=True)


def check_settings(settings: GRSettings) -> None:
    """Refuse settings the partition step cannot run (``HOST_LIMITS["deepspeed"]``: the exact estimator, lean mode,
    the sub-batch pass), with the schema's message, also for settings resolved without ``host="deepspeed"``."""
    resolve(settings.values, host="deepspeed")


def trainer_grad_reg(trainer: Any, settings: GRSettings, exclude: list[Any]) -> DeepSpeedGradReg:
    """The :class:`DeepSpeedGradReg` of a Trainer's engine (``settings`` resolved with ``host="deepspeed"``;
    ``exclude``: tensors or name substrings)."""
    check_settings(settings)
    return DeepSpeedGradReg(trainer.accelerator.deepspeed_engine_wrapped.engine, settings, exclude)


def engine_grad_reg(engine: Any, settings: GRSettings, exclude: Iterable[torch.Tensor | str] = ()) -> DeepSpeedGradReg:
    """:class:`DeepSpeedGradReg` on ``engine`` with ``exclude`` given as the module's tensors or name substrings."""
    return DeepSpeedGradReg(engine, settings, exclude)
