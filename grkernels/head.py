"""Head-only GR: gradient regularization of the output head alone, whose perturbed pass reuses the hidden states
of the pass at θ instead of rerunning the model (logits-SAM style: the trunk is never run twice).

When GR's parameter set is the output head W only (every other parameter has ``gr_enabled=False``), and the final
hidden states h do not depend on W:

    L(θ) = ℓ(head_W(h)),   g1_W = ∇_W ℓ(head_W(h)),   v = clip(g1_W)
    g2_W = ∇_W ℓ(head_{W + ε·v}(h))                  (h unchanged: only W moved, and h does not depend on W)
    grad_W = g1_W + (γ/ε)·(clip(g2_W) − v),    grad of every other parameter = its g1

So the perturbed pass is ``loss_from_hidden(h.detach())`` at the perturbed head: one head forward/backward, no
trunk. This is the same g2 GradReg gets from a full second pass (bit for bit on a deterministic device: the same
ops on the same h), not an approximation, under three conditions:

1. GR's parameters are head parameters only (a trunk parameter in GR would get g2 = 0 from this pass, silently
   wrong): :func:`head_perturbed_pass` checks it against the groups :func:`head_param_groups` marks, or ``head=``.
2. h does not depend on a GR parameter: refused for tied input/output embeddings (W is then also the embedding
   table and moving it changes h) by :func:`head_param_groups` (by tensor identity and storage), and checked again
   per step on h's autograd graph (no GR parameter may be an ancestor of h).
3. ``loss_from_hidden`` computes the same loss from h as the full pass does (including any randomness in the head
   part: pass ``rng=`` to replay it), and the loss depends on the GR parameters only through it.

Use (two-phase loop, any base optimizer):

    opt = GradReg(torch.optim.AdamW(head_param_groups(model, strength=1.0), lr=1e-5), strength=1.0)
    hidden = trunk(batch)                              # e.g. the final norm's output
    loss = loss_from_hidden(hidden); loss.backward()   # g1 for every parameter
    if opt.active:
        head_perturbed_pass(opt, hidden, loss_from_hidden)
    opt.combine(); opt.step()                          # or clip in between

or ``head_gr_step(opt, lambda: trunk(batch), loss_from_hidden)`` for the whole step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from grkernels.optim import GradReg
from grkernels.rng import RNGState

HEAD_KEY = "gr_head"  # param-group marker set by head_param_groups: the group of the output head's parameters


def find_head(model: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """The output head of ``model``: ``head`` when given (it must be a submodule of ``model``), else
    ``model.get_output_embeddings()`` when it returns a module, else the one submodule named ``lm_head``."""
    if head is not None:
        if not isinstance(head, nn.Module):
            raise TypeError(f"head_param_groups: head must be an nn.Module, got {type(head).__name__}")
        if not any(m is head for m in model.modules()):
            raise ValueError("head_param_groups: the head module passed is not a submodule of the model")
        return head
    get_out = getattr(model, "get_output_embeddings", None)
    found = get_out() if callable(get_out) else None
    if isinstance(found, nn.Module):
        return found
    named = [m for n, m in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"head_param_groups: {len(named)} modules are named lm_head; pass the output head as head=")
    raise ValueError(
        "head_param_groups: no output head found (model.get_output_embeddings() gives none and no module is named "
        "lm_head); pass the output head module as head="
    )


def _check_untied(model: nn.Module, head: nn.Module) -> None:
    """Refuse a head parameter that is also a parameter of a module outside the head (tied embeddings), by tensor
    identity or by shared storage (two Parameter objects over one buffer)."""
    inside = {id(m) for m in head.modules()}
    own = {id(p) for p in head.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in head.parameters() if p.numel()}
    others: list[tuple[str, nn.Module]] = list(model.named_modules(remove_duplicate=False))
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, nn.Module):
        others.append(("get_input_embeddings()", emb))
    for mname, module in others:
        if id(module) in inside:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in own or (p.numel() and p.untyped_storage().data_ptr() in storages):
                where = f"{mname}.{pname}" if mname else pname
                raise ValueError(
                    f"head-only GR: the output head's weight is shared with {where!r} (tied input/output "
                    "embeddings), so perturbing the head also changes the hidden states and the head-only pass "
                    "would give a wrong g2. Untie the embeddings (e.g. tie_word_embeddings=False, or copy the "
                    "weight into a separate head), or use full GR (a GradReg whose perturbed pass reruns the model)"
                )


def head_param_groups(model: nn.Module, strength: float, head: nn.Module | None = None,
                      **group_options) -> list[dict]:
    """Param groups for the base optimizer of head-only GR: the output head's parameters with
    ``gr_strength=strength`` (and the marker ``gr_head=True``), every other trainable parameter in one group with
    ``gr_enabled=False`` (it gets plain g1 and costs nothing). Each trainable parameter appears exactly once;
    frozen ones (``requires_grad=False``) are left out. ``group_options`` (lr, weight_decay ...) go into both.

    The head is ``head`` or :func:`find_head`'s choice. Raises ValueError for a bad strength, no head found, a
    head without trainable parameters, or a head weight shared with another module (tied embeddings).
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            math.isfinite(strength) and strength >= 0):
        raise ValueError(f"head_param_groups: strength must be a finite number >= 0, got {strength!r}")
    for key in ("params", "gr_strength", "gr_enabled", HEAD_KEY):
        if key in group_options:
            raise ValueError(f"head_param_groups: {key!r} is set by head_param_groups, not a group option")
    head = find_head(model, head)
    _check_untied(model, head)
    head_params = [p for p in head.parameters() if p.requires_grad]
    if not head_params:
        raise ValueError("head_param_groups: the output head has no trainable parameter")
    ids = {id(p) for p in head_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": head_params, "gr_strength": float(strength), HEAD_KEY: True, **group_options}]
    if rest:
        groups.append({"params": rest, "gr_enabled": False, **group_options})
    return groups


def _gr_parameters(opt: GradReg) -> list[torch.Tensor]:
    """The parameters GR perturbs this step: GR candidates (γ > 0, GR on, not excluded) that have a gradient."""
    return opt.gr_parameters()


def _allowed(opt: GradReg, head: nn.Module | Iterable[torch.Tensor] | None) -> set[int]:
    if head is None:
        allowed = {id(p) for g in opt.param_groups if g.get(HEAD_KEY, False) for p in g["params"]}
        if not allowed:
            raise ValueError(
                "head_perturbed_pass: the optimizer has no head group (built with head_param_groups); pass the "
                "head module (or its parameters) as head="
            )
        return allowed
    params = head.parameters() if isinstance(head, nn.Module) else head
    return {id(p) for p in params}


def _ancestors_hit(hidden: torch.Tensor, targets: set[int]) -> bool:
    """Whether a leaf in ``targets`` (by id) is an ancestor of ``hidden`` in its autograd graph (the graph's nodes
    stay walkable after its backward freed the saved tensors)."""
    if hidden.grad_fn is None:
        return id(hidden) in targets
    seen: set = set()
    stack = [hidden.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if var is not None and id(var) in targets:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def check_head_only(opt: GradReg, hidden: torch.Tensor | None = None,
                    head: nn.Module | Iterable[torch.Tensor] | None = None) -> None:
    """Raise unless a head-only perturbed pass gives ``opt`` the exact g2 this step: ``opt`` is a GradReg on a
    full GR step with a finite-difference estimator, its GR parameters (with a gradient) are head parameters (the
    ``gr_head`` groups of :func:`head_param_groups`, or ``head``), and none is an ancestor of ``hidden``."""
    if not isinstance(opt, GradReg):
        raise TypeError(f"head-only GR needs a grkernels.GradReg, got {type(opt).__name__}")
    if opt.estimator == "exact":
        raise ValueError("head-only GR: estimator='exact' has no perturbed pass; use 'forward' or 'central'")
    if not opt.active:
        raise RuntimeError("head_perturbed_pass: GR is inactive this step (warmup, γ = 0 or between `every` steps); "
                           "check opt.active first")
    allowed = _allowed(opt, head)
    gr = _gr_parameters(opt)
    if not gr:
        raise RuntimeError("head_perturbed_pass: no GR parameter has a gradient: run the backward at θ first")
    outside = [p for p in gr if id(p) not in allowed]
    if outside:
        shapes = ", ".join(str(tuple(p.shape)) for p in outside[:4])
        raise ValueError(
            f"head_perturbed_pass: {len(outside)} GR parameter(s) are not head parameters (shapes {shapes}"
            f"{' ...' if len(outside) > 4 else ''}); the head-only pass would give them a wrong g2. Build the "
            "optimizer's groups with head_param_groups (GR on the head only, gr_enabled=False elsewhere), or use "
            "the full perturbed pass"
        )
    if hidden is not None and _ancestors_hit(hidden, {id(p) for p in gr}):
        raise ValueError(
            "head_perturbed_pass: the hidden states depend on a GR parameter (tied input/output embeddings, or the "
            "head used inside the trunk), so perturbing it changes them and the cached hidden states would give a "
            "wrong g2. Untie the head, or use the full perturbed pass"
        )


def head_perturbed_pass(opt: GradReg, hidden: torch.Tensor, loss_from_hidden: Callable[[torch.Tensor], torch.Tensor],
                        *, head: nn.Module | Iterable[torch.Tensor] | None = None, rng: RNGState | None = None,
                        check_graph: bool = True) -> torch.Tensor:
    """The perturbed pass(es) of a head-only GR step from the cached hidden states: after the backward at θ, for
    each of ``opt.extra_passes`` points: ``opt.perturb()`` (W ← W + ε·clip(g1_W); θ' = θ − ε·v for the central
    estimator's second point), then ``loss_from_hidden(hidden.detach()).backward()`` (g2_W; the trunk gets no
    gradient and keeps g1, which is therefore not copied: ``GradReg.perturb(keep_untouched=True)``, which raises
    at the combine if the loss did reach a trunk gradient). Leaves ``opt`` ready for ``opt.combine()`` /
    ``opt.step()``; returns the (detached) loss at the last perturbed point.

    ``hidden``: the final hidden states of the pass at θ (its autograd graph, even freed by the backward, lets
    ``check_graph`` refuse hidden states that depend on a GR parameter). ``head``: the head module or parameters GR
    may cover (default: the groups :func:`head_param_groups` marks). ``rng``: replayed before each pass, for
    randomness (dropout) in the head part of the loss. Any exception leaves θ restored bitwise, ``.grad`` back at
    g1 and ``opt`` idle and usable.
    """
    check_head_only(opt, hidden if check_graph else None, head)
    cached = hidden.detach()
    loss = None
    try:
        for _ in range(opt.extra_passes):
            opt.perturb(keep_untouched=True)  # the trunk's gradients stay g1: no copy of them (checked)
            if rng is not None:
                rng.replay()
            with torch.enable_grad():
                loss = loss_from_hidden(cached)
                loss.backward()
    except BaseException:
        opt.restore()
        raise
    return loss.detach()


def head_gr_step(opt: GradReg, hidden_fn: Callable[[], torch.Tensor],
                 loss_from_hidden: Callable[[torch.Tensor], torch.Tensor], *,
                 head: nn.Module | Iterable[torch.Tensor] | None = None, check_graph: bool = True) -> torch.Tensor:
    """One whole head-only GR step: zero the gradients, ``hidden = hidden_fn()``, the backward of
    ``loss_from_hidden(hidden)`` at θ, the head-only perturbed pass when GR is active (the random generators
    replayed to their state after ``hidden_fn``, so the head part draws the same dropout masks), ``opt.step()``.
    Returns the loss at θ (detached). For a clip between combine and step, use the two-phase calls instead."""
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        hidden = hidden_fn()
        rng = RNGState()
        loss = loss_from_hidden(hidden)
        loss.backward()
    if opt.active:
        head_perturbed_pass(opt, hidden, loss_from_hidden, head=head, rng=rng, check_graph=check_graph)
    opt.step()
    return loss.detach()
