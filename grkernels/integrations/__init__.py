"""Host integrations, each a thin module over :mod:`.common` (what they share, once: the settings from the schema,
the micro-batch record and RNG replay, the fp16 refusal, metric logging with one averaging rule, the gradient-sync
switch of a replay):

- :mod:`.hf`: any ``transformers.Trainer`` (``grad_reg_trainer``, ``grad_reg_config``); :mod:`.trl`: TRL 1.x
  (``GradRegGRPOTrainer``, ``GradRegGRPOConfig``, the GRPO pinning and the sub-batch pass by |advantage|);
- :mod:`.lightning`: ``GradRegCallback``; :mod:`.accelerate`: ``GradRegWindow``;
- :mod:`.verl`: verl's FSDP engines (``optim.grad_reg``); :mod:`.verl_cpu` runs them on CPU;
- :mod:`.deepspeed`: the ZeRO-1/2/3 parameter source the Trainer and Accelerate integrations drive;
- :mod:`.reference_reset`: reference resets (the KL baseline) for plain loops.

The submodules import their frameworks (transformers, TRL, lightning, accelerate, verl) on import; this package
imports none of them.
"""

from __future__ import annotations

__all__ = ["accelerate", "common", "deepspeed", "hf", "lightning", "reference_reset", "trl", "verl", "verl_cpu"]
