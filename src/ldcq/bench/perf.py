"""`make bench`: speed, latency, memory and FLOP efficiency of every LDCQ stage on synthetic
tensors, at the family's real network sizes (`pipelines/*.yaml` composed at `--scale`, paper by
default), written to ``bench/results/<date>-<host>.json`` and printed as tables.

Glossary: B batch, N states or transitions, K prior samples per state, H skill horizon, S state
dim, A action dim, Z latent dim, T diffusion steps.

How each figure is measured:

- Training: the stage's own LightningModule in a real ``Trainer.fit`` (its ``training_step``,
  optimizer step, EMA or target update, prioritized-replay update) on synthetic batches of the
  configured shapes; time per step = the shortest interval between consecutive
  ``on_train_batch_end`` after the warm-up steps (it includes fetching the batch). FLOPs per
  step (forward + backward, optimizer excluded) come from ``torch.utils.flop_counter.
  FlopCounterMode`` over one pass of the stage's loss; the fraction is against this machine's
  measured matmul peak (``a @ b`` of ``matmul_size``², fp32, or the autocast dtype).
- Anything called as a whole (sampling, re-plans, matmul): best of ``repeats`` calls after one
  warm-up call.
- Sample quality: a paper-size prior is trained briefly on :class:`SkillMixture` (a state-
  conditioned Gaussian mixture), once per noise schedule (the configured one, then
  ``schedules``); each sampler draws ``quality_samples`` latents at ``quality_states`` held-out
  states, compared with as many true latents at the same states by the unbiased RBF MMD² with a
  fixed bandwidth (``mmd_bandwidth`` = 2, about half the distance between the mixture's modes),
  averaged over states. A DDIM step count has *equal quality* when its MMD² exceeds DDPM's by
  less than two standard errors of the paired per-state difference.
- Memory: peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh spawned process per section,
  beside the RSS it had after its imports (``rss_start_mb``); plus CUDA's peak allocation on GPU.
- Interference: the CPU other processes used during each section (``other_cpu_cores``, from
  /proc/stat minus our own rusage); best-of timings resist short bursts, not a busy machine.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import resource
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ldcq.bench.report import print_report, targets, write_report
from ldcq.bench.synthetic import (
    Batch,
    SkillMixture,
    SyntheticDataModule,
    mmd2_rbf,
    pair_batch,
    skill_batch,
    transitions,
    write_bank,
)
from ldcq.cli import drop_library_notices
from ldcq.data.normalizer import Normalizer
from ldcq.errors import ConfigError, LdcqError
from ldcq.models import ddim_timesteps
from ldcq.pipeline import compose
from ldcq.stages.diffusion_prior import LatentDiffusionPrior
from ldcq.stages.latent_bank import generate_bank, open_bank
from ldcq.stages.latent_bcq import LatentBCQ, draw_transitions
from ldcq.stages.replay import PrioritizedReplay
from ldcq.stages.skill_vae import SkillVAE

# family -> (pipeline composed for its config, dims of its datasets' observation fields, A).
# S and A come from the data in a real run; here they are the datasets' known dims, and S follows
# the family's obs_keys.
FAMILIES: dict[str, tuple[str, dict[str, int], int]] = {
    "maze2d": (
        "pipelines/pointmaze-umaze.yaml",
        {"observation": 4, "achieved_goal": 2, "desired_goal": 2},
        2,
    ),
    "antmaze": (
        "pipelines/antmaze-large-diverse.yaml",
        {"observation": 27, "achieved_goal": 2, "desired_goal": 2},
        8,
    ),
}
TRAINED = ("skill_vae", "diffusion_prior", "latent_bcq")
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# The quality prior trains for only ``quality_train_steps``: a faster learning rate and a shorter
# EMA than the paper's let it converge that quickly. Sampling cost does not depend on them.
QUALITY_LR, QUALITY_EMA = 1e-3, 0.99
# Steps of the datasets the paper-scale projection assumes (D4RL maze2d-umaze and antmaze: ~1M).
DATASET_STEPS = 1_000_000


@dataclass
class BenchConfig:
    """Every knob of `make bench`; the defaults finish within 10 minutes on a 2-core CPU."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed (cuda only)
    scale: str = "paper"  # configs/scale/<scale>.yaml: the network sizes and batch sizes
    families: tuple[str, ...] = ("maze2d", "antmaze")  # the first one also runs the other sections
    overrides: tuple[str, ...] = ()  # dotted config overrides, as for `ldcq pipeline run`
    root: str = "."  # the repository: holds pipelines/ and configs/
    seed: int = 0
    isolate: bool = True  # each section in a fresh process (for its peak RSS)
    threads: int | None = None  # torch threads per section; None: torch's default (all cores)
    repeats: int = 3
    matmul_size: int = 2048
    train_warmup: dict[str, int] = field(
        default_factory=lambda: {"skill_vae": 1, "diffusion_prior": 5, "latent_bcq": 5}
    )
    train_steps: dict[str, int] = field(
        default_factory=lambda: {"skill_vae": 3, "diffusion_prior": 40, "latent_bcq": 40}
    )
    profile_steps: int = 2
    transitions: int = 50_000  # N rows of the synthetic replay data
    q_batches: tuple[int, ...] = (128, 256)
    q_bank_sizes: tuple[int, ...] = (16, 100)
    q_warmup: int = 5
    q_steps: int = 30
    # Uniform and prioritized runs alternate this many times; each keeps its best step. One pair
    # of runs drifted by up to ±20 % between runs on this CPU, the size of the target itself.
    q_rounds: int = 3
    quality_train_steps: int = 1500
    quality_batch: int = 256
    quality_states: int = 128
    quality_samples: int = 64
    mmd_bandwidth: float = 2.0
    ddpm_extra_steps: int = 5
    ddim_steps: tuple[int, ...] = (2, 3, 5, 10, 20)
    # The configured noise schedule is always measured; these are compared beside it.
    schedules: tuple[str, ...] = ("linear", "cosine")
    throughput_states: int = 64
    throughput_samples: int = 100
    bank_states: int = 4096
    envs: tuple[int, ...] = (1, 64)

    @classmethod
    def tiny(cls, **changes: Any) -> BenchConfig:
        """Every section at toy sizes, in this process: a smoke test in seconds."""
        overrides = (
            "horizon=5",
            "skill_vae.model.hidden_dim=16",
            "skill_vae.model.gru_layers=1",
            "skill_vae.data.batch_size=8",
            "diffusion_prior.model.hidden_dims=[16,8]",
            "diffusion_prior.model.time_embed_dim=16",
            "diffusion_prior.model.state_embed_dim=16",
            "diffusion_prior.model.num_steps=10",
            "diffusion_prior.data.batch_size=16",
            "latent_bank.num_samples=4",
            "latent_bank.batch_size=64",
            "latent_bcq.model.hidden_dim=16",
            "latent_bcq.model.latent_hidden=16",
            "latent_bcq.data.batch_size=16",
        )
        small = {"skill_vae": 2, "diffusion_prior": 2, "latent_bcq": 2}
        values: dict[str, Any] = {
            "scale": "quick",
            "families": ("maze2d",),
            "overrides": overrides,
            "isolate": False,
            "repeats": 1,
            "matmul_size": 128,
            "train_warmup": {k: 1 for k in small},
            "train_steps": small,
            "profile_steps": 1,
            "transitions": 512,
            "q_batches": (16,),
            "q_bank_sizes": (4,),
            "q_warmup": 1,
            "q_steps": 2,
            "q_rounds": 1,
            "quality_train_steps": 10,
            "quality_batch": 32,
            "quality_states": 8,
            "quality_samples": 8,
            "ddim_steps": (2, 5),
            "throughput_states": 4,
            "throughput_samples": 8,
            "bank_states": 128,
            "envs": (1, 4),
        }
        return cls(**{**values, **changes})

    def check(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision {self.precision!r}: valid values are {list(PRECISIONS)}"
            )
        if self.precision == "16-mixed" and self.device != "cuda":
            raise ConfigError("--precision 16-mixed needs --device cuda; use bf16-mixed on a CPU")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ConfigError(f"--families {unknown}: valid families are {list(FAMILIES)}")


# ----------------------------------------------------------------------------------- helpers


@dataclass
class Family:
    """One family's composed config and dims."""

    name: str
    cfg: DictConfig
    S: int
    A: int

    @property
    def Z(self) -> int:
        return int(self.cfg.skill_vae.model.latent_dim)

    @property
    def H(self) -> int:
        return int(self.cfg.horizon)

    def model_kwargs(self, stage: str) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg[stage].model, resolve=True)

    def build(self, stage: str) -> L.LightningModule:
        kwargs = self.model_kwargs(stage)
        if stage == "skill_vae":
            return SkillVAE(state_dim=self.S, action_dim=self.A, **kwargs)
        if stage == "diffusion_prior":
            return LatentDiffusionPrior(state_dim=self.S, latent_dim=self.Z, **kwargs)
        return LatentBCQ(state_dim=self.S, latent_dim=self.Z, horizon=self.H, **kwargs)

    def batch_size(self, stage: str) -> int:
        return int(self.cfg[stage].data.batch_size)


def load_family(cfg: BenchConfig, name: str) -> Family:
    pipeline, field_dims, action_dim = FAMILIES[name]
    composed = compose(Path(cfg.root) / pipeline, list(cfg.overrides), scale=cfg.scale)
    state_dim = sum(field_dims[k] for k in composed.obs_keys)
    return Family(name, composed, state_dim, action_dim)


def _quiet() -> None:
    """Silence Lightning's banners and the warnings a synthetic loader triggers."""
    drop_library_notices()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")


def _autocast(cfg: BenchConfig):
    dtype = PRECISIONS[cfg.precision]
    return torch.autocast(cfg.device, dtype=dtype, enabled=dtype is not None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], cfg: BenchConfig, repeats: int | None = None) -> float:
    """Seconds of the fastest of ``repeats`` (default ``cfg.repeats``) calls of ``fn`` after one
    warm-up call."""
    fn()
    _sync(cfg.device)
    times = []
    for _ in range(repeats or cfg.repeats):
        start = time.perf_counter()
        fn()
        _sync(cfg.device)
        times.append(time.perf_counter() - start)
    return min(times)


def _busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_busy_cores(seconds: float = 2.0) -> float | None:
    """Cores that other processes keep busy, averaged over ``seconds`` of sleep here."""
    before = _busy_cpu_s()
    if before is None:
        return None
    time.sleep(seconds)
    return max(0.0, _busy_cpu_s() - before) / seconds


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _trainer_kwargs(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "accelerator": "gpu" if cfg.device == "cuda" else "cpu",
        "devices": 1,
        "precision": cfg.precision,
        "enable_progress_bar": False,
    }


class _StepClock(L.Callback):
    """Wall time at the end of every training batch."""

    def __init__(self, device: str) -> None:
        self.device, self.ends = device, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        """The fastest step after the warm-up: on a shared machine, other processes only ever
        make steps slower, so the minimum is the estimate least disturbed by them."""
        intervals = np.diff(self.ends)[warmup:]
        if intervals.size == 0:
            raise RuntimeError(f"only {len(self.ends)} steps ran; nothing left after the warm-up")
        return float(intervals.min())


def fit_seconds_per_step(
    cfg: BenchConfig, module: L.LightningModule, dm: L.LightningDataModule, warmup: int, total: int
) -> float:
    """Seconds per optimizer step of ``Trainer.fit`` over ``total`` steps (best after warm-up)."""
    clock = _StepClock(cfg.device)
    trainer = L.Trainer(
        **_trainer_kwargs(cfg),
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=dm)
    return clock.seconds_per_step(warmup)


def _loss(stage: str, module: L.LightningModule, batch: Batch) -> Tensor:
    if stage == "skill_vae":
        return module.losses(batch["states"], batch["actions"])["loss"]
    if stage == "diffusion_prior":
        return module.loss(module.denoiser, batch["states"], batch["latents"])
    return module.losses(batch)["loss"]


def manual_batch(fam: Family, stage: str, seed: int) -> Batch:
    """One batch of the stage's configured shape (the bank's K for latent_bcq)."""
    b = fam.batch_size(stage)
    if stage == "skill_vae":
        return skill_batch(b, fam.H, fam.S, fam.A, seed)
    if stage == "diffusion_prior":
        return pair_batch(b, fam.S, fam.Z, seed)
    batch = transitions(b, fam.S, fam.Z, seed)
    k = int(fam.cfg.latent_bank.num_samples)
    g = torch.Generator().manual_seed(seed)
    return {
        **batch,
        "bank": torch.randn(b, k, fam.Z, generator=g),
        "weights": torch.ones(b),
        "index": torch.arange(b),
    }


def count_flops(cfg: BenchConfig, stage: str, module: L.LightningModule, batch: Batch) -> int:
    """FLOPs of one forward + backward pass of the stage's loss (the optimizer step excluded)."""
    module.to(cfg.device)
    batch = {k: v.to(cfg.device) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        with _autocast(cfg):
            loss = _loss(stage, module, batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def bcq_datamodule(
    fam: Family,
    data: dict[str, Tensor],
    bank: np.ndarray,
    batch: int,
    prioritized: bool,
    total: int,
    seed: int,
) -> SyntheticDataModule:
    """The real transition draws (contiguous tensors, memory-mapped bank, uniform or prioritized)
    behind a synthetic DataModule."""
    replay = full_replay(fam, len(data["states"]), seed) if prioritized else None
    normalizer = Normalizer(fam.S).fit(torch.cat([data["states"], data["next_states"]]))

    def draw(i: int) -> dict[str, Tensor]:
        return draw_transitions(data, bank, batch, np.random.default_rng((seed, i)), replay)

    return SyntheticDataModule(draw, total, state_normalizer=normalizer, replay=replay)


# ---------------------------------------------------------------------------------- sections


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
    reference = mixture.sample(states, cfg.quality_samples, ge)
    replicate = mixture.sample(states, cfg.quality_samples, ge)
    gaussian = fit_latents.mean(0) + fit_latents.std(0) * torch.randn(
        *reference.shape, generator=ge
    )
    floors = {
        "held_out_vs_held_out": mmd2_rbf(replicate, reference, cfg.mmd_bandwidth),
        "gaussian_fit": mmd2_rbf(gaussian, reference, cfg.mmd_bandwidth),
    }
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
        **_trainer_kwargs(cfg),
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
    rows, per_state = [], []
    for sampler, steps, extra in samplers:
        settings = {"sampler": sampler, "sampling_steps": steps, "extra_steps": extra}
        gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2)
        with torch.no_grad(), _autocast(cfg):
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
                "name": f"DDPM T={t_steps}+{extra}" if sampler == "ddpm" else f"DDIM {steps}",
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


def _se(x: Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


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
        "trainer_kwargs": _trainer_kwargs(cfg),
    }
    with tempfile.TemporaryDirectory() as tmp:
        generate_bank(prior, states[: kwargs["batch_size"]], Path(tmp) / "warm-up", **kwargs)
        rss_before = _rss_mb()
        start = time.perf_counter()
        path = generate_bank(prior, states, Path(tmp) / "bank", **kwargs)
        seconds = time.perf_counter() - start
        bank = open_bank(path)
        file_bytes = path.stat().st_size
        memory_mapped = isinstance(bank, np.memmap)
        del bank
    # The same sampling without the Trainer and the files, at several rows per batch: how much
    # the configured batch_size costs or gains (B·K latents are denoised together).
    settings = {k: kwargs[k] for k in ("sampler", "sampling_steps", "extra_steps")}
    by_rows = {}
    for rows in sorted({r for r in (16, 64, 256, kwargs["batch_size"]) if r <= n}):
        rows_seconds = best_time(
            lambda r=rows: prior.sample(states[:r], k, **settings), cfg, repeats=2
        )
        by_rows[str(rows)] = rows * k / rows_seconds
    return {
        "family": fam.name,
        "transitions": n,
        "K": k,
        "sampler": f"{bank_cfg.sampler} {bank_cfg.sampling_steps}",
        "seconds": seconds,
        "latents_per_s": n * k / seconds,
        "bytes_per_sample": 2 * fam.Z,
        "bytes_per_transition": file_bytes / n,
        "file_mb": file_bytes / 2**20,
        "memory_mapped": memory_mapped,
        "rss_growth_mb": _rss_mb() - rss_before,
        "batch_size": kwargs["batch_size"],
        "sample_latents_per_s_by_rows": by_rows,
    }


def full_replay(fam: Family, n: int, seed: int) -> PrioritizedReplay:
    """A prioritized replay over ``n`` transitions with the family's α and β, every entry added."""
    d = fam.cfg.latent_bcq.data
    replay = PrioritizedReplay(
        n, alpha=float(d.per_alpha), beta_start=float(d.per_beta_start), seed=seed
    )
    replay.add(n)
    return replay


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


def section_latency(cfg: BenchConfig) -> dict[str, Any]:
    """ms per re-plan (K prior samples, min(Q1, Q2), argmax, first action) and per env step."""
    rows = []
    for name in cfg.families:
        fam = load_family(cfg, name)
        vae, prior, q = (fam.build(s).eval().requires_grad_(False).to(cfg.device) for s in TRAINED)
        evaluation = fam.cfg.get("evaluation") or {}
        k = int(evaluation.get("num_samples", 50))
        every = int(evaluation.get("replan_every", 10))
        for n in cfg.envs:
            states = torch.randn(n, fam.S, generator=torch.Generator().manual_seed(cfg.seed))
            replan_s, step_s, source = decision_times(cfg, vae, prior, q, states, k, every)
            rows.append(
                {
                    "family": name,
                    "envs": n,
                    "K": k,
                    "replan_every": every,
                    "replan_ms": replan_s * 1e3,
                    "step_ms": step_s * 1e3,
                    "amortized_step_ms": (replan_s + (every - 1) * step_s) / every * 1e3,
                    "source": source,
                }
            )
    return {"rows": rows}


def decision_times(
    cfg: BenchConfig, vae, prior, q, states: Tensor, k: int, every: int
) -> tuple[float, float, str]:
    """(seconds per re-plan, seconds per env step between re-plans, what was timed).

    ``ldcq.evaluation.policy.LDCQPolicy`` on a CPU (it takes numpy states); on an accelerator the
    same computation on device tensors, written out here.
    """
    from ldcq.evaluation.policy import LDCQPolicy

    if cfg.device == "cpu":
        policy = LDCQPolicy(vae, prior, q, selector="q", num_samples=k, replan_every=every)
        s = states.numpy()

        def replan() -> None:
            policy.reset(len(s))
            policy.act(s)

        def step() -> None:
            # Right after a re-plan, so no env is due: the decoder only (every > 1).
            policy.act(s)

        source = "LDCQPolicy.act"
    else:
        states = states.to(cfg.device)
        z = torch.zeros(len(states), prior.hparams.latent_dim, device=cfg.device)

        @torch.no_grad()
        def replan() -> None:
            latents = prior.sample(states, k)
            best = q.score(states, latents).argmax(dim=1)
            z.copy_(latents[torch.arange(len(states)), best])
            vae.act(states, z)

        @torch.no_grad()
        def step() -> None:
            vae.act(states, z)

        source = "direct (prior.sample, LatentBCQ.score, SkillVAE.act)"
    replans, steps = [], []
    with _autocast(cfg):
        for _ in range(1 + max(5, cfg.repeats)):
            for fn, out in ((replan, replans), (step, steps)):
                _sync(cfg.device)
                start = time.perf_counter()
                fn()
                _sync(cfg.device)
                out.append(time.perf_counter() - start)
    return min(replans[1:]), min(steps[1:]), source


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
            loss = _loss(stage, module, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cfg.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _autocast(cfg):
        step()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(cfg.profile_steps):
                step()
            _sync(cfg.device)
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


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "peak": section_peak,
    "train": section_train,
    "sampling": section_sampling,
    "bank": section_bank,
    "q_learning": section_q_learning,
    "latency": section_latency,
    "profile": section_profile,
}


def run_section(cfg: BenchConfig, name: str, *args: Any) -> dict[str, Any]:
    """Run one section here; adds its wall time and memory high-water marks."""
    _quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_start, start = _rss_mb(), time.perf_counter()
    out = SECTIONS[name](cfg, *args)
    memory = {"rss_start_mb": rss_start, "rss_peak_mb": _rss_mb()}
    if cfg.device == "cuda":
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**out, "memory": memory, "seconds_total": time.perf_counter() - start}


def _call(cfg: BenchConfig, name: str, *args: Any) -> dict[str, Any]:
    """One section, in a fresh process when ``cfg.isolate`` (so ru_maxrss is its own peak).

    Adds ``other_cpu_cores``: the CPU other processes used meanwhile (machine-wide busy time
    minus ours), in cores; above ~0.2 the section's timings were disturbed.
    """
    busy, own, start = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    if cfg.isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            out = pool.submit(run_section, cfg, name, *args).result()
    else:
        out = run_section(cfg, name, *args)
    if busy is not None:
        other = _busy_cpu_s() - busy - (_own_cpu_s() - own)
        out["other_cpu_cores"] = max(0.0, other) / (time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------------------- report


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Every section, then the projection, the profile of the slowest stage and the targets."""
    cfg.check()
    start = time.perf_counter()
    meta = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name()
        if cfg.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": cfg.threads or torch.get_num_threads(),
        "precision": cfg.precision,
        "scale": cfg.scale,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "load_avg_start": list(os.getloadavg()),
        "other_cpu_cores_start": other_busy_cores(1.0) or 0.0,
        "memory_method": "ru_maxrss of a fresh spawned process per section"
        if cfg.isolate
        else "ru_maxrss of this process (cumulative: sections not isolated)",
        "config": asdict(cfg),
    }
    report: dict[str, Any] = {"meta": meta}
    progress("matmul peak")
    report["peak"] = _call(cfg, "peak")
    report["train"] = []
    for family in cfg.families:
        for stage in TRAINED:
            progress(f"training throughput: {family} {stage}")
            report["train"].append(_call(cfg, "train", family, stage))
    for name in ("sampling", "bank", "q_learning", "latency"):
        progress(name.replace("_", " "))
        report[name] = _call(cfg, name)
    peak = _peak_gflops(report)
    for row in report["train"]:
        row["peak_fraction"] = row["gflops"] / peak
    report["projection"] = projection(cfg, report)
    slowest = max(report["projection"], key=lambda r: r["hours"])
    progress(f"profile of the slowest stage: {slowest['family']} {slowest['stage']}")
    report["slowest"] = {**slowest, **_call(cfg, "profile", slowest["family"], slowest["stage"])}
    report["targets"] = targets(report)
    meta["load_avg_end"] = list(os.getloadavg())
    meta["elapsed_s"] = time.perf_counter() - start
    return report


def _peak_gflops(report: dict) -> float:
    gflops = report["peak"]["gflops"]
    dtype = PRECISIONS[report["meta"]["precision"]]
    return gflops[str(dtype).removeprefix("torch.")] if dtype is not None else gflops["float32"]


def projection(cfg: BenchConfig, report: dict) -> list[dict[str, Any]]:
    """Hours each stage would take at the configured max_steps (and the bank for a 1M-step
    dataset) at the measured rates: which stage is the slowest."""
    rows = [
        {
            "family": r["family"],
            "stage": r["stage"],
            "work": f"{r['max_steps']:,} steps",
            "hours": r["max_steps"] * r["step_ms"] / 3.6e6,
        }
        for r in report["train"]
    ]
    bank = report["bank"]
    fam = load_family(cfg, bank["family"])
    n = DATASET_STEPS // int(fam.cfg.latent_bcq.data.stride)
    rows.append(
        {
            "family": bank["family"],
            "stage": "latent_bank",
            "work": f"{n:,} transitions × K={bank['K']}",
            "hours": n * bank["K"] / bank["latents_per_s"] / 3600,
        }
    )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldcq.bench.perf",
        description="Speed, latency, memory and FLOP efficiency of every LDCQ stage (make bench).",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=list(PRECISIONS))
    p.add_argument(
        "--scale", default="paper", help="configs/scale/<scale>.yaml (paper, cpu, quick)"
    )
    p.add_argument("--families", help="comma-separated (default maze2d,antmaze; --tiny: maze2d)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, one process: a smoke run")
    p.add_argument(
        "overrides", nargs="*", help="dotted config overrides (skill_vae.model.hidden_dim=128)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or redirected: keep the tables' rows on one line
        console = Console(width=150)
    settings: dict[str, Any] = {
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
    }
    if args.families:
        settings["families"] = tuple(f for f in args.families.split(",") if f)
    cfg = BenchConfig.tiny(**settings) if args.tiny else BenchConfig(**settings, scale=args.scale)
    if args.overrides:
        cfg.overrides = (*cfg.overrides, *args.overrides)
    busy = other_busy_cores()
    if busy is not None and busy > 0.2:
        console.print(
            f"[yellow]other processes keep {busy:.1f} cores busy right now: the timings will be "
            f"pessimistic (the memory table shows it per section); a quiet machine is better[/]"
        )
    try:
        report = run_bench(cfg, progress=lambda msg: console.print(f"[cyan]bench[/] {msg}"))
    except LdcqError as exc:
        print(f"ldcq bench: error: {exc}", file=sys.stderr)
        return 2
    path = write_report(report, args.out_dir)
    print_report(report, console)
    console.print(f"wrote {path} ({report['meta']['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
