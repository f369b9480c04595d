"""One rank of the torch DistributedDataParallel test (tests/test_scale_torch.py).

Run as ``python tests/_ddp_worker.py RANK WORLD_SIZE PORT OUT_DIR``: joins a gloo process group
on 127.0.0.1:PORT, trains the toy SN discriminator of ``build_discriminator`` with the GAN
pattern loss = f(D(real)) + g(D(fake)) (two forwards, one backward) under several DDP buffer
settings, and saves u, v after every step and the final parameters to OUT_DIR/rank<R>.npz.
The test imports ``build_discriminator`` and ``train_step`` to run the single-process
reference on the global batch.
"""

from __future__ import annotations

import datetime
import inspect
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import _scale_common as common
import dualsn.torch as dt

# (name, DDP keyword arguments, seeded u/v init). Unseeded scenarios draw u, v from torch's
# RNG seeded differently on each rank, to see which DDP setting makes the ranks agree.
SCENARIOS = [
    ("default", {}, True),
    ("no_broadcast_seeded", {"broadcast_buffers": False}, True),
    ("no_broadcast_unseeded", {"broadcast_buffers": False}, False),
    ("no_forward_sync_unseeded", {"forward_sync_buffers": False}, False),
]


def build_discriminator(seeded: bool = True, rng_seed: int = 0) -> nn.Module:
    """The toy discriminator in float64, weights from torch seed 0; u, v seeded with
    ``common.SN_SEEDS`` or (``seeded=False``) drawn from torch's RNG seeded ``rng_seed``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(common.IN_CHANNELS, common.CONV_CHANNELS, 3).double()
    linear = nn.Linear(common.FLAT, 1).double()
    torch.manual_seed(rng_seed)
    for layer, seed in zip((conv, linear), common.SN_SEEDS):
        dt.spectral_norm(layer, seed=seed if seeded else None)
    return nn.Sequential(conv, nn.LeakyReLU(0.2), nn.Flatten(), linear)


def train_step(model, optimizer, real, fake) -> None:
    """One discriminator step, D(real) and D(fake) in two forwards, one backward."""
    optimizer.zero_grad()
    loss = F.softplus(-model(real)).mean() + F.softplus(model(fake)).mean()
    loss.backward()
    optimizer.step()


def sn_buffers(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: b.detach().numpy().copy() for name, b in model.named_buffers() if name.endswith(("_u", "_v"))}


def main() -> None:
    rank, world_size, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # broadcast_buffers is deprecated in recent torch: noise here
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    ddp_args = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    record: dict[str, np.ndarray] = {}
    for name, kwargs, seeded in SCENARIOS:
        if not all(k in ddp_args for k in kwargs):
            continue  # an older torch without forward_sync_buffers
        model = build_discriminator(seeded, rng_seed=100 + rank)
        ddp = nn.parallel.DistributedDataParallel(model, **kwargs)
        optimizer = torch.optim.SGD(model.parameters(), lr=common.LR)
        for key, value in sn_buffers(model).items():
            record[f"{name}/0/{key}"] = value
        for step, (real, fake) in enumerate(common.batches(), start=1):
            part = common.local_slice(rank)
            train_step(ddp, optimizer, torch.from_numpy(real[part]), torch.from_numpy(fake[part]))
            for key, value in sn_buffers(model).items():
                record[f"{name}/{step}/{key}"] = value
        for key, p in model.named_parameters():
            record[f"{name}/final/{key}"] = p.detach().numpy().copy()
        torch.distributed.barrier()
    np.savez(f"{out_dir}/rank{rank}.npz", **record)
    torch.distributed.destroy_process_group()
    print(f"rank {rank} done")


if __name__ == "__main__":
    main()
