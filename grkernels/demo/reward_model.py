"""The proxy: a small transformer reward model trained with a Bradley-Terry loss on noisy labels.

Pairs (a, b) share a prompt and are sampled from the initial policy (at the world's
temperatures); the labeller prefers a with probability σ((u(a) − u(b)) / τ), u the world's
utility, τ = 0.1 by default (noisy). The model's score r is in BT-logit units, as real reward models are: the labeller's
P(a ≻ b) is modelled as σ(r(a) − r(b)), so r estimates u / τ. Exact terms a world adds to the
proxy (the repetition penalty of the rare world) are put on the same scale (divided by τ).
Scores are centred on samples of the initial policy, so proxy ≈ 0 at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grkernels.demo.policy import TinyTransformer, make_policy, sample
from grkernels.demo.worlds import World


@dataclass
class RewardModel:
    """A trained reward model plus the exact terms its world adds; ``proxy`` is what RL optimises."""

    model: TinyTransformer
    world: World
    center: float = 0.0
    label_temp: float = 0.1

    @torch.no_grad()
    def score(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Reward-model score (BT-logit units, centred), ``(N,)``."""
        return self.model(torch.cat([prompts, completions], 1))[:, -1, 0].float() - self.center

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    def proxy(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """The proxy reward the policy is trained on, ``(N,)``."""
        return self.score(prompts, completions) + self.world.proxy_offset(completions) / self.label_temp


def pair_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ordered like ``truth`` by ``pred``; pairs tied in ``truth`` are skipped.

    ``pred`` and ``truth`` are ``(P, 2)`` (or two ``(P,)`` differences stacked by the caller).
    Returns a 0-d tensor (NaN when every pair is tied).
    """
    dt = truth[:, 0] - truth[:, 1]
    dp = pred[:, 0] - pred[:, 1]
    keep = dt.abs() > 1e-9
    agree = ((dp * dt) > 0).float()
    return (agree * keep).sum() / keep.sum()


def group_pair_accuracy(pred: torch.Tensor, truth: torch.Tensor, group: int) -> torch.Tensor:
    """Pairwise accuracy of ``pred`` against ``truth`` over all pairs within each group of ``group`` rows."""
    p = pred.view(-1, group)
    t = truth.view(-1, group)
    dp = p[:, :, None] - p[:, None, :]
    dt = t[:, :, None] - t[:, None, :]
    upper = torch.triu(torch.ones(group, group, dtype=torch.bool, device=pred.device), 1)
    keep = upper & (dt.abs() > 1e-9)
    return (((dp * dt) > 0) & keep).sum() / keep.sum().clamp_min(1)


def _make_pairs(world: World, policy: TinyTransformer, n: int, g: torch.Generator, device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs: prompts ``(n, P)`` and completions ``(n, 2, T)``, temperatures cycling over the world's."""
    s = world.sizes
    temps = world.rm_temperatures
    prompts, comps = [], []
    for i, temp in enumerate(temps):
        k = n // len(temps) + (1 if i < n % len(temps) else 0)
        pr = world.prompts(k, g, device)
        c = sample(policy, pr.repeat_interleave(2, 0), s.completion_len, g, temperature=temp)
        prompts.append(pr)
        comps.append(c.view(k, 2, -1))
    prompts_t = torch.cat(prompts)
    comps_t = torch.cat(comps)
    perm = torch.randperm(n, generator=g, device=device)
    return prompts_t[perm], comps_t[perm]


def train_reward_model(world: World, policy: TinyTransformer, seed: int, n_pairs: int = 2000,
                       n_heldout: int = 500, steps: int = 150, batch: int = 64, lr: float = 2e-3,
                       label_temp: float = 0.1, device: torch.device | str = "cpu"
                       ) -> tuple[RewardModel, dict[str, float]]:
    """Train the proxy for ``world`` on labelled pairs of ``policy``'s samples.

    Returns the reward model and diagnostics: held-out pairwise accuracy against the labeller's
    utility (``rm_acc_utility``) and against gold (``rm_acc_gold``), the final BT loss, and the
    label noise (fraction of training labels that disagree with the utility's order).
    """
    s = world.sizes
    g = torch.Generator(device=device).manual_seed(31_337 * seed + 17 + sum(map(ord, world.name)))
    torch.manual_seed(31_337 * seed + 19)
    prompts, comps = _make_pairs(world, policy, n_pairs + n_heldout, g, device)
    # A world may plant a feature in the training pairs only (the judge's spurious cue); held-out pairs stay as sampled.
    comps[:n_pairs] = world.edit_rm_data(prompts[:n_pairs].repeat_interleave(2, 0),
                                         comps[:n_pairs].reshape(-1, s.completion_len), g).view(n_pairs, 2, -1)
    flat_p = prompts.repeat_interleave(2, 0)
    flat_c = comps.reshape(-1, s.completion_len)
    u = world.utility(flat_p, flat_c).view(-1, 2)
    gold = world.gold(flat_p, flat_c).view(-1, 2)
    # Noisy labels: P(a preferred) = σ((u_a − u_b) / τ).
    p_a = torch.sigmoid((u[:, 0] - u[:, 1]) / label_temp)
    labels = (torch.rand(p_a.shape, generator=g, device=device) < p_a).float()
    seqs = torch.cat([flat_p, flat_c], 1).view(-1, 2, s.seq_len)
    tr, te = slice(0, n_pairs), slice(n_pairs, n_pairs + n_heldout)

    model = make_policy(s, out_dim=1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    loss_ema = None
    for _ in range(steps):
        idx = torch.randint(0, n_pairs, (batch,), generator=g, device=device)
        r = model(seqs[tr][idx].reshape(-1, s.seq_len))[:, -1, 0].view(-1, 2)
        loss = F.binary_cross_entropy_with_logits(r[:, 0] - r[:, 1], labels[tr][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.detach() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.detach()
    model.eval()
    with torch.no_grad():
        r_te = model(seqs[te].reshape(-1, s.seq_len))[:, -1, 0].view(-1, 2)
        offset = world.proxy_offset(flat_c.view(-1, 2, s.completion_len)[te].reshape(-1, s.completion_len))
        proxy_te = r_te + offset.view(-1, 2) / label_temp
        # Centre on plain temperature-1 samples of the initial policy.
        pr = world.prompts(512, g, device)
        c = sample(policy, pr, s.completion_len, g)
        center = float(model(torch.cat([pr, c], 1))[:, -1, 0].mean())
    rm = RewardModel(model, world, center, label_temp)
    info = {
        "rm_acc_utility": float(pair_accuracy(r_te, u[te])),
        "rm_acc_gold": float(pair_accuracy(proxy_te, gold[te])),
        "rm_bt_loss": float(loss_ema),
        "label_noise": float(pair_accuracy(torch.stack([labels[tr], 1 - labels[tr]], 1), u[tr]).neg().add(1)),
        "n_pairs": n_pairs,
    }
    return rm, info
