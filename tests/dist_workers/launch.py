"""Start a worker script on 2 CPU processes with torchrun (one thread each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(script: Path, out: Path, *args: str, env: dict[str, str] | None = None,
             timeout: int = 900) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 script out args``; ``env`` adds variables."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
