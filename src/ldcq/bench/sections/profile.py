"""The operators that take the most self time in a few training steps of one stage (the
slowest, in `make bench`)."""

from __future__ import annotations

from typing import Any

import torch

from ldcq.bench.config import BenchConfig
from ldcq.bench.measure import autocast, load_family, manual_batch, stage_loss, sync


def section_profile(cfg: BenchConfig, family: str, stage: str) -> dict[str, Any]:
    """The operators that take the most self time in a few training steps of ``stage``."""
    fam = load_family(cfg, family)
    if stage == "latent_bank":
        prior = fam.build("diffusion_prior").eval().to(cfg.device)
        k = int(fam.cfg.latent_bank.num_samples)
        rows = min(int(fam.cfg.latent_bank.batch_size), cfg.bank_states)
        states = torch.randn(rows, fam.S, device=cfg.device)

        def step() -> None:
            prior.sample(states, k)

    else:
        module = fam.build(stage).to(cfg.device)
        batch = {k: v.to(cfg.device) for k, v in manual_batch(fam, stage, cfg.seed).items()}
        optimizer = module.configure_optimizers()

        def step() -> None:
            loss = stage_loss(stage, module, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cfg.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with autocast(cfg):
        step()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(cfg.profile_steps):
                step()
            sync(cfg.device)
    attr = "self_device_time_total" if cfg.device == "cuda" else "self_cpu_time_total"
    events = list(prof.key_averages())
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:5]
    return {
        "family": family,
        "stage": stage,
        "ops": [
            {
                "op": e.key,
                "ms_per_step": getattr(e, attr) / 1e3 / cfg.profile_steps,
                "share": getattr(e, attr) / total,
            }
            for e in top
        ],
    }
