"""Golden traces: the numpy reference's trace of every case x sequence x preset, stored in
``conformance/golden/<preset>.npz`` (u0, v0 from ``spec.init_uv(case seed)``).

They pin the reference itself (a test checks the live reference still reproduces them) and let a
driver that starts from ``spec.init_uv`` be checked against stored numbers directly.

Regenerate after changing the case table, the sequences or the reference (and review the diff)::

    python -m conformance.golden --regenerate

``python -m conformance.golden`` without arguments checks the stored traces against the live
reference and prints a one-line summary.

Layout (compact: a few hundred KiB per file): one npz per preset, holding every trace entry
flattened into one ``float32`` and one ``float64`` array (each case in its dtype), and
``layout``, a JSON map case -> {config: the case's repr (a stale file is detected), dtype,
traces: sequence -> [[label, shape, offset], ...]}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from conformance import cases as _cases
from dualsn import spec

__all__ = ["DIRECTORY", "REGENERATE", "generate", "trace", "path"]

DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
REGENERATE = "regenerate with: python -m conformance.golden --regenerate"


def path(preset: str) -> str:
    return os.path.join(DIRECTORY, f"{preset}.npz")


def _fingerprint(case: _cases.Case) -> str:
    return repr(case)


def generate(preset: str) -> dict[str, np.ndarray]:
    """The golden arrays of one preset, computed by the live reference."""
    import backends
    from conformance.runner import reference_trace
    from conformance.sequences import SEQUENCES

    reference = backends.load("reference")
    chunks: dict[str, list[np.ndarray]] = {"float32": [], "float64": []}
    sizes = {"float32": 0, "float64": 0}
    layout: dict[str, dict] = {}
    for case in _cases.CASES:
        if reference.unsupported(case.config, preset):
            continue  # e.g. the convolution operator norm, which has one preset only
        traces = {}
        for seq in SEQUENCES:
            entries = []
            for label, value in reference_trace(case.id, seq, preset):
                value = np.asarray(value, dtype=case.dtype)
                entries.append([label, list(value.shape), sizes[case.dtype]])
                chunks[case.dtype].append(value.ravel())
                sizes[case.dtype] += value.size
            traces[seq] = entries
        layout[case.id] = {"config": _fingerprint(case), "dtype": case.dtype, "traces": traces}
    arrays = {dtype: np.concatenate(parts) if parts else np.zeros(0, dtype) for dtype, parts in chunks.items()}
    arrays["layout"] = np.array(json.dumps(layout))
    return arrays


def write_all() -> None:
    os.makedirs(DIRECTORY, exist_ok=True)
    for preset in spec.PRESETS:
        np.savez_compressed(path(preset), **generate(preset))


@functools.lru_cache(maxsize=None)
def _load(preset: str):
    """(layout, {dtype: flat array}) of one preset's file; (None, None) if there is none."""
    if not os.path.exists(path(preset)):
        return None, None
    with np.load(path(preset), allow_pickle=False) as data:
        layout = json.loads(str(data["layout"]))
        flats = {dtype: data[dtype] for dtype in ("float32", "float64")}
    return layout, flats


def trace(case_id: str, sequence: str, preset: str):
    """The stored trace, or None if it is missing or was made for a different case definition
    (cases the reference does not run under ``preset`` have none)."""
    layout, flats = _load(preset)
    entry = None if layout is None else layout.get(case_id)
    if entry is None or entry["config"] != _fingerprint(_cases.CASES_BY_ID[case_id]):
        return None
    if sequence not in entry["traces"]:
        return None
    flat = flats[entry["dtype"]]
    out = []
    for label, shape, offset in entry["traces"][sequence]:
        size = int(np.prod(shape, dtype=np.int64))
        out.append((label, flat[offset : offset + size].reshape(shape)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--regenerate", action="store_true", help="recompute and overwrite the golden files")
    args = parser.parse_args(argv)
    if args.regenerate:
        write_all()
        size = sum(os.path.getsize(path(p)) for p in spec.PRESETS)
        print(f"wrote {len(spec.PRESETS)} golden files to {DIRECTORY} ({size / 1024:.0f} KiB)")
        return 0
    from conformance.runner import run

    results = run(drivers=["reference"])
    failed = [r for r in results if r.status != "pass"]
    print(f"golden traces: {len(results) - len(failed)}/{len(results)} reproduced by the live reference")
    for r in failed:
        print(f"  {r.case}/{r.sequence}/{r.preset}: {r.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
