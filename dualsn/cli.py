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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import re
import sys
import warnings

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_FILE = 3
EXIT_BAD_FORMAT = 4
EXIT_FACTORY = 5
EXIT_MISMATCH = 6
EXIT_EXISTS = 7
EXIT_MISSING = 8
EXIT_WRITE = 9

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


def terminal_text(text: str, keep_newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: characters Python does not print (control
    characters such as ESC and CR, DEL, C1 controls, bidirectional overrides) are written as
    escapes (``\\x1b``, ``\\r``, ``\\u202e``). With ``keep_newlines`` newlines stay."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or (keep_newlines and c == "\n") else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _is_working_directory(entry: str, cwd: str | None) -> bool:
    if entry in ("", "."):
        return True
    try:
        return cwd is not None and os.path.realpath(entry) == cwd
    except (OSError, ValueError):
        return False


def _cwd() -> str | None:
    try:
        return os.path.realpath(os.getcwd())
    except OSError:  # removed meanwhile
        return None


@contextlib.contextmanager
def _working_directory_off_path():
    """Run a command with no working-directory entry on ``sys.path`` (see the module
    docstring); the embedding process gets its ``sys.path`` back afterwards."""
    cwd = _cwd()
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not _is_working_directory(p, cwd)]
    try:
        yield
    finally:
        added = [p for p in sys.path if p not in saved and not _is_working_directory(p, cwd)]
        sys.path[:] = saved + added


def _local_module_file(top: str) -> str | None:
    """``top.py`` or ``top/__init__.py`` in the working directory, if there is one."""
    if not top.isidentifier():
        return None
    for candidate in (top + ".py", os.path.join(top, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _installed(top: str) -> bool:
    """Whether ``top`` is importable without the working directory (or already imported)."""
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _import_named(module_name: str) -> tuple[object, str]:
    """Import the module a user named, and a hint for error messages. An installed module
    always wins over a file of the same name in the working directory; a module found nowhere
    else is imported from the working directory, which is then searched last."""
    top = module_name.partition(".")[0]
    local = _local_module_file(top)
    if local is not None and not _installed(top) and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    module = importlib.import_module(module_name)
    origin = getattr(sys.modules.get(top), "__file__", None)
    hint = ""
    if local is not None and (origin is None or os.path.realpath(origin) != os.path.realpath(local)):
        hint = f" ({local} in the working directory was not imported: an installed module has that name)"
    return module, hint


FRAMEWORK_EXTRAS = {"torch": "torch", "paddle": "paddle"}
"""The ``dualsn[...]`` extra that installs each framework."""


def _missing_framework(error: BaseException) -> str | None:
    """The framework (``"torch"``, ``"paddle"``) whose absence caused ``error``: a
    ModuleNotFoundError for it, raised directly or as the cause or context of another error
    (an ImportError with an install hint, say), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ModuleNotFoundError):
            top = (error.name or "").partition(".")[0]
            if top in FRAMEWORK_EXTRAS:
                return top
        error = error.__cause__ or error.__context__
    return None


def _missing_framework_error(option: str, spec: str, error: BaseException) -> CLIError | None:
    framework = _missing_framework(error)
    if framework is None:
        return None
    return CLIError(
        EXIT_MISSING,
        f'{option} {spec!r} needs {framework}, which is not installed: pip install "dualsn[{FRAMEWORK_EXTRAS[framework]}]" '
        f"({type(error).__name__}: {error})",
    )


def resolve(spec: str, option: str):
    """The object named by ``pkg.module:attr`` (``attr`` may be dotted). A module that cannot
    be imported because torch or Paddle is missing is exit 8, naming the extra to install."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(EXIT_USAGE, f"{option} {spec!r}: expected the form pkg.module:factory")
    hint = ""
    try:
        obj, hint = _import_named(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        missing = _missing_framework_error(option, spec, e)
        if missing is not None:
            raise missing from None
        raise CLIError(
            EXIT_FACTORY, f"{option} {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(EXIT_FACTORY, f"{option} {spec!r}: {module_name!r} has no attribute {attr!r}{hint}")
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
        missing = _missing_framework_error(option, spec, e)
        if missing is not None:
            raise missing from None
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
    p.add_argument("--source-preset", choices=("torch", "torch_legacy", "paddle"),
                   help="the preset SRC's spectral norms were trained with, when its keys do not tell "
                   "(e.g. a dualsn.paddle model with compat='torch' saved by paddle.save)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="tolerate missing and unexpected tensors (shapes and dtypes must still fit)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="do not print the per-tensor lines")
    p.add_argument("--allow-degenerate", action="store_true",
                   help="load NaN/Inf values and all-zero u, v (refused by default)")
    p.set_defaults(run=run_port)


def add_selection_arguments(p) -> None:
    """--key and --strip-prefix: which state dict of a nested checkpoint to use."""
    p.add_argument("--key", metavar="DOTTED.PATH",
                   help="the entry of a nested checkpoint to use, e.g. state_dict, G_ema, netG, "
                   "state_dict.model (by default the one that fits the model; exit 4 lists them when "
                   "several do)")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="take PREFIX off the keys that have it, e.g. module. (module., _orig_mod. and "
                   "model. are taken off by themselves when every key has one and the model has none)")


# [NAME:]DTYPE[D1,...][RANGE]
_INPUT_SPEC = re.compile(
    r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_.-]*):)?(?P<dtype>[A-Za-z0-9]+)\[(?P<shape>[^\]]*)\]"
    r"(?:<(?P<below>[^\[\]<]+)|\[(?P<low>[^,\]]+),(?P<high>[^)\]]+)\))?$"
)
INPUT_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
_INPUT_FORM = ("expected [NAME:]DTYPE[D1,D2,...] with an optional range <N (meaning [0, N)) or [A,B), "
               "e.g. x:float32[4,3,32,32] or y:int64[4]<10")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One ``--input``: ``name`` (for messages), numpy ``dtype``, ``shape``, and ``low``/``high``:
    values drawn uniformly from [low, high); None for a standard-normal float input."""

    text: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    low: float | None = None
    high: float | None = None

    def draw(self, rng):
        import numpy as np

        if self.dtype == "bool":
            return rng.integers(0, 2, self.shape).astype(np.bool_)
        if np.dtype(self.dtype).kind in "iu":
            return rng.integers(int(self.low), int(self.high), self.shape, dtype=np.dtype(self.dtype))
        if self.low is None:
            return rng.standard_normal(self.shape).astype(self.dtype)
        return rng.uniform(self.low, self.high, self.shape).astype(self.dtype)


def parse_input_spec(text: str) -> InputSpec:
    """Parse one ``--input`` spec; a CLIError (exit 2) names the spec and the expected form."""
    import numpy as np

    def bad(why: str) -> CLIError:
        return CLIError(EXIT_USAGE, f"--input {text!r}: {why}; {_INPUT_FORM}")

    m = _INPUT_SPEC.match(text.strip())
    if m is None:
        raise bad("not an input spec")
    dtype = m.group("dtype").lower()
    if dtype not in INPUT_DTYPES:
        raise bad(f"unknown dtype {m.group('dtype')!r} (known: {', '.join(INPUT_DTYPES)})")
    parts = [t.strip() for t in m.group("shape").split(",")] if m.group("shape").strip() else []
    if not all(t.isdigit() and int(t) > 0 for t in parts):
        raise bad(f"the shape [{m.group('shape')}] must be positive integers separated by commas")
    shape = tuple(int(t) for t in parts)
    integer = dtype != "bool" and np.dtype(dtype).kind in "iu"
    number = int if integer else float
    low = high = None
    try:
        if m.group("below") is not None:
            low, high = number(0), number(m.group("below").strip())
        elif m.group("low") is not None:
            low, high = number(m.group("low").strip()), number(m.group("high").strip())
    except ValueError:
        raise bad(f"the range must be {'integers' if integer else 'numbers'} for {dtype}") from None
    if dtype == "bool" and low is not None:
        raise bad("a bool input takes no range (it is drawn from {False, True})")
    if low is None and integer:
        raise bad(f"an integer input needs a range, e.g. {m.group('name') + ':' if m.group('name') else ''}"
                  f"{dtype}[{m.group('shape')}]<10")
    if low is not None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise bad(f"the range [{low}, {high}) is empty or not finite")
        if integer:
            info = np.iinfo(dtype)
            if low < info.min or high - 1 > info.max:
                raise bad(f"the range [{low}, {high}) does not fit {dtype}")
    return InputSpec(text, m.group("name") or "", dtype, shape, low, high)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise CLIError(EXIT_USAGE, f"--input-shape {text!r}: expected positive integers, e.g. 4,3,16,16")
    return shape


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
    import numpy as np
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
    specs = _input_specs(args)
    return [spec.draw(rng) for spec in specs]


def _input_specs(args) -> list[InputSpec]:
    """The random inputs of --check: each --input, or each --input-shape as a float32 one."""
    if args.input:
        return [parse_input_spec(text) for text in args.input]
    return [InputSpec(text, "", "float32", _parse_shape(text)) for text in args.input_shape]


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
    model_fw = port.framework_of(source_model)
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
    from dualsn import port

    out = sys.stdout
    if args.check and not args.source_model:
        raise CLIError(EXIT_USAGE, "--check needs --source-model (the model SRC belongs to)")
    if args.input and (args.input_shape or args.input_fn):
        raise CLIError(EXIT_USAGE, "--input cannot be combined with --input-shape or --input-fn: use one of them")
    if args.check and not (args.input or args.input_shape or args.input_fn):
        raise CLIError(EXIT_USAGE, "--check needs --input, --input-shape or --input-fn")
    if not args.input_fn:
        _input_specs(args)  # malformed specs: exit 2 before anything is read or built
    source_fw = _checkpoint_format(args.src)
    if os.path.lexists(args.dst) and not args.overwrite:
        raise CLIError(EXIT_EXISTS, f"{args.dst} exists; pass --overwrite to replace it")

    target = build_model(args.model, "--model")
    target_fw = port.framework_of(target)
    suffix = os.path.splitext(args.dst)[1].lower()
    wrong = (target_fw == "torch" and suffix in port.PADDLE_SUFFIXES) or (
        target_fw == "paddle" and suffix in port.TORCH_SUFFIXES
    )
    if wrong:
        good = " or ".join(port.TORCH_SUFFIXES if target_fw == "torch" else port.PADDLE_SUFFIXES)
        raise CLIError(EXIT_USAGE, f"{args.dst}: the target is a {target_fw} model: name DST {good}")

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


# ---------------------------------------------------------------------------------------------
# dualsn demo


def add_demo_parser(subparsers) -> None:
    from dualsn import demo

    p = subparsers.add_parser(
        "demo",
        help="train an SN-GAN discriminator in PyTorch, port it to Paddle, train both in lockstep",
        description="Builds a small SN-GAN discriminator in PyTorch (fixed seed), trains it on "
        "synthetic data, ports it to Paddle with dualsn.port and trains both on the same batches, "
        "printing each layer's sigma and the largest relative torch/Paddle difference per step. "
        "Exits 1 if a difference exceeds --rtol. Needs both frameworks; downloads nothing.",
    )
    p.add_argument("--steps", type=int, default=demo.STEPS,
                   help=f"lockstep steps after the port (default {demo.STEPS})")
    p.add_argument("--torch-steps", type=int, default=demo.TORCH_STEPS,
                   help=f"steps in PyTorch alone before the port (default {demo.TORCH_STEPS})")
    p.add_argument("--batch", type=int, default=demo.BATCH, help=f"batch size (default {demo.BATCH})")
    p.add_argument("--lr", type=float, default=demo.LR, help=f"SGD learning rate (default {demo.LR})")
    p.add_argument("--seed", type=int, default=demo.SEED, help=f"seed of everything (default {demo.SEED})")
    p.add_argument("--rtol", type=float, default=demo.RTOL,
                   help=f"largest relative torch/Paddle difference accepted (default {demo.RTOL:g})")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (by default it is shown when stderr is a terminal)")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from dualsn import demo

    for option, value, low in (("--steps", args.steps, 1), ("--torch-steps", args.torch_steps, 0),
                               ("--batch", args.batch, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise CLIError(EXIT_USAGE, f"{option} {value}: expected an integer >= {low}")
    if not (args.rtol > 0 and args.lr > 0):
        raise CLIError(EXIT_USAGE, "--rtol and --lr must be > 0")
    try:
        result = demo.run(steps=args.steps, torch_steps=args.torch_steps, batch=args.batch,
                          seed=args.seed, rtol=args.rtol, lr=args.lr, progress=args.progress)
    except demo.MissingFramework as e:
        raise CLIError(EXIT_MISSING, str(e)) from None
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED


# ---------------------------------------------------------------------------------------------
# dualsn report


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


# ---------------------------------------------------------------------------------------------
# dualsn check

QUICK_CASES = ("linear-f32", "linear_compat-f32", "conv2d-f32", "convtranspose2d-f64", "embedding-f32",
               "vector-f32")
"""``dualsn check --quick``: one case per kind of W-matrix (plain, Paddle-layout Linear, conv,
transposed conv with dim 1, embedding, exact 1-D), every sequence."""


def source_checkout() -> str | None:
    """The repository root holding ``backends/`` and ``conformance/`` next to the installed
    ``dualsn`` package, or None (an installed wheel has neither)."""
    import dualsn

    root = os.path.dirname(os.path.dirname(os.path.abspath(dualsn.__file__)))
    needed = [os.path.join(root, d, "__init__.py") for d in ("backends", "conformance")]
    return root if all(os.path.isfile(f) for f in needed) else None


def add_check_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="run the conformance suite on the installed backends",
        description="Runs every conformance case and sequence on each driver whose framework is "
        "installed (numpy reference, dualsn torch/Paddle, the built-ins), against the reference "
        "and the golden traces, and prints a case x driver pass/fail matrix. Exit 0 iff nothing "
        "failed. Needs the source checkout (backends/ and conformance/ next to dualsn/).",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"only the cases {', '.join(QUICK_CASES)}")
    p.add_argument("--case", action="append", metavar="ID", help="only this case (repeatable)")
    p.add_argument("--driver", action="append", metavar="NAME", help="only this driver (repeatable)")
    p.add_argument("--no-golden", dest="golden", action="store_false",
                   help="compare with the live reference only, not the stored golden traces")
    p.add_argument("--verbose", action="store_true", help="print every failure's full detail")
    p.add_argument("--no-differential", dest="differential", action="store_false",
                   help="skip the differential harness (whole models, fast path vs plain path, "
                   "torch vs Paddle); it also runs only without --case/--driver")
    p.set_defaults(run=run_check)


def run_check(args) -> int:
    root = source_checkout()
    if root is None:
        raise CLIError(
            EXIT_USAGE,
            "the conformance suite is not installed with the package: run `dualsn check` from a "
            "source checkout of dualsn (it needs the backends/ and conformance/ folders next to "
            "the dualsn/ package directory), e.g. `pip install -e .` in a git clone",
        )
    if root not in sys.path:
        sys.path.insert(0, root)
    import backends
    import conformance
    from backends.base import importable
    from conformance import cases

    known = {c.id for c in cases.CASES}
    if args.case:
        unknown = [c for c in args.case if c not in known]
        if unknown:
            raise CLIError(EXIT_USAGE, f"--case: unknown case(s) {unknown}; known: {sorted(known)}")
        case_ids = args.case
    elif args.quick:
        case_ids = [c for c in QUICK_CASES if c in known] or [c.id for c in cases.CASES[:4]]
    else:
        case_ids = None
    names = args.driver or backends.names()
    unknown = [d for d in names if d not in backends.DRIVERS]
    if unknown:
        raise CLIError(EXIT_USAGE, f"--driver: unknown driver(s) {unknown}; known: {backends.names()}")
    drivers, absent = [], []
    for name in names:
        missing = [m for m in backends.DRIVERS[name].requires if not importable(m)]
        (absent if missing else drivers).append((name, missing))
    drivers = [n for n, _ in drivers]
    for name, missing in absent:
        print(f"skipping driver {name}: {', '.join(missing)} is not installed "
              f'(pip install "dualsn[{missing[0]}]")')

    from tqdm import tqdm

    targets = conformance.targets(drivers, args.golden)
    chosen = case_ids if case_ids is not None else [c.id for c in cases.CASES]
    results = []
    for case_id in tqdm(chosen, desc="conformance", unit="case", file=sys.stderr, disable=None):
        results += conformance.run(drivers=drivers, cases=[case_id], golden=args.golden)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "skip")}
    print(conformance.format_matrix(results))
    print()
    failed = [r for r in results if r.status == "FAIL"]
    for r in failed[: None if args.verbose else 10]:
        detail = r.detail if args.verbose else (r.detail.strip().splitlines() or [""])[-1][:200]
        print(f"FAIL {r.case} / {r.sequence} / {r.target}: {detail}")
    if len(failed) > 10 and not args.verbose:
        print(f"... and {len(failed) - 10} more failures (--verbose prints all)")
    print(f"{len(results)} checks ({len(chosen)} cases x {len(targets)} driver:preset:oracle targets x "
          f"sequences): {counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")
    if args.differential and not (args.case or args.driver):
        failed = failed + _run_differential(args)
    return EXIT_CHECK_FAILED if failed or not results else EXIT_OK


def _run_differential(args) -> list:
    """The differential harness (``conformance.differential``): prints its matrix and
    failures; returns the failed checks."""
    from conformance import differential, format_matrix

    print("\ndifferential harness: whole models, fast path vs plain path, torch vs Paddle")
    results = differential.run(quick=args.quick)
    print(format_matrix(results))
    failed = differential.failures(results)
    for r in failed[: None if args.verbose else 10]:
        detail = r.detail if args.verbose else (r.detail.strip().splitlines() or [""])[-1][:200]
        print(f"FAIL {r.id}: {detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "skip")}
    print(f"{len(results)} differential checks: {counts['pass']} passed, {counts['FAIL']} failed, "
          f"{counts['skip']} skipped")
    return failed


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
