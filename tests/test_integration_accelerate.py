"""GradRegWindow inside the real Accelerate (``accelerator.accumulate``): the gradient the base optimizer steps with
equals an independent float64 recomputation of GR over the whole window (each micro-batch's loss / accumulation
steps with its own dropout mask, g1 at θ, g2 at θ + ε·g1, GR = g1 + (γ/ε)(g2 − g1), then norm clipping)."""

from __future__ import annotations

import pytest
import torch
from gr_helpers import bitwise_equal, rel_err, tanh_mlp
from torch import nn
from torch.func import functional_call

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402

from grkernels import GradReg  # noqa: E402
from grkernels.integrations.accelerate import GradRegWindow  # noqa: E402

GAMMA, EPS, LR = 0.5, 1e-3, 0.05


def batches(n: int = 7, size: int = 5):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randn(size, 3, generator=g,
             dtype=torch.float64)) for _ in range(n)]


def run(accumulate: int, clip: float | None, n: int = 6, warmup_steps: int = 0):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = tanh_mlp(seed=0, dropout=0.3)
    seen: list[dict] = []
    base = torch.optim.SGD(model.parameters(), lr=LR)
    base.register_step_pre_hook(lambda o, a, k: seen.append({
        "grad": [p.grad.detach().clone() for p in model.parameters()],
        "theta": [p.detach().clone() for p in model.parameters()]}))
    gr = GradReg(base, strength=GAMMA, eps=EPS, g1_clip=None, g2_clip=None, warmup_steps=warmup_steps)
    data = batches(n)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    model, opt, loader = accelerator.prepare(model, gr, loader)
    calls: list[tuple[int, torch.Tensor]] = []  # (micro-batch index, RNG state) of every loss_fn call

    def loss_fn(m, batch):
        x, y = batch
        idx = next(i for i, (bx, _) in enumerate(data) if torch.equal(bx, x))
        calls.append((idx, torch.get_rng_state()))
        return nn.functional.mse_loss(m(x), y)

    window = GradRegWindow(accelerator, model, opt, max_grad_norm=clip)
    model.train()
    for batch in loader:
        window.step(batch, loss_fn)
    return accelerator.unwrap_model(model), gr, seen, data, calls


def expected(model, theta, window, rngs, accumulate, clip, gr_on=True):
    names = [n for n, _ in model.named_parameters()]

    def grad(params):
        total = 0.0
        for (x, y), rng in zip(window, rngs):
            torch.set_rng_state(rng)
            total = total + nn.functional.mse_loss(functional_call(model, params, (x,)), y) / accumulate
        return torch.autograd.grad(total, [params[n] for n in names])

    t1 = {n: t.clone().requires_grad_(True) for n, t in zip(names, theta)}
    g1 = grad(t1)
    out = list(g1)
    if gr_on:
        g2 = grad({n: (t + EPS * g).detach().requires_grad_(True) for (n, t), g in zip(zip(names, theta), g1)})
        out = [a + (GAMMA / EPS) * (b - a) for a, b in zip(g1, g2)]
    if clip is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in out]))
        out = [g * min(1.0, clip / (float(norm) + 1e-6)) for g in out]
    return out, list(g1)


@pytest.mark.parametrize("accumulate,clip,n", [(1, None, 3), (3, None, 6), (3, 0.05, 7)])
def test_window_gradient_matches_recomputation(accumulate, clip, n):
    model, gr, seen, data, calls = run(accumulate, clip, n)
    windows = [list(range(i, min(i + accumulate, n))) for i in range(0, n, accumulate)]  # the last may be short
    assert len(seen) == len(windows) and gr.metrics()["step"] == len(windows)  # one step per window
    first = {}
    for idx, rng in calls:
        if idx in first:  # the replay at θ' drew the RNG state of the micro-batch's first pass
            assert torch.equal(rng, first[idx])
        first.setdefault(idx, rng)
    assert len(calls) == 2 * n
    theta = [p.detach().clone() for p in tanh_mlp(seed=0, dropout=0.3).parameters()]
    for s, idxs in enumerate(windows):
        if s == 0:
            assert bitwise_equal(seen[0]["theta"], theta)
        exp, g1 = expected(model, seen[s]["theta"], [data[i] for i in idxs], [first[i] for i in idxs], accumulate,
                           clip)
        assert rel_err(seen[s]["grad"], exp) < 1e-6
        assert rel_err(g1, exp) > 0.01
        if s + 1 < len(windows):  # θ restored bitwise before SGD: the next θ is exactly one SGD step away
            nxt = [t - LR * g for t, g in zip(seen[s]["theta"], seen[s]["grad"])]
            for a, b in zip(seen[s + 1]["theta"], nxt):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    if clip is not None:
        assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in seen[0]["grad"]]))) < clip + 1e-6


def test_warmup_window_is_plain():
    model, gr, seen, data, calls = run(3, 0.05, 6, warmup_steps=1)
    assert len(calls) == 6 + 3  # no replay in the warmup window
    theta = [p.detach().clone() for p in tanh_mlp(seed=0, dropout=0.3).parameters()]
    exp, _ = expected(model, theta, data[:3], [c[1] for c in calls[:3]], 3, 0.05, gr_on=False)
    assert rel_err(seen[0]["grad"], exp) < 1e-6


def test_refuses_a_plain_optimizer():
    accelerator = Accelerator(cpu=True)
    model = tanh_mlp()
    with pytest.raises(TypeError, match="GradReg"):
        GradRegWindow(accelerator, model, torch.optim.SGD(model.parameters(), lr=LR))
    gr = GradReg(torch.optim.SGD(model.parameters(), lr=LR), strength=GAMMA, eps=EPS)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradRegWindow(accelerator, model, gr, max_grad_norm=0.0)
    with pytest.raises(TypeError, match="grad_reg= is for DeepSpeed"):
        GradRegWindow(accelerator, model, gr, grad_reg={"strength": 1.0, "eps": 1e-3})


def test_deepspeed_set_ups_gr_cannot_run_are_refused():
    """Under DeepSpeed (checked before the engine is touched): a GradReg prepared as the optimizer (ZeRO would step
    GradReg on its flat partitions), no GR settings, and max_grad_norm (Accelerate leaves clipping to DeepSpeed)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, scaler=None)
    model = tanh_mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    gr = GradReg(base, strength=GAMMA, eps=EPS)
    zero = SimpleNamespace(optimizer=gr)  # what ZeRO's optimizer holds: the client optimizer
    with pytest.raises(TypeError, match="prepare the plain optimizer"):
        GradRegWindow(accelerator, model, SimpleNamespace(optimizer=zero), grad_reg={"strength": 1.0, "eps": 1e-3})
    with pytest.raises(TypeError, match="needs the GR settings"):
        GradRegWindow(accelerator, model, SimpleNamespace(optimizer=SimpleNamespace(optimizer=base)))
    with pytest.raises(NotImplementedError, match="max_grad_norm"):
        GradRegWindow(accelerator, model, SimpleNamespace(optimizer=SimpleNamespace(optimizer=base)),
                      grad_reg={"strength": 1.0, "eps": 1e-3}, max_grad_norm=1.0)


def test_error_in_the_replay_restores_theta_and_the_next_window_works():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tanh_mlp(seed=0, dropout=0.3)
    gr = GradReg(torch.optim.SGD(model.parameters(), lr=LR), strength=GAMMA, eps=EPS)
    model, opt = accelerator.prepare(model, gr)
    theta = [p.detach().clone() for p in model.parameters()]
    window = GradRegWindow(accelerator, model, opt)
    data, n_calls = batches(4), []

    def loss_fn(m, batch):
        n_calls.append(1)
        if len(n_calls) == 3:  # the first replay
            raise RuntimeError("boom")
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    window.step(data[0], loss_fn)
    with pytest.raises(RuntimeError, match="boom"):
        window.step(data[1], loss_fn)
    assert bitwise_equal([p.detach() for p in model.parameters()], theta)
    assert all(p.grad is None for p in model.parameters())  # the failed window is void
    window.step(data[2], loss_fn)
    window.step(data[3], loss_fn)
    assert gr.metrics()["step"] == 1 and not bitwise_equal([p.detach() for p in model.parameters()], theta)


def test_step_closure_under_accelerate_accumulation_is_refused():
    """Accelerate calls the optimizer on the window's last micro-batch only: step(closure) would re-evaluate that
    micro-batch alone from zeroed gradients. Refused with a pointer to GradRegWindow; θ untouched."""
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), strength=0.5, eps=1e-3)
    model, opt = acc.prepare(model, opt)
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="GradRegWindow"):
        for _ in range(2):
            with acc.accumulate(model):
                opt.step(closure)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    # Without accumulation the closure path is fine through Accelerate.
    acc.gradient_state.plugin_kwargs["num_steps"] = 1
    opt.step(closure)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
