"""Capture and replay the global random generators, so that a second forward/backward at θ' draws the same
dropout masks (and any other randomness) as the first one at θ."""

from __future__ import annotations

import torch


class RNGState:
    """The CPU generator state and, when CUDA is initialised, every CUDA device's generator state."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay(self) -> None:
        """Set the generators back to the captured states."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
