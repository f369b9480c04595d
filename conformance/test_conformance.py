"""The conformance tests: every case x sequence x driver (under each of its presets), compared
with the live numpy reference and, for drivers that start from ``spec.init_uv``, with the
stored golden traces. Ids read ``<case>/<sequence>/<driver>:<preset>``.

A driver whose framework is missing skips with the reason. Sequences a driver cannot run by
design (removal for the Paddle built-in, which has no remove function) are not applicable and
are not collected at all, so a skip always means a missing dependency. Disagreements found and
not yet fixed are listed in :mod:`conformance.known_failures` and run as strict xfails.
"""

from __future__ import annotations

import pytest

import backends
from conformance import known_failures, runner
from conformance.cases import CASES
from conformance.sequences import PRIMITIVES_USED, SEQUENCES


def _not_applicable(case, sequence: str, driver: str, preset: str) -> bool:
    """True when an installed driver cannot run this combination by design."""
    loaded = backends.load(driver)
    if loaded.unavailable():
        return False  # collected, and skipped with the missing dependency as the reason
    return loaded.unsupported(case.config, preset, PRIMITIVES_USED.get(sequence)) is not None


def _params(oracle: str):
    out = []
    for case in CASES:
        for driver, preset, target_oracle in runner.targets():
            if target_oracle != oracle:
                continue
            for sequence in SEQUENCES:
                if _not_applicable(case, sequence, driver, preset):
                    continue
                known = known_failures.reason(case.id, sequence, driver, preset)
                marks = [pytest.mark.xfail(reason=known, strict=True)] if known else []
                out.append(
                    pytest.param(
                        case.id, sequence, driver, preset, id=f"{case.id}/{sequence}/{driver}:{preset}", marks=marks
                    )
                )
    return out


def _assert(result: runner.Result) -> None:
    if result.status == runner.SKIP:
        pytest.skip(result.detail)
    if result.status == runner.FAIL:
        pytest.fail(result.detail, pytrace=False)


@pytest.mark.parametrize("case_id, sequence, driver, preset", _params("reference"))
def test_matches_reference(case_id, sequence, driver, preset):
    _assert(runner.check(case_id, sequence, driver, preset, oracle="reference"))


@pytest.mark.parametrize("case_id, sequence, driver, preset", _params("golden"))
def test_matches_golden(case_id, sequence, driver, preset):
    _assert(runner.check(case_id, sequence, driver, preset, oracle="golden"))
