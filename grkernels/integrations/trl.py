"""Gradient regularization for TRL 1.x trainers (tested: TRL 1.16 with transformers 5.23).

One class swap::

    from grkernels.integrations.trl import GradRegGRPOConfig, GradRegGRPOTrainer

    args = GradRegGRPOConfig(output_dir="out", grad_reg_strength="auto", grad_reg_target_rel=3.0)  # the defaults
    trainer = GradRegGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds)
    trainer.train()

The gradient handed to the optimizer is ``g1 + (γ/ε)(g2 − g1)`` over the same prepared micro-batches
(see :mod:`grkernels.integrations.hf`). GRPO specifics handled here:

- **old log-probs pinned at θ.** On-policy GRPO without vLLM stores no ``old_per_token_logps`` and uses
  ``per_token_logps.detach()`` as "old". Replayed at θ' that would be ``log π_θ'.detach()``: a different loss.
  The log-probs of the first pass (at θ) are recorded and handed to the replay as ``old_per_token_logps``.
- **entropy mask pinned.** With ``top_entropy_quantile < 1`` the high-entropy token mask of the first pass
  is reused at θ', so both passes differentiate the same loss.
- the replay does not append to ``_metrics``, advance ``_step`` or update the adaptive entropy controller.

Other TRL 1.x trainers: ``GradRegRLOOTrainer`` (RLOO stores old log-probs itself), ``GradRegSFTTrainer``,
``GradRegDPOTrainer``, ``GradRegKTOTrainer``, ``GradRegRewardTrainer``, each with a matching ``...Config``;
any other trainer class: ``grad_reg_trainer(TrainerClass)`` (and ``grad_reg_config(ConfigClass)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from grkernels.integrations.common import MicroBatch
from grkernels.integrations.hf import (
    GradRegArguments,
    GradRegConfigMixin,
    GradRegTrainerMixin,
    grad_reg_config,
    grad_reg_trainer,
    register_trainer_mixin,
)
from grkernels.ops import logp_and_entropy, policy_loss_from_logp

__all__ = [
    "GradRegGRPOConfig",
    "GradRegGRPOMixin",
    "GradRegGRPOTrainer",
    "grad_reg_config",
    "grad_reg_trainer",
    "TESTED_TRL_VERSIONS",
]

#: TRL versions the integration is tested with (``pip install "grkernels[trl]"`` admits ``>=1.0,<2``).
TESTED_TRL_VERSIONS = ">=1.16,<1.17"
if not str(getattr(trl, "__version__", "1")).startswith("1."):
    raise ImportError(
        f"grkernels.integrations.trl supports TRL 1.x (tested {TESTED_TRL_VERSIONS}); found TRL {trl.__version__}. "
        'Install a supported one: pip install "grkernels[trl]".'
    )


@dataclass
class GradRegGRPOConfig(GradRegConfigMixin, GRPOConfig, GradRegArguments):
    """``trl.GRPOConfig`` plus the schema's ``grad_reg_*`` fields (:data:`~grkernels.integrations.hf.GradRegArguments`,
    CLI-parsable, validated when the config is built) and ``grad_reg_fused_loss`` (TRL only).

    With ``grad_reg_subset_fraction < 1``, ``grad_reg_subset_by="advantage"`` (the default) orders each accumulation
    window's sequences by |advantage| (largest first) before TRL splits them into micro-batches, so the replayed
    micro-batches hold the largest ones, and the estimate divides by their share of the window's Σ|advantage|;
    ``"random"`` keeps TRL's shuffled order and divides by the count share. Handed to a plain ``trl.GRPOTrainer``
    (not :class:`GradRegGRPOTrainer`) with GR on, it raises a TypeError instead of training without GR."""

    grad_reg_trainer_hint = "grkernels.integrations.trl.GradRegGRPOTrainer"  # named when given to trl.GRPOTrainer

    grad_reg_fused_loss: bool = field(
        default=False,
        metadata={"help": "Compute GRPO's loss with grkernels' log-prob/entropy kernel and policy loss "
                  "(grkernels.ops; Triton on CUDA) instead of TRL's. Supports loss types grpo, bnpo, dr_grpo, "
                  "dapo, luspo, token/sequence importance sampling, beta (k3 KL) and delta; refuses the rest."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.grad_reg_validate()  # raises on bad values, with the schema's messages


_FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


class GradRegGRPOMixin:
    """GRPO-specific pinning for the replay at θ' (put before :class:`GradRegTrainerMixin`), the sub-batch pass
    by |advantage|, and the optional fused loss (``grad_reg_fused_loss``)."""

    grad_reg_subset_rules = ("advantage", "random")

    _gr_logps_sink: list[torch.Tensor] | None = None
    _gr_entropy_mask_sink: list[torch.Tensor] | None = None
    _gr_fused = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gr_fused = bool(getattr(self.args, "grad_reg_fused_loss", False))
        if self._gr_fused:
            self._grad_reg_check_fused()

    # ------------------------------------------------------------------ sub-batch GR by |advantage|
    def _gr_orders_by_advantage(self) -> bool:
        cfg = self._grad_reg_settings()
        return cfg.subset_fraction < 1.0 and cfg.strength != 0.0 and cfg.subset_by == "advantage"

    @property
    def _buffered_inputs(self) -> list[dict] | None:
        return self.__dict__.get("_gr_buffered_inputs")

    @_buffered_inputs.setter
    def _buffered_inputs(self, batches: list[dict] | None) -> None:
        """TRL stores each generation batch here, shuffled and split into micro-batches; with sub-batch GR by
        |advantage| the sequences of each accumulation window are re-split in descending |advantage| first."""
        if batches is not None and self._gr_orders_by_advantage():
            batches = _order_windows_by_advantage(batches, self.args.gradient_accumulation_steps)
        self.__dict__["_gr_buffered_inputs"] = batches

    def _grad_reg_subset_share(self, window: list[MicroBatch], subset: int) -> float:
        if not self._gr_orders_by_advantage():
            return super()._grad_reg_subset_share(window, subset)
        mass = torch.stack([entry.inputs["advantages"].abs().sum() for entry in window]).tolist()  # one host read
        return sum(mass[:subset]) / sum(mass) if sum(mass) > 0 else subset / len(window)

    def _grad_reg_check_fused(self) -> None:
        a = self.args
        problems = []
        if self.loss_type not in _FUSED_LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} (supported: {', '.join(_FUSED_LOSS_TYPES)})")
        if self.top_entropy_quantile < 1.0:
            problems.append("top_entropy_quantile < 1")
        if self.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            problems.append("vLLM importance-sampling correction")
        if getattr(self, "aux_loss_enabled", False):
            problems.append("MoE router aux loss")
        if getattr(self, "_entropy_bonus_enabled", False):
            problems.append("entropy bonus")
        if self.beta != 0.0 and getattr(a, "use_bias_correction_kl", False):
            problems.append("use_bias_correction_kl")
        if problems:
            raise ValueError("grad_reg_fused_loss=True does not support: " + "; ".join(problems)
                             + ". Set grad_reg_fused_loss=False to use TRL's loss.")

    def _grad_reg_fused_loss(self, model, inputs):
        """TRL 1.16's GRPO loss (same scaling and metric names) from grkernels' ops."""
        if inputs.get("pixel_values") is not None:
            raise ValueError("grad_reg_fused_loss=True does not support multimodal inputs yet")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n = completion_ids.size(1)
        with self.accelerator.autocast():
            logits = model(
                input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                logits_to_keep=n + 1,
            ).logits[:, :-1]  # position t predicts completion token t
        logp, entropy = logp_and_entropy(logits, completion_ids, self.temperature, active=mask.bool(),
                                         entropy_grad=False)
        if self._gr_logps_sink is not None:
            self._gr_logps_sink.append(logp)
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if self.loss_type == "dapo":  # TRL: the generation batch's token count, rescaled to one window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * ga / self.args.steps_per_generation
        loss, stats = policy_loss_from_logp(
            logp, entropy, inputs["advantages"], mask,
            old_logp=inputs.get("old_per_token_logps"),
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta, clip_low=self.epsilon_low, clip_high=self.epsilon_high, kl_estimator="k3",
            loss_agg=self.loss_type, importance_sampling=self.importance_sampling_level, num_items=num_items,
            max_completion_length=self.max_completion_length, delta=self.args.delta,
        )  # fmt: skip
        if self.loss_type != "dapo":
            loss = loss / ga
        # TRL's metric names; per-process token means averaged over processes (TRL weights by token counts)
        gather = self.accelerator.gather
        m = self._metrics[mode]
        if self.beta != 0.0:
            m["kl"].append(gather(stats["kl"].reshape(1)).mean().item())
        m["entropy"].append(gather(stats["entropy"].reshape(1)).mean().item())
        m["clip_ratio/low_mean"].append(gather(stats["clip_low_fraction"].reshape(1)).mean().item())
        m["clip_ratio/high_mean"].append(gather(stats["clip_high_fraction"].reshape(1)).mean().item())
        m["clip_ratio/region_mean"].append(gather(stats["clip_fraction"].reshape(1)).mean().item())
        return loss

    def _grad_reg_loss(self, model, inputs):
        if self._gr_fused:
            return self._grad_reg_fused_loss(model, inputs)
        return super()._compute_loss(model, inputs)

    def _gr_current_entry(self, inputs: Any) -> MicroBatch | None:
        items = self._gr_window.items
        if self._gr_capturing and items and items[-1].inputs is inputs:
            return items[-1]
        return None

    def _compute_loss(self, model, inputs):
        replay = self._gr_replay
        if replay is not None:
            return self._grad_reg_loss(model, inputs)
        entry = self._gr_current_entry(inputs)
        if entry is None:
            return self._grad_reg_loss(model, inputs)
        pin_logps = inputs.get("old_per_token_logps") is None
        self._gr_logps_sink = [] if pin_logps else None
        self._gr_entropy_mask_sink = []
        try:
            loss = self._grad_reg_loss(model, inputs)
            logps_sink, mask_sink = self._gr_logps_sink, self._gr_entropy_mask_sink
        finally:
            self._gr_logps_sink = None
            self._gr_entropy_mask_sink = None
        if pin_logps:
            if len(logps_sink) != 1:
                raise RuntimeError(
                    "GradRegGRPOTrainer: expected one _get_per_token_logps_and_entropies call in _compute_loss "
                    f"(got {len(logps_sink)}); cannot pin the old log-probs at theta for the replay"
                )
            # what TRL used as "old" at theta: per_token_logps.detach()
            entry.pinned["old_per_token_logps"] = logps_sink[0].detach()
        if mask_sink:
            entry.aux["entropy_mask"] = mask_sink[-1]
        return loss

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._gr_logps_sink is not None:
            self._gr_logps_sink.append(out[0])
        return out

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        replay = self._gr_replay
        if replay is not None and "entropy_mask" in replay.aux:
            return replay.aux["entropy_mask"]
        out = super().get_high_entropy_mask(entropies, mask, threshold)
        if self._gr_entropy_mask_sink is not None:
            self._gr_entropy_mask_sink.append(out.detach())
        return out


def _order_windows_by_advantage(batches: list[dict], window: int) -> list[dict]:
    """Within each run of ``window`` consecutive micro-batches (one accumulation window), the same sequences
    re-split into micro-batches of the same sizes in descending |advantage| (stable). Per-sequence entries
    (tensors with a batch dimension, lists) move together; 0-d tensors and None stay."""
    if len(batches) % window:
        raise ValueError(f"grad_reg_subset_by='advantage': TRL's steps_per_generation ({len(batches)}) must be a "
                         f"multiple of gradient_accumulation_steps ({window}), so that windows do not straddle "
                         "generation batches; or use grad_reg_subset_by='random'")
    out = []
    for w in range(0, len(batches), window):
        group = batches[w:w + window]
        if any(k.startswith(("pixel_", "image_")) for b in group for k in b):
            raise NotImplementedError("grad_reg_subset_by='advantage' does not reorder image inputs (pixel_values "
                                      "are packed across sequences); use grad_reg_subset_by='random'")
        order = torch.cat([b["advantages"] for b in group]).abs().argsort(descending=True, stable=True)
        out += split_tensor_dict({key: _in_order([b[key] for b in group], order) for key in group[0]}, len(group))
    return out


def _in_order(parts: list, order: torch.Tensor) -> Any:
    """One key's values over a window's micro-batches as one batch in ``order``: per-sequence tensors and lists
    concatenated and permuted; 0-d tensors and None as they are (TRL's split copies them to every micro-batch)."""
    first = parts[0]
    if first is None or (isinstance(first, torch.Tensor) and first.ndim == 0):
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)[order]
    flat = [x for part in parts for x in part]
    return [flat[i] for i in order.tolist()]


register_trainer_mixin(GRPOTrainer, GradRegGRPOMixin)  # grad_reg_trainer(any GRPOTrainer subclass) pins too


class GradRegGRPOTrainer(GradRegGRPOMixin, GradRegTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with gradient regularization (settings from :class:`GradRegGRPOConfig`).

    ``grad_reg={...}`` in the constructor overrides the config's ``grad_reg_*`` fields (keys with or without
    the ``grad_reg_`` prefix). The GR optimizer is ``trainer.grad_reg``; diagnostics are logged as
    ``grad_reg/g1_norm``, ``grad_reg/gr_rel`` (= ‖GR − g1‖/‖g1‖, the regime indicator), etc.
    """


def _ready(trainer_name: str, config_name: str) -> tuple[type | None, type | None]:
    tcls, ccls = getattr(trl, trainer_name, None), getattr(trl, config_name, None)
    return (grad_reg_trainer(tcls) if tcls is not None else None,
            grad_reg_config(ccls) if ccls is not None else None)


GradRegRLOOTrainer, GradRegRLOOConfig = _ready("RLOOTrainer", "RLOOConfig")
GradRegSFTTrainer, GradRegSFTConfig = _ready("SFTTrainer", "SFTConfig")
GradRegDPOTrainer, GradRegDPOConfig = _ready("DPOTrainer", "DPOConfig")
GradRegKTOTrainer, GradRegKTOConfig = _ready("KTOTrainer", "KTOConfig")
GradRegRewardTrainer, GradRegRewardConfig = _ready("RewardTrainer", "RewardConfig")

__all__ += [
    "GradRegRLOOTrainer", "GradRegRLOOConfig", "GradRegSFTTrainer", "GradRegSFTConfig",
    "GradRegDPOTrainer", "GradRegDPOConfig", "GradRegKTOTrainer", "GradRegKTOConfig",
    "GradRegRewardTrainer", "GradRegRewardConfig",
]
