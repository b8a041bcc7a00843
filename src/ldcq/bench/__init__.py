"""Benchmarks: `make bench` (`ldcq.bench.perf`: speed, memory and FLOP efficiency of every stage
on synthetic tensors) and `make bench-score` (`ldcq.bench.score`: normalized scores over seeds).

They live in the package, not in loose scripts, so the tests import them without path hacks and
`ruff` checks them like the rest; their results go to `bench/results/` (git-ignored).
"""
