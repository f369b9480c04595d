"""The conformance sequences: each composes a driver's primitives into a short scenario and
records a *trace*, a list of ``(label, array)`` (u, v, sigma, normalized weight, outputs,
gradients). The same sequence on the reference gives the expected trace.

A sequence receives a :class:`Session`, which builds instances of one driver for one case and
preset and hands out the case's data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backends.base import Config, Instance
from conformance import cases as _cases

__all__ = ["SEQUENCES", "Session", "Trace"]


class Trace(list):
    """A list of (label, numpy array)."""

    def add(self, label: str, value) -> None:
        self.append((label, np.array(value)))

    def state(self, inst: Instance, prefix: str = "") -> None:
        """u and v (when the instance has them), sigma and the normalized weight."""
        uv = inst.uv()
        if uv is not None:
            self.add(prefix + "u", uv[0])
            self.add(prefix + "v", uv[1])
        self.add(prefix + "sigma", inst.sigma())
        self.add(prefix + "weight_sn", inst.normalized_weight())
        if inst.config.num_svs > 1 and uv is not None:
            self.add(prefix + "singular_values", inst.singular_values())

    def uv(self, inst: Instance, prefix: str = "") -> None:
        """u and v; with ``track_sigma`` also the tracked sigma. Every sequence calls this
        right after a forward (never after a state read), so that sigma is the last forward's."""
        uv = inst.uv()
        if uv is not None:
            self.add(prefix + "u", uv[0])
            self.add(prefix + "v", uv[1])
        if inst.config.track_sigma:
            self.add(prefix + "tracked_sigma", inst.tracked_sigma())

    def grads(self, g, prefix: str = "") -> None:
        for i, out in enumerate(g.outputs):
            self.add(f"{prefix}out{i}", out)
        self.add(prefix + "grad_weight", g.weight)
        if g.bias is not None:
            self.add(prefix + "grad_bias", g.bias)
        for i, per_forward in enumerate(g.inputs):
            for j, gx in enumerate(per_forward):
                self.add(f"{prefix}grad_input{i}.{j}", gx)


@dataclass
class Session:
    """One case under one preset for one driver. ``make`` builds an instance:
    ``make(params, seed, training)``."""

    case: _cases.Case
    preset: str
    make: Callable[[dict, int, bool], Instance]
    _data: dict = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.case.config

    def build(self, variant: int = 0, training: bool = True) -> Instance:
        """A fresh instance; ``variant`` > 0 gives other weights AND another u0, v0 seed."""
        return self.make(_cases.params(self.case, variant), self.case.seed + variant, training)

    def x(self, k: int):
        return _cases.inputs(self.case, k)

    def r(self, k: int):
        return _cases.upstream(self.case, k)

    def step(self, inst: Instance, k: int, training: bool = True):
        """One training step on batch k: forward, backward of sum(out * R_k), SGD."""
        g = inst.backward([(self.x(k), self.r(k), 1.0)], training)
        inst.sgd_step(self.case.lr)
        return g


# ---------------------------------------------------------------------------------------------


def registration(s: Session) -> Trace:
    """u, v, sigma and W/sigma right after registration in training mode (warm-up included)."""
    t = Trace()
    t.state(s.build(training=True))
    return t


def registration_eval(s: Session) -> Trace:
    """Registration on a module in eval mode (fewer iterations for "torch"), then an eval
    forward, which must not move u, v."""
    inst = s.build(training=False)
    t = Trace()
    t.state(inst)
    t.add("out", inst.forward(s.x(0), training=False))
    t.uv(inst, "after_eval_")
    return t


def train_forwards(s: Session) -> Trace:
    """Three training-mode forwards; u, v after each."""
    inst = s.build()
    t = Trace()
    for k in range(3):
        t.add(f"out{k}", inst.forward(s.x(k), training=True))
        t.uv(inst, f"step{k}_")
    t.state(inst, "final_")
    return t


def eval_forward(s: Session) -> Trace:
    """After one training forward, two eval forwards: same output twice, u and v unchanged
    (recorded as the exact change, which must be zero)."""
    inst = s.build()
    inst.forward(s.x(0), training=True)
    before = inst.uv()
    t = Trace()
    t.add("out_a", inst.forward(s.x(1), training=False))
    t.add("out_b", inst.forward(s.x(1), training=False))
    after = inst.uv()
    if before is not None:
        t.add("u_change", after[0] - before[0])
        t.add("v_change", after[1] - before[1])
    t.state(inst)
    return t


def train_eval_train(s: Session) -> Trace:
    """train -> eval -> train -> eval forwards; outputs and u, v after each."""
    inst = s.build()
    t = Trace()
    for k, training in enumerate((True, False, True, False)):
        t.add(f"out{k}", inst.forward(s.x(k), training=training))
        t.uv(inst, f"after{k}_")
    return t


def gradients(s: Session) -> Trace:
    """Gradients of the original weight, bias and inputs: one training-mode backward, then
    one eval-mode backward."""
    inst = s.build()
    t = Trace()
    t.grads(inst.backward([(s.x(0), s.r(0), 1.0)], training=True), "train_")
    t.grads(inst.backward([(s.x(1), s.r(1), 1.0)], training=False), "eval_")
    t.uv(inst)
    return t


def sgd_steps(s: Session) -> Trace:
    """Five SGD steps in lockstep; output, sigma and u, v after each, final weights, then an
    eval forward."""
    inst = s.build()
    t = Trace()
    for k in range(5):
        g = s.step(inst, k)
        t.add(f"out{k}", g.outputs[0])
        t.add(f"sigma{k}", inst.sigma())
        t.uv(inst, f"step{k}_")
    t.add("weight", inst.original_weight())
    if inst.bias() is not None:
        t.add("bias", inst.bias())
    t.add("eval_out", inst.forward(s.x(5), training=False))
    t.state(inst, "final_")
    return t


def real_fake(s: Session) -> Trace:
    """The GAN discriminator pattern: D(real) and D(fake) forwards (each iterates), ONE
    backward of sum(D(real) R) - sum(D(fake) R), an SGD step, then another forward."""
    inst = s.build()
    r = s.r(0)
    t = Trace()
    g = inst.backward([(s.x(0), r, 1.0), (s.x(1), r, -1.0)], training=True)
    t.grads(g)
    t.uv(inst)
    inst.sgd_step(s.case.lr)
    t.add("out_after_step", inst.forward(s.x(2), training=True))
    t.state(inst, "final_")
    return t


def state_dict(s: Session) -> Trace:
    """Two training steps, save the state dict, load it into a freshly built layer (other
    weights, other u0, v0; evaluated once before the load), check it took everything (eval
    output, state), then train two more steps."""
    inst = s.build()
    s.step(inst, 0)
    s.step(inst, 1)
    saved = inst.save()
    fresh = s.build(variant=1)
    fresh.forward(s.x(2), training=False)  # evaluate before loading: fills any eval-mode cache
    fresh.load(saved)
    t = Trace()
    t.add("loaded_eval_out", fresh.forward(s.x(2), training=False))
    t.state(fresh, "loaded_")
    t.add("loaded_weight", fresh.original_weight())
    if fresh.bias() is not None:
        t.add("loaded_bias", fresh.bias())
    for k in (2, 3):
        t.grads(s.step(fresh, k), f"step{k}_")
        t.uv(fresh, f"step{k}_")
    return t


def removal(s: Session) -> Trace:
    """Two training steps, then removal: the plain weight is W / sigma with the current u, v
    (no iteration), no spectral-norm state is left, and the layer trains as a plain layer."""
    inst = s.build()
    s.step(inst, 0)
    s.step(inst, 1)
    inst.remove()
    t = Trace()
    t.add("has_sn", float(inst.has_sn()))
    t.add("weight", inst.original_weight())
    t.add("out_eval", inst.forward(s.x(2), training=False))
    t.add("out_train", inst.forward(s.x(2), training=True))
    t.grads(inst.backward([(s.x(3), s.r(3), 1.0)], training=True), "plain_")
    return t


SEQUENCES: dict[str, Callable[[Session], Trace]] = {
    f.__name__: f
    for f in (
        registration,
        registration_eval,
        train_forwards,
        eval_forward,
        train_eval_train,
        gradients,
        sgd_steps,
        real_fake,
        state_dict,
        removal,
    )
}

PRIMITIVES_USED = {"removal": "remove"}
"""Sequences that need an optional primitive (drivers may not support it)."""
