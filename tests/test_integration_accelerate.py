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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: a Trainer run earlier in the process (another test
    file under ``-p no:xdist`` or the same xdist worker) leaves GradientState set for its dataloader, and a window
    built here without a prepared dataloader would then read that run's sync_gradients. Reset before each test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def batches(n: int = 7, size: int = 5):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randn(size, 3, generator=g,
             dtype=torch.float64)) for _ in range(n)]


def run(accumulate: int, clip: float | None, n: int = 6, warmup_steps: int = 0, via_settings: bool = False,
        **settings):
    """``via_settings``: prepare the plain SGD and give GradRegWindow the settings (grad_reg=...); else prepare a
    GradReg built by hand. Returns the model, the GradReg, what the base optimizer saw, the data, the loss calls."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = tanh_mlp(seed=0, dropout=0.3)
    seen: list[dict] = []
    base = torch.optim.SGD(model.parameters(), lr=LR)
    base.register_step_pre_hook(lambda o, a, k: seen.append({
        "grad": [p.grad.detach().clone() for p in model.parameters()],
        "theta": [p.detach().clone() for p in model.parameters()]}))
    # absolute ε: the recomputations perturb θ + ε·g1
    settings = {**dict(strength=GAMMA, eps=EPS, eps_mode="absolute", g1_clip=None, g2_clip=None,
                       warmup_steps=warmup_steps), **settings}
    data = batches(n)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    if via_settings:
        model, opt, loader = accelerator.prepare(model, base, loader)
    else:
        model, opt, loader = accelerator.prepare(model, GradReg(base, **settings), loader)
    calls: list[tuple[int, torch.Tensor]] = []  # (micro-batch index, RNG state) of every loss_fn call

    def loss_fn(m, batch):
        x, y = batch
        idx = next(i for i, (bx, _) in enumerate(data) if torch.equal(bx, x))
        calls.append((idx, torch.get_rng_state()))
        return nn.functional.mse_loss(m(x), y)

    window = GradRegWindow(accelerator, model, opt, max_grad_norm=clip,
                           grad_reg=dict(settings, exclude=[]) if via_settings else None)
    model.train()
    for batch in loader:
        window.step(batch, loss_fn)
        if accelerator.sync_gradients:
            calls.append(("metrics", window.metrics(), window.grad_reg.metrics()))
    return accelerator.unwrap_model(model), window.grad_reg, seen, data, calls


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


@pytest.mark.parametrize("accumulate,clip,n,via_settings", [(1, None, 3, False), (3, None, 6, False),
                                                         (3, 0.05, 7, False), (3, 0.05, 7, True)])
def test_window_gradient_matches_recomputation(accumulate, clip, n, via_settings):
    model, gr, seen, data, calls = run(accumulate, clip, n, via_settings=via_settings)
    logged = [c for c in calls if c[0] == "metrics"]
    calls = [c for c in calls if c[0] != "metrics"]
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
    # metrics() each step: that step's metrics, with the grad_reg/ prefix (one step per interval here)
    assert len(logged) == len(windows)
    for _, got, step in logged:
        assert got == {f"grad_reg/{k}": v for k, v in step.items()}


def test_exact_estimator_in_a_single_process_window():
    """estimator="exact": the window's backward keeps the graph; the step gets g1 + γ·H·g1 over the whole window
    (double backprop in float64, each micro-batch with its dropout mask), with no replay."""
    model, gr, seen, data, calls = run(3, None, 6, via_settings=True, estimator="exact")
    assert len(calls) == 6 + 2  # no pass at θ' (two metrics entries)
    first = {c[0]: c[1] for c in calls if c[0] != "metrics"}
    names = [n for n, _ in model.named_parameters()]
    for s, idxs in enumerate([[0, 1, 2], [3, 4, 5]]):
        theta = {n: t.clone().requires_grad_(True) for n, t in zip(names, seen[s]["theta"])}
        total = 0.0
        for i in idxs:
            torch.set_rng_state(first[i])
            x, y = data[i]
            total = total + nn.functional.mse_loss(functional_call(model, theta, (x,)), y) / 3
        g1 = torch.autograd.grad(total, list(theta.values()), create_graph=True)
        hv = torch.autograd.grad(g1, list(theta.values()), grad_outputs=[g.detach() for g in g1])
        exp = [a.detach() + GAMMA * h for a, h in zip(g1, hv)]
        assert rel_err(seen[s]["grad"], exp) < 1e-10
        assert rel_err([g.detach() for g in g1], exp) > 0.01


def test_adaptive_strength_through_the_window_settings():
    """grad_reg=dict(strength="auto", target_rel=..., strength_init=...): the controller runs in the GradReg the
    window builds, and the γ in use changes between steps (towards the target)."""
    model, gr, seen, data, calls = run(2, None, 8, via_settings=True, strength="auto", target_rel=0.05,
                                       strength_init=3.0)
    assert gr.engine.controller is not None and gr.engine.controller.updates == 4
    logged = [c[1] for c in calls if c[0] == "metrics"]
    gammas = [m["grad_reg/strength"] for m in logged]
    assert gammas[0] == pytest.approx(3.0) and len(set(gammas)) == 4
    for g, g_next, m in zip(gammas, gammas[1:], logged):
        assert (g_next > g) == (m["grad_reg/gr_rel"] < 0.05)


def test_warmup_window_is_plain():
    model, gr, seen, data, calls = run(3, 0.05, 6, warmup_steps=1)
    calls = [c for c in calls if c[0] != "metrics"]
    assert len(calls) == 6 + 3  # no replay in the warmup window
    theta = [p.detach().clone() for p in tanh_mlp(seed=0, dropout=0.3).parameters()]
    exp, _ = expected(model, theta, data[:3], [c[1] for c in calls[:3]], 3, 0.05, gr_on=False)
    assert rel_err(seen[0]["grad"], exp) < 1e-6


def test_refuses_what_it_cannot_run():
    accelerator = Accelerator(cpu=True)
    model = tanh_mlp()
    plain = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="must be a grkernels.GradReg.*grad_reg=dict"):
        GradRegWindow(accelerator, model, plain)
    gr = GradReg(torch.optim.SGD(model.parameters(), lr=LR), strength=GAMMA, eps=EPS)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradRegWindow(accelerator, model, gr, max_grad_norm=0.0)
    with pytest.raises(TypeError, match="carries the GR settings"):
        GradRegWindow(accelerator, model, gr, grad_reg={"strength": 1.0, "eps": 1e-3})
    _, opt = accelerator.prepare(model, plain)
    with pytest.raises(ValueError, match="GR setting every=0"):  # the schema's message, before anything runs
        GradRegWindow(accelerator, model, opt, grad_reg={"every": 0})
    with pytest.raises(TypeError, match="unknown GR setting 'gamma'"):
        GradRegWindow(accelerator, model, opt, grad_reg={"gamma": 1.0})
    with pytest.raises(ValueError, match="subset_fraction=0.5: not supported under Accelerate"):
        GradRegWindow(accelerator, model, opt, grad_reg={"subset_fraction": 0.5})  # whole windows only
    assert opt.optimizer is plain  # nothing was wrapped


def test_deepspeed_set_ups_gr_cannot_run_are_refused():
    """Under DeepSpeed (checked before the engine is touched): a GradReg prepared as the optimizer (ZeRO would step
    GradReg on its flat partitions), no GR settings, what DeepSpeed cannot run (the schema's HOST_LIMITS), and a
    max_grad_norm that differs from the engine's gradient_clipping (Accelerate leaves clipping to DeepSpeed)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    engine = SimpleNamespace(gradient_clipping=lambda: 1.0)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, scaler=None, num_processes=2,
                                  unwrap_model=lambda m: m, deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    model = tanh_mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    gr = GradReg(base, strength=GAMMA, eps=EPS)
    zero = SimpleNamespace(optimizer=gr)  # what ZeRO's optimizer holds: the client optimizer
    with pytest.raises(TypeError, match="prepare the plain optimizer"):
        GradRegWindow(accelerator, model, SimpleNamespace(optimizer=zero), grad_reg={"strength": 1.0, "eps": 1e-3})
    prepared = SimpleNamespace(optimizer=SimpleNamespace(optimizer=base))
    with pytest.raises(TypeError, match="grad_reg=dict"):
        GradRegWindow(accelerator, model, prepared)
    for bad, match in (({"estimator": "exact"}, "estimator='exact': not supported under deepspeed"),
                       ({"lean": True}, "lean=True: not supported under deepspeed")):
        with pytest.raises(ValueError, match=match):
            GradRegWindow(accelerator, model, prepared, grad_reg=bad)
    with pytest.raises(ValueError, match=r"max_grad_norm=0.5.*gradient_clipping \(1.0"):
        GradRegWindow(accelerator, model, prepared, grad_reg={"strength": 1.0}, max_grad_norm=0.5)


def test_exact_estimator_is_refused_under_ddp():
    """Several processes (DDP reduces gradients outside autograd): the exact estimator is refused up front."""
    from types import SimpleNamespace

    accelerator = SimpleNamespace(distributed_type="MULTI_CPU", scaler=None, num_processes=2,
                                  unwrap_model=lambda m: m)
    model = tanh_mlp()
    gr = GradReg(torch.optim.SGD(model.parameters(), lr=LR), strength=GAMMA, eps=EPS, estimator="exact")
    with pytest.raises(ValueError, match="estimator='exact': not supported under ddp"):
        GradRegWindow(accelerator, model, gr)


def test_default_window_settings_are_the_recommended_set():
    """``GradRegWindow(..., grad_reg={})`` (every setting at its default) around the prepared plain optimizer: the
    GradReg it builds runs strength "auto" at target 3 with a radius ε 0.02; γ starts at 1e-2 and moves each
    window."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tanh_mlp(seed=0)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    window = GradRegWindow(accelerator, model, opt, grad_reg={})
    s = window.grad_reg.engine.settings
    assert (s.strength, s.target_rel, s.eps_mode, s.eps) == ("auto", 3.0, "radius", 0.02)
    gammas = []
    for k, batch in enumerate(batches(6)):
        window.step(batch, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        if k % 2:
            gammas.append(window.grad_reg.metrics()["strength"])
    assert gammas[0] == pytest.approx(1e-2) and len(set(gammas)) == 3


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
