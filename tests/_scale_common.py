"""Shared, framework-free pieces of the training-at-scale tests (tests/test_scale_*.py) and
the worker processes they spawn (tests/_ddp_worker.py, tests/_paddle_dp_worker.py).

Everything here is numpy or the standard library: the data every process trains on, and
the small helpers for starting worker processes with bounded time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# The toy GAN discriminator every distributed test trains: conv (3x3) -> leaky relu -> linear.
IN_CHANNELS, IMAGE_SIZE, CONV_CHANNELS = 2, 5, 3
FLAT = CONV_CHANNELS * (IMAGE_SIZE - 2) ** 2
STEPS = 3
LOCAL_BATCH = 2
WORLD_SIZE = 2
LR = 0.5  # large, so that W (and with it u, v) moves visibly between steps
SN_SEEDS = (11, 12)  # seeds of the two spectral norms (conv, linear)


def batches(steps: int = STEPS, global_batch: int = LOCAL_BATCH * WORLD_SIZE):
    """(real, fake) float64 arrays for every step, the global batch of all ranks together."""
    rng = np.random.default_rng(2024)
    shape = (global_batch, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return [(rng.standard_normal(shape) + 1.0, rng.standard_normal(shape) - 1.0) for _ in range(steps)]


def local_slice(rank: int) -> slice:
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def run_workers(script: str, envs: list[dict], args: list[list[str]], timeout: float) -> list[str]:
    """Run ``python script`` once per entry of ``envs``/``args``, all at the same time.

    Returns each process's combined output. Raises RuntimeError (with every log) if one of
    them fails or they are not all done within ``timeout`` seconds; stragglers are killed.
    """
    procs = []
    for env_extra, argv in zip(envs, args):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, **env_extra)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "tests" / script), *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=str(REPO),
            )
        )
    outputs, failed = [], False
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
            failed |= p.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs[len(outputs):]:
            out, _ = p.communicate()
            outputs.append(out + "\n[killed: timeout]")
    if failed:
        logs = "\n".join(f"--- worker {i} (rc={p.returncode}) ---\n{o[-4000:]}" for i, (p, o) in enumerate(zip(procs, outputs)))
        raise RuntimeError(f"{script} failed:\n{logs}")
    return outputs
