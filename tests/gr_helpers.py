"""Shared helpers of the GradReg tests: small float64 models and the double-backprop reference."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from grkernels.backends.base import StepPlan
from grkernels.kernels import cpp_loaded, triton_usable

BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_loaded(), reason="grkernels._C is not built")),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("triton") is None or not triton_usable("cpu"),
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


# ---------------------------------------------------------------- GR-step backends against the torch reference
def make_params(spec, device, seed=0, scale=1.0):
    """Parameters (with .grad) from [(dtype, numel)], random values; grads of the same dtype."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for dt, n in spec:
        p = (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(dt).to(device).requires_grad_()
        p.grad = (scale * torch.randn(n, generator=g, dtype=torch.float64)).to(dt).to(device)
        out.append(p)
    return out


def clone_params(ps):
    out = []
    for p in ps:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        out.append(q)
    return out


def mixed_spec(with_fp64: bool, many: int = 0, seed: int = 0, big: int = 2**16 + 3):
    spec = [(torch.float32, 7), (torch.bfloat16, 1), (torch.bfloat16, big), (torch.float16, 7),
            (torch.float32, 1), (torch.float16, big), (torch.float32, big), (torch.bfloat16, 0)]
    if with_fp64:
        spec += [(torch.float64, 7), (torch.float64, 1025)]
    gen = torch.Generator().manual_seed(seed)
    dts = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if with_fp64 else [])
    for _ in range(many):
        spec.append((dts[int(torch.randint(len(dts), (1,), generator=gen))], int(torch.randint(1, 40, (1,),
                                                                                          generator=gen))))
    return spec


def run_backend_step(impl, ps, keep, estimator, g1_clip, g2_clip, rounding="nearest", seed=7, eps=1e-2, g2s=None):
    """perturb (1 or 2 points), add synthetic second gradients, restore_and_combine; returns θ' snapshots."""
    plan = StepPlan(params=ps, coefs=[0.3 + 0.1 * (i % 3) for i in range(len(ps))], keep=keep, eps=eps,
                    g1_clip=g1_clip, g2_clip=g2_clip, estimator=estimator, rounding=rounding, seed=seed)
    points = 2 if estimator == "central" else 1
    perturbed = []
    for point in range(points):
        impl.perturb(plan, point)
        perturbed.append([p.detach().clone() for p in ps])
        for p, g in zip(ps, g2s[point]):
            p.grad.add_(g)
        for p in keep:  # the second backward also accumulates into keep parameters' grads
            p.grad.add_(1.0)
    impl.restore_and_combine(plan)
    return perturbed


def assert_bitwise_like_torch(impl, device, estimator: str, with_fp64: bool, many: int = 200,
                              big: int = 2**16 + 3) -> None:
    """A fast backend ``impl`` equals ``TorchGRStep`` bitwise where the arithmetic is the same (round-to-nearest,
    clip factors exactly 1): θ' at every point, restore, the combined gradient, keep parameters' g1."""
    from grkernels.backends.reference import TorchGRStep

    a = make_params(mixed_spec(with_fp64, many=many, seed=1, big=big), device, seed=2)
    b = clone_params(a)
    theta0 = [p.detach().clone() for p in a]
    g1 = [p.grad.clone() for p in a]
    keep_a, keep_b = a[1::5], b[1::5]  # an excluded subset: they must end with g1, bitwise
    ps_a = [p for i, p in enumerate(a) if i % 5 != 1]
    ps_b = [p for i, p in enumerate(b) if i % 5 != 1]
    g2s = [[torch.randn(p.shape, dtype=torch.float64).to(p.dtype).to(device) for p in ps_a] for _ in range(2)]
    clip = None if with_fp64 else 1e6  # off, or on but inactive: the factor is then exactly 1
    ta = TorchGRStep()
    pert_a = run_backend_step(ta, ps_a, keep_a, estimator, clip, clip, g2s=g2s)
    pert_b = run_backend_step(impl, ps_b, keep_b, estimator, clip, clip, g2s=g2s)
    for pa, pb in zip(pert_a, pert_b):
        for x, y in zip(pa, pb):
            assert torch.equal(x, y), (x.dtype, x.numel())
    for p, q, t0 in zip(a, b, theta0):
        assert torch.equal(q.detach(), t0)  # restore is bitwise
        assert torch.equal(p.grad, q.grad), (p.dtype, p.numel())
    for p, i in zip(keep_b, range(1, len(b), 5)):
        assert torch.equal(p.grad, g1[i])
    for k in ("g1_norm", "g2_norm", "gr_rel", "perturb_ratio"):
        torch.testing.assert_close(impl.metrics[k], ta.metrics[k], rtol=1e-5, atol=0)
    assert bool(impl.metrics["finite"])


FUZZ_DTYPES = ["float32", "bfloat16", "float16", "float64"]


def assert_fuzz_case_bitwise(impl, device, sizes, dts, estimator: str, seed: int) -> None:
    """One hypothesis case: tensors of ``sizes`` and ``dts`` (names), no clipping: ``impl`` equals the torch
    reference bitwise (θ after the step and the combined gradient)."""
    from grkernels.backends.reference import TorchGRStep

    spec = [(getattr(torch, d), n) for n, d in zip(sizes, dts)]
    a = make_params(spec, device, seed=seed % 1000)
    b = clone_params(a)
    g2s = [[torch.randn(p.shape, dtype=torch.float64).to(p.dtype).to(device) for p in a] for _ in range(2)]
    run_backend_step(TorchGRStep(), a, [], estimator, None, None, g2s=g2s, seed=seed)
    run_backend_step(impl, b, [], estimator, None, None, g2s=g2s, seed=seed)
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach()) and torch.equal(p.grad, q.grad)
