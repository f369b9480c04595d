"""A small conditional SN-GAN, the same in PyTorch and Paddle, for porting demos and tests.

* Discriminator: a ResNet (three residual blocks, 16x16 -> 4x4) with spectral norm on every
  convolution and on the final Linear, plus a spectrally normalized class embedding used as a
  projection term (Miyato & Koyama 2018): ``D(x, y) = linear(h) + <embed(y), h>``.
* Generator: Linear -> (BatchNorm, ReLU, ConvTranspose 2x up) twice -> BatchNorm, ReLU, 3x3
  Conv, tanh; spectral norm on the Linear, the transposed convolutions and the last Conv
  (BigGAN style), so the transposed convolutions' default ``dim=1`` is exercised too.

The factories import their framework lazily, so ``import dualsn.examples.sngan`` imports
neither. Each takes ``sn``: ``"dualsn"`` (default; ``compat`` picks the preset), the
framework's built-in (torch: ``"parametrizations"`` or ``"legacy"``; Paddle: ``"builtin"``), or
None (no spectral norm). Paddle layers are built with Paddle's defaults, which match torch's
(BatchNorm momentum 0.9 in Paddle's convention is torch's 0.1), so a ported model computes
the same function.

Use them from the command line, e.g.::

    dualsn port d.pt d.pdparams --model dualsn.examples.sngan:paddle_discriminator \\
        --check --source-model dualsn.examples.sngan:torch_discriminator \\
        --input-fn dualsn.examples.sngan:discriminator_inputs
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 16
IMAGE_CHANNELS = 3
NUM_CLASSES = 10
Z_DIM = 32
WIDTH = 32


def torch_discriminator(sn: str | None = "dualsn", compat: str = "torch", width: int = WIDTH,
                        num_classes: int = NUM_CLASSES):
    """The discriminator as a ``torch.nn.Module``: ``forward(x [B, 3, 16, 16], y [B]) -> [B, 1]``."""
    from dualsn.examples import _sngan_torch

    return _sngan_torch.Discriminator(width, num_classes, _sngan_torch.sn_function(sn, compat))


def paddle_discriminator(sn: str | None = "dualsn", compat: str = "torch", width: int = WIDTH,
                         num_classes: int = NUM_CLASSES):
    """The discriminator as a ``paddle.nn.Layer``: ``forward(x [B, 3, 16, 16], y [B]) -> [B, 1]``."""
    from dualsn.examples import _sngan_paddle

    return _sngan_paddle.Discriminator(width, num_classes, _sngan_paddle.sn_function(sn, compat))


def torch_generator(sn: str | None = "dualsn", compat: str = "torch", width: int = WIDTH,
                    z_dim: int = Z_DIM):
    """The generator as a ``torch.nn.Module``: ``forward(z [B, 32]) -> [B, 3, 16, 16]``."""
    from dualsn.examples import _sngan_torch

    return _sngan_torch.Generator(width, z_dim, _sngan_torch.sn_function(sn, compat))


def paddle_generator(sn: str | None = "dualsn", compat: str = "torch", width: int = WIDTH,
                     z_dim: int = Z_DIM):
    """The generator as a ``paddle.nn.Layer``: ``forward(z [B, 32]) -> [B, 3, 16, 16]``."""
    from dualsn.examples import _sngan_paddle

    return _sngan_paddle.Generator(width, z_dim, _sngan_paddle.sn_function(sn, compat))


def discriminator_inputs(batch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images (float32, in [-1, 1]) and class labels (int64) for the discriminator."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int64)
    return x, y


def generator_inputs(batch: int = 4, seed: int = 0) -> tuple[np.ndarray]:
    """Random latent vectors (float32) for the generator."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, Z_DIM)).astype(np.float32),)
