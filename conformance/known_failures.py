"""Disagreements the suite has found and that are not fixed yet, listed exactly.

pytest marks these (case, sequence, driver, preset) runs ``xfail(strict=True)``: they still
run, a fix makes them XPASS, which fails the run until the entry is deleted here. The
programmatic runner (``conformance.run``) reports them as plain FAILs.
"""

from __future__ import annotations

KNOWN_FAILURES: dict[tuple[str, str, str, str], str] = {}
"""(case, sequence, driver, preset) -> a short reason. Empty: everything agrees.

History: the suite's first run found dualsn.paddle's exact 1-D gradient (preset "torch") off by
about eps/||W|| (7e-5 at eps=1e-4), because Paddle's ``p_norm`` backward is x / (||x|| + eps);
dualsn.paddle now has its own backward for that case and the entries were removed."""


def reason(case: str, sequence: str, driver: str, preset: str) -> str | None:
    return KNOWN_FAILURES.get((case, sequence, driver, preset))
