"""The ``dualsn`` command line (also ``python -m dualsn``).

Subcommands:

``dualsn port SRC DST --model pkg.module:factory``
    Builds the target model by calling ``factory()``, loads the checkpoint SRC (a torch
    ``.pt``/``.pth`` or a Paddle ``.pdparams`` file; read without running code from it) into
    it with :func:`dualsn.port.load_state_dict`, prints one line per tensor, and writes DST in
    the target framework's format, recording the model's spectral-norm presets in it. A nested
    SRC is narrowed to the state dict that fits (``--key``, ``--strip-prefix``); a spectral norm
    whose preset differs from the source's prints a warning line (``--strict-presets``: exit 6).
    ``--source-model pkg.module:factory`` builds the model SRC belongs to, so each Linear's
    layout and each preset are known rather than assumed; ``--check`` then feeds the same random
    inputs (``--input x:float32[4,3,32,32] --input "y:int64[4]<10"``, ``--input-shape`` or
    ``--input-fn``) to both models (in eval mode) and prints the largest absolute and relative
    difference of their outputs. DST is written only when everything succeeded.

``dualsn demo``
    Trains a small SN-GAN discriminator in PyTorch on synthetic data, ports it to Paddle and
    trains both in lockstep, printing per-layer sigma and the torch/Paddle differences per step
    (see :mod:`dualsn.demo`). Exit 1 if they differ beyond ``--rtol``.

``dualsn report --model pkg.module:factory [--checkpoint FILE] [--plot FILE.png]``
    Per-layer table of every spectral norm in the model: sigma estimate vs the exact largest
    singular value (SVD), and the products of sigma (see :mod:`dualsn.report`). ``--plot``
    draws the estimate over power iterations (needs the ``plot`` extra: matplotlib).
    ``dualsn report --checkpoint FILE`` alone describes the file (:func:`dualsn.port.describe`):
    flavour, preset, dim, shape and sigma of each spectral norm.

``dualsn check [--quick]``
    Runs the conformance suite (``conformance.run``) on the drivers whose frameworks are
    installed and prints a case x driver pass/fail matrix. Needs the source checkout: the
    top-level ``backends/`` and ``conformance/`` folders next to the ``dualsn`` package.

Exit codes: 0 success; 1 ``port --check`` or ``demo`` found a difference above ``--rtol``, or
``check`` found a failing case; 2 bad usage (a malformed ``--input`` included), or ``check``
without the source checkout; 3 a file (SRC, ``--checkpoint``) does not exist; 4 it is not a
checkpoint this tool can read (unknown or wrong format, or content it refuses), or a nested one
whose state dict cannot be chosen (the candidates are listed); 5 a factory cannot be imported or
called, or does not return a model; 6 the checkpoint does not fit the model (a preset mismatch
with ``--strict-presets`` included); 7 DST exists (pass ``--overwrite``), also when it appeared
while DST was being written; 8 an optional dependency is missing (a framework, also one a
factory imports, or matplotlib for ``--plot``): the message names the ``pip install
"dualsn[...]"`` extra; 9 DST (or the --plot file) cannot be written (a read-only directory, a
full disk): one line says why, and DST is left as it was. Every error is one message on
stderr, with control characters escaped.

The working directory is not on ``sys.path`` while a command runs (``python -m`` puts it
first): a ``paddle.py`` or ``torch.py`` there cannot stand in for the installed package. The
module named by ``--model``/``--source-model``/``--input-fn`` is imported from the working
directory only if no installed module has its name; the working directory is then searched
last. (``python -m dualsn`` itself imports ``dualsn`` and numpy from the working directory if
it holds them, before this code runs: in a folder you do not trust, run ``dualsn``, or
``python -P -m dualsn``.)

Neither framework is imported until a subcommand needs one. New subcommands register
themselves in :func:`build_parser` with an ``add_<name>_parser`` function.

Layout: this module (the parser and :func:`main`), ``_common`` (exit codes, errors, importing
factories), ``_checkpoints`` (reading and loading checkpoints), ``_inputs`` (``--input`` and
``--check``), and one module per subcommand: ``_port``, ``_demo``, ``_report``, ``_check``.
The names re-exported here are read-only copies: a setting such as
``_port.PROGRESS_MIN_ELEMENTS`` is read (and patched) where it is defined.
"""

from __future__ import annotations

import argparse
import sys

# The names of the former dualsn/cli.py that callers and tests use.
from dualsn.cli._check import QUICK_CASES, add_check_parser, source_checkout  # noqa: F401
from dualsn.cli._checkpoints import add_selection_arguments  # noqa: F401
from dualsn.cli._common import (EXIT_BAD_FORMAT, EXIT_CHECK_FAILED, EXIT_EXISTS, EXIT_FACTORY,  # noqa: F401
                                EXIT_MISMATCH, EXIT_MISSING, EXIT_NO_FILE, EXIT_OK, EXIT_USAGE, EXIT_WRITE,
                                FRAMEWORK_EXTRAS, CLIError, _working_directory_off_path, build_model, resolve,
                                terminal_text)
from dualsn.cli._demo import add_demo_parser
from dualsn.cli._inputs import INPUT_DTYPES, InputSpec, _inputs, parse_input_spec  # noqa: F401
from dualsn.cli._port import add_port_parser
from dualsn.cli._report import add_report_parser


def build_parser() -> argparse.ArgumentParser:
    from dualsn import __version__

    parser = argparse.ArgumentParser(
        prog="dualsn",
        description="Spectral normalization that gives the same numbers in PyTorch and Paddle.",
    )
    parser.add_argument("--version", action="version", version=f"dualsn {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_port_parser(subparsers)
    add_demo_parser(subparsers)
    add_report_parser(subparsers)
    add_check_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _working_directory_off_path():
            return args.run(args)
    except CLIError as e:
        print(f"dualsn {args.command}: error: {terminal_text(e.message, keep_newlines=True)}", file=sys.stderr)
        return e.code
