"""``python -m benchmarks``: time plain vs built-in vs dualsn spectral norm in torch and Paddle.

Everything runs in one process. Variants of a case are interleaved round by round (see
``benchmarks.timing``), and framework threads are pinned and printed. The tables go to stdout
and, with the raw numbers, to ``<out>/latest.md`` and ``<out>/latest.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.cases import CASES, FULL_CASES, QUICK_CASES, SetupError
from benchmarks.timing import measure

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
FULL = dict(warmup=3, repeats=21, min_sample_s=0.02)
QUICK = dict(warmup=1, repeats=3, min_sample_s=0.002)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time plain vs built-in vs dualsn spectral norm in torch and Paddle.",
    )
    p.add_argument("--quick", action="store_true", help="few repeats and small cases (a smoke run)")
    p.add_argument("--framework", choices=("torch", "paddle", "all"), default="all")
    p.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help=f"case to run (repeatable or comma-separated); one of {', '.join(CASES)}. "
        f"Default: {', '.join(FULL_CASES)} (--quick: {', '.join(QUICK_CASES)})",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per framework (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: torch rows only (Paddle is skipped), synchronized around every sample")
    p.add_argument("--repeats", type=int, help="timed rounds per case (default 21, --quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up rounds per case (default 3, --quick 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where latest.md/json go (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    names = [n.strip() for arg in (args.case or []) for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    args.case = names or list(QUICK_CASES if args.quick else FULL_CASES)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device == "cuda" and args.framework == "paddle":
        p.error("--device cuda runs the torch rows only; use --framework torch or all")
    return args


def _import_frameworks(names: list[str], threads: int) -> None:
    """Import the frameworks, with the OpenMP/MKL thread variables set first.

    The variables only matter for a framework not yet imported (a fresh ``python -m
    benchmarks``); the drivers then pin threads through the frameworks' own calls anyway.
    """
    if any(n not in sys.modules for n in names):
        for var in THREAD_ENV:
            os.environ[var] = str(threads)
    for name in names:
        importlib.import_module(name)


def _drivers(frameworks: list[str], threads: int, device: str) -> dict:
    drivers = {}
    for fw in frameworks:
        if fw == "torch":
            from benchmarks.torch_bench import TorchDriver

            drivers[fw] = TorchDriver(threads, device)
        else:
            from benchmarks.paddle_bench import PaddleDriver

            drivers[fw] = PaddleDriver(threads, device)
    return drivers


def _settings(case, base: dict) -> dict:
    """The run-wide timing settings, lowered where the case asks for fewer (slow cases)."""
    settings = dict(base)
    for key in ("warmup", "repeats", "min_sample_s"):
        override = getattr(case, key)
        if override is not None:
            settings[key] = min(override, settings[key])
    return settings


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; returns the JSON document."""
    frameworks = ["torch", "paddle"] if args.framework == "all" else [args.framework]
    if args.device == "cuda" and "paddle" in frameworks:
        print("--device cuda: timing torch rows only, Paddle skipped", file=sys.stderr)
        frameworks = ["torch"]
    _import_frameworks(frameworks, args.threads)
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    base = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        base["repeats"] = args.repeats
    if args.warmup is not None:
        base["warmup"] = args.warmup
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    try:
        drivers = _drivers(frameworks, args.threads, args.device)
        print(
            "threads: " + ", ".join(f"{fw} {d.info()['threads']}" for fw, d in drivers.items()),
            file=sys.stderr,
        )
        results, case_settings = [], {}
        for name in args.case:
            case = CASES[name]
            settings = _settings(case, base)
            case_settings[name] = settings
            for mode in case.modes:
                for fw, driver in drivers.items():
                    t_case = time.perf_counter()
                    variants, floor = driver.variants(case, mode)
                    stats = measure(variants, sync=driver.sync, **settings)
                    res = report.summarize(fw, case, mode, stats, floor)
                    results.append(dict(res, settings=settings))
                    print(
                        f"  {fw:6s} {name} {mode}: {time.perf_counter() - t_case:.1f} s",
                        file=sys.stderr,
                    )
                    del variants
        info = {fw: d.info() for fw, d in drivers.items()}
    finally:
        if torch_threads is not None:  # leave an in-process caller's torch as it was
            sys.modules["torch"].set_num_threads(torch_threads)
    meta = dict(
        command="python -m benchmarks " + " ".join(shlex.quote(a) for a in args.argv),
        started=started.isoformat(timespec="seconds"),
        elapsed_s=time.perf_counter() - t0,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        device=args.device,
        threads=args.threads,
        quick=args.quick,
        frameworks=frameworks,
        framework_info=info,
        cases={n: CASES[n].description for n in args.case},
        case_settings=case_settings,
        **base,
    )
    return dict(meta=meta, results=results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        doc = run(args)
    except SetupError as exc:  # e.g. --device cuda without CUDA
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = report.markdown(doc)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text + "\n")
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.json'}", file=sys.stderr)
    return 0
