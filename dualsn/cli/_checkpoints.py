"""Reading and loading checkpoints for ``dualsn port`` and ``dualsn report``: the selection
options, and every error of :mod:`dualsn.port` as a :class:`CLIError` with its exit code."""

from __future__ import annotations

import contextlib
import os
import warnings

from dualsn.cli._common import EXIT_BAD_FORMAT, EXIT_MISMATCH, EXIT_NO_FILE, CLIError, terminal_text


def add_selection_arguments(p) -> None:
    """--key and --strip-prefix: which state dict of a nested checkpoint to use."""
    p.add_argument("--key", metavar="DOTTED.PATH",
                   help="the entry of a nested checkpoint to use, e.g. state_dict, G_ema, netG, "
                   "state_dict.model (by default the one that fits the model; exit 4 lists them when "
                   "several do)")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="take PREFIX off the keys that have it, e.g. module. (module., _orig_mod. and "
                   "model. are taken off by themselves when every key has one and the model has none)")


@contextlib.contextmanager
def _checkpoint_errors(path: str):
    """Errors reading the checkpoint ``path`` as CLIErrors: missing (exit 3), unreadable or
    not a checkpoint dualsn reads (exit 4)."""
    from dualsn import port

    try:
        yield
    except port.CheckpointError as e:
        raise CLIError(EXIT_BAD_FORMAT, str(e)) from None
    except FileNotFoundError:
        raise CLIError(EXIT_NO_FILE, f"{path}: no such file") from None
    except OSError as e:
        raise CLIError(EXIT_BAD_FORMAT, f"{path}: cannot read it: {e.strerror or e}") from None


def _checkpoint_format(path: str) -> str:
    """The format of the checkpoint ``path``, or a CLIError (exit 3 or 4)."""
    from dualsn import port

    if not os.path.exists(path):
        raise CLIError(EXIT_NO_FILE, f"{path}: no such file")
    with _checkpoint_errors(path):
        return port.detect_format(path)


def _read_checkpoint(path: str) -> dict:
    """The checkpoint ``path`` as written (nested entries and dualsn's record kept; the
    state dict is chosen when it is loaded, with --key and --strip-prefix)."""
    from dualsn import port

    with _checkpoint_errors(path):
        return port.load_checkpoint(path)


def _load_into(model, state, args, option: str, *, source_fw, progress=None, strict=True, check_presets=True):
    """port.load_state_dict with the command's options; its errors as CLIErrors: a checkpoint
    whose state dict cannot be chosen (4), one that does not fit (6)."""
    from dualsn import port

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", port.PresetMismatchWarning)  # printed from the report
            return port.load_state_dict(
                model, state, source=source_fw, strict=strict, progress=progress,
                allow_degenerate=args.allow_degenerate, key=getattr(args, "key", None),
                strip_prefix=getattr(args, "strip_prefix", None),
                strict_presets=check_presets and getattr(args, "strict_presets", False),
                source_preset=getattr(args, "source_preset", None))
    except port.CheckpointError as e:
        raise CLIError(EXIT_BAD_FORMAT, f"{args.checkpoint if option == '--checkpoint' else args.src}: {e}") from None
    except port.PortError as e:
        where = args.checkpoint if option == "--checkpoint" else args.src
        raise CLIError(EXIT_MISMATCH, f"{where} does not fit {option}: {e}") from None


def _print_selection(report, path: str, out) -> None:
    if report.key:
        print(f"using entry {terminal_text(report.key)!r} of {terminal_text(path)}", file=out)
    if report.stripped_prefix:
        print(f"stripped the key prefix {terminal_text(report.stripped_prefix)!r}", file=out)


def _print_mismatches(report, out) -> None:
    for m in report.preset_mismatches:
        print(f"warning: preset mismatch: {terminal_text(str(m))}", file=out)
    if report.preset_mismatches:
        print(f"warning: training will not continue the source's power iteration step for step; build the "
              f"model with compat={report.preset_mismatches[0].source!r}, or pass --strict-presets to refuse",
              file=out)
