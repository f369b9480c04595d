"""The SN-GAN of :mod:`dualsn.examples.sngan` in PyTorch (imported by its factories)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sn_function(sn: str | None, compat: str):
    """The function that applies the chosen spectral norm to a module and returns it."""
    if sn == "dualsn":
        import dualsn.torch

        return lambda m: dualsn.torch.spectral_norm(m, compat=compat)
    if sn == "parametrizations":
        return nn.utils.parametrizations.spectral_norm
    if sn == "legacy":
        return nn.utils.spectral_norm
    if sn is None:
        return lambda m: m
    raise ValueError(f"Expected sn to be 'dualsn', 'parametrizations', 'legacy' or None, got {sn!r}")


class DBlock(nn.Module):
    """Residual block; ``first`` is the "optimized" input block (no ReLU before conv1; the
    shortcut pools before its 1x1 conv)."""

    def __init__(self, cin: int, cout: int, downsample: bool, first: bool, sn) -> None:
        super().__init__()
        self.downsample, self.first = downsample, first
        self.conv1 = sn(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = sn(nn.Conv2d(cin, cout, 1)) if (cin != cout or downsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class Discriminator(nn.Module):
    def __init__(self, width: int, num_classes: int, sn) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            DBlock(3, width, True, True, sn),
            DBlock(width, width, True, False, sn),
            DBlock(width, width, False, False, sn),
        )
        self.linear = sn(nn.Linear(width, 1))
        self.embed = sn(nn.Embedding(num_classes, width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.linear(h) + (self.embed(y) * h).sum(dim=1, keepdim=True)


class Generator(nn.Module):
    def __init__(self, width: int, z_dim: int, sn) -> None:
        super().__init__()
        self.width = width
        self.linear = sn(nn.Linear(z_dim, width * 4 * 4))
        self.bn0 = nn.BatchNorm2d(width)
        self.up1 = sn(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1))
        self.bn1 = nn.BatchNorm2d(width)
        self.up2 = sn(nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1))
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.out = sn(nn.Conv2d(width // 2, 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).reshape(-1, self.width, 4, 4)
        h = self.up1(F.relu(self.bn0(h)))
        h = self.up2(F.relu(self.bn1(h)))
        return torch.tanh(self.out(F.relu(self.bn2(h))))
