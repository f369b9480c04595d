"""One rank of the paddle.DataParallel test (tests/test_scale_paddle.py).

Run as ``python tests/_paddle_dp_worker.py RANK OUT_DIR`` with Paddle's trainer environment
variables set (PADDLE_TRAINER_ID, PADDLE_TRAINERS_NUM, PADDLE_TRAINER_ENDPOINTS,
PADDLE_CURRENT_ENDPOINT, and PADDLE_DISTRI_BACKEND=gloo for CPU collectives). Trains the toy
SN discriminator of ``build_discriminator`` with loss = f(D(real)) + g(D(fake)) (two forwards,
one backward) under ``paddle.DataParallel`` and saves u, v after every step and the final
parameters to OUT_DIR/rank<R>.npz. The test imports ``build_discriminator`` and
``train_step`` to run the single-process reference on the global batch.
"""

from __future__ import annotations

import sys

import numpy as np
import paddle
import paddle.nn.functional as F

import _scale_common as common
import dualsn.paddle as dsn

INIT_OK = "paddle.distributed.init_parallel_env: ok"
"""Printed once the collectives are up: a failure before it is the environment's, not dualsn's."""


def build_discriminator(seeded: bool = True) -> paddle.nn.Layer:
    """The toy discriminator in float64, weights from a fixed numpy generator (the same in
    every process); u, v seeded with ``common.SN_SEEDS`` or drawn from Paddle's RNG."""
    old = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        conv = paddle.nn.Conv2D(common.IN_CHANNELS, common.CONV_CHANNELS, 3)
        linear = paddle.nn.Linear(common.FLAT, 1)
    finally:
        paddle.set_default_dtype(old)
    rng = np.random.default_rng(0)
    for p in (conv.weight, conv.bias, linear.weight, linear.bias):
        p.set_value((0.3 * rng.standard_normal(p.shape)).astype("float64"))
    for layer, seed in zip((conv, linear), common.SN_SEEDS):
        dsn.spectral_norm(layer, seed=seed if seeded else None)
    return paddle.nn.Sequential(conv, paddle.nn.LeakyReLU(0.2), paddle.nn.Flatten(), linear)


def train_step(model, optimizer, real, fake) -> None:
    """One discriminator step, D(real) and D(fake) in two forwards, one backward."""
    optimizer.clear_grad()
    loss = F.softplus(-model(real)).mean() + F.softplus(model(fake)).mean()
    loss.backward()
    optimizer.step()


def sn_buffers(model) -> dict[str, np.ndarray]:
    return {name: b.numpy().copy() for name, b in model.named_buffers() if name.endswith(("_u", "_v"))}


def main() -> None:
    rank, out_dir = int(sys.argv[1]), sys.argv[2]
    paddle.set_device("cpu")
    paddle.distributed.init_parallel_env()
    print(INIT_OK, flush=True)
    model = build_discriminator()
    dp = paddle.DataParallel(model)
    optimizer = paddle.optimizer.SGD(learning_rate=common.LR, parameters=model.parameters())
    record = {f"0/{k}": v for k, v in sn_buffers(model).items()}
    for step, (real, fake) in enumerate(common.batches(), start=1):
        part = common.local_slice(rank)
        train_step(dp, optimizer, paddle.to_tensor(real[part]), paddle.to_tensor(fake[part]))
        record.update({f"{step}/{k}": v for k, v in sn_buffers(model).items()})
    record.update({f"final/{k}": p.numpy().copy() for k, p in model.named_parameters()})
    np.savez(f"{out_dir}/rank{rank}.npz", **record)
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
