"""What a stage is, written once: its name, the artifacts it consumes, and how it is built.

The pipeline runs the stages in registry order, the CLI offers the trained ones alone through
LightningCLI, and the benchmark builds their modules from here. A trained stage has a
LightningModule and a DataModule and is built by ``build(ctx)``; the pipeline fits it
(:func:`ldcq.stages.fit.fit_stage`). Any other stage makes its artifact's parts itself with
``make(ctx, work)``.

``ctx`` is the pipeline's run context (:class:`ldcq.pipeline.Context`): the resolved config of
each stage (``ctx.stage_cfg``), the upstream artifacts (``ctx.artifact``), the trainer
arguments, the seed and the tracker.

To add a stage: write its module (and DataModule) under ``stages/``, a ``build`` or ``make``
function here, and one :class:`StageSpec` in :data:`REGISTRY` at its place in the order, with the
stages whose artifacts it reads as ``upstream``. Its config section in
``configs/family/ldcq.yaml`` is the stage's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import OmegaConf
from torch import Tensor

from ldcq.artifacts import ArtifactParts, load_modules
from ldcq.data.datamodules import TrajectorySnippetDataModule
from ldcq.data.pointmaze import GOAL_PROTOCOLS
from ldcq.errors import ConfigError
from ldcq.evaluation.policy import check_policy_settings
from ldcq.evaluation.run import make_evaluation
from ldcq.stages.common import check_positive
from ldcq.stages.diffusion_prior import LatentDiffusionPrior
from ldcq.stages.fit import check_handoff
from ldcq.stages.latent_bank import check_bank_settings, check_sampler_settings, generate_bank
from ldcq.stages.latent_bcq import LatentBCQ
from ldcq.stages.latent_data import LatentPairsDataModule, LatentTransitionDataModule
from ldcq.stages.skill_vae import SkillVAE

# Trainer keys that decide where and how fast a stage runs, not what it learns: they stay out
# of fingerprints, and are all the latent bank's predict Trainer takes (with precision).
RUN_ONLY_KEYS = frozenset(
    {"accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar", "deterministic"}
)


@dataclass(frozen=True)
class Built:
    """A trained stage before its fit: the module, its DataModule and the dims it records."""

    model: L.LightningModule
    datamodule: L.LightningDataModule
    dims: dict[str, int]


@dataclass(frozen=True)
class StageSpec:
    """One stage.

    Attributes:
        name: the stage's key: config section, artifact folder prefix, CLI command.
        upstream: the stages whose artifacts it consumes (their fingerprints are part of its).
        summary: one line, for help texts.
        module, datamodule: a trained stage's classes (None otherwise).
        data_dims: the module's constructor arguments its DataModule provides (S, A, Z, H).
        aliases: short CLI names.
        build: a trained stage's module and DataModule from the run context.
        make: an untrained stage's artifact parts, from the run context and its work folder.
        new_model: the module from its ``model`` config section and dims (the benchmark's way).
        loss: the scalar training loss of one batch (the benchmark times and counts it).
        every_rank: False when only global rank 0 makes it (the others wait for the artifact).
        identity: what else, beyond its config, seed, dataset and upstream, its output depends
            on (entries of its fingerprint).
        check: an untrained stage's check of its resolved config section, run by
            :func:`check_config` before any stage runs (a trained stage's check is building its
            model); raises one ConfigError naming the key.
    """

    name: str
    upstream: tuple[str, ...]
    summary: str
    module: type[L.LightningModule] | None = None
    datamodule: type[L.LightningDataModule] | None = None
    data_dims: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    build: Callable[[Any], Built] | None = None
    make: Callable[[Any, Path], ArtifactParts] | None = None
    new_model: Callable[[dict[str, Any], dict[str, int]], L.LightningModule] | None = None
    loss: Callable[[L.LightningModule, dict[str, Tensor]], Tensor] | None = None
    every_rank: bool = True
    identity: Callable[[Any], dict[str, Any]] | None = None
    check: Callable[[dict[str, Any]], None] | None = None

    @property
    def trained(self) -> bool:
        return self.build is not None


def _build_skill_vae(ctx) -> Built:
    cfg = ctx.stage_cfg("skill_vae")
    dm = TrajectorySnippetDataModule(**cfg["data"])
    model = SkillVAE(state_dim=dm.state_dim, action_dim=dm.action_dim, **cfg["model"])
    hp = model.hparams
    dims = {"S": dm.state_dim, "A": dm.action_dim, "Z": hp.latent_dim, "H": hp.horizon}
    return Built(model, dm, dims)


def _build_diffusion_prior(ctx) -> Built:
    vae = ctx.artifact("skill_vae")
    cfg = ctx.stage_cfg("diffusion_prior")
    dm = LatentPairsDataModule(vae_artifact=str(vae.path), **cfg["data"])
    model = LatentDiffusionPrior(state_dim=dm.state_dim, latent_dim=dm.latent_dim, **cfg["model"])
    return Built(model, dm, dict(vae.spec["dims"]))


def _build_latent_bcq(ctx) -> Built:
    vae, bank = ctx.artifact("skill_vae"), ctx.artifact("latent_bank")
    cfg = ctx.stage_cfg("latent_bcq")
    dm = LatentTransitionDataModule(
        vae_artifact=str(vae.path), bank_path=str(bank.path / "bank.npy"), **cfg["data"]
    )
    horizon = vae.spec["dims"]["H"]
    model = LatentBCQ(
        state_dim=dm.state_dim, latent_dim=dm.latent_dim, horizon=horizon, **cfg["model"]
    )
    return Built(model, dm, dict(vae.spec["dims"]))


def _make_latent_bank(ctx, work: Path) -> ArtifactParts:
    """K prior samples at every next state of latent_bcq's transitions (their stride and obs
    keys are part of the bank's fingerprint)."""
    vae, prior = ctx.artifact("skill_vae"), ctx.artifact("diffusion_prior")
    cfg = ctx.stage_cfg("latent_bank")
    sampling = {k: cfg[k] for k in ("num_samples", "sampler", "sampling_steps", "extra_steps")}
    _check_bank(cfg)
    data_cfg = {**ctx.stage_cfg("latent_bcq")["data"], "prioritized": False}
    try:
        dm = LatentTransitionDataModule(vae_artifact=str(vae.path), bank_path="", **data_cfg)
    except ConfigError as exc:  # the bank is drawn at latent_bcq's transitions
        message = str(exc)
        raise ConfigError(
            f"latent_bcq.{message}" if message.startswith("data.") else message
        ) from exc
    trainer_kwargs = {
        k: v
        for k, v in ctx.trainer_kwargs("latent_bank").items()
        if k in RUN_ONLY_KEYS | {"precision"}
    }
    bank_path = generate_bank(
        load_modules(prior)["diffusion_prior"],
        dm.transitions()["next_states"],
        work,
        **sampling,
        seed=ctx.cfg.seed,
        batch_size=cfg["batch_size"],
        trainer_kwargs=trainer_kwargs,
        compile=cfg["compile"],
    )
    bank = np.load(bank_path, mmap_mode="r")
    spec = {
        "dims": {**vae.spec["dims"], "K": int(bank.shape[1]), "N": int(bank.shape[0])},
        "bytes_per_transition": int(bank.shape[1] * bank.shape[2] * bank.itemsize),
    }
    return ArtifactParts(
        spec=spec,
        metrics={"bank/bytes": float(Path(bank_path).stat().st_size)},
        extra_files={"bank.npy": Path(bank_path)},
    )


def _check_bank(cfg: dict[str, Any]) -> None:
    check_bank_settings(
        **{k: cfg[k] for k in ("num_samples", "sampler", "sampling_steps", "extra_steps")},
        batch_size=cfg["batch_size"],
        compile=cfg["compile"],
    )


def _check_evaluation(cfg: dict[str, Any]) -> None:
    check_policy_settings(cfg["selector"], cfg["num_samples"], cfg["replan_every"], cfg["compile"])
    check_positive("evaluation", episodes=cfg["episodes"], num_envs=cfg["num_envs"])
    if cfg["goal"] not in GOAL_PROTOCOLS:
        raise ConfigError(
            f"evaluation.goal={cfg['goal']!r}: valid values are {list(GOAL_PROTOCOLS)}"
        )
    check_sampler_settings(
        "evaluation", **{k: cfg[k] for k in ("sampler", "sampling_steps", "extra_steps")}
    )


# The bank holds samples at latent_bcq's transitions: these latent_bcq.data keys choose them.
_BANK_TRANSITION_KEYS = ("dataset", "stride", "obs_keys")


def _bank_identity(ctx) -> dict[str, Any]:
    data = ctx.stage_cfg("latent_bcq")["data"]
    return {"transitions": {k: data.get(k) for k in _BANK_TRANSITION_KEYS}}


def _vae_loss(module, batch):
    return module.losses(batch["states"], batch["actions"])["loss"]


def _prior_loss(module, batch):
    return module.loss(module.denoiser, batch["states"], batch["latents"])


def _bcq_loss(module, batch):
    return module.losses(batch)["loss"]


REGISTRY: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "skill_vae",
            (),
            "β-VAE over H-step skills: encoder, autoregressive policy decoder, state decoder",
            module=SkillVAE,
            datamodule=TrajectorySnippetDataModule,
            data_dims=("state_dim", "action_dim"),
            aliases=("vae",),
            build=_build_skill_vae,
            new_model=lambda kw, d: SkillVAE(state_dim=d["S"], action_dim=d["A"], **kw),
            loss=_vae_loss,
        ),
        StageSpec(
            "diffusion_prior",
            ("skill_vae",),
            "state-conditioned diffusion prior over the skill latents",
            module=LatentDiffusionPrior,
            datamodule=LatentPairsDataModule,
            data_dims=("state_dim", "latent_dim"),
            aliases=("prior",),
            build=_build_diffusion_prior,
            new_model=lambda kw, d: LatentDiffusionPrior(state_dim=d["S"], latent_dim=d["Z"], **kw),
            loss=_prior_loss,
        ),
        StageSpec(
            "latent_bank",
            ("skill_vae", "diffusion_prior"),
            "K prior samples at every transition's next state, fp16, memory-mapped",
            make=_make_latent_bank,
            identity=_bank_identity,
            check=_check_bank,
        ),
        StageSpec(
            "latent_bcq",
            ("skill_vae", "latent_bank"),
            "batch-constrained double Q-learning over the bank's latents",
            module=LatentBCQ,
            datamodule=LatentTransitionDataModule,
            data_dims=("state_dim", "latent_dim", "horizon"),
            aliases=("bcq",),
            build=_build_latent_bcq,
            new_model=lambda kw, d: LatentBCQ(
                state_dim=d["S"], latent_dim=d["Z"], horizon=d["H"], **kw
            ),
            loss=_bcq_loss,
        ),
        StageSpec(
            "evaluation",
            ("skill_vae", "diffusion_prior", "latent_bcq"),
            "the policy in the simulator: normalized score, success, pictures",
            make=make_evaluation,
            every_rank=False,
            check=_check_evaluation,
        ),
    )
}
STAGES = tuple(REGISTRY)  # in pipeline order
TRAINED = tuple(name for name, spec in REGISTRY.items() if spec.trained)
ALIASES = {alias: spec.name for spec in REGISTRY.values() for alias in spec.aliases}


def stage(name: str) -> StageSpec:
    """The stage called ``name`` (or one of its aliases)."""
    spec = REGISTRY.get(ALIASES.get(name, name))
    if spec is None:
        raise ConfigError(f"unknown stage {name!r}; the stages are {list(STAGES)}")
    return spec


def check_config(cfg) -> None:
    """Check a composed pipeline config before anything runs, so that a value a later stage
    would refuse is one ConfigError naming the key now, not after the stages before it trained:
    every trained stage's model is built from its ``model`` section on placeholder dataset dims
    (S=4, A=2; Z and H from the built skill VAE) and its ``handoff`` checked, every other stage's
    section goes through its spec's ``check``, and the Q stage's ``num_bank_samples`` is checked
    against the bank's K. What depends on the dataset (the data sections) is checked when each
    DataModule is built."""
    dims = {"S": 4, "A": 2}
    for name, spec in REGISTRY.items():
        section = OmegaConf.to_container(cfg[name], resolve=True)
        if spec.trained:
            check_handoff(name, section.get("handoff", "last"))
            try:
                model = spec.new_model(section["model"], dims)
            except ConfigError as exc:
                raise ConfigError(f"{name}.{exc}") from exc
            except (TypeError, ValueError, KeyError) as exc:
                raise ConfigError(f"{name}.model: {exc}") from exc
            if name == "skill_vae":
                dims |= {"Z": model.hparams.latent_dim, "H": model.hparams.horizon}
        elif spec.check is not None:
            spec.check(section)
    k, wanted = cfg.latent_bank.num_samples, cfg.latent_bcq.model.num_bank_samples
    if wanted is not None and wanted > k:
        raise ConfigError(
            f"latent_bcq.model.num_bank_samples={wanted} exceeds latent_bank.num_samples={k}: "
            f"lower it or raise latent_bank.num_samples"
        )
