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
import json
import os
import sys

import numpy as np

from conformance import cases as _cases
from conformance.golden_store import DIRECTORY, REGENERATE, fingerprint, path, trace
from dualsn import spec

__all__ = ["DIRECTORY", "REGENERATE", "generate", "trace", "path"]


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
        layout[case.id] = {"config": fingerprint(case), "dtype": case.dtype, "traces": traces}
    arrays = {dtype: np.concatenate(parts) if parts else np.zeros(0, dtype) for dtype, parts in chunks.items()}
    arrays["layout"] = np.array(json.dumps(layout))
    return arrays


def write_all() -> None:
    os.makedirs(DIRECTORY, exist_ok=True)
    for preset in spec.PRESETS:
        np.savez_compressed(path(preset), **generate(preset))


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
