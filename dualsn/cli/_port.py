"""``dualsn port``: convert a checkpoint between PyTorch and Paddle for a given model."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

from dualsn.cli._checkpoints import (_checkpoint_format, _load_into, _print_mismatches, _print_selection,
                                     _read_checkpoint, add_selection_arguments)
from dualsn.adapters import framework_of
from dualsn.spec import PRESETS
from dualsn.cli._common import (EXIT_CHECK_FAILED, EXIT_EXISTS, EXIT_MISMATCH, EXIT_OK, EXIT_USAGE, EXIT_WRITE,
                                CLIError, build_model, terminal_text)
from dualsn.cli._inputs import _check, _input_specs


# Checkpoints with at least this many elements get a progress bar (on a terminal).
PROGRESS_MIN_ELEMENTS = 16 * 2**20


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
    p.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="one random input for --check, in order: [NAME:]DTYPE[D1,D2,...] with an optional "
                   "range <N ([0, N)) or [A,B) after it, e.g. x:float32[4,3,32,32] y:int64[4]<10; floats "
                   "without a range are standard normal, integers need one (repeat for several inputs)")
    p.add_argument("--input-shape", action="append", default=[], metavar="N,C,...",
                   help="shape of one float32 standard-normal input for --check (same as --input float32[N,C,...])")
    p.add_argument("--input-fn", metavar="PKG.MODULE:FN",
                   help="function returning the numpy input(s) for --check (instead of --input-shape)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest relative difference --check accepts (default 1e-4)")
    add_selection_arguments(p)
    p.add_argument("--strict-presets", action="store_true",
                   help="refuse to load spectral-norm state into a layer whose preset differs from the "
                   "source's (by default a warning)")
    p.add_argument("--source-preset", choices=tuple(PRESETS),
                   help="the preset SRC's spectral norms were trained with, when its keys do not tell "
                   "(e.g. a dualsn.paddle model with compat='torch' saved by paddle.save)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="tolerate missing and unexpected tensors (shapes and dtypes must still fit)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="do not print the per-tensor lines")
    p.add_argument("--allow-degenerate", action="store_true",
                   help="load NaN/Inf values and all-zero u, v (refused by default)")
    p.set_defaults(run=run_port)


def _elements(obj, seen: set) -> int:
    """Tensor elements in a (nested) checkpoint."""
    import numpy as np

    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return int(np.prod(tuple(obj.shape)))
    if isinstance(obj, (dict, list, tuple)) and id(obj) not in seen:
        seen.add(id(obj))
        return sum(_elements(v, seen) for v in (obj.values() if isinstance(obj, dict) else obj))
    return 0


def _progress(state) -> object:
    """A tqdm wrapper for the copy steps of a large checkpoint (shown on a terminal only)."""
    from tqdm import tqdm

    elements = _elements(state, set())
    disable = None if elements >= PROGRESS_MIN_ELEMENTS else True  # None: only on a tty

    def wrap(steps):
        return tqdm(steps, desc="porting", unit="tensor", file=sys.stderr, disable=disable)

    return wrap


def _describe(entry) -> tuple[str, str, str, str, str]:
    shape = "[" + ", ".join(str(s) for s in entry.shape) + "]"
    layout = "transposed" if entry.transposed else ("reshaped" if entry.note.startswith("reshaped") else "as-is")
    sn = f"sn {entry.sn}" if entry.sn else "-"
    if entry.source_key is not None:
        origin = f"<- {terminal_text(entry.source_key)}"
    else:
        origin = f"({terminal_text(entry.note)})"
    return terminal_text(entry.key), shape, layout, sn, origin


def _print_table(rows, out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)


def _save(state, path: str, framework: str, overwrite: bool) -> None:
    """save_checkpoint, with its errors as CLIErrors: DST exists (7), cannot be written (9)."""
    from dualsn import port

    try:
        port.save_checkpoint(state, path, framework, overwrite=overwrite)
    except FileExistsError as e:
        raise CLIError(EXIT_EXISTS, str(e)) from None
    except OSError as e:
        raise CLIError(EXIT_WRITE, f"cannot write {path}: {e.strerror or e}; nothing was written") from None


def _port_from_source_model(args, state, source_fw, target, progress):
    """Load SRC into the --source-model, then port that model to the target (layouts and
    presets known). The --source-model is the model SRC was saved from: its presets, not the
    keys', are the source's."""
    from dualsn import port

    source_model = build_model(args.source_model, "--source-model")
    model_fw = framework_of(source_model)
    if model_fw != source_fw:
        raise CLIError(
            EXIT_USAGE,
            f"{args.src} is a {source_fw} checkpoint but --source-model builds a {model_fw} model",
        )
    first = _load_into(source_model, state, args, "--source-model", source_fw=source_fw, check_presets=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", port.PresetMismatchWarning)
            report = port.port_model(source_model, target, strict=args.strict, progress=progress,
                                     allow_degenerate=args.allow_degenerate, strict_presets=args.strict_presets)
    except port.PortError as e:
        raise CLIError(EXIT_MISMATCH, f"{args.src} does not fit --model: {e}") from None
    # Name each tensor's origin in SRC, not in the intermediate source model.
    in_src = {e.key: e.source_key for e in first.entries}
    report.entries = [
        dataclasses.replace(e, source_key=in_src.get(e.source_key, e.source_key)) for e in report.entries
    ]
    report.key, report.stripped_prefix = first.key, first.stripped_prefix
    return source_model, report


def run_port(args) -> int:
    out = sys.stdout
    _check_port_options(args)
    source_fw = _checkpoint_format(args.src)
    if os.path.lexists(args.dst) and not args.overwrite:
        raise CLIError(EXIT_EXISTS, f"{args.dst} exists; pass --overwrite to replace it")

    target = build_model(args.model, "--model")
    target_fw = framework_of(target)
    _check_destination_suffix(args.dst, target_fw)

    state = _read_checkpoint(args.src)
    progress = _progress(state)
    source_model = None
    if args.source_model:
        source_model, report = _port_from_source_model(args, state, source_fw, target, progress)
    else:
        report = _load_into(target, state, args, "--model", source_fw=source_fw, progress=progress,
                            strict=args.strict)

    _print_selection(report, args.src, out)
    if not args.quiet:
        _print_table([_describe(e) for e in report.entries], out)
    for key in report.missing:
        print(f"warning: {terminal_text(key)} not in the source: left as the model built it", file=out)
    for key in report.unexpected:
        print(f"warning: {terminal_text(key)} in the source has no place in the target: skipped", file=out)
    _print_mismatches(report, out)

    if args.check and not _check(source_model, target, args, out):
        print(f"{terminal_text(args.dst)} not written", file=out)
        return EXIT_CHECK_FAILED

    _save(target, args.dst, target_fw, args.overwrite)  # the model: its presets are recorded in DST
    n_t = sum(e.transposed for e in report.entries)
    n_sn = sum(bool(e.sn) for e in report.entries)
    print(
        f"wrote {terminal_text(args.dst)} ({target_fw}) from {terminal_text(args.src)} ({source_fw}): "
        f"{len(report.entries)} tensors, {n_t} transposed, {n_sn} spectral-norm tensors",
        file=out,
    )
    return EXIT_OK


def _check_port_options(args) -> None:
    """Option combinations that cannot work, and malformed --input specs: exit 2 before
    anything is read or built."""
    if args.check and not args.source_model:
        raise CLIError(EXIT_USAGE, "--check needs --source-model (the model SRC belongs to)")
    if args.input and (args.input_shape or args.input_fn):
        raise CLIError(EXIT_USAGE, "--input cannot be combined with --input-shape or --input-fn: use one of them")
    if args.check and not (args.input or args.input_shape or args.input_fn):
        raise CLIError(EXIT_USAGE, "--check needs --input, --input-shape or --input-fn")
    if not args.input_fn:
        _input_specs(args)  # malformed specs: exit 2 before anything is read or built


def _check_destination_suffix(dst: str, target_fw: str) -> None:
    """DST must not carry the other framework's suffix."""
    from dualsn import port

    suffix = os.path.splitext(dst)[1].lower()
    wrong = (target_fw == "torch" and suffix in port.PADDLE_SUFFIXES) or (
        target_fw == "paddle" and suffix in port.TORCH_SUFFIXES
    )
    if wrong:
        good = " or ".join(port.TORCH_SUFFIXES if target_fw == "torch" else port.PADDLE_SUFFIXES)
        raise CLIError(EXIT_USAGE, f"{dst}: the target is a {target_fw} model: name DST {good}")
