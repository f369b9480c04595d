"""``dualsn check``: the conformance suite and the differential harness, from a source
checkout."""

from __future__ import annotations

import os
import sys

from dualsn.cli._common import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, CLIError


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
    import conformance
    from conformance import cases

    case_ids = _case_ids(args, cases)
    drivers = _available_drivers(args)

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


def _case_ids(args, cases) -> list[str] | None:
    """The cases --case or --quick choose (None: all); exit 2 for an unknown one."""
    known = {c.id for c in cases.CASES}
    if args.case:
        unknown = [c for c in args.case if c not in known]
        if unknown:
            raise CLIError(EXIT_USAGE, f"--case: unknown case(s) {unknown}; known: {sorted(known)}")
        return args.case
    if args.quick:
        return [c for c in QUICK_CASES if c in known] or [c.id for c in cases.CASES[:4]]
    return None


def _available_drivers(args) -> list[str]:
    """The drivers --driver chooses (default: all) whose frameworks are installed; the others
    are named as skipped. Exit 2 for an unknown driver."""
    import backends
    from backends.base import importable

    names = args.driver or backends.names()
    unknown = [d for d in names if d not in backends.DRIVERS]
    if unknown:
        raise CLIError(EXIT_USAGE, f"--driver: unknown driver(s) {unknown}; known: {backends.names()}")
    drivers, absent = [], []
    for name in names:
        missing = [m for m in backends.DRIVERS[name].requires if not importable(m)]
        (absent if missing else drivers).append((name, missing))
    for name, missing in absent:
        print(f"skipping driver {name}: {', '.join(missing)} is not installed "
              f'(pip install "dualsn[{missing[0]}]")')
    return [n for n, _ in drivers]


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
