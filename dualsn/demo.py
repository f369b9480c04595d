"""``dualsn demo``: train an SN-GAN discriminator in PyTorch, port it to Paddle, and watch both
frameworks go on in lockstep.

What it does, with no downloads (synthetic data) and a fixed seed:

1. builds the small conditional SN-GAN discriminator of :mod:`dualsn.examples.sngan` in
   PyTorch (dualsn spectral norm, ``compat="torch"``) and trains it for a few steps alone;
2. builds the same discriminator in Paddle and ports the torch state into it with
   :func:`dualsn.port.torch_to_paddle` (weights, and every layer's u and v);
3. trains both on the same batches in lockstep, and after every step prints each layer's
   sigma (torch) and the largest relative difference between the frameworks: of the
   discriminator outputs of that step, and of the layers' sigmas.

Each step is one discriminator update with the hinge loss,
``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``: two training-mode forwards (each runs
the power iteration) and one backward, then plain SGD (stateless, so both frameworks apply the
very same update formula). The frameworks' float32 kernels round differently, so the two runs
differ by rounding only; the demo fails (exit 1) when a difference exceeds ``rtol`` (default
1e-4, relative to the largest output or to each sigma), which would mean that the port or an
implementation changed the computation.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from dualsn.adapters import adapter
from dualsn.examples import sngan

__all__ = ["MissingFramework", "DemoResult", "require_frameworks", "synthetic_batch", "run"]

STEPS = 8
TORCH_STEPS = 4
BATCH = 16
LR = 0.01
RTOL = 1e-4
SEED = 0

EXTRAS = {"torch": "torch", "paddle": "paddle"}


class MissingFramework(ImportError):
    """A framework the demo needs is not installed; the message names the pip extra."""


def require_frameworks() -> None:
    """Import torch and Paddle, or raise :class:`MissingFramework` naming what to install."""
    missing = []
    for name in ("torch", "paddle"):
        try:
            with warnings.catch_warnings():  # import-time chatter (Paddle: "No ccache found")
                warnings.simplefilter("ignore")
                __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        installs = " and ".join(f'pip install "dualsn[{EXTRAS[m]}]"' for m in missing)
        names = {"torch": "PyTorch", "paddle": "PaddlePaddle"}
        raise MissingFramework(
            f"the demo needs both PyTorch and PaddlePaddle, but {' and '.join(names[m] for m in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {installs}"
        )


def synthetic_batch(rng: np.random.Generator, batch: int):
    """(real images, real labels, fake images, fake labels) as numpy arrays.

    "Real" images of class c are smooth stripes at a class-dependent frequency and angle;
    "fake" ones are uniform noise. Images are float32 in [-1, 1], labels int64.
    """
    size, classes = sngan.IMAGE_SIZE, sngan.NUM_CLASSES
    y_real = rng.integers(0, classes, batch)
    grid = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    angle = np.pi * y_real / classes + rng.normal(0, 0.1, batch)
    freq = 1.5 + 0.25 * y_real
    phase = rng.uniform(0, 2 * np.pi, (batch, sngan.IMAGE_CHANNELS))
    wave = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) * freq[:, None, None] * np.pi
    real = np.sin(wave[:, None] + phase[:, :, None, None])
    fake = rng.uniform(-1, 1, real.shape)
    y_fake = rng.integers(0, classes, batch)
    return real.astype(np.float32), y_real.astype(np.int64), fake.astype(np.float32), y_fake.astype(np.int64)


@dataclass
class DemoResult:
    """What the demo measured. ``out_diff`` and ``sigma_diff`` hold one value per lockstep
    step; ``sigmas`` one row (torch's per-layer sigma) per step, both phases."""

    layers: list[str]
    rtol: float
    out_diff: list[float] = field(default_factory=list)
    sigma_diff: list[float] = field(default_factory=list)
    sigmas: list[list[float]] = field(default_factory=list)

    @property
    def max_out_diff(self) -> float:
        return max(self.out_diff, default=0.0)

    @property
    def max_sigma_diff(self) -> float:
        return max(self.sigma_diff, default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_out_diff <= self.rtol and self.max_sigma_diff <= self.rtol


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(a)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def run(steps: int = STEPS, torch_steps: int = TORCH_STEPS, batch: int = BATCH, seed: int = SEED,
        rtol: float = RTOL, lr: float = LR, out=None, progress: bool | None = None) -> DemoResult:
    """Run the demo, printing to ``out`` (default stdout) and a progress bar to stderr
    (``progress``: None shows it when stderr is a terminal, True always, False never).

    ``torch_steps`` steps in PyTorch alone, then the port, then ``steps`` steps of both in
    lockstep. Returns a :class:`DemoResult`; raises :class:`MissingFramework` first thing
    when PyTorch or Paddle is not installed.
    """
    require_frameworks()
    from tqdm import tqdm

    import dualsn

    out = sys.stdout if out is None else out

    def say(text: str = "") -> None:
        tqdm.write(text, file=out)

    dualsn.manual_seed(seed)  # every layer's u, v from spec.init_uv: no framework RNG involved
    t = _Side("torch", seed, lr)  # the torch layers' initial weights from the seeded torch RNG
    result = DemoResult(t.layers, rtol)
    rng = np.random.default_rng(seed)
    _header(say, t.layers, batch, lr, seed)
    bar = tqdm(total=torch_steps + steps, desc="demo", unit="step", file=sys.stderr,
               disable=None if progress is None else not progress, leave=False)
    p = None
    try:
        for step in range(1, torch_steps + steps + 1):
            if step == torch_steps + 1:
                p = _ported(t, seed, lr, bar, say)
            _step(step, t, p, synthetic_batch(rng, batch), result, say)
            bar.update()
    finally:
        bar.close()

    verdict = "OK" if result.ok else "DIVERGED"
    say(f"result: largest relative difference torch vs Paddle over {steps} lockstep steps: outputs "
        f"{result.max_out_diff:.2e}, sigma {result.max_sigma_diff:.2e} (tolerance {rtol:g}): {verdict}")
    return result


class _Side:
    """One framework's discriminator (:mod:`dualsn.examples.sngan`, ``compat="torch"``) with
    its trainer, built after seeding that framework's generator with ``seed``."""

    def __init__(self, framework: str, seed: int, lr: float) -> None:
        self.adapter = adapter(framework)
        self.adapter.seed(seed)
        factory = sngan.torch_discriminator if framework == "torch" else sngan.paddle_discriminator
        self.model = factory(compat="torch")
        self.layers = self.adapter.sn_layer_names(self.model)
        self.trainer = self.adapter.HingeTrainer(self.model, lr)

    def step(self, batch_data):
        return self.trainer.step(*batch_data)

    def sigmas(self, names: list[str]) -> list[float]:
        return self.adapter.sigmas(self.model, names)


def _header(say, layers: list[str], batch: int, lr: float, seed: int) -> None:
    say(f"dualsn demo: SN-GAN discriminator ({len(layers)} spectrally normalized layers, "
        f"compat='torch'), synthetic {sngan.IMAGE_SIZE}x{sngan.IMAGE_SIZE} data, batch {batch}, "
        f"hinge loss, SGD lr {lr}, seed {seed}")
    say("layers: " + ", ".join(f"[{i}] {n}" for i, n in enumerate(layers)))
    sigma_cols = " ".join(f"{f'[{i}]':>6}" for i in range(len(layers)))
    say(f"{'step':>4}  {'phase':<6} {'loss':>8}  sigma: {sigma_cols}  {'out diff':>9} {'sigma diff':>10}")


def _line(say, step, phase, loss, sigmas, diffs=("", "")) -> None:
    values = " ".join(f"{s:6.4f}" for s in sigmas)
    say(f"{step:>4}  {phase:<6} {loss:8.5f}         {values}  {diffs[0]:>9} {diffs[1]:>10}".rstrip())


def _ported(t: _Side, seed: int, lr: float, bar, say) -> _Side:
    """The Paddle side, built and loaded from the torch one by :func:`dualsn.port.torch_to_paddle`."""
    from dualsn import port

    bar.set_description("porting")
    p = _Side("paddle", seed, lr)
    report = port.torch_to_paddle(t.model, p.model)
    n_sn = sum(e.sn == "original" for e in report.entries)
    say(f"-- ported to Paddle (dualsn.port.torch_to_paddle): {len(report.entries)} tensors, "
        f"{n_sn} spectral norms with their u, v, {sum(e.transposed for e in report.entries)} "
        "transposed; from here both train on the same batches")
    bar.set_description("lockstep")
    return p


def _step(step: int, t: _Side, p: _Side | None, batch_data, result: DemoResult, say) -> None:
    """One training step of the torch side, and of the Paddle side once it exists."""
    loss_t, out_t = t.step(batch_data)
    sig_t = t.sigmas(t.layers)
    result.sigmas.append(sig_t)
    if p is None:
        _line(say, step, "torch", loss_t, sig_t)
        return
    loss_p, out_p = p.step(batch_data)
    sig_p = p.sigmas(t.layers)
    out_diff = _rel_diff(out_t, out_p)
    sigma_diff = max(abs(a - b) / abs(a) for a, b in zip(sig_t, sig_p))
    result.out_diff.append(out_diff)
    result.sigma_diff.append(sigma_diff)
    _line(say, step, "both", loss_t, sig_t, (f"{out_diff:.2e}", f"{sigma_diff:.2e}"))
