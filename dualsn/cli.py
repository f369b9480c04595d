"""The ``dualsn`` command line (also ``python -m dualsn``).

Subcommands:

``dualsn port SRC DST --model pkg.module:factory``
    Builds the target model by calling ``factory()``, loads the checkpoint SRC (a torch
    ``.pt``/``.pth`` or a Paddle ``.pdparams`` file; read without running code from it) into
    it with :func:`dualsn.port.load_state_dict`, prints one line per tensor, and writes DST in
    the target framework's format. ``--source-model pkg.module:factory`` builds the model SRC
    belongs to, so each Linear's layout is known rather than assumed; ``--check`` then feeds
    the same random input to both models (in eval mode) and prints the largest absolute and
    relative difference of their outputs. DST is written only when everything succeeded.

Exit codes: 0 success; 1 ``--check`` found a difference above ``--rtol``; 2 bad usage; 3 SRC
does not exist; 4 SRC is not a checkpoint this tool can read (unknown or wrong format, or
content it refuses); 5 a factory cannot be imported or called, or does not return a model;
6 the checkpoint does not fit the model; 7 DST exists (pass ``--overwrite``).

Neither framework is imported until a subcommand needs one. New subcommands register
themselves in :func:`build_parser` with an ``add_<name>_parser`` function.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_FILE = 3
EXIT_BAD_FORMAT = 4
EXIT_FACTORY = 5
EXIT_MISMATCH = 6
EXIT_EXISTS = 7

# Checkpoints with at least this many elements get a progress bar (on a terminal).
PROGRESS_MIN_ELEMENTS = 16 * 2**20


class CLIError(Exception):
    """An error the command reports as one message and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# Shared helpers


def resolve(spec: str, option: str):
    """The object named by ``pkg.module:attr`` (``attr`` may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(EXIT_USAGE, f"{option} {spec!r}: expected the form pkg.module:factory")
    # As `python -m` does: the user's own modules in the working directory are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise CLIError(
            EXIT_FACTORY, f"{option} {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(EXIT_FACTORY, f"{option} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(EXIT_FACTORY, f"{option} {spec!r}: {attr!r} is not callable")
    return obj


def build_model(spec: str, option: str):
    """Call the factory ``spec`` and check that it returned a torch or Paddle model."""
    from dualsn import port

    factory = resolve(spec, option)
    try:
        model = factory()
    except Exception as e:
        raise CLIError(EXIT_FACTORY, f"{option} {spec!r}: calling it failed: {type(e).__name__}: {e}") from None
    try:
        port.framework_of(model)
    except TypeError:
        raise CLIError(
            EXIT_FACTORY,
            f"{option} {spec!r}: returned a {type(model).__name__}, not a torch.nn.Module or a "
            "paddle.nn.Layer",
        ) from None
    return model


# ---------------------------------------------------------------------------------------------
# dualsn port


def add_port_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "port",
        help="convert a checkpoint between PyTorch and Paddle for a given model",
        description="Load SRC (.pt/.pth or .pdparams) into the model built by --model and "
        "write it to DST in that model's framework format.",
    )
    p.add_argument("src", metavar="SRC", help="source checkpoint (.pt, .pth or .pdparams)")
    p.add_argument("dst", metavar="DST", help="checkpoint to write, in the target model's format")
    p.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                   help="factory that builds the target model (called without arguments)")
    p.add_argument("--source-model", metavar="PKG.MODULE:FACTORY",
                   help="factory that builds the model SRC was saved from (its Linear layouts "
                   "are then known exactly; required by --check)")
    p.add_argument("--check", action="store_true",
                   help="compare both models' outputs on the same random input")
    p.add_argument("--input-shape", action="append", default=[], metavar="N,C,...",
                   help="shape of one float32 random input for --check (repeat for several inputs)")
    p.add_argument("--input-fn", metavar="PKG.MODULE:FN",
                   help="function returning the numpy input(s) for --check (instead of --input-shape)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest relative difference --check accepts (default 1e-4)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="tolerate missing and unexpected tensors (shapes and dtypes must still fit)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="do not print the per-tensor lines")
    p.set_defaults(run=run_port)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise CLIError(EXIT_USAGE, f"--input-shape {text!r}: expected positive integers, e.g. 4,3,16,16")
    return shape


def _progress(state) -> object:
    """A tqdm wrapper for the copy steps of a large checkpoint (shown on a terminal only)."""
    import numpy as np
    from tqdm import tqdm

    elements = sum(int(np.prod(tuple(v.shape))) for v in state.values() if hasattr(v, "shape"))
    disable = None if elements >= PROGRESS_MIN_ELEMENTS else True  # None: only on a tty

    def wrap(steps):
        return tqdm(steps, desc="porting", unit="tensor", file=sys.stderr, disable=disable)

    return wrap


def _describe(entry) -> tuple[str, str, str, str, str]:
    shape = "[" + ", ".join(str(s) for s in entry.shape) + "]"
    layout = "transposed" if entry.transposed else ("reshaped" if entry.note.startswith("reshaped") else "as-is")
    sn = f"sn {entry.sn}" if entry.sn else "-"
    if entry.source_key is not None:
        origin = f"<- {entry.source_key}"
    else:
        origin = f"({entry.note})"
    return entry.key, shape, layout, sn, origin


def _print_table(rows, out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)


def _inputs(args) -> list:
    import numpy as np

    if args.input_fn:
        fn = resolve(args.input_fn, "--input-fn")
        try:
            values = fn()
        except Exception as e:
            raise CLIError(EXIT_FACTORY, f"--input-fn {args.input_fn!r}: calling it failed: {e}") from None
        values = list(values) if isinstance(values, (tuple, list)) else [values]
        return [np.asarray(v) for v in values]
    rng = np.random.default_rng(args.seed)
    return [rng.standard_normal(_parse_shape(s)).astype(np.float32) for s in args.input_shape]


def _run_model(model, inputs) -> list:
    """Eval-mode outputs of ``model`` on numpy ``inputs``, as a flat list of numpy arrays."""
    import numpy as np
    from dualsn import port

    model.eval()
    if port.framework_of(model) == "torch":
        import torch

        with torch.no_grad():
            out = model(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    else:
        import paddle

        with paddle.no_grad():
            out = model(*[paddle.to_tensor(x) for x in inputs])

    flat = []

    def collect(o):
        if isinstance(o, (tuple, list)):
            for item in o:
                collect(item)
        elif isinstance(o, dict):
            for key in sorted(o):
                collect(o[key])
        else:
            flat.append(port._to_numpy(o))

    collect(out)
    return flat


def _check(source_model, target, args, out) -> bool:
    import numpy as np

    inputs = _inputs(args)
    try:
        a = _run_model(source_model, inputs)
        b = _run_model(target, inputs)
    except Exception as e:
        raise CLIError(EXIT_USAGE, f"--check: running the models failed: {type(e).__name__}: {e}") from None
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        print(f"check: the models' outputs differ in structure: {[x.shape for x in a]} vs "
              f"{[y.shape for y in b]}", file=out)
        return False
    abs_diff = max((float(np.max(np.abs(x - y))) if x.size else 0.0) for x, y in zip(a, b))
    scale = max((float(np.max(np.abs(x))) if x.size else 0.0) for x in a)
    rel_diff = abs_diff / scale if scale > 0 else abs_diff
    ok = rel_diff <= args.rtol
    print(
        f"check: max abs diff {abs_diff:.3e}, max rel diff {rel_diff:.3e} "
        f"(rtol {args.rtol:g}): {'OK' if ok else 'FAILED'}",
        file=out,
    )
    return ok


def run_port(args) -> int:
    from dualsn import port

    out = sys.stdout
    if args.check and not args.source_model:
        raise CLIError(EXIT_USAGE, "--check needs --source-model (the model SRC belongs to)")
    if args.check and not (args.input_shape or args.input_fn):
        raise CLIError(EXIT_USAGE, "--check needs --input-shape or --input-fn")
    if not os.path.isfile(args.src):
        raise CLIError(EXIT_NO_FILE, f"{args.src}: no such file")
    if os.path.exists(args.dst) and not args.overwrite:
        raise CLIError(EXIT_EXISTS, f"{args.dst} exists; pass --overwrite to replace it")
    try:
        source_fw = port.detect_format(args.src)
    except port.CheckpointError as e:
        raise CLIError(EXIT_BAD_FORMAT, str(e)) from None

    target = build_model(args.model, "--model")
    target_fw = port.framework_of(target)
    suffix = os.path.splitext(args.dst)[1].lower()
    wrong = (target_fw == "torch" and suffix in port.PADDLE_SUFFIXES) or (
        target_fw == "paddle" and suffix in port.TORCH_SUFFIXES
    )
    if wrong:
        good = " or ".join(port.TORCH_SUFFIXES if target_fw == "torch" else port.PADDLE_SUFFIXES)
        raise CLIError(EXIT_USAGE, f"{args.dst}: the target is a {target_fw} model: name DST {good}")

    try:
        state = port.load_checkpoint(args.src)
    except port.CheckpointError as e:
        raise CLIError(EXIT_BAD_FORMAT, str(e)) from None
    progress = _progress(state)

    source_model = None
    try:
        if args.source_model:
            source_model = build_model(args.source_model, "--source-model")
            model_fw = port.framework_of(source_model)
            if model_fw != source_fw:
                raise CLIError(
                    EXIT_USAGE,
                    f"{args.src} is a {source_fw} checkpoint but --source-model builds a {model_fw} model",
                )
            try:
                first = port.load_state_dict(source_model, state, source=source_fw)
            except port.PortError as e:
                raise CLIError(EXIT_MISMATCH, f"{args.src} does not fit --source-model: {e}") from None
            report = port.port_model(source_model, target, strict=args.strict, progress=progress)
            # Name each tensor's origin in SRC, not in the intermediate source model.
            in_src = {e.key: e.source_key for e in first.entries}
            report.entries = [
                dataclasses.replace(e, source_key=in_src.get(e.source_key, e.source_key))
                for e in report.entries
            ]
        else:
            report = port.load_state_dict(
                target, state, source=source_fw, strict=args.strict, progress=progress
            )
    except port.PortError as e:
        raise CLIError(EXIT_MISMATCH, f"{args.src} does not fit --model: {e}") from None

    if not args.quiet:
        _print_table([_describe(e) for e in report.entries], out)
    for key in report.missing:
        print(f"warning: {key} not in the source: left as the model built it", file=out)
    for key in report.unexpected:
        print(f"warning: {key} in the source has no place in the target: skipped", file=out)

    if args.check and not _check(source_model, target, args, out):
        print(f"{args.dst} not written", file=out)
        return EXIT_CHECK_FAILED

    port.save_checkpoint(port._adapter(target_fw).state(target), args.dst, target_fw, overwrite=args.overwrite)
    n_t = sum(e.transposed for e in report.entries)
    n_sn = sum(bool(e.sn) for e in report.entries)
    print(
        f"wrote {args.dst} ({target_fw}) from {args.src} ({source_fw}): {len(report.entries)} "
        f"tensors, {n_t} transposed, {n_sn} spectral-norm tensors",
        file=out,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    from dualsn import __version__

    parser = argparse.ArgumentParser(
        prog="dualsn",
        description="Spectral normalization that gives the same numbers in PyTorch and Paddle.",
    )
    parser.add_argument("--version", action="version", version=f"dualsn {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_port_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CLIError as e:
        print(f"dualsn {args.command}: error: {e.message}", file=sys.stderr)
        return e.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
