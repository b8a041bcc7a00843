"""This machine's matmul peak: the denominator of the training stages' FLOP efficiency."""

from __future__ import annotations

from typing import Any

import torch

from ldcq.bench.config import PRECISIONS, BenchConfig
from ldcq.bench.measure import best_time


def section_peak(cfg: BenchConfig) -> dict[str, Any]:
    """Matmul GFLOP/s of an n×n by n×n product, fp32 and the autocast dtype."""
    n = cfg.matmul_size
    dtypes = {"float32": torch.float32}
    if PRECISIONS[cfg.precision] is not None:
        dtypes[str(PRECISIONS[cfg.precision]).removeprefix("torch.")] = PRECISIONS[cfg.precision]
    gflops = {}
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=cfg.device).to(dtype)
        b = torch.randn(n, n, device=cfg.device).to(dtype)
        # More repeats than elsewhere: a fresh process needs a few products to reach full speed.
        seconds = best_time(lambda a=a, b=b: a @ b, cfg, repeats=max(10, cfg.repeats))
        gflops[name] = 2 * n**3 / seconds / 1e9
    return {"matmul_size": n, "gflops": gflops}
