"""The differential harness: every spectral-norm FAST path held against its PLAIN twin, and
torch against Paddle, over whole training runs of real models.

dualsn's fast paths (Paddle: gradient hooks writing a rank-1 correction in place, host-side
sigma, in-place power iteration, an eval cache; torch: a fused autograd Function with a
closed-form gradient, an eval cache, sigma from the last power-iteration norm) are run against
the plain path of the same backend (``plain_path()``: ordinary ops, the framework's autograd
derives the whole gradient), model x pattern x preset x dtype x framework:

* models (:mod:`conformance.diff_models`): an SN-GAN projection discriminator, a ResNet
  block, and random stacks; each built identically in both frameworks from one set of
  canonical numpy parameters, every spectral norm seeded;
* patterns (:mod:`conformance.diff_patterns`): SGD and Adam runs, D(real) - D(fake),
  retain_graph, gradient accumulation, train -> eval -> train, a create_graph gradient
  penalty, a kept ``layer.weight``.

Each run records a trace (outputs, every gradient, input gradients, u, v, sigma per step).
Two traces agree when every quantity at every step does, measured in norms:
``err = ||a - b|| / max(||b||, floor)``, where for parameter gradients the floor is
1e-3 * ||whole model gradient|| of that step (BatchNorm makes the gradient of a bias in front
of it ~0: pure rounding noise, which only a floor keeps from counting). float64 traces must
agree within 1e-10; float32 traces within 3x the float32-vs-float64 spread of the plain path
on the same model and pattern (measured, not hard-coded: the largest err between a plain
float32 run and the plain float64 run on the same float32-rounded parameters and data, over
every installed framework), at least 1e-6. Besides, every check asserts that each run took
the path it claims in every spectral-norm layer (so it cannot pass vacuously) and the
invariants its pattern states (``Trace.invariants``).

Torch runs use one intra-op thread: on a busy 2-core machine its OpenMP threads made these
tiny runs 10-100x slower, and one thread fixes the order of float32 reductions whatever the
machine's core count.

``run(quick)`` returns pass/fail rows for ``dualsn check``; ``python -m pytest
conformance/test_differential.py`` runs the full matrix plus hypothesis-drawn stacks.
Frameworks are imported only when a check runs (einops-style, as :mod:`backends` does).
"""

from __future__ import annotations

import functools
import importlib
import math
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from backends.base import importable
from conformance import diff_models
from conformance.diff_models import PRESETS, ModelSpec, canonical_params
from conformance.diff_patterns import DOUBLE_BACKWARD, PATTERNS, Session, Trace

__all__ = [
    "DTYPES",
    "CROSS",
    "CHECKS",
    "PATTERNS",
    "STACK_PATTERNS",
    "DiffResult",
    "fixed_model",
    "fixed_cells",
    "numpy_stacks",
    "check",
    "run",
    "trace_error",
    "failures",
    "clear_cache",
]

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
DTYPES = ("float32", "float64")
FRAMEWORKS = {"torch": "backends._torch_models", "paddle": "backends._paddle_models"}
CROSS = "torch~paddle"
CHECKS = (*FRAMEWORKS, CROSS)
"""The framework column: fast vs plain in one framework, or torch's fast vs Paddle's fast."""

FLOAT64_RTOL = 1e-10
FLOAT32_SPREAD_FACTOR = 3.0
FLOAT32_MIN_BOUND = 1e-6
GRAD_FLOOR = 1e-3
"""Relative to the whole model gradient's norm: the floor of a parameter gradient's norm."""

STACK_PATTERNS = ("sgd", "real_minus_fake", "train_eval_train")
"""Patterns the random stacks run (a stack may start with an embedding, whose integer input
has no gradient to penalize, so no gradient penalty here)."""


# ---------------------------------------------------------------------------------------------
# The matrix.

_FIXED_MODELS: dict[str, Callable[[str], ModelSpec]] = {
    "sngan_discriminator": diff_models.sngan_discriminator,
    "sngan_discriminator_no_convtranspose": lambda preset: diff_models.sngan_discriminator(preset, False),
    "resnet": diff_models.resnet,
}


def fixed_model(name: str, preset: str) -> ModelSpec:
    """One of the fixed models ("sngan_discriminator", "sngan_discriminator_no_convtranspose",
    "resnet") under ``preset``."""
    return _FIXED_MODELS[name](preset)


def fixed_cells() -> list[tuple[str, str]]:
    """(model, pattern) pairs of the fixed models. Patterns that differentiate a gradient run
    the discriminator without its ConvTranspose2d: Paddle 3.3 has no double backward for
    conv2d_transpose (see ``diff_models.sngan_discriminator``), and both frameworks must run
    the same model."""
    cells = []
    for pattern in PATTERNS:
        disc = "sngan_discriminator_no_convtranspose" if pattern in DOUBLE_BACKWARD else "sngan_discriminator"
        cells += [(disc, pattern), ("resnet", pattern)]
    return cells


def numpy_stacks(count: int, seed: int = 1) -> list[ModelSpec]:
    """``count`` random stacks drawn by a seeded numpy generator (the tests draw theirs with
    hypothesis). With the default seed the first four cover every preset, an embedding first,
    transposed convolutions and negative dims."""
    rng = np.random.default_rng(seed)
    def choose(options):
        return options[rng.integers(len(options))]

    return [diff_models.random_stack(choose, f"stack{i}") for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Frameworks and runs.


@functools.lru_cache(maxsize=None)
def _framework(name: str):
    """(adapter, None) or (None, why not): the framework is imported here, on first use."""
    if not importable(name):
        return None, f"{name} is not installed (pip install \"dualsn[{name}]\")"
    try:
        return importlib.import_module(FRAMEWORKS[name]).FRAMEWORK, None
    except Exception as exc:  # a broken install is reported, not raised
        return None, f"importing {FRAMEWORKS[name]} failed: {exc!r}"


class RunError(Exception):
    """A run raised: the traceback is the message."""


@functools.lru_cache(maxsize=None)
def _trace(framework: str, spec: ModelSpec, pattern: str, dtype: str, data_dtype: str, plain: bool) -> Trace:
    """One run of ``pattern`` (cached: a trace serves several comparisons)."""
    fw, reason = _framework(framework)
    if fw is None:
        raise RuntimeError(reason)
    params = canonical_params(spec, data_dtype)
    try:
        # plain_path(False) too: the fast run must not inherit an enclosing plain switch
        with fw.one_thread(), fw.plain_path(plain):
            session = Session(fw, spec, params, dtype, data_dtype, pattern)
            PATTERNS[pattern](session)
            return session.trace()
    except Exception as exc:
        path = "plain" if plain else "fast"
        raise RunError(f"{framework} {path} {dtype} run failed:\n{traceback.format_exc(limit=8)}") from exc


def _run(framework: str, spec: ModelSpec, pattern: str, dtype: str, plain: bool) -> Trace:
    return _trace(framework, spec, pattern, dtype, dtype, plain)


def _float64_reference(framework: str, spec: ModelSpec, pattern: str) -> Trace:
    """The plain path in float64 on the float32 run's model and data."""
    return _trace(framework, spec, pattern, "float64", "float32", True)


# ---------------------------------------------------------------------------------------------
# Comparing traces.


@dataclass(frozen=True)
class Worst:
    """The largest error between two traces, and where it is."""

    error: float
    step: int
    quantity: str

    def __str__(self) -> str:
        return f"{self.error:.3g} at record {self.step}, {self.quantity}"


def _norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(np.ravel(a)))


def trace_error(actual: Trace, expected: Trace) -> Worst:
    """The largest err over all records and quantities (see the module docstring); inf when
    the traces differ in structure (records, quantities, shapes) or hold a non-finite value."""
    if len(actual.steps) != len(expected.steps):
        return Worst(math.inf, -1, f"{len(actual.steps)} records vs {len(expected.steps)}")
    worst = Worst(0.0, -1, "")
    for i, (got, want) in enumerate(zip(actual.steps, expected.steps)):
        if got.keys() != want.keys():
            return Worst(math.inf, i, f"quantities {sorted(got)} vs {sorted(want)}")
        grad_norm = math.sqrt(sum(_norm(v) ** 2 for k, v in want.items() if k.startswith("grad/")))
        for key, b in want.items():
            a = got[key]
            if a.shape != b.shape:
                return Worst(math.inf, i, f"{key}: shape {a.shape} vs {b.shape}")
            floor = GRAD_FLOOR * grad_norm if key.startswith("grad/") else 0.0
            err = _norm(a - b) / max(_norm(b), floor, 1e-300)
            if not err <= worst.error:  # also catches nan
                worst = Worst(err if math.isfinite(err) else math.inf, i, key)
    return worst


def _path_problems(trace: Trace, spec: ModelSpec, expected: str, who: str) -> list[str]:
    """Why ``trace`` did not take path ``expected`` in every spectral-norm layer, if so."""
    problems = []
    for layer in spec.sn_layers:
        seen = trace.paths.get(layer.name, set())
        if seen != {expected}:
            took = sorted(seen) or "no recorded"
            problems.append(f"{who}: {layer.name} took {took} path(s), expected only {expected!r}")
    return problems


def _invariant_problems(trace: Trace, who: str) -> list[str]:
    return [f"{who}: violated: {what}" for what, holds in trace.invariants if not holds]


def _bound(spec: ModelSpec, pattern: str, dtype: str) -> tuple[float, str]:
    """(tolerance, how it was set) for comparing two ``dtype`` traces of ``pattern`` on
    ``spec``. float32: from the model and pattern's spread, i.e. the largest
    float32-vs-float64 err of the plain path of every installed framework (each framework's
    own spread is a single noisy sample of the float32 rounding of this model and pattern)."""
    if dtype == "float64":
        return FLOAT64_RTOL, f"float64 tolerance {FLOAT64_RTOL:g}"
    spreads = {
        fw: trace_error(_run(fw, spec, pattern, "float32", True), _float64_reference(fw, spec, pattern))
        for fw in FRAMEWORKS
        if _framework(fw)[0] is not None
    }
    spread = max(w.error for w in spreads.values())
    bound = max(FLOAT32_SPREAD_FACTOR * spread, FLOAT32_MIN_BOUND)
    measured = ", ".join(f"{fw} {w}" for fw, w in spreads.items())
    rule = f"max({FLOAT32_SPREAD_FACTOR:g} x plain float32-vs-float64 spread, {FLOAT32_MIN_BOUND:g})"
    return bound, f"bound {bound:.3g} = {rule}; spread: {measured}"


# ---------------------------------------------------------------------------------------------
# Checks.


@dataclass(frozen=True)
class DiffResult:
    """One check: ``framework`` is "torch" or "paddle" (fast vs plain path) or
    :data:`CROSS` (torch's fast path vs Paddle's). ``case`` and ``target`` let
    ``conformance.format_matrix`` render a list of these too."""

    model: str
    pattern: str
    preset: str
    dtype: str
    framework: str
    status: str
    detail: str = ""

    @property
    def case(self) -> str:
        return f"{self.model}/{self.pattern}"

    @property
    def target(self) -> str:
        return f"{self.framework}:{self.preset}:{self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.model}/{self.pattern}/{self.preset}/{self.dtype}/{self.framework}"


def _missing(frameworks: Iterable[str]) -> str | None:
    reasons = [_framework(fw)[1] for fw in frameworks]
    reasons = [r for r in reasons if r]
    return "; ".join(reasons) or None


def _runs(spec: ModelSpec, pattern: str, dtype: str, framework: str):
    """The two runs a check compares, each with its name and the path it must have taken."""
    if framework == CROSS:
        return [(f"{fw} fast", _run(fw, spec, pattern, dtype, False), "fast") for fw in FRAMEWORKS]
    return [
        (f"{framework} fast", _run(framework, spec, pattern, dtype, False), "fast"),
        (f"{framework} plain", _run(framework, spec, pattern, dtype, True), "plain"),
    ]


def _compare(spec: ModelSpec, pattern: str, dtype: str, framework: str) -> tuple[list[str], str]:
    """(problems, summary) of one check; raises RunError when a run fails."""
    runs = _runs(spec, pattern, dtype, framework)
    problems = []
    for who, trace, path in runs:
        problems += _path_problems(trace, spec, path, who) + _invariant_problems(trace, who)
    (who_a, actual, _), (who_b, expected, _) = runs
    what = f"{who_a} vs {who_b}"
    bound, how = _bound(spec, pattern, dtype)
    worst = trace_error(actual, expected)
    if not worst.error <= bound:
        problems.append(f"{what}: err {worst} > {bound:.3g} ({how})")
    return problems, f"{what}: largest err {worst} ({how})"


def check(spec: ModelSpec, pattern: str, dtype: str, framework: str) -> DiffResult:
    """Run ``pattern`` on ``spec`` (its preset) in ``dtype`` and compare, as ``framework``
    says: "torch" / "paddle" (fast path vs plain path) or :data:`CROSS`."""
    spec = spec.for_dtype(dtype)

    def result(status: str, detail: str) -> DiffResult:
        return DiffResult(spec.name, pattern, spec.preset, dtype, framework, status, f"{spec.describe()}: {detail}")

    missing = _missing(FRAMEWORKS if framework == CROSS else (framework,))
    if missing:
        return result(SKIP, missing)
    try:
        problems, summary = _compare(spec, pattern, dtype, framework)
    except RunError as exc:
        return result(FAIL, str(exc))
    return result(FAIL, "; ".join(problems)) if problems else result(PASS, summary)


QUICK_CELLS = (
    ("sngan_discriminator", "sgd"),
    ("sngan_discriminator", "real_minus_fake"),
    ("sngan_discriminator_no_convtranspose", "gradient_penalty"),
    ("resnet", "kept_reference"),
)
NUMPY_STACKS = 4


def run(quick: bool = False, frameworks: Iterable[str] | None = None) -> list[DiffResult]:
    """Every check as a :class:`DiffResult` (prints nothing). ``quick``: 4 model/pattern
    cells under the "torch" preset, 24 checks (about 15 s on 2 CPU cores, framework imports
    included); otherwise the fixed models x patterns x presets plus 4 seeded random stacks,
    x dtypes x checks, 360 checks (about a minute).
    ``frameworks`` limits the framework column (default: all of :data:`CHECKS`)."""
    checks = CHECKS if frameworks is None else tuple(frameworks)
    if quick:
        cases = [(fixed_model(m, "torch"), p) for m, p in QUICK_CELLS]
    else:
        cases = [(fixed_model(m, preset), p) for m, p in fixed_cells() for preset in PRESETS]
        cases += [(spec, p) for spec in numpy_stacks(NUMPY_STACKS) for p in STACK_PATTERNS]
    return [check(spec, pattern, dtype, fw) for spec, pattern in cases for dtype in DTYPES for fw in checks]


def failures(results: Iterable[DiffResult]) -> list[DiffResult]:
    return [r for r in results if r.status == FAIL]


def clear_cache() -> None:
    """Forget the cached traces (a long-lived process can free their memory)."""
    _trace.cache_clear()
