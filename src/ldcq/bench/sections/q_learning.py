"""Q-learning: LatentBCQ updates/s with uniform and prioritized sampling, and the prioritized
replay's own cost per update."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldcq.bench.config import BenchConfig
from ldcq.bench.measure import (
    Family,
    bcq_datamodule,
    fit_seconds_per_step,
    full_replay,
    load_family,
)
from ldcq.bench.synthetic import transitions, write_bank


def replay_seconds_per_update(
    fam: Family, n: int, batch: int, seed: int, calls: int = 200
) -> float:
    """Seconds of the prioritized replay's own work per update, alone, as training does it: draw
    a batch, weigh it, write its new priorities back."""
    replay = full_replay(fam, n, seed)
    priorities = np.random.default_rng(seed).random((calls, batch))

    def updates() -> None:
        for p in priorities:
            index = replay.draw(batch)
            replay.weights(index)
            replay.update(index, p)

    updates()  # warm-up
    start = time.perf_counter()
    updates()
    return (time.perf_counter() - start) / calls


def section_q_learning(cfg: BenchConfig) -> dict[str, Any]:
    """LatentBCQ updates/s through ``Trainer.fit`` with uniform and prioritized sampling, each the
    best of ``cfg.q_rounds`` alternating runs, and the replay's own cost per update."""
    fam = load_family(cfg, cfg.families[0])
    n = cfg.transitions
    data = transitions(n, fam.S, fam.Z, cfg.seed)
    total = 1 + cfg.q_warmup + cfg.q_steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in cfg.q_bank_sizes:
            bank = write_bank(Path(tmp) / f"bank{k}.npy", n, k, fam.Z, cfg.seed)
            for b in cfg.q_batches:
                best = {False: math.inf, True: math.inf}
                for _ in range(cfg.q_rounds):
                    for prioritized in (False, True):
                        dm = bcq_datamodule(fam, data, bank, b, prioritized, total, cfg.seed)
                        module = fam.build("latent_bcq")
                        seconds = fit_seconds_per_step(cfg, module, dm, cfg.q_warmup, total)
                        best[prioritized] = min(best[prioritized], seconds)
                replay_s = replay_seconds_per_update(fam, n, b, cfg.seed)
                rows.append(
                    {
                        "batch": b,
                        "K": k,
                        "uniform_per_s": 1.0 / best[False],
                        "prioritized_per_s": 1.0 / best[True],
                        "prioritized_cost": best[True] / best[False] - 1.0,
                        "replay_ms_per_update": replay_s * 1e3,
                        "replay_share": replay_s / best[False],
                    }
                )
            del bank
    return {"family": fam.name, "transitions": n, "rounds": cfg.q_rounds, "rows": rows}
