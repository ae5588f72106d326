"""What this installation of grkernels runs with: ``grkernels info`` and ``grkernels --version``.

:func:`package_versions` reads the installed distributions' metadata (no host package is imported, so the
listing is fast and cannot fail on a broken install of one of them); :func:`about` adds Python, the platform,
torch's CUDA build and the backend table of :func:`grkernels.info` (which implementation each op uses here).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
from typing import Any

import torch

from grkernels import info as backend_info
from grkernels._version import __version__

__all__ = ["HOST_PACKAGES", "about", "format_about", "info_main", "package_versions", "version_line"]

#: The packages grkernels runs beside: (name shown, import name, distribution names tried in order).
#: triton ships as ``pytorch-triton`` (nightlies) or ``pytorch-triton-rocm``; Lightning as ``lightning`` or the
#: older ``pytorch-lightning``.
HOST_PACKAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("torch", "torch", ("torch",)),
    ("triton", "triton", ("triton", "pytorch-triton", "pytorch-triton-rocm")),
    ("transformers", "transformers", ("transformers",)),
    ("trl", "trl", ("trl",)),
    ("accelerate", "accelerate", ("accelerate",)),
    ("lightning", "lightning", ("lightning", "pytorch-lightning")),
    ("deepspeed", "deepspeed", ("deepspeed",)),
    ("verl", "verl", ("verl",)),
    ("peft", "peft", ("peft",)),
    ("liger_kernel", "liger_kernel", ("liger-kernel", "liger-kernel-nightly")),
)


def _dist_version(dists: tuple[str, ...]) -> str | None:
    for name in dists:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """``{name: version or None}`` for each of :data:`HOST_PACKAGES` (``None``: not installed).

    A module importable without distribution metadata (e.g. a source checkout on ``sys.path``) is reported as
    ``"unknown (no metadata)"``; torch's own ``torch.__version__`` is used for torch (it carries the ``+cpu`` /
    ``+cu128`` build tag).
    """
    out: dict[str, str | None] = {}
    for name, module, dists in HOST_PACKAGES:
        if name == "torch":
            out[name] = torch.__version__
            continue
        version = _dist_version(dists)
        if version is None:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            version = "unknown (no metadata)" if found else None
        out[name] = version
    return out


def version_line() -> str:
    """``grkernels 0.2.0 (torch 2.13.0+cpu, python 3.11.9)``: what ``grkernels --version`` prints."""
    return f"grkernels {__version__} (torch {torch.__version__}, python {platform.python_version()})"


def about(device: str | None = None) -> dict[str, Any]:
    """Everything ``grkernels info`` prints, as a dict: ``grkernels``, ``python``, ``platform``, ``cuda``
    (torch's CUDA build and whether a device is usable), ``packages`` (:func:`package_versions`) and
    ``backends`` (:func:`grkernels.info` on ``device``; default CPU, plus CUDA when available)."""
    return {
        "grkernels": __version__,
        "location": os.path.dirname(os.path.abspath(__file__)),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cuda": {"torch_build": torch.version.cuda, "available": torch.cuda.is_available()},
        "packages": package_versions(),
        "backends": backend_info(device),
    }


def format_about(data: dict[str, Any]) -> str:
    """:func:`about` as aligned text lines."""
    cuda = data["cuda"]
    lines = [
        f"grkernels {data['grkernels']}  ({data['location']})",
        f"python {data['python']} on {data['platform']}; torch CUDA build: {cuda['torch_build'] or 'none'}, "
        f"CUDA device usable: {'yes' if cuda['available'] else 'no'}",
        "",
        "packages:",
    ]
    width = max(len(k) for k in data["packages"])
    lines += [f"  {k:<{width}}  {v or 'not installed'}" for k, v in data["packages"].items()]
    lines += ["", "backends (which implementation each op uses with backend='auto', and why):"]
    table = data["backends"]
    width = max(len(k) for k in table)
    lines += [f"  {k:<{width}}  {v['implementation']:<16} {v['reason']}" for k, v in table.items()]
    return "\n".join(lines)


def info_main(argv: list[str]) -> int:
    """``grkernels info [--device DEV] [--json]``: print :func:`about`."""
    parser = argparse.ArgumentParser(
        prog="grkernels info",
        description="versions of grkernels, torch, triton and each host package found; which implementation "
        "each op uses here",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu, plus cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        data = about(args.device)
    except RuntimeError as err:  # e.g. an unknown device string
        parser.error(str(err))
    print(json.dumps(data, indent=2) if args.json else format_about(data))
    return 0
