"""GR in verl with LoRA, remove-padding and gradient checkpointing together (one combined case, 2 gloo processes).

``tests/dist_workers/verl_configs_worker.py`` runs one policy update of verl's FSDP2 engine with ``lora_rank=4``
(all linear layers), ``use_remove_padding=True`` on a batch whose prompts and responses really hold padding (odd
lengths, left- and right-padded) and ``enable_gradient_checkpointing=True``. Here, in float64 and without verl, the
update is recomputed on a PEFT model built from the config verl used: per-sequence log-probs of the unpadded
sequences, verl's PPO loss with the KL term over the global batch, g1 on the adapter parameters, θ' on them, g2,
g1 + (γ/ε)(clip(g2) − clip(g1)), verl's gradient clip. The gradient the base optimizer steps with must match it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install 'grkernels[verl]')")
pytest.importorskip("peft")

from test_integration_verl import make_batch, make_model_dir, ppo_loss, rel_error, response_logprobs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "dist_workers"))
import verl_worker as W  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_configs")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    out.mkdir()
    model = make_model_dir(inp / "model")
    batch = make_batch(model.double())
    torch.save(batch, inp / "batch.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    worker = Path(__file__).parent / "dist_workers" / "verl_configs_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(inp), str(out)], env=env, capture_output=True, text=True, timeout=900)
    errors = "".join(f.read_text() for f in out.glob("error_rank*.txt"))
    assert all((out / f"done_rank{r}").exists() for r in range(2)), errors or proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"dir": inp / "model", "batch": batch,
            "ranks": [torch.load(out / f"lora_rank{r}.pt", weights_only=False) for r in range(2)]}


def lora_reference(model_dir: Path, batch: dict, rank: dict) -> dict:
    """The adapter gradient verl's base optimizer must step with, in float64 (see the module docstring)."""
    import dataclasses

    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    cfg = LoraConfig(**{k: v for k, v in rank["peft_config"].items() if k in fields and k != "peft_type"})
    model = get_peft_model(Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager"), cfg).double()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(rank["theta"]), "the PEFT model's parameters are not the ones verl trained"
    trainable = rank["trainable"]
    fixed = {n: rank["theta"][n].double() for n in names if n not in trainable}
    theta = {n: rank["theta"][n].double() for n in trainable}
    gr = {**dict(g1_clip=10.0, g2_clip=10.0), **W.GR}
    P = [n for n in trainable if "embed_tokens" not in n and "lm_head" not in n]

    def grad_at(point: dict) -> dict:
        leaves = {n: t.clone().requires_grad_(True) for n, t in point.items()}
        loss = ppo_loss(response_logprobs(model, {**fixed, **leaves}, batch), batch, W.KL)
        return dict(zip(trainable, torch.autograd.grad(loss, [leaves[n] for n in trainable])))

    def norm(g: dict, keys: list[str]) -> torch.Tensor:
        return torch.sqrt(sum(g[k].square().sum() for k in keys))

    def clip(n: torch.Tensor, c: float) -> torch.Tensor:
        return (c / (n + 1e-6)).clamp(max=1.0)

    g1 = grad_at(theta)
    n1 = norm(g1, P)
    s1 = clip(n1, gr["g1_clip"])
    g2 = grad_at({n: theta[n] + gr["eps"] * s1 * g1[n] if n in P else theta[n] for n in trainable})
    s2 = clip(norm(g2, P), gr["g2_clip"])
    corr = {n: gr["strength"] / gr["eps"] * (s2 * g2[n] - s1 * g1[n]) for n in P}
    full = {n: g1[n] + corr[n] if n in P else g1[n] for n in trainable}
    coef = clip(norm(full, trainable), W.CLIP_GRAD)
    return {"grad": {n: full[n] * coef for n in trainable}, "g1": g1, "full": full, "P": P,
            "gr_rel": float(norm(corr, P) / n1)}


def test_lora_remove_padding_checkpointing_gradient_matches_recomputation(run):
    batch = run["batch"]
    assert (batch["attention_mask"] == 0).any(dim=1).sum() >= 6  # real padding in most sequences
    for rank in run["ranks"]:
        assert rank["gr_engine"].startswith("GradReg") or "GR" in rank["gr_engine"], rank["gr_engine"]
        assert rank["checkpointing"]
        assert rank["trainable"] and all("lora_" in n for n in rank["trainable"])
        assert sorted(rank["grad"]) == sorted(rank["trainable"])  # only the adapters reach the optimizer
    ref = lora_reference(run["dir"], batch, run["ranks"][0])
    assert rel_error(ref["full"], ref["g1"]) > 0.05  # the correction is large: a wrong second pass could not pass
    for rank in run["ranks"]:
        err = rel_error(rank["grad"], ref["grad"])
        assert err < 1e-5, f"verl LoRA + remove-padding + checkpointing: rel err {err:.2e}"
        assert rank["metrics"]["grad_reg/gr_rel"][0] == pytest.approx(ref["gr_rel"], rel=1e-4)
        for n, t in rank["theta"].items():  # the frozen base is not moved by the step
            if n not in rank["trainable"]:
                assert torch.equal(rank["params"][n], t), n
