"""Gradient regularization in verl (0.9): a config switch on the actor's (or critic's) FSDP engine.

verl's update is ``BaseEngine.train_batch``: zero the gradients, ``forward_backward_batch`` over the
micro-batches of a mini-batch (gradient sync on the last one only), ``optimizer_step`` (clip to
``optim.clip_grad``, skip a non-finite step, step). An optimizer alone never sees the batch, so GR lives in the
engine. :class:`GradRegFSDPEngineWithLMHead` (and ``...WithValueHead``) subclass verl's FSDP engines and, when GR
is on, run per mini-batch:

    g1 = ∇L(θ)         forward_backward_batch (verl's, unchanged; its metrics are the ones reported)
    θ' = θ + ε·clip(g1) on the GR parameters                          GradReg.perturb()
    g2 = ∇L(θ')        forward_backward_batch again: the same micro-batches, the RNG state of each replayed
    θ restored bitwise; grad ← g1 + (γ/ε)·(clip(g2) − clip(g1))      GradReg.restore_and_combine()
    verl's own optimizer_step: clip the combined gradient, skip if non-finite, step the base optimizer

so the gradient verl's optimizer steps with is exactly g1 + (γ/ε)(g2 − g1) over all micro-batches of the
mini-batch, with verl's loss (any ``loss_agg_mode``, the KL loss, entropy bonus) and its global-token
normalisation. Old log-probs are computed before the update (``compute_log_prob``), so the pass at θ'
differentiates the same loss. Excluded parameters (default: embeddings and output head) get g1.

Cheaper GR: ``every``/``reuse`` as in GradReg; ``subset_fraction < 1``: the first pass runs as two
``forward_backward_batch`` calls (the subset S chosen by ``split_mini_batch``, then the rest; both normalised as the
whole mini-batch), and the pass at θ' on S only, combined as g2 ≈ g1 + (g2_S − g1_S)/f (``GradReg.mark_subset``).

Configuration, in verl's config style (a dataclass with ``_target_``; Hydra overrides)::

    actor_rollout_ref.actor.optim._target_=grkernels.integrations.verl.GradRegFSDPOptimizerConfig
    +actor_rollout_ref.actor.optim.grad_reg.strength=auto      # γ held so that gr_rel = target_rel (the default;
    +actor_rollout_ref.actor.optim.grad_reg.target_rel=3.0     #   a number fixes γ; 0: off, verl's own update bitwise)
    +actor_rollout_ref.actor.optim.grad_reg.eps=0.02           # ε, a radius by default (eps_mode)
    actor_rollout_ref.model.external_lib=grkernels.integrations.verl

Importing this module (the ``_target_`` or ``external_lib`` does it in every worker) registers the GR engines in
verl's ``EngineRegistry`` under vendor-specific keys (("cuda", "nvidia"), ("cuda", "amd"), ("npu", "huawei")),
which verl looks up before its device-wide default: every FSDP engine of the process is then a GR engine, which
behaves exactly like verl's own (bitwise) when its optimizer config has no ``grad_reg`` or γ = 0.

Settings: ``optim.grad_reg`` holds the schema's settings (``grkernels.settings``, no prefix: ``strength`` (a
number, or ``auto`` with ``target_rel``), ``eps``, ``eps_mode``, ``every``, ``reuse``, ``exclude``,
``subset_fraction``, ``subset_by`` ...), validated when the config is built (``HOST_LIMITS["verl"]``: no exact
estimator); the ``GradReg`` gets every engine setting.

Metrics: ``grad_reg/g1_norm``, ``grad_reg/g2_norm``, ``grad_reg/gr_rel`` (= ‖GR − g1‖/‖g1‖),
``grad_reg/perturb_ratio``, ``grad_reg/skipped``, ``grad_reg/strength``, ``grad_reg/step`` in the metrics of the
update's last mini-batch (``actor/grad_reg/...`` in the trainer's logs), by the integrations' one averaging rule
(``grkernels.integrations.common.MetricsLog``): values averaged over the update's optimizer steps (its mini-batches),
``step`` and ``skipped`` as after the last. State: GR's step counter (warmup, schedule,
stochastic-rounding seeds) is part of the optimizer's state dict, which verl's FSDP checkpoints save and load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from verl.base_config import BaseConfig
from verl.utils import tensordict_utils as tu
from verl.utils.py_functional import append_to_dict
from verl.utils.tensordict_utils import maybe_fix_3d_position_ids
from verl.workers.config import FSDPOptimizerConfig
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

from grkernels.distributed import _fsdp2_params
from grkernels.integrations.common import MetricsLog, Window, build_grad_reg, host_settings, refuse_loss_scaling
from grkernels.optim import GradReg
from grkernels.rng import RNGState
from grkernels.settings import GRSettings, prefixed_fields

__all__ = [
    "GradRegConfig",
    "GradRegEngineMixin",
    "GradRegFSDPEngineWithLMHead",
    "GradRegFSDPEngineWithValueHead",
    "GradRegFSDPOptimizerConfig",
    "register_engines",
]


def _post_init(self: Any) -> None:
    """Validate with the schema (and what verl's FSDP engines cannot run), then keep the parsed values (a clip
    ``<= 0`` → None, ``exclude`` "none" → [], "1e-3" → 0.001)."""
    values = {name: _plain(getattr(self, name)) for name in _NAMES}
    parsed = host_settings(values, host="verl").values
    for name in _NAMES:
        object.__setattr__(self, name, parsed[name])  # BaseConfig fields are frozen once set


def _plain(value: Any) -> Any:
    """Hydra hands lists and mappings over as OmegaConf containers: the schema checks plain ones."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _settings(self: Any) -> GRSettings:
    """The validated settings (``grkernels.settings.GRSettings``)."""
    return host_settings({name: getattr(self, name) for name in _NAMES}, host="verl")


#: GR settings (``optim.grad_reg``): the schema's (``grkernels.settings.SETTINGS``) as fields of a verl config
#: dataclass, with their defaults and help; validated when built (``HOST_LIMITS["verl"]``: no exact estimator, FSDP2
#: reduces gradients outside autograd). ``strength: 0`` is verl's own update, bitwise; a clip ``null`` or ``<= 0``
#: is no clip; ``exclude: null`` the paper's embeddings and output head, ``[]`` none; verl's ``optim.clip_grad``
#: clips the combined gradient.
GradRegConfig = make_dataclass(
    "GradRegConfig", prefixed_fields(""), bases=(BaseConfig,),
    namespace={"__module__": __name__, "__post_init__": _post_init, "settings": _settings,
               "__doc__": "GR settings of verl's optim.grad_reg: the fields of grkernels.settings.SETTINGS."})
_NAMES = tuple(name for name, _, _ in prefixed_fields(""))


@dataclass
class GradRegFSDPOptimizerConfig(FSDPOptimizerConfig):
    """verl's ``FSDPOptimizerConfig`` plus ``grad_reg`` (a :class:`GradRegConfig` or a mapping of its fields).

    Every other field keeps verl's meaning: the base optimizer (``optimizer_impl``/``optimizer``,
    ``override_optimizer_config``), learning rate and schedule, and ``clip_grad``, which clips the combined GR
    gradient before the step.
    """

    grad_reg: Any = field(default_factory=GradRegConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        gr = self.grad_reg
        if gr is None:
            gr = GradRegConfig(strength=0.0)
        elif isinstance(gr, Mapping) and not isinstance(gr, GradRegConfig):
            values = {k: _plain(v) for k, v in dict(gr).items() if k != "_target_"}
            host_settings(values, host="verl")  # unknown keys: the schema's TypeError, naming the known ones
            gr = GradRegConfig(**values)
        if not isinstance(gr, GradRegConfig):
            raise TypeError(f"optim.grad_reg must be a GradRegConfig or a mapping of its fields, got {type(gr)}")
        object.__setattr__(self, "grad_reg", gr)  # BaseConfig fields are frozen once set


def grad_reg_config(optimizer_config: Any) -> Any:
    """The GR settings (a :class:`GradRegConfig`) of a verl optimizer config, or None when GR is off (no
    ``grad_reg``, or ``strength: 0``)."""
    gr = getattr(optimizer_config, "grad_reg", None)
    if gr is None or gr.strength == 0.0:
        return None
    return gr


class GradRegEngineMixin:
    """GR for a verl FSDP engine: put it before the engine class in the bases (see the module docstring).

    Uses of the engine's hooks: ``_build_optimizer`` wraps verl's optimizer in :class:`grkernels.GradReg` when
    GR is on; ``train_batch`` runs the extra pass(es) and ``GradReg.combine()``; ``forward_step`` records /
    replays the RNG state per micro-batch; ``optimizer_step`` is verl's, then GR goes idle whether verl stepped or
    skipped.
    """

    _grad_reg: GradReg | None = None
    _gr_rng: Window | None = None
    _gr_split: _Split | None = None
    _gr_log: MetricsLog | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if grad_reg_config(self.optimizer_config) is not None and self.engine_config.strategy != "fsdp2":
            # before the model is built: FSDP1's flat local shards would give GR local norms (GradReg refuses them)
            raise NotImplementedError(
                f"GR in verl needs strategy 'fsdp2' (got {self.engine_config.strategy!r}): FSDP1 holds flat local "
                "shards of concatenated parameters, so GR's norms (clipping, eps_mode='radius', metrics) would be "
                "one rank's. Set actor.strategy=fsdp2, or grad_reg.strength=0."
            )

    @property
    def grad_reg(self) -> GradReg | None:
        """The :class:`grkernels.GradReg` around verl's optimizer (None when GR is off)."""
        return self._grad_reg

    def _build_optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = super()._build_optimizer(module)  # verl's: any optimizer class by import path
        cfg = grad_reg_config(self.optimizer_config)
        self._grad_reg = None
        if cfg is None:
            return optimizer
        refuse_loss_scaling("verl (ShardedGradScaler)", getattr(self, "scaler", None) is not None,
                            "Use mixed_precision.param_dtype=bf16 (or fp32).")
        self._grad_reg = build_grad_reg(optimizer, cfg.settings(), module)
        self._gr_log = MetricsLog()
        return self._grad_reg

    def forward_step(self, micro_batch: Any, loss_function: Any, forward_only: bool) -> Any:
        if self._gr_rng is not None and not forward_only:
            self._gr_rng.at_micro_batch()
        if self._gr_split is not None and not forward_only:
            # a part of the mini-batch: its loss terms normalised as in the whole mini-batch's loss
            tu.assign_non_tensor(micro_batch, batch_num_tokens=self._gr_split.num_tokens)
        return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)

    def train_batch(self, data: Any, loss_function: Any) -> Any:
        """verl's ``train_batch`` with the GR pass(es) between the backward at θ and the optimizer step."""
        gr = self._grad_reg
        if gr is None:
            return super().train_batch(data, loss_function)
        maybe_fix_3d_position_ids(data)
        self.optimizer_zero_grad()
        passes = gr.extra_passes
        rng = self._gr_rng = Window() if passes else None
        rng_after = None
        try:
            split = self._gr_split = self._split_for_subset(data) if passes else None
            if split is None:
                outputs = self.forward_backward_batch(data, loss_function, forward_only=False)
            else:  # the subset first, its gradient synchronised at its end; then the rest
                outputs = self.forward_backward_batch(split.subset, loss_function, forward_only=False)
                subset_micro_batches = len(rng)
                gr.mark_subset(split.fraction)
                outputs = _merge_outputs(outputs, self.forward_backward_batch(split.rest, loss_function,
                                                                              forward_only=False))
            if passes:
                rng_after = RNGState()
            for _ in range(passes):
                gr.perturb()
                rng.rewind(None if split is None else subset_micro_batches)
                # outputs: those at θ
                self.forward_backward_batch(data if split is None else split.subset, loss_function, forward_only=False)
                rng.check_complete()
            # before verl's clip: θ back and .grad = the GR gradient (a full step), g1 + the reused correction
            # (every/reuse), or g1 with its diagnostics recorded (warmup)
            gr.combine()
        except BaseException:
            gr.restore()  # θ back bitwise, gradients back to g1, GR idle and usable
            _drop_pending_fsdp2_grads(self.module)
            raise
        finally:
            self._gr_rng = self._gr_split = None
            if rng_after is not None:
                rng_after.replay()  # the RNG continues from where the pass at θ left it
        grad_norm = self.optimizer_step()
        self._gr_log.record(gr)
        # GR's metrics once per update, on its last mini-batch (verl marks it for the LR scheduler): verl averages
        # each metric's list over the update, so a single entry is logged as it is (the one rule: MetricsLog)
        last = tu.get_non_tensor_data(data, "update_lr_scheduler", True) is not False
        summary = self._gr_log.flush() if last else {}
        if self.is_mp_src_rank_with_outputs():
            assert "grad_norm" not in outputs["metrics"]
            outputs["metrics"]["grad_norm"] = grad_norm
            # a list, like verl's per-micro-batch metrics (the worker gathers lists over data-parallel ranks; GR's
            # metrics are global, the same on every rank)
            outputs["metrics"].update({f"grad_reg/{k}": [v] for k, v in summary.items()})
        return outputs

    def _split_for_subset(self, data: Any) -> _Split | None:
        """The sub-batch pass's subset of this rank's mini-batch (``grad_reg.subset_fraction`` < 1), or None."""
        cfg = grad_reg_config(self.optimizer_config)
        if cfg.subset_fraction >= 1.0:
            return None
        return split_mini_batch(data, cfg.subset_fraction, cfg.subset_by, group=self.get_data_parallel_group(),
                                seed=(cfg.seed, self._grad_reg.engine.step_count))

    def optimizer_step(self) -> float:
        try:
            return super().optimizer_step()
        finally:
            if self._grad_reg is not None:
                # verl skips a non-finite step without calling step(): end GR's step (θ is already θ) so that
                # the next one starts clean. No-op after a step taken.
                self._grad_reg.restore()


@dataclass
class _Split:
    """A mini-batch split for the sub-batch pass: the subset S, the rest, the share f of S in the estimate
    g2 ≈ g1 + (g2_S − g1_S)/f, and the whole mini-batch's loss tokens over the data-parallel ranks (verl's
    ``batch_num_tokens``, which each part's loss must keep so that its terms are those of the whole loss)."""

    subset: Any
    rest: Any
    fraction: float
    num_tokens: int
    rows: list[int]  # the subset's rows in ``data``


def split_mini_batch(data: Any, fraction: float, by: str, group: Any = None, seed: tuple[int, int] = (0, 0)
                     ) -> _Split | None:
    """This rank's mini-batch ``data`` (a verl TensorDict) split for the sub-batch pass: the ⌈f·n⌉ sequences
    (rounded up to whole micro-batches) with the largest Σ_t |A_t|·mask_t (``by="advantage"``) or at random,
    in their order in ``data``, and the rest. None when the subset would be the whole mini-batch on every rank.

    One host read (verl's own ``forward_backward_batch`` makes one per call as well): the subset's indices and
    one all-reduce over ``group`` of the loss tokens and the scores, so that f is the global share: Σ_S|A|/Σ|A|
    (the count share when every advantage is 0, and for ``by="random"``).
    """
    for key, refused in (("force_group_size", 1), ("return_model_output", False)):
        if tu.get_non_tensor_data(data, key, refused) not in (None, refused):
            raise NotImplementedError(
                f"grad_reg.subset_fraction < 1 with {key}={tu.get_non_tensor_data(data, key, None)!r}: the "
                "subset is chosen per sequence and its outputs are not put back in order. Use subset_fraction=1."
            )
    n = data.batch_size[0]
    dynamic = tu.get_non_tensor_data(data, "use_dynamic_bsz", True)
    unit = 1 if dynamic else int(tu.get_non_tensor_data(data, "micro_batch_size_per_gpu", 1))
    k = min(n, math.ceil(fraction * n / unit) * unit)  # verl splits a fixed-size mini-batch into whole chunks
    mask = data["loss_mask"]
    if by == "advantage":
        if "advantages" not in data.keys():
            raise ValueError("grad_reg.subset_by='advantage' needs the batch's 'advantages' (the actor's update); "
                             "use subset_by='random' for the critic")
        weighted = data["advantages"].abs() * mask
        score = (torch.stack([row.double().sum() for row in weighted.unbind()]) if weighted.is_nested
                 else weighted.double().sum(-1))
    else:
        generator = torch.Generator().manual_seed(hash((seed, torch.distributed.get_rank(group))) % 2**63)
        score = torch.rand(n, generator=generator, dtype=torch.float64).to(mask.device)
    order = torch.topk(score, k).indices
    tokens = (mask.values() if mask.is_nested else mask).sum().double()
    stats = torch.cat([torch.stack([tokens, score[order].sum(), score.sum()]),
                       torch.tensor([k, n, k == n], dtype=torch.float64, device=score.device)])
    torch.distributed.all_reduce(stats, group=group)
    values = torch.cat([stats, order.double()]).tolist()
    tokens, mass_s, mass, count_s, count, whole = values[:6]
    ranks = torch.distributed.get_world_size(group)
    if whole == ranks:
        return None
    if whole:
        raise RuntimeError(
            f"grad_reg.subset_fraction={fraction}: the subset is the whole mini-batch on {int(whole)} of {ranks} "
            "ranks only (mini-batches of different sizes); every rank must run both parts"
        )
    chosen = sorted(int(i) for i in values[6:])
    rest = sorted(set(range(n)) - set(chosen))
    share = mass_s / mass if by == "advantage" and mass > 0 else count_s / count
    return _Split(subset=tu.index_select_tensor_dict(data, chosen), rest=tu.index_select_tensor_dict(data, rest),
                  fraction=share, num_tokens=int(tokens), rows=chosen)


def _merge_outputs(first: Any, second: Any) -> Any:
    """The outputs of ``forward_backward_batch`` on the subset and on the rest, as one call over the whole
    mini-batch gives them (per-micro-batch losses and metrics in a list each; no model outputs)."""
    metrics: dict[str, Any] = {}
    append_to_dict(metrics, first["metrics"])  # verl's own merge (lists, and its Metric accumulators)
    append_to_dict(metrics, second["metrics"])
    return {"model_output": {}, "loss": first["loss"] + second["loss"], "metrics": metrics}


def _drop_pending_fsdp2_grads(module: torch.nn.Module) -> None:
    """Forget the unsharded gradients FSDP2 accumulates on micro-batches without gradient sync. After an exception
    in the middle of an accumulation window they would otherwise be reduced into the next step's gradient
    (``zero_grad`` only clears the sharded ``.grad``). Reaches FSDP2's ``FSDPParam`` (torch >= 2.6 internals)."""
    mine = {id(p) for p in module.parameters()}
    for key, (fsdp_param, _) in _fsdp2_params().items():
        if key not in mine:
            continue
        fsdp_param.unsharded_accumulated_grad = None
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None:
            unsharded.grad = None


class GradRegFSDPEngineWithLMHead(GradRegEngineMixin, FSDPEngineWithLMHead):
    """verl's ``FSDPEngineWithLMHead`` (actor, reference) with GR; identical to it when GR is off."""


class GradRegFSDPEngineWithValueHead(GradRegEngineMixin, FSDPEngineWithValueHead):
    """verl's ``FSDPEngineWithValueHead`` (critic) with GR; identical to it when GR is off."""


#: (device, vendor) pairs of verl's built-in platforms whose FSDP engines get a GR subclass on import.
DEFAULT_DEVICES: tuple[tuple[str, str], ...] = (("cuda", "nvidia"), ("cuda", "amd"), ("npu", "huawei"))

_registered: set[tuple[str, str]] = set()


def register_engines(devices: tuple[tuple[str, str], ...] = DEFAULT_DEVICES) -> None:
    """Register the GR engines in verl's ``EngineRegistry`` for ``devices`` ((device, vendor) pairs), backends
    "fsdp" and "fsdp2". verl looks the vendor-specific key up before the device-wide default, so its own engines
    stay registered (and selectable with ``VERL_ENGINE_VENDOR``). Each pair is registered once per process."""
    for device, vendor in devices:
        if (device, vendor) in _registered:
            continue
        for model_type, cls in (
            ("language_model", GradRegFSDPEngineWithLMHead),
            ("value_model", GradRegFSDPEngineWithValueHead),
        ):
            EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device=device, vendor=vendor)(cls)
        _registered.add((device, vendor))


def _skip_verls_trl_value_head_patch_where_trl_lacks_it() -> None:
    """verl 0.9's ``apply_monkey_patch`` (run by every FSDP engine) imports TRL's
    ``AutoModelForCausalLMWithValueHead`` whenever TRL is installed, to patch its ``state_dict``. TRL 1.x has no
    such class any more (neither top-level nor in ``trl.experimental.ppo``), so beside TRL 1.x every verl engine
    fails to build. The patch concerns only that class: where TRL lacks it, tell that function TRL is absent."""
    import verl.models.transformers.monkey_patch as patch

    if not patch.is_trl_available():
        return
    try:
        from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
    except ImportError:
        try:
            from trl import AutoModelForCausalLMWithValueHead  # noqa: F401
        except ImportError:
            patch.is_trl_available = lambda: False


_skip_verls_trl_value_head_patch_where_trl_lacks_it()
register_engines()
