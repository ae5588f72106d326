"""Lean mode's contract with the caller, checked: between ``perturb`` and the combine the GR parameters' gradient
buffers hold −g1 (or −b, b = g1 rounded to bf16) and the backward at θ' must ACCUMULATE onto it.

Anything else that writes a buffer in between — ``zero_grad(set_to_none=False)`` (an in-place zero, also inside
closures), ``copy_``, a host's own reduction — silently breaks the difference g2 − g1 the combine is built on
(the result was 29.5× off). A replaced buffer (``zero_grad(set_to_none=True)``) is seen by its address; an
in-place write by the tensor's version counter, which both a backward accumulation (``grad += new``) and any
in-place write bump. To tell them apart, a hook on each parameter runs before its first accumulation after
``perturb`` and compares the buffer's version with the one recorded at ``perturb``, plus the accumulations
into tensors sharing the buffer's version counter (gradients that are views of one flat buffer, e.g. DDP's
``gradient_as_bucket_view``), counted by post-accumulate-grad hooks. Writes after the first accumulation (a
DDP all-reduce writing the average back) are allowed: from then on the buffer holds −g1 + ∇L(θ'), whatever
writes the sum. Not seen: a buffer the second backward never reaches (its parameters get no hook call), and
parameters the autograd engine does not accumulate into (FSDP2's sharded parameters): their checks pass.

The same record gives lean mode its exact abort: a buffer whose version did not move since ``perturb`` still
holds −g1 exactly (forward estimator), so ``restore`` gives g1 back bitwise by negating it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial

import torch


class LeanGuard:
    """Watches the GR parameters' gradient buffers between ``perturb`` and the combine (see the module)."""

    def __init__(self) -> None:
        self._handles: list = []
        self._versions: list[int] = []
        self._ptrs: list[int] = []
        self._keys: list[int] = []
        self._params: list[weakref.ref] = []
        self._local = None
        self._attr = "grad"
        self._seen: list[bool] = []
        self._acc: dict[int, int] = {}
        self.written: list[int] = []  # indices of parameters whose buffer was written before its accumulation

    def arm(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], local=None,
            attr: str = "grad") -> None:
        """Record the buffers ``grads`` (the local ``getattr(p, attr)`` of ``params``, as perturb left them) and
        hook the parameters. ``local``: maps such a gradient to the tensor in ``grads`` (sharded parameters).
        An ``attr`` other than ``"grad"`` (e.g. ``main_grad``) is accumulated by the host's own hooks, which the
        check cannot tell from a stray write: then record only (a replaced buffer is still seen and an untouched
        one still restores exactly)."""
        self.disarm()
        self._local, self._attr = local, attr
        self._versions = [g._version for g in grads]
        self._ptrs = [g.data_ptr() for g in grads]
        self._keys = [g.untyped_storage().data_ptr() for g in grads]
        self._params = [weakref.ref(p) for p in params]
        self._seen = [False] * len(grads)
        self._acc = dict.fromkeys(self._keys, 0)
        self.written = []
        for i, p in enumerate(params):
            if attr == "grad" and p.requires_grad and p.is_leaf:
                self._handles.append(p.register_hook(partial(self._before, i)))
                self._handles.append(p.register_post_accumulate_grad_hook(partial(self._after, i)))

    def _grad(self, i: int) -> torch.Tensor | None:
        p = self._params[i]()
        g = None if p is None else getattr(p, self._attr, None)
        return g if g is None or self._local is None else self._local(g)

    def _before(self, i: int, grad_in: torch.Tensor) -> None:
        if self._seen[i]:
            return
        self._seen[i] = True
        g = self._grad(i)
        expected = self._versions[i] + self._acc[self._keys[i]]  # plus accumulations into views of its storage
        if g is not None and g.data_ptr() == self._ptrs[i] and g._version != expected:
            self.written.append(i)

    def _after(self, i: int, p: torch.Tensor) -> None:
        self._acc[self._keys[i]] += 1

    def untouched(self, i: int) -> bool:
        """Nothing wrote buffer ``i`` since ``arm`` (it still holds what perturb left there)."""
        g = self._grad(i)
        return g is not None and g.data_ptr() == self._ptrs[i] and g._version == self._versions[i]

    def replaced(self, grads: Sequence[torch.Tensor]) -> bool:
        """Some buffer is another tensor than at ``arm`` (e.g. ``zero_grad(set_to_none=True)`` in between)."""
        return [g.data_ptr() for g in grads] != self._ptrs

    def disarm(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def armed(self) -> bool:
        return bool(self._ptrs)

    def clear(self) -> None:
        """Disarm and forget the record."""
        self.disarm()
        self._versions, self._ptrs, self._keys, self._params, self._seen, self.written = [], [], [], [], [], []

    def violation(self, grads: Sequence[torch.Tensor]) -> RuntimeError | None:
        """The error to raise (after restoring) when the buffers were replaced or written, else None."""
        if self.replaced(grads):
            return RuntimeError(
                "GradReg(lean=True): the gradient buffers were replaced between perturb() and the combine (e.g. "
                "zero_grad(set_to_none=True)); lean mode needs the second backward to accumulate into the same "
                "buffers. Parameters were restored (gradients: g1 rounded to bf16)."
            )
        if self.written:
            return RuntimeError(
                f"GradReg(lean=True): the gradient buffers of {len(self.written)} GR parameter(s) were written "
                "between perturb() and the backward at θ' (e.g. zero_grad(set_to_none=False), also inside a "
                "closure): lean mode leaves −g1 in them for that backward to accumulate onto, so the GR gradient "
                "would be wrong. Zero the gradients before the first backward, not after perturb(), or use "
                "lean=False. Parameters were restored (gradients: g1 rounded to bf16)."
            )
        return None
