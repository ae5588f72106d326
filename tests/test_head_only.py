"""Head-only GR (``grkernels.head``): the perturbed pass from the cached hidden states gives the same gradients and
parameters as GradReg over the same groups whose perturbed pass reruns the whole model (bit for bit), and as a
plain-torch recomputation of g1 + (γ/ε)(clip(g2) − clip(g1)) on the head; the groups; the refusals (tied
embeddings, trunk parameters in GR, no head); an exception in the user's loss restores θ bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grkernels import GradReg, head_gr_step, head_param_groups, head_perturbed_pass
from grkernels.demo.policy import TinyTransformer
from grkernels.head import check_head_only
from grkernels.kernels import cpp_loaded

BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_loaded(), reason="grkernels._C not built"))]


def make_model(vocab: int = 11, max_len: int = 8, width: int = 16, layers: int = 2, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, max_len, width=width, layers=layers, heads=2)
    with torch.no_grad():  # the demo's init has zero biases and tiny weights: make every parameter matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def trunk(model: TinyTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states: TinyTransformer.forward up to (and with) ln_f."""
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
    for blk in model.blocks:
        x = blk(x)
    return model.ln_f(x)


def batch(vocab: int, n: int = 6, length: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    targets = torch.randint(0, vocab, (n, length), generator=g)
    weights = torch.randn(n, 1, generator=g)  # signed, as advantages: a policy-gradient-like loss
    return ids, targets, weights


def head_loss(model: TinyTransformer, targets: torch.Tensor, weights: torch.Tensor):
    def loss_from_hidden(h: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(h)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return (weights * nll).mean() + 0.1 * nll.mean()
    return loss_from_hidden


def make_opt(model, strength=1.0, eps=1e-2, backend="torch", clip=10.0, **kw) -> GradReg:
    base = torch.optim.AdamW(head_param_groups(model, strength), lr=1e-2, weight_decay=0.01)
    return GradReg(base, strength=strength, eps=eps, g1_clip=clip, g2_clip=clip, backend=backend, **kw)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), (n, (a[n] - b[n]).abs().max())


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator, clip, strength", [("forward", 10.0, 1.0), ("forward", 0.05, 200.0),
                                                      ("central", 10.0, 1.0)])
def test_cached_hidden_equals_full_rerun_bitwise(backend, estimator, clip, strength):
    """3 AdamW steps: head-only GR from the cached hidden states vs GradReg over the same groups whose perturbed
    pass reruns the whole model: the same .grad after combine and the same parameters, bit for bit (fp32, CPU)."""
    a = make_model()
    b = copy.deepcopy(a)
    oa = make_opt(a, strength, backend=backend, clip=clip, estimator=estimator)
    ob = make_opt(b, strength, backend=backend, clip=clip, estimator=estimator)
    rels = []
    for step in range(3):
        ids, targets, weights = batch(a.vocab, seed=step)
        oa.zero_grad()
        hidden = trunk(a, ids)
        lfh = head_loss(a, targets, weights)
        lfh(hidden).backward()
        g1_trunk = {n: g for n, g in grads(a).items() if not n.startswith("lm_head")}
        head_perturbed_pass(oa, hidden, lfh)
        oa.combine()

        ob.zero_grad()
        full = head_loss(b, targets, weights)
        full(trunk(b, ids)).backward()
        for _ in range(ob.extra_passes):
            ob.perturb()
            full(trunk(b, ids)).backward()
        ob.combine()

        ga, gb = grads(a), grads(b)
        assert_same(ga, gb)
        assert_same({n: g for n, g in ga.items() if not n.startswith("lm_head")}, g1_trunk)  # the trunk keeps g1
        rels.append(oa.metrics()["gr_rel"])
        assert oa.metrics() == ob.metrics()
        oa.step()
        ob.step()
        assert_same(snapshot(a), snapshot(b))
    assert min(rels) > 0.02  # the head's correction is a real part of the gradient


def test_matches_plain_torch_recomputation_float64():
    """One step, float64: .grad after combine is g1 + (γ/ε)(s2·g2 − s1·g1) on the head (s = clip factors over the
    head's parameters), g1 elsewhere, computed here without GradReg; θ is restored bitwise before the step."""
    gamma, eps, clip = 2.0, 1e-3, 0.5
    model = make_model().double()
    ids, targets, weights = batch(model.vocab, seed=5)
    weights = weights.double()
    head = [model.lm_head.weight, model.lm_head.bias]
    lfh = head_loss(model, targets, weights)

    theta = snapshot(model)
    loss = lfh(trunk(model, ids))
    g1 = torch.autograd.grad(loss, list(model.parameters()))
    g1 = dict(zip([n for n, _ in model.named_parameters()], g1))
    g1_head = [g1["lm_head.weight"], g1["lm_head.bias"]]
    n1 = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1_head]))
    s1 = min(1.0, clip / (float(n1) + 1e-6))
    assert s1 < 1  # the clip is active
    with torch.no_grad():
        for p, g in zip(head, g1_head):
            p.add_(eps * s1 * g)
    g2_head = torch.autograd.grad(lfh(trunk(model, ids)), head)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])
    n2 = torch.linalg.vector_norm(torch.stack([g.norm() for g in g2_head]))
    s2 = min(1.0, clip / (float(n2) + 1e-6))
    want = dict(g1)
    for name, a1, a2 in zip(("lm_head.weight", "lm_head.bias"), g1_head, g2_head):
        want[name] = a1 + (gamma / eps) * (s2 * a2 - s1 * a1)

    opt = make_opt(model, strength=gamma, eps=eps, clip=clip, eps_mode="absolute")  # θ' = θ + ε·s1·g1, as above
    opt.zero_grad()
    hidden = trunk(model, ids)
    lfh(hidden).backward()
    head_perturbed_pass(opt, hidden, lfh)
    opt.combine()
    assert_same(snapshot(model), theta)
    got = grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)
        if not n.startswith("lm_head"):
            assert torch.equal(got[n], g1[n]), n
    rel = (got["lm_head.weight"] - g1["lm_head.weight"]).norm() / g1["lm_head.weight"].norm()
    assert rel > 0.1


@settings(max_examples=12, deadline=None)
@given(vocab=st.integers(2, 20), width=st.sampled_from([4, 8, 12]), layers=st.integers(1, 2),
       n=st.integers(1, 5), length=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_fuzz_shapes_cached_equals_rerun(vocab, width, layers, n, length, seed):
    a = make_model(vocab=vocab, max_len=length, width=width, layers=layers, seed=seed)
    b = copy.deepcopy(a)
    oa, ob = make_opt(a), make_opt(b)
    ids, targets, weights = batch(vocab, n, length, seed)
    hidden = trunk(a, ids)
    lfh = head_loss(a, targets, weights)
    lfh(hidden).backward()
    head_perturbed_pass(oa, hidden, lfh)
    oa.step()
    full = head_loss(b, targets, weights)
    ob.step(lambda: full(trunk(b, ids)).backward())
    assert_same(snapshot(a), snapshot(b))


def test_one_call_step_replays_dropout_and_equals_step_with_closure():
    """head_gr_step with dropout in the head part of the loss: the perturbed pass draws the same mask (RNG
    replayed), so it equals GradReg.step(closure) rerunning the whole model."""
    a = make_model()
    b = copy.deepcopy(a)
    oa, ob = make_opt(a), make_opt(b)
    for step in range(2):
        ids, targets, weights = batch(a.vocab, seed=step)

        def lfh_of(model):
            inner = head_loss(model, targets, weights)
            return lambda h: inner(F.dropout(h, 0.3, training=True))

        torch.manual_seed(100 + step)
        la = head_gr_step(oa, lambda: trunk(a, ids), lfh_of(a))
        torch.manual_seed(100 + step)
        lb = ob.step(lambda: (lambda loss: (loss.backward(), loss)[1])(lfh_of(b)(trunk(b, ids))))
        assert torch.equal(la, lb.detach())
        assert_same(snapshot(a), snapshot(b))
    assert oa.metrics()["gr_rel"] > 0


# ------------------------------------------------------------------------------------------ groups
def test_groups_are_what_they_say():
    model = make_model()
    model.pos_emb.weight.requires_grad_(False)
    groups = head_param_groups(model, 3.0, lr=0.5)
    assert len(groups) == 2
    head, rest = groups
    assert [id(p) for p in head["params"]] == [id(model.lm_head.weight), id(model.lm_head.bias)]
    assert head["gr_strength"] == 3.0 and head["gr_head"] is True and head.get("gr_enabled", True) is True
    assert rest["gr_enabled"] is False and "gr_strength" not in rest and not rest.get("gr_head", False)
    assert head["lr"] == rest["lr"] == 0.5
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(listed) == len(set(listed)) and sorted(listed) == sorted(trainable)
    assert id(model.pos_emb.weight) not in listed
    opt = GradReg(torch.optim.SGD(groups), strength=1.0, eps=1e-2)
    assert {id(p) for p in opt.engine.candidates()} == {id(model.lm_head.weight), id(model.lm_head.bias)}

    class Plain(nn.Module):  # no get_output_embeddings: the module named lm_head
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.lm_head = nn.Linear(4, 5, bias=False)

    plain = Plain()
    assert [id(p) for p in head_param_groups(plain, 1.0)[0]["params"]] == [id(plain.lm_head.weight)]
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    g = head_param_groups(seq, 1.0, head=seq[2])
    assert [id(p) for p in g[0]["params"]] == [id(seq[2].weight), id(seq[2].bias)]
    assert [id(p) for p in g[1]["params"]] == [id(seq[0].weight), id(seq[0].bias)]


def test_group_refusals():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no output head found"):
        head_param_groups(seq, 1.0)
    with pytest.raises(ValueError, match="not a submodule"):
        head_param_groups(seq, 1.0, head=nn.Linear(4, 2))
    for bad in (-1.0, float("nan"), float("inf"), True, "1", None):
        with pytest.raises(ValueError, match="strength"):
            head_param_groups(seq, bad, head=seq[2])
    with pytest.raises(ValueError, match="gr_enabled"):
        head_param_groups(seq, 1.0, head=seq[2], gr_enabled=True)
    seq[2].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        head_param_groups(seq, 1.0, head=seq[2])


def test_tied_embeddings_are_refused():
    tied = make_model()
    tied.lm_head.weight = tied.tok_emb.weight  # the same Parameter: input and output embeddings tied
    with pytest.raises(ValueError, match=r"tied input/output embeddings.*Untie"):
        head_param_groups(tied, 1.0)
    shared = make_model()
    shared.lm_head.weight = nn.Parameter(shared.tok_emb.weight.data)  # two Parameters over one storage
    with pytest.raises(ValueError, match="'tok_emb.weight'"):
        head_param_groups(shared, 1.0)


def test_per_step_graph_check_catches_a_tie_the_groups_did_not_see():
    """Groups written by hand around tied embeddings: the hidden states' autograd graph reaches the GR weight, so
    the head-only pass is refused before anything moves."""
    model = make_model()
    model.lm_head.weight = model.tok_emb.weight
    head = [model.lm_head.weight, model.lm_head.bias]
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    opt = GradReg(torch.optim.SGD([{"params": head, "gr_head": True}, {"params": rest, "gr_enabled": False}],
                                  lr=0.1), strength=1.0, eps=1e-2)
    ids, targets, weights = batch(model.vocab)
    hidden = trunk(model, ids)
    lfh = head_loss(model, targets, weights)
    lfh(hidden).backward()
    before, g1 = snapshot(model), grads(model)
    with pytest.raises(ValueError, match="hidden states depend on a GR parameter"):
        head_perturbed_pass(opt, hidden, lfh)
    assert_same(snapshot(model), before)
    assert_same(grads(model), g1)


@pytest.mark.parametrize("how", ["all_params", "rest_enabled", "explicit_head"])
def test_trunk_parameters_in_gr_are_refused(how):
    model = make_model()
    if how == "all_params":  # plain GradReg over every parameter: no head group at all
        opt = GradReg(torch.optim.AdamW(model.parameters(), lr=1e-2), strength=1.0, eps=1e-2)
    else:
        groups = head_param_groups(model, 1.0)
        groups[1]["gr_enabled"] = True  # the trunk's group back in GR
        opt = GradReg(torch.optim.AdamW(groups, lr=1e-2), strength=1.0, eps=1e-2)
    ids, targets, weights = batch(model.vocab)
    hidden = trunk(model, ids)
    lfh = head_loss(model, targets, weights)
    lfh(hidden).backward()
    before, g1 = snapshot(model), grads(model)
    kw = {"head": model.lm_head} if how == "explicit_head" else {}
    match = "no head group" if how == "all_params" else "not head parameters"
    with pytest.raises(ValueError, match=match):
        head_perturbed_pass(opt, hidden, lfh, **kw)
    assert_same(snapshot(model), before)
    assert_same(grads(model), g1)
    assert opt.active and opt.engine.phase == "idle"
    if how == "all_params":  # with head= it names the trunk parameters instead
        with pytest.raises(ValueError, match="not head parameters"):
            head_perturbed_pass(opt, hidden, lfh, head=model.lm_head)


def test_inactive_and_exact_are_refused():
    model = make_model()
    ids, targets, weights = batch(model.vocab)
    lfh = head_loss(model, targets, weights)
    warm = make_opt(model, warmup_steps=1)
    hidden = trunk(model, ids)
    lfh(hidden).backward()
    with pytest.raises(RuntimeError, match="inactive"):
        head_perturbed_pass(warm, hidden, lfh)
    with pytest.raises(ValueError, match="exact"):
        head_perturbed_pass(make_opt(model, estimator="exact"), hidden, lfh)
    with pytest.raises(TypeError, match="GradReg"):
        check_head_only(torch.optim.SGD(model.parameters(), lr=0.1), hidden)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("fail", ["raise_after_forward", "no_grad_loss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_in_loss_restores_bitwise_and_the_next_step_is_normal(fail, backend):
    """An exception from the user's loss at the perturbed head (or from its backward) leaves every parameter and
    gradient as at θ, the optimizer idle; the next step equals that of a twin that never saw the failure."""
    a = make_model()
    b = copy.deepcopy(a)
    oa, ob = make_opt(a, backend=backend), make_opt(b, backend=backend)
    ids, targets, weights = batch(a.vocab)
    hidden = trunk(a, ids)
    lfh = head_loss(a, targets, weights)
    lfh(hidden).backward()
    before, g1 = snapshot(a), grads(a)

    def bad(h):
        loss = lfh(h)
        assert not torch.equal(a.lm_head.weight, before["lm_head.weight"])  # called at the perturbed head
        if fail == "raise_after_forward":
            raise KeyError("user error")
        return loss.detach()  # backward of a tensor without grad raises inside the pass

    with pytest.raises(KeyError if fail == "raise_after_forward" else RuntimeError):
        head_perturbed_pass(oa, hidden, bad)
    assert_same(snapshot(a), before)
    assert_same(grads(a), g1)
    assert oa.engine.phase == "idle" and oa.metrics()["step"] == 0

    for model, opt in ((a, oa), (b, ob)):
        ids, targets, weights = batch(model.vocab, seed=9)
        head_gr_step(opt, lambda model=model: trunk(model, ids), head_loss(model, targets, weights))
    assert_same(snapshot(a), snapshot(b))
    assert oa.metrics() == ob.metrics()


# ------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_only_pass_keeps_no_copy_of_the_trunk_gradients(backend):
    """The head-only pass perturbs with ``keep_untouched=True``: the backend holds θ and g1 of the head only
    (one gradient copy of the trunk less than a GradReg whose perturbed pass reruns the model), same result."""
    model = make_model()
    twin = copy.deepcopy(model)
    ids, targets, weights = batch(11)
    held = []
    for m, head_only in ((model, True), (twin, False)):
        opt = make_opt(m, backend=backend)
        loss_from_hidden = head_loss(m, targets, weights)
        hidden = trunk(m, ids)
        loss_from_hidden(hidden).backward()
        if head_only:
            head_perturbed_pass(opt, hidden, loss_from_hidden)
        else:
            opt.perturb()
            loss_from_hidden(trunk(m, ids)).backward()
        held.append(opt.extra_memory_bytes())
        opt.step()
    head_bytes = sum(p.numel() * (p.element_size() + p.grad.element_size()) for p in model.lm_head.parameters())
    trunk_grad_bytes = sum(p.grad.numel() * p.grad.element_size() for n, p in model.named_parameters()
                           if not n.startswith("lm_head"))
    assert held[0] == head_bytes and held[1] == head_bytes + trunk_grad_bytes
    assert_same(snapshot(model), snapshot(twin))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_that_touches_the_trunk_after_keep_untouched_is_an_error(backend):
    """``perturb(keep_untouched=True)`` is a promise the combine checks: a loss that reaches a trunk gradient (here a
    term on a trunk weight) raises there, θ is restored bitwise and the optimizer stays usable."""
    model = make_model()
    ids, targets, weights = batch(11)
    opt = make_opt(model, backend=backend)
    loss_from_hidden = head_loss(model, targets, weights)
    theta = snapshot(model)
    hidden = trunk(model, ids)
    loss_from_hidden(hidden).backward()
    leaky = lambda h: loss_from_hidden(h) + 1e-3 * model.blocks[0].qkv.weight.square().sum()  # noqa: E731
    head_perturbed_pass(opt, hidden, leaky)
    with pytest.raises(RuntimeError, match="outside GR"):
        opt.combine()
    assert_same(snapshot(model), theta)
    opt.zero_grad()
    loss_from_hidden(trunk(model, ids)).backward()  # the step redone: a normal GR step goes through
    head_perturbed_pass(opt, trunk(model, ids), loss_from_hidden)
    opt.step()
    assert opt.metrics()["gr_rel"] > 0 and not torch.equal(model.lm_head.weight, theta["lm_head.weight"])
