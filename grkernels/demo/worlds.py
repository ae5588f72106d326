"""The demo's worlds: a vocabulary, a Markov chain for the initial policy, and gold / labeller rewards.

A *world* says what the hidden gold reward is and how the proxy reward model is taught (which
utility the labeller uses, on which samples). Two worlds make two different ways for a proxy to be
wrong:

``collapse`` (world 0)
    gold(x) = mean_t value[x_t] + 0.5 · copy(x) − 0.5 · rep(x), where
    ``copy`` = fraction of completion tokens that occur in the prompt and
    ``rep`` = Σ_v max(0, count_v − 2)² / T (a repetition penalty the initial policy rarely
    triggers). The labeller uses gold itself, on samples of the initial policy; the proxy learns
    "more high-value tokens is better" and extrapolates it to degenerate repetition.

``rare`` (world B)
    S = the 4 tokens rarest under the initial policy, excluding the 4 highest-value tokens.
    gold(x) = value + 0.5 · copy − 0.5 · rep − 0.3 · fracS(x). The labeller's utility is
    value + 0.5 · copy + 2.0 · fracS (no repetition term), on samples at temperatures {0.7, 1, 1.5};
    the proxy is that reward model minus the exact repetition penalty, so hacking it needs no
    collapse: the policy only has to use S more.

All rewards are per sequence, in "gold units" (a completion of average tokens scores ≈ 0).
The task worlds (format, judge), with a pretrained policy, are in :mod:`grkernels.demo.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

WORLDS = ("collapse", "rare")
WORLD_ALIASES = {"0": "collapse", "world0": "collapse", "b": "rare", "worldb": "rare"}


@dataclass(frozen=True)
class Sizes:
    """Sizes of the toy problem (the knobs that let the same experiment run larger on a GPU)."""

    vocab: int = 16
    prompt_len: int = 4
    completion_len: int = 12
    layers: int = 2
    width: int = 64
    heads: int = 4

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len


@dataclass
class Base:
    """What every world of one seed shares: token values and the Markov chain of the initial policy."""

    sizes: Sizes
    values: torch.Tensor        # (V,) fixed random value per token, gold units
    transitions: torch.Tensor   # (V, V) row-stochastic Markov chain the initial policy imitates


def make_base(sizes: Sizes, seed: int) -> Base:
    """Token values ~ N(0, 1) and a sparse-ish random Markov chain (rows ~ softmax(1.5·N(0,1)))."""
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    v = sizes.vocab
    values = torch.randn(v, generator=g)
    transitions = torch.softmax(1.5 * torch.randn(v, v, generator=g), -1)
    return Base(sizes, values, transitions)


def markov_batch(base: Base, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training sequences: a uniform random prompt, then the chain continued from its last token."""
    s = base.sizes
    prompts = torch.randint(0, s.vocab, (n, s.prompt_len), generator=generator)
    toks = [prompts[:, -1:]]
    for _ in range(s.completion_len):
        toks.append(torch.multinomial(base.transitions[toks[-1][:, 0]], 1, generator=generator))
    return torch.cat([prompts] + toks[1:], 1)


def random_prompts(sizes: Sizes, n: int, generator: torch.Generator, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """``n`` prompts of uniform random tokens, ``(n, prompt_len)``."""
    return torch.randint(0, sizes.vocab, (n, sizes.prompt_len), generator=generator, device=device)


def copy_fraction(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Fraction of completion tokens that occur anywhere in the prompt, ``(N,)``."""
    return (completions[:, :, None] == prompts[:, None, :]).any(-1).float().mean(1)


def repetition_penalty(completions: torch.Tensor, vocab: int) -> torch.Tensor:
    """rep(x) = Σ_v max(0, count_v − 2)² / T, ``(N,)`` (0 unless some token occurs 3+ times)."""
    counts = torch.zeros(completions.shape[0], vocab, device=completions.device)
    counts.scatter_add_(1, completions, torch.ones_like(completions, dtype=counts.dtype))
    excess = (counts - 2).clamp(min=0)
    return (excess * excess).sum(1) / completions.shape[1]


@dataclass
class World:
    """One world: gold reward, labeller utility, how the proxy is assembled, and RM training temperatures."""

    name: str
    base: Base
    rare: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # S (rare world)
    value_w: float = 1.0
    copy_w: float = 0.5
    rep_w: float = 0.5
    gold_rare_w: float = 0.0       # weight of fracS in gold
    label_rare_w: float = 0.0      # weight of fracS in the labeller's utility
    label_rep: bool = True         # whether the labeller's utility contains the repetition penalty
    proxy_exact_rep: bool = False  # whether the proxy adds the exact repetition penalty to the RM
    rm_temperatures: tuple[float, ...] = (1.0,)

    @property
    def sizes(self) -> Sizes:
        return self.base.sizes

    def prompts(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` prompts of this world, ``(n, prompt_len)``."""
        return random_prompts(self.base.sizes, n, generator, device)

    def hack(self, completions: torch.Tensor) -> torch.Tensor:
        """The feature the proxy over-rewards, ``(N,)``: fracS in the rare world, the top token's share otherwise."""
        if self.rare.numel():
            return self.frac_rare(completions)
        counts = torch.zeros(completions.shape[0], self.base.sizes.vocab, device=completions.device)
        counts.scatter_add_(1, completions, torch.ones_like(completions, dtype=counts.dtype))
        return counts.max(1).values / completions.shape[1]

    def edit_rm_data(self, prompts: torch.Tensor, completions: torch.Tensor, generator: torch.Generator
                     ) -> torch.Tensor:
        """The reward model's training completions (as sampled: these worlds plant nothing)."""
        return completions

    def to(self, device: torch.device | str) -> World:
        self.base.values = self.base.values.to(device)
        self.base.transitions = self.base.transitions.to(device)
        self.rare = self.rare.to(device)
        return self

    def _parts(self, prompts: torch.Tensor, completions: torch.Tensor) -> dict[str, torch.Tensor]:
        values = self.base.values.to(completions.device)
        return {
            "value": values[completions].mean(1),
            "copy": copy_fraction(prompts, completions),
            "rep": repetition_penalty(completions, self.base.sizes.vocab),
            "rare": self.frac_rare(completions),
        }

    def gold(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """The hidden true reward, ``(N,)``."""
        p = self._parts(prompts, completions)
        return (self.value_w * p["value"] + self.copy_w * p["copy"] - self.rep_w * p["rep"]
                - self.gold_rare_w * p["rare"])

    def utility(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """What the (noisy) labeller prefers, ``(N,)``: the reward model is trained on BT(utility / τ)."""
        p = self._parts(prompts, completions)
        u = self.value_w * p["value"] + self.copy_w * p["copy"] + self.label_rare_w * p["rare"]
        return u - self.rep_w * p["rep"] if self.label_rep else u

    def proxy_offset(self, completions: torch.Tensor) -> torch.Tensor:
        """Exact terms added to the reward model's score to form the proxy (``−rep`` in the rare world)."""
        if not self.proxy_exact_rep:
            return torch.zeros(completions.shape[0], device=completions.device)
        return -self.rep_w * repetition_penalty(completions, self.base.sizes.vocab)

    def frac_rare(self, completions: torch.Tensor) -> torch.Tensor:
        """Fraction of completion tokens in S, ``(N,)`` (zeros in worlds without S)."""
        if not self.rare.numel():
            return torch.zeros(completions.shape[0], device=completions.device)
        return torch.isin(completions, self.rare.to(completions.device)).float().mean(1)


def make_world(name: str, base: Base, init_token_freq: torch.Tensor | None = None, rare_penalty: float = 0.3,
               rare_bonus: float = 2.0) -> World:
    """Build world ``name`` ("collapse" or "rare"); the rare world needs the initial policy's token frequencies.

    ``rare_penalty``: weight of fracS in gold (subtracted); ``rare_bonus``: weight of fracS in the labeller's
    utility (added). Both only matter in the rare world.
    """
    name = WORLD_ALIASES.get(name.lower(), name.lower())
    if name == "collapse":
        return World("collapse", base)
    if name == "rare":
        if init_token_freq is None:
            raise ValueError("world 'rare' needs init_token_freq (token frequencies of the initial policy)")
        v = base.sizes.vocab
        n_rare = max(1, v // 4)
        top = set(torch.argsort(base.values, descending=True)[:n_rare].tolist())
        order = [i for i in torch.argsort(init_token_freq.cpu()).tolist() if i not in top]
        rare = torch.tensor(sorted(order[:n_rare]), dtype=torch.long)
        return World("rare", base, rare=rare, gold_rare_w=rare_penalty, label_rare_w=rare_bonus, label_rep=False,
                     proxy_exact_rep=True, rm_temperatures=(0.7, 1.0, 1.5))
    raise ValueError(f"unknown world {name!r}; choose from {', '.join(WORLDS)} (aliases: 0, B)")
