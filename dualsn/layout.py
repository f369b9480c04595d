"""Which axis of a weight holds the output features, per layer kind and framework: the one
fact behind both the default ``dim`` of spectral norm and the Linear transpose of porting.

``torch.nn.Linear`` and ``paddle.compat.nn.Linear`` store ``[out, in]``; ``paddle.nn.Linear``
stores ``[in, out]``; transposed convolutions in both frameworks store ``[in, out, *k]``. A
spectral norm normalizes the W-matrix whose rows are the output features, so its default
``dim`` is the output axis, and a Linear weight moving between the layouts is transposed.
This module imports nothing but the standard library.
"""

from __future__ import annotations

__all__ = ["OUT_IN", "IN_OUT", "NATIVE_LINEAR", "DEFAULT_DIM_1_LAYERS", "default_dim"]

OUT_IN = "out_in"
"""``[out, in]``: torch.nn.Linear, paddle.compat.nn.Linear."""

IN_OUT = "in_out"
"""``[in, out]``: paddle.nn.Linear."""

NATIVE_LINEAR = {"torch": OUT_IN, "paddle": IN_OUT}
"""The layout of each framework's own ``nn.Linear``."""

DEFAULT_DIM_1_LAYERS: dict[str, tuple[str, ...]] = {
    "torch": ("torch.nn.ConvTranspose1d", "torch.nn.ConvTranspose2d", "torch.nn.ConvTranspose3d"),
    # paddle.nn.Linear is the IN_OUT layout; paddle.compat.nn.Linear keeps torch's OUT_IN and
    # is not a subclass of paddle.nn.Linear, so it stays at dim 0.
    "paddle": (
        "paddle.nn.Conv1DTranspose",
        "paddle.nn.Conv2DTranspose",
        "paddle.nn.Conv3DTranspose",
        "paddle.nn.Linear",
    ),
}
"""Layer classes whose output features are axis 1, so their default ``dim`` is 1; every other
layer defaults to 0. With these defaults the W-matrix of a layer is the same matrix in both
frameworks, so u and v move between them unchanged."""


def default_dim(is_dim_1_layer: bool, ndim: int) -> int:
    """``dim`` when the user passes None: 1 for a layer in :data:`DEFAULT_DIM_1_LAYERS`, else 0.

    A 1-D weight (a bias, a scale) has no axis 1, so it always gets 0.
    """
    return 1 if is_dim_1_layer and ndim > 1 else 0
