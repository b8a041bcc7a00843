"""The sections of `make bench`, one module each; ``ldcq.bench.perf.SECTIONS`` names them and
runs each in a fresh process. Every ``section_*`` takes the :class:`~ldcq.bench.config.
BenchConfig` (and for some a family and stage) and returns its JSON-ready results."""
