"""The SN-GAN of :mod:`dualsn.examples.sngan` in Paddle (imported by its factories)."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn


def sn_function(sn: str | None, compat: str):
    """The function that applies the chosen spectral norm to a layer and returns it."""
    if sn == "dualsn":
        import dualsn.paddle

        return lambda m: dualsn.paddle.spectral_norm(m, compat=compat)
    if sn == "builtin":
        return nn.utils.spectral_norm
    if sn is None:
        return lambda m: m
    raise ValueError(f"Expected sn to be 'dualsn', 'builtin' or None, got {sn!r}")


class DBlock(nn.Layer):
    """Residual block; ``first`` is the "optimized" input block (see the torch version)."""

    def __init__(self, cin: int, cout: int, downsample: bool, first: bool, sn) -> None:
        super().__init__()
        self.downsample, self.first = downsample, first
        self.conv1 = sn(nn.Conv2D(cin, cout, 3, padding=1))
        self.conv2 = sn(nn.Conv2D(cout, cout, 3, padding=1))
        self.shortcut = sn(nn.Conv2D(cin, cout, 1)) if (cin != cout or downsample) else None

    def forward(self, x):
        h = self.conv1(x if self.first else F.relu(x))
        h = self.conv2(F.relu(h))
        s = x
        if self.first:
            s = self.shortcut(F.avg_pool2d(s, 2) if self.downsample else s)
        elif self.shortcut is not None:
            s = self.shortcut(s)
            s = F.avg_pool2d(s, 2) if self.downsample else s
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + s


class Discriminator(nn.Layer):
    def __init__(self, width: int, num_classes: int, sn) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            DBlock(3, width, True, True, sn),
            DBlock(width, width, True, False, sn),
            DBlock(width, width, False, False, sn),
        )
        self.linear = sn(nn.Linear(width, 1))  # weight [in, out]; spectral norm along dim 1
        self.embed = sn(nn.Embedding(num_classes, width))

    def forward(self, x, y):
        h = F.relu(self.blocks(x)).sum(axis=[2, 3])  # global sum pooling
        return self.linear(h) + (self.embed(y) * h).sum(axis=1, keepdim=True)


class Generator(nn.Layer):
    def __init__(self, width: int, z_dim: int, sn) -> None:
        super().__init__()
        self.width = width
        self.linear = sn(nn.Linear(z_dim, width * 4 * 4))
        self.bn0 = nn.BatchNorm2D(width)
        self.up1 = sn(nn.Conv2DTranspose(width, width, 4, stride=2, padding=1))
        self.bn1 = nn.BatchNorm2D(width)
        self.up2 = sn(nn.Conv2DTranspose(width, width // 2, 4, stride=2, padding=1))
        self.bn2 = nn.BatchNorm2D(width // 2)
        self.out = sn(nn.Conv2D(width // 2, 3, 3, padding=1))

    def forward(self, z):
        h = self.linear(z).reshape([-1, self.width, 4, 4])
        h = self.up1(F.relu(self.bn0(h)))
        h = self.up2(F.relu(self.bn1(h)))
        return paddle.tanh(self.out(F.relu(self.bn2(h))))
