"""A tiny causal transformer used as the policy (and, with a scalar head, as the reward model).

Pre-LayerNorm blocks, learned position embeddings, untied output head. The input embeddings,
position embeddings and head are separate modules (``tok_emb``, ``pos_emb``, ``lm_head``) so that
``grkernels.paper_exclude`` (or name-based exclusion) can leave them out of GR as the paper does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grkernels.demo.worlds import markov_batch


class Block(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); causal attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``x`` (B, L, W). With ``cache`` (a dict this block fills), keys/values of earlier calls are
        prepended: incremental decoding, where the new positions come after all cached ones."""
        b, l, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, w // self.heads).transpose(1, 3).unbind(2)
        causal = True
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
                causal = l > 1  # one new query may see every cached key; is_causal would mask them (top-left)
                if causal:
                    raise ValueError("cached decoding takes one new token at a time")
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, l, w))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Causal transformer over token ids ``(B, L)``; returns ``(B, L, out_dim)``.

    ``out_dim = vocab`` gives next-token logits (the policy); ``out_dim = 1`` a per-position scalar
    (the reward model reads the last position, which has seen the whole sequence).
    """

    def __init__(self, vocab: int, max_len: int, width: int = 64, layers: int = 2, heads: int = 4,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab if out_dim is None else out_dim)
        # GPT-2 style init: small normal weights, residual projections scaled by depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor, caches: list[dict] | None = None, start: int = 0) -> torch.Tensor:
        """``ids`` (B, L) at positions ``start .. start + L - 1``; ``caches`` (one dict per block) for decoding."""
        if start + ids.shape[1] > self.max_len:
            raise ValueError(f"sequence length {start + ids.shape[1]} exceeds max_len {self.max_len}")
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))


# Names of the modules the paper leaves out of GR (used when paper_exclude is not applicable).
EXCLUDE_NAMES = ("tok_emb", "pos_emb", "lm_head")


def completion_logits(policy: TinyTransformer, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits that predict the completion tokens: ``(B, T, V)`` for ``seqs = [prompt | completion]``.

    Position ``prompt_len - 1 + t`` predicts completion token ``t``; the last position predicts
    nothing and is not computed.
    """
    return policy(seqs[:, :-1])[:, prompt_len - 1:]


@torch.no_grad()
def sample_with_logits(policy: TinyTransformer, prompts: torch.Tensor, length: int, generator: torch.Generator,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``length`` tokens after each prompt with a KV cache.

    Returns ``(completions (B, length), logits (B, length, V))``: the raw logits (before the
    temperature) that each completion token was drawn from, i.e. what :func:`completion_logits`
    computes for the finished sequences, up to float rounding of the cached path.
    """
    caches: list[dict] = [{} for _ in policy.blocks]
    logits = policy(prompts, caches)[:, -1]
    toks, all_logits = [], []
    for t in range(length):
        all_logits.append(logits)
        nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)
        toks.append(nxt)
        if t + 1 < length:
            logits = policy(nxt, caches, start=prompts.shape[1] + t)[:, -1]
    return torch.cat(toks, 1), torch.stack(all_logits, 1)


def sample(policy: TinyTransformer, prompts: torch.Tensor, length: int, generator: torch.Generator,
           temperature: float = 1.0) -> torch.Tensor:
    """Sample ``length`` tokens after each prompt; returns the completions ``(B, length)``."""
    return sample_with_logits(policy, prompts, length, generator, temperature)[0]


def make_policy(sizes, out_dim: int | None = None) -> TinyTransformer:
    """A policy (``out_dim=None``) or scalar-head model of the configured size."""
    return TinyTransformer(sizes.vocab, sizes.seq_len, width=sizes.width, layers=sizes.layers,
                           heads=sizes.heads, out_dim=out_dim)


def next_token_step(policy: TinyTransformer, opt: torch.optim.Optimizer, seqs: torch.Tensor, prompt_len: int
                    ) -> torch.Tensor:
    """One optimiser step of next-token cross-entropy on the completion tokens of ``seqs``; returns the loss
    (nats per token, detached)."""
    logits = completion_logits(policy, seqs, prompt_len)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, prompt_len:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def pretrain_policy(base, seed: int, steps: int = 300, batch: int = 64, lr: float = 3e-3,
                    device: torch.device | str = "cpu") -> tuple[TinyTransformer, dict[str, float]]:
    """Fine-tune a fresh policy on samples of ``base``'s Markov chain (cross-entropy on completion tokens).

    Gives the RL phase a non-uniform, seed-dependent starting policy. Returns the policy and
    ``{"sft_loss": final loss (nats/token), "chain_entropy": the chain's mean row entropy (nats)}``.
    """
    torch.manual_seed(7919 * seed + 3)
    sizes = base.sizes
    policy = make_policy(sizes).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(7919 * seed + 5)
    loss_ema = None
    for _ in range(steps):
        loss = next_token_step(policy, opt, markov_batch(base, batch, g).to(device), sizes.prompt_len)
        loss_ema = loss.detach() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.detach()
    t = base.transitions
    chain_h = float(-(t * t.clamp_min(1e-12).log()).sum(-1).mean())
    policy.eval()
    return policy, {"sft_loss": float(loss_ema), "chain_entropy": chain_h}
