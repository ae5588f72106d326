"""verl's FSDP engines on CPU processes (gloo), for tests and for trying GR in verl without an accelerator.

verl 0.9 registers platforms for CUDA, ROCm and Ascend NPU only, and its FSDP engines for the devices "cuda" and
"npu". :func:`use_cpu_platform` adds the missing pieces through verl's own registries, without editing verl:

- a :class:`~verl.plugin.platform.PlatformBase` named "cpu" (device "cpu", collectives over gloo, no-op memory and
  profiling hooks), made verl's current platform with ``set_platform``;
- verl's ``FSDPEngineWithLMHead`` / ``FSDPEngineWithValueHead`` for the device "cpu" (backends "fsdp", "fsdp2"),
  and grkernels' GR engines for the device "cpu" with vendor "cpu" (the vendor-specific key wins the lookup, as on
  GPUs; ``VERL_ENGINE_VENDOR=none`` picks verl's own engine).

Only the training engine is covered: no rollout engine (vLLM/SGLang need an accelerator) and no Ray. Use
``attn_implementation="sdpa"`` (``model.override_config``), ``use_remove_padding=False`` and
``use_torch_compile=False``, and create the gloo process group before building an engine.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, set_platform

__all__ = ["PlatformCPU", "use_cpu_platform"]


def _zero(*args: object, **kwargs: object) -> int:
    return 0


def _nothing(*args: object, **kwargs: object) -> None:
    return None


# What verl calls on ``get_torch_device()``: memory statistics (reported as 0 here), RNG state for checkpoints,
# synchronisation.
_DEVICE_MODULE = types.ModuleType("grkernels_verl_cpu_device")
_DEVICE_MODULE.__dict__.update(
    synchronize=_nothing, empty_cache=_nothing, ipc_collect=_nothing, reset_peak_memory_stats=_nothing,
    max_memory_allocated=_zero, max_memory_reserved=_zero, memory_allocated=_zero, memory_reserved=_zero,
    mem_get_info=lambda *a, **k: (0, 0), device_count=lambda: 1, is_available=lambda: True,
    current_device=lambda: "cpu", set_device=_nothing, get_rng_state=torch.get_rng_state,
    set_rng_state=torch.set_rng_state, manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed,
    get_device_name=lambda *a, **k: "CPU",
)


class PlatformCPU(PlatformBase):
    """verl platform for CPU processes: device "cpu", vendor "cpu", gloo collectives."""

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: _DEVICE_MODULE)

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False  # never auto-detected: chosen explicitly by use_cpu_platform()

    def current_device(self) -> str:  # type: ignore[override]  # verl passes it to .to(): "cpu" works there
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None


_installed = False


def use_cpu_platform() -> None:
    """Make verl run its FSDP engines (and grkernels' GR engines) on CPU in this process. Idempotent; call it
    before anything imports verl's engine modules (they read the platform on import)."""
    global _installed
    if _installed:
        return
    # first: verl's engine modules read the platform when they are imported
    PlatformRegistry.register(platform="cpu")(PlatformCPU)
    set_platform(PlatformCPU())
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    # not at module level: grkernels.integrations.verl imports verl's engine modules, which must see the CPU
    # platform set above (an order of imports, not a cycle: verl.py does not import this module)
    from grkernels.integrations import verl as gr_verl

    for model_type, cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(cls)
    gr_verl.register_engines(devices=(("cpu", "cpu"),))
    _installed = True
