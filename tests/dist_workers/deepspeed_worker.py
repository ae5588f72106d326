"""GR through ``grad_reg_trainer(Trainer)`` under DeepSpeed ZeRO-1/2/3 and under DDP, 2 CPU processes with gloo:
``torchrun --nproc_per_node 2 deepspeed_worker.py OUT``.

One process start runs every mode of ``MODES`` in turn (the Accelerate state is reset between them) and writes the
final fp32 parameters (DeepSpeed: the masters), the GR metrics of every step and the masters check to
``OUT/<mode>_rank<r>.pt``, then ``OUT/done_<mode>_rank<r>``. A mode is ``ddp`` or ``zero<stage>``, optionally
with ``_bf16`` (bf16 weights; ``_bf16acc``: with fp32 gradient accumulation) and ``_ga2``
(gradient_accumulation_steps=2, the same global batch per step); ``grpo_*`` modes run ``GradRegGRPOTrainer``; in
``*_raise`` modes the first replay raises; ``_reuse``: every=2 with the orthogonal reuse; ``_cpp``: the C++ backend;
``_auto``: strength="auto"; ``_nan``: a NaN written into one gradient element on rank 1 (DDP: on every rank, as an
all-reduce would spread it)
right after the combine of step 1. Every Trainer run clips with ``max_grad_norm=1.0`` (DeepSpeed: the config's
``"gradient_clipping": "auto"``), and the loss is scaled so that the clip binds. ``tests/test_deepspeed.py`` judges
the run by these files, not by the
exit code: DeepSpeed on CPU aborts at process teardown in about 1 of 20 runs, after the work.

The masters check: ``DeepSpeedGradReg.perturb`` / ``restore_and_combine`` are wrapped so that the fp32 master partitions
are snapshotted before the perturbation and compared bitwise right after it (θ' is in place) and after the
restore, on the Trainer's real path. The combine check: the whole gradients the engine steps with (DeepSpeed's
``safe_get_full_grad``) equal g1 + (γ/ε)(s2·g2 − s1·g1) recomputed from the whole g1 and g2 it held before the
perturbation and before the combine (relative error per step in ``combine_errors``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import torch
from torch import nn

# the DDP runs first: a Trainer with a DeepSpeed config leaves process-wide state behind (ACCELERATE_USE_DEEPSPEED)
MODES = ("ddp", "ddp_ga2", "ddp_reuse", "ddp_cpp", "ddp_nan", "ddp_auto", "grpo_ddp", "grpo_ddp_ga2",
         # a plain Accelerate loop with GradRegWindow (acc_*)
         "acc_ddp", "acc_ddp_ga2", "acc_ddp_central", "acc_ddp_radius", "acc_ddp_raise",
         "zero1", "zero2", "zero3", "zero1_ga2", "zero2_ga2", "zero3_ga2",
         "zero2_reuse", "zero3_reuse", "zero1_cpp", "zero2_cpp", "zero3_cpp", "zero2_nan", "zero3_nan", "zero2_auto",
         "zero2_bf16", "zero3_bf16", "zero2_bf16acc", "zero3_bf16acc", "zero2_defaults",
         "grpo_zero1", "grpo_zero2", "grpo_zero3", "grpo_zero1_ga2", "grpo_zero2_ga2", "grpo_zero3_ga2",
         "zero2_raise", "zero3_raise",
         "acc_zero1", "acc_zero2", "acc_zero3", "acc_zero1_ga2", "acc_zero2_ga2", "acc_zero3_ga2",
         "acc_zero2_central", "acc_zero3_central", "acc_zero2_radius", "acc_zero3_radius",
         "acc_zero2_raise", "acc_zero3_raise")
STEPS = 3
# GRPO runs step with SGD and are compared by their updates. AdamW's first steps move an element by
# lr·g/(|g| + eps): for the many near-zero gradients of the tiny Llama that turns a 1e-7 rounding difference between
# engines (amplified by GR's γ/ε = 100) into 1e-4 of lr (measured: single elements 2e-4 apart after one step).
GRPO_OPT = dict(optim="sgd", learning_rate=0.1, max_grad_norm=1.0)
# the torch reference on both sides unless a mode says otherwise: the runs compare the partition step with the
# full-tensor step, not one backend's rounding with another's. Absolute ε written out (the schema's default is a
# radius): _expected_combine divides by ε itself.
GR = dict(grad_reg_strength=0.5, grad_reg_eps=1e-2, grad_reg_eps_mode="absolute", grad_reg_g1_clip=0.3,
          grad_reg_g2_clip=0.3, grad_reg_exclude=["net.4.bias"], grad_reg_backend="torch")
MAX_GRAD_NORM = 1.0
LOSS_SCALE = 10.0  # ‖GR gradient‖ ≈ 4–5 > MAX_GRAD_NORM: the standard clip binds in every step


def _variant(mode: str) -> dict:
    """The grad_reg_* settings a mode's suffix adds."""
    if "_reuse" in mode:
        return {"grad_reg_every": 2, "grad_reg_reuse": "orthogonal"}
    if "_cpp" in mode:
        return {"grad_reg_backend": "cpp"}
    if "_auto" in mode:  # the adaptive strength through the config: γ moves each step towards gr_rel = 0.05
        return {"grad_reg_strength": "auto", "grad_reg_target_rel": 0.05, "grad_reg_strength_init": 0.5}
    return {}


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 9), nn.Tanh(), nn.Linear(9, 2))


class Reg(nn.Module):
    """A model a Trainer can train: returns {"loss": mse} (computed in fp32 whatever the weights' dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x, y):
        out = self.net(x.to(self.net[0].weight.dtype))
        return {"loss": LOSS_SCALE * nn.functional.mse_loss(out.float(), y.float())}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.sin(3 * self.x[:, :2])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


MASTERS_CHECK: list[bool] = []
COMBINE_ERRORS: list[float] = []


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _same(before: list[torch.Tensor], gr) -> bool:
    """The master partitions bit for bit as ``before``. Not ``torch.equal``: under ZeRO-3 the last rank's partitions
    end in padding that DeepSpeed allocates with ``torch.empty`` and never writes, and a NaN bit pattern there
    compares unequal to itself (seen once in CI: rank 1 of zero3_bf16acc "changed" at every step)."""
    return len(before) == len(gr.master_partitions()) and all(
        torch.equal(_bits(a), _bits(b)) for a, b in zip(before, gr.master_partitions()))


def _full_grads(gr) -> list[torch.Tensor]:
    """Every parameter's whole gradient as the engine holds it for its step (DeepSpeed's own gather, fp32)."""
    from deepspeed.utils import safe_get_full_grad

    return [safe_get_full_grad(p).detach().float().clone() for p in gr.engine.module.parameters()]


def _expected_combine(gr, g1: list[torch.Tensor], g2: list[torch.Tensor]) -> list[torch.Tensor]:
    """g1 + (γ/ε')(s2·g2 − s1·g1) on the GR parameters, g1 on the excluded ones, from the whole gradients; ε' = ε
    (absolute) or ε/‖s1·g1‖ (radius: θ' − θ has norm ε)."""
    on = [id(p) not in gr.excluded_ids for p in gr.engine.module.parameters()]
    cfg = gr.gr.settings

    def scale(gs, clip):
        n = torch.stack([g.norm() for g, o in zip(gs, on) if o]).norm()
        return 1.0 if clip is None else min(1.0, clip / (float(n) + 1e-6))

    s1, s2 = scale(g1, cfg.g1_clip), scale(g2, cfg.g2_clip)
    step = cfg.eps
    if cfg.eps_mode == "radius":
        step = cfg.eps / (s1 * float(torch.stack([g.norm() for g, o in zip(g1, on) if o]).norm()))
    gamma = gr.gr.strength  # the γ of this step (the adaptive strength's current value under "auto")
    return [a + (gamma / step) * (s2 * b - s1 * a) if o else a for a, b, o in zip(g1, g2, on)]


def _inject_nan(tensors) -> None:
    """A NaN in the first element of the first non-empty gradient of ``tensors``."""
    for t in tensors:
        if t.grad is not None and t.grad.numel():
            t.grad.view(-1)[0] = float("nan")
            return


NAN_MODE = {"on": False}  # the current mode is a _nan mode


def _watch() -> None:
    """Wrap DeepSpeedGradReg's perturb / restore_and_combine with the masters check and the combine check, and both
    engines' combine with the NaN injection of the _nan modes."""
    import torch.distributed as dist

    from grkernels import GradReg
    from grkernels.integrations.deepspeed import DeepSpeedGradReg

    perturb, combine = DeepSpeedGradReg.perturb, DeepSpeedGradReg.restore_and_combine
    plain_combine = GradReg.restore_and_combine

    def plain_combine_nan(self):
        plain_combine(self)
        if NAN_MODE["on"] and self.engine.step_count == 1:
            _inject_nan(self.gr_parameters())

    def perturb_watched(self):
        if self.gr._point == 0:
            self._masters_before = [t.detach().clone() for t in self.master_partitions()]
            self._g1_full = _full_grads(self)
        perturb(self)
        self._masters_kept = self._masters_kept if self.gr._point > 1 else _same(self._masters_before, self)

    def combine_watched(self):
        want = _expected_combine(self, self._g1_full, _full_grads(self))
        combine(self)
        MASTERS_CHECK.append(self._masters_kept and _same(self._masters_before, self))
        got = _full_grads(self)
        err = torch.stack([(a - b).norm() for a, b in zip(got, want)]).norm() / torch.stack(
            [b.norm() for b in want]).norm()
        COMBINE_ERRORS.append(float(err))
        if NAN_MODE["on"] and self.gr.step_count == 1 and dist.get_rank() == 1:
            _inject_nan(self.source.step_tensors())

    DeepSpeedGradReg.perturb, DeepSpeedGradReg.restore_and_combine = perturb_watched, combine_watched
    GradReg.restore_and_combine = plain_combine_nan


def _ds_config(stage: int, fp32_accum: bool = False) -> dict:
    # ZeRO-3: tensors under 50 elements stay gathered ("persistent"), the others are gathered per module: both paths
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 50} if stage == 3 else {})}
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "steps_per_print": 10**9, **({"data_types": {"grad_accum_dtype": "fp32"}} if fp32_accum else {})}


def train_grpo(mode: str, out: str) -> dict:
    """GradRegGRPOTrainer (TRL) on the tiny character Llama of test_integration_trl, under DDP or ZeRO-2/3."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from datasets import Dataset
    from test_integration_trl import grpo_args, make_model, make_tokenizer, reward_fn

    from grkernels.integrations.trl import GradRegGRPOTrainer

    ga = 2 if mode.endswith("_ga2") else 1
    args = grpo_args(os.path.join(out, mode), per_device_train_batch_size=4, num_generations=4, max_steps=STEPS,
                     gradient_accumulation_steps=ga, ddp_backend="gloo",
                     deepspeed=_ds_config(int(mode[len("grpo_zero")])) if "zero" in mode else None,
                     grad_reg_g1_clip=0.3, grad_reg_g2_clip=0.3, grad_reg_backend="torch", **GRPO_OPT)
    ds = Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh", "ha", "bd", "ca", "ge"] * 4})
    model = make_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = GradRegGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds,
                                            processing_class=make_tokenizer())
    tr.train()
    metrics = [{k: v for k, v in h.items() if k.startswith("grad_reg/")} for h in tr.state.log_history]
    if args.deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param

        engine = tr.accelerator.deepspeed_engine_wrapped.engine
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "init": init, "metrics": metrics, "gr_class": type(tr.grad_reg).__name__}


def _after_replay_error(tr) -> dict:
    """Train until the first GR replay raises; then the weights the next forward would use, the engine's gradients
    and the masters must be those from before the perturbation, and the engine must still step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    try:
        tr.train()
    except RuntimeError as e:
        if "replay failure" not in str(e):
            raise
    else:
        raise AssertionError("the replay did not raise")
    gr = tr.grad_reg
    params = list(gr.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if gr.stage == 3 else contextlib.nullcontext():
        weights = [p.data.detach().clone() for p in params]
    masters = [safe_get_full_fp32_param(p).detach().clone() for p in params]  # = the weights before any step
    out = {"weights_restored": all(torch.equal(w, m) for w, m in zip(weights, masters)),
           "grads_are_g1": all(torch.equal(a, b) for a, b in zip(_full_grads(gr), gr._g1_full)),
           "masters_untouched": _same(gr._masters_before, gr), "point": gr.gr._point}
    gr.engine.step()  # the held step, with g1
    after = [safe_get_full_fp32_param(p) for p in params]
    out["steps_after"] = all(torch.isfinite(a).all() for a in after) and not all(
        torch.equal(a, m) for a, m in zip(after, masters))
    return out


def _acc_variant(mode: str) -> tuple[int, dict]:
    """gradient_accumulation_steps and the GR settings an ``acc_*`` mode adds."""
    ga = 2 if "_ga2" in mode else 1
    extra = {"estimator": "central"} if "_central" in mode else {"eps_mode": "radius"} if "_radius" in mode else {}
    return ga, extra


def _memory(gr) -> dict:
    return {"extra_bytes": gr.extra_memory_bytes(),  # what GR holds on this rank, per element
            "partition_numel": sum(t.numel() for t in gr.master_partitions()),
            "model_numel": sum(p.numel() for p in make_net().parameters())}


def train_accelerate(mode: str, out: str) -> dict:
    """A plain Accelerate loop with ``GradRegWindow``: the same 8 rows per step (4 per rank, in ``ga`` micro-batches)
    under DDP (``GradReg`` around AdamW) or DeepSpeed (AdamW prepared by DeepSpeed, ``grad_reg=`` settings). In
    ``*_raise`` modes the replay of the first window raises; the loop goes on, and that window must be void."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from grkernels import GradReg
    from grkernels.integrations.accelerate import GradRegWindow

    ga, extra = _acc_variant(mode)
    settings = {**dict(strength=0.5, eps=1e-2, eps_mode="absolute", g1_clip=0.3, g2_clip=0.3, seed=0,
                       backend="torch"), **extra}
    plugin = None
    if "zero" in mode:
        stage = int(mode.split("zero")[1][0])
        zero = {"stage": stage, **({"stage3_param_persistence_threshold": 50} if stage == 3 else {})}
        plugin = DeepSpeedPlugin(hf_ds_config={
            "zero_optimization": zero, "train_micro_batch_size_per_gpu": 4 // ga, "gradient_accumulation_steps": ga,
            "gradient_clipping": MAX_GRAD_NORM, "steps_per_print": 10**9})
    # cpu=True would switch DeepSpeed off (Accelerate: DeepSpeed only "and not cpu"); there is no GPU here anyway
    acc = Accelerator(cpu=plugin is None, gradient_accumulation_steps=ga, deepspeed_plugin=plugin)
    model = Reg()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # the Trainer runs' AdamW
    if plugin is None:
        opt = GradReg(base, exclude=["net.4.bias"], named_parameters=model.named_parameters(), **settings)
        model, opt = acc.prepare(model, opt)
        window = GradRegWindow(acc, model, opt, max_grad_norm=MAX_GRAD_NORM)  # the Trainer runs' clip
    else:
        model, opt = acc.prepare(model, base)
        window = GradRegWindow(acc, model, opt, grad_reg={**settings, "exclude": ["net.4.bias"]},
                               max_grad_norm=MAX_GRAD_NORM)  # = the config's gradient_clipping: DeepSpeed clips
    data, rank, failed = Rows(), dist.get_rank(), {"armed": mode.endswith("_raise")}

    def loss_fn(m, rows):
        gr = window.grad_reg
        if failed["armed"] and (getattr(gr, "gr", None) or gr.engine).phase == "perturbed":
            failed["armed"] = False  # the first replay (θ perturbed) raises
            raise RuntimeError("replay failure")
        return m(data.x[rows], data.y[rows])["loss"]

    metrics, errors = [], 0
    steps = STEPS + (1 if mode.endswith("_raise") else 0)
    for step in range(steps):
        first = 8 * (step % STEPS) + 4 * rank  # a *_raise run's extra window reuses the first rows
        mine = torch.arange(first, first + 4)
        try:
            for rows in mine.chunk(ga):
                window.step(rows, loss_fn)
        except RuntimeError as e:
            if "replay failure" not in str(e):
                raise
            errors += 1
            continue
        metrics.append({f"grad_reg/{k}": v for k, v in window.grad_reg.metrics(sync=True).items()
                        if k in ("g1_norm", "g2_norm", "gr_rel")})
    result = {"metrics": metrics, "errors": errors, "gr_class": type(window.grad_reg).__name__}
    if plugin is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        result["params"] = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.module.named_parameters()}
        result["memory"] = _memory(window.grad_reg)
    else:
        result["params"] = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
    return result


def train(mode: str, out: str) -> dict:
    from transformers import Trainer, TrainingArguments

    if mode.startswith("grpo"):
        return train_grpo(mode, out)
    if mode.startswith("acc_"):
        return train_accelerate(mode, out)

    from grkernels.integrations.hf import grad_reg_config, grad_reg_trainer

    class SeqTrainer(Trainer):  # the same global batches whatever the engine
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, *a, **k):
            if mode.endswith("_raise") and getattr(self, "_gr_replay", None) is not None:
                raise RuntimeError("replay failure")
            return super().compute_loss(*a, **k)

    bf16 = "_bf16" in mode
    ga = 2 if mode.endswith("_ga2") else 1
    ds = None
    if mode.startswith("zero"):
        ds = _ds_config(int(mode[4]), fp32_accum=mode.endswith("_bf16acc"))
    args = grad_reg_config(TrainingArguments)(  # the same 8 rows per step whatever ga (2 ranks × 4 // ga × ga)
        output_dir=os.path.join(out, mode), per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga,
        max_steps=STEPS, learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no", dataloader_drop_last=True, seed=0,
        bf16=bf16, deepspeed=ds, logging_steps=1,
        **({} if mode.endswith("_defaults") else {**GR, **_variant(mode)}),  # _defaults: every grad_reg_* default
    )
    model = Reg()
    tr = grad_reg_trainer(SeqTrainer)(model=model, args=args, train_dataset=Rows())
    metrics: list[dict] = []

    orig_log = tr.log

    def log(logs, *a, **k):  # the GR metrics as the mixin logs them (global: equal on every rank)
        orig_log(logs, *a, **k)
        metrics.append({k2: v for k2, v in logs.items() if k2.startswith("grad_reg/") or k2 == "grad_norm"})

    tr.log = log
    if mode.endswith("_raise"):
        return {"after_error": _after_replay_error(tr), "gr_class": type(tr.grad_reg).__name__}
    tr.train()
    if ds is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        engine = tr.accelerator.deepspeed_engine_wrapped.engine
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
        return {"params": params, "metrics": metrics, "memory": _memory(tr.grad_reg),
                "gr_class": type(tr.grad_reg).__name__, "settings": dict(tr.grad_reg.gr.settings.values)}
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "metrics": metrics, "gr_class": type(tr.grad_reg).__name__}


def main(out: str) -> int:
    import deepspeed
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    _watch()
    try:
        for mode in MODES:
            MASTERS_CHECK.clear()
            COMBINE_ERRORS.clear()
            NAN_MODE["on"] = mode.endswith("_nan")
            result = train(mode, out)
            result["masters_untouched"] = list(MASTERS_CHECK)
            result["combine_errors"] = list(COMBINE_ERRORS)
            torch.save(result, os.path.join(out, f"{mode}_rank{rank}.pt"))
            open(os.path.join(out, f"done_{mode}_rank{rank}"), "w").close()
            AcceleratorState._reset_state(True)
            GradientState._reset_state()  # else a run inherits the previous one's accumulation settings
    except BaseException:
        traceback.print_exc()
        with open(os.path.join(out, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
