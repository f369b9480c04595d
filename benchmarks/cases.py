"""The benchmark cases, defined once for both frameworks.

Shapes are given in torch terms (``out`` x ``in``); the Paddle driver builds the equivalent
layer (``paddle.nn.Linear(in, out)`` stores its weight as [in, out], and its default
spectral-norm ``dim`` is 1, so the W-matrix is the same out x in matrix in both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dualsn import spec


class SetupError(RuntimeError):
    """The run cannot start as asked (e.g. --device cuda without CUDA): exit with the message."""


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    kind: ``"linear"`` / ``"conv"`` (one layer; modes train and eval, with a floor),
    ``"sngan"`` (the SNGAN CIFAR-10 discriminator; mode train) or ``"register"`` (time to
    apply spectral norm to a fresh Linear; mode register).
    ``warmup`` / ``repeats`` / ``min_sample_s`` override the run-wide settings for slow cases.
    """

    name: str
    kind: str
    modes: tuple[str, ...]
    description: str
    params: dict = field(default_factory=dict)
    warmup: int | None = None
    repeats: int | None = None
    min_sample_s: float | None = None


def _linear(out_f: int, in_f: int) -> Case:
    name = f"linear_{out_f}" if out_f == in_f else f"linear_{out_f}x{in_f}"
    return Case(
        name,
        "linear",
        ("train", "eval"),
        f"Linear in {in_f} -> out {out_f} (W-matrix {out_f}x{in_f}), batch 1",
        dict(in_features=in_f, out_features=out_f, batch=1),
    )


def _register(n: int) -> Case:
    return Case(
        f"register_linear_{n}",
        "register",
        ("register",),
        f"apply spectral norm to a fresh Linear {n}x{n} in training mode "
        "(includes the registration iterations; layer creation untimed)",
        dict(in_features=n, out_features=n),
    )


def _sngan(batch: int, name: str, **timing) -> Case:
    return Case(
        name,
        "sngan",
        ("train",),
        f"SNGAN CIFAR-10 ResNet discriminator (ndf 128, SN on every conv and linear), "
        f"batch {batch}, 3x32x32, forward + backward of the mean output",
        dict(batch=batch, ndf=128, size=32),
        **timing,
    )


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        _linear(256, 256),
        _linear(1024, 1024),
        _linear(2048, 2048),
        _linear(4096, 1024),
        Case(
            "conv_512x256x3x3",
            "conv",
            ("train", "eval"),
            "Conv2d in 256 -> out 512, 3x3, padding 1 (W-matrix 512x2304), batch 1, 8x8 input",
            dict(in_channels=256, out_channels=512, kernel=3, padding=1, batch=1, size=8),
        ),
        _sngan(64, "sngan_d32", warmup=0, repeats=5),
        _register(2048),
        # Small variants for --quick and the smoke test.
        _sngan(4, "sngan_d32_b4", warmup=0, repeats=3),
        _register(256),
    ]
}

FULL_CASES = (
    "linear_256",
    "linear_1024",
    "linear_2048",
    "linear_4096x1024",
    "conv_512x256x3x3",
    "sngan_d32",
    "register_linear_2048",
)
QUICK_CASES = ("linear_256", "conv_512x256x3x3", "sngan_d32_b4", "register_linear_256")


def converged_uv(w_mat: np.ndarray, iterations: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """u, v after a few power iterations on ``w_mat`` (the floor's inputs: sigma > 0, as in training)."""
    h, w = w_mat.shape
    u0, v0 = spec.init_uv(h, w, seed=0, dtype=w_mat.dtype)
    return spec.power_iteration(w_mat, u0, v0, iterations, "uv", 1e-12)


@dataclass
class Floor:
    """The floor's timed operations on one weight, and what a test needs to check them.

    ``ops`` maps ``floor:Wv``, ``floor:WHu``, ``floor:rescale``, ``floor:rank1_grad`` to
    callables. ``w_mat``, ``u``, ``v``, ``grad`` are their inputs as numpy arrays in W-matrix
    layout; ``outputs()`` returns each op's latest result, also in W-matrix layout.
    """

    ops: dict[str, Callable[[], None]]
    w_mat: np.ndarray
    u: np.ndarray
    v: np.ndarray
    grad: np.ndarray
    outputs: Callable[[], dict[str, np.ndarray]]
