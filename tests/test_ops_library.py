"""The torch.library op surface (grkernels/ops/custom_ops.py) and the promises every backend must keep alike.

- opcheck (schema, fake kernel, autograd registration, AOT dispatch) of every op and implementation;
- ``torch.compile(fullgraph=True)`` of a training step with the loss ops equals eager;
- issue 10 class 4: exact shape checks (a transposed mask raises), exactly-zero gradients on masked rows whatever
  their logits hold, refusal of non-finite / non-positive temperatures, and torch / C++ / Triton agreement on
  every admitted input (hypothesis);
- issue 10 class 5: double backprop through the C++/Triton ops equals double backprop through the torch
  specification (the loss head's curvature is kept), ``GradReg(estimator="exact")`` through ``policy_loss`` is
  the same on every backend, and the chunked LM-head op refuses ``create_graph`` with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, requires_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grkernels.ops as ops
from grkernels import GradReg
from grkernels.kernels import cpp_loaded, cpp_status, triton_usable
from grkernels.ops import spec

requires_cpp = pytest.mark.skipif(DEVICE != "cpu" or not cpp_loaded(), reason=f"C++ kernels: {cpp_status()}")
ALL = ["torch", pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]
KERNELS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]


def _usable() -> list[str]:
    return ["torch"] + (["cpp"] if DEVICE == "cpu" and cpp_loaded() else []) + (
        ["triton"] if triton_usable(DEVICE) else []
    )


def _policy_inputs(B=2, T=5, V=23, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 3.0
    ref = torch.randn(B, T, generator=g) * 0.1 - 3.0
    return [t.to(device) for t in (logits, ids, mask, adv, old, ref)]


# ---------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("impl", KERNELS)
def test_opcheck_every_op(impl):
    from grkernels.ops.custom_ops import _policy_terms_kernel

    torch.manual_seed(0)
    dev = DEVICE if impl != "cpp" else "cpu"
    x = torch.randn(2, 3, 17, device=dev, requires_grad=True)
    ids = torch.randint(0, 17, (2, 3), device=dev)
    act = torch.rand(2, 3, device=dev) > 0.3
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for active in (None, act):
        torch.library.opcheck(torch.ops.grkernels.logp_entropy.default, (x, ids, active, 0.7, True, False, impl),
                              test_utils=tests)  # fmt: skip
    lp, h, mx, ls = torch.ops.grkernels.logp_entropy(x.detach(), ids, act, 0.7, True, False, impl)
    g = torch.randn(2, 3, device=dev)
    bwd_args = (ids, act, mx, ls, h, g, g * 0.5, 0.7, impl)
    torch.library.opcheck(torch.ops.grkernels.logp_entropy_backward.default, (x.detach(), *bwd_args))
    torch.library.opcheck(torch.ops.grkernels.logp_entropy_backward_.default, (x.detach().clone(), *bwd_args))
    w = act.float() / act.float().sum()
    adv = torch.randn(2, 3, device=dev)
    old, ref = (torch.randn(2, 3, device=dev) * 0.1 - 3 for _ in range(2))
    for o, r, delta, kl in ((old, ref, 1.5, 2), (None, None, None, 0), (old, ref, None, 1)):
        args = (x, ids, act, w, adv, o, r, 0.9, 0.2, 0.28, delta, 0.1, kl, False, impl)
        torch.library.opcheck(torch.ops.grkernels.policy_loss_terms.default, args, test_utils=tests)
        assert _policy_terms_kernel is not None


# ---------------------------------------------------------------------------------------- torch.compile
@requires_cpp
def test_compiled_training_step_equals_eager():
    """A step of a tiny LM with policy_loss + logp_and_entropy under torch.compile(fullgraph=True) = eager.

    Through the C++ ops (forward and the compiled backward graph); inductor, no graph break allowed."""
    import torch._dynamo

    backend = "cpp"
    torch._dynamo.reset()
    torch.manual_seed(0)
    V, H, B, T = 37, 8, 2, 6
    model = torch.nn.Sequential(torch.nn.Embedding(V, H), torch.nn.Tanh(), torch.nn.Linear(H, V))
    tok = torch.randint(0, V, (B, T + 1))
    logits_in, ids, mask, adv, old, ref = _policy_inputs(B, T, V, seed=3, device="cpu")
    del logits_in

    def loss_fn(tokens, ids, mask, adv, old, ref):
        logits = model(tokens[:, :-1])
        loss, metrics = ops.policy_loss(logits, ids, adv, mask, old, ref, beta=0.05, entropy_coef=0.01,
                                        temperature=0.9, backend=backend)  # fmt: skip
        lp, h = ops.logp_and_entropy(logits, ids, active=mask, backend=backend)
        return loss + 0.1 * (lp * mask).sum() / mask.sum() - 0.01 * h.mean(), metrics["kl"]

    def step(fn):
        model.zero_grad()
        loss, kl = fn(tok, ids, mask, adv, old, ref)
        loss.backward()  # the backward graph AOTAutograd compiled along with the forward
        return loss.detach(), kl, [p.grad.clone() for p in model.parameters()]

    eager = step(loss_fn)
    compiled = step(torch.compile(loss_fn, fullgraph=True))
    again = step(torch.compile(loss_fn, fullgraph=True))  # cached graph, fresh values of the same shapes
    for got in (compiled, again):
        torch.testing.assert_close(got[0], eager[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got[1], eager[1], atol=1e-6, rtol=1e-5)
        for a, b in zip(got[2], eager[2]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------- class 4
@pytest.mark.parametrize("backend", ALL)
def test_shapes_are_checked_exactly_not_by_element_count(backend):
    logits, ids, mask, adv, old, ref = _policy_inputs(B=4, T=4, V=11)  # B == T: a transpose keeps numel
    ids3, mask3 = ids[:3, :], mask[:3, :]  # [3, 4] ids, so [4, 3] masks have the same element count
    logits3, old3, ref3 = logits[:3], old[:3], ref[:3]
    with pytest.raises(ValueError, match="completion_mask"):
        ops.policy_loss(logits3, ids3, adv[:3], mask3.T.contiguous().reshape(4, 3), backend=backend)
    with pytest.raises(ValueError, match="completion_mask"):
        ops.policy_loss(logits3, ids3, adv[:3], mask3.reshape(-1), backend=backend)
    with pytest.raises(ValueError, match="old_logp"):
        ops.policy_loss(logits3, ids3, adv[:3], mask3, old3.T.contiguous(), backend=backend)
    with pytest.raises(ValueError, match="ref_logp"):
        ops.policy_loss(logits3, ids3, adv[:3], mask3, old3, ref3.reshape(4, 3), beta=0.1, backend=backend)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(logits3, ids3, torch.randn(4, 3, device=DEVICE), mask3, backend=backend)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(logits3, ids3, torch.randn(12, device=DEVICE), mask3, backend=backend)
    with pytest.raises(ValueError, match="mask"):
        ops.logp_and_entropy(logits3, ids3, active=mask3.T.contiguous().reshape(4, 3), backend=backend)
    # the admitted shapes: per-sequence [B], [B, 1] and per-token [B, T] advantages
    for a in (adv[:3], adv[:3, None], adv[:3, None].expand(3, 4)):
        ops.policy_loss(logits3, ids3, a, mask3, old3, backend=backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("fill", [float("-inf"), float("nan")])
def test_masked_rows_of_nonfinite_logits_get_exactly_zero_gradient(backend, fill):
    logits, ids, mask, adv, old, ref = _policy_inputs(B=2, T=5, V=19, seed=4)
    mask[0, 2] = mask[1, 4] = False
    logits[0, 2] = fill
    logits[1, 4, ::2] = fill
    for isl in ("token", "sequence"):
        x = logits.clone().requires_grad_()
        loss, metrics = ops.policy_loss(x, ids, adv, mask, old, ref, beta=0.1, entropy_coef=0.01,
                                        importance_sampling=isl, backend=backend)  # fmt: skip
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        assert torch.isfinite(x.grad).all()
        assert (x.grad[~mask] == 0).all()
    x = logits.clone().requires_grad_()
    lp, h = ops.logp_and_entropy(x, ids, active=mask, backend=backend)
    (lp.sum() + h.sum()).backward()
    assert (lp[~mask] == 0).all() and (h[~mask] == 0).all()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


def _nonfinite_rows(seed: int):
    """Logits [3, 4, 19] with one row of each kind, the mask, and which active rows are degenerate."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 3, 4, 19
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    logits[0, 0, 1::3] = float("-inf")  # -inf entries, finite elsewhere: an ordinary row
    ids[0, 0] = 0
    logits[0, 1, 7] = float("nan")
    logits[0, 2, 3] = float("inf")
    logits[1, 0] = float("-inf")  # -inf everywhere: no finite log-sum-exp
    logits[1, 1, 0] = float("nan")  # masked below: reads nothing
    logits[2, 2] = float("inf")  # masked below
    logits[2, 3, 4] = float("inf")
    ids[2, 3] = 4  # the chosen token is the +inf entry
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 1] = mask[2, 2] = False
    bad = torch.zeros(B, T, dtype=torch.bool)
    bad[0, 1] = bad[0, 2] = bad[1, 0] = bad[2, 3] = True
    return logits, ids, mask, bad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("upstream", ["random", "zero on the bad rows", "zero everywhere"])
def test_nonfinite_rows_follow_one_rule_on_every_backend(backend, upstream):
    """The rule of grkernels/ops/spec.py: an active row holding a NaN or +inf, or -inf everywhere, gives non-finite
    logp and H and NaN in its gradient row whatever the upstream gradient, even 0 (IEEE 0·NaN, as torch autograd
    does: C++ used to return 0 there while torch and Triton gave NaN, so GR skipped on a GPU and stepped on a
    CPU); masked rows give 0 and exactly zero gradient; every other row equals the float64 specification."""
    logits, ids, mask, bad = _nonfinite_rows(31)
    g = torch.Generator().manual_seed(32)
    g_lp, g_h = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    if upstream != "random":
        keep = ~bad if upstream == "zero on the bad rows" else torch.zeros_like(bad)
        g_lp, g_h = g_lp * keep, g_h * keep
    x64 = logits.double().requires_grad_()
    lp64, h64 = spec.logp_entropy(x64, ids, 0.8, active=mask)
    (lp64 * g_lp.double() + h64 * g_h.double()).sum().backward()
    x = logits.clone().to(DEVICE).requires_grad_()
    lp, h = ops.logp_and_entropy(x, ids.to(DEVICE), 0.8, active=mask.to(DEVICE), backend=backend)
    (lp * g_lp.to(DEVICE) + h * g_h.to(DEVICE)).sum().backward()
    lp, h, grad = lp.detach().cpu(), h.detach().cpu(), x.grad.cpu()
    assert torch.equal(~torch.isfinite(lp), bad) and torch.equal(~torch.isfinite(h), bad)
    assert torch.equal(torch.isnan(grad).any(-1), bad), torch.isnan(grad).any(-1)
    assert torch.equal(torch.isnan(x64.grad).any(-1), bad)  # the specification itself follows the rule
    assert (grad[~mask] == 0).all() and (lp[~mask] == 0).all() and (h[~mask] == 0).all()
    ok = ~bad & mask
    torch.testing.assert_close(lp[ok].double(), lp64[ok].detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(h[ok].double(), h64[ok].detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad[ok].double(), x64.grad[ok], atol=2e-5 * x64.grad[ok].abs().max().item(), rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_rows_in_the_policy_loss_reach_the_gradient_on_every_backend(backend):
    """The same rule through policy_loss (token-level: the fused kernel on C++/Triton): the loss is not finite,
    the bad rows' gradients hold NaN, masked rows are exactly zero, the other rows equal float64 torch."""
    logits, ids, mask, bad = _nonfinite_rows(33)
    g = torch.Generator().manual_seed(34)
    adv = torch.randn(3, generator=g)
    adv[1] = 0.0  # a zero advantage: the bad row [1, 0] still has NaN in its gradient
    old = torch.randn(3, 4, generator=g) * 0.2 - 3.0
    kw = dict(beta=0.05, entropy_coef=0.02, temperature=0.8)
    x64 = logits.double().requires_grad_()
    loss64, _ = ops.policy_loss(x64, ids, adv.double(), mask, old.double(), old.double(), backend="torch", **kw)
    loss64.backward()
    x = logits.clone().to(DEVICE).requires_grad_()
    d = lambda t: t.to(DEVICE)
    loss, metrics = ops.policy_loss(x, d(ids), d(adv), d(mask), d(old), d(old), backend=backend, **kw)
    loss.backward()
    grad = x.grad.cpu()
    assert not torch.isfinite(loss)
    assert torch.equal(torch.isnan(grad).any(-1), bad) and torch.equal(torch.isnan(x64.grad).any(-1), bad)
    assert (grad[~mask] == 0).all()
    ok = ~bad & mask
    torch.testing.assert_close(grad[ok].double(), x64.grad[ok], atol=2e-5 * x64.grad[ok].abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0, True, "1.0"])
def test_bad_temperature_is_refused_by_every_op(backend, temperature):
    logits, ids, mask, adv, old, ref = _policy_inputs(B=1, T=3, V=7)
    with pytest.raises(ValueError, match="temperature"):
        ops.logp_and_entropy(logits, ids, temperature, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.selective_log_softmax(logits, ids, temperature, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.policy_loss(logits, ids, adv, mask, temperature=temperature, backend=backend)
    h, w = torch.randn(1, 3, 4, device=DEVICE), torch.randn(7, 4, device=DEVICE)
    with pytest.raises(ValueError, match="temperature"):
        ops.fused_linear_policy_loss(h, w, None, ids, adv, mask, temperature=temperature, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.policy_loss(logits, ids, adv, mask, temperature=torch.tensor(1.0), backend=backend)


def test_kl_penalty_has_no_backend_argument():
    with pytest.raises(TypeError):
        ops.kl_penalty(torch.zeros(2), torch.zeros(2), "k3", backend="torch")  # type: ignore[call-arg]


def test_unknown_backend_and_cpp_on_wrong_device_are_refused():
    logits, ids, *_ = _policy_inputs(B=1, T=2, V=5, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        ops.selective_log_softmax(logits, ids, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CPU"):
            ops.selective_log_softmax(logits.cuda(), ids.cuda(), backend="cpp")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    v=st.sampled_from([1, 2, 17, 64, 2047, 2049, 4500]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    scale=st.sampled_from([0.1, 4.0, 300.0]),
    neg_inf=st.booleans(),
    masked=st.booleans(),
    isl=st.sampled_from(["token", "sequence"]),
    on_policy=st.booleans(),
    estimator=st.sampled_from(["k1", "k2", "k3"]),
    agg=st.sampled_from(["token_mean", "grpo", "dr_grpo", "luspo"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_every_backend_agrees(b, t, v, dtype, temperature, scale, neg_inf, masked, isl, on_policy, estimator,
                                   agg, seed):  # fmt: skip
    """torch (the specification), C++ and Triton: same loss, metrics, log-probs, entropies and gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    if neg_inf and v > 1:
        logits[..., 1::3] = float("-inf")
    ids = torch.randint(0, v, (b, t), generator=g)
    if neg_inf and v > 1:
        ids = ids - ids % 3 * (ids % 3 == 1)  # chosen ids on finite entries
    mask = (torch.rand(b, t, generator=g) > 0.3) if masked else torch.ones(b, t, dtype=torch.bool)
    adv = torch.randn(b, generator=g)
    # old / reference policies near the current one (as in training: ratios around 1, some clipped)
    lp0 = torch.log_softmax(logits.double() / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = None if on_policy else lp0 + torch.randn(b, t, generator=g).double() * 0.3
    ref = lp0 + torch.randn(b, t, generator=g).double() * 0.3
    backends = _usable()
    if v > 64 and "triton" in backends and DEVICE == "cpu":
        backends.remove("triton")  # the interpreter is slow on long rows; tests/test_ops_logprob.py fuzzes it
    results = {}
    for be in backends:
        x = logits.clone().to(DEVICE).requires_grad_()
        dev = lambda z: None if z is None else z.to(DEVICE)
        loss, metrics = ops.policy_loss(
            x, dev(ids), dev(adv), dev(mask), dev(old), dev(ref), beta=0.05, entropy_coef=0.02, loss_agg=agg,
            kl_estimator=estimator, importance_sampling=isl, temperature=temperature, backend=be,
        )  # fmt: skip
        loss.backward()
        lp, h = ops.logp_and_entropy(x.detach(), dev(ids), temperature, active=dev(mask), backend=be)
        results[be] = (loss.detach().cpu(), {k: m.cpu() for k, m in metrics.items()}, lp.cpu(), h.cpu(),
                       x.grad.cpu())  # fmt: skip
    want = results["torch"]
    finite = logits[torch.isfinite(logits)].double()
    zmax = finite.abs().max().item() / temperature if finite.numel() else 0.0
    for be, got in results.items():
        # Triton computes fp64 logits in fp32 (C++ and torch in fp64): fp32 tolerances for it
        wide = dtype == torch.float64 and be != "triton"
        tol = 1e-9 if wide else 2e-5
        # fp32 arithmetic on |z| up to zmax = max|finite logits| / temperature: an ulp of zmax is the floor of the
        # error of z_y - lse in each backend, so two backends may differ by two (the KL metric, a mean of
        # lp - ref ~ 0.3, has no relative slack to hide it)
        atol = tol + (0 if wide else zmax * 2.0**-21)
        assert torch.isfinite(got[4].float()).all(), be
        torch.testing.assert_close(got[0].double(), want[0].double(), atol=atol, rtol=1e-4, msg=be)
        for k in want[1]:
            torch.testing.assert_close(got[1][k].double(), want[1][k].double(), atol=atol, rtol=1e-4, msg=k)
        torch.testing.assert_close(got[2].double(), want[2].double(), atol=atol, rtol=1e-5, msg=be)
        torch.testing.assert_close(got[3].double(), want[3].double(), atol=atol, rtol=1e-4, msg=be)
        gscale = want[4].double().abs().max().item() + 1e-30
        gtol = {torch.float64: 1e-9 if wide else 1e-4, torch.float32: 1e-4, torch.bfloat16: 2.0**-6,
                torch.float16: 2.0**-9}[dtype]  # fmt: skip
        torch.testing.assert_close(got[4].double(), want[4].double(), atol=gtol * gscale + 1e-7, rtol=0, msg=be)
        assert (got[4][~mask] == 0).all(), be


# ---------------------------------------------------------------------------------------- class 5
def _head_model(seed=0, V=13, H=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, V)).double()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("what", ["policy_loss", "logp_and_entropy"])
def test_double_backward_equals_the_torch_specification(backend, what):
    """H·v through the kernels' ops equals H·v through plain autograd of the reference (loss-head curvature)."""
    B, T, V, H = 2, 4, 13, 6
    _, ids, mask, adv, old, ref = _policy_inputs(B, T, V, seed=5, device="cpu")
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    hvps = {}
    for be in ("torch", backend):
        model = _head_model(V=V, H=H)
        params = list(model.parameters())
        logits = model(hidden.to(DEVICE) if be == "triton" else hidden)
        dev = lambda z: z.to(logits.device)
        if what == "policy_loss":
            loss, _ = ops.policy_loss(logits, dev(ids), dev(adv), dev(mask), dev(old), dev(ref), beta=0.2,
                                      entropy_coef=0.05, kl_estimator="k3", backend=be)  # fmt: skip
        else:
            lp, h = ops.logp_and_entropy(logits, dev(ids), 0.8, active=dev(mask), backend=be)
            loss = (lp * 0.7 - h * 0.3).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        assert all(g.requires_grad for g in grads)
        v = [torch.ones_like(p) * 0.1 for p in params]
        hvps[be] = [h.detach().cpu() for h in torch.autograd.grad(grads, params, grad_outputs=v)]
    assert sum(float(h.abs().sum()) for h in hvps["torch"]) > 1e-6  # the curvature is not trivially zero
    for a, b in zip(hvps[backend], hvps["torch"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("backend", KERNELS)
def test_gradreg_exact_estimator_through_policy_loss_matches_torch(backend):
    """GradReg(estimator='exact') with the kernels' policy_loss gives the torch backend's combined gradient."""
    B, T, V, H = 2, 5, 11, 6
    _, ids, mask, adv, old, ref = _policy_inputs(B, T, V, seed=7, device="cpu")
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    seen = {}
    for be in ("torch", backend):
        model = _head_model(seed=1, V=V, H=H)
        opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.0), strength=0.5, eps=1e-3, estimator="exact")

        def closure():
            logits = model(hidden)
            loss, _ = ops.policy_loss(logits, ids, adv, mask, old, ref, beta=0.1, backend=be)
            opt.backward(loss)
            return loss

        grads = []
        opt.optimizer.register_step_pre_hook(
            lambda o, a, k: grads.extend(p.grad.detach().clone() for p in model.parameters())
        )
        opt.step(closure)
        seen[be] = grads
    for a, b in zip(seen[backend], seen["torch"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("backend", ALL)
def test_fused_linear_refuses_a_graph_of_the_gradient(backend):
    B, T, V, H = 1, 3, 9, 4
    _, ids, mask, adv, *_ = _policy_inputs(B, T, V, device=DEVICE)
    hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, H, device=DEVICE, requires_grad=True)
    for isl in ("token", "sequence"):
        loss, _ = ops.fused_linear_policy_loss(hidden, weight, None, ids, adv, mask, importance_sampling=isl,
                                               backend=backend)  # fmt: skip
        with pytest.raises(RuntimeError, match="double-differentiable"):
            torch.autograd.grad(loss, [hidden, weight], create_graph=True)
