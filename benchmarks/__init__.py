"""Benchmark harness for dualsn: ``python -m benchmarks`` (see ``benchmarks.cli``).

Times plain layers, the frameworks' built-in spectral norm and dualsn's, interleaved round by
round within one process per framework, together with "the floor" (the arithmetic any spectral
norm must do, each part in its fastest measured form); measures the peak memory and page faults
of a training step; and writes markdown tables plus JSON to ``benchmarks/results/``.
"""
