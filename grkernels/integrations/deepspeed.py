"""GR under DeepSpeed ZeRO-1/2/3: the GR step on each rank's partition, global norms, masters never written.

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

Extra memory per rank, every stage: the torch backend's saved lp weight + g1 per partition element (8 B in fp32,
4 B in bf16 with bf16 gradient partitions), i.e. the single-device bytes divided by the data-parallel world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from grkernels.backends.base import Shards, StepPlan
from grkernels.backends.reference import TorchGRStep
from grkernels.params import resolve_exclude

__all__ = ["DeepSpeedGR", "accumulation_boundary", "check_supported", "engine_grad_reg", "trainer_grad_reg"]

_WEIGHT = "_grkernels_ds_weight"  # attribute of a slot (see _slot): the weight partition the step writes


def trainer_grad_reg(trainer: Any, settings: dict[str, Any], exclude: list[Any]) -> DeepSpeedGR:
    """The :class:`DeepSpeedGR` of a Trainer's engine (``grad_reg_*`` settings; ``exclude``: tensors or names)."""
    if (int(settings["grad_reg_every"]) != 1 or settings["grad_reg_reuse"] != "none"
            or float(settings["grad_reg_subset_fraction"]) < 1.0):
        raise NotImplementedError(
            "grkernels GradReg under DeepSpeed runs the full GR step on every optimizer step: grad_reg_every > 1, "
            "grad_reg_reuse and grad_reg_subset_fraction < 1 are not offered there (set grad_reg_every=1, "
            "grad_reg_reuse='none', grad_reg_subset_fraction=1), or use DDP / FSDP2."
        )
    return engine_grad_reg(
        trainer.accelerator.deepspeed_engine_wrapped.engine, exclude=exclude,
        strength=settings["grad_reg_strength"], eps=settings["grad_reg_eps"],
        g1_clip=settings["grad_reg_g1_clip"], g2_clip=settings["grad_reg_g2_clip"],
        estimator=settings["grad_reg_estimator"], eps_mode=settings["grad_reg_eps_mode"],
        warmup_steps=int(settings["grad_reg_warmup_steps"]), seed=int(getattr(trainer.args, "seed", 0)),
    )


def engine_grad_reg(engine: Any, *, exclude: Iterable[torch.Tensor | str] = (), **settings: Any) -> DeepSpeedGR:
    """:class:`DeepSpeedGR` on ``engine`` with ``exclude`` given as the module's tensors or name substrings (each
    must match a parameter); ``settings`` as for :class:`DeepSpeedGR`."""
    named = list(engine.module.named_parameters())
    ids = resolve_exclude(list(exclude), named, [p for _, p in named])  # GradReg's rule: each entry must match
    return DeepSpeedGR(engine, exclude=[p for _, p in named if id(p) in ids], **settings)


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
    if float(engine.gradient_clipping() or 0.0) > 0.0:
        raise NotImplementedError(
            "grkernels GradReg under DeepSpeed: gradient_clipping in the DeepSpeed config would clip g1 and g2 "
            "inside DeepSpeed's step; set it to 0 and use grad_reg_g1_clip / grad_reg_g2_clip (max_grad_norm=0)."
        )
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


def _slot(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What the GR step works on for one partition: a storage-free stand-in whose ``.grad`` is the live gradient
    partition and whose ``_WEIGHT`` is the weight partition (``StepPlan.model_attr``). A stand-in, not the weight
    itself, because the gradient partition may have another dtype (fp32 accumulation of bf16 weights)."""
    s = grad.new_zeros(1).expand(grad.shape)
    s.grad = grad
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


class DeepSpeedGR:
    """Drives one GR step on a ZeRO-1/2/3 engine between the backward at the accumulation boundary and
    ``engine.step()``: ``perturb()``, the same backward(s) again, ``restore_and_combine()``.

    Args:
        engine: the ``DeepSpeedEngine`` (its optimizer a ZeRO-1/2 or ZeRO-3 optimizer).
        exclude: lp parameters left out of GR (they step with g1).
        warmup_steps: engine steps (``engine.global_steps``) without GR first.
        strength, eps, g1_clip, g2_clip, estimator, eps_mode, rounding, seed: as for :class:`grkernels.GradReg`
            (estimator "forward" or "central"). The rounding seed of a step mixes in ``engine.global_steps``, so a
            resumed run reproduces it.
    """

    def __init__(self, engine: Any, *, strength: float, eps: float, g1_clip: float | None = 10.0,
                 g2_clip: float | None = 10.0, exclude: Iterable[torch.Tensor] = (), estimator: str = "forward",
                 eps_mode: str = "absolute", rounding: str = "stochastic", seed: int = 0,
                 warmup_steps: int = 0) -> None:
        check_supported(engine)
        if estimator not in ("forward", "central"):
            raise NotImplementedError(f"grkernels GradReg under DeepSpeed: estimator {estimator!r} (use forward "
                                      "or central)")
        self.engine, self.opt = engine, engine.optimizer
        self.stage = engine.zero_optimization_stage()
        self._parts: _Zero12 | _Zero3 = _Zero3(self.opt) if self.stage == 3 else _Zero12(self.opt)
        self.strength, self.eps, self.g1_clip, self.g2_clip = float(strength), float(eps), g1_clip, g2_clip
        self.estimator, self.eps_mode, self.rounding, self.seed = estimator, eps_mode, rounding, int(seed)
        self.warmup_steps = int(warmup_steps)
        self._excluded = {id(p) for p in exclude}
        self._shards = _DPShards(self._parts.group)
        self._impl = TorchGRStep()
        self._plan: StepPlan | None = None
        self._slots: list[tuple[torch.Tensor, torch.nn.Parameter]] = []
        self._point = 0
        self._metrics: dict[str, torch.Tensor] = {}

    subset_fraction: float | None = None  # sub-batch GR (GradReg.mark_subset) is not offered here

    def combine(self) -> None:
        """Steps without GR (warmup): nothing to do, the engine steps with g1 (the Trainer mixin calls it)."""

    @property
    def active(self) -> bool:
        """Whether the coming engine step does GR (after warmup, γ > 0)."""
        return self.strength > 0.0 and self.engine.global_steps >= self.warmup_steps

    @property
    def extra_passes(self) -> int:
        return (2 if self.estimator == "central" else 1) if self.active else 0

    @contextlib.contextmanager
    def hold_step(self) -> Iterator[None]:
        """Inside: ``engine.step()`` does nothing (the first pass's backward at the boundary reduces the gradients,
        the GR passes run, nothing steps); on a clean exit the engine steps once, with the GR gradient."""
        engine = self.engine
        engine.step = lambda *a, **k: None  # instance attribute: shadows the method until deleted
        try:
            yield
        finally:
            del engine.step
        engine.step()

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions (the tensors only the optimizer step may write)."""
        return self._parts.masters()

    # ------------------------------------------------------------------ partitions
    def _refresh_grads(self) -> None:
        """The engine may rebuild its gradient partition in each backward: point the slots at the live one."""
        for s, p in self._slots:
            s.grad = self._parts.grad(p)

    def _make_plan(self) -> StepPlan:
        parts = self._parts
        self._slots = [(_slot(parts.weight(p), parts.grad(p)), p) for p in parts.params()]
        params = [s for s, p in self._slots if id(p) not in self._excluded and s.numel()]
        keep = [s for s, p in self._slots if id(p) in self._excluded and s.numel()]
        if not params:  # this rank's partition holds no GR element: a zero-size stand-in keeps the collectives
            dev = parts.masters()[0].device
            params = [_slot(torch.zeros(0, device=dev), torch.zeros(0, device=dev))]
        return StepPlan(params=params, coefs=[self.strength] * len(params), keep=keep, eps=self.eps,
                        g1_clip=self.g1_clip, g2_clip=self.g2_clip, estimator=self.estimator, rounding=self.rounding,
                        seed=self.seed * 1_000_003 + self.engine.global_steps, eps_mode=self.eps_mode,
                        shards=self._shards, model_attr=_WEIGHT)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def perturb(self) -> None:
        """After the backward(s) at θ (the boundary one included): θ' on this rank's partition, published."""
        if self._point == 0:
            self._plan = self._make_plan()
        else:
            self._refresh_grads()
        try:
            self._impl.perturb(self._plan, self._point)  # on an error it has put θ and g1 back itself
        finally:
            self._parts.publish()
        self._point += 1

    def _put_back(self, op) -> None:
        """``op(plan)`` (a backend restore) on the live gradient partition; the weights are published and the step
        is over whatever happens."""
        self._refresh_grads()
        try:
            op(self._plan)
        finally:
            self._parts.publish()
            self._point = 0

    @torch.no_grad()
    def restore_and_combine(self) -> None:
        """After the backward(s) at θ': θ back bitwise (published), the GR gradient in the engine's partition."""
        self._put_back(self._impl.restore_and_combine)
        self._metrics = dict(self._impl.metrics)

    @torch.no_grad()
    def restore(self) -> None:
        """Abort: θ back bitwise and published, gradients back to g1. No-op when nothing is perturbed."""
        if self._point:
            self._put_back(self._impl.restore)

    @torch.no_grad()
    def discard_gradients(self) -> None:
        """Drop the window: this rank's gradient partitions zeroed in place and the module's ``.grad`` cleared, so
        the next window accumulates from zero and the held step never runs with it (after a failed GR pass,
        once ``restore`` put θ back)."""
        if self._point:
            raise RuntimeError("DeepSpeedGR.discard_gradients: θ is perturbed; restore() first")
        for p in self._parts.params():
            self._parts.grad(p).zero_()
        self.opt.zero_grad(set_to_none=True)

    def metrics(self, sync: bool = True) -> dict[str, Any]:
        """``g1_norm``, ``g2_norm``, ``gr_rel``, ``perturb_ratio`` of the last GR step (global; floats if ``sync``)."""
        out = {k: v for k, v in self._metrics.items() if k != "finite"}
        return {k: float(v) for k, v in out.items()} if sync else out

    def extra_memory_bytes(self) -> int:
        """Bytes GR holds on this rank: the backend's saved weight and g1 partitions."""
        return self._impl.extra_bytes()
