"""pytest-benchmark set-up for bench/: CPU kernels run under Triton's interpreter when there is no GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
