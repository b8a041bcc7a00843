"""Tiny trained upstream stages, written as real artifacts, for the tests of downstream stages."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ldcq.artifacts import fingerprint, write_artifact
from ldcq.data.datamodules import TrajectorySnippetDataModule
from ldcq.stages.diffusion_prior import LatentDiffusionPrior
from ldcq.stages.latent_data import LatentPairsDataModule
from ldcq.stages.skill_vae import SkillVAE


def tiny_trainer(max_steps: int) -> L.Trainer:
    """A CPU trainer that leaves nothing on disk."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def _write(path: Path, stage: str, module: L.LightningModule, dims: dict, dataset_id: str) -> Path:
    spec = {
        "dims": dims,
        "dataset": {"id": dataset_id},
        "fingerprint": fingerprint({"stage": stage, "dims": dims, "dataset": dataset_id}),
        "seed": 0,
    }
    write_artifact(
        path,
        stage=stage,
        modules={stage: (module, dict(module.hparams))},
        spec=spec,
        config_yaml="",
        metrics={},
    )
    return path


def tiny_skill_vae(
    root: Path, dataset_id: str, horizon: int = 5, latent_dim: int = 4, steps: int = 5
) -> Path:
    """Train a tiny SkillVAE for ``steps`` steps and write it as a ``skill_vae`` artifact."""
    dm = TrajectorySnippetDataModule(dataset_id, horizon=horizon, batch_size=16, val_fraction=0.0)
    vae = SkillVAE(
        dm.state_dim,
        dm.action_dim,
        horizon=horizon,
        latent_dim=latent_dim,
        hidden_dim=16,
        gru_layers=1,
    )
    tiny_trainer(steps).fit(vae, dm)
    dims = {"S": dm.state_dim, "A": dm.action_dim, "Z": latent_dim, "H": horizon}
    return _write(root / "skill_vae-tiny", "skill_vae", vae, dims, dataset_id)


def tiny_diffusion_prior(root: Path, dataset_id: str, vae_artifact: Path, steps: int = 5) -> Path:
    """Train a tiny LatentDiffusionPrior on the VAE's latents and write it as an artifact."""
    dm = LatentPairsDataModule(dataset_id, str(vae_artifact), batch_size=32, val_fraction=0.0)
    prior = LatentDiffusionPrior(
        dm.state_dim,
        dm.latent_dim,
        hidden_dims=[16, 8],
        time_embed_dim=16,
        state_embed_dim=16,
        num_steps=20,
        sampling_steps=4,
    )
    tiny_trainer(steps).fit(prior, dm)
    dims = {**dm.vae_spec.spec["dims"]}
    return _write(root / "diffusion_prior-tiny", "diffusion_prior", prior, dims, dataset_id)
