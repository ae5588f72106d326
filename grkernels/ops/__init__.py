"""Loss-head ops for RL fine-tuning: chosen-token log-probs, entropy, KL estimators and the GRPO-family
policy loss (also fused with the LM head), each with ``backend="auto" | "torch" | "triton"``.

The torch code in :mod:`grkernels.ops.losses` is the specification; the Triton kernels live in
``grkernels/kernels/{logprob,policy_loss,fused_linear}.py``.
"""

from grkernels.ops.losses import (
    LOSS_AGGREGATIONS,
    fused_linear_policy_loss,
    kl_penalty,
    logp_and_entropy,
    policy_loss,
    policy_loss_from_logp,
    selective_log_softmax,
    token_entropy,
)

__all__ = [
    "LOSS_AGGREGATIONS",
    "fused_linear_policy_loss",
    "kl_penalty",
    "logp_and_entropy",
    "policy_loss",
    "policy_loss_from_logp",
    "selective_log_softmax",
    "token_entropy",
]
