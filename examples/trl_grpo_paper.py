"""TRL GRPO with gradient regularization, set up as the GR paper's RLHF recipe runs it, and its KL baseline.

The paper's public RLHF recipe (Ackermann et al. 2026; TRL 0.27 there, TRL 1.x here): a Qwen2.5-0.5B SFT policy, a
Qwen2.5-0.5B scalar reward model, GRPO with 8 generations per prompt and 106 completion tokens, ``loss_type="grpo"``,
``scale_rewards="none"``, gradient accumulation 4, 4 GPUs with DeepSpeed ZeRO-2, 250 steps at a constant learning
rate. GR: γ = 1e-2 (ε = 1e-3, g1/g2 clipped at 10, embeddings and output head left out), lr 5e-6, no KL. KL
baseline: β = 0.1, lr 3e-6, no GR (stock ``trl.GRPOTrainer``).

On 4 GPUs (ZeRO-2 through Accelerate; the config ships beside this file)::

    accelerate launch --config_file examples/accelerate_zero2.yaml examples/trl_grpo_paper.py \\
        --policy PATH/TO/SFT_POLICY --reward-model PATH/TO/REWARD_MODEL --method gr --output-dir runs/gr
    accelerate launch --config_file examples/accelerate_zero2.yaml examples/trl_grpo_paper.py \\
        --policy PATH/TO/SFT_POLICY --reward-model PATH/TO/REWARD_MODEL --method kl --output-dir runs/kl

On a CPU in seconds: ``python examples/trl_grpo_paper.py --tiny --method gr --max-steps 2``. ``--tiny`` builds a
Qwen2 policy and a Qwen2 scalar reward model (2 layers, width 32; tied embeddings as Qwen2.5-0.5B) and a character
tokenizer in code, saves them, and from there runs the same code path as with real paths (8 generations, 8
completion tokens instead of 106, fp32, one process).

What to watch in the logs: ``reward``; for GR ``grad_reg/gr_rel`` = ‖GR − g1‖/‖g1‖ (how much GR changes the
gradient: ~0 means γ is too small to matter), ``grad_reg/perturb_ratio`` (the realised over the intended
perturbation: far from 1 means bf16 rounding ate it, see docs/from_kl_to_gr.md) and ``grad_reg/g1_norm``; for KL
``kl``. Not from the paper (its summary does not give them): the per-device batch (``--per-device-batch``, 8 here) and
the prompt template (the Alpaca one; match your SFT policy's).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

#: The paper's RLHF setting, shared by both methods.
PAPER = dict(num_generations=8, max_completion_length=106, loss_type="grpo", scale_rewards="none",
             gradient_accumulation_steps=4, max_steps=250, lr_scheduler_type="constant")
#: Per method: GR (γ = 1e-2, no KL) and the KL baseline (β = 0.1, no GR). ε, clips and exclusions: the paper's.
#: This script reproduces the paper, so GR is its fixed γ and absolute ε, written out: grkernels' defaults are the
#: adaptive strength (target_rel 3) with a radius ε of 0.02 (--strength auto --eps-mode radius --eps 0.02).
METHODS: dict[str, dict[str, Any]] = {
    "gr": dict(learning_rate=5e-6, beta=0.0, grad_reg_strength=1e-2, grad_reg_eps=1e-3,
               grad_reg_eps_mode="absolute", grad_reg_g1_clip=10.0, grad_reg_g2_clip=10.0, grad_reg_exclude=None),
    "kl": dict(learning_rate=3e-6, beta=0.1),
}
#: What --tiny changes (each still overridable by its flag); per_device_batch: the default of both modes.
TINY = dict(max_completion_length=8, max_steps=2, per_device_batch=8)

ALPACA = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
TINY_INSTRUCTIONS = ["Name a fruit.", "Say hi.", "Count to three.", "Give a color.", "Write a short word.",
                     "Name an animal.", "Spell cat.", "Say yes or no."]


def alpaca_prompt(instruction: str, inp: str = "") -> str:
    """The Alpaca prompt template (with the ``### Input:`` block only when there is an input)."""
    return ALPACA.format(with_input=", paired with an input that provides further context" if inp else "",
                         instruction=instruction, input_block=f"### Input:\n{inp}\n\n" if inp else "")


def _strength(text: str) -> float | str:
    return text if text == "auto" else float(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=sorted(METHODS), default="gr", help="gr: γ = 1e-2, no KL; kl: β = 0.1")
    ap.add_argument("--policy", help="path or hub id of the SFT policy (causal LM)")
    ap.add_argument("--reward-model", help="path or hub id of the scalar reward model (sequence classification, "
                    "1 label)")
    ap.add_argument("--dataset", default="tatsu-lab/alpaca", help="datasets.load_dataset name or a local data file "
                    "(a 'prompt' column, or Alpaca's 'instruction' / 'input')")
    ap.add_argument("--split", default="train")
    ap.add_argument("--output-dir", default="runs/trl_grpo_paper")
    ap.add_argument("--tiny", action="store_true", help="models and data built in code, CPU, seconds")
    ap.add_argument("--max-steps", type=int, help=f"optimizer steps (paper: {PAPER['max_steps']})")
    ap.add_argument("--max-completion-length", type=int, help=f"(paper: {PAPER['max_completion_length']})")
    ap.add_argument("--per-device-batch", type=int, help="completions per device per micro-batch (default 8)")
    ap.add_argument("--lr", type=float, help="learning rate (paper: 5e-6 for GR, 3e-6 for KL)")
    ap.add_argument("--beta", type=float, help="KL coefficient (paper: 0 for GR, 0.1 for KL)")
    ap.add_argument("--strength", type=_strength, help="GR γ (paper: 1e-2), or auto: γ adjusted each step so that "
                    "gr_rel tracks --target-rel; --method gr only")
    ap.add_argument("--target-rel", type=float, help="with --strength auto: the gr_rel to hold")
    ap.add_argument("--eps", type=float, help="GR ε (paper: 1e-3)")
    ap.add_argument("--eps-mode", choices=["absolute", "radius"], help="GR ε mode (paper: absolute; for bf16 "
                    "weights without fp32 masters BENCHMARKS.md recommends radius with ε = 0.02)")
    ap.add_argument("--use-vllm", action="store_true", help="generate with vLLM (TRL's use_vllm; GPU only)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def config_kwargs(args: argparse.Namespace) -> tuple[type, dict[str, Any]]:
    """The config class of ``--method`` (``GradRegGRPOConfig`` for GR, TRL's ``GRPOConfig`` for KL) and its
    arguments: the paper's settings, then the flags."""
    from trl import GRPOConfig

    from grkernels.integrations.trl import GradRegGRPOConfig

    kw: dict[str, Any] = {**PAPER, **METHODS[args.method], "bf16": True}
    if args.tiny:
        kw.update(max_completion_length=TINY["max_completion_length"], max_steps=TINY["max_steps"])
        kw.update(use_cpu=True, bf16=False, gradient_checkpointing=False)
    for flag, key in (("max_steps", "max_steps"), ("max_completion_length", "max_completion_length"),
                      ("lr", "learning_rate"), ("beta", "beta"), ("strength", "grad_reg_strength"),
                      ("eps", "grad_reg_eps"), ("eps_mode", "grad_reg_eps_mode"),
                      ("target_rel", "grad_reg_target_rel")):
        value = getattr(args, flag)
        if value is not None:
            if key.startswith("grad_reg_") and args.method != "gr":
                raise SystemExit(f"--{flag.replace('_', '-')} is a GR setting: use it with --method gr")
            kw[key] = value
    per_device = args.per_device_batch or TINY["per_device_batch"]
    kw.update(output_dir=args.output_dir, per_device_train_batch_size=per_device, use_vllm=args.use_vllm,
              logging_steps=1, save_strategy="no", report_to="none", seed=args.seed)
    return (GradRegGRPOConfig if args.method == "gr" else GRPOConfig), kw


def make_config(args: argparse.Namespace):
    """The ``GRPOConfig`` (``GradRegGRPOConfig`` for GR) of ``--method``."""
    cls, kw = config_kwargs(args)
    return cls(**kw)


def tiny_models(folder: str) -> tuple[str, str]:
    """A Qwen2 policy and a Qwen2 scalar reward model (random weights) with a character tokenizer, saved under
    ``folder``: the paths a GPU user would pass."""
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", padding_side="left")
    cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    paths = os.path.join(folder, "policy"), os.path.join(folder, "reward_model")
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(**cfg))
    reward = Qwen2ForSequenceClassification(Qwen2Config(**cfg, num_labels=1))
    for model, path in zip((policy, reward), paths):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def load_prompts(args: argparse.Namespace):
    from datasets import Dataset, load_dataset

    if args.tiny:  # the template's instruction and response markers only: short prompts, a fast CPU run
        prompts = [f"### Instruction:\n{i}\n\n### Response:\n" for i in TINY_INSTRUCTIONS]
        return Dataset.from_dict({"prompt": prompts * 4})
    if os.path.isfile(args.dataset):
        ext = os.path.splitext(args.dataset)[1].lstrip(".")
        ds = load_dataset({"jsonl": "json"}.get(ext, ext), data_files=args.dataset, split=args.split)
    else:
        ds = load_dataset(args.dataset, split=args.split)
    if "prompt" in ds.column_names:
        return ds
    return ds.map(lambda r: {"prompt": alpaca_prompt(r["instruction"], r.get("input") or "")},
                  remove_columns=ds.column_names)


def main(argv: list[str] | None = None, callbacks: list | None = None):
    """Run one method; returns the trainer (its ``state.log_history`` holds the logged metrics). ``callbacks``:
    extra ``TrainerCallback``s."""
    args = build_parser().parse_args(argv)
    if not args.tiny and not (args.policy and args.reward_model):
        raise SystemExit("--policy and --reward-model are required (or --tiny)")
    config = make_config(args)
    if args.tiny:
        args.policy, args.reward_model = tiny_models(os.path.join(args.output_dir, "tiny_models"))
    from trl import GRPOTrainer

    from grkernels.integrations.trl import GradRegGRPOTrainer

    trainer_cls = GradRegGRPOTrainer if args.method == "gr" else GRPOTrainer
    # a model path as a string: TRL loads the policy (AutoModelForCausalLM) and the reward model
    # (AutoModelForSequenceClassification, num_labels=1) with their tokenizers, as with hub ids
    trainer = trainer_cls(model=args.policy, reward_funcs=args.reward_model, args=config,
                          train_dataset=load_prompts(args), callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "reward" in h]
        summary = f"{args.method}: {len(logs)} steps in {time.perf_counter() - t0:.1f} s; last reward " \
                  f"{logs[-1]['reward']:+.4f}" if logs else f"{args.method}: no step logged"
        if logs and args.method == "gr":
            rel = [h["grad_reg/gr_rel"] for h in logs if "grad_reg/gr_rel" in h]
            summary += f"; mean gr_rel {sum(rel) / max(len(rel), 1):.4f}"
        elif logs and "kl" in logs[-1]:
            summary += f"; last kl {logs[-1]['kl']:.4f}"
        print(summary, flush=True)
    return trainer


if __name__ == "__main__":
    main()
