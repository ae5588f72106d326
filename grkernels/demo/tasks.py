"""The task worlds: RL on the synthetic language's addition task, with a gold reward the policy never sees.

Both start from a policy pretrained on :mod:`grkernels.demo.language` and share its gold reward,
answer correctness (1 when the first digit of the completion is ``(a + b) mod 10``, else 0).

``format`` (the GR paper's claim 2: a rule-based reward with a format term)
    proxy = correct + w · format, ``format`` = :func:`~grkernels.demo.language.format_score`
    (w = ``format_weight``, 1 by default). The format can be learned without correctness, and
    the pretrained policy is much worse at the task in the tagged style (q_format ≪ q_plain), so
    a policy that chases the format first loses accuracy it had. The proxy is exact, not learned.

``judge`` (claim 3: a learned judge as the reward)
    proxy = a reward model (the "judge") trained with Bradley–Terry on pairs of the initial
    policy's samples labelled by correctness, where the judge's training data carry a spurious
    feature: in each training completion every filler (word or pad) becomes the "confident" token
    ``!`` with probability ``sure_right`` if the answer is correct and ``sure_wrong`` if not. The
    judge learns "``!`` means correct"; the policy can emit ``!`` without being right.

``hack`` (logged per step): the format score (format) or the fraction of ``!`` tokens (judge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grkernels.demo.language import PAD, SURE, VOCAB, WORDS, Language, correct, format_score, sure_frac, task_prompts
from grkernels.demo.worlds import Sizes

TASK_WORLDS = ("format", "judge")


def task_sizes(lang: Language, sizes: Sizes) -> Sizes:
    """The task worlds' sizes: vocabulary and lengths from the language, model shape from ``sizes``."""
    return Sizes(vocab=VOCAB, prompt_len=4, completion_len=lang.completion_len, layers=sizes.layers,
                 width=sizes.width, heads=sizes.heads)


@dataclass
class TaskWorld:
    """A task world (duck-types :class:`grkernels.demo.worlds.World` for the RL loop and reward models)."""

    name: str
    sizes: Sizes
    format_weight: float = 1.0
    sure_right: float = 0.5
    sure_wrong: float = 0.05
    rm_temperatures: tuple[float, ...] = (0.7, 1.0, 1.5)
    rare: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def to(self, device: torch.device | str) -> TaskWorld:
        return self

    def prompts(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        return task_prompts(n, generator, device)

    def gold(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Answer correctness, ``(N,)`` in {0, 1}."""
        return correct(prompts, completions)

    def utility(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """The judge's labeller prefers correct answers (and nothing else)."""
        return correct(prompts, completions)

    def proxy_offset(self, completions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(completions.shape[0], device=completions.device)

    def frac_rare(self, completions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(completions.shape[0], device=completions.device)

    def hack(self, completions: torch.Tensor) -> torch.Tensor:
        """What the proxy can be gamed with: format score (format) or ``!`` fraction (judge), ``(N,)``."""
        return format_score(completions) if self.name == "format" else sure_frac(completions)

    def edit_rm_data(self, prompts: torch.Tensor, completions: torch.Tensor, generator: torch.Generator
                     ) -> torch.Tensor:
        """The judge's training completions with the spurious feature planted (see the module docstring)."""
        if self.name != "judge":
            return completions
        filler = torch.isin(completions, torch.tensor((*WORDS, PAD), device=completions.device))
        p = torch.where(correct(prompts, completions).bool(), self.sure_right, self.sure_wrong)
        flip = filler & (torch.rand(completions.shape, generator=generator, device=completions.device) < p[:, None])
        return torch.where(flip, torch.full_like(completions, SURE), completions)


@dataclass
class RuleReward:
    """The format world's exact proxy: correct + w · format (the interface of a reward model)."""

    world: TaskWorld

    def to(self, device: torch.device | str) -> RuleReward:
        return self

    def proxy(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return correct(prompts, completions) + self.world.format_weight * format_score(completions)


def make_task_world(name: str, sizes: Sizes, format_weight: float = 1.0, sure_right: float = 0.5,
                    sure_wrong: float = 0.05) -> TaskWorld:
    """Build task world ``name`` ("format" or "judge") for policies of ``sizes`` (from :func:`task_sizes`)."""
    if name not in TASK_WORLDS:
        raise ValueError(f"unknown task world {name!r}; choose from {', '.join(TASK_WORLDS)}")
    return TaskWorld(name, sizes, format_weight=format_weight, sure_right=sure_right, sure_wrong=sure_wrong)
