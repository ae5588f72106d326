"""Shared helpers of the GradReg tests: small float64 models and the double-backprop reference."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from grkernels.kernels import triton_usable

BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("grkernels.kernels.gr_step") is None or not triton_usable("cpu"),
            reason="triton GR-step backend not available here",
        ),
    ),
]


def tanh_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> nn.Module:
    """A small MLP with tanh (non-zero third derivatives, so finite differences are tested for real)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def regression_batch(seed: int = 1, n: int = 32, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def make_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: list | None = None) -> Callable:
    def closure() -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    return closure


def exact_gr_gradient(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    coefs: Sequence[float],
    g1_clip: float | None = None,
) -> list[torch.Tensor]:
    """g1 + γ_p·H·v by double backprop, v = clip(g1) on parameters with γ_p != 0 (zero elsewhere)."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    gr = [g for g, c in zip(grads, coefs) if c != 0]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in gr]))
    scale = 1.0 if g1_clip is None else min(1.0, g1_clip / (float(norm) + 1e-6))
    v = [g.detach() * scale if c != 0 else torch.zeros_like(g) for g, c in zip(grads, coefs)]
    hv = torch.autograd.grad(grads, list(params), grad_outputs=v)
    return [g.detach() + c * h for g, h, c in zip(grads, hv, coefs)]


class GradCapture:
    """Records the gradients the base optimizer sees, through a step pre-hook on it."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.grads: list[list[torch.Tensor | None]] = []
        base.register_step_pre_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        self.grads.append(
            [None if p.grad is None else p.grad.detach().clone() for g in opt.param_groups for p in g["params"]]
        )


def rel_err(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    num = sum(float((x - y).double().square().sum()) for x, y in zip(a, b))
    den = sum(float(y.double().square().sum()) for y in b)
    return (num / den) ** 0.5


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bitwise_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)) for x, y in zip(a, b))
