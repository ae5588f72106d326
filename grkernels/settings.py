"""The one definition of every GR setting: its default, its validation and its help text.

Everything that takes GR settings derives from :data:`SETTINGS`: ``GradReg``'s keyword arguments, the
``grad_reg_*`` fields of Hugging Face / TRL configs (:func:`prefixed_fields`), verl's ``optim.grad_reg.*``
(:func:`prefixed_fields` with no prefix), the Lightning / Accelerate helpers and DeepSpeed. A value is checked once,
by :func:`resolve`, with one message per problem in every host; a host that cannot run a value (e.g. the exact
estimator where the gradient has no graph) names it in :data:`HOST_LIMITS` and is refused by the same call, when
its config is built.

The settings (γ is the strength, ε the finite-difference step; the combined gradient is
``g1 + (γ/ε)(clip(g2) − clip(g1)) ≈ ∇L + γ·H·clip(g1)``)::

    strength     γ (1/loss units), or "auto": adjusted each full GR step so that gr_rel = ‖GR − g1‖/‖g1‖ tracks
                 target_rel (grkernels.strength)
    target_rel   the gr_rel the adaptive strength holds (dimensionless)
    eps, eps_mode  ε and how it sets the perturbation: 'radius' (‖θ' − θ‖ = ε) or 'absolute' (θ' − θ = ε·clip(g1))
    ...          (see each Setting's help below, or ``grkernels info --settings``)

The defaults are the recommended set (README, "Choosing γ, ε and the target"): strength="auto", target_rel=3,
eps_mode="radius", eps=0.02, so that ``GradReg(opt)`` and every host's config at its defaults run a GR that acts
(gr_rel held at 3) and whose perturbation survives low-precision weights. The paper's fixed setting is
strength=1e-2, eps_mode="absolute", eps=1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ESTIMATORS", "HOST_LIMITS", "REUSE_MODES", "SETTINGS", "Below", "GRSettings", "Setting", "resolve",
           "prefixed_fields", "settings_help"]

ESTIMATORS = ("forward", "central", "exact")
REUSE_MODES = ("none", "orthogonal")
EPS_MODES = ("absolute", "radius")
ROUNDINGS = ("stochastic", "nearest")
BACKENDS = ("auto", "torch", "cpp", "triton")
SUBSET_RULES = ("advantage", "random")


class _WrongType(str):
    """A check's answer when the value has the wrong type (raised as TypeError, not ValueError)."""


def _number(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return _WrongType("must be a finite number")
        if not math.isfinite(v):
            return "must be a finite number"
        if v < lo or (lo_open and v == lo) or v > hi:
            left = "(" if lo_open else "["
            return f"must be in {left}{lo:g}, {hi:g}]"
        return None

    return check


def _whole(lo: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return _WrongType(f"must be a whole number >= {lo}")
        if v < lo:
            return f"must be a whole number >= {lo}"
        return None

    return check


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(map(repr, options))}"

    return check


def _strength(v: Any) -> str | None:
    if v == "auto":
        return None
    err = _number(0.0)(v)
    return None if err is None else 'must be a finite number >= 0 or "auto"'


def _clip(v: Any) -> str | None:
    return None if v is None else _number(0.0, lo_open=True)(v)


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else _WrongType("must be True or False")


def _optional_positive(v: Any) -> str | None:
    return None if v is None else _number(0.0, lo_open=True)(v)


def _names(v: Any) -> str | None:
    if v is None or (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)):
        return None
    return "must be a list of parameter-name substrings, 'none', or None"


def _same(v: Any) -> Any:
    return v


@dataclass(frozen=True)
class Setting:
    """One GR setting: ``name`` (as ``GradReg`` takes it; hosts add their prefix), ``default``, ``help`` (one
    line, with units), ``check`` (None if the value is valid, else what is wrong), ``annotation`` (the type a
    config dataclass field gets), ``scope``: "engine" (every host) or "host" (only where a host splits batches)."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], str | None]
    annotation: Any  # the type a config field gets (what HfArgumentParser parses the command line as)
    scope: str = "engine"
    parse: Callable[[Any], Any] = _same  # command-line spellings -> the value (e.g. "1e-3" -> 0.001)


def _clip_parse(v: Any) -> Any:
    """A command line cannot write None: a clip <= 0 (or the string "none") means no clip."""
    if isinstance(v, str):
        v = None if v.lower() in ("none", "null", "") else float(v)
    return None if v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and v <= 0 else v


def _strength_parse(v: Any) -> Any:
    if isinstance(v, str) and v != "auto":
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _optional_parse(v: Any) -> Any:
    if isinstance(v, str):
        return None if v.lower() in ("none", "null", "") else float(v)
    return v


def _names_parse(v: Any) -> Any:
    if isinstance(v, str):
        v = [v]
    if v is not None and [s.lower() for s in v] == ["none"]:
        return []
    return None if v is None else list(v)


SETTINGS: tuple[Setting, ...] = (
    Setting("strength", "auto",
            'γ, the weight of the penalty (γ/2)·‖∇L‖² (1/loss units), or "auto": γ adjusted each full GR step so '
            "that gr_rel = ‖GR − g1‖/‖g1‖ tracks target_rel. 0 turns GR off (no second pass).",
            _strength, str, parse=_strength_parse),
    Setting("target_rel", 3.0,
            'strength="auto": the gr_rel (dimensionless, ‖GR − g1‖/‖g1‖) the adaptive strength holds.',
            _number(0.0, lo_open=True), float),
    Setting("strength_init", None,
            'strength="auto": the γ of the first GR step (None: 1e-2); the controller moves it by at most ×2 a step.',
            _optional_positive, float | None, parse=_optional_parse),
    Setting("eps", 0.02,
            "ε, the finite-difference step: with eps_mode='radius' the perturbation's norm ‖θ' − θ‖ (parameter "
            "units), with 'absolute' θ' = θ + ε·clip(g1) (parameter units per gradient unit; the paper's 1e-3).",
            _number(0.0, lo_open=True), float),
    Setting("eps_mode", "radius",
            "'radius' (θ' = θ + ε·v/‖v‖, v = clip(g1): the same accuracy at any gradient scale, and with eps=0.02 "
            "the perturbation survives bf16/fp16 rounding) or 'absolute' (the paper's θ' = θ + ε·clip(g1)).",
            _one_of(EPS_MODES), str),
    Setting("g1_clip", 10.0, "max norm of g1 for the perturbation direction (None or <= 0: no clip).",
            _clip, float | None, parse=_clip_parse),
    Setting("g2_clip", 10.0, "max norm of g2 (None or <= 0: no clip). Keep it equal to g1_clip.",
            _clip, float | None, parse=_clip_parse),
    Setting("estimator", "forward",
            "'forward' (the paper's, 1 extra forward/backward), 'central' (2, robust over ε) or 'exact' (double "
            "backprop H·v; needs loss.backward(create_graph=True)).",
            _one_of(ESTIMATORS), str),
    Setting("warmup_steps", 0, "optimizer steps without GR (no second pass) before GR starts.", _whole(0), int),
    Setting("every", 1, "run the full GR step (the extra pass) on every k-th step after warmup only.", _whole(1), int),
    Setting("reuse", "none",
            "between full GR steps: 'none' (plain gradient) or 'orthogonal' (the last correction, orthogonal to the "
            "current gradient, at its relative size; LookSAM-style).",
            _one_of(REUSE_MODES), str),
    Setting("rounding", "stochastic",
            "how θ' is rounded onto bf16/fp16 weights: 'stochastic' (unbiased, keeps ε·v alive) or 'nearest'.",
            _one_of(ROUNDINGS), str),
    Setting("backend", "auto",
            "GR-step implementation: 'auto' (Triton on CUDA, C++ on CPU when built, else torch), 'torch', 'cpp', "
            "'triton'.",
            _one_of(BACKENDS), str),
    Setting("lean", False, "C++/Triton: keep g1 of fp32 gradients in bf16 (4 instead of 6 B per bf16 parameter).",
            _flag, bool),
    Setting("skip_nonfinite", True,
            "skip (and count) a step whose gradients hold inf/NaN; costs one host read of a flag per step.",
            _flag, bool),
    Setting("seed", 0, "seed of the stochastic rounding (the step index is mixed in; resuming reproduces it).",
            _whole(0), int),
    Setting("exclude", None,
            "parameter-name substrings left out of GR (they get g1). None: the embeddings and output head, as in "
            "the paper; 'none' or []: GR on every parameter.",
            _names, list[str] | None, scope="host", parse=_names_parse),
    Setting("subset_fraction", 1.0,
            "sub-batch GR: the pass at θ' runs on this share of the batch (whole micro-batches); 1: full GR.",
            _number(0.0, 1.0, lo_open=True), float, scope="host"),
    Setting("subset_by", "advantage",
            "which sequences the sub-batch pass takes: 'advantage' (largest Σ|A|, RL hosts) or 'random'.",
            _one_of(SUBSET_RULES), str, scope="host"),
)

_BY_NAME = {s.name: s for s in SETTINGS}

class Below(float):
    """A :data:`HOST_LIMITS` key that refuses every value below it (e.g. ``Below(1.0)``: a fraction < 1)."""

    def matches(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and value < self

    def __repr__(self) -> str:
        return f"<{float(self):g}"


def _refused(value: Any, key: Any) -> bool:
    return key.matches(value) if isinstance(key, Below) else type(value) is type(key) and value == key


#: What each host cannot run, as {setting: {value (or Below(x)): why}}; checked by :func:`resolve` when a host's
#: config is built, so every host refuses with the same message.
HOST_LIMITS: dict[str, dict[str, dict[Any, str]]] = {
    "hf": {
        "estimator": {"exact": "the Trainer's training_step calls loss.backward() without create_graph=True, so "
                               "the gradient has no graph to differentiate again; use 'forward' or 'central'"},
    },
    "verl": {
        "estimator": {"exact": "FSDP2 reduces gradients outside autograd, so the gradient has no graph to "
                               "differentiate again; use 'forward' or 'central'"},
    },
    "deepspeed": {
        "estimator": {"exact": "DeepSpeed reduces gradients into flat partitions outside autograd, so the gradient "
                               "has no graph to differentiate again; use 'forward' or 'central'"},
        "lean": {True: "the gradient partitions belong to DeepSpeed's reduction buffers; lean mode would leave "
                       "g − g1 in them between the passes. Use lean=False"},
        "subset_fraction": {Below(1.0): "DeepSpeed reduces gradients only at the accumulation boundary, so the "
                                        "subset's reduced gradient g1_S never exists; use subset_fraction=1 (every / "
                                        "reuse for a cheaper GR), or DDP / FSDP2"},
    },
    "ddp": {
        "estimator": {"exact": "DDP (and FSDP) reduce the gradients in their own hooks outside autograd, so the "
                               "gradient has no graph to differentiate again; use 'forward' or 'central'"},
    },
}


def _error(name: str, value: Any, why: str) -> ValueError | TypeError:
    return (TypeError if isinstance(why, _WrongType) else ValueError)(f"GR setting {name}={value!r}: {why}")


@dataclass
class GRSettings:
    """Validated GR settings (:data:`SETTINGS`, with their defaults). Build with :func:`resolve`."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def as_dict(self, scope: str | None = None) -> dict[str, Any]:
        """The values, all of them or those of one scope ("engine" / "host")."""
        return {k: v for k, v in self.values.items() if scope is None or _BY_NAME[k].scope == scope}

    def replace(self, **changes: Any) -> GRSettings:
        return resolve({**self.values, **changes})


def resolve(values: Mapping[str, Any] | None = None, *, host: str | None = None, prefix: str = "",
            strict: bool = True, scope: str | None = None) -> GRSettings:
    """Validated settings from ``values`` (keys: setting names, optionally with ``prefix``; missing keys take the
    defaults). Unknown keys are a TypeError when ``strict``; so are keys outside ``scope`` (e.g. "engine" for
    ``GradReg``, whose exclusions are tensors and whose batches it never sees). Raises ValueError (TypeError for a
    wrong type) naming the first bad value, and for ``host`` (a key of :data:`HOST_LIMITS`) each value that host
    cannot run."""
    out = {s.name: s.default for s in SETTINGS}
    for key, value in (values or {}).items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name not in _BY_NAME or (scope is not None and _BY_NAME[name].scope != scope):
            if strict:
                known = ", ".join(prefix + s.name for s in SETTINGS if scope is None or s.scope == scope)
                raise TypeError(f"unknown GR setting {key!r}; known: {known}")
            continue
        out[name] = _BY_NAME[name].parse(value)
    for s in SETTINGS:
        why = s.check(out[s.name])
        if why is not None:
            raise _error(s.name, out[s.name], why)
    if out["subset_fraction"] < 1.0 and out["estimator"] == "exact":
        raise _error("subset_fraction", out["subset_fraction"], "needs a finite-difference estimator (forward or "
                     "central): the exact estimator has no pass at θ' to run on a subset")
    if out["subset_fraction"] < 1.0 and out["lean"]:
        raise _error("subset_fraction", out["subset_fraction"], "needs lean=False (lean buffers carry g − g1)")
    for name, refused in HOST_LIMITS.get(host or "", {}).items():
        for key, why in refused.items():
            if _refused(out[name], key):
                raise _error(name, out[name], f"not supported under {host}: {why}")
    return GRSettings(out)


def prefixed_fields(prefix: str = "grad_reg_", scope: str | None = None) -> list[tuple[str, Any, Any]]:
    """``(name, annotation, dataclasses.field)`` per setting, for ``dataclasses.make_dataclass``: a host's config
    fields, with the schema's defaults and help (``metadata["help"]``, which HfArgumentParser shows)."""
    out = []
    for s in SETTINGS:
        if scope is not None and s.scope != scope:
            continue
        out.append((prefix + s.name, s.annotation, field(default=s.default, metadata={"help": s.help})))
    return out


def settings_help(prefix: str = "", scope: str | None = None) -> str:
    """One line per setting: name, default, help (for docstrings, docs and ``grkernels info``)."""
    return "\n".join(f"{prefix}{s.name} (default {s.default!r}): {s.help}" for s in SETTINGS
                     if scope is None or s.scope == scope)
