"""GR under DeepSpeed ZeRO-1/2: the GR step on each rank's partition, global norms, masters never written.

Under ZeRO-1/2 every rank holds the full low-precision (lp) weights, but after the backward at the accumulation
boundary only its partition of the reduced gradient, next to its partition of the fp32 master weights. GR is
element-wise except for its norms, so it runs on the partition:

    g1, θ      the rank's fragments of each parameter (DeepSpeed's ``_hp_mapping``: lp weight and gradient views)
    ‖g‖²       Σ over the data-parallel group of the local Σ g²        (one all-reduce of a 0-d tensor per norm)
    θ'         written into the rank's lp fragments, then published to all ranks (the all-gather DeepSpeed does
               after its own step); restored bitwise from the saved fragments and published again
    grad       g1 + (γ/ε)(clip(g2) − clip(g1)) written into the gradient partition the engine's step reads

The fp32 masters are never written (the public recipe's ``refresh_fp32_params()`` copies bf16-rounded weights
over them twice per step). With bf16 weights the perturbation is stochastically rounded from the lp weight the
first pass computed with (w = rn_bf16(master)): SR(w + ε·v) is unbiased around w, whereas SR(master + ε·v) would
add master − w, up to half a bf16 ulp per element and far larger than ε·v, to the perturbation.

Extra memory per rank: the single-device bytes of the torch backend (saved lp weight + g1 per element) times the
partition, i.e. divided by the data-parallel world size.

ZeRO-3 (parameters partitioned too, gathered per module) is not supported here: :func:`check_supported` says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from grkernels.reference import Shards, StepPlan, TorchGRStep

__all__ = ["DeepSpeedGR", "check_supported", "trainer_grad_reg"]


def trainer_grad_reg(trainer: Any, settings: dict[str, Any], exclude: list[Any]) -> DeepSpeedGR:
    """The :class:`DeepSpeedGR` of a Trainer's engine (``grad_reg_*`` settings; ``exclude``: tensors or names)."""
    engine = trainer.accelerator.deepspeed_engine_wrapped.engine
    named = list(engine.module.named_parameters())
    ex = [p for item in exclude for n, p in named if (p is item if isinstance(item, torch.Tensor) else item in n)]
    return DeepSpeedGR(
        engine, strength=settings["grad_reg_strength"], eps=settings["grad_reg_eps"],
        g1_clip=settings["grad_reg_g1_clip"], g2_clip=settings["grad_reg_g2_clip"], exclude=ex,
        estimator=settings["grad_reg_estimator"], eps_mode=settings["grad_reg_eps_mode"],
        warmup_steps=int(settings["grad_reg_warmup_steps"]), seed=int(getattr(trainer.args, "seed", 0)),
    )


def check_supported(engine: Any) -> None:
    """Raise a clear error for DeepSpeed set-ups the partition GR step does not cover."""
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2):
        raise NotImplementedError(
            f"grkernels GradReg under DeepSpeed supports ZeRO stages 1 and 2 (got stage {stage}): ZeRO-3 gathers "
            "parameters per module, and stage 0 has no partitioned optimizer. Use ZeRO-1/2, FSDP2 or DDP."
        )
    opt = engine.optimizer
    if getattr(opt, "cpu_offload", False):
        raise NotImplementedError("grkernels GradReg under DeepSpeed: optimizer offload is not supported")
    if engine.fp16_enabled():
        raise NotImplementedError("grkernels GradReg under DeepSpeed: fp16 loss scaling is not supported; use bf16")
    if float(engine.gradient_clipping() or 0.0) > 0.0:
        raise NotImplementedError(
            "grkernels GradReg under DeepSpeed: gradient_clipping in the DeepSpeed config would clip g1 and g2 "
            "inside DeepSpeed's step; set it to 0 and use grad_reg_g1_clip / grad_reg_g2_clip (max_grad_norm=0)."
        )


class _DPShards(Shards):
    """Fragments are local already; sums of squares are summed over the data-parallel group."""

    sharded = True

    def __init__(self, group: Any) -> None:
        self._group = group

    def sum_across(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self._group)
        return x


class DeepSpeedGR:
    """Drives one GR step on a ZeRO-1/2 engine between the backward at the accumulation boundary and
    ``engine.step()``: ``perturb()``, the same backward(s) again, ``restore_and_combine()``.

    Args:
        engine: the ``DeepSpeedEngine`` (its optimizer a ``DeepSpeedZeroOptimizer``).
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
        self.strength, self.eps, self.g1_clip, self.g2_clip = float(strength), float(eps), g1_clip, g2_clip
        self.estimator, self.eps_mode, self.rounding, self.seed = estimator, eps_mode, rounding, int(seed)
        self.warmup_steps = int(warmup_steps)
        self._excluded = {id(p) for p in exclude}
        self._shards = _DPShards(self.opt.dp_process_group)
        self._impl = TorchGRStep()
        self._plan: StepPlan | None = None
        self._frags: list[tuple[torch.Tensor, torch.nn.Parameter]] = []
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

    # ------------------------------------------------------------------ partitions
    def _grad_fragment(self, p: torch.nn.Parameter) -> torch.Tensor:
        hp = p._hp_mapping
        g = hp.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        a = hp.lp_fragment_address
        if g.numel() != a.numel:  # bf16: a full-size accumulation buffer; this rank owns one fragment of it
            g = g.narrow(0, a.start, a.numel)
        return g

    def _fragments(self) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
        """(view of this rank's lp fragment with ``.grad`` = its gradient fragment, lp parameter) per parameter."""
        out = []
        for group in self.opt.bit16_groups:
            for p in group:
                hp = getattr(p, "_hp_mapping", None)
                if hp is None:
                    continue
                a = hp.lp_fragment_address
                w = p.data.view(-1).narrow(0, a.start, a.numel)
                w.grad = self._grad_fragment(p)
                out.append((w, p))
        return out

    def _refresh_grads(self) -> None:
        """The engine may rebuild its gradient partition in each backward: point the fragments at the live one."""
        for w, p in self._frags:
            w.grad = self._grad_fragment(p)

    def _publish(self) -> None:
        """Every rank's lp fragments to every rank (what DeepSpeed's step does after updating the masters)."""
        from deepspeed.runtime.utils import all_gather_dp_groups

        o = self.opt
        all_gather_dp_groups(
            groups_flat=o.bit16_groups_flat, partitioned_param_groups=o.parallel_partitioned_bit16_groups,
            dp_process_group=o.real_dp_process_group, start_alignment_factor=o.nccl_start_alignment_factor,
            allgather_bucket_size=o.allgather_bucket_size,
        )

    def _make_plan(self) -> StepPlan:
        self._frags = self._fragments()
        params = [w for w, p in self._frags if id(p) not in self._excluded]
        keep = [w for w, p in self._frags if id(p) in self._excluded]
        if not params:  # this rank's partition holds no GR element: a zero-size stand-in keeps the collectives
            dev = self.opt.bit16_groups_flat[0].device
            empty = torch.zeros(0, device=dev, dtype=torch.float32)
            empty.grad = torch.zeros(0, device=dev, dtype=torch.float32)
            params = [empty]
        return StepPlan(params=params, coefs=[self.strength] * len(params), keep=keep, eps=self.eps,
                        g1_clip=self.g1_clip, g2_clip=self.g2_clip, estimator=self.estimator, rounding=self.rounding,
                        seed=self.seed * 1_000_003 + self.engine.global_steps, eps_mode=self.eps_mode,
                        shards=self._shards)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def perturb(self) -> None:
        """After the backward(s) at θ (the boundary one included): θ' on this rank's partition, published."""
        if self._point == 0:
            self._plan = self._make_plan()
        else:
            self._refresh_grads()
        try:
            self._impl.perturb(self._plan, self._point)
        finally:
            self._publish()
        self._point += 1

    def _put_back(self, op) -> None:
        """``op(plan)`` (a backend restore) on the live gradient partition; the weights are published and the step
        is over whatever happens."""
        self._refresh_grads()
        try:
            op(self._plan)
        finally:
            self._publish()
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

    def metrics(self, sync: bool = True) -> dict[str, Any]:
        """``g1_norm``, ``g2_norm``, ``gr_rel``, ``perturb_ratio`` of the last GR step (global; floats if ``sync``)."""
        out = {k: v for k, v in self._metrics.items() if k != "finite"}
        return {k: float(v) for k, v in out.items()} if sync else out

    def extra_memory_bytes(self) -> int:
        return self._impl.extra_bytes()
