"""``dualsn report``: the per-layer sigma report of a model (:mod:`dualsn.report`), or the
description of a checkpoint (:func:`dualsn.port.describe`)."""

from __future__ import annotations

import sys

from dualsn.cli._checkpoints import (_checkpoint_format, _load_into, _print_mismatches, _print_selection,
                                     _read_checkpoint, add_selection_arguments)
from dualsn.cli._common import (EXIT_BAD_FORMAT, EXIT_MISSING, EXIT_NO_FILE, EXIT_OK, EXIT_USAGE, EXIT_WRITE,
                                CLIError, build_model, terminal_text)


def add_report_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="per-layer sigma estimate vs exact SVD, and the Lipschitz products",
        description="Builds the model with --model (optionally loading --checkpoint, torch or "
        "Paddle format) and prints, for every spectral norm in it, the sigma estimate, the exact "
        "largest singular value of its W-matrix and their relative error, plus the products of "
        "sigma. Those products bound the Lipschitz constant of a plain chain of layers only; for "
        "convolutions the reshaped-kernel sigma is not the operator norm, so there they are "
        "heuristics.",
    )
    p.add_argument("--model", metavar="PKG.MODULE:FACTORY",
                   help="factory that builds the model (called without arguments); without it, "
                   "--checkpoint is described from its state alone")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="state to load first (.pt/.pth or .pdparams; ported if from the other framework); "
                   "its flavour, presets, spectral norms and sigma are printed")
    add_selection_arguments(p)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the estimate vs exact over power iterations, per layer (needs matplotlib)")
    p.add_argument("--iterations", type=int, default=30, help="power iterations in the plot (default 30)")
    p.add_argument("--allow-degenerate", action="store_true",
                   help="load a --checkpoint with NaN/Inf values or all-zero u, v (refused by default)")
    p.set_defaults(run=run_report)


def _describe_checkpoint(args, key: str | None = None):
    """port.describe of --checkpoint (with --key/--strip-prefix), errors as CLIErrors."""
    from dualsn import port

    try:
        return port.describe(args.checkpoint, key=key or args.key, strip_prefix=args.strip_prefix)
    except port.CheckpointError as e:
        raise CLIError(EXIT_BAD_FORMAT, f"{args.checkpoint}: {e}" if args.checkpoint not in str(e) else str(e)) from None
    except FileNotFoundError:
        raise CLIError(EXIT_NO_FILE, f"{args.checkpoint}: no such file") from None
    except ValueError as e:  # flattening a shared or cyclic container
        raise CLIError(EXIT_BAD_FORMAT, f"{args.checkpoint}: {e}") from None
    except OSError as e:
        raise CLIError(EXIT_BAD_FORMAT, f"{args.checkpoint}: cannot read it: {e.strerror or e}") from None


def run_report(args) -> int:
    import importlib.util

    from dualsn import report

    if args.model is None and args.checkpoint is None:
        raise CLIError(EXIT_USAGE, "report needs --model, --checkpoint or both")
    if args.plot is not None:
        if args.model is None:
            raise CLIError(EXIT_USAGE, "--plot needs --model")
        if importlib.util.find_spec("matplotlib") is None:
            raise CLIError(EXIT_MISSING, '--plot needs matplotlib: pip install "dualsn[plot]"')
        if args.iterations < 1:
            raise CLIError(EXIT_USAGE, f"--iterations {args.iterations}: expected an integer >= 1")
    source_fw = _checkpoint_format(args.checkpoint) if args.checkpoint is not None else None
    if args.model is None:  # the checkpoint alone
        description = _describe_checkpoint(args)
        print(terminal_text(str(description), keep_newlines=True))
        return EXIT_OK
    model = build_model(args.model, "--model")
    if args.checkpoint is not None:
        state = _read_checkpoint(args.checkpoint)
        loaded = _load_into(model, state, args, "--checkpoint", source_fw=source_fw)
        print(terminal_text(_describe_checkpoint(args, key=loaded.key).summary()))  # the entry loaded
        _print_selection(loaded, args.checkpoint, sys.stdout)
        _print_mismatches(loaded, sys.stdout)
    result = report.report(model)
    print(result.to_markdown() if args.markdown else str(result))
    if args.plot is not None:
        if not result.layers:
            raise CLIError(EXIT_USAGE, "--plot: the model has no spectral norm to plot")
        try:
            result.plot(args.plot, iterations=args.iterations)
        except OSError as e:
            raise CLIError(EXIT_WRITE, f"cannot write {args.plot}: {e.strerror or e}") from None
        print(f"wrote {terminal_text(args.plot)}")
    return EXIT_OK
