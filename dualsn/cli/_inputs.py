"""The random inputs of ``dualsn port --check`` (``--input``, ``--input-shape``,
``--input-fn``), and the check itself: both models' outputs on the same inputs."""

from __future__ import annotations

import dataclasses
import math
import re

from dualsn.cli._common import EXIT_FACTORY, EXIT_USAGE, CLIError, resolve


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
    from dualsn import port
    from dualsn.adapters import adapter, framework_of

    out = adapter(framework_of(model)).forward(model, inputs)

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
