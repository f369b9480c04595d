"""The training patterns of the differential harness, written once for both frameworks.

A pattern is a function of a :class:`Session`: one freshly built model (one framework, one
dtype, fast or plain path, see ``backends/_torch_models.py`` and ``backends/_paddle_models.py``
for the framework side) that the pattern trains the way users do, recording a :class:`Trace`:
per step the outputs, every parameter's gradient, the inputs' gradients and the spectral-norm
state (u, v, sigma), all numpy in canonical layouts. Inputs and loss weights come from a numpy
generator seeded per pattern, so every run of a pattern sees the same numbers.

Besides the per-step values, patterns assert what must hold exactly in any one run
(:attr:`Trace.invariants`): a kept ``layer.weight`` never changes, eval forwards leave u, v
alone, and an eval forward repeated on the same batch gives the same bits.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from conformance.diff_models import ModelSpec

__all__ = ["Trace", "Session", "PATTERNS", "DOUBLE_BACKWARD", "TRAINING_STEPS"]

TRAINING_STEPS = 20
"""Optimizer steps of the SGD and Adam patterns."""
SHORT_STEPS = 3
"""Steps of the patterns that each exercise one mechanism (a few steps make it count twice
over changing weights)."""
SGD_LR = 0.05
ADAM = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8)
PENALTY_WEIGHT = 10.0
MICRO_BATCHES = 3


@dataclass
class Trace:
    """What one run recorded. ``steps``: one dict per record, quantity -> array (keys
    "out/…", "xgrad/…", "grad/<param>", "u/<layer>", "v/<layer>", "sigma/<layer>",
    "ref/<layer>", "penalty"). ``invariants``: (what, holds) pairs checked within the run.
    ``paths``: per spectral-norm layer, the paths ("fast", "plain") its graph-recording
    forwards took."""

    steps: list[dict[str, np.ndarray]]
    invariants: list[tuple[str, bool]]
    paths: dict[str, set[str]]


@dataclass
class _Kept:
    label: str
    layer: str
    tensor: object
    value: np.ndarray


@dataclass
class Session:
    """One run: ``fw`` (a framework adapter) with a model built from ``spec`` and canonical
    ``params`` in ``dtype``. Random inputs are rounded to ``data_dtype`` (a float32 model's
    float64 reference sees the very same numbers)."""

    fw: object
    spec: ModelSpec
    params: dict[str, np.ndarray]
    dtype: str
    data_dtype: str
    pattern: str
    steps: list = field(default_factory=list)
    invariants: list = field(default_factory=list)
    kept: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model = self.fw.build(self.spec, self.params, self.dtype)
        self.rng = np.random.default_rng(zlib.crc32(self.pattern.encode()))

    # -- data -----------------------------------------------------------------------------
    def _normal(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(self.data_dtype).astype(np.float64)

    def batch(self) -> list[np.ndarray]:
        """The inputs of one forward: images / features (or indices), plus class labels."""
        spec, shape = self.spec, (self.spec.batch,) + self.spec.input_shape
        first = self.rng.integers(spec.integer_input, size=shape) if spec.integer_input else self._normal(shape)
        labels = [self.rng.integers(spec.num_classes, size=spec.batch)] if spec.num_classes else []
        return [first] + labels

    # -- computation ----------------------------------------------------------------------
    def forward(self, arrays, requires_grad: bool = True):
        """(output, the float input tensors) of one forward in the model's current mode."""
        tensors = [self.fw.tensor(a, self.dtype, requires_grad) for a in arrays]
        floats = [t for t, a in zip(tensors, arrays) if a.dtype.kind == "f"]
        return self.model(*tensors), floats

    def forward_no_grad(self, arrays):
        """One forward under no_grad, in the model's current mode."""
        with self.fw.no_grad():
            return self.forward(arrays, requires_grad=False)[0]

    def score(self, out):
        """sum(out * R) with fresh random weights R: a loss whose gradient reaches every
        output entry with a different weight."""
        weights = self._normal((self.spec.batch, self.spec.output_size))
        return (out * self.fw.tensor(weights, self.dtype)).sum()

    def optimizer(self, kind: str = "sgd"):
        if kind == "sgd":
            return self.fw.optimizer(self.model, "sgd", SGD_LR)
        return self.fw.optimizer(self.model, "adam", ADAM["lr"], ADAM["betas"], ADAM["eps"])

    # -- recording ------------------------------------------------------------------------
    def sn_state(self) -> dict[str, np.ndarray]:
        return self.fw.sn_state(self.model)

    def record(self, outputs=None, inputs=None, grads: bool = True, **extra) -> None:
        """One trace entry: ``outputs`` (name -> tensor), the gradients of ``inputs`` (name ->
        float input tensors), every parameter gradient (``grads``), the SN state, ``extra``."""
        step = {f"out/{name}": self.fw.numpy(out) for name, out in (outputs or {}).items()}
        for name, tensors in (inputs or {}).items():
            for i, t in enumerate(tensors):
                step[f"xgrad/{name}{i}"] = self.fw.input_grad(t)
        if grads:
            # sorted: the frameworks list parameters in their own orders
            step.update((f"grad/{name}", g) for name, g in sorted(self.fw.grads(self.model).items()))
        step.update(self.sn_state())
        step.update((name, np.asarray(value)) for name, value in extra.items())
        self.steps.append(step)

    def keep_weights(self, label: str) -> dict[str, np.ndarray]:
        """Keep ``layer.weight`` of every spectral-norm layer, as a user holding a reference
        would; returns their current values ("ref/<layer>")."""
        values = {}
        for layer in self.spec.sn_layers:
            tensor = self.fw.normalized_weight(self.model, layer.name)
            value = self.fw.canonical_weight(self.model, layer.name, tensor)
            self.kept.append(_Kept(label, layer.name, tensor, value))
            values[f"ref/{layer.name}"] = value
        return values

    def expect(self, what: str, holds: bool) -> None:
        """Record an invariant of this run (checked by the harness)."""
        self.invariants.append((what, bool(holds)))

    def trace(self) -> Trace:
        for kept in self.kept:
            now = self.fw.canonical_weight(self.model, kept.layer, kept.tensor)
            unchanged = np.array_equal(now, kept.value)
            self.expect(f"{kept.layer}.weight kept after the {kept.label} is unchanged", unchanged)
        return Trace(self.steps, self.invariants, {k: set(v) for k, v in self.fw.paths_taken(self.model).items()})


# ---------------------------------------------------------------------------------------------
# The patterns.


def _train_step(s: Session, opt, label: str = "train") -> None:
    """zero_grad, forward, backward of the score, record, step: one ordinary step."""
    opt.zero_grad()
    out, xs = s.forward(s.batch())
    s.fw.backward(s.score(out))
    s.record({label: out}, {label: xs})
    opt.step()


def _interleaved_no_grad(s: Session, step: int) -> None:
    """Every few steps a no_grad forward: in training mode (it iterates u, v, as a logging
    forward would) or twice in eval mode (the second one may come from the eval cache)."""
    if step % 5 == 2:
        s.record({"no_grad_train": s.forward_no_grad(s.batch())}, grads=False)
    elif step % 5 == 4:
        s.fw.train(s.model, False)
        s.record(_repeated_eval(s, s.batch(), f"step {step}"), grads=False)
        s.fw.train(s.model, True)


def _repeated_eval(s: Session, arrays, when: str) -> dict:
    """Two no_grad forwards of one batch in eval mode (the second may come from an eval
    cache): they must give the same bits."""
    first, again = s.forward_no_grad(arrays), s.forward_no_grad(arrays)
    same = np.array_equal(s.fw.numpy(first), s.fw.numpy(again))
    s.expect(f"{when}: a repeated eval forward gives the same bits", same)
    return {"eval_no_grad": first, "eval_no_grad_again": again}


def _optimizer_steps(s: Session, kind: str) -> None:
    opt = s.optimizer(kind)
    for step in range(TRAINING_STEPS):
        _train_step(s, opt)
        _interleaved_no_grad(s, step)


def sgd(s: Session) -> None:
    """TRAINING_STEPS steps of SGD, no_grad forwards interleaved."""
    _optimizer_steps(s, "sgd")


def adam(s: Session) -> None:
    """TRAINING_STEPS steps of Adam (its per-parameter scaling amplifies small gradient
    differences), no_grad forwards interleaved."""
    _optimizer_steps(s, "adam")


def real_minus_fake(s: Session) -> None:
    """Two training forwards (each iterates u, v), then ONE backward of D(real) - D(fake): each
    forward's gradient must use the u, v of that forward."""
    opt = s.optimizer()
    for _ in range(SHORT_STEPS):
        opt.zero_grad()
        real, real_x = s.forward(s.batch())
        fake, fake_x = s.forward(s.batch())
        s.fw.backward(s.score(real) - s.score(fake))
        s.record({"real": real, "fake": fake}, {"real": real_x, "fake": fake_x})
        opt.step()


def retain_graph(s: Session) -> None:
    """Two backwards through one graph (retain_graph=True): the gradients accumulate, and a
    gradient hook must contribute once per backward."""
    opt = s.optimizer()
    for _ in range(SHORT_STEPS):
        opt.zero_grad()
        out, xs = s.forward(s.batch())
        s.fw.backward(s.score(out), retain_graph=True)
        s.record({"out": out}, {"first": xs})
        s.fw.backward(s.score(out))
        s.record(inputs={"second": xs})
        opt.step()


def gradient_accumulation(s: Session) -> None:
    """Micro-batches, each its own forward and backward, one optimizer step per batch."""
    opt = s.optimizer()
    for _ in range(SHORT_STEPS):
        opt.zero_grad()
        outputs, inputs = {}, {}
        for m in range(MICRO_BATCHES):
            out, xs = s.forward(s.batch())
            s.fw.backward(s.score(out) * (1.0 / MICRO_BATCHES))
            outputs[f"micro{m}"], inputs[f"micro{m}"] = out, xs
        s.record(outputs, inputs)
        opt.step()


def train_eval_train(s: Session) -> None:
    """Training steps; then eval mode: a forward with a graph and its SGD step, no_grad
    forwards before and after an SGD step (an eval cache must notice the in-place change of
    W); then training again. Eval forwards must leave u, v alone."""
    opt = s.optimizer()
    for _ in range(SHORT_STEPS):
        _train_step(s, opt)
    before_eval = s.sn_state()
    s.fw.train(s.model, False)
    _train_step(s, opt, label="eval_with_graph")
    arrays = s.batch()
    s.record(_repeated_eval(s, arrays, "eval"), grads=False)
    _train_step(s, opt, label="eval_with_graph_2")
    after_step = s.forward_no_grad(arrays)
    s.record({"eval_no_grad_after_step": after_step}, grads=False)
    after_eval = s.sn_state()
    s.expect(
        "eval forwards leave u, v unchanged",
        all(np.array_equal(before_eval[k], after_eval[k]) for k in before_eval if k[0] in "uv"),
    )
    s.fw.train(s.model, True)
    for _ in range(SHORT_STEPS):
        _train_step(s, opt)


def gradient_penalty(s: Session) -> None:
    """R1-style penalty: loss = score + w * ||d score / dx||^2, the inner gradient taken with
    create_graph=True, so the spectral norm's backward is itself differentiated."""
    opt = s.optimizer()
    for _ in range(SHORT_STEPS):
        opt.zero_grad()
        out, xs = s.forward(s.batch())
        score = s.score(out)
        g = s.fw.grad(score, xs[0])
        penalty = (g * g).sum()
        s.fw.backward(score + PENALTY_WEIGHT * penalty)
        s.record({"out": out, "penalty": penalty}, {"x": xs})
        opt.step()


def kept_reference(s: Session) -> None:
    """The user keeps ``layer.weight`` (after training forwards and after an eval no_grad
    forward) across later steps, eval forwards and optimizer updates: what they hold must
    never change (no in-place reuse of a normalized weight handed out)."""
    opt = s.optimizer()
    for step in range(SHORT_STEPS):
        opt.zero_grad()
        out, xs = s.forward(s.batch())
        kept = s.keep_weights(f"training forward {step}")
        s.fw.backward(s.score(out))
        s.record({"train": out}, {"train": xs}, **kept)
        opt.step()
        s.fw.train(s.model, False)
        out = s.forward_no_grad(s.batch())
        with s.fw.no_grad():  # as read after a no_grad eval forward: torch's comes from its eval cache
            kept = s.keep_weights(f"eval forward {step}")
        s.fw.train(s.model, True)
        s.record({"eval": out}, grads=False, **kept)


PATTERNS: dict[str, Callable[[Session], None]] = {
    "sgd": sgd,
    "adam": adam,
    "real_minus_fake": real_minus_fake,
    "retain_graph": retain_graph,
    "gradient_accumulation": gradient_accumulation,
    "train_eval_train": train_eval_train,
    "gradient_penalty": gradient_penalty,
    "kept_reference": kept_reference,
}

DOUBLE_BACKWARD = frozenset({"gradient_penalty"})
"""Patterns that differentiate a gradient (create_graph=True)."""
