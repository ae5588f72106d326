"""Which parameters take part in GR: ``exclude`` lists and the paper's default (embeddings and output head)."""

from __future__ import annotations

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
