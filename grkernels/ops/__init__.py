"""Loss-head ops for RL fine-tuning: chosen-token log-probs, entropy, KL estimators and the GRPO-family
policy loss (also fused with the LM head), each with ``backend="auto" | "torch" | "cpp" | "triton"``.

Modules: ``losses`` (the public functions and their validation), ``fused_linear`` (the chunked LM head),
``custom_ops`` (``torch.ops.grkernels.*``, registered with ``torch.library``), ``spec`` (the specification in
plain torch). The kernels live in ``grkernels/kernels/`` (Triton: ``logprob.py``, ``policy_loss.py``; the C++
kernels' launchers: ``cpp_losses.py``).
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
