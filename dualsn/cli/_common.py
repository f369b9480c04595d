"""What every subcommand shares: exit codes, :class:`CLIError`, terminal-safe text, and
importing the user's factories (``pkg.module:factory``) with the working directory off
``sys.path``."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
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
EXIT_MISSING = 8
EXIT_WRITE = 9


class CLIError(Exception):
    """An error the command reports as one message and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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
    from dualsn.adapters import framework_of

    factory = resolve(spec, option)
    try:
        model = factory()
    except Exception as e:
        missing = _missing_framework_error(option, spec, e)
        if missing is not None:
            raise missing from None
        raise CLIError(EXIT_FACTORY, f"{option} {spec!r}: calling it failed: {type(e).__name__}: {e}") from None
    try:
        framework_of(model)
    except TypeError:
        raise CLIError(
            EXIT_FACTORY,
            f"{option} {spec!r}: returned a {type(model).__name__}, not a torch.nn.Module or a "
            "paddle.nn.Layer",
        ) from None
    return model
