"""Before / after: today's dualsn against the package at an earlier git revision, in one
process, variants interleaved round by round (plain, built-in, before, after), so that the
machine's drift hits all of them alike.

    python -m benchmarks.versus f7cb138 --framework torch --layer linear --size 256 --mode train

The package at the revision is taken with ``git archive`` into a temporary folder and imported
as ``dualsn_<rev>`` (its own ``dualsn`` imports renamed), beside today's ``dualsn``. Prints the
paired medians of the overhead over plain, and per round its ratio to the built-in's
(training) or its % of the plain forward (eval). A tool for the closing notes of performance
work; ``python -m benchmarks`` stays the table of record.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_IMPORT = re.compile(r"\bdualsn(\.|\b)")


def load_revision(rev: str, framework: str, into: Path):
    """``dualsn.<framework>`` as it was at ``rev``, imported as ``dualsn_<rev>.<framework>``."""
    name = "dualsn_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dualsn"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "dualsn").rename(into / name)
    for path in (into / name).rglob("*.py"):
        path.write_text(_IMPORT.sub(lambda m: name + m.group(1), path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{name}.{framework}")


def _torch_variants(before, after, layer: str, size: int):
    import torch
    from torch import nn

    torch.set_num_threads(1)

    def build(sn):
        torch.manual_seed(0)
        if layer == "linear":
            module, x = nn.Linear(size, size), torch.randn(1, size)
        else:
            module, x = nn.Conv2d(size, size, 3, padding=1), torch.randn(1, size, 8, 8)
        if sn is not None:
            sn(module)
        return module, x

    def train(module, x):
        module(x).mean().backward()
        module.zero_grad(set_to_none=True)

    def evaluate(module, x):
        with torch.no_grad():
            module(x)

    builtin = torch.nn.utils.parametrizations.spectral_norm
    variants = {"plain": build(None), "builtin": build(builtin), "before": build(before.spectral_norm),
                "after": build(after.spectral_norm)}
    return variants, train, evaluate


def _paddle_variants(before, after, layer: str, size: int):
    import paddle

    paddle.set_device("cpu")

    def build(kind):
        paddle.seed(0)
        if layer == "linear":
            module, x = paddle.nn.Linear(size, size), paddle.randn([1, size])
        else:
            module, x = paddle.nn.Conv2D(size, size, 3, padding=1), paddle.randn([1, size, 8, 8])
        if kind == "builtin":
            module = paddle.nn.utils.spectral_norm(module, dim=1 if layer == "linear" else 0)
        elif kind is not None:
            kind.spectral_norm(module, compat="paddle")
        return module, x

    def train(module, x):
        module(x).mean().backward()
        module.clear_gradients()

    def evaluate(module, x):
        with paddle.no_grad():
            module(x)

    variants = {"plain": build(None), "builtin": build("builtin"), "before": build(before), "after": build(after)}
    return variants, train, evaluate


def run(args) -> str:
    after = importlib.import_module(f"dualsn.{args.framework}")
    with tempfile.TemporaryDirectory() as tmp:
        before = load_revision(args.rev, args.framework, Path(tmp))
        make = _torch_variants if args.framework == "torch" else _paddle_variants
        variants, train, evaluate = make(before, after, args.layer, args.size)
        for module, x in variants.values():
            train(module, x)  # state made at the first training forward exists
            if args.mode == "eval":
                module.eval()
        call = train if args.mode == "train" else evaluate
        for module, x in variants.values():
            for _ in range(args.warmup):
                call(module, x)
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (module, x) in variants.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    call(module, x)
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    plain = times["plain"]
    over = {name: [t - p for t, p in zip(ts, plain)] for name, ts in times.items() if name != "plain"}
    if args.mode == "train":
        scale, label = 1.0, "/ built-in's"
        rel = {n: [o / b for o, b in zip(over[n], over["builtin"]) if b > 0] for n in ("before", "after")}
    else:
        scale, label = 100.0, "% of plain"
        rel = {n: [o / p for o, p in zip(over[n], plain)] for n in ("before", "after")}
    lines = [f"{args.framework} {args.layer}_{args.size} {args.mode}, {args.rounds} rounds of {args.calls} calls: "
             f"plain {statistics.median(plain):.3f} ms, built-in overhead {statistics.median(over['builtin']):.3f} ms"]
    for name in ("before", "after"):
        lines.append(f"  {name:6} ({args.rev if name == 'before' else 'working tree'}): overhead "
                     f"{statistics.median(over[name]):.3f} ms, {label} {scale * statistics.median(rel[name]):.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare against (e.g. a commit before the change)")
    p.add_argument("--framework", choices=("torch", "paddle"), default="torch")
    p.add_argument("--layer", choices=("linear", "conv"), default="linear", help="conv: 3x3, padding 1, 8x8 input")
    p.add_argument("--size", type=int, default=256, help="features (linear) or channels (conv)")
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=100, help="calls per variant per round")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per variant first")
    print(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
