"""Interleaved timing: every variant of a case is measured in the same rounds.

Each round times every variant once, in an order rotated by one position per round (and
reversed every other round), so slow drift of the machine (thermal, other processes, a
neighbour's test run) is spread over all variants instead of hitting whichever ran last.
A sample times ``inner`` back-to-back calls, with ``inner`` calibrated per variant before
the rounds so that a sample lasts at least ``min_sample_s`` (the clock's resolution and the
loop's overhead are then negligible). Warm-up rounds run the same way and are discarded.
Reported numbers are medians of the per-call time over the samples; the per-round samples are
kept in round order, so that a caller can pair variants round by round (see ``benchmarks.report``).

Each sample also counts the process's minor page faults (``getrusage(RUSAGE_SELF).ru_minflt``,
all threads) across the timed calls, divided by the calls: a fresh W-sized allocation shows up
as about W bytes / 4 KiB faults per call, a reused buffer as none. The two ``getrusage`` calls
sit outside the timed interval.

This module is framework-free: the caller passes ``sync`` (a no-op on CPU,
``torch.cuda.synchronize`` on CUDA).
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Variant:
    """One thing to time.

    ``fn()`` is the timed call. If ``prepare`` is given, each sample first calls
    ``prepare()`` untimed and times ``fn(prepared)`` once (used for registration, which needs
    a fresh layer per call).
    """

    name: str
    fn: Callable[..., Any]
    prepare: Callable[[], Any] | None = None


@dataclass
class Stats:
    median_ms: float
    q1_ms: float
    q3_ms: float
    samples: int
    inner: int
    samples_ms: list[float]  # per-call time of each timed round, in round order
    faults: list[float]  # minor page faults per call, per timed round

    @property
    def faults_per_call(self) -> float:
        return statistics.median(self.faults)

    def as_dict(self) -> dict:
        return dict(
            median_ms=self.median_ms,
            q1_ms=self.q1_ms,
            q3_ms=self.q3_ms,
            samples=self.samples,
            inner=self.inner,
            faults_per_call=self.faults_per_call,
            samples_ms=list(self.samples_ms),
        )


def _noop() -> None:
    pass


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _one_sample(variant: Variant, inner: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(seconds per call, minor page faults per call) for one sample."""
    if variant.prepare is not None:
        arg = variant.prepare()
        sync()
        f0 = _minflt()
        t0 = time.perf_counter()
        variant.fn(arg)
        sync()
        t1 = time.perf_counter()
        return t1 - t0, float(_minflt() - f0)
    fn = variant.fn
    sync()
    f0 = _minflt()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    t1 = time.perf_counter()
    return (t1 - t0) / inner, (_minflt() - f0) / inner


def quartiles(values: list[float]) -> tuple[float, float]:
    """(first, third) quartile, inclusive method; both equal the value for one value."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _calibrate(variant: Variant, min_sample_s: float, max_inner: int, sync) -> int:
    """How many back-to-back calls make one sample of at least ``min_sample_s``.

    The first call is not timed (it pays one-off costs: allocation, kernel selection).
    """
    if variant.prepare is not None:
        variant.fn(variant.prepare())
        return 1
    variant.fn()
    inner = 1
    for _ in range(4):
        per_call, _ = _one_sample(variant, inner, sync)
        want = max(1, min(max_inner, math.ceil(min_sample_s / max(per_call, 1e-9))))
        if want <= inner:
            break
        inner = want
    return inner


def measure(
    variants: list[Variant],
    *,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    max_inner: int = 10_000,
    sync: Callable[[], None] = _noop,
) -> dict[str, Stats]:
    """Time ``variants`` interleaved; returns per-variant statistics in milliseconds.

    Variants of different frameworks may share one call (``--in-process``, same device): they
    then see the same machine conditions round by round.

    Each variant is first calibrated (see :func:`_calibrate`), then ``warmup`` untimed rounds
    and ``repeats`` timed rounds run over all variants.
    """
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variant names: {names}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    faults: dict[str, list[float]] = {v.name: [] for v in variants}
    n = len(variants)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    # Garbage-collector pauses would land on a random variant: keep them out of the samples.
    gc.disable()
    try:
        inner = {v.name: _calibrate(v, min_sample_s, max_inner, sync) for v in variants}
        for rnd in range(warmup + repeats):
            shift = rnd % n
            order = variants[shift:] + variants[:shift]
            if rnd % 2:
                order = order[::-1]
            for variant in order:
                per_call, flt = _one_sample(variant, inner[variant.name], sync)
                if rnd >= warmup:
                    samples[variant.name].append(per_call)
                    faults[variant.name].append(flt)
            if rnd % 8 == 7:
                gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for name, values in samples.items():
        ms = [x * 1e3 for x in values]
        q1, q3 = quartiles(ms)
        out[name] = Stats(statistics.median(ms), q1, q3, len(ms), inner[name], ms, faults[name])
    return out
