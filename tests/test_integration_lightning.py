"""GradReg inside the real Lightning Trainer (``lightning`` 2.x) with ``GradRegCallback``.

The gradient the base optimizer steps with is captured by a step pre-hook and compared with an independent
float64 recomputation over the whole accumulation window: each micro-batch's loss / accumulate_grad_batches with
its own dropout mask (the RNG state Lightning had before its training_step), g1 at θ, g2 at θ + ε·g1 on the GR
parameters, GR = g1 + (γ/ε)(g2 − g1) (excluded parameters g1), then Lightning's norm clipping of the result.
"""

from __future__ import annotations

import pytest
import torch
from gr_helpers import bitwise_equal, rel_err, tanh_mlp
from torch import nn
from torch.func import functional_call

L = pytest.importorskip("lightning")

from grkernels import GradReg  # noqa: E402
from grkernels.integrations.lightning import GradRegCallback  # noqa: E402
from grkernels.rng import RNGState  # noqa: E402

GAMMA, EPS, LR = 0.5, 1e-3, 0.05
N_SAMPLES, MICRO = 5 * 6, 5  # 6 micro-batches of 5


def data(dtype: torch.dtype = torch.float64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, 5, generator=g, dtype=dtype)
    y = torch.randn(N_SAMPLES, 3, generator=g, dtype=dtype)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO, shuffle=False)


class Module(L.LightningModule):
    """A float64 tanh MLP with dropout; records the gradient and θ the base optimizer sees."""

    def __init__(self, manual: bool = False, warmup_steps: int = 0, dropout: float = 0.3,
                 dtype: torch.dtype = torch.float64, plain: bool = False):
        super().__init__()
        self.net = tanh_mlp(seed=0, dropout=dropout, dtype=dtype)
        self.automatic_optimization = not manual
        self.warmup_steps = warmup_steps
        self.plain = plain  # configure_optimizers returns the plain SGD (the callback wraps it with its settings)
        self.seen: list[dict] = []
        self.logged = 0

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def log(self, *args, **kwargs):
        if args and args[0] == "train_loss":
            self.logged += 1
        return super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = self.loss(batch)
            self.log("train_loss", loss)
            return loss
        opt = self.optimizers()  # manual two-phase through Lightning's LightningOptimizer
        rng = RNGState()
        loss = self.loss(batch)
        self.manual_backward(loss)
        for _ in range(opt.extra_passes):
            opt.perturb()
            rng.replay()
            self.manual_backward(self.loss(batch))
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=LR)
        base.register_step_pre_hook(lambda o, a, k: self.seen.append({
            "grad": [p.grad.detach().clone() for p in self.parameters()],
            "theta": [p.detach().clone() for p in self.parameters()],
        }))
        if self.plain:
            return base
        # absolute ε: expected() recomputes θ' = θ + ε·g1
        return GradReg(base, strength=GAMMA, eps=EPS, eps_mode="absolute", g1_clip=None, g2_clip=None,
                       exclude=[self.net[-1].bias], warmup_steps=self.warmup_steps)


class Recorder(L.Callback):
    """Each micro-batch Lightning trains on, the RNG state before its training_step, θ at its start."""

    def __init__(self):
        self.batches: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch, torch.get_rng_state(), [p.detach().clone() for p in pl_module.parameters()]))


def fit(accumulate: int, clip: float | None, manual: bool = False, warmup_steps: int = 0, steps: int = 2,
        precision: str = "64-true", callback: GradRegCallback | None = None, **module_kw):
    module, rec = Module(manual=manual, warmup_steps=warmup_steps, **module_kw), Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
        precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[rec, callback or GradRegCallback()],
    )
    trainer.fit(module, data(module_kw.get("dtype", torch.float64)))
    return trainer, module, rec


def expected(module: Module, window: list[tuple], accumulate: int, clip: float | None, gr_on: bool = True,
             eps: float = EPS, autocast: bool = False, excluded: set[str] | None = None):
    """GR over the window at θ (the window's first θ), then torch's norm clipping (max_norm / (‖g‖ + 1e-6)).
    ``autocast``: each forward under CPU bf16 autocast, as Lightning's "bf16-mixed" runs it."""
    names = [n for n, _ in module.net.named_parameters()]
    theta = dict(zip(names, window[0][2]))
    if excluded is None:  # as configured
        excluded = {n for n, p in module.net.named_parameters() if p is module.net[-1].bias}
    module.net.train()

    def grad(params):
        total = 0.0
        for batch, rng, _ in window:
            torch.set_rng_state(rng)
            x, y = batch
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(functional_call(module.net, params, (x,)), y)
            total = total + loss / accumulate
        ps = [params[n] for n in names]
        return dict(zip(names, torch.autograd.grad(total, ps)))

    t1 = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    g1 = grad(t1)
    if gr_on:
        t2 = {n: (t + (0 if n in excluded else eps) * g1[n]).detach().requires_grad_(True) for n, t in theta.items()}
        g2 = grad(t2)
        out = [g1[n] if n in excluded else g1[n] + (GAMMA / eps) * (g2[n] - g1[n]) for n in names]
    else:
        out = [g1[n] for n in names]
    if clip is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in out]))
        out = [g * min(1.0, clip / (float(norm) + 1e-6)) for g in out]
    return out, [g1[n] for n in names]


@pytest.mark.parametrize("accumulate,clip", [(1, None), (3, None), (3, 0.05)])
def test_gradient_over_the_window_matches_recomputation(accumulate, clip):
    steps = 2
    trainer, module, rec = fit(accumulate, clip, steps=steps)
    assert trainer.global_step == steps  # one optimizer step per window, not per pass
    assert len(module.seen) == steps and len(rec.batches) == steps * accumulate
    assert module.logged == steps * accumulate  # the replays' self.log calls were muted
    for s, seen in enumerate(module.seen):
        window = rec.batches[s * accumulate:(s + 1) * accumulate]
        assert bitwise_equal(seen["theta"], window[0][2])  # θ back bitwise when the base optimizer steps
        exp, g1 = expected(module, window, accumulate, clip)
        assert rel_err(seen["grad"], exp) < 1e-6
        assert rel_err(g1, exp) > 0.01  # GR changed the gradient: the comparison has teeth
    if clip is not None:  # clipping acted on the combined gradient
        assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in module.seen[0]["grad"]]))) < clip + 1e-6
    m = trainer.callback_metrics
    assert float(m["grad_reg/step"]) == steps and float(m["grad_reg/gr_rel"]) > 0


def test_bf16_mixed_with_gradient_clipping_matches_recomputation():
    """The documented recipe: precision="bf16-mixed" with gradient_clip_val and GradRegCallback (CPU autocast over
    fp32 weights). Lightning clips the combined GR gradient (LightningGradReg does not unscale, so the plugin allows
    the clip). The stepped gradient equals the same GR recomputed with each forward under bf16 autocast, to the
    reduction-order noise that the finite difference amplifies; the clip binds; GR changes the gradient. (With the
    core's former ``_step_supports_amp_scaling`` flag Lightning refused the clip: "does not allow for gradient
    clipping because it performs unscaling".)"""
    eps = 0.05  # the perturbation ε·g1 is many bf16 ulps of the weights, so it survives the autocast
    callback = GradRegCallback(strength=GAMMA, eps=eps, eps_mode="absolute", g1_clip=None, g2_clip=None,
                               exclude=["net.5.bias"])
    clip, steps = 0.05, 2
    trainer, module, rec = fit(3, clip, steps=steps, precision="bf16-mixed", callback=callback,
                               dtype=torch.float32, plain=True)
    assert trainer.global_step == steps and len(module.seen) == steps
    for s, seen in enumerate(module.seen):
        window = rec.batches[s * 3:(s + 1) * 3]
        assert bitwise_equal(seen["theta"], window[0][2])
        exp, g1 = expected(module, window, 3, clip, eps=eps, autocast=True)
        assert rel_err(seen["grad"], exp) < 1e-5  # measured: 0 and 8.6e-8
        assert rel_err(g1, exp) > 0.05
        unclipped, _ = expected(module, window, 3, None, eps=eps, autocast=True)
        assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in unclipped]))) > 2 * clip
        # and the bf16 forward's error against an fp32 computation is far below the GR correction
        fp32, _ = expected(module, window, 3, clip, eps=eps)
        assert rel_err(seen["grad"], fp32) < 0.2 * rel_err(g1, exp)


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_settings_on_the_callback_wrap_the_plain_optimizer(precision):
    """GradRegCallback(**settings) with a plain optimizer from configure_optimizers: the same GR gradient."""
    dtype = torch.float64 if precision == "64-true" else torch.float32
    callback = GradRegCallback(strength=GAMMA, eps=EPS, eps_mode="absolute", g1_clip=None, g2_clip=None,
                               exclude=["net.5.bias"])
    trainer, module, rec = fit(3, 0.05, precision=precision, callback=callback, dtype=dtype, plain=True)
    assert isinstance(callback.grad_reg, GradReg) and callback.grad_reg.eps == EPS
    for s, seen in enumerate(module.seen):
        exp, g1 = expected(module, rec.batches[s * 3:(s + 1) * 3], 3, 0.05)
        assert rel_err(seen["grad"], exp) < (1e-6 if dtype == torch.float64 else 2e-3)
        assert rel_err(g1, exp) > 0.01


def test_default_callback_runs_the_recommended_set():
    """``GradRegCallback()`` with nothing set, around a plain optimizer: the GradReg it builds runs strength "auto" at
    target 3 with a radius ε 0.02; γ starts at 1e-2 and moves after every optimizer step."""
    callback = GradRegCallback()
    per_step = StepMetrics()
    module = Module(plain=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=2, precision="64-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback, per_step])
    trainer.fit(module, data())
    s = callback.grad_reg.engine.settings
    assert (s.strength, s.target_rel, s.eps_mode, s.eps) == ("auto", 3.0, "radius", 0.02)
    gammas = [m["strength"] for m in per_step.steps]
    assert len(gammas) == 3 and gammas[0] == pytest.approx(1e-2) and len(set(gammas)) == 3
    assert callback.grad_reg.engine.controller.updates == 3


def test_callback_settings_are_validated_and_not_given_twice():
    with pytest.raises(ValueError, match="GR setting eps=-1"):
        GradRegCallback(eps=-1)
    with pytest.raises(TypeError, match="unknown GR setting 'gamma'"):
        GradRegCallback(gamma=1.0)
    with pytest.raises(ValueError, match="subset_fraction=0.5: not supported under Lightning"):
        GradRegCallback(subset_fraction=0.5)  # the callback replays whole windows: refused, not ignored
    with pytest.raises(TypeError, match="carries its own GR settings"):
        fit(1, None, callback=GradRegCallback(strength=1.0))  # configure_optimizers returns a GradReg


class StepMetrics(L.Callback):
    """GR's metrics after each optimizer step (what the log interval averages)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gr = trainer.strategy.optimizers[0].grad_reg
        if gr.metrics()["step"] > len(self.steps):
            self.steps.append(gr.metrics())


def test_adaptive_strength_and_the_logged_interval_mean():
    """strength="auto" on the callback reaches the engine (γ moves towards the target each step); with
    log_every_n_steps=2 the logger writes each value's mean over the two steps since its last write."""
    from lightning.pytorch.loggers import Logger

    class Capture(Logger):
        name, version, experiment = "capture", 0, None
        writes: list[dict] = []

        def log_metrics(self, metrics, step=None):
            Capture.writes.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    callback = GradRegCallback(strength="auto", target_rel=0.05, strength_init=3.0, eps=EPS, exclude=[])
    per_step = StepMetrics()
    module = Module(plain=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=1, precision="64-true",
                        logger=Capture(), log_every_n_steps=2, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, per_step])
    trainer.fit(module, data())
    assert callback.grad_reg.engine.controller is not None and callback.grad_reg.engine.controller.updates == 4
    gammas = [m["strength"] for m in per_step.steps]
    assert gammas[0] == pytest.approx(3.0) and len(set(gammas)) == 4
    for g, g_next, m in zip(gammas, gammas[1:], per_step.steps):
        assert (g_next > g) == (m["gr_rel"] < 0.05)
    writes = [w for w in Capture.writes if "grad_reg/gr_rel" in w]
    assert len(writes) == 2
    for k, w in enumerate(writes):
        pair = per_step.steps[2 * k: 2 * k + 2]
        for key in ("gr_rel", "g1_norm", "strength"):
            assert w[f"grad_reg/{key}"] == pytest.approx(sum(m[key] for m in pair) / 2, rel=1e-5), key
        assert w["grad_reg/step"] == 2 * k + 2


def test_exact_estimator_keeps_lightnings_graph():
    """estimator="exact": the callback makes Lightning's backward keep the graph, and the step gets g1 + γ·H·g1
    over the whole window (float64 double backprop with each micro-batch's dropout mask), no replay."""
    callback = GradRegCallback(strength=GAMMA, estimator="exact", g1_clip=None, g2_clip=None, exclude=[])
    trainer, module, rec = fit(3, None, callback=callback, plain=True)
    assert module.logged == 2 * 3  # no replayed training_step
    names = [n for n, _ in module.net.named_parameters()]
    for s, seen in enumerate(module.seen):
        window = rec.batches[s * 3:(s + 1) * 3]
        theta = {n: t.clone().requires_grad_(True) for n, t in zip(names, window[0][2])}
        total = 0.0
        for (x, y), rng, _ in window:
            torch.set_rng_state(rng)
            total = total + nn.functional.mse_loss(functional_call(module.net, theta, (x,)), y) / 3
        g1 = torch.autograd.grad(total, list(theta.values()), create_graph=True)
        hv = torch.autograd.grad(g1, list(theta.values()), grad_outputs=[g.detach() for g in g1])
        exp = [a.detach() + GAMMA * h for a, h in zip(g1, hv)]
        assert rel_err(seen["grad"], exp) < 1e-10 and rel_err([g.detach() for g in g1], exp) > 0.01


def test_warmup_step_is_plain_then_gr():
    trainer, module, rec = fit(3, 0.05, warmup_steps=1)
    assert trainer.global_step == 2
    exp0, _ = expected(module, rec.batches[:3], 3, 0.05, gr_on=False)
    assert rel_err(module.seen[0]["grad"], exp0) < 1e-6
    exp1, _ = expected(module, rec.batches[3:6], 3, 0.05)
    assert rel_err(module.seen[1]["grad"], exp1) < 1e-6


def test_manual_two_phase_through_lightning_optimizer(tmp_path):
    """self.optimizers().perturb() / .step() reach the real GradReg: the step is right and θ not left perturbed."""
    trainer, module, rec = fit(1, None, manual=True, steps=3)
    assert trainer.global_step == 3 and len(module.seen) == 3
    for s, seen in enumerate(module.seen):
        window = rec.batches[s:s + 1]
        assert bitwise_equal(seen["theta"], window[0][2])
        exp, _ = expected(module, window, 1, None)
        assert rel_err(seen["grad"], exp) < 1e-6
    final = [t - LR * g for t, g in zip(module.seen[-1]["theta"], module.seen[-1]["grad"])]
    for p, f in zip(module.parameters(), final):  # SGD from θ: nothing left at θ' (ε·g1 ≫ the tolerance)
        torch.testing.assert_close(p.detach(), f, rtol=1e-13, atol=1e-15)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["optimizer_states"][0]["grad_reg"]["step"] == 3


def test_refuses_what_it_cannot_do_right():
    class Two(Module):
        def configure_optimizers(self):
            return [super().configure_optimizers(), torch.optim.SGD(self.parameters(), lr=LR)]

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[GradRegCallback()])
    module = Two(manual=True)
    with pytest.raises(TypeError, match="exactly one optimizer"):
        trainer.fit(module, data())


def test_error_in_the_replay_leaves_theta_and_the_optimizer_usable():
    class Failing(Module):
        calls = 0

        def training_step(self, batch, batch_idx):
            Failing.calls += 1
            if Failing.calls == 4:  # window of 3: the first replay
                raise RuntimeError("boom at theta'")
            return super().training_step(batch, batch_idx)

    module, rec = Failing(), Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=3, precision="64-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rec, GradRegCallback()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, data())
    assert bitwise_equal([p.detach() for p in module.parameters()], rec.batches[0][2])  # θ, not θ'
    assert "training_step" not in module.__dict__  # the callback took its capture off again
    trainer2, module2, rec2 = fit(3, None)  # a new run in the same process is unaffected
    assert trainer2.global_step == 2


def test_checkpoint_resume_keeps_the_gr_state(tmp_path):
    """GR's state (step counter: warmup, schedule) and the base optimizer's travel in Lightning's checkpoint through
    LightningGradReg: resumed after 6 of 7 warmup steps, the 7th step is plain and the 8th is a GR step. (Lightning
    itself does not continue the data order here, so the run is not compared with an uninterrupted one.)"""
    def trainer(steps):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradRegCallback()])

    first = Module(warmup_steps=7, dropout=0.0)
    t = trainer(6)
    t.fit(first, data())
    t.save_checkpoint(tmp_path / "six.ckpt")
    resumed = Module(warmup_steps=7, dropout=0.0)
    t2 = trainer(8)
    t2.fit(resumed, data(), ckpt_path=tmp_path / "six.ckpt")
    gr = t2.strategy.optimizers[0].grad_reg
    assert t2.global_step == 8 and len(resumed.seen) == 2 and gr.metrics()["step"] == 8
    assert float(t2.callback_metrics["grad_reg/gr_rel"]) > 0  # step 8 was GR: the counter came back as 6
    # step 7 was plain (warmup): exactly g1 at θ_6 on Lightning's first batch of the resumed epoch
    names = [n for n, _ in resumed.net.named_parameters()]
    theta = {n: t.clone().requires_grad_(True) for n, t in zip(names, resumed.seen[0]["theta"])}
    x, y = next(iter(data()))
    g1 = torch.autograd.grad(nn.functional.mse_loss(functional_call(resumed.net, theta, (x,)), y), list(theta.values()))
    assert rel_err(resumed.seen[0]["grad"], list(g1)) < 1e-12


# ---------------------------------------------------------------- without the callback: refused where it is wrong
def naive_trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="64-true", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("manual,accumulate,match", [(False, 3, "accumulate_grad_batches=3"),
                                                     (True, 1, "manual optimization")])
def test_gradreg_without_the_callback_is_refused(manual, accumulate, match):
    """grkernels' entry point adds a guard to every Trainer: a plain GradReg where Lightning would silently give
    GR of the last micro-batch (or leave θ perturbed) is refused before any step, pointing to GradRegCallback."""
    module = Module(manual=manual)
    theta = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match=match) as err:
        naive_trainer(accumulate_grad_batches=accumulate).fit(module, data())
    assert "GradRegCallback" in str(err.value)
    assert bitwise_equal([p.detach() for p in module.parameters()], theta) and not module.seen


def test_gradreg_without_the_callback_warns_about_clipping_and_runs_plain_closure():
    module = Module()
    with pytest.warns(UserWarning, match="g1 and g2 separately"):
        naive_trainer(gradient_clip_val=1.0).fit(module, data())
    assert len(module.seen) == 2
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = naive_trainer()  # the one case Lightning's closure contract gets right: no alarm
        trainer.fit(Module(), data())
    assert trainer.global_step == 2 and not [w for w in caught if "GradReg" in str(w.message)]
