"""What the host integrations share (grkernels.integrations.common) and the paper's exclusion (grkernels.params):
the one metric-averaging rule against a float64 recomputation, the micro-batch window and its RNG replay, the sync
switch, the settings helpers and the fp16 refusal; paper_exclude on hand-written models (heads named out / output /
head, vocabulary projections, attention projections inside blocks left alone)."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grkernels import GradReg, paper_exclude
from grkernels.integrations.common import (
    COUNTERS,
    MetricsLog,
    Window,
    build_grad_reg,
    end_window,
    host_settings,
    refuse_loss_scaling,
    replay_window,
    sync_context,
)


# ---------------------------------------------------------------- the one averaging rule
class FakeSteps:
    """Stands in for a GradReg: ``metrics(sync=False)`` returns the next prepared step's metrics."""

    def __init__(self, steps: list[dict]) -> None:
        self.steps, self.i = steps, -1

    def metrics(self, sync: bool = True) -> dict:
        self.i += 1
        return self.steps[self.i]


finite_or_nan = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(math.nan))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite_or_nan, finite_or_nan, st.floats(0, 10), st.booleans()), min_size=1, max_size=7),
       st.booleans())
def test_metrics_log_averages_values_and_keeps_the_last_counters(rows, sync):
    """Values: the mean over the recorded steps that measured them (NaN = not measured); counters (step,
    skipped): the last step's; a key a step lacks (reuse_cos) averaged over the steps that have it."""
    steps = []
    for k, (g2, rel, gamma, reuse) in enumerate(rows):
        m = {"g2_norm": torch.tensor(g2, dtype=torch.float32), "gr_rel": torch.tensor(rel), "strength": gamma,
             "step": k + 1, "skipped": torch.tensor(k // 2)}
        if reuse:
            m["reuse_cos"] = torch.tensor(0.5 + k)
        steps.append(m)
    fake, log = FakeSteps(steps), MetricsLog()
    for _ in steps:
        log.record(fake)
    out = log.flush(sync)
    assert len(log) == 0 and log.summary() == {}

    def mean(key):
        vals = [float(s[key]) for s in steps if key in s and not math.isnan(float(s[key]))]
        return sum(vals) / len(vals) if vals else math.nan

    expected = {"g2_norm": mean("g2_norm"), "gr_rel": mean("gr_rel"), "strength": mean("strength"),
                "step": float(len(steps)), "skipped": float((len(steps) - 1) // 2)}
    if any("reuse_cos" in s for s in steps):
        expected["reuse_cos"] = mean("reuse_cos")
    assert sorted(out) == sorted(expected) and set(COUNTERS) <= set(out)
    for key, want in expected.items():
        got = float(out[key])
        if not sync:
            assert isinstance(out[key], torch.Tensor) and out[key].dtype == torch.float32
        if math.isnan(want):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(want, rel=1e-6 if sync else 1e-6, abs=1e-6 * (1 + abs(want))), key


def test_metrics_log_copies_what_a_backend_reuses():
    buf = torch.tensor(1.0)
    fake, log = FakeSteps([{"gr_rel": buf, "step": 1}, {"gr_rel": buf, "step": 2}]), MetricsLog()
    log.record(fake)
    buf.fill_(3.0)  # a backend writing its next step's metric into the same buffer
    log.record(fake)
    assert log.flush() == {"gr_rel": 2.0, "step": 2.0, "skipped": 0.0}


# ---------------------------------------------------------------- window and replay
def test_window_records_and_replays_rng_in_order():
    w = Window()
    draws = []
    for _ in range(3):
        w.at_micro_batch()
        draws.append(torch.rand(2))
    assert len(w) == 3
    after = torch.get_rng_state()
    w.rewind(2)
    for k in range(2):
        w.at_micro_batch()
        assert torch.equal(torch.rand(2), draws[k])  # the same masks as the first pass
    w.check_complete()
    with pytest.raises(RuntimeError, match="more micro-batches than the 2 recorded"):
        w.at_micro_batch()
    w.rewind()
    w.at_micro_batch()
    with pytest.raises(RuntimeError, match="ran 1 micro-batches, the pass at θ 3"):
        w.check_complete()
    assert len(w.take()) == 3 and len(w) == 0 and not w.replaying
    torch.set_rng_state(after)


class FakeGR:
    """Records the calls the window helpers make."""

    def __init__(self, passes: int, fail_at: int | None = None) -> None:
        self.extra_passes, self.calls, self.fail_at = passes, [], fail_at

    def __getattr__(self, name):
        if name in ("perturb", "restore_and_combine", "restore", "combine"):
            return lambda: self.calls.append(name)
        raise AttributeError(name)


@pytest.mark.parametrize("passes", [0, 1, 2])
def test_end_window_replays_each_pass_or_combines(passes):
    w = Window()
    for k in range(3):
        w.record(k)
        torch.rand(1)
    items = w.take()
    gr, seen = FakeGR(passes), []
    before = torch.get_rng_state()
    end_window(gr, items, lambda mb, last: seen.append((mb.args[0], last, torch.rand(1))))
    assert torch.equal(torch.get_rng_state(), before)  # the RNG continues where the caller left it
    if passes == 0:
        assert gr.calls == ["combine"] and not seen
    else:
        assert gr.calls == ["perturb"] * passes + ["restore_and_combine"]
        assert [(i, last) for i, last, _ in seen] == [(0, False), (1, False), (2, True)] * passes
        for k, (_, _, draw) in enumerate(seen):
            item = items[k % 3]
            item.rng.replay()
            assert torch.equal(draw, torch.rand(1))
        torch.set_rng_state(before)


def test_replay_window_restores_on_error_and_end_window_refuses_an_empty_window():
    w = Window()
    w.record("a")
    gr = FakeGR(1)

    def boom(mb, last):
        raise ValueError("at theta'")

    with pytest.raises(ValueError, match="at theta'"):
        replay_window(gr, w.take(), boom)
    assert gr.calls == ["perturb", "restore"]
    gr = FakeGR(1)
    with pytest.raises(RuntimeError, match="no micro-batch of this accumulation window was recorded"):
        end_window(gr, [], lambda mb, last: None)
    assert gr.calls == ["restore"]


def test_sync_context_reduces_where_the_first_pass_did():
    class Acc:
        distributed_type = "MULTI_CPU"

        def __init__(self, each):
            self.gradient_state = type("S", (), {"plugin_kwargs": {"sync_each_batch": each}})()
            self.no_sync_calls = 0

        def no_sync(self, model):
            self.no_sync_calls += 1
            return contextlib.nullcontext()

    acc = Acc(False)
    for last in (False, False, True):
        with sync_context(acc, None, last):
            pass
    assert acc.no_sync_calls == 2
    acc = Acc(True)
    with sync_context(acc, None, False):
        pass
    assert acc.no_sync_calls == 0


# ---------------------------------------------------------------- settings and refusals
def test_host_settings_checks_every_host_and_build_grad_reg_gets_every_engine_setting():
    with pytest.raises(ValueError, match="estimator='exact': not supported under verl"):
        host_settings({"estimator": "exact"}, host="verl")
    with pytest.raises(ValueError, match="lean=True: not supported under deepspeed"):
        host_settings({"grad_reg_lean": True}, host=("hf", "deepspeed"), prefix="grad_reg_")
    s = host_settings({"strength": "auto", "target_rel": 0.2, "every": 2, "reuse": "orthogonal", "seed": 3,
                       "rounding": "nearest", "exclude": ["0."]})
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    gr = build_grad_reg(torch.optim.SGD(model.parameters(), lr=0.1), s, model)
    assert isinstance(gr, GradReg) and gr.engine.settings.as_dict("engine") == s.as_dict("engine")
    excluded = {id(e.tensor) for e in gr.engine.source.entries() if e.excluded}
    assert excluded == {id(model[0].weight), id(model[0].bias)}


def test_fp16_refusal_names_the_host_and_the_fix():
    refuse_loss_scaling("X", False, "fix")
    with pytest.raises(NotImplementedError, match="GR under Lightning: fp16 with a loss scaler .* Use bf16"):
        refuse_loss_scaling("Lightning", True, "Use bf16.")


# ---------------------------------------------------------------- paper_exclude on hand-written models
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)  # an attention's `out`: not a head


@pytest.mark.parametrize("head_name", ["out", "output", "head"])
def test_paper_exclude_finds_a_named_head_and_leaves_block_projections(head_name):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.blocks = nn.ModuleList([Block(8) for _ in range(2)])
            setattr(self, head_name, nn.Linear(8, 5))  # no embedding: found by its name

    net = Net()
    head = getattr(net, head_name)
    assert {id(p) for p in paper_exclude(net)} == {id(head.weight), id(head.bias)}


def test_paper_exclude_finds_a_vocabulary_projection_and_the_embeddings():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(11, 8)
            self.blocks = nn.ModuleList([Block(8) for _ in range(2)])
            self.proj = nn.Linear(8, 11, bias=False)  # onto the vocabulary
            self.value = nn.Linear(8, 1)

    lm = LM()
    assert {id(p) for p in paper_exclude(lm)} == {id(lm.tok.weight), id(lm.proj.weight)}


def test_paper_exclude_warns_when_it_finds_nothing():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="found no embedding and no output head"):
        assert paper_exclude(mlp) == []
    named = nn.Sequential()
    named.add_module("body", nn.Linear(4, 8))
    named.add_module("head", nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {id(p) for p in paper_exclude(named)} == {id(named.head.weight), id(named.head.bias)}


def test_paper_exclude_on_a_hugging_face_model_is_embeddings_and_lm_head_only():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)] for p in paper_exclude(model)) == ["lm_head.weight", "model.embed_tokens.weight"]


# ---------------------------------------------------------------- the docs' settings tables are the schema's
DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def settings_tables() -> str:
    """The settings and host-limit tables of docs/integrations.md, rendered from grkernels.settings."""
    from grkernels.settings import HOST_LIMITS, SETTINGS

    rows = ["| setting | default | scope | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        scope = "engine" if s.scope == "engine" else "host (batch-splitting hosts)"
        rows.append(f"| `{s.name}` | `{s.default!r}` | {scope} | {s.help} |")
    rows += ["", "| host | setting = value | why it is refused |", "|---|---|---|"]
    for host, limits in HOST_LIMITS.items():
        for name, refused in limits.items():
            for value, why in refused.items():
                rows.append(f"| {host} | `{name}={value!r}` | {why} |")
    return "\n".join(rows)


def test_docs_settings_tables_are_generated_from_the_schema():
    """docs/integrations.md carries the tables between its settings-table markers exactly as rendered here from the
    schema, so they cannot drift (on a change, paste the message's text between the markers)."""
    text = DOCS.read_text()
    begin, end = "<!-- settings-table:begin (generated by tests/test_integration_common.py) -->", \
        "<!-- settings-table:end -->"
    assert begin in text and end in text
    current = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert current == settings_tables(), "docs/integrations.md's settings tables are stale; replace them by:\n\n" \
        + settings_tables()
