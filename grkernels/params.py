"""Which parameters take part in GR: ``exclude`` lists and the paper's default (embeddings and output head)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

# Name substrings of the paper's default exclusion, for callers that only have names (e.g. TRL configs).
PAPER_EXCLUDE_NAMES: tuple[str, ...] = ("embed", "wte", "wpe", "lm_head")


#: Names (the last part of a module's name) of output heads in hand-written models.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "out", "output", "output_layer", "unembed")


def _in_layer_stack(name: str) -> bool:
    """Whether a module sits inside a numbered block (``blocks.3.attn.out``): an attention's ``out`` projection
    there is not the model's head. The last part may be a number (``net.4``: the last layer of a Sequential)."""
    return any(part.isdigit() for part in name.split(".")[:-1])


def paper_exclude(model: nn.Module) -> list[torch.Tensor]:
    """Parameters the GR paper leaves out of GR: the input embeddings and the output head.

    Found as: every ``nn.Embedding`` (token, position, type embeddings); the model's output embeddings
    (``get_output_embeddings()`` on Hugging Face models) and parameters named ``lm_head``; and in other models the
    output head, an ``nn.Linear`` outside the numbered blocks that is named like one (the last part of its name in
    :data:`HEAD_NAMES`: ``head``, ``out``, ``output`` ...) or that projects onto the vocabulary (``out_features``
    equal to an embedding's ``num_embeddings``). Warns when it finds nothing at all to exclude (GR then covers
    every parameter, the head included): pass ``exclude=`` explicitly.

    Including them can make the GR correction dominate the gradient: in a toy GRPO run measured while planning at
    γ = 100, the output head's curvature made ‖GR − g1‖ 80–120× ‖g1‖ and training broke down.
    """
    found: dict[int, torch.Tensor] = {}
    vocab: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            vocab.add(module.num_embeddings)
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
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and not _in_layer_stack(name)
                and (name.rsplit(".", 1)[-1] in HEAD_NAMES or module.out_features in vocab)):
            for p in module.parameters(recurse=False):
                found[id(p)] = p
    if not found:
        warnings.warn(
            f"paper_exclude({type(model).__name__}): found no embedding and no output head (no nn.Embedding, no "
            f"get_output_embeddings(), no nn.Linear named {'/'.join(HEAD_NAMES)} outside the numbered blocks), so "
            "it excludes nothing and GR covers every parameter, the output layer included. Pass exclude= the "
            "output layer's parameters (GR on the head can break training)", UserWarning, stacklevel=2)
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
