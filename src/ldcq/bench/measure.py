"""How `make bench` measures: a family's composed config and the stage modules it builds (through
the stage registry), batches of the stages' shapes, best-of timing, the step clock inside a real
``Trainer.fit``, FLOP counting, CPU time and peak RSS, and the autocast of ``--precision``.
"""

from __future__ import annotations

import logging
import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ldcq.bench.config import FAMILIES, BenchConfig
from ldcq.bench.synthetic import Batch, SyntheticDataModule, pair_batch, skill_batch, transitions
from ldcq.config import compose
from ldcq.data.normalizer import Normalizer
from ldcq.precision import autocast as precision_autocast
from ldcq.process import drop_library_notices
from ldcq.stages.latent_data import draw_transitions
from ldcq.stages.registry import REGISTRY
from ldcq.stages.replay import PrioritizedReplay


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
        dims = {"S": self.S, "A": self.A, "Z": self.Z, "H": self.H}
        return REGISTRY[stage].new_model(self.model_kwargs(stage), dims)

    def batch_size(self, stage: str) -> int:
        return int(self.cfg[stage].data.batch_size)


def load_family(cfg: BenchConfig, name: str) -> Family:
    pipeline, field_dims, action_dim = FAMILIES[name]
    composed = compose(Path(cfg.root) / pipeline, list(cfg.overrides), scale=cfg.scale)
    state_dim = sum(field_dims[k] for k in composed.obs_keys)
    return Family(name, composed, state_dim, action_dim)


def quiet() -> None:
    """Silence Lightning's banners and the warnings a synthetic loader triggers."""
    drop_library_notices()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")


def autocast(cfg: BenchConfig):
    """The autocast of the bench's (resolved) precision on its device."""
    return precision_autocast(cfg.precision, cfg.device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], cfg: BenchConfig, repeats: int | None = None) -> float:
    """Seconds of the fastest of ``repeats`` (default ``cfg.repeats``) calls of ``fn`` after one
    warm-up call."""
    fn()
    sync(cfg.device)
    times = []
    for _ in range(repeats or cfg.repeats):
        start = time.perf_counter()
        fn()
        sync(cfg.device)
        times.append(time.perf_counter() - start)
    return min(times)


def busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_busy_cores(seconds: float = 2.0) -> float | None:
    """Cores that other processes keep busy, averaged over ``seconds`` of sleep here."""
    before = busy_cpu_s()
    if before is None:
        return None
    time.sleep(seconds)
    return max(0.0, busy_cpu_s() - before) / seconds


def own_cpu_s() -> float:
    """CPU seconds of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def trainer_kwargs(cfg: BenchConfig) -> dict[str, Any]:
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
        sync(self.device)
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
        **trainer_kwargs(cfg),
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


def stage_loss(stage: str, module: L.LightningModule, batch: Batch) -> Tensor:
    return REGISTRY[stage].loss(module, batch)


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
        with autocast(cfg):
            loss = stage_loss(stage, module, batch)
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


def full_replay(fam: Family, n: int, seed: int) -> PrioritizedReplay:
    """A prioritized replay over ``n`` transitions with the family's α and β, every entry added."""
    d = fam.cfg.latent_bcq.data
    replay = PrioritizedReplay(
        n, alpha=float(d.per_alpha), beta_start=float(d.per_beta_start), seed=seed
    )
    replay.add(n)
    return replay
