"""The latent bank: ``generate_bank`` over synthetic next states, and ``prior.sample`` alone at
several rows per batch."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldcq.bench.config import BenchConfig
from ldcq.bench.measure import best_time, load_family, rss_mb, trainer_kwargs
from ldcq.bench.sections.sampling import sampler_name
from ldcq.stages.latent_bank import generate_bank, open_bank


def section_bank(cfg: BenchConfig) -> dict[str, Any]:
    """``generate_bank`` with a default-size prior (its weights do not change the cost) on N
    synthetic next states: time, latents/s, bytes per transition and per sample."""
    fam = load_family(cfg, cfg.families[0])
    prior = fam.build("diffusion_prior").eval()
    bank_cfg = fam.cfg.latent_bank
    k, n = int(bank_cfg.num_samples), cfg.bank_states
    states = torch.randn(n, fam.S, generator=torch.Generator().manual_seed(cfg.seed))
    kwargs = {
        "num_samples": k,
        "sampler": bank_cfg.sampler,
        "sampling_steps": int(bank_cfg.sampling_steps),
        "extra_steps": int(bank_cfg.extra_steps),
        "batch_size": min(int(bank_cfg.batch_size), n),
        "trainer_kwargs": trainer_kwargs(cfg),
        "compile": bool(bank_cfg.get("compile", False)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # The warm-up compiles when latent_bank.compile is on: its time is the compile's cost.
        start = time.perf_counter()
        generate_bank(prior, states[: kwargs["batch_size"]], Path(tmp) / "warm-up", **kwargs)
        warm_up_s = time.perf_counter() - start
        rss_before = rss_mb()
        start = time.perf_counter()
        path = generate_bank(prior, states, Path(tmp) / "bank", **kwargs)
        seconds = time.perf_counter() - start
        bank = open_bank(path)
        file_bytes = path.stat().st_size
        memory_mapped = isinstance(bank, np.memmap)
        del bank
    by_rows = _latents_per_s_by_rows(cfg, prior, states, kwargs)
    return {
        "family": fam.name,
        "transitions": n,
        "K": k,
        "sampler": sampler_name(
            bank_cfg.sampler,
            int(bank_cfg.sampling_steps),
            int(prior.hparams.num_steps),
            int(bank_cfg.extra_steps),
        ),
        "compile": kwargs["compile"],
        "warm_up_s": warm_up_s,
        "seconds": seconds,
        "latents_per_s": n * k / seconds,
        "bytes_per_sample": 2 * fam.Z,
        "bytes_per_transition": file_bytes / n,
        "file_mb": file_bytes / 2**20,
        "memory_mapped": memory_mapped,
        "rss_growth_mb": rss_mb() - rss_before,
        "batch_size": kwargs["batch_size"],
        "sample_latents_per_s_by_rows": by_rows,
    }


def _latents_per_s_by_rows(
    cfg: BenchConfig, prior, states: torch.Tensor, kwargs: dict[str, Any]
) -> dict[str, float]:
    """The same sampling without the Trainer and the files, at several rows per batch: how much
    the configured batch_size costs or gains (B·K latents are denoised together)."""
    k, n = kwargs["num_samples"], len(states)
    # Eager at every row count (a compiled denoiser would compile once per count).
    settings = {key: kwargs[key] for key in ("sampler", "sampling_steps", "extra_steps")}
    by_rows = {}
    for rows in sorted({r for r in (16, 64, 256, kwargs["batch_size"]) if r <= n}):
        rows_seconds = best_time(
            lambda r=rows: prior.sample(states[:r], k, **settings), cfg, repeats=2
        )
        by_rows[str(rows)] = rows * k / rows_seconds
    return by_rows
