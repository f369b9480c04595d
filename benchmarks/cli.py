"""``python -m benchmarks``: time plain vs built-in vs dualsn spectral norm in torch and Paddle.

Each framework runs in its own process (``--framework all`` starts one child per framework
and merges their JSON), because in one process torch and Paddle share the C allocator: whether
a freed W-sized block is reused or faulted in fresh depends on what the other framework did,
which distorts exactly the page-fault and allocation costs this benchmark reports.
``--in-process`` runs both in this process anyway, all variants of a case on one device
interleaved. Within a process, all variants of a case are interleaved round by round (see
``benchmarks.timing``); framework threads are pinned and printed. After the timing, the
training cases' peak memory is measured on fresh models (see the drivers' ``memory``). The
tables go to stdout and, with the raw numbers, to ``<out>/latest.md`` and ``<out>/latest.json``.

Devices: CPU rows always run (``--device cpu`` or ``auto``); the torch CUDA rows run when
``torch.cuda.is_available()`` (``auto``: skipped with a note otherwise; ``cuda``: an error).
The Paddle driver times CPU only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.cases import CASES, FULL_CASES, GROUPS, QUICK_CASES, SetupError, select
from benchmarks.timing import measure

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]  # where ``benchmarks`` and ``dualsn`` are importable from
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
        help="case(s) to run: names, shell patterns (e.g. 'conv_*_b64') or groups "
        f"({', '.join(GROUPS)}); repeatable or comma-separated. Known: {', '.join(CASES)}. "
        f"Default: the full set (--quick: {', '.join(QUICK_CASES)})",
    )
    p.add_argument("--list", action="store_true", help="list the cases and groups, then exit")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per framework (default 1)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (default): CPU rows, plus torch CUDA rows when CUDA is available (skipped with a note "
        "otherwise); cpu: CPU rows only; cuda: torch CUDA rows only (an error without CUDA)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run both frameworks in this one process, their variants interleaved (default: one "
        "process per framework, as in training: the two share C malloc and OpenMP state otherwise)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one framework, JSON only
    p.add_argument("--repeats", type=int, help="timed rounds per case (default 21, --quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up rounds per case (default 3, --quick 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where latest.md/json go (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    patterns = [n.strip() for arg in (args.case or []) for n in arg.split(",") if n.strip()]
    names, unknown = select(patterns)
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}; groups: {', '.join(GROUPS)}")
    args.case = names or list(QUICK_CASES if args.quick else FULL_CASES)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device == "cuda" and args.framework == "paddle":
        p.error("--device cuda runs the torch rows only; use --framework torch or all")
    return args


def _list_cases() -> str:
    lines = ["cases:"]
    lines += [f"  {name:24s} {case.description}" for name, case in CASES.items()]
    lines.append("groups:")
    lines += [f"  {name:24s} {', '.join(names)}" for name, names in GROUPS.items()]
    return "\n".join(lines)


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


def _groups(frameworks: list[str], threads: int, device: str) -> tuple[dict[str, list], list[str]]:
    """Drivers grouped by device ({"cpu": [...], "cuda": [...]}), and what was skipped, and why."""
    groups: dict[str, list] = {}
    skipped: list[str] = []
    devices = ["cpu", "cuda"] if device == "auto" else [device]
    for dev in devices:
        for fw in frameworks:
            if fw == "torch":
                from benchmarks.torch_bench import TorchDriver

                if dev == "cuda" and device == "auto":
                    import torch

                    if not torch.cuda.is_available():
                        skipped.append("torch GPU rows: torch.cuda.is_available() is False")
                        continue
                groups.setdefault(dev, []).append(TorchDriver(threads, dev))
            else:
                from benchmarks.paddle_bench import PaddleDriver, gpu_skip_reason

                if dev == "cuda":
                    skipped.append(f"paddle GPU rows: {gpu_skip_reason()}")
                    continue
                groups.setdefault(dev, []).append(PaddleDriver(threads, dev))
    return groups, skipped


def _settings(case, base: dict) -> dict:
    """The run-wide timing settings, lowered where the case asks for fewer (slow cases)."""
    settings = dict(base)
    for key in ("warmup", "repeats", "min_sample_s"):
        override = getattr(case, key)
        if override is not None:
            settings[key] = min(override, settings[key])
    return settings


def _run_case(case, mode: str, drivers: list, settings: dict, memory: bool) -> list[dict]:
    """Time one case in one mode on one device, all frameworks interleaved; one record per driver."""
    variants, floors = [], {}
    for d in drivers:
        vs, floor = d.variants(case, mode)
        for v in vs:
            v.name = f"{d.label}:{v.name}"
        variants += vs
        floors[d.label] = floor

    def sync() -> None:
        for d in drivers:
            d.sync()

    stats = measure(variants, sync=sync, **settings)
    del variants
    gc.collect()
    out = []
    for d in drivers:
        prefix = f"{d.label}:"
        own = {k[len(prefix):]: st for k, st in stats.items() if k.startswith(prefix)}
        mem = d.memory(case) if memory and mode == "train" else None
        res = report.summarize(d.label, d.name, str(getattr(d, "device", "cpu")), case, mode, own, floors[d.label], mem)
        out.append(dict(res, settings=settings))
    return out


def _child_argv(args: argparse.Namespace, framework: str, out: Path) -> list[str]:
    argv = ["--child", "--framework", framework, "--device", args.device, "--threads", str(args.threads),
            "--case", ",".join(args.case), "--out", str(out)]
    if args.quick:
        argv.append("--quick")
    if args.no_memory:
        argv.append("--no-memory")
    if args.repeats is not None:
        argv += ["--repeats", str(args.repeats)]
    if args.warmup is not None:
        argv += ["--warmup", str(args.warmup)]
    return argv


def _run_isolated(args: argparse.Namespace, frameworks: list[str]) -> dict:
    """One child process per framework; their JSON documents merged into one."""
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    load_start = os.getloadavg()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    docs = []
    with tempfile.TemporaryDirectory(prefix="dualsn-bench-") as tmp:
        for fw in frameworks:
            out = Path(tmp) / fw
            cmd = [sys.executable, "-m", "benchmarks", *_child_argv(args, fw, out)]
            print(f"{fw}: own process", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            if proc.returncode == 2:
                raise SetupError(f"the {fw} process could not start the run (its message is above)")
            if proc.returncode != 0:
                raise RuntimeError(f"the {fw} benchmark process failed with exit status {proc.returncode}")
            docs.append(json.loads((out / "latest.json").read_text()))
    meta = dict(docs[0]["meta"])
    for key in ("framework_info",):
        meta[key] = {k: v for d in docs for k, v in d["meta"][key].items()}
    meta["skipped"] = list(dict.fromkeys(s for d in docs for s in d["meta"]["skipped"]))
    meta["devices"] = list(dict.fromkeys(dev for d in docs for dev in d["meta"]["devices"]))
    meta.update(
        command="python -m benchmarks " + " ".join(shlex.quote(a) for a in args.argv),
        started=started.isoformat(timespec="seconds"),
        elapsed_s=time.perf_counter() - t0,
        loadavg=dict(start=list(load_start), end=list(os.getloadavg())),
        frameworks=frameworks,
        isolation="one process per framework",
    )
    return dict(meta=meta, results=[r for d in docs for r in d["results"]])


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; returns the JSON document."""
    frameworks = ["torch", "paddle"] if args.framework == "all" else [args.framework]
    if args.device == "cuda" and "paddle" in frameworks:
        print("--device cuda: timing torch rows only, Paddle skipped", file=sys.stderr)
        frameworks = ["torch"]
    if len(frameworks) > 1 and not args.in_process:
        return _run_isolated(args, frameworks)
    _import_frameworks(frameworks, args.threads)
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    base = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        base["repeats"] = args.repeats
    if args.warmup is not None:
        base["warmup"] = args.warmup
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    load_start = os.getloadavg()
    try:
        groups, skipped = _groups(frameworks, args.threads, args.device)
        for note in skipped:
            print(f"skipped: {note}", file=sys.stderr)
        print(
            "threads: " + ", ".join(f"{d.label} {d.info()['threads']}" for ds in groups.values() for d in ds),
            file=sys.stderr,
        )
        results, case_settings = [], {}
        for name in args.case:
            case = CASES[name]
            settings = _settings(case, base)
            case_settings[name] = settings
            for mode in case.modes:
                for dev, drivers in groups.items():
                    t_case = time.perf_counter()
                    results += _run_case(case, mode, drivers, settings, not args.no_memory)
                    print(f"  {dev:4s} {name} {mode}: {time.perf_counter() - t_case:.1f} s", file=sys.stderr)
        info = {d.label: d.info() for ds in groups.values() for d in ds}
    finally:
        if torch_threads is not None:  # leave an in-process caller's torch as it was
            sys.modules["torch"].set_num_threads(torch_threads)
    meta = dict(
        command="python -m benchmarks " + " ".join(shlex.quote(a) for a in args.argv),
        started=started.isoformat(timespec="seconds"),
        elapsed_s=time.perf_counter() - t0,
        loadavg=dict(start=list(load_start), end=list(os.getloadavg())),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        device=args.device,
        devices=list(groups),
        skipped=skipped,
        threads=args.threads,
        quick=args.quick,
        memory=not args.no_memory,
        frameworks=frameworks,
        isolation="one process" + (", frameworks interleaved" if len(frameworks) > 1 else ""),
        framework_info=info,
        cases={n: CASES[n].description for n in args.case},
        case_settings=case_settings,
        **base,
    )
    return dict(meta=meta, results=results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list:
        print(_list_cases())
        return 0
    args.argv = argv
    try:
        doc = run(args)
    except SetupError as exc:  # e.g. --device cuda without CUDA
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    if args.child:
        return 0
    text = report.markdown(doc)
    print(text)
    (args.out / "latest.md").write_text(text)
    print(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.json'}", file=sys.stderr)
    return 0
