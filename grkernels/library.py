"""``grkernels.info()`` and ``python -m grkernels info``: which implementation each op runs here, and why.

The answer comes from the one dispatch rule, :func:`grkernels.kernels.auto_backend`. The loss ops themselves
are registered with ``torch.library`` in :mod:`grkernels.ops.custom_ops`.
"""

from __future__ import annotations

import argparse

import torch

from grkernels.kernels import auto_backend, cpp_status, interpreter_on, triton_installed


def info(device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """Which implementation each op uses with ``backend="auto"`` on ``device``, and why.

    ``device``: "cpu", "cuda", ... (default: CPU, plus CUDA when available). Returns
    ``{"<op> [<device>]": {"implementation": ..., "reason": ...}, "grkernels._C": {...}, "triton": {...}}``.
    ``python -m grkernels info`` prints the same.
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


def format_info(table: dict[str, dict[str, str]] | None = None) -> str:
    """:func:`info` as aligned text lines."""
    table = info() if table is None else table
    width = max(len(k) for k in table)
    return "\n".join(f"{k:<{width}}  {v['implementation']:<16} {v['reason']}" for k, v in table.items())


def info_main(argv: list[str]) -> int:
    """``python -m grkernels info [--device DEV]``: print :func:`info`."""
    parser = argparse.ArgumentParser(prog="grkernels info", description="which implementation each op uses")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu, plus cuda when available)")
    args = parser.parse_args(argv)
    try:
        table = info(args.device)
    except RuntimeError as err:  # e.g. an unknown device string
        parser.error(str(err))
    print(format_info(table))
    return 0


__all__ = ["format_info", "info", "info_main"]
