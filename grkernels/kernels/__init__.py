"""Kernels of grkernels, and the one place that says which implementation runs and why.

Implementations of an op: ``"torch"`` (the plain-PyTorch specifications in ``grkernels/ops/spec.py`` and
``grkernels/backends/reference.py``), ``"cpp"`` (the C++ CPU kernels of the extension ``grkernels._C``, built from
``csrc/``) and ``"triton"`` (the Triton kernels in this package). :func:`select_backend` is the one rule for
the loss ops, :func:`resolve_backend` the same rule for the GR step (``GradReg``'s backends:
``backends.reference.TorchGRStep``, ``backends.cpp.CppGRStep``, ``backends.triton.TritonGRStep``).
Triton runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (that is how CI checks every kernel without a GPU). A kernel file holds the kernel and
its launcher (``cpp_losses.py`` and ``cpp_gr_step.py``: the launchers of the C++ kernels); nothing here imports
the layers above (the loss ops are registered with ``torch.library`` in :mod:`grkernels.ops.custom_ops`, the GR
step's backends live in :mod:`grkernels.backends`).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cpp")
KL_CODES = {"k1": 0, "k2": 1, "k3": 2}  # kernel argument of the KL estimators (Triton constexpr, C++ int)


# Import probes, cached in plain dicts rather than functools.cache: torch.compile traces the backend choice and
# warns about (and ignores) lru_cache wrappers, while a dict lookup traces as the constant it is.
_PROBES: dict[str, object] = {}


def triton_installed() -> bool:
    """Whether triton imports (probed once per process; ``grkernels.ops`` then imports the Triton kernels)."""
    if "triton" not in _PROBES:
        try:
            import triton  # noqa: F401
        except Exception:  # not installed, or a broken install: run without it rather than fail on import
            _PROBES["triton"] = False
        else:
            _PROBES["triton"] = True
    return bool(_PROBES["triton"])


def interpreter_on() -> bool:
    """True when Triton's interpreter is on (kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cpp_probe() -> str | None:
    if os.environ.get("GRKERNELS_NO_CPP", "0") not in ("", "0"):
        return "disabled by GRKERNELS_NO_CPP=1"
    try:
        import grkernels._C  # noqa: F401  (loading the library registers torch.ops.grkernels_cpp)
    except ImportError as err:
        return f"grkernels._C is not built ({err}); reinstall with `pip install --no-build-isolation -e .`"
    except Exception as err:  # a broken build (e.g. an ABI mismatch with this torch): say so, run on torch
        return f"grkernels._C failed to load: {type(err).__name__}: {err}"
    return None


def _cpp_import() -> str | None:
    """None when ``grkernels._C`` loads, else why not (one line); probed once per process."""
    if "cpp" not in _PROBES:
        _PROBES["cpp"] = _cpp_probe()
    return _PROBES["cpp"]  # type: ignore[return-value]


def cpp_loaded() -> bool:
    """Whether the C++ CPU kernels (``grkernels._C``) are loaded in this process."""
    return _cpp_import() is None


def cpp_status() -> str:
    """'loaded', or the reason the C++ kernels are not available."""
    return _cpp_import() or "loaded"


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if not triton_installed():
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and interpreter_on()


def check_triton_device(*tensors: torch.Tensor, what: str = "grkernels") -> None:
    """Raise a clear error when Triton cannot run on these tensors' device."""
    for t in tensors:
        if not triton_installed():
            raise RuntimeError(f"{what}: backend='triton' needs the triton package (pip install triton)")
        if not triton_usable(t.device):
            raise RuntimeError(
                f"{what}: backend='triton' got a tensor on {t.device}; Triton runs on CUDA tensors, "
                "or on CPU tensors only under TRITON_INTERPRET=1 (slow, for tests). "
                "Use backend='torch' or backend='auto' for CPU tensors."
            )


def auto_backend(device: torch.device | str) -> tuple[str, str]:
    """(implementation, reason) that ``backend="auto"`` picks for tensors on ``device`` (loss ops and GR step)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if triton_installed():
            return "triton", "CUDA tensors and triton is installed"
        return "torch", "CUDA tensors but triton is not installed"
    if dev.type == "cpu":
        if cpp_loaded():
            return "cpp", "CPU tensors and grkernels._C is loaded"
        return "torch", f"CPU tensors; C++ kernels unavailable: {cpp_status()}"
    return "torch", f"{dev.type} tensors"


def select_backend(backend: str, *tensors: torch.Tensor, what: str = "grkernels") -> str:
    """The one dispatch rule of the loss ops: "torch", "cpp" or "triton" for ``backend`` on these tensors.

    "auto": Triton for CUDA tensors when triton is installed, the C++ kernels for CPU tensors when
    ``grkernels._C`` is loaded, else torch. An explicit "triton" / "cpp" that cannot run raises a clear error.
    """
    return resolve_backend(backend, tensors[0].device, *tensors, what=what)


def resolve_backend(backend: str, device: torch.device | str, *tensors: torch.Tensor, what: str = "grkernels") -> str:
    """``backend`` ("auto", "torch", "cpp", "triton") resolved for ``device`` (and checked against ``tensors``):
    the rule of :func:`select_backend`, also the GR step's (``GradReg._make_backend``)."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return auto_backend(device)[0]
    if backend == "triton":
        check_triton_device(*tensors, what=what)
    elif backend == "cpp":
        if not cpp_loaded():
            raise RuntimeError(f"{what}: backend='cpp' needs the C++ kernels: {cpp_status()}")
        for t in (*tensors, torch.empty(0, device=device)):
            if t.device.type != "cpu":
                raise RuntimeError(f"{what}: backend='cpp' runs on CPU tensors, got a tensor on {t.device}")
    return backend
