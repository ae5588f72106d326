"""The RL loop of the demo: GRPO-style updates of one policy, for one method and one seed.

Per step: ``prompts_per_step`` random prompts, ``group`` completions each, sampled from the
current policy; proxy rewards from the reward model; group-centred advantages (divided by the
group std only with ``adv_std=True``; the GR paper's recipe does not); one update on the batch
with ``grkernels.ops.policy_loss`` (PPO-clip with pinned old log-probs, optional KL penalty to a
reference) and Adam, wrapped in ``grkernels.GradReg`` for the GR methods.

Methods:
    ``none``      no regularisation
    ``kl``        + β·KL(π‖π_ref) penalty in the loss (π_ref = the initial policy)
    ``kl_reset``  KL whose reference is reset to the current policy every ``reset_interval`` steps
                  (π_ref ← α·π + (1 − α)·π_ref, as TRL's ``sync_ref_model``)
    ``gr``        forward finite-difference gradient regularisation (γ, ε), GR off embeddings/head
    ``gr_kl``     GR and the KL penalty together
    ``gr_all``    GR on every parameter, embeddings and head included (``gr`` leaves them out, as the paper)
    ``gr_every``  the cheaper GR: the extra pass on every ``gr_every``-th step only, the steps in between reuse
                  the last correction made orthogonal to their g1 (``GradReg(every=k, reuse="orthogonal")``)
    ``gr_subset`` the cheaper GR: the extra pass on the ``gr_subset`` share of the sequences with the largest
                  |advantage| only (``GradReg.mark_subset``), the difference scaled by their share of Σ|advantage|
    ``gr_head``   head-only GR: GR on ``lm_head`` only (everything else plain g1), its perturbed pass from the
                  cached final hidden states (``ln_f``'s output) of the pass at θ: no second trunk pass
                  (``grkernels.head``; exact, the same g2 as rerunning the model)
    ``gr_auto``   ``gr`` with the adaptive strength (``GradReg(strength="auto", target_rel=ρ*)``): γ moved after
                  each step so that ‖GR − g1‖/‖g1‖ tracks ``target_rel`` (``grkernels.strength``), from
                  ``strength_init`` (None: the library's default)

Metrics per step describe the policy that produced the step's samples (before its update):
proxy and gold reward (means, gold units), KL(π‖π_init) per sequence (exact sum over positions of
the per-position KL on the sampled prefixes, nats), entropy (mean per token, nats), the proxy's
pairwise accuracy against gold within each group, ‖g1‖ (norm of the loss gradient over all
parameters), ‖GR − g1‖/‖g1‖ (0 without GR), ``gr_strength`` (the γ that step applied: ``metrics()["strength"]``,
0 without GR) and ``hack``, the mean of the world's :meth:`hack` feature (what its
proxy over-rewards).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from grkernels.demo.policy import TinyTransformer, completion_logits, sample, sample_with_logits
from grkernels.demo.reward_model import RewardModel, group_pair_accuracy
from grkernels.demo.worlds import World, repetition_penalty
from grkernels.head import head_param_groups, head_perturbed_pass
from grkernels.integrations.reference_reset import mix_into_reference
from grkernels.ops import policy_loss
from grkernels.optim import GradReg
from grkernels.params import paper_exclude

DEFAULT_METHODS = ("none", "kl", "kl_reset", "gr", "gr_kl")
# none_lowlr: the control for "is GR more than a smaller step?" (no regularisation, lr × lowlr_scale); opt-in,
# as gr_all (GR on embeddings and head too), gr_every (GR's extra pass every k-th step only) and gr_subset (the
# extra pass on the sequences with the largest |advantage| only) and gr_head (GR on the output head only, from the
# cached hidden states) and gr_auto (gr with the adaptive strength).
METHODS = (*DEFAULT_METHODS, "none_lowlr", "gr_all", "gr_every", "gr_subset", "gr_head", "gr_auto")
GR_METHODS = ("gr", "gr_kl", "gr_all", "gr_every", "gr_subset", "gr_head", "gr_auto")  # those wrapping Adam in GradReg
# Per-step metrics: those computed on the device (stacked, one transfer after the loop), then gr_strength (a host
# float from GradReg.metrics).
DEVICE_METRICS = ("proxy", "gold", "kl", "entropy", "rm_acc", "g1_norm", "gr_rel", "rep", "frac_rare", "hack", "loss")
METRICS = (*DEVICE_METRICS, "gr_strength")


@dataclass
class RLConfig:
    """Knobs of one RL run (defaults: the demo's; GR defaults follow the paper's recipe except γ)."""

    method: str = "none"
    steps: int = 250
    prompts_per_step: int = 16
    group: int = 8
    lr: float = 2e-4
    gr_lr_scale: float = 1.0       # the paper's runs used ~1.67x KL's lr for GR; 1.0 keeps the comparison clean
    lowlr_scale: float = 0.5       # lr multiplier of the none_lowlr control
    beta: float = 0.3
    kl_estimator: str = "k3"
    reset_interval: int = 50
    reset_alpha: float = 1.0
    gamma: float = 0.1
    eps: float = 0.01
    g1_clip: float | None = 10.0
    g2_clip: float | None = 10.0
    gr_exclude: str = "paper"      # "paper" (embeddings + head, as the paper) or "none"
    gr_estimator: str = "forward"
    gr_every: int = 4              # gr_every: steps per full GR step (the extra pass)
    gr_subset: float = 0.25        # gr_subset: share of the sequences in the extra pass (largest |advantage|)
    target_rel: float = 3.0        # gr_auto: the ‖GR − g1‖/‖g1‖ the adaptive strength holds (the library's default)
    strength_init: float | None = None  # gr_auto: the first step's γ (None: the library's default)
    adv_std: bool = False
    clip_eps: float = 0.2
    loss_agg: str = "token_mean"
    temperature: float = 1.0
    max_grad_norm: float = 0.0     # 0 = no clipping of the final gradient
    eval_samples: int = 512

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 0.0 < self.gr_subset <= 1.0:
            raise ValueError(f"gr_subset must be in (0, 1], got {self.gr_subset!r}")
        if not (math.isfinite(self.target_rel) and self.target_rel > 0):
            raise ValueError(f"target_rel must be a finite number > 0, got {self.target_rel!r}")

    @property
    def uses_kl(self) -> bool:
        return self.method in ("kl", "kl_reset", "gr_kl") and self.beta > 0

    @property
    def uses_gr(self) -> bool:
        return self.method in GR_METHODS

    def to_dict(self) -> dict:
        return asdict(self)


def _logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def _kl_entropy(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-position KL(π‖π_ref) summed over the completion (per sequence), and mean token entropy."""
    lp = F.log_softmax(logits.float(), -1)
    lq = F.log_softmax(ref_logits.float(), -1)
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1).sum(-1).mean()
    ent = -(p * lp).sum(-1).mean()
    return kl, ent


def subset_by_advantage(adv: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """gr_subset's choice: the ⌈fraction·n⌉ sequences with the largest |advantage| and the rest (each in batch
    order), and the subset's share of Σ|advantage|: the factor GR's estimate divides their difference by (the
    share of the policy gradient they carry; the count share when every advantage is 0). One host read per step."""
    n = adv.numel()
    m = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    order = torch.argsort(adv.abs(), descending=True, stable=True)
    top, rest = order[:m].sort().values, order[m:].sort().values  # batch order: f = 1 is the batch as is
    total = float(adv.abs().sum())
    share = float(adv[top].abs().sum()) / total if total > 0 else m / n
    return top, rest, min(1.0, share)


def _loss_and_hidden(policy: TinyTransformer, loss: Callable[[], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss()`` and the final hidden states (``ln_f``'s output) its forward computed, caught by a forward hook
    (the hook only reads: the forward is the same as without it)."""
    caught: list[torch.Tensor] = []
    handle = policy.ln_f.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        value = loss()
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"gr_head: expected one forward of the policy's ln_f in the loss, got {len(caught)}")
    return value, caught[0]


def make_optimizer(policy: TinyTransformer, cfg: RLConfig, seed: int):
    """Adam (lr scaled by ``gr_lr_scale`` for GR methods), wrapped in ``grkernels.GradReg`` for GR methods."""
    lr = cfg.lr * (cfg.gr_lr_scale if cfg.uses_gr else cfg.lowlr_scale if cfg.method == "none_lowlr" else 1.0)
    if cfg.method == "gr_head":  # GR on lm_head only: the head's group has γ, every other gr_enabled=False
        base = torch.optim.Adam(head_param_groups(policy, cfg.gamma, head=policy.lm_head), lr=lr)
        return GradReg(base, strength=cfg.gamma, eps=cfg.eps, eps_mode="absolute", g1_clip=cfg.g1_clip,
                       g2_clip=cfg.g2_clip, estimator=cfg.gr_estimator, seed=seed)
    base = torch.optim.Adam(policy.parameters(), lr=lr)
    if not cfg.uses_gr:
        return base
    exclude = paper_exclude(policy) if cfg.gr_exclude == "paper" and cfg.method != "gr_all" else None
    extra = {"every": cfg.gr_every, "reuse": "orthogonal"} if cfg.method == "gr_every" else {}
    if cfg.method == "gr_auto":
        extra.update(strength="auto", target_rel=cfg.target_rel, strength_init=cfg.strength_init)
    else:
        extra.update(strength=cfg.gamma)
    # ε absolute, as every committed result of the demo ran (the library's default became radius ε 0.02 later)
    return GradReg(base, eps=cfg.eps, eps_mode="absolute", g1_clip=cfg.g1_clip, g2_clip=cfg.g2_clip,
                   exclude=exclude, estimator=cfg.gr_estimator, seed=seed, **extra)


def run_rl(world: World, init_policy: TinyTransformer, rm: RewardModel, cfg: RLConfig, seed: int,
           device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
           backend: str = "auto", probe: Callable[[TinyTransformer, Callable, torch.Tensor], None] | None = None
           ) -> dict:
    """Train a copy of ``init_policy`` on ``rm``'s proxy with ``cfg.method``; returns curves and a final eval.

    ``probe(policy, loss_of, adv)``: a measurement hook (``bench/cheap_gr.py``), called every step right after
    the backward at θ (``.grad`` = g1) with ``loss_of(rows)``, the loss of those sequences as a share of the
    batch's (``rows=None``: the batch), and the advantages; it must leave ``.grad`` and the parameters as it
    found them.

    Reproducible for a given ``seed`` (and thread count): prompts come from their own generator, so
    every method sees the same prompt sequence; sampling uses a second generator.
    Returns ``{"curves": {metric: [per-step floats]}, "final": {...}, "gr_skipped": int}``.
    """
    s = world.sizes
    P, T = s.prompt_len, s.completion_len
    policy = copy.deepcopy(init_policy).to(device)
    init = copy.deepcopy(init_policy).to(device).requires_grad_(False)
    ref = copy.deepcopy(init) if cfg.method in ("kl_reset",) else init
    opt = make_optimizer(policy, cfg, seed)
    params = [p for p in policy.parameters()]
    widx = sum(map(ord, world.name))
    g_prompt = torch.Generator(device=device).manual_seed(1_000_003 * seed + widx)
    g_sample = torch.Generator(device=device).manual_seed(2_000_029 * seed + widx)
    n = cfg.prompts_per_step * cfg.group
    mask = torch.ones(n, T, dtype=torch.bool, device=device)
    beta = cfg.beta if cfg.uses_kl else 0.0
    rows = []
    strengths: list[float] = []  # gr_strength per step (host floats, exact)

    def loss_fn(seqs, comps, adv, old_logp, ref_logp, rows=None, hidden=None):
        """The batch's loss, or with ``rows`` the share of it those sequences carry: every completion has T
        tokens (the mask is all ones), so under each aggregation the rows' loss is their mean × len(rows)/n.
        With ``hidden`` (``ln_f``'s output of the batch, gr_head) only the head runs: the same ops on the same
        hidden states as ``completion_logits``."""
        if rows is not None:
            seqs, comps, adv, old_logp = seqs[rows], comps[rows], adv[rows], old_logp[rows]
            ref_logp = None if ref_logp is None else ref_logp[rows]
        logits = completion_logits(policy, seqs, P) if hidden is None else policy.lm_head(hidden)[:, P - 1:]
        loss, _ = policy_loss(logits, comps, adv, mask[: len(seqs)], old_logp=old_logp, ref_logp=ref_logp,
                              beta=beta, clip_low=cfg.clip_eps, clip_high=cfg.clip_eps, kl_estimator=cfg.kl_estimator,
                              loss_agg=cfg.loss_agg, temperature=cfg.temperature, backend=backend)
        return loss if rows is None else loss * (len(rows) / n)

    for step in range(cfg.steps):
        strengths.append(0.0)
        prompts = world.prompts(cfg.prompts_per_step, g_prompt, device).repeat_interleave(cfg.group, 0)
        policy.eval()
        # logits0: what each token was drawn from (KV-cached path; equals a fresh forward up to rounding).
        comps, logits0 = sample_with_logits(policy, prompts, T, g_sample, temperature=cfg.temperature)
        seqs = torch.cat([prompts, comps], 1)
        with torch.no_grad():
            proxy = rm.proxy(prompts, comps)
            gold = world.gold(prompts, comps)
            old_logp = _logp(logits0 / cfg.temperature, comps)
            init_logits = completion_logits(init, seqs, P)
            kl_init, ent = _kl_entropy(logits0, init_logits)
            ref_logp = None
            if beta > 0:
                ref_logits = init_logits if ref is init else completion_logits(ref, seqs, P)
                ref_logp = _logp(ref_logits / cfg.temperature, comps)
            acc = group_pair_accuracy(proxy, gold, cfg.group)
            r = proxy.view(-1, cfg.group)
            adv = r - r.mean(1, keepdim=True)
            if cfg.adv_std:
                adv = adv / (r.std(1, keepdim=True) + 1e-4)
            adv = adv.reshape(-1)

        policy.train()
        opt.zero_grad(set_to_none=True)
        subset = None
        if cfg.method == "gr_subset" and opt.active:
            subset, rest, share = subset_by_advantage(adv, cfg.gr_subset)
            loss = loss_fn(seqs, comps, adv, old_logp, ref_logp, subset)
            loss.backward()
            opt.mark_subset(share)
            if len(rest):
                rest_loss = loss_fn(seqs, comps, adv, old_logp, ref_logp, rest)
                rest_loss.backward()
                loss = loss.detach() + rest_loss.detach()
        elif cfg.method == "gr_head" and opt.active:
            loss, hidden = _loss_and_hidden(policy, lambda: loss_fn(seqs, comps, adv, old_logp, ref_logp))
            loss.backward()
        else:
            loss = loss_fn(seqs, comps, adv, old_logp, ref_logp)
            loss.backward()
        g1 = _grad_norm(params)
        if probe is not None:
            probe(policy, lambda rows: loss_fn(seqs, comps, adv, old_logp, ref_logp, rows), adv)
        gr_rel = torch.zeros((), device=device)
        if cfg.method == "gr_head":
            if opt.active:  # the perturbed pass(es) from the cached hidden states: the head only, no trunk
                head_perturbed_pass(opt, hidden, lambda h: loss_fn(seqs, comps, adv, old_logp, ref_logp, hidden=h))
            opt.combine()
        elif cfg.uses_gr:
            for _ in range(opt.extra_passes):  # 1 (forward), 2 (central), 0 between gr_every's full steps
                opt.perturb()
                loss_fn(seqs, comps, adv, old_logp, ref_logp, subset).backward()
            opt.combine()  # GR's gradient (or gr_every's reused correction) in .grad before the clip
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        if cfg.uses_gr:
            m = opt.metrics(sync=False)  # device tensors and host floats: no read here
            rel = m.get("gr_rel")
            strengths[-1] = float(m["strength"])  # a host float: the γ this step applied
            if rel is not None:
                gr_rel = torch.as_tensor(rel, device=device).detach().float()
        if cfg.method == "kl_reset" and cfg.reset_interval > 0 and (step + 1) % cfg.reset_interval == 0:
            mix_into_reference(ref, policy, cfg.reset_alpha)

        rows.append(torch.stack([
            proxy.mean(), gold.mean(), kl_init, ent, acc.float(), g1.float(), gr_rel.to(g1.device).float(),
            repetition_penalty(comps, s.vocab).mean(), world.frac_rare(comps).mean(), world.hack(comps).mean(),
            loss.detach().float(),
        ]))  # stays on the device: one host transfer after the loop, not one per step
        if progress is not None:
            progress(1)

    curves_t = torch.stack(rows).double().cpu()
    curves = {k: curves_t[:, i].tolist() for i, k in enumerate(DEVICE_METRICS)}
    curves["gr_strength"] = strengths
    final = evaluate(world, policy, init, rm, cfg.eval_samples, seed, device)
    skipped = 0
    if cfg.uses_gr:
        skipped = int(opt.metrics().get("skipped", 0))
    return {"curves": curves, "final": final, "gr_skipped": skipped}


@torch.no_grad()
def evaluate(world: World, policy: TinyTransformer, init: TinyTransformer, rm: RewardModel, n: int, seed: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Gold, proxy, KL to init, entropy and repetition of ``policy`` on ``n`` fresh samples (fixed eval seed)."""
    s = world.sizes
    policy.eval()
    g = torch.Generator(device=device).manual_seed(3_000_017 * seed + 11)
    prompts = world.prompts(n, g, device)
    comps = sample(policy, prompts, s.completion_len, g)
    seqs = torch.cat([prompts, comps], 1)
    kl, ent = _kl_entropy(completion_logits(policy, seqs, s.prompt_len), completion_logits(init, seqs, s.prompt_len))
    top_frac = F.one_hot(comps, s.vocab).float().mean(1).max(1).values.mean()
    return {
        "gold": float(world.gold(prompts, comps).mean()),
        "proxy": float(rm.proxy(prompts, comps).mean()),
        "kl": float(kl),
        "entropy": float(ent),
        "rep": float(repetition_penalty(comps, s.vocab).mean()),
        "frac_rare": float(world.frac_rare(comps).mean()),
        "hack": float(world.hack(comps).mean()),
        "top_token_frac": float(top_frac),
    }
