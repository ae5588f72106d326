"""Pretraining the task worlds' policy on the synthetic language, cached on disk.

The policy is a :class:`~grkernels.demo.policy.TinyTransformer` trained from scratch with
next-token cross-entropy on the completion tokens of :func:`grkernels.demo.language.corpus`
(fresh samples every step, Adam, cosine decay), so the RL phase starts from a model that has
learned a distribution (and with it the flat and sharp directions a pretrained LM has), not from a
random one. The result depends only on (language, sizes, seed, steps, batch, lr) and is saved as
``pretrained-<key>.pt`` in ``cache_dir``: a second run with the same arguments loads it bitwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from grkernels.demo.language import Language, corpus, correct, format_score, sure_frac, task_prompts
from grkernels.demo.policy import TinyTransformer, make_policy, next_token_step, sample


def _key(lang: Language, sizes, seed: int, steps: int, batch: int, lr: float) -> str:
    spec = {"lang": lang.to_dict(), "sizes": [sizes.vocab, sizes.prompt_len, sizes.completion_len, sizes.layers,
                                              sizes.width, sizes.heads],
            "seed": seed, "steps": steps, "batch": batch, "lr": lr, "torch": torch.__version__}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_on_language(lang: Language, sizes, seed: int, steps: int = 1500, batch: int = 128, lr: float = 3e-3,
                         device: torch.device | str = "cpu", cache_dir: str | None = None
                         ) -> tuple[TinyTransformer, dict[str, float]]:
    """Train (or load from ``cache_dir``) the initial policy; returns it (eval mode) and diagnostics.

    Diagnostics: ``pretrain_loss`` (nats per completion token, last-50-step mean), and for 1024
    temperature-1 samples ``init_correct`` (answer accuracy), ``init_format`` (mean format score)
    and ``init_sure`` (fraction of ``!`` tokens), plus ``cached`` (1.0 when loaded).
    """
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"pretrained-{_key(lang, sizes, seed, steps, batch, lr)}.pt")
    # Seeded on both paths, so that the global RNG is left in the same state whether the cache is hit or not.
    torch.manual_seed(7907 * seed + 13)
    policy = make_policy(sizes).to(device)
    info: dict[str, float] = {}
    if path is not None and os.path.exists(path):
        blob = torch.load(path, map_location=device, weights_only=True)
        policy.load_state_dict(blob["state"])
        info["pretrain_loss"] = float(blob["loss"])
        info["cached"] = 1.0
    else:
        opt = torch.optim.Adam(policy.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
        g = torch.Generator().manual_seed(7907 * seed + 17)
        tail = []
        for i in range(steps):
            loss = next_token_step(policy, opt, corpus(lang, batch, g).to(device), sizes.prompt_len)
            sched.step()
            if i >= steps - 50:
                tail.append(loss)
        info["pretrain_loss"] = float(torch.stack(tail).mean()) if tail else math.nan
        info["cached"] = 0.0
        if path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"  # atomic: parallel seeds never see half a file
            torch.save({"state": policy.state_dict(), "loss": info["pretrain_loss"]}, tmp)
            os.replace(tmp, path)
    policy.eval()
    g = torch.Generator(device=device).manual_seed(7907 * seed + 19)
    prompts = task_prompts(1024, g, device)
    comps = sample(policy, prompts, sizes.completion_len, g)
    info["init_correct"] = float(correct(prompts, comps).mean())
    info["init_format"] = float(format_score(comps).mean())
    info["init_sure"] = float(sure_frac(comps).mean())
    return policy, info
