"""The loss ops registered once with ``torch.library``: schema, CPU kernel, CUDA kernel, fake kernel, autograd.

Ops (``torch.ops.grkernels.*``); ``impl`` is "cpp" or "triton", chosen by
:func:`grkernels.kernels.select_backend` (the public wrappers in :mod:`grkernels.ops` pass it; ``backend="torch"``
never reaches these ops: it is the plain autograd specification in :mod:`grkernels.ops.losses`):

- ``logp_entropy(logits [..., V], ids [...], active [...]?, temperature, with_entropy, inplace_backward, impl)
  -> (logp, entropy, mx, log_s)``: chosen-token log-prob and entropy (nats) plus the two parts of the log-sum-exp
  (``lse = mx + log_s``, what the backward needs instead of any vocab-sized tensor). Differentiable w.r.t. the
  logits through ``logp`` and ``entropy``.
- ``logp_entropy_backward(logits, ids, active?, mx, log_s, entropy, g_lp, g_ent?, temperature, impl) -> grad``
  and ``logp_entropy_backward_(...)``, which writes the gradient into the logits buffer itself.
- ``policy_loss_terms(logits [..., V], ids, mask, weights, adv, old?, ref?, temperature, clip_low, clip_high,
  delta?, beta, kl_est, inplace_backward, impl) -> (terms [2, n], stats [3, n], mx, log_s, g_lp)``: the
  token-level PPO-clip loss per token (``grkernels/kernels/policy_loss.py`` has the formulas): ``terms`` =
  (w·l, H·m), differentiable w.r.t. the logits; ``stats`` = (KL·m, low-clip·m, high-clip·m), not.

Outputs are fp32 (fp64 for fp64 logits). Kernels: CPU tensors run ``torch.ops.grkernels_cpp`` (``csrc/``) for
impl "cpp" and the Triton kernels under ``TRITON_INTERPRET=1`` for "triton"; CUDA tensors run Triton.

Second derivatives: the kernels' backward is not itself differentiable. When a graph of the gradient is asked
for (``create_graph=True``, e.g. ``GradReg(estimator="exact")``) the backward instead differentiates the
torch specification (:func:`grkernels.ops.losses._torch_logp_entropy`, :func:`grkernels.ops.losses._per_token_loss`)
by autograd from the saved logits, so double backprop is exact (it then costs the torch path's vocab-sized
temporaries).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grkernels.kernels import KL_CODES

_IMPLS = ("cpp", "triton")

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


def acc_dtype(logits: Tensor) -> torch.dtype:
    """dtype of the ops' per-token outputs: fp64 for fp64 logits, else fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_impl(impl: str, device: torch.device) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"grkernels ops: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "cpp" and device.type != "cpu":
        raise RuntimeError(f"grkernels ops: impl='cpp' runs on CPU tensors, got {device}")


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


# ---------------------------------------------------------------------------------------- the specification
def ref_logp_entropy(logits, ids, active, temperature, with_entropy):
    from grkernels.ops.losses import _torch_logp_entropy

    lp, h = _torch_logp_entropy(logits, ids, temperature, with_entropy, active=active)
    return lp, (torch.zeros_like(lp) if h is None else h)


def ref_grad(logits: Tensor, outputs_fn, grads: list[Tensor | None], create_graph: bool) -> Tensor:
    """d(Σ outputs·grads)/d logits of the torch specification ``outputs_fn(x)``, by autograd.

    ``create_graph``: differentiate w.r.t. the saved logits themselves, keeping the graph (double backprop);
    else w.r.t. a detached copy (a plain backward, e.g. the chunked LM head's torch path)."""
    with torch.enable_grad():
        x = logits if create_graph else logits.detach().requires_grad_()
        outs = outputs_fn(x)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        (gx,) = torch.autograd.grad(
            [o for o, _ in pairs], x, [g.to(o.dtype) for o, g in pairs], create_graph=create_graph,
            allow_unused=True,
        )  # fmt: skip
    return torch.zeros_like(logits) if gx is None else gx


def _ref_policy_terms(x, ids, mask, weights, adv, old, ref, temperature, clip_low, clip_high, delta, beta, kl_est):
    """Specification of ``policy_loss_terms``: (terms [2, n], stats [3, n], lp [n]) by the torch formulas."""
    from grkernels.ops.losses import _per_token_loss, _torch_logp_entropy

    mask = mask.reshape(-1).bool()
    lp, h = _torch_logp_entropy(x, ids, temperature, True, active=mask.reshape(ids.shape))
    lp, h = lp.reshape(-1), h.reshape(-1)
    est = {v: k for k, v in KL_CODES.items()}[kl_est]
    acc = lp.dtype
    cast = lambda t: None if t is None else t.reshape(-1).to(acc)
    per_tok, kl, low, high = _per_token_loss(
        lp, cast(adv), mask, cast(old), cast(ref), beta, clip_low, clip_high, est, delta, "token"
    )
    w = cast(weights)
    m = mask.to(acc)
    terms = torch.stack([w * per_tok, h * m])
    zero = torch.zeros_like(lp)
    stats = torch.stack([zero if kl is None else kl * m, low.to(acc) * m, high.to(acc) * m]).detach()
    return terms, stats, lp


# ---------------------------------------------------------------------------------------- logp_entropy
def _logp_entropy_kernel(logits, ids, active, temperature, with_entropy, inplace_backward, impl):
    _check_impl(impl, logits.device)
    lead = ids.shape
    x3 = _as_3d(logits)
    ids_f = _rows(ids, torch.int64)
    act = _rows(active, torch.bool)
    acc = acc_dtype(logits)
    if impl == "cpp":
        lp, mx, log_s, h = torch.ops.grkernels_cpp.logp_entropy_fwd(x3, ids_f, act, 1.0 / temperature, with_entropy)
    else:
        from grkernels.kernels.logprob import logp_entropy_forward

        act_u8 = None if act is None else act.view(torch.uint8)
        lp, (mx, log_s), h = logp_entropy_forward(x3, ids_f, act_u8, 1.0 / temperature, with_entropy)
        lp, mx, log_s, h = (t.to(acc) for t in (lp, mx, log_s, h))
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
        fn = lambda x: ref_logp_entropy(x, ids, active, ctx.temperature, ctx.with_entropy)
        grad = ref_grad(logits, fn, [g_lp, g_ent], create_graph=True)
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
    ids_f = _rows(ids, torch.int64)
    act = _rows(active, torch.bool)
    vecs = [_rows(t, mx.dtype) for t in (mx, log_s, ent, g_lp)]
    g_e = _rows(g_ent, mx.dtype)
    if impl == "cpp":
        torch.ops.grkernels_cpp.logp_entropy_bwd(x3, ids_f, act, *vecs, g_e, 1.0 / temperature, grad3)
        return
    from grkernels.kernels.logprob import logp_entropy_backward

    f32 = [v.float() for v in vecs]
    act_u8 = None if act is None else act.view(torch.uint8)
    g_e = None if g_e is None else g_e.float()
    logp_entropy_backward(x3, grad3, ids_f, act_u8, (f32[0], f32[1]), f32[2], f32[3], g_e, 1.0 / temperature)


def _logp_entropy_backward_kernel(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl):
    _check_impl(impl, logits.device)
    x3 = _as_3d(logits)
    grad3 = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    _backward_into(grad3, x3, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl)
    return grad3.view(logits.shape)


def _logp_entropy_backward_fake(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logp_entropy_backward_inplace_kernel(logits, ids, active, mx, log_s, entropy, g_lp, g_ent, temperature, impl):
    _check_impl(impl, logits.device)
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
    _check_impl(impl, logits.device)
    acc = acc_dtype(logits)
    x3 = _as_3d(logits)
    n = ids.numel()
    ids_f, mask_b = _rows(ids, torch.int64), _rows(mask, torch.bool)
    w, a, o, r = (_rows(t, acc) for t in (weights, adv, old, ref))
    if impl == "cpp":
        return torch.ops.grkernels_cpp.policy_loss_fwd(
            x3, ids_f, mask_b, w, a, o, r, 1.0 / temperature, clip_low, clip_high, delta, beta, kl_est
        )
    from grkernels.kernels.policy_loss import launch_policy_fwd

    out = torch.empty(5, n, dtype=torch.float32, device=logits.device)
    f32 = lambda t: None if t is None else t.float()
    mx, log_s, _, g_lp = launch_policy_fwd(
        x3, ids_f, mask_b.view(torch.uint8), w.float(), a.float(), f32(o), f32(r), out,
        temperature, clip_low, clip_high, delta, beta, kl_est,
    )  # fmt: skip
    return out[:2].to(acc, copy=True), out[2:].to(acc, copy=True), mx.to(acc), log_s.to(acc), g_lp.to(acc)


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
    ctx.cfg = (temperature, clip_low, clip_high, delta, beta, kl_est)
    ctx.inplace, ctx.impl = inplace, impl
    ctx.mark_non_differentiable(stats, mx, log_s, g_lp)


def _policy_terms_bwd(ctx, g_terms, _g_stats, _g_mx, _g_ls, _g_glp):
    logits, ids, mask, weights, adv, old, ref, mx, log_s, terms, g_lp = ctx.saved_tensors
    none = (None,) * 14
    if g_terms is None:
        return (None, *none)
    temperature = ctx.cfg[0]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the specification, keeping the graph
        fn = lambda x: _ref_policy_terms(x, ids, mask, weights, adv, old, ref, *ctx.cfg)[0]
        grad = ref_grad(logits, lambda x: [fn(x)], [g_terms], create_graph=True)
        return (grad, *none)
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



# one registration per op: CPU and CUDA kernels (impl picks C++ / Triton / torch inside), fake kernels
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


def loss_and_stats(sums: Tensor, stat_sums: Tensor, inv_ntok: Tensor, entropy_coef: float) -> tuple[Tensor, Tensor]:
    """The token-level loss from the summed ``policy_loss_terms`` rows: ``loss = Σ w·l − c·Σ H·m / N`` and the
    stats vector [policy loss, mean entropy, mean KL, low-clip, high-clip fraction] (detached; N = Σ m)."""
    stats = torch.cat([sums[:1], sums[1:2] * inv_ntok, stat_sums * inv_ntok]).detach()
    loss = sums[0] - entropy_coef * (sums[1] * inv_ntok) if entropy_coef != 0.0 else sums[0]
    return loss, stats


def logp_entropy(logits, ids, active, temperature, with_entropy, impl, inplace_backward=False):
    """``torch.ops.grkernels.logp_entropy`` (see the module docstring)."""
    return torch.ops.grkernels.logp_entropy(
        logits, ids, active, float(temperature), with_entropy, inplace_backward, impl
    )


def policy_loss_terms(logits, ids, mask, weights, adv, old, ref, cfg: dict, impl: str):
    """``torch.ops.grkernels.policy_loss_terms`` with the options of ``cfg`` (see the module docstring)."""
    delta = cfg["delta"]
    return torch.ops.grkernels.policy_loss_terms(
        logits, ids, mask, weights, adv, old, ref, float(cfg["temperature"]), float(cfg["clip_low"]),
        float(cfg["clip_high"]), None if delta is None else float(delta), float(cfg["beta"]),
        KL_CODES[cfg["kl_estimator"]], bool(cfg["inplace_backward"]), impl,
    )  # fmt: skip




def info(device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """Which implementation each op uses with ``backend="auto"`` on ``device``, and why.

    ``device``: "cpu", "cuda", ... (default: CPU, plus CUDA when available). Returns
    ``{"<op> [<device>]": {"implementation": ..., "reason": ...}, "grkernels._C": {...}, "triton": {...}}``.
    ``python -m grkernels info`` prints the same.
    """
    from grkernels.kernels import auto_backend, cpp_status, interpreter_on, triton_installed

    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    out: dict[str, dict[str, str]] = {
        "grkernels._C": {"implementation": "C++ CPU kernels", "reason": cpp_status()},
        "triton": {
            "implementation": "Triton kernels",
            "reason": ("installed" if triton_installed() else "not installed")
            + (" (TRITON_INTERPRET=1: backend='triton' runs on CPU tensors)" if interpreter_on() else ""),
        },
    }
    for dev in devices:
        loss_impl, loss_why = auto_backend(dev)
        for op in ("logp_and_entropy", "selective_log_softmax", "token_entropy", "policy_loss",
                   "fused_linear_policy_loss"):  # fmt: skip
            out[f"{op} [{dev.type}]"] = {"implementation": loss_impl, "reason": loss_why}
        out[f"kl_penalty [{dev.type}]"] = {"implementation": "torch", "reason": "elementwise: one torch expression"}
        out[f"GradReg step [{dev.type}]"] = {"implementation": loss_impl, "reason": loss_why}
    return out


def format_info(table: dict[str, dict[str, str]] | None = None) -> str:
    """:func:`info` as aligned text lines."""
    table = info() if table is None else table
    width = max(len(k) for k in table)
    return "\n".join(f"{k:<{width}}  {v['implementation']:<16} {v['reason']}" for k, v in table.items())


def info_main(argv: list[str]) -> int:
    """``python -m grkernels info [--device DEV]``: print :func:`info`."""
    import argparse

    parser = argparse.ArgumentParser(prog="grkernels info", description="which implementation each op uses")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu, plus cuda when available)")
    args = parser.parse_args(argv)
    try:
        table = info(args.device)
    except RuntimeError as err:  # e.g. an unknown device string
        parser.error(str(err))
    print(format_info(table))
    return 0


__all__ = ["acc_dtype", "format_info", "info", "info_main", "logp_entropy", "loss_and_stats", "policy_loss_terms"]
