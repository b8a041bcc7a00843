"""Prior samplers: latents/s of DDPM and DDIM at several step counts, and the quality of their
samples (MMD² to true latents of a synthetic mixture the prior was briefly trained on), once per
noise schedule."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ldcq.bench.config import QUALITY_EMA, QUALITY_LR, BenchConfig
from ldcq.bench.measure import autocast, best_time, load_family, trainer_kwargs
from ldcq.bench.synthetic import Batch, SkillMixture, SyntheticDataModule, mmd2_rbf
from ldcq.data.normalizer import Normalizer
from ldcq.models import ddim_timesteps
from ldcq.stages.diffusion_prior import LatentDiffusionPrior


def section_sampling(cfg: BenchConfig) -> dict[str, Any]:
    """Latents/s of DDPM (T + extra steps) and DDIM at several step counts, each with the MMD² of
    its samples to true latents of the synthetic mixture the prior was trained on; one prior per
    noise schedule in ``cfg.schedules`` (the configured one first)."""
    fam = load_family(cfg, cfg.families[0])
    mixture = SkillMixture(fam.S, fam.Z, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    fit_states = mixture.states(20_000, g)
    fit_latents = mixture.sample(fit_states, 1, g)[:, 0]
    ge = torch.Generator().manual_seed(cfg.seed + 1)
    states = mixture.states(cfg.quality_states, ge)
    reference, floors = _references(cfg, mixture, states, fit_latents, ge)
    model = fam.model_kwargs("diffusion_prior")
    schedules = list(dict.fromkeys([model["schedule"], *cfg.schedules]))
    results = []
    for schedule in schedules:
        kwargs = {**model, "schedule": schedule, "lr": QUALITY_LR, "ema_decay": QUALITY_EMA}
        prior = LatentDiffusionPrior(state_dim=fam.S, latent_dim=fam.Z, **kwargs)
        start = time.perf_counter()
        _fit_on_mixture(cfg, prior, mixture, fit_states, fit_latents)
        train_seconds = time.perf_counter() - start
        prior = prior.eval().to(cfg.device)
        throughput_states = mixture.states(cfg.throughput_states, ge).to(cfg.device)
        rows = _sampler_rows(cfg, prior, states, reference, throughput_states)
        results.append(
            {
                "schedule": schedule,
                "configured": schedule == model["schedule"],
                "train_s": train_seconds,
                "samplers": rows,
            }
        )
    return {
        "family": fam.name,
        "configured": f"{model['sampler']} {model['sampling_steps']}",
        "quality_train_steps": cfg.quality_train_steps,
        "states": cfg.quality_states,
        "samples_per_state": cfg.quality_samples,
        "bandwidth": cfg.mmd_bandwidth,
        "throughput_batch": [cfg.throughput_states, cfg.throughput_samples],
        "references": {k: {"mmd2": float(v.mean()), "mmd2_se": _se(v)} for k, v in floors.items()},
        "schedules": results,
    }


def _references(
    cfg: BenchConfig,
    mixture: SkillMixture,
    states: Tensor,
    fit_latents: Tensor,
    ge: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """True latents at ``states`` that samples are scored against, and the per-state MMD² of two
    references to them: another draw of true latents, and a Gaussian fit to ``fit_latents``."""
    reference = mixture.sample(states, cfg.quality_samples, ge)
    replicate = mixture.sample(states, cfg.quality_samples, ge)
    gaussian = fit_latents.mean(0) + fit_latents.std(0) * torch.randn(
        *reference.shape, generator=ge
    )
    floors = {
        "held_out_vs_held_out": mmd2_rbf(replicate, reference, cfg.mmd_bandwidth),
        "gaussian_fit": mmd2_rbf(gaussian, reference, cfg.mmd_bandwidth),
    }
    return reference, floors


def _fit_on_mixture(
    cfg: BenchConfig,
    prior: LatentDiffusionPrior,
    mixture: SkillMixture,
    fit_states: Tensor,
    fit_latents: Tensor,
) -> None:
    """Train ``prior`` for ``cfg.quality_train_steps`` on fresh (s, z) draws of ``mixture``."""

    def draw(i: int) -> Batch:
        gi = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i + 1)
        states = mixture.states(cfg.quality_batch, gi)
        return {"states": states, "latents": mixture.sample(states, 1, gi)[:, 0]}

    dm = SyntheticDataModule(
        draw,
        cfg.quality_train_steps,
        state_normalizer=Normalizer(fit_states.shape[1]).fit(fit_states),
        latent_normalizer=Normalizer(fit_latents.shape[1]).fit(fit_latents),
    )
    L.Trainer(
        **trainer_kwargs(cfg),
        max_steps=cfg.quality_train_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(prior, datamodule=dm)


def _sampler_rows(
    cfg: BenchConfig,
    prior: LatentDiffusionPrior,
    states: Tensor,
    reference: Tensor,
    throughput_states: Tensor,
) -> list[dict[str, Any]]:
    """One row per sampler: latents/s at ``throughput_states``, and MMD² of samples at ``states``
    (N, S) against ``reference`` (N, k, Z), with its paired excess over DDPM's."""
    t_steps = int(prior.hparams.num_steps)
    samplers = [("ddpm", t_steps, cfg.ddpm_extra_steps)]
    samplers += [("ddim", n, 0) for n in cfg.ddim_steps]
    samplers += [("dpmpp", n, 0) for n in cfg.dpmpp_steps]
    rows, per_state = [], []
    for sampler, steps, extra in samplers:
        settings = {"sampler": sampler, "sampling_steps": steps, "extra_steps": extra}
        gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2)
        with torch.no_grad(), autocast(cfg):
            x = prior.sample(states.to(cfg.device), cfg.quality_samples, generator=gen, **settings)
            seconds = best_time(
                lambda s=settings: prior.sample(throughput_states, cfg.throughput_samples, **s),
                cfg,
            )
        mmd = mmd2_rbf(x.float().cpu(), reference, cfg.mmd_bandwidth)
        per_state.append(mmd)
        evals = t_steps if sampler == "ddpm" else len(ddim_timesteps(t_steps, steps))
        rows.append(
            {
                "name": sampler_name(sampler, steps, t_steps, extra),
                "sampler": sampler,
                "steps": steps,
                "denoiser_calls": evals + extra,
                "latents_per_s": len(throughput_states) * cfg.throughput_samples / seconds,
                "ms_per_call": seconds * 1e3,
                "mmd2": float(mmd.mean()),
                "mmd2_se": _se(mmd),
            }
        )
    for row, mmd in zip(rows, per_state, strict=True):
        diff = mmd - per_state[0]
        row["mmd2_excess"] = float(diff.mean())
        row["mmd2_excess_se"] = _se(diff)
        row["equal_quality"] = bool(row["mmd2_excess"] <= 2 * row["mmd2_excess_se"])
        row["speedup"] = row["latents_per_s"] / rows[0]["latents_per_s"]
    return rows


def sampler_name(sampler: str, steps: int, t_steps: int, extra: int) -> str:
    """A sampler's row name: "DDPM T=100+5", "DDIM 10", "DPM-Solver++ 10"."""
    if sampler == "ddpm":
        return f"DDPM T={t_steps}+{extra}"
    return f"{'DDIM' if sampler == 'ddim' else 'DPM-Solver++'} {steps}"


def _se(x: Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0
