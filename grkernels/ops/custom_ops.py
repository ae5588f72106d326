"""The loss ops registered once with ``torch.library``: schema, CPU kernel, CUDA kernel, fake kernel, autograd.

Ops (``torch.ops.grkernels.*``); ``impl`` is "cpp" or "triton", chosen by
:func:`grkernels.kernels.select_backend` (the public ops in :mod:`grkernels.ops.losses` pass it;
``backend="torch"`` never reaches these ops: it is the specification, :mod:`grkernels.ops.spec`):

- ``logp_entropy(logits [..., V], ids [...], active [...]?, temperature, with_entropy, inplace_backward, impl)
  -> (logp, entropy, mx, log_s)``: chosen-token log-prob and entropy (nats) plus the two parts of the log-sum-exp
  (``lse = mx + log_s``, what the backward needs instead of any vocab-sized tensor). Differentiable w.r.t. the
  logits through ``logp`` and ``entropy``.
- ``logp_entropy_backward(logits, ids, active?, mx, log_s, entropy, g_lp, g_ent?, temperature, impl) -> grad``
  and ``logp_entropy_backward_(...)``, which writes the gradient into the logits buffer itself.
- ``policy_loss_terms(logits [..., V], ids, mask, weights, adv, old?, ref?, temperature, clip_low, clip_high,
  delta?, beta, kl_est, inplace_backward, impl) -> (terms [2, n], stats [3, n], mx, log_s, g_lp)``: the
  token-level PPO-clip loss per token (:func:`grkernels.ops.spec.policy_terms`): ``terms`` = (w·l, H·m),
  differentiable w.r.t. the logits; ``stats`` = (KL·m, low-clip·m, high-clip·m), not.

Outputs are fp32 (fp64 for fp64 logits). Kernels (``grkernels/kernels/``, one launcher contract for both):
CPU tensors run the C++ kernels (``cpp_losses.py``) for impl "cpp" and the Triton kernels (``logprob.py``,
``policy_loss.py``) under ``TRITON_INTERPRET=1`` for "triton"; CUDA tensors run Triton. The Triton kernel
modules are imported with this module when triton is installed (``triton.jit`` needs triton at definition),
so ``TRITON_INTERPRET=1`` must be set before grkernels is imported for them to run on CPU tensors.

Second derivatives: the kernels' backward is not itself differentiable. When a graph of the gradient is asked
for (``create_graph=True``, e.g. ``GradReg(estimator="exact")``) the backward instead differentiates the
specification (:func:`grkernels.ops.spec.logp_entropy`, :func:`grkernels.ops.spec.policy_terms`) by autograd
from the saved logits, so double backprop is exact (it then costs the torch path's vocab-sized temporaries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from grkernels.kernels import KL_CODES, cpp_loaded, cpp_losses, cpp_status, triton_installed
from grkernels.ops.spec import acc_dtype, policy_terms, vjp
from grkernels.ops.spec import logp_entropy as spec_logp_entropy

if triton_installed():
    from grkernels.kernels import logprob as triton_logprob
    from grkernels.kernels import policy_loss as triton_policy
else:  # backend="triton" is refused before any op runs (grkernels.kernels.check_triton_device)
    triton_logprob = triton_policy = None


class Launchers(NamedTuple):
    """One implementation's kernel launchers (the contract of ``grkernels/kernels/cpp_losses.py``)."""

    forward: Callable
    backward: Callable
    policy_forward: Callable


_LAUNCHERS = {
    "cpp": Launchers(cpp_losses.logp_entropy_forward, cpp_losses.logp_entropy_backward, cpp_losses.policy_loss_forward)
}
if triton_logprob is not None:
    _LAUNCHERS["triton"] = Launchers(
        triton_logprob.logp_entropy_forward, triton_logprob.logp_entropy_backward, triton_policy.policy_loss_forward
    )
_IMPLS = ("cpp", "triton")
_KL_NAMES = {code: name for name, code in KL_CODES.items()}

torch.library.define(
    "grkernels::logp_entropy",
    "(Tensor logits, Tensor ids, Tensor? active, float temperature, bool with_entropy, bool inplace_backward, "
    "str impl) -> (Tensor, Tensor, Tensor, Tensor)",
)
_BWD_ARGS = (
    "Tensor ids, Tensor? active, Tensor mx, Tensor log_s, Tensor entropy, Tensor g_lp, Tensor? g_ent, "
    "float temperature, str impl"
)
torch.library.define("grkernels::logp_entropy_backward", f"(Tensor logits, {_BWD_ARGS}) -> Tensor")
torch.library.define("grkernels::logp_entropy_backward_", f"(Tensor(a!) logits, {_BWD_ARGS}) -> ()")
torch.library.define(
    "grkernels::policy_loss_terms",
    "(Tensor logits, Tensor ids, Tensor mask, Tensor weights, Tensor adv, Tensor? old, Tensor? ref, "
    "float temperature, float clip_low, float clip_high, float? delta, float beta, int kl_est, "
    "bool inplace_backward, str impl) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def _launchers(impl: str, device: torch.device) -> Launchers:
    """The kernels of ``impl`` for tensors on ``device``, or a clear error why they cannot run there."""
    if impl not in _IMPLS:
        raise ValueError(f"grkernels ops: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"grkernels ops: impl='cpp' runs on CPU tensors, got {device}")
        if not cpp_loaded():
            raise RuntimeError(f"grkernels ops: impl='cpp' needs the C++ kernels: {cpp_status()}")
    elif impl not in _LAUNCHERS:
        raise RuntimeError("grkernels ops: impl='triton' needs the triton package (pip install triton)")
    elif device.type == "cpu" and not triton_logprob.INTERPRETED:
        raise RuntimeError(
            "grkernels ops: impl='triton' on CPU tensors needs Triton's interpreter, and the kernels were built "
            "without it: set TRITON_INTERPRET=1 before grkernels (and triton) are imported"
        )
    return _LAUNCHERS[impl]


def _rows(x: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """A per-token tensor as a contiguous 1-D vector (of ``dtype``)."""
    if x is None:
        return None
    x = x.reshape(-1)
    return (x if dtype is None else x.to(dtype)).contiguous()


def _as_3d(x: Tensor) -> Tensor:
    """View ``[..., V]`` as ``[outer, inner, V]`` without copying when possible (unit stride over V)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() > 3:
        try:
            x = x.view(-1, x.shape[-2], x.shape[-1])
        except RuntimeError:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _spec_logp_entropy(logits, ids, active, temperature, with_entropy):
    """:func:`grkernels.ops.spec.logp_entropy` with the op's outputs (entropy zeros without ``with_entropy``)."""
    lp, h = spec_logp_entropy(logits, ids, temperature, with_entropy, active=active)
    return lp, (torch.zeros_like(lp) if h is None else h)


# ---------------------------------------------------------------------------------------- logp_entropy
def _logp_entropy_kernel(logits, ids, active, temperature, with_entropy, inplace_backward, impl):
    run = _launchers(impl, logits.device)
    lead = ids.shape
    lp, (mx, log_s), h = run.forward(
        _as_3d(logits), _rows(ids, torch.int64), _rows(active, torch.bool), 1.0 / temperature, with_entropy
    )
    return lp.view(lead), h.view(lead), mx.view(lead), log_s.view(lead)


def _logp_entropy_fake(logits, ids, active, temperature, with_entropy, inplace_backward, impl):
    acc = acc_dtype(logits)
    return tuple(logits.new_empty(ids.shape, dtype=acc) for _ in range(4))


def _logp_entropy_setup(ctx, inputs, output):
    logits, ids, active, temperature, with_entropy, inplace_backward, impl = inputs
    _, h, mx, log_s = output
    ctx.save_for_backward(logits, ids, active, mx, log_s, h)
    ctx.temperature, ctx.with_entropy, ctx.impl = temperature, with_entropy, impl
    ctx.inplace = inplace_backward
    ctx.mark_non_differentiable(mx, log_s)
    if not with_entropy:
        ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)


def _logp_entropy_bwd(ctx, g_lp, g_ent, _g_mx, _g_ls):
    logits, ids, active, mx, log_s, h = ctx.saved_tensors
    if g_lp is None and (g_ent is None or not ctx.with_entropy):
        return None, None, None, None, None, None, None
    g_ent = g_ent if ctx.with_entropy else None
    if torch.is_grad_enabled():  # create_graph=True: differentiate the specification, keeping the graph
        fn = lambda x: _spec_logp_entropy(x, ids, active, ctx.temperature, ctx.with_entropy)
        grad = vjp(logits, fn, [g_lp, g_ent], create_graph=True)
        return grad, None, None, None, None, None, None
    acc = mx.dtype
    g_lp = torch.zeros_like(mx) if g_lp is None else g_lp.to(acc)
    g_ent = None if g_ent is None else g_ent.to(acc)
    args = (ids, active, mx, log_s, h, g_lp, g_ent, ctx.temperature, ctx.impl)
    if ctx.inplace:  # the gradient overwrites the (no longer needed) logits
        torch.ops.grkernels.logp_entropy_backward_(logits, *args)
        return logits, None, None, None, None, None, None
    return torch.ops.grkernels.logp_entropy_backward(logits, *args), None, None, None, None, None, None


torch.library.register_autograd("grkernels::logp_entropy", _logp_entropy_bwd, setup_context=_logp_entropy_setup)


# ---------------------------------------------------------------------------------------- backward ops
def _backward_into(grad3, x3, ids, active, mx, log_s, ent, g_lp, g_ent, temperature, impl) -> None:
    """Kernel backward of ``x3 [outer, inner, V]`` written into ``grad3`` (which may be ``x3`` itself)."""
    run = _launchers(impl, x3.device)
    acc = mx.dtype
    run.backward(
        x3, grad3, _rows(ids, torch.int64), _rows(active, torch.bool), (_rows(mx, acc), _rows(log_s, acc)),
        _rows(ent, acc), _rows(g_lp, acc), _rows(g_ent, acc), 1.0 / temperature,
    )  # fmt: skip


def _logp_entropy_backward_kernel(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl):
    x3 = _as_3d(logits)
    grad3 = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    _backward_into(grad3, x3, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl)
    return grad3.view(logits.shape)


def _logp_entropy_backward_fake(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logp_entropy_backward_inplace_kernel(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl):
    x3 = _as_3d(logits)
    if x3.data_ptr() != logits.data_ptr():
        # no in-place 3-d view of this layout: compute, then copy into the buffer
        grad = _logp_entropy_backward_kernel(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl)
        logits.copy_(grad.view(logits.shape))
        return
    _backward_into(x3, x3, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl)


# ---------------------------------------------------------------------------------------- policy_loss_terms
def _policy_terms_kernel(
    logits, ids, mask, weights, adv, old, ref, temperature, clip_low, clip_high, delta, beta, kl_est, inplace, impl
):
    run = _launchers(impl, logits.device)
    acc = acc_dtype(logits)
    w, a, o, r = (_rows(t, acc) for t in (weights, adv, old, ref))
    return run.policy_forward(
        _as_3d(logits), _rows(ids, torch.int64), _rows(mask, torch.bool), w, a, o, r, 1.0 / temperature,
        clip_low, clip_high, delta, beta, kl_est,
    )  # fmt: skip


def _policy_terms_fake(
    logits, ids, mask, weights, adv, old, ref, temperature, clip_low, clip_high, delta, beta, kl_est, inplace, impl
):
    acc = acc_dtype(logits)
    n = ids.numel()
    new = lambda *shape: logits.new_empty(shape, dtype=acc)
    return new(2, n), new(3, n), new(n), new(n), new(n)


def _policy_terms_setup(ctx, inputs, output):
    logits, ids, mask, weights, adv, old, ref, temperature, clip_low, clip_high, delta, beta, kl_est, inplace, impl = (
        inputs
    )
    terms, stats, mx, log_s, g_lp = output
    ctx.save_for_backward(logits, ids, mask, weights, adv, old, ref, mx, log_s, terms, g_lp)
    ctx.cfg = (temperature, clip_low, clip_high, delta, beta, _KL_NAMES[kl_est])
    ctx.inplace, ctx.impl = inplace, impl
    ctx.mark_non_differentiable(stats, mx, log_s, g_lp)


def _policy_terms_bwd(ctx, g_terms, _g_stats, _g_mx, _g_ls, _g_glp):
    logits, ids, mask, weights, adv, old, ref, mx, log_s, terms, g_lp = ctx.saved_tensors
    none = (None,) * 14
    if g_terms is None:
        return (None, *none)
    temperature = ctx.cfg[0]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the specification, keeping the graph
        fn = lambda x: [policy_terms(x, ids, mask, weights, adv, old, ref, *ctx.cfg)[0]]
        return (vjp(logits, fn, [g_terms], create_graph=True), *none)
    g_terms = g_terms.to(mx.dtype)
    mask_f = mask.reshape(-1).to(mx.dtype)
    # dloss/dlp = g_lp · (upstream of row 0), dloss/dH = (upstream of row 1) on active tokens; masked tokens get
    # 0 for both, so the kernel reads none of their logits
    glp = g_lp * g_terms[0]
    gent = g_terms[1] * mask_f
    ent = terms[1].reshape(-1)
    if ctx.inplace:
        torch.ops.grkernels.logp_entropy_backward_(logits, ids, None, mx, log_s, ent, glp, gent, temperature, ctx.impl)
        return (logits, *none)
    args = (ids, None, mx, log_s, ent, glp, gent, temperature, ctx.impl)
    return (torch.ops.grkernels.logp_entropy_backward(logits, *args), *none)


torch.library.register_autograd("grkernels::policy_loss_terms", _policy_terms_bwd, setup_context=_policy_terms_setup)

# one registration per op: CPU and CUDA kernels (impl picks C++ / Triton inside), fake kernels
torch.library.register_kernel("grkernels::logp_entropy", ("cpu", "cuda"), _logp_entropy_kernel)
torch.library.register_fake("grkernels::logp_entropy", _logp_entropy_fake)
torch.library.register_kernel("grkernels::logp_entropy_backward", ("cpu", "cuda"), _logp_entropy_backward_kernel)
torch.library.register_fake("grkernels::logp_entropy_backward", _logp_entropy_backward_fake)
torch.library.register_kernel(
    "grkernels::logp_entropy_backward_", ("cpu", "cuda"), _logp_entropy_backward_inplace_kernel
)
torch.library.register_fake("grkernels::logp_entropy_backward_", lambda *args: None)
torch.library.register_kernel("grkernels::policy_loss_terms", ("cpu", "cuda"), _policy_terms_kernel)
torch.library.register_fake("grkernels::policy_loss_terms", _policy_terms_fake)


# ---------------------------------------------------------------------------------------- entry points
def logp_entropy(
    logits: Tensor,
    ids: Tensor,
    active: Tensor | None,
    temperature: float,
    with_entropy: bool,
    impl: str,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.grkernels.logp_entropy`` (see the module docstring)."""
    return torch.ops.grkernels.logp_entropy(
        logits, ids, active, float(temperature), with_entropy, inplace_backward, impl
    )


def logp_entropy_backward_(
    logits: Tensor,
    ids: Tensor,
    active: Tensor | None,
    mx: Tensor,
    log_s: Tensor,
    entropy: Tensor,
    g_lp: Tensor,
    g_ent: Tensor | None,
    temperature: float,
    impl: str,
) -> None:
    """``torch.ops.grkernels.logp_entropy_backward_``: d(logits) written into ``logits`` (see the module
    docstring)."""
    torch.ops.grkernels.logp_entropy_backward_(
        logits, ids, active, mx, log_s, entropy, g_lp, g_ent, float(temperature), impl
    )


def policy_loss_terms(
    logits: Tensor,
    ids: Tensor,
    mask: Tensor,
    weights: Tensor,
    adv: Tensor,
    old: Tensor | None,
    ref: Tensor | None,
    cfg: dict,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.grkernels.policy_loss_terms`` with the options of ``cfg`` (temperature, clip_low, clip_high,
    delta, beta, kl_estimator, inplace_backward; see the module docstring)."""
    delta = cfg["delta"]
    return torch.ops.grkernels.policy_loss_terms(
        logits, ids, mask, weights, adv, old, ref, float(cfg["temperature"]), float(cfg["clip_low"]),
        float(cfg["clip_high"]), None if delta is None else float(delta), float(cfg["beta"]),
        KL_CODES[cfg["kl_estimator"]], bool(cfg["inplace_backward"]), impl,
    )  # fmt: skip


__all__ = ["logp_entropy", "logp_entropy_backward_", "policy_loss_terms"]
