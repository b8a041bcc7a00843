"""Training one Lightning stage to its artifact's parts: the trainer with the NaN guard and the
resumable checkpoint, the resume point, the fit, and the weights it hands on.

The pipeline calls :func:`fit_stage` inside its artifact lifecycle (``pipeline.produce``); the
stage's module and DataModule come from the stage registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ldcq.artifacts import ArtifactParts, module_kwargs
from ldcq.errors import ConfigError
from ldcq.process import global_rank, say
from ldcq.stages.checkpointing import CHECKPOINT_NAME, ResumableCheckpoint
from ldcq.stages.guards import FiniteLossGuard

HANDOFFS = ("best", "last")


def check_handoff(stage: str, handoff: str) -> str:
    """``<stage>.handoff``: the weights a trained stage hands on, ``best`` (its lowest val/loss,
    as the official code) or ``last``."""
    if handoff not in HANDOFFS:
        raise ConfigError(f"{stage}.handoff={handoff!r}: valid values are {list(HANDOFFS)}")
    if handoff == "best" and stage == "latent_bcq":
        raise ConfigError(
            "latent_bcq.handoff=best: the Q stage has no validation loss to choose by; use last"
        )
    return handoff


def fit_stage(
    stage: str,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    work: Path,
    trainer_kwargs: dict[str, Any],
    handoff: str,
    seed: int,
    logger: Any = False,
) -> ArtifactParts:
    """Train ``model`` in ``work`` (resuming from its ``last.ckpt``) and return its parts.

    Args:
        trainer_kwargs: ``lightning.Trainer`` arguments plus ``checkpoint_every_n_steps``.
        handoff: ``best`` or ``last`` (:func:`check_handoff`).
        seed: seeded again just before the fit, as an uninterrupted run is.
        logger: the stage's Lightning logger (its MLflow run), or False.
    """
    last = work / CHECKPOINT_NAME
    trainer, checkpoint = _stage_trainer(stage, work, trainer_kwargs, handoff, logger)
    resumed_from = _resume_point(stage, last)
    L.seed_everything(seed, workers=True, verbose=False)
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=str(last) if resumed_from is not None else None,
        weights_only=True,  # last.ckpt is read as data; a file that pickles code is refused
    )
    handed_on = _hand_on(stage, model, checkpoint, handoff)
    spec = {
        "resumed_from_step": resumed_from,
        # Every resume of this stage: from which step, and whether it was exact.
        "resumes": checkpoint.resumes,
        "resume_exact": checkpoint.exact,
        "global_step": trainer.global_step,
        "handoff": handed_on,
    }
    modules = {stage: (model, module_kwargs(model))}
    return ArtifactParts(modules=modules, spec=spec, metrics=dict(checkpoint.metrics))


def _stage_trainer(stage: str, work: Path, kwargs: dict[str, Any], handoff: str, logger):
    """The stage's ``Trainer`` with the NaN guard and its :class:`ResumableCheckpoint` (which
    keeps the best validation's weights when ``handoff`` is ``best``); returns both."""
    kwargs = dict(kwargs)
    every = kwargs.pop("checkpoint_every_n_steps", 500)
    monitor = "val/loss" if handoff == "best" else None
    checkpoint = ResumableCheckpoint(work, every, stage, say=say, monitor=monitor)
    try:
        trainer = L.Trainer(
            **kwargs,
            default_root_dir=work,
            logger=logger,
            callbacks=[FiniteLossGuard(stage), checkpoint],
            enable_model_summary=False,
        )
    except (TypeError, ValueError, MisconfigurationException) as exc:
        raise ConfigError(f"the trainer settings of {stage} are not valid: {exc}") from exc
    return trainer, checkpoint


def _resume_point(stage: str, last: Path) -> int | None:
    """The step ``last.ckpt`` was written at, or None to train afresh (no file, or one that
    cannot be read as plain data, which is set aside as ``last.ckpt.unreadable``)."""
    resumed_from = _checkpoint_step(last) if last.exists() else None
    if resumed_from is not None:
        say(f"{stage}: resuming from {last} (step {resumed_from})")
    elif last.exists() and global_rank() == 0:
        # Truncated, corrupted or pickling code: kept aside for a look, never loaded.
        last.replace(last.with_name("last.ckpt.unreadable"))
        say(f"{stage}: {last} is unreadable; kept as last.ckpt.unreadable, training afresh")
    return resumed_from


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return None


def _hand_on(stage: str, model: L.LightningModule, checkpoint, handoff: str) -> dict[str, Any]:
    """Load the weights to hand on into ``model``; returns what ``spec.json`` records of them."""
    if handoff == "last":
        return {"weights": "last"}
    if checkpoint.best is None:
        say(f"{stage}: no validation ran, so the last weights are handed on, not the best")
        return {"weights": "last", "why": "no validation ran (val_check_interval > max_steps?)"}
    model.load_state_dict(checkpoint.best["state_dict"])
    best = checkpoint.best
    return {
        "weights": "best",
        "monitor": checkpoint.monitor,
        "step": best["step"],
        "value": best["value"],
    }
