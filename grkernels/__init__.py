"""grkernels: gradient regularization (GR) for RLHF/RLVR, as a torch.optim wrapper with fused kernels.

    opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-5), strength=1e-2, eps=1e-3,
                  exclude=paper_exclude(model))
    loss = opt.step(closure)      # closure: loss = ...; loss.backward(); return loss
"""

from grkernels._version import __version__
from grkernels.optim import GradReg
from grkernels.params import PAPER_EXCLUDE_NAMES, paper_exclude

__all__ = ["GradReg", "PAPER_EXCLUDE_NAMES", "__version__", "paper_exclude"]
