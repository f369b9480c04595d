"""The benchmark cases, defined once for both frameworks.

Shapes are given in torch terms (``out`` x ``in``); the Paddle driver builds the equivalent
layer (``paddle.nn.Linear(in, out)`` stores its weight as [in, out], and its default
spectral-norm ``dim`` is 1, so the W-matrix is the same out x in matrix in both).

The grid of issue 14: Linear 256^2, 1024^2, 2048^2, 4096^2 (and 4096x1024) and the 3x3 convs
of a GAN discriminator, W-matrix 64x576 up to 512x4608, each at batch 1 and batch 64
(``<name>`` and ``<name>_b64``). The conv input is the feature-map size such a conv sees in a
CIFAR/64px discriminator (64 channels at 32x32 down to 512 at 4x4), so that the plain layer's
cost, which the eval % is relative to, is realistic.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dualsn import spec
from dualsn import reference as numpy_ref


class SetupError(RuntimeError):
    """The run cannot start as asked (e.g. --device cuda without CUDA): exit with the message."""


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    kind: ``"linear"`` / ``"conv"`` (one layer; modes train and eval, with a floor, peak
    memory in train), ``"sngan"`` (the SNGAN CIFAR-10 discriminator; mode train) or
    ``"register"`` (time to apply spectral norm to a fresh Linear; mode register).
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

    @property
    def w_shape(self) -> tuple[int, int] | None:
        """The W-matrix (rows x columns) of a one-layer case, else None."""
        p = self.params
        if self.kind == "linear":
            return p["out_features"], p["in_features"]
        if self.kind == "conv":
            return p["out_channels"], p["in_channels"] * p["kernel"] ** 2
        return None


def _suffix(batch: int) -> str:
    return "" if batch == 1 else f"_b{batch}"


def _linear(out_f: int, in_f: int, batch: int = 1) -> Case:
    name = f"linear_{out_f}" if out_f == in_f else f"linear_{out_f}x{in_f}"
    return Case(
        name + _suffix(batch),
        "linear",
        ("train", "eval"),
        f"Linear in {in_f} -> out {out_f} (W-matrix {out_f}x{in_f}), batch {batch}",
        dict(in_features=in_f, out_features=out_f, batch=batch),
    )


def _conv(out_c: int, in_c: int, size: int, batch: int = 1) -> Case:
    return Case(
        f"conv_{out_c}x{in_c}x3x3" + _suffix(batch),
        "conv",
        ("train", "eval"),
        f"Conv2d in {in_c} -> out {out_c}, 3x3, padding 1 (W-matrix {out_c}x{in_c * 9}), "
        f"batch {batch}, {size}x{size} input",
        dict(in_channels=in_c, out_channels=out_c, kernel=3, padding=1, batch=batch, size=size),
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


_LINEARS = [(256, 256), (1024, 1024), (2048, 2048), (4096, 4096), (4096, 1024)]
_CONVS = [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4)]  # out, in, input size

CASES: dict[str, Case] = {
    c.name: c
    for c in [
        *(_linear(o, i, b) for b in (1, 64) for o, i in _LINEARS),
        *(_conv(o, i, s, b) for b in (1, 64) for o, i, s in _CONVS),
        # The conv the README quoted before issue 14 (W-matrix 512x2304, 8x8 input).
        _conv(512, 256, 8),
        _sngan(64, "sngan_d32", warmup=0, repeats=5),
        _register(2048),
        # Small variants for --quick and the smoke test.
        _sngan(4, "sngan_d32_b4", warmup=0, repeats=3),
        _register(256),
    ]
}

GRID = tuple(
    [_linear(o, i, b).name for b in (1, 64) for o, i in _LINEARS]
    + [_conv(o, i, s, b).name for b in (1, 64) for o, i, s in _CONVS]
)
FULL_CASES = (*GRID, "sngan_d32", "register_linear_2048")
QUICK_CASES = ("linear_256", "conv_64x64x3x3", "sngan_d32_b4", "register_linear_256")
GROUPS = {
    "grid": GRID,
    "full": FULL_CASES,
    "quick": QUICK_CASES,
    "linear": tuple(n for n in GRID if n.startswith("linear_")),
    "conv": tuple(n for n in GRID if n.startswith("conv_")),
    "b1": tuple(n for n in GRID if not n.endswith("_b64")),
    "b64": tuple(n for n in GRID if n.endswith("_b64")),
}


def select(patterns: list[str]) -> tuple[list[str], list[str]]:
    """Case names for ``patterns`` (names, shell-style patterns over all cases, or groups).

    Returns (names in first-seen order, patterns that matched nothing).
    """
    names: list[str] = []
    unknown: list[str] = []
    for pat in patterns:
        if pat in GROUPS:
            hits = list(GROUPS[pat])
        elif pat in CASES:
            hits = [pat]
        else:
            hits = [n for n in CASES if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            unknown.append(pat)
        names += [h for h in hits if h not in names]
    return names, unknown


def converged_uv(w_mat: np.ndarray, iterations: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """u, v after a few power iterations on ``w_mat`` (the floor's inputs: sigma > 0, as in training)."""
    h, w = w_mat.shape
    u0, v0 = spec.init_uv(h, w, seed=0, dtype=w_mat.dtype)
    return numpy_ref.power_iteration(w_mat, u0, v0, iterations, "uv", 1e-12)


def floor_part(name: str) -> str:
    """``floor:rescale@copy_scale`` -> ``floor:rescale``: the part a floor candidate computes."""
    return name.split("@", 1)[0]


@dataclass
class Floor:
    """The floor's timed operations on one weight, and what a test needs to check them.

    ``ops`` maps candidate names to callables. A candidate is named ``<part>@<form>``, with
    part one of ``floor:Wv``, ``floor:WHu``, ``floor:rescale``, ``floor:rank1_grad``: each
    part may be timed in more than one correct form, and the report takes the fastest form
    of each part in the same run (so the floor is the minimum we could measure, not one
    form's luck). ``w_mat``, ``u``, ``v``, ``grad`` are the inputs as numpy arrays in
    W-matrix layout; ``outputs()`` returns each candidate's latest result, also in W-matrix
    layout.
    """

    ops: dict[str, Callable[[], None]]
    w_mat: np.ndarray
    u: np.ndarray
    v: np.ndarray
    grad: np.ndarray
    outputs: Callable[[], dict[str, np.ndarray]]

    def for_mode(self, mode: str) -> dict[str, Callable[[], None]]:
        parts = FLOOR_PARTS[mode]
        return {k: f for k, f in self.ops.items() if floor_part(k) in parts}


FLOOR_PARTS = {
    "train": ("floor:Wv", "floor:WHu", "floor:rescale", "floor:rank1_grad"),
    "eval": ("floor:Wv", "floor:rescale"),
}
