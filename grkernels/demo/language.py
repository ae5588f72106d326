"""A small synthetic language with a verifiable task: what the task worlds' policy is pretrained on.

Vocabulary (``VOCAB`` = 20 tokens): digits 0–9, ``+`` ``=``, the answer tags ``<a>`` ``</a>``, a pad
``.``, the "confident" token ``!`` and four filler words ``w0..w3``.

Task: the prompt is ``a + b =`` (two uniform digits), the correct answer is ``(a + b) mod 10``.
A completion has ``T`` tokens (6 by default); its *answer* is its first digit token (none: wrong).

The pretraining corpus mixes two styles of completion, answered correctly with different rates:
    plain   (probability 1 − f):  ``c w w w w w``, fillers uniform over the words, each one
            replaced by ``!`` with probability ``p_sure``; c correct with probability ``q_plain``
    format  (probability f):      ``<a> c </a> . . .``; c correct with probability ``q_format``
A wrong answer is a uniform random digit (which may happen to be right). With the defaults
(f = 0.2, q_plain = 0.6, q_format = 0.1, p_sure = 0.05) the language "knows" the task in its plain
style and barely in its tagged style, as a pretrained LM may know a skill in one format and not in
the format a reward asks for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DIGITS = 10
PLUS, EQ, OPEN, CLOSE, PAD, SURE = 10, 11, 12, 13, 14, 15
WORDS = (16, 17, 18, 19)
VOCAB = 20
PROMPT_LEN = 4
NAMES = [str(d) for d in range(DIGITS)] + ["+", "=", "<a>", "</a>", ".", "!"] + [f"w{i}" for i in range(4)]


@dataclass(frozen=True)
class Language:
    """Parameters of the pretraining corpus (see the module docstring)."""

    completion_len: int = 6
    format_frac: float = 0.2      # f: share of completions in the tagged style
    q_plain: float = 0.6          # probability that a plain completion's answer is correct
    q_format: float = 0.1         # probability that a tagged completion's answer is correct
    p_sure: float = 0.05          # probability that a plain filler is the "confident" token ``!``

    def __post_init__(self) -> None:
        if self.completion_len < 3:
            raise ValueError(f"completion_len must be >= 3 (<a> c </a>), got {self.completion_len}")
        for name in ("format_frac", "q_plain", "q_format", "p_sure"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Language.{name} must be in [0, 1], got {v}")

    def to_dict(self) -> dict:
        return asdict(self)


def task_prompts(n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` prompts ``a + b =``, ``(n, 4)``."""
    ab = torch.randint(0, DIGITS, (n, 2), generator=generator, device=device)
    return torch.stack([ab[:, 0], torch.full_like(ab[:, 0], PLUS), ab[:, 1], torch.full_like(ab[:, 0], EQ)], 1)


def target(prompts: torch.Tensor) -> torch.Tensor:
    """The correct answer ``(a + b) mod 10`` of each prompt, ``(N,)``."""
    return (prompts[:, 0] + prompts[:, 2]) % DIGITS


def answer(completions: torch.Tensor) -> torch.Tensor:
    """Each completion's answer: its first digit token, −1 when it has none, ``(N,)``."""
    is_digit = completions < DIGITS
    first = torch.where(is_digit.any(1), is_digit.int().argmax(1), torch.zeros_like(completions[:, 0]))
    ans = completions.gather(1, first[:, None])[:, 0]
    return torch.where(is_digit.any(1), ans, torch.full_like(ans, -1))


def correct(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """1.0 where the answer equals the target, else 0.0, ``(N,)``."""
    return (answer(completions) == target(prompts)).float()


def template(completion_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tagged style ``<a> ? </a> . . .`` with −1 in the free answer slot, ``(T,)``."""
    t = torch.full((completion_len,), PAD, dtype=torch.long, device=device)
    t[0], t[1], t[2] = OPEN, -1, CLOSE
    return t


def format_score(completions: torch.Tensor) -> torch.Tensor:
    """Fraction of the T − 1 template positions (all but the answer slot) that match ``<a> ? </a> . ..``, ``(N,)``.

    Graded, so that the format can be learned a token at a time, and blind to the answer: a
    completion can score 1 whatever digit it puts in the slot.
    """
    t = template(completions.shape[1], completions.device)
    keep = t >= 0
    return (completions[:, keep] == t[keep]).float().mean(1)


def sure_frac(completions: torch.Tensor) -> torch.Tensor:
    """Fraction of completion tokens that are the "confident" token ``!``, ``(N,)``."""
    return (completions == SURE).float().mean(1)


def corpus(lang: Language, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` pretraining sequences ``[prompt | completion]``, ``(n, 4 + T)`` (CPU)."""
    g = generator
    T = lang.completion_len
    prompts = task_prompts(n, g)
    tgt = target(prompts)
    tagged = torch.rand(n, generator=g) < lang.format_frac
    q = torch.where(tagged, torch.tensor(lang.q_format), torch.tensor(lang.q_plain))
    right = torch.rand(n, generator=g) < q
    ans = torch.where(right, tgt, torch.randint(0, DIGITS, (n,), generator=g))
    words = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (n, T - 1), generator=g)]
    words = torch.where(torch.rand(n, T - 1, generator=g) < lang.p_sure, torch.full_like(words, SURE), words)
    plain = torch.cat([ans[:, None], words], 1)
    tmpl = template(T).expand(n, T).clone()
    tmpl[:, 1] = ans
    comps = torch.where(tagged[:, None], tmpl, plain)
    return torch.cat([prompts, comps], 1)


def decode(ids: torch.Tensor) -> str:
    """Readable text of one sequence (for debugging and the docs)."""
    return " ".join(NAMES[int(i)] for i in ids)
