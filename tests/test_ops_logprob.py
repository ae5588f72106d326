"""selective_log_softmax / token_entropy / logp_and_entropy: torch reference, C++ and Triton kernels vs float64.

Tolerances: forward outputs are fp32 from fp32 accumulation, compared with float64 on the *same* (already
rounded) inputs: 2e-5 absolute, plus |logits| * 2^-22 for huge logits (fp32 cannot represent z_y - lse
better than an ulp of z). Gradients are stored in the logits dtype: fp32 2e-5 relative to the largest
gradient, bf16 2^-7 and fp16 2^-10 relative to it (one rounding of each element).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import DEVICE, requires_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grkernels.ops as ops
from grkernels.kernels import cpp_loaded, cpp_status
from grkernels.ops.spec import logp_entropy as spec_logp_entropy

requires_cpp = pytest.mark.skipif(DEVICE != "cpu" or not cpp_loaded(), reason=f"C++ kernels: {cpp_status()}")

GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _ref(logits, ids, temperature=1.0):
    """float64 reference (log_softmax + gather, entropy with 0 log 0 = 0), on the same rounded inputs."""
    x = logits.detach().double().requires_grad_()
    lp, h = spec_logp_entropy(x, ids, temperature)
    return x, lp, h


def _fwd_atol(logits):
    finite = logits.detach().float()
    big = finite[torch.isfinite(finite)].abs().max().item() if torch.isfinite(finite).any() else 0.0
    return 2e-5 + big * 2.0**-22 / 1.0


@contextlib.contextmanager
def _triton_block(block_v):
    """Force the Triton kernels' vocabulary slice to ``block_v`` entries (several slices per row)."""
    from grkernels.kernels import logprob

    real = logprob.launch_config
    logprob.launch_config = lambda V, size: (block_v, 4)
    try:
        yield
    finally:
        logprob.launch_config = real


def _check(logits, ids, temperature, backend, active=None, block_v=None, inplace=False, g_scale=1.0, device="cpu"):
    """Run the op on ``device`` and compare with the float64 CPU reference; returns CPU results."""
    torch.manual_seed(1)
    g_lp = torch.randn(ids.shape) * g_scale
    g_h = torch.randn(ids.shape) * g_scale
    x_ref, lp_ref, h_ref = _ref(logits, ids.clamp(0, logits.shape[-1] - 1), temperature)
    if active is not None:
        lp_ref = torch.where(active, lp_ref, 0.0)
        h_ref = torch.where(active, h_ref, 0.0)
    (lp_ref * g_lp.double() + h_ref * g_h.double()).sum().backward()

    x = logits.detach().clone().to(device).requires_grad_()
    act_d = None if active is None else active.to(device)
    with _triton_block(block_v) if block_v is not None else contextlib.nullcontext():
        lp, h = ops.logp_and_entropy(x, ids.to(device), temperature, act_d, inplace, backend=backend)
        assert lp.dtype == torch.float32 and h.dtype == torch.float32
        assert lp.shape == ids.shape and h.shape == ids.shape
        (lp * g_lp.to(device) + h * g_h.to(device)).sum().backward()
    lp, h, grad = lp.detach().cpu(), h.detach().cpu(), x.grad.cpu()
    atol = _fwd_atol(logits) / temperature
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(h.double(), h_ref.detach(), atol=atol, rtol=1e-5)
    gref = x_ref.grad
    assert grad.dtype == logits.dtype
    assert torch.isfinite(grad.float()).all()
    scale = gref.abs().max().item()
    torch.testing.assert_close(grad.double(), gref, atol=GRAD_RTOL[logits.dtype] * scale + 1e-7, rtol=0)
    if active is not None:
        assert (grad[~active] == 0).all(), "masked tokens must get exactly zero gradient"
    return lp, h, grad


BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]
KERNELS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logp_entropy_matches_float64(backend, dtype, temperature, device):
    torch.manual_seed(0)
    V = 67  # odd vocab
    logits = (torch.randn(2, 5, V) * 3).to(dtype)
    ids = torch.randint(0, V, (2, 5))
    _check(logits, ids, temperature, backend, device=device)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_multiple_vocab_blocks_with_masked_tokens(dtype, device):
    """Several BLOCK_V slices per row (the online log-sum-exp rescaling path), a ragged last slice."""
    torch.manual_seed(2)
    V = 75
    logits = (torch.randn(3, 4, V) * 4).to(dtype)
    # a growing max across slices: the online rescaling must be exact
    logits[0, 0] = torch.linspace(-20, 20, V).to(dtype)
    ids = torch.randint(0, V, (3, 4))
    active = torch.rand(3, 4) > 0.3
    active[0, 0] = True
    ids[~active] = -100  # padding ids on masked tokens must be ignored, not read
    _check(logits, ids, 1.3, "triton", active=active, block_v=16, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_and_huge_logits(backend, device):
    """-inf (masked vocabulary) and |logits| ~ 1e4 give finite, correct values and gradients."""
    torch.manual_seed(3)
    V = 40
    logits = torch.randn(2, 4, V) * 2
    logits[0, 0, ::3] = float("-inf")
    logits[0, 1, :-1] = float("-inf")  # a single finite entry: logp = 0, entropy = 0
    logits[0, 2] += 1e4
    logits[1, 0] = logits[1, 0] * 1e4  # a huge spread: a near one-hot distribution
    logits[1, 1] -= 1e4
    ids = torch.randint(0, V, (2, 4))
    ids[0, 0] = 1  # an allowed (finite) entry
    ids[0, 1] = V - 1
    for dtype in (torch.float32, torch.bfloat16):
        lp, h, grad = _check(logits.to(dtype), ids, 1.0, backend, device=device)
        assert torch.isfinite(lp).all() and torch.isfinite(h).all()
        assert lp[0, 1].abs().item() < 1e-6 and h[0, 1].abs().item() < 1e-6
        assert (grad[0, 0, ::3] == 0).all(), "-inf entries have p = 0 and zero gradient"


@pytest.mark.parametrize("backend", KERNELS)
def test_inplace_backward_writes_into_logits(backend, device):
    torch.manual_seed(4)
    V = 33
    base = torch.randn(2, 3, V)
    ids = torch.randint(0, V, (2, 3))
    ref_x, lp_ref, _ = _ref(base, ids)
    leaf = base.clone().to(device).requires_grad_()
    logits = leaf * 1.0  # a non-leaf buffer, as a model's logits would be
    lp, _ = ops.logp_and_entropy(logits, ids.to(device), inplace_backward=True, backend=backend)
    ptr = logits.data_ptr()
    lp.sum().backward()
    lp_ref.sum().backward()
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_x.grad, atol=1e-5, rtol=0)
    # the logits buffer now holds the gradient: no second vocab-sized tensor was allocated for it
    assert logits.data_ptr() == ptr
    torch.testing.assert_close(logits.detach().cpu().double(), ref_x.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", KERNELS)
def test_noncontiguous_shifted_slice(backend, device):
    """logits[:, :-1] (the usual shift) is read through its strides, without a copy."""
    torch.manual_seed(5)
    V = 29
    full = torch.randn(2, 6, V)
    ids = torch.randint(0, V, (2, 5))
    x = full.clone().to(device).requires_grad_()
    lp, h = ops.logp_and_entropy(x[:, :-1], ids.to(device), backend=backend)
    ref_x, lp_ref, h_ref = _ref(full[:, :-1], ids)
    torch.testing.assert_close(lp.cpu().double(), lp_ref.detach(), atol=2e-5, rtol=0)
    (lp.sum() + h.sum()).backward()
    (lp_ref.sum() + h_ref.sum()).backward()
    grad = x.grad.cpu()
    torch.testing.assert_close(grad[:, :-1].double(), ref_x.grad, atol=2e-5, rtol=0)
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_selective_log_softmax_and_entropy(backend, device):
    torch.manual_seed(6)
    logits = torch.randn(3, 7, 50)
    ids = torch.randint(0, 50, (3, 7))
    want = torch.log_softmax(logits.double() / 0.8, -1).gather(-1, ids[..., None]).squeeze(-1)
    p = torch.softmax(logits.double(), -1)
    want_h = -(p * p.log()).sum(-1)
    logits, ids = logits.to(device), ids.to(device)
    got = ops.selective_log_softmax(logits, ids, temperature=0.8, backend=backend)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=0)
    got_h = ops.token_entropy(logits, backend=backend)
    torch.testing.assert_close(got_h.cpu().double(), want_h, atol=2e-5, rtol=0)
    # 2-D and 1-D logits work too ([T, V], [V])
    torch.testing.assert_close(ops.selective_log_softmax(logits[0], ids[0], 0.8, backend=backend), got[0])
    assert ops.token_entropy(logits[0, 0], backend=backend).shape == ()


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_save_no_vocab_sized_copy(backend, device):
    """Autograd keeps the logits themselves and O(tokens) tensors, nothing else vocab-sized."""
    V, N = 64, 12
    logits = torch.randn(3, 4, V, device=device).requires_grad_()
    work = logits * 1.0
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, h = ops.logp_and_entropy(work, torch.randint(0, V, (3, 4), device=device), backend=backend)
    big = [t for t in saved if t.numel() > N]
    assert big, "the logits must be saved (backward recomputes the softmax from them)"
    for t in big:
        assert t.untyped_storage().data_ptr() == work.untyped_storage().data_ptr(), (
            f"a vocab-sized tensor {tuple(t.shape)} other than the logits was saved"
        )
    (lp.sum() + h.sum()).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, device):
    logits = torch.randn(2, 3, 10, device=device)
    ids = torch.randint(0, 10, (2, 3), device=device)
    if device == "cpu":  # on CUDA the id check is a device-side assert, which would end the CUDA context
        with pytest.raises(ValueError, match="outside"):
            ops.selective_log_softmax(logits, torch.full((2, 3), 10), backend=backend)
        with pytest.raises(ValueError, match="outside"):
            ops.selective_log_softmax(logits, torch.full((2, 3), -1), backend=backend)
    with pytest.raises(ValueError, match="shape"):
        ops.selective_log_softmax(logits, ids[:, :2], backend=backend)
    with pytest.raises(TypeError, match="integer"):
        ops.selective_log_softmax(logits, ids.float(), backend=backend)
    with pytest.raises(TypeError, match="floating"):
        ops.token_entropy(ids, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.selective_log_softmax(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.selective_log_softmax(logits, ids, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ops.selective_log_softmax(logits, ids, backend="cuda")
    # a masked-out token may carry a padding id
    active = torch.ones(2, 3, dtype=torch.bool, device=device)
    active[0, 0] = False
    bad = ids.clone()
    bad[0, 0] = -100
    lp, _ = ops.logp_and_entropy(logits, bad, active=active, backend=backend)
    assert lp[0, 0] == 0 and torch.isfinite(lp).all()


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="triton")


@requires_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter is a CPU matter")
def test_triton_kernels_built_without_the_interpreter_are_refused_on_cpu(monkeypatch):
    """TRITON_INTERPRET=1 set only after grkernels imported the Triton kernels (they were then built for the GPU):
    a clear error naming the fix, not a failure inside triton."""
    from grkernels.ops import custom_ops

    monkeypatch.setattr(custom_ops.triton_logprob, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before grkernels"):
        ops.selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="triton")


@requires_triton
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    v=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_triton_vs_float64(b, t, v, dtype, temperature, scale, masked, seed):
    from conftest import DEVICE

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    active = (torch.rand(b, t, generator=g) > 0.3) if masked else None
    _check(logits, ids, temperature, "triton", active=active, block_v=16 if v > 16 else None, device=DEVICE)
