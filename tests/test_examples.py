"""The recipes in examples/ at a tiny size: the TRL GRPO script of the paper's RLHF setting (GR and its KL
baseline), its Accelerate ZeRO-2 config, and verl's CPU example (2 gloo processes).

The TRL script runs single-process without DeepSpeed here (a ZeRO-2 GRPO run with GR is tested in
tests/test_deepspeed.py); its gradient is the integration's, checked against an independent recomputation in
tests/test_integration_trl.py. What is checked here is what the script itself can get wrong: the paper's settings
per method, the models loaded from paths, GR on (or off) with the right γ and exclusions, and that training moves.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- TRL GRPO, the paper's RLHF recipe
@pytest.fixture(scope="module")
def trl_example():
    pytest.importorskip("trl")
    return load_example("trl_grpo_paper")


def test_paper_settings_per_method(trl_example, tmp_path):
    from trl import GRPOConfig

    from grkernels.integrations.trl import GradRegGRPOConfig

    ex = trl_example
    common = ["--policy", "p", "--reward-model", "r", "--output-dir", str(tmp_path)]

    def config(*flags):
        """The script's config, constructed with CPU overrides (a bf16 config cannot be built without a GPU)."""
        cls, kw = ex.config_kwargs(ex.build_parser().parse_args([*flags, *common]))
        assert kw["bf16"] is True and "use_cpu" not in kw  # the paper's run: bf16 on GPUs
        return cls(**{**kw, "bf16": False, "use_cpu": True})

    gr, kl = config("--method", "gr"), config("--method", "kl")
    assert type(gr) is GradRegGRPOConfig and type(kl) is GRPOConfig  # the baseline is stock TRL
    for c in (gr, kl):
        assert (c.num_generations, c.max_completion_length, c.loss_type, c.scale_rewards) == (8, 106, "grpo", "none")
        assert (c.gradient_accumulation_steps, c.max_steps, str(c.lr_scheduler_type)) == (4, 250,
                                                                                          "SchedulerType.CONSTANT")
        assert c.per_device_train_batch_size == 8 and not c.use_vllm
    assert (gr.learning_rate, gr.beta, gr.grad_reg_strength, gr.grad_reg_eps) == (5e-6, 0.0, 1e-2, 1e-3)
    assert (gr.grad_reg_g1_clip, gr.grad_reg_g2_clip, gr.grad_reg_exclude, gr.grad_reg_eps_mode) == (
        10.0, 10.0, None, "absolute")
    assert (kl.learning_rate, kl.beta) == (3e-6, 0.1) and not hasattr(kl, "grad_reg_strength")
    over = config("--method", "gr", "--eps-mode", "radius", "--eps", "0.02", "--strength", "0.1", "--lr", "1e-6")
    assert (over.grad_reg_eps_mode, over.grad_reg_eps, over.grad_reg_strength, over.learning_rate) == (
        "radius", 0.02, 0.1, 1e-6)
    auto = config("--method", "gr", "--strength", "auto", "--target-rel", "0.5")
    assert (auto.grad_reg_strength, auto.grad_reg_target_rel) == ("auto", 0.5)
    with pytest.raises(SystemExit, match="GR setting"):
        config("--method", "kl", "--strength", "0.1")
    with pytest.raises(SystemExit, match="required"):
        ex.main(["--method", "gr", "--output-dir", str(tmp_path)])
    assert ex.alpaca_prompt("Add.", "2 and 3").count("### Input:\n2 and 3\n\n") == 1
    assert "### Input" not in ex.alpaca_prompt("Add.")


def test_accelerate_zero2_config():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(EXAMPLES / "accelerate_zero2.yaml"))
    assert str(cfg.distributed_type) in ("DistributedType.DEEPSPEED", "DEEPSPEED")
    assert cfg.deepspeed_config["zero_stage"] == 2 and cfg.num_processes == 4 and not cfg.use_cpu
    assert str(cfg.mixed_precision) in ("bf16", "PrecisionType.BF16")


def _logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "reward" in h]


def _moved(trainer, path: str) -> dict[str, float]:
    """Relative change of each parameter from the saved initial policy."""
    from transformers import AutoModelForCausalLM

    init = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}
    return {n: float((p.detach() - init[n]).norm() / init[n].norm()) for n, p in trainer.model.named_parameters()}


def test_tiny_gr_run(trl_example, tmp_path):
    from transformers import Qwen2ForSequenceClassification, TrainerCallback

    from grkernels import GradReg

    seen: list[set[str]] = []

    class GRParameters(TrainerCallback):  # right before the optimizer steps: the parameters GR regularised
        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            gr = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper around the GradReg
            names = {id(p): n for n, p in model.named_parameters()}
            seen.append({names[id(p)] for p in gr.gr_parameters()})

    tr = trl_example.main(["--tiny", "--method", "gr", "--max-steps", "2", "--output-dir", str(tmp_path),
                           "--lr", "1e-3"], callbacks=[GRParameters()])
    policy = str(tmp_path / "tiny_models" / "policy")
    assert tr.model.config._name_or_path == policy  # loaded from the saved path, as a user's model would be
    assert isinstance(tr.reward_funcs[0], Qwen2ForSequenceClassification)  # the scalar reward model scores
    assert isinstance(tr.grad_reg, GradReg)
    logs = _logs(tr)
    assert len(logs) == 2
    for h in logs:
        assert h["grad_reg/strength"] == pytest.approx(1e-2)
        assert math.isfinite(h["reward"]) and 0 < h["grad_reg/gr_rel"] < 1
        assert h["grad_reg/perturb_ratio"] == pytest.approx(1.0, abs=1e-3)  # fp32 weights: nothing rounded away
    # the paper's exclusions: the (tied) embedding / output head gets no GR, every block weight does
    names = {n for n, _ in tr.model.named_parameters()}
    assert tr.model.lm_head.weight is tr.model.model.embed_tokens.weight  # tied, as in Qwen2.5-0.5B
    assert seen == [names - {"model.embed_tokens.weight"}] * 2
    gr_names = seen[0]
    moved = _moved(tr, policy)
    assert min(moved[n] for n in gr_names) > 0  # every GR parameter was updated


def test_tiny_kl_baseline(trl_example, tmp_path):
    from trl import GRPOTrainer

    tr = trl_example.main(["--tiny", "--method", "kl", "--max-steps", "2", "--output-dir", str(tmp_path),
                           "--lr", "1e-3"])
    assert type(tr) is GRPOTrainer and tr.beta == 0.1 and tr.ref_model is not None
    logs = _logs(tr)
    assert len(logs) == 2 and not any(k.startswith("grad_reg/") for h in logs for k in h)
    assert abs(logs[0]["kl"]) < 1e-6 < logs[1]["kl"]  # the policy starts at the reference, then leaves it
    assert max(_moved(tr, str(tmp_path / "tiny_models" / "policy")).values()) > 0


# ---------------------------------------------------------------- verl on CPU (2 gloo processes)
STEP_LINE = re.compile(r"^step (\d+): reward ([-\d.]+) .* g1_norm ([\d.]+) +gr_rel ([\d.]+) +perturb_ratio ([\d.]+)"
                       r"(?: +γ ([\d.e+-]+))?", re.M)


def test_verl_cpu_example():
    pytest.importorskip("verl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(EXAMPLES / "verl_cpu.py"), "--steps", "2", "--strength", "0.05"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    steps = STEP_LINE.findall(r.stdout)
    assert [int(s[0]) for s in steps] == [0, 1], r.stdout[-2000:]
    for _, reward, g1, gr_rel, ratio, gamma in steps:
        assert 0 <= float(reward) <= 1 and float(g1) > 0 and (not gamma or float(gamma) == 0.05)
        assert 0 < float(gr_rel) < 10 and abs(float(ratio) - 1) < 1e-2  # GR acted; fp32 keeps the perturbation
