"""composekit's latency benchmarks (run from the repository root: ``python -m benchmarks --help``)."""
