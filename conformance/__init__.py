"""The dualsn conformance suite: one case table, run against every driver in :mod:`backends`.

Each driver's trace (u, v, sigma, normalized weight, outputs, gradients over a sequence of
primitives) is compared with the numpy reference ``dualsn.reference.ReferenceSN`` and, for drivers
that start from ``spec.init_uv``, with the stored golden traces.

* ``pytest conformance``: the tests, parametrized as case x sequence x driver.
* ``conformance.run(drivers=None, cases=None, sequences=None)``: the same checks as a list of
  :class:`Result`; ``conformance.format_matrix(results)`` renders a case x driver pass/fail
  matrix (for a ``dualsn check`` command).
* ``python -m conformance.golden --regenerate``: rewrite the golden traces.
* ``conformance.differential``: the differential harness (each backend's fast path against its
  plain path, and torch against Paddle, over training runs of whole models);
  ``differential.run(quick=False)`` returns its checks as pass/fail rows, which
  ``format_matrix`` renders too.

Importing this package imports no framework; a driver's framework is imported when it runs.
"""

from conformance import differential
from conformance.runner import Result, check, format_matrix, matrix, run, targets

__all__ = ["Result", "check", "differential", "format_matrix", "matrix", "run", "targets"]
