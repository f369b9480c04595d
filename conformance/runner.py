"""Runs sequences on drivers and compares their traces with an oracle.

Oracles: ``"reference"`` (the live numpy reference, started from the same u0, v0 as the
driver) and ``"golden"`` (the stored reference traces, for drivers whose u0, v0 come from
``spec.init_uv``). Traces are cached per (driver, case, sequence, preset), so comparing one run
with both oracles costs one run.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass

import backends
from backends.base import Unsupported
from conformance import cases as _cases
from conformance import golden_store
from conformance.sequences import PRIMITIVES_USED, SEQUENCES, Session
from conformance.tolerances import compare

__all__ = ["Result", "targets", "check", "run", "driver_trace", "reference_trace"]

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


@dataclass(frozen=True)
class Result:
    case: str
    sequence: str
    driver: str
    preset: str
    oracle: str
    status: str  # "pass", "FAIL" or "skip"
    detail: str = ""

    @property
    def target(self) -> str:
        """``driver:preset`` (vs golden when the oracle is the golden traces)."""
        name = f"{self.driver}:{self.preset}"
        return name if self.oracle == "reference" else f"{name}~golden"


def targets(drivers=None, golden: bool = True) -> list[tuple[str, str, str]]:
    """(driver, preset, oracle) triples to check, from the registry alone (imports nothing).

    The reference is checked against the golden traces only; other drivers against the live
    reference and, when they start from ``spec.init_uv`` and ``golden`` is true, the golden
    traces too."""
    names = backends.names() if drivers is None else list(drivers)
    out = []
    for name in names:
        info = backends.DRIVERS[name]
        for preset in info.presets:
            if name != "reference":
                out.append((name, preset, "reference"))
            if golden and info.init_from_spec:
                out.append((name, preset, "golden"))
    return out


def _session(driver, case, preset, follow=None) -> Session:
    """A session building instances of ``driver``; the reference driver ``follow``s another
    driver's initial u, v when that driver draws its own."""
    config = case.config
    if follow is not None and not follow.init_from_spec:
        def make(params, seed, training):
            return driver.build(config, preset, params, seed, training, uv0=follow.initial_uv(config, preset, seed))
    else:
        def make(params, seed, training):
            return driver.build(config, preset, params, seed, training)
    return Session(case, preset, make)


@functools.lru_cache(maxsize=None)
def driver_trace(driver_name: str, case_id: str, sequence: str, preset: str):
    """("ok", trace) | ("skip", reason) | ("error", traceback) for one driver run."""
    driver = backends.load(driver_name)
    reason = driver.unavailable()
    if reason:
        return SKIP, reason
    case = _cases.CASES_BY_ID[case_id]
    reason = driver.unsupported(case.config, preset, PRIMITIVES_USED.get(sequence))
    if reason:
        return SKIP, reason
    try:
        return "ok", SEQUENCES[sequence](_session(driver, case, preset))
    except Unsupported as exc:
        return SKIP, str(exc)
    except Exception:
        return "error", traceback.format_exc(limit=6)


@functools.lru_cache(maxsize=None)
def reference_trace(case_id: str, sequence: str, preset: str, follow: str | None = None):
    """The reference's trace, from ``spec.init_uv`` or from driver ``follow``'s own u0, v0."""
    case = _cases.CASES_BY_ID[case_id]
    follow_driver = None
    if follow is not None and not backends.DRIVERS[follow].init_from_spec:
        follow_driver = backends.load(follow)
    return SEQUENCES[sequence](_session(backends.load("reference"), case, preset, follow_driver))


def check(case_id: str, sequence: str, driver: str, preset: str, oracle: str = "reference") -> Result:
    """Run one driver on one case and sequence and compare with the oracle."""
    dtype = _cases.CASES_BY_ID[case_id].dtype

    def result(status, detail=""):
        return Result(case_id, sequence, driver, preset, oracle, status, detail)

    kind, trace = driver_trace(driver, case_id, sequence, preset)
    if kind == SKIP:
        return result(SKIP, trace)
    if kind == "error":
        return result(FAIL, trace)
    if oracle == "reference":
        follow = None if backends.DRIVERS[driver].init_from_spec else driver
        try:
            expected = reference_trace(case_id, sequence, preset, follow)
        except Exception:
            return result(FAIL, "the reference failed:\n" + traceback.format_exc(limit=6))
    elif oracle == "golden":
        expected = golden_store.trace(case_id, sequence, preset)
        if expected is None:
            return result(FAIL, f"no golden trace for {case_id}/{sequence}/{preset}; {golden_store.REGENERATE}")
    else:
        raise ValueError(f"unknown oracle {oracle!r}")
    problems = compare(trace, expected, dtype)
    if problems:
        return result(FAIL, f"{driver}:{preset} vs {oracle}: " + "; ".join(problems))
    return result(PASS)


def run(drivers=None, cases=None, sequences=None, golden: bool = True) -> list[Result]:
    """Check every case x sequence x (driver, preset, oracle); returns one :class:`Result`
    each. ``drivers``, ``cases`` (ids) and ``sequences`` (names) default to all. Prints nothing."""
    case_ids = [c.id for c in _cases.CASES] if cases is None else list(cases)
    seq_names = list(SEQUENCES) if sequences is None else list(sequences)
    return [
        check(case_id, seq, driver, preset, oracle)
        for case_id in case_ids
        for driver, preset, oracle in targets(drivers, golden)
        for seq in seq_names
    ]


def matrix(results: list[Result]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """Summarize results as case x target cells: "pass" when every sequence passed (skips
    allowed), "FAIL" if any failed, "skip" when all were skipped. Returns (rows, columns,
    cells)."""
    rows = list(dict.fromkeys(r.case for r in results))
    cols = list(dict.fromkeys(r.target for r in results))
    cells: dict[tuple[str, str], list[str]] = {}
    for r in results:
        cells.setdefault((r.case, r.target), []).append(r.status)
    summary = {}
    for key, statuses in cells.items():
        if FAIL in statuses:
            summary[key] = FAIL
        elif all(s == SKIP for s in statuses):
            summary[key] = SKIP
        else:
            summary[key] = PASS
    return rows, cols, summary


def format_matrix(results: list[Result]) -> str:
    """The case x target pass/fail matrix as text (for a CLI): a legend of numbered columns,
    then one row per case."""
    rows, cols, cells = matrix(results)
    heads = [f"[{i}]" for i in range(len(cols))]
    widths = [max(len(h), 4) for h in heads]
    first = max([len(r) for r in rows] + [4])
    lines = [f"{h} {c}" for h, c in zip(heads, cols)]
    lines.append("")
    lines.append(" " * first + "  " + "  ".join(h.center(w) for h, w in zip(heads, widths)))
    for row in rows:
        marks = [cells.get((row, c), "-").center(w) for c, w in zip(cols, widths)]
        lines.append(f"{row:<{first}}  " + "  ".join(marks))
    return "\n".join(lines)
