"""An independent recomputation of the GR gradient of TRL's GRPO, for the configuration tests (LoRA, gradient
checkpointing, bf16): written from TRL's loss definition, never from the integration's code or output.

From a snapshot of one optimizer step (θ of every parameter, the gradient the optimizer was handed, the prepared
micro-batches of the window as TRL's ``_prepare_inputs`` returned them, and the RNG state right after each), it
recomputes the window's loss with ``torch.func.functional_call``: old log-probs pinned at θ, TRL's GA scaling, the
k3 KL term when β > 0 (times the ratio under TRL's ``use_bias_correction_kl``). Then g1 at θ, the perturbed point
on the GR parameters (absolute θ' = θ + ε·g1, or radius θ' = θ + ε·g1/‖g1‖), g2 there, and g1 + (γ/h)(g2 − g1)
with h the effective step (ε, or ε/‖g1‖); g1 on the other trainable parameters. With ``use_rng`` the recorded RNG
state is restored before each micro-batch's forward, so the dropout masks are the ones TRL's forward drew; the
same state serves at θ' (what GR's RNG replay promises).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

CHARS = "abcdefgh "


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def make_model(seed: int = 0, attention_dropout: float = 0.0, layers: int = 2) -> LlamaForCausalLM:
    """A tiny Llama (untied head) from a config; ``attention_dropout`` > 0 for the dropout-mask tests."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4 + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, attention_dropout=attention_dropout, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init: log-probs vary, GR's correction is sizeable
        model.lm_head.weight.mul_(4.0)
    return model


def reward_fn(completions, **kwargs):
    return [float(c.count("a") + 0.5 * c.count("b")) - 0.2 * len(c) for c in completions]


PROMPTS = ["ab", "cd", "ef", "gh", "ha", "bd", "ca", "ge"] * 4


def recording(trainer_cls: type) -> type:
    """``trainer_cls`` recording each prepared micro-batch (first passes only: the replay does not call
    ``_prepare_inputs`` of the host) and the RNG state right after it, where GR captures its own."""

    class Recording(trainer_cls):
        def __init__(self, *a, **k):
            self.rec_inputs: list[dict] = []
            self.rec_rng: list[torch.Tensor] = []
            super().__init__(*a, **k)

        def _prepare_inputs(self, generation_batch):
            out = super()._prepare_inputs(generation_batch)
            self.rec_inputs.append(out)
            self.rec_rng.append(torch.get_rng_state())
            return out

    Recording.__name__ = f"Recording{trainer_cls.__name__}"
    return Recording


class Snapshots(TrainerCallback):
    """θ (every parameter), .grad (trainable ones) and the window's prepared inputs and RNG states, right before
    ``optimizer.step()``."""

    def __init__(self) -> None:
        self.trainer = None
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        t = self.trainer
        ga = t.current_gradient_accumulation_steps
        self.steps.append(dict(
            theta={n: p.detach().clone() for n, p in model.named_parameters()},
            grad={n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            window=list(t.rec_inputs[-ga:]),
            rng=list(t.rec_rng[-ga:]),
        ))


def completion_logps(model, params: dict, inp: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token log-probs of the completion tokens (temperature 1) at ``params``; ``dtype``: compute dtype."""
    ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], dim=1)
    am = torch.cat([inp["prompt_mask"], inp["completion_mask"]], dim=1)
    if dtype is not None:
        params = {k: v.to(dtype) for k, v in params.items()}
    logits = functional_call(model, params, (), {"input_ids": ids, "attention_mask": am}).logits
    n = inp["completion_ids"].size(1)
    lp = torch.log_softmax(logits[:, -n - 1: -1].double(), dim=-1)
    return lp.gather(-1, inp["completion_ids"].unsqueeze(-1)).squeeze(-1)


def window_loss(lps: Sequence[torch.Tensor], window: Sequence[dict], old: Sequence[torch.Tensor], *, loss_type: str,
                eps_low: float, eps_high: float, beta: float = 0.0,
                ref: Sequence[torch.Tensor | None] | None = None, kl_bias_correction: bool = False) -> torch.Tensor:
    """TRL GRPO's loss over one accumulation window (its GA scaling), from the per-token log-probs ``lps``."""
    ga = len(window)
    total_tokens = sum(inp["completion_mask"].sum() for inp in window)
    loss = 0.0
    for k, (inp, lp, old_lp) in enumerate(zip(window, lps, old)):
        mask = inp["completion_mask"].double()
        adv = inp["advantages"].double().unsqueeze(1)
        c1 = torch.exp(lp - old_lp)
        c2 = torch.clamp(c1, 1 - eps_low, 1 + eps_high)
        ptl = -torch.min(c1 * adv, c2 * adv)
        if beta:  # TRL's k3 estimate; with use_bias_correction_kl (TRL 1.16's default) times the ratio c1
            d = ref[k].double() - lp
            kl = torch.exp(d) - d - 1
            ptl = ptl + beta * (kl * c1 if kl_bias_correction else kl)
        if loss_type == "grpo":
            loss = loss + ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
        elif loss_type == "dapo":
            loss = loss + (ptl * mask).sum() / total_tokens
        else:
            raise AssertionError(loss_type)
    return loss


def gr_reference(model, step: dict, trainable: Sequence[str], excluded: Sequence[str], *, gamma: float, eps: float,
                 loss_type: str, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                 kl_bias_correction: bool = False, radius: bool = False, use_rng: bool = False,
                 ref_fn: Callable | None = None, compute_dtype: torch.dtype | None = None) -> dict:
    """The GR gradient of one snapshot, float64 unless ``compute_dtype``. Returns ``{"gr", "g1", "g2", "h"}``
    (dicts over ``trainable``; h the effective finite-difference step)."""
    window, rngs = step["window"], step["rng"]
    frozen = {n: v.double() for n, v in step["theta"].items() if n not in trainable}
    theta = {n: step["theta"][n].double().requires_grad_(True) for n in trainable}

    def lps_at(params: dict, k: int, inp: dict) -> torch.Tensor:
        if use_rng:
            torch.set_rng_state(rngs[k])
        return completion_logps(model, {**frozen, **params}, inp, compute_dtype)

    was = model.training
    model.train(use_rng)  # dropout on only where masks are replayed
    try:
        with torch.no_grad():
            old = [lps_at(theta, k, inp) for k, inp in enumerate(window)]
        ref = [ref_fn(inp) for inp in window] if ref_fn is not None else None

        def loss(params: dict) -> torch.Tensor:
            lps = [lps_at(params, k, inp) for k, inp in enumerate(window)]
            return window_loss(lps, window, old, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=beta,
                               ref=ref, kl_bias_correction=kl_bias_correction)

        g1 = dict(zip(trainable, torch.autograd.grad(loss(theta), list(theta.values()))))
        gr_names = [n for n in trainable if n not in excluded]
        norm = math.sqrt(sum(float(g1[n].square().sum()) for n in gr_names))
        h = eps / norm if radius else eps
        theta2 = {n: (theta[n] + h * g1[n] if n in gr_names else theta[n]).detach().requires_grad_(True)
                  for n in trainable}
        g2 = dict(zip(trainable, torch.autograd.grad(loss(theta2), list(theta2.values()))))
    finally:
        model.train(was)
    gr = {n: g1[n] + (gamma / h) * (g2[n] - g1[n]) if n in gr_names else g1[n] for n in trainable}
    return {"gr": gr, "g1": g1, "g2": g2, "h": h}


def rel(a: dict, b: dict, keys: Sequence[str] | None = None) -> float:
    """‖a − b‖/‖b‖ over ``keys`` (all of b's by default), in float64."""
    keys = list(b) if keys is None else list(keys)
    num = math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))
    den = math.sqrt(sum(float(b[k].double().square().sum()) for k in keys))
    return num / den


def cosine(a: dict, b: dict, keys: Sequence[str] | None = None) -> float:
    keys = list(b) if keys is None else list(keys)
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in keys)
    na = math.sqrt(sum(float(a[k].double().square().sum()) for k in keys))
    nb = math.sqrt(sum(float(b[k].double().square().sum()) for k in keys))
    return dot / (na * nb)
