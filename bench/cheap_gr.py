"""Cheaper GR: fidelity and cost of periodic reuse (``every=k``) and of the sub-batch second pass.

    python bench/cheap_gr.py                    # CPU-sized; writes bench/results/<device>_cheap_gr.json
    python bench/cheap_gr.py --steps 60 --dim 128
    python bench/cheap_gr.py --parts cost --variant w128 --dim 128 --layers 4   # -> ..._cheap_gr_w128.json

Fidelity: a small causal transformer is trained with full GR (AdamW) on two objectives, next-token prediction on a
Markov language ("lm") and a REINFORCE policy gradient on the model's own samples with group-normalised advantages
("pg", the GRPO shape). At every step the full correction c = GR − g1 is computed, and beside it what each cheap
mode would apply on the same trajectory; reported: the mean over steps of cos(mode's correction, c) (0 for a step
that applies none) and of its norm ratio. Every-k modes: the correction stored at the last full step (steps
t − t mod k), reused as GradReg does. Sub-batch modes: the second pass on a fraction f of the sequences, chosen at
random, by highest loss (lm, K-SAM's rule) or by largest |advantage| (pg).

Cost: real GradReg steps of each mode (two-phase, the same micro-batches), time per step averaged over whole
every-k cycles, over a plain AdamW step of the same loop (the median over rounds of each round's ratio); all in
one run, the modes taking turns. "bookkeeping": the time inside GradReg's own calls (mark_subset, perturb,
combine: the GR-step backend and the reuse / sub-batch arithmetic), in the same units. "gradreg-off": GradReg at
γ = 0, i.e. what wrapping costs a step that does no GR (the non-finite check, g1's norm). "head-only": GR on the
output head alone (``grkernels.head``), its perturbed pass from the cached hidden states (its bookkeeping includes
that head forward/backward).

Reuse arithmetic (``--parts reuse``): CorrectionReuse's own cost at ``--reuse-params`` fp32 parameters (default
18.6M, the Qwen2 at hidden 512 of BENCHMARKS.md's memory table) in ``--reuse-tensors`` tensors: one full step's
capture and store and one step in between's apply, for the 0.2.0 flat implementation (kept in this script only, as
``OldFlatCorrectionReuse``), the torch reference and the C++ passes; medians over ``--repeats`` round-robin rounds,
wall and CPU time; then each variant's peak resident memory (VmHWM) over its setup, in a process of its own, and
the bytes it reports holding (``extra_bytes``).

    python bench/cheap_gr.py --parts reuse --variant reuse      # -> <device>_cheap_gr_reuse.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Run, peak_rss_bytes, sync, tensor_bytes  # noqa: E402

from grkernels import GradReg, head_param_groups, head_perturbed_pass, paper_exclude  # noqa: E402
from grkernels.backends.arith import accum_dtype  # noqa: E402
from grkernels.backends.base import Shards  # noqa: E402
from grkernels.head import HEAD_KEY  # noqa: E402
from grkernels.quickstart import TinyLM, markov_batch  # noqa: E402
from grkernels.reuse import CorrectionReuse  # noqa: E402


class Task:
    """A batch of sequences and a per-sequence loss whose mean is the objective (sum of the terms / N)."""

    def __init__(self, kind: str, model: TinyLM, vocab: int, batch: int, length: int, gen: torch.Generator,
                 trans: torch.Tensor) -> None:
        self.kind, self.model, self.vocab = kind, model, vocab
        if kind == "lm":
            self.ids = markov_batch(gen, trans, batch, length + 1)
            self.adv = None
        else:  # sample from the policy; reward: share of even tokens; advantage normalised within the batch
            with torch.no_grad():
                ids = torch.zeros(batch, 1, dtype=torch.long)
                for _ in range(length):
                    probs = torch.softmax(model(ids)[:, -1].float(), -1)
                    ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
            self.ids = ids
            reward = (ids[:, 1:] % 2 == 0).float().mean(1)
            self.adv = (reward - reward.mean()) / (reward.std() + 1e-6)

    def hidden(self, rows: torch.Tensor) -> torch.Tensor:
        """The final hidden states of ``rows`` (TinyLM's forward up to its head)."""
        m, ids = self.model, self.ids[rows][:, :-1]
        x = m.embed(ids) + m.pos(torch.arange(ids.shape[1], device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return m.norm(m.blocks(x, mask=causal, is_causal=True))

    def terms(self, rows: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence loss terms of ``rows`` (divided by the batch size: the batch's loss is their sum); from
        their final ``hidden`` states when given (the head only)."""
        ids = self.ids[rows]
        logits = (self.model(ids[:, :-1]) if hidden is None else self.model.lm_head(hidden)).float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, self.vocab), ids[:, 1:].reshape(-1), reduction="none")
        nll = nll.view(len(rows), -1).mean(1)
        n = self.ids.shape[0]
        return (nll if self.adv is None else -self.adv[rows] * -nll) / n

    def score(self) -> torch.Tensor:
        """What the sub-batch rule ranks by: loss (lm) or |advantage| (pg)."""
        if self.adv is not None:
            return self.adv.abs()
        with torch.no_grad():
            return self.terms(torch.arange(self.ids.shape[0]))


def subset_by_advantage(adv: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    """The demo's ``gr_subset`` rule (grkernels.demo.grpo), restated: the ⌈f·n⌉ sequences with the largest
    |advantage| (in batch order) and their share of Σ|advantage| (the count share when every advantage is 0)."""
    n = adv.numel()
    m = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    top = torch.argsort(adv.abs(), descending=True, stable=True)[:m].sort().values
    total = float(adv.abs().sum())
    return top, min(1.0, float(adv[top].abs().sum()) / total if total > 0 else m / n)


def gr_positions(params: list[torch.Tensor], model: torch.nn.Module) -> list[int]:
    """Positions in ``params`` of the parameters GR covers with ``exclude=paper_exclude(model)``."""
    excluded = {id(p) for p in paper_exclude(model)}
    return [i for i, p in enumerate(params) if id(p) not in excluded]


def backend_name(opt) -> str:
    """The GR-step backend a GradReg ran its last step on ("none" for a plain optimizer or before a GR step)."""
    backend = getattr(getattr(opt, "engine", None), "backend", None)
    return "none" if backend is None else type(backend).__name__


def head_only(opt: GradReg) -> bool:
    return any(g.get(HEAD_KEY, False) for g in opt.param_groups)


def gr_gradient(opt: GradReg, loss_of, n: int, subset: torch.Tensor | None, fraction: float | None = None):
    """One two-phase GR gradient (the optimizer's lr is 0: nothing moves) of the loss ``loss_of(rows)`` (the
    rows' share of the batch's loss, which is the sum over all n rows); sub-batch when ``subset`` is given, with
    ``fraction`` the subset's share (default: its share of the sequences)."""
    everything = torch.arange(n)
    opt.zero_grad()
    if subset is None:
        loss_of(everything).backward()
    else:
        rest = everything[~torch.isin(everything, subset)]
        loss_of(subset).backward()
        opt.mark_subset(fraction if fraction is not None else len(subset) / n)
        if len(rest):
            loss_of(rest).backward()
    opt.perturb()
    loss_of(everything if subset is None else subset).backward()
    opt.restore_and_combine()
    out = [p.grad.detach().clone() for p in opt.optimizer.param_groups[0]["params"]]
    opt.step()  # lr 0: finishes the step, the parameters stay
    return out


def dot(a, b) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def reuse_prediction(c, rho, g1):
    beta = dot(c, g1) / dot(g1, g1)
    d = [ci - beta * gi for ci, gi in zip(c, g1)]
    scale = rho * dot(g1, g1) ** 0.5 / max(dot(d, d) ** 0.5, 1e-300)
    return [scale * di for di in d]


def cos_ratio(a, b) -> tuple[float, float]:
    na, nb = dot(a, a) ** 0.5, dot(b, b) ** 0.5
    return (dot(a, b) / (na * nb) if na > 0 and nb > 0 else 0.0), (na / nb if nb > 0 else float("nan"))


def fidelity(kind: str, args, ks, fracs) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    trans = torch.softmax(3.0 * torch.randn(args.vocab, args.vocab, generator=gen), dim=-1)
    model = TinyLM(args.vocab, args.dim, args.layers, max(1, args.dim // 32), args.length + 1, dropout=0.0)
    params = list(model.parameters())
    gr_kw = dict(strength=args.strength, eps=args.eps, eps_mode="radius", exclude=paper_exclude(model),
                 rounding="nearest")
    probe = GradReg(torch.optim.SGD(params, lr=0.0), **gr_kw)
    gr_ids = gr_positions(params, model)
    base = torch.optim.AdamW(params, lr=args.lr)
    stored = {k: None for k in ks}  # k -> (c, rho) of the last full step
    rows: dict[str, list[tuple[float, float]]] = {}
    for step in range(args.steps):
        task = Task(kind, model, args.vocab, args.batch, args.length, gen, trans)
        probe.zero_grad()
        task.terms(torch.arange(args.batch)).sum().backward()
        g1 = [params[i].grad.detach().clone() for i in gr_ids]
        loss_of = lambda rows: task.terms(rows).sum()  # noqa: E731
        full = gr_gradient(probe, loss_of, args.batch, None)
        c = [full[i] - g for i, g in zip(gr_ids, g1)]
        if dot(g1, g1) == 0:  # pg: every sample got the same reward, so no advantage and no gradient
            continue
        record_reuse(rows, stored, ks, step, g1, c)
        score = task.score()
        order = torch.argsort(score, descending=True)
        for f in fracs:
            m = max(1, round(f * args.batch))
            rule = "advantage" if kind == "pg" else "loss"
            top = order[:m]
            share = float(score[top].sum() / score.sum())  # the subset's share of the ranked mass
            choices = ((f"{rule}-count", top, None), (f"{rule}-share", top, share),
                       ("random", torch.randperm(args.batch, generator=gen)[:m], None))
            record_subsets(rows, f, choices, probe, loss_of, args.batch, gr_ids, g1, c)
        # The trajectory follows full GR.
        for p, g in zip(params, full):
            p.grad = g
        base.step()
    return summary(rows)


def record_reuse(rows: dict, stored: dict, ks, step: int, g1, c) -> None:
    """Every-k modes at ``step``: the full correction at steps t ≡ 0 mod k (cos 1), else the one stored at the
    last full step, reused as GradReg does (orthogonal) or nothing (none: cos 0)."""
    for k in ks:
        if step % k == 0:
            beta = dot(c, g1) / dot(g1, g1)
            perp = [ci - beta * gi for ci, gi in zip(c, g1)]
            stored[k] = (c, (dot(perp, perp) / dot(g1, g1)) ** 0.5)
            orth = none = (1.0, 1.0)
        else:
            orth = cos_ratio(reuse_prediction(*stored[k], g1), c) if stored[k] else (0.0, 0.0)
            none = (0.0, 0.0)
        rows.setdefault(f"every{k}-orthogonal", []).append(orth)
        rows.setdefault(f"every{k}-none", []).append(none)


def record_subsets(rows: dict, f: float, choices, probe: GradReg, loss_of, n: int, gr_ids, g1, c) -> None:
    """Sub-batch modes: (name, subset rows, fraction passed to mark_subset or None for the count share)."""
    for name, subset, frac in choices:
        sub = gr_gradient(probe, loss_of, n, subset, frac)
        rows.setdefault(f"subset{f:g}-{name}", []).append(cos_ratio([sub[i] - g for i, g in zip(gr_ids, g1)], c))


def summary(rows: dict) -> dict:
    """Per mode over the steps: mean and min cos to the full correction, mean norm ratio."""
    return {name: {"mean_cos": statistics.fmean(v[0] for v in vals), "min_cos": min(v[0] for v in vals),
                   "mean_norm_ratio": statistics.fmean(v[1] for v in vals), "steps": len(vals)}
            for name, vals in rows.items()}


def world_fidelity(args, ks, fracs) -> dict:
    """Fidelity on the demo's worlds: the demo's GRPO loop trained with full GR (method ``gr``, its defaults but
    γ and the number of steps), every step probed at θ before the update (``run_rl(probe=...)``) as above.
    Sub-batch modes: the sequences with the largest |advantage| (the demo's ``gr_subset`` rule: divided by
    their share of Σ|advantage|, "advantage-share"; or by their share of the sequences, "advantage-count"),
    or a random subset of the same size. Steps of all seeds pooled per world."""
    from grkernels.demo.experiment import ExperimentConfig, setup_seed
    from grkernels.demo.grpo import RLConfig, run_rl

    worlds = tuple(args.worlds.split(","))
    cfg = RLConfig(method="gr", gamma=args.world_gamma, steps=args.world_steps)
    rows: dict[str, dict] = {w: {} for w in worlds}
    for seed in range(args.seed, args.seed + args.world_seeds):
        setup = setup_seed(ExperimentConfig(worlds=worlds), seed)
        for w in worlds:
            state: dict = {"step": 0}
            gen = torch.Generator().manual_seed(seed)

            def probe(policy, loss_of, adv, w=w, state=state, gen=gen) -> None:
                if "opt" not in state:
                    params = list(policy.parameters())
                    opt = GradReg(torch.optim.SGD(params, lr=0.0), strength=cfg.gamma, eps=cfg.eps,
                                  eps_mode="absolute", g1_clip=cfg.g1_clip, g2_clip=cfg.g2_clip,
                                  exclude=paper_exclude(policy), seed=seed)
                    state.update(params=params, opt=opt, stored={k: None for k in ks},
                                 gr_ids=gr_positions(params, policy))
                params, opt, gr_ids = state["params"], state["opt"], state["gr_ids"]
                saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
                g1 = [saved[i] for i in gr_ids]
                n = adv.numel()
                full = gr_gradient(opt, loss_of, n, None)
                c = [full[i] - g for i, g in zip(gr_ids, g1)]
                if dot(g1, g1) > 0:  # else every group got one reward: no gradient
                    record_reuse(rows[w], state["stored"], ks, state["step"], g1, c)
                    for f in fracs:
                        top, share = subset_by_advantage(adv, f)
                        rand = torch.randperm(n, generator=gen)[: len(top)].sort().values
                        choices = (("advantage-share", top, share), ("advantage-count", top, None),
                                   ("random", rand, None))
                        record_subsets(rows[w], f, choices, opt, loss_of, n, gr_ids, g1, c)
                for p, g in zip(params, saved):  # the demo's step continues from g1
                    p.grad = g
                state["step"] += 1

            ws = setup["worlds"][w]
            run_rl(ws["world"], ws["policy"], ws["rm"], cfg, seed, probe=probe)
    return {w: summary(r) for w, r in rows.items()}


def cost(args, ks, fracs) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed)
    trans = torch.softmax(3.0 * torch.randn(args.vocab, args.vocab, generator=gen), dim=-1)
    model = TinyLM(args.vocab, args.dim, args.layers, max(1, args.dim // 32), args.length + 1, dropout=0.0)
    task = Task("lm", model, args.vocab, args.batch, args.length, gen, trans)
    model.to(args.device)
    task.ids = task.ids.to(args.device)
    n = args.batch
    everything = torch.arange(n)

    size = max(1, n // args.micro)  # micro-batch size, the same in every mode (CPU speed depends on it)

    def chunks(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rows.split(size) if len(rows) else ()

    def run(opt, subset_frac: float | None) -> float:
        """One step; returns the seconds spent inside GradReg's bookkeeping calls (mark_subset, perturb,
        combine), i.e. everything but the passes and the base optimizer's step."""
        clock = time.perf_counter
        opt.zero_grad()
        if not isinstance(opt, GradReg):  # the plain step: the base optimizer alone
            for mb in chunks(everything):
                task.terms(mb).sum().backward()
            opt.step()
            return 0.0
        if head_only(opt):  # GR on the head only, its perturbed pass from the cached hidden states
            hiddens = []
            for mb in chunks(everything):
                hiddens.append(task.hidden(mb))
                task.terms(mb, hiddens[-1]).sum().backward()
            t0 = clock()
            head_perturbed_pass(opt, torch.cat(hiddens), lambda h: task.terms(everything, h).sum())
            opt.combine()
            inside = clock() - t0  # includes the head's forward/backward at θ'
            opt.step()
            return inside
        m = n if subset_frac is None or not opt.active else max(1, round(subset_frac * n))
        for mb in chunks(everything[:m]):
            task.terms(mb).sum().backward()
        inside = 0.0
        if m < n:
            t0 = clock()
            opt.mark_subset(m / n)
            inside += clock() - t0
            for mb in chunks(everything[m:]):
                task.terms(mb).sum().backward()
        for _ in range(opt.extra_passes):
            t0 = clock()
            opt.perturb()
            inside += clock() - t0
            for mb in chunks(everything[:m]):
                task.terms(mb).sum().backward()
        t0 = clock()
        opt.combine()
        inside += clock() - t0
        opt.step()
        return inside

    modes = [("plain", None, {}), ("gradreg-off", None, {}), ("full", None, {})]
    modes += [(f"every{k}-orthogonal", None, {"every": k, "reuse": "orthogonal"}) for k in ks if k > 1]
    modes += [(f"subset{f:g}", f, {}) for f in fracs]
    modes += [("head-only", None, {})]
    cycle = max(ks)
    n_params = sum(p.numel() for p in model.parameters())
    opts = []
    for name, frac, kw in modes:
        strength = 0.0 if name == "gradreg-off" else args.strength  # GradReg at γ = 0: its plain-step overhead
        params = head_param_groups(model, strength) if name == "head-only" else model.parameters()
        opt = GradReg(torch.optim.AdamW(params, lr=1e-6), strength=strength, eps=args.eps, eps_mode="radius",
                      exclude=None if name == "head-only" else paper_exclude(model), backend=args.backend, **kw)
        if name == "plain":
            opt = opt.optimizer
        for _ in range(cycle):
            run(opt, frac)  # warm-up cycle
        opts.append(opt)
    times: list[list[float]] = [[] for _ in modes]
    inside: list[list[float]] = [[] for _ in modes]
    for _ in range(args.repeats):  # round robin: a load change on a shared machine hits every mode alike
        for i, ((_, frac, _), opt) in enumerate(zip(modes, opts)):
            sync(args.device)
            t0 = time.perf_counter()
            spent = sum(run(opt, frac) for _ in range(cycle))
            sync(args.device)
            times[i].append((time.perf_counter() - t0) / cycle)
            inside[i].append(spent / cycle)
    rows = [{"mode": name, "median_step_s": statistics.median(t), "median_bookkeeping_s": statistics.median(b),
             "backend": backend_name(opt),
             "extra_bytes_per_param": opt.extra_memory_bytes() / n_params if isinstance(opt, GradReg) else 0.0}
            for (name, _, _), opt, t, b in zip(modes, opts, times, inside)]
    # Ratios per repeat (each mode against the plain step of the same round), then the median: a load change
    # between rounds cancels.
    for r, t, b in zip(rows, times, inside):
        r["ratio"] = statistics.median(x / p for x, p in zip(t, times[0]))
        r["bookkeeping_ratio"] = statistics.median(x / p for x, p in zip(b, times[0]))
    return rows


# ------------------------------------------------------------------------------ the reuse arithmetic alone
# The 0.2.0 implementation of grkernels.reuse.CorrectionReuse (flat copies of g1 and c, a materialised d and
# prediction), kept HERE ONLY as the baseline of the "reuse" part. Not used anywhere else.
def _old_flat(tensors, dtype):
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


def _old_storage_dtype(tensors):
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else accum_dtype(tensors)


def _old_unit_scale(x, shards):
    sq = shards.sum_across(torch._foreach_norm([x], 2, dtype=torch.float64)[0].square())
    exp = torch.frexp(sq.sqrt())[1].clamp(-126, 126)
    one = torch.ones((), dtype=torch.float64, device=sq.device)
    return torch.where(torch.isfinite(sq) & (sq > 0), torch.ldexp(one, -exp), one)


class OldFlatCorrectionReuse:
    """grkernels.reuse.CorrectionReuse as of 0.2.0 (flat layout), for the comparison only."""

    def __init__(self) -> None:
        self._c = None
        self._index, self._shapes = (), []
        self._rho = self._gamma = self._g1 = self._pred = self._undo = None

    @property
    def ready(self) -> bool:
        return self._rho is not None

    def _fields(self):
        return self._c, self._index, self._shapes, self._rho, self._gamma

    def commit(self) -> None:
        self._undo = None

    def extra_bytes(self) -> int:
        held = [t for t in (self._c, self._g1, self._pred) if t is not None]
        if self._undo is not None and self._undo[0] is not None:
            held.append(self._undo[0])
        return sum(t.numel() * t.element_size() for t in held)

    def _segments(self, positions, g1):
        if not self.ready:
            return None
        if tuple(positions) == self._index and self._shapes == [g.shape for g in g1]:
            return self._c
        stored = dict(zip(self._index, zip(self._c.split([s.numel() for s in self._shapes]), self._shapes)))
        parts, hit = [], False
        for i, g in zip(positions, g1):
            seg = stored.get(i)
            if seg is not None and seg[1] == g.shape:
                parts.append(seg[0])
                hit = True
            else:
                parts.append(self._c.new_zeros(g.numel()))
        return torch.cat(parts) if hit else None

    def _direction(self, g1, c, shards):
        dtype = g1.dtype
        tiny = torch.finfo(dtype).tiny
        s_g, s_c = _old_unit_scale(g1, shards), _old_unit_scale(c, shards)
        a = g1 * s_g.to(dtype)
        c = c.to(dtype) * s_c.to(dtype)
        a_sq = shards.sum_across(torch.dot(a, a))
        beta = shards.sum_across(torch.dot(c, a)) / a_sq.clamp_min(tiny)
        d = a.mul_(-beta).add_(c)
        d_norm = shards.sum_across(torch.dot(d, d)).sqrt()
        return d.mul_(self._rho.to(dtype) * a_sq.sqrt() / d_norm.clamp_min(tiny)), a_sq, s_g

    @torch.no_grad()
    def capture(self, params, positions, shards) -> None:
        g1 = [shards.local(p.grad) for p in params]
        self._g1 = _old_flat(g1, _old_storage_dtype(g1))
        c = self._segments(positions, g1)
        self._pred = None if c is None else self._direction(self._g1.to(accum_dtype(g1)), c, shards)[0]

    @torch.no_grad()
    def store(self, params, positions, shards, finite, gamma):
        self._undo = self._fields()
        grads = [shards.local(p.grad) for p in params]
        g1, self._g1 = self._g1, None
        c_new = _old_flat(grads, g1.dtype).sub_(g1)
        dtype = accum_dtype(grads)
        tiny = torch.finfo(dtype).tiny
        s_g, s_c = _old_unit_scale(g1, shards), _old_unit_scale(c_new, shards)
        c, g1 = c_new.to(dtype) * s_c.to(dtype), g1.to(dtype) * s_g.to(dtype)
        g1_sq = shards.sum_across(torch.dot(g1, g1))
        c_dot = shards.sum_across(torch.dot(c, g1))
        c_sq = shards.sum_across(torch.dot(c, c))
        perp_sq = (c_sq - c_dot.square() / g1_sq.clamp_min(tiny)).clamp_min(0)
        rho_new = perp_sq.sqrt() / g1_sq.sqrt().clamp_min(tiny)
        rho_new = (rho_new.double() * (s_g / s_c)).to(dtype)
        out = {}
        if self._pred is not None:
            num = shards.sum_across(torch.dot(self._pred, c))
            den = (shards.sum_across(torch.dot(self._pred, self._pred)) * c_sq).sqrt().clamp_min(tiny)
            out["reuse_cos"] = num / den
        self._pred = None
        old = self._segments(positions, grads)
        finite = finite.to(c_new.device)
        self._c = torch.where(finite, c_new, torch.zeros_like(c_new) if old is None else old.to(c_new.dtype))
        rho_old = torch.zeros_like(rho_new) if old is None else self._rho.to(rho_new)
        self._rho = torch.where(finite, rho_new, rho_old)
        gamma_new = torch.tensor(gamma, dtype=torch.float64, device=c_new.device)
        self._gamma = gamma_new if self._gamma is None else torch.where(finite, gamma_new, self._gamma)
        self._index, self._shapes = tuple(positions), [g.shape for g in grads]
        return out

    @torch.no_grad()
    def apply(self, params, positions, gamma, shards):
        g1 = [shards.local(p.grad) for p in params]
        c = self._segments(positions, g1) if g1 else None
        if c is None:
            return {}, []
        dtype = accum_dtype(g1)
        flat_g1 = _old_flat(g1, dtype)
        sizes = [g.numel() for g in g1]
        if all(g.dtype == dtype for g in g1):
            undo = [(g, x.view(g.shape)) for g, x in zip(g1, flat_g1.split(sizes))]
        else:
            undo = [(g, g.clone()) for g in g1]
        corr, g1_sq, s_g = self._direction(flat_g1, c, shards)
        corr.mul_((gamma / self._gamma).to(dtype))
        rel = shards.sum_across(torch.dot(corr, corr)).sqrt() / g1_sq.sqrt().clamp_min(torch.finfo(dtype).tiny)
        corr.div_(s_g.to(dtype))
        parts = corr.to(_old_storage_dtype(g1)).split(sizes)
        torch._foreach_add_(g1, [x.view(g.shape) for x, g in zip(parts, g1)])
        return {"gr_rel": rel}, undo


REUSE_VARIANTS = ("old-flat", "new-torch", "new-cpp")


def make_reuse(variant: str):
    """The reuse state of a variant of the "reuse" part: the 0.2.0 flat code, the torch reference, the C++ passes."""
    if variant == "old-flat":
        return OldFlatCorrectionReuse()
    return CorrectionReuse("torch" if variant == "new-torch" else "cpp")


class ReuseSetup:
    """``n`` fp32 parameters in ``tensors`` tensors of uneven sizes (a few large, many small, as a transformer's),
    each with a gradient, and the three gradient sets a cycle needs (g1 and GR of a full step, g1 of a step in
    between), made once."""

    def __init__(self, n: int, tensors: int, device: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.rand(tensors, generator=gen, dtype=torch.float64) ** 3 + 0.02
        sizes = (w / w.sum() * n).long().clamp_min(1)
        sizes[0] += n - int(sizes.sum())
        self.sizes = [int(s) for s in sizes]
        self.params = [nn.Parameter(torch.zeros(s, device=device)) for s in self.sizes]

        def grads(scale: float) -> list[torch.Tensor]:
            return [(scale * torch.randn(s, generator=gen)).to(device) for s in self.sizes]

        self.g1_full, self.g1_mid = grads(1.0), grads(1.0)
        self.gr = [g + c for g, c in zip(self.g1_full, grads(0.3))]
        for p, g in zip(self.params, self.g1_full):
            p.grad = g.clone()
        self.positions = list(range(tensors))
        self.shards = Shards()
        self.device = device

    def set_grads(self, values: list[torch.Tensor]) -> None:
        torch._foreach_copy_([p.grad for p in self.params], values)

    def cycle(self, reuse, clock) -> tuple[float, float, float]:
        """One full step's capture and store, one step in between's apply: their seconds (the gradient copies
        between them, which stand for the backward passes, not counted)."""
        self.set_grads(self.g1_full)
        sync(self.device)
        t0 = clock()
        reuse.capture(self.params, self.positions, self.shards)
        sync(self.device)
        t1 = clock()
        self.set_grads(self.gr)
        sync(self.device)
        t2 = clock()
        reuse.store(self.params, self.positions, self.shards, torch.tensor(True, device=self.device), 1.0)
        reuse.commit()
        sync(self.device)
        t3 = clock()
        self.set_grads(self.g1_mid)
        sync(self.device)
        t4 = clock()
        reuse.apply(self.params, self.positions, 1.0, self.shards)
        reuse.commit()
        sync(self.device)
        t5 = clock()
        return t1 - t0, t3 - t2, t5 - t4


def reuse_memory_child(args) -> dict:
    """In a fresh process: the peak resident memory (VmHWM) two reuse cycles of one variant add over the setup's."""
    setup = ReuseSetup(args.reuse_params, args.reuse_tensors, "cpu", args.seed)
    reuse = make_reuse(args.reuse_child)
    base = peak_rss_bytes()
    held_full = held_mid = 0
    for _ in range(2):
        setup.set_grads(setup.g1_full)
        reuse.capture(setup.params, setup.positions, setup.shards)
        setup.set_grads(setup.gr)
        reuse.store(setup.params, setup.positions, setup.shards, torch.tensor(True), 1.0)
        held_full = max(held_full, reuse.extra_bytes())
        reuse.commit()
        setup.set_grads(setup.g1_mid)
        _, undo = reuse.apply(setup.params, setup.positions, 1.0, setup.shards)
        held_mid = max(held_mid, reuse.extra_bytes() + (0 if args.reuse_child != "old-flat" else
                                                         tensor_bytes([g for _, g in undo])))
        del undo
        reuse.commit()
    n = sum(setup.sizes)
    return {"variant": args.reuse_child, "peak_over_setup_bytes": peak_rss_bytes() - base,
            "peak_over_setup_per_param": (peak_rss_bytes() - base) / n,
            "held_after_store_per_param": held_full / n, "held_during_apply_per_param": held_mid / n,
            "held_between_steps_per_param": reuse.extra_bytes() / n}


def reuse_math(args) -> dict:
    """Time of one reuse capture + store (full step) and one apply (step in between) per variant, round-robin,
    medians; then each variant's peak memory in its own process."""
    import json
    import subprocess

    setup = ReuseSetup(args.reuse_params, args.reuse_tensors, args.device, args.seed)
    states = {v: make_reuse(v) for v in REUSE_VARIANTS}
    rows: dict[str, dict[str, list[float]]] = {v: {"capture": [], "store": [], "apply": [],
                                                   "capture_cpu": [], "store_cpu": [], "apply_cpu": []}
                                               for v in REUSE_VARIANTS}
    for r in range(1 + args.repeats):
        for v, reuse in states.items():
            wall = setup.cycle(reuse, time.perf_counter)
            cpu = setup.cycle(reuse, time.process_time)
            if r:
                for k, a, b in zip(("capture", "store", "apply"), wall, cpu):
                    rows[v][k].append(a)
                    rows[v][k + "_cpu"].append(b)
    out = {"params": sum(setup.sizes), "tensors": len(setup.sizes), "threads": torch.get_num_threads(),
           "variants": {}}
    for v in REUSE_VARIANTS:
        med = {k: statistics.median(x) for k, x in rows[v].items()}
        out["variants"][v] = {"median_s": med, "last_path": getattr(states[v], "last_path", "torch (flat)")}
    del setup, states
    if args.device == "cpu":
        # Twice per variant: glibc's default malloc (what a training process sees: freed heap memory it keeps counts
        # until reused), and with a fixed mmap threshold of 64 KiB, so that every tensor of 64 KiB or more is its
        # own mapping, returned when freed: the peak of the live bytes.
        for v in REUSE_VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--reuse-child", v, "--reuse-params",
                   str(args.reuse_params), "--reuse-tensors", str(args.reuse_tensors), "--seed", str(args.seed)]
            for key, env in (("memory", None), ("memory_live", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})):
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                out["variants"][v][key] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the cost part runs (the fidelity parts run on CPU)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each fidelity run")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step in the cost runs")
    ap.add_argument("--strength", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=1e-2, help="perturbation radius (eps_mode='radius')")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", default="2,4,8")
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="cost part: GradReg's backend (auto, torch, cpp, triton)")
    ap.add_argument("--parts", default="fidelity,cost",
                    help="what to run, a comma list: fidelity (small transformer), cost, world (the demo's worlds), "
                         "reuse (the reuse arithmetic alone: old flat code against the torch reference and C++)")
    ap.add_argument("--worlds", default="collapse,rare", help="world part: the demo's worlds")
    ap.add_argument("--world-steps", type=int, default=250, help="world part: RL steps per run (the demo's)")
    ap.add_argument("--world-seeds", type=int, default=1, help="world part: seeds per world (from --seed)")
    ap.add_argument("--world-gamma", type=float, default=10.0, help="world part: γ (the demo's default)")
    ap.add_argument("--reuse-params", type=int, default=18_600_000, help="reuse part: fp32 parameters")
    ap.add_argument("--reuse-tensors", type=int, default=40, help="reuse part: tensors they are split into")
    ap.add_argument("--reuse-child", default=None, choices=REUSE_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help="suffix of the result file: <device>_cheap_gr_<variant>.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.reuse_child is not None:  # the reuse part's memory probe, in its own process
        torch.set_num_threads(1)
        import json

        print(json.dumps(reuse_memory_child(args)))
        return 0
    if args.device == "cuda" and args.parts not in ("cost", "reuse"):
        ap.error("--device cuda times the cost part only: add --parts cost")
    if args.device == "cpu":
        torch.set_num_threads(1)
    run = Run("cheap_gr", args.device, argv)
    ks = [int(k) for k in args.every.split(",")]
    fracs = [float(f) for f in args.fractions.split(",")]
    t0 = time.perf_counter()
    result = {"config": vars(args),
              "fidelity": {kind: fidelity(kind, args, ks, fracs) for kind in ("lm", "pg")}
              if "fidelity" in args.parts else {},
              "cost": cost(args, ks, fracs) if "cost" in args.parts else [],
              "world_fidelity": world_fidelity(args, ks, fracs) if "world" in args.parts else {},
              "reuse_math": reuse_math(args) if "reuse" in args.parts.split(",") else {}}
    result["seconds"] = time.perf_counter() - t0
    print("fidelity (mean cos to the full correction, min cos, mean norm ratio)")
    for kind, table in (*result["fidelity"].items(), *result["world_fidelity"].items()):
        for name, r in table.items():
            print(f"  {kind:<8} {name:<27} {r['mean_cos']:>6.3f} {r['min_cos']:>7.3f} {r['mean_norm_ratio']:>7.3f}")
    print("cost (time per step over a plain step, same loop)")
    for r in result["cost"]:
        print(f"  {r['mode']:<22} {1e3 * r['median_step_s']:>8.2f} ms {r['ratio']:>6.2f}x "
              f"(bookkeeping {r['bookkeeping_ratio']:.3f}x, {r['backend']}) {r['extra_bytes_per_param']:>5.1f} B/param")
    if result["reuse_math"]:
        rm = result["reuse_math"]
        print(f"reuse arithmetic at {rm['params'] / 1e6:.1f}M fp32 parameters in {rm['tensors']} tensors, "
              f"{rm['threads']} thread(s): median ms (wall / CPU), peak and held bytes per parameter")
        for v, r in rm["variants"].items():
            m, mem = r["median_s"], r.get("memory", {})
            print(f"  {v:<10} capture {1e3 * m['capture']:7.1f} / {1e3 * m['capture_cpu']:7.1f}  "
                  f"store {1e3 * m['store']:7.1f} / {1e3 * m['store_cpu']:7.1f}  "
                  f"apply {1e3 * m['apply']:7.1f} / {1e3 * m['apply_cpu']:7.1f}  "
                  f"peak {mem.get('peak_over_setup_per_param', float('nan')):5.2f} B "
                  f"(live {r.get('memory_live', {}).get('peak_over_setup_per_param', float('nan')):5.2f} B)  "
                  f"held {mem.get('held_between_steps_per_param', float('nan')):4.1f} B ({r['last_path']})")
    run.write(result, args.out, args.variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
