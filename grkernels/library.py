"""``grkernels.info()``: which implementation each op runs here, and why (``grkernels info`` prints it, with
the package versions, through :mod:`grkernels.about`).

The answer comes from the one dispatch rule, :func:`grkernels.kernels.auto_backend`. The loss ops themselves
are registered with ``torch.library`` in :mod:`grkernels.ops.custom_ops`.
"""

from __future__ import annotations

import torch

from grkernels.kernels import auto_backend, cpp_status, interpreter_on, triton_installed


def info(device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """Which implementation each op uses with ``backend="auto"`` on ``device``, and why.

    ``device``: "cpu", "cuda", ... (default: CPU, plus CUDA when available). Returns
    ``{"<op> [<device>]": {"implementation": ..., "reason": ...}, "grkernels._C": {...}, "triton": {...}}``.
    ``grkernels info`` prints the same table.
    """
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    out: dict[str, dict[str, str]] = {
        "grkernels._C": {"implementation": "C++ CPU kernels", "reason": cpp_status()},
        "triton": {
            "implementation": "Triton kernels",
            "reason": ("installed" if triton_installed() else "not installed")
            + (" (TRITON_INTERPRET=1: backend='triton' runs on CPU tensors)" if interpreter_on() else ""),
        },
    }
    for dev in devices:
        loss_impl, loss_why = auto_backend(dev)
        for op in ("logp_and_entropy", "selective_log_softmax", "token_entropy", "policy_loss",
                   "fused_linear_policy_loss"):  # fmt: skip
            out[f"{op} [{dev.type}]"] = {"implementation": loss_impl, "reason": loss_why}
        out[f"kl_penalty [{dev.type}]"] = {"implementation": "torch", "reason": "elementwise: one torch expression"}
        out[f"GradReg step [{dev.type}]"] = {"implementation": loss_impl, "reason": loss_why}
    return out


__all__ = ["info"]
