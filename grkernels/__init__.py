"""grkernels: gradient regularization (GR) for RLHF/RLVR, as a torch.optim wrapper with fused kernels.

    opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-5), exclude=paper_exclude(model))
    loss = opt.step(closure)      # closure: loss = ...; loss.backward(); return loss

At its defaults GR holds ‖GR − g1‖/‖g1‖ at 3 (strength="auto", target_rel=3) with a perturbation of norm 0.02
(eps_mode="radius", eps=0.02); the paper's fixed setting is strength=1e-2, eps=1e-3, eps_mode="absolute".
"""

from grkernels._version import __version__
from grkernels.head import head_gr_step, head_param_groups, head_perturbed_pass
from grkernels.library import info
from grkernels.ops import (
    fused_linear_policy_loss,
    kl_penalty,
    policy_loss,
    selective_log_softmax,
    token_entropy,
)
from grkernels.optim import GradReg
from grkernels.params import PAPER_EXCLUDE_NAMES, depth_param_groups, paper_exclude
from grkernels.rng import RNGState

__all__ = [
    "PAPER_EXCLUDE_NAMES",
    "GradReg",
    "RNGState",
    "__version__",
    "depth_param_groups",
    "fused_linear_policy_loss",
    "head_gr_step",
    "head_param_groups",
    "head_perturbed_pass",
    "info",
    "kl_penalty",
    "paper_exclude",
    "policy_loss",
    "selective_log_softmax",
    "token_entropy",
]
