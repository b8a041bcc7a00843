"""Training throughput: each stage's own LightningModule in a real ``Trainer.fit`` on synthetic
batches of its configured shapes, and the FLOPs of one step."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ldcq.bench.config import BenchConfig
from ldcq.bench.measure import (
    bcq_datamodule,
    count_flops,
    fit_seconds_per_step,
    load_family,
    manual_batch,
)
from ldcq.bench.synthetic import (
    SyntheticDataModule,
    pair_batch,
    skill_batch,
    transitions,
    write_bank,
)
from ldcq.data.normalizer import Normalizer


def section_train(cfg: BenchConfig, family: str, stage: str) -> dict[str, Any]:
    """Samples/s and optimizer steps/s of one stage's real training loop."""
    fam = load_family(cfg, family)
    module = fam.build(stage)
    warmup, steps = cfg.train_warmup[stage], cfg.train_steps[stage]
    total = 1 + warmup + steps
    batch_size = fam.batch_size(stage)
    flops = count_flops(cfg, stage, module, manual_batch(fam, stage, cfg.seed))
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "latent_bcq":
            k = int(fam.cfg.latent_bank.num_samples)
            prioritized = bool(fam.cfg.latent_bcq.data.prioritized)
            data = transitions(cfg.transitions, fam.S, fam.Z, cfg.seed)
            bank = write_bank(Path(tmp) / "bank.npy", cfg.transitions, k, fam.Z, cfg.seed)
            dm = bcq_datamodule(fam, data, bank, batch_size, prioritized, total, cfg.seed)
            extra = {"K": k, "prioritized": prioritized}
        elif stage == "skill_vae":
            pool = [skill_batch(batch_size, fam.H, fam.S, fam.A, cfg.seed + i) for i in range(2)]
            states = pool[0]["states"]
            dm = SyntheticDataModule(
                lambda i: pool[i % 2], total, state_normalizer=Normalizer(fam.S).fit(states)
            )
        else:
            pool = [pair_batch(batch_size, fam.S, fam.Z, cfg.seed + i) for i in range(2)]
            dm = SyntheticDataModule(
                lambda i: pool[i % 2],
                total,
                state_normalizer=Normalizer(fam.S).fit(pool[0]["states"]),
                latent_normalizer=Normalizer(fam.Z).fit(pool[0]["latents"]),
            )
        seconds = fit_seconds_per_step(cfg, module, dm, warmup, total)
    return {
        "family": family,
        "stage": stage,
        "batch": batch_size,
        **extra,
        "step_ms": seconds * 1e3,
        "steps_per_s": 1.0 / seconds,
        "samples_per_s": batch_size / seconds,
        "gflop_per_step": flops / 1e9,
        "gflops": flops / seconds / 1e9,
        "max_steps": int(fam.cfg[stage].trainer.max_steps),
    }
