"""Benchmark harness for dualsn: ``python -m benchmarks`` (see ``benchmarks.cli``).

Times plain layers, the frameworks' built-in spectral norm and dualsn's, interleaved in one
process, together with "the floor" (the arithmetic any spectral norm must do), and writes
markdown tables plus JSON to ``benchmarks/results/``.
"""
