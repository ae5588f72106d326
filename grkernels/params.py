"""Which parameters take part in GR: ``exclude`` lists and the paper's default (embeddings and output head)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

# Name substrings of the paper's default exclusion, for callers that only have names (e.g. TRL configs).
PAPER_EXCLUDE_NAMES: tuple[str, ...] = ("embed", "wte", "wpe", "lm_head")


def paper_exclude(model: nn.Module) -> list[torch.Tensor]:
    """Parameters the GR paper leaves out of GR: every ``nn.Embedding`` (token, position, type embeddings), the
    model's output embeddings (``get_output_embeddings()`` on Hugging Face models) and parameters named ``lm_head``.

    Including them can make the GR correction dominate the gradient: in a toy GRPO run measured while planning at
    γ = 100, the output head's curvature made ‖GR − g1‖ 80–120× ‖g1‖ and training broke down.
    """
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for p in module.parameters(recurse=False):
                found[id(p)] = p
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module):
        for p in head.parameters():
            found[id(p)] = p
    for name, p in model.named_parameters():
        if "lm_head" in name:
            found[id(p)] = p
    return list(found.values())


def resolve_exclude(
    exclude: Iterable[torch.Tensor | str] | None,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
    optimized: Iterable[torch.Tensor] | None = None,
) -> set[int]:
    """ids of the excluded parameters. Strings are name substrings and need ``named_parameters``.

    With ``optimized`` (the optimizer's parameters) every entry must name at least one of them, or only frozen
    parameters (``nn.Parameter`` with ``requires_grad=False``, which never get a gradient, e.g. ``paper_exclude``
    of a model with frozen embeddings): an entry that names something else (a copy, ``.data``, another model's
    parameter) would otherwise be ignored without a word.
    """
    if exclude is None:
        return set()
    if isinstance(exclude, (str, torch.Tensor)):
        exclude = [exclude]
    named = list(named_parameters) if named_parameters is not None else None
    opt_ids = None if optimized is None else {id(p) for p in optimized}
    ids: set[int] = set()
    for item in exclude:
        if isinstance(item, torch.Tensor):
            matched = [item]
            what = f"exclude tensor of shape {tuple(item.shape)}"
        elif isinstance(item, str):
            if named is None:
                raise ValueError(
                    f"GradReg: exclude={item!r} is a name substring, so GradReg needs the names: pass "
                    "named_parameters=model.named_parameters() (or exclude the tensors themselves)."
                )
            matched = [p for n, p in named if item in n]
            if not matched:
                raise ValueError(f"GradReg: exclude substring {item!r} matches no parameter name")
            what = f"exclude substring {item!r}"
        else:
            raise TypeError(f"GradReg: exclude items must be tensors or name substrings, got {type(item).__name__}")
        frozen = all(isinstance(p, nn.Parameter) and not p.requires_grad for p in matched)
        if opt_ids is not None and not frozen and not any(id(p) in opt_ids for p in matched):
            raise ValueError(
                f"GradReg: {what} names no parameter of the wrapped optimizer (a copy, .data, or another model's "
                "tensor?); pass the optimizer's own parameters"
            )
        ids.update(id(p) for p in matched)
    return ids


# Layer indices in parameter names: Hugging Face decoders (model.layers.3.), GPT-2 (h.3.), BERT (layer.3.),
# and the common blocks.3. / layers.3. of hand-written models.
LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\."


def depth_param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    strength: float,
    *,
    ramp: tuple[float, float] = (0.0, 1.0),
    layers: Iterable[int] | None = None,
    rest: float = 1.0,
    pattern: str = LAYER_PATTERN,
    **group_options,
) -> list[dict]:
    """Param groups whose GR strength depends on depth: ``gr_strength`` = γ·scale(layer), for layer-targeted GR.

    With L numbered layers (found by ``pattern`` in the names, index i = 0 … L−1):
    - default, a linear ramp: scale(i) = ramp[0] + (ramp[1] − ramp[0])·i/(L − 1) (0 in the first layer, 1 in the
      last, as a public report found needed on a Qwen model: uniform GR caused repetition loops);
    - ``layers=[...]``: scale 1 in those layers, 0 elsewhere.
    Parameters outside numbered layers (embeddings, final norm, head) get scale ``rest``. A group with scale 0 has
    ``gr_enabled=False`` (its parameters get plain g1 and cost nothing). ``group_options`` (lr, weight_decay ...)
    go into every group. One group per distinct strength, in order of first appearance.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    regex = re.compile(pattern)
    depth = {}
    for n, _ in named:
        m = regex.search(n)
        if m:
            depth[n] = int(m.group(1))
    if not depth:
        raise ValueError(f"depth_param_groups: no parameter name matches the layer pattern {pattern!r}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"depth_param_groups: strength must be a finite number >= 0, got {strength}")
    last = max(depth.values())
    chosen = None if layers is None else set(layers)
    if chosen is not None and not chosen <= set(depth.values()):
        raise ValueError(f"depth_param_groups: layers {sorted(chosen - set(depth.values()))} do not exist "
                         f"(layers found: 0 … {last})")

    def scale(name: str) -> float:
        if name not in depth:
            return rest
        i = depth[name]
        if chosen is not None:
            return 1.0 if i in chosen else 0.0
        return ramp[0] + (ramp[1] - ramp[0]) * (i / last if last else 1.0)

    groups: dict[float, dict] = {}
    for n, p in named:
        s = scale(n)
        group = groups.setdefault(s, {"params": [], "gr_strength": strength * s, "gr_enabled": s != 0.0,
                                      **group_options})
        group["params"].append(p)
    return list(groups.values())
