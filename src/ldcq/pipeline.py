"""Orchestration only: compose the config, order the stages, fingerprint, skip or resume, track.

A pipeline file (``pipelines/<task>.yaml``) names the config fragments it includes and the
scale; command-line overrides use OmegaConf's dotted syntax (``skill_vae.model.beta=0.1``).
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ldcq.artifacts import Artifact, fingerprint, is_done, read_artifact, write_artifact
from ldcq.errors import ConfigError
from ldcq.locking import RunLock
from ldcq.stages.clock import StageClock
from ldcq.tracking import Tracker, flatten

STAGES = ("skill_vae", "diffusion_prior", "latent_bank", "latent_bcq", "evaluation")
# The artifacts each stage consumes; their fingerprints are part of the stage's fingerprint.
UPSTREAM = {
    "skill_vae": (),
    "diffusion_prior": ("skill_vae",),
    "latent_bank": ("skill_vae", "diffusion_prior"),
    "latent_bcq": ("skill_vae", "latent_bank"),
    "evaluation": ("skill_vae", "diffusion_prior", "latent_bcq"),
}
# The bank holds samples at latent_bcq's transitions: these latent_bcq.data keys choose them, so
# they are part of the bank's identity.
_BANK_TRANSITION_KEYS = ("dataset", "stride", "obs_keys")
# Trainer keys that decide where and how fast a stage runs, not what it learns.
_RUN_ONLY_KEYS = {
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "enable_progress_bar",
    "deterministic",
}


def project_root(pipeline_path: Path) -> Path:
    """The folder holding ``configs/``: the pipeline file's parent's parent, else the cwd."""
    for candidate in (pipeline_path.resolve().parent.parent, Path.cwd()):
        if (candidate / "configs").is_dir():
            return candidate
    raise ConfigError(f"no configs/ folder found beside {pipeline_path} or in {Path.cwd()}")


def _closest(key: str, cfg: DictConfig) -> str:
    keys = list(flatten(OmegaConf.to_container(cfg, resolve=False)))
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _preset(root: Path, kind: str, name: str) -> DictConfig:
    path = root / "configs" / kind / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (root / "configs" / kind).glob("*.yaml"))
        raise ConfigError(f"{kind} {name!r} does not exist; valid values are {valid}")
    return OmegaConf.load(path)


def compose(
    pipeline: str | Path,
    overrides: Sequence[str] = (),
    scale: str | None = None,
    trainer: str | None = None,
) -> DictConfig:
    """Merge, in order: the included fragments, ``configs/scale/<scale>.yaml``, the pipeline
    file's own keys, its ``scales.<scale>`` section (a task's own retuning of a scale),
    ``configs/trainer/<trainer>.yaml``, then ``overrides`` (``a.b.c=value``). Unknown keys are
    refused with the closest valid key."""
    path = Path(pipeline)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist; see pipelines/ for the tasks")
    root = project_root(path)
    try:
        body = OmegaConf.load(path)
        includes = [OmegaConf.load(root / inc) for inc in body.pop("include", [])]
        per_scale = body.pop("scales", None) or {}
    except (OSError, OmegaConfBaseException, yaml.YAMLError) as exc:
        # YAML is read with a safe loader: a tag that would build an object lands here too.
        raise ConfigError(f"cannot read pipeline {path}: {' '.join(str(exc).split())}") from exc
    scale = scale or body.get("scale", "quick")
    parts = [*includes, _preset(root, "scale", scale), body]
    unknown = sorted(set(per_scale) - {p.stem for p in (root / "configs" / "scale").glob("*.yaml")})
    if unknown:
        raise ConfigError(f"{path}: scales.{unknown[0]} names no configs/scale/*.yaml file")
    if scale in per_scale:
        parts.append(per_scale[scale])
    if trainer:
        parts.append(_preset(root, "trainer", trainer))
    cfg = _merge_strict(parts, path)
    cfg.scale = scale
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. skill_vae.model.beta=0.1)")
        key = item.split("=", 1)[0].lstrip("+")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except ConfigKeyError as exc:
            raise ConfigError(f"unknown config key {key!r}{_closest(key, cfg)}") from exc
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r} is not valid: {exc}") from exc
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config of {path} does not resolve: {exc}") from exc
    return cfg


def _merge_strict(parts: Sequence[DictConfig], path: Path) -> DictConfig:
    """The first part (the family defaults) fixes the keys; a later part that names a key it does
    not have is refused, so a typo in a scale or pipeline file cannot pass silently."""
    cfg = OmegaConf.merge(parts[0], {"scale": None})
    OmegaConf.set_struct(cfg, True)
    for part in parts[1:]:
        try:
            cfg = OmegaConf.merge(cfg, part)
        except ConfigKeyError as exc:
            key = exc.full_key or str(exc)
            raise ConfigError(f"{path}: unknown config key {key!r}{_closest(key, cfg)}") from exc
    return cfg


def dataset_identity(episodes) -> dict[str, Any]:
    """Id plus a cheap content hash, so a regenerated dataset invalidates every stage."""
    h = hashlib.sha256()
    for arr in (episodes.observations, episodes.actions, episodes.rewards, episodes.episode_starts):
        h.update(np.ascontiguousarray(arr[:: max(1, len(arr) // 4096)]).tobytes())
        h.update(str(arr.shape).encode())
    return {
        "id": episodes.dataset_id,
        "steps": len(episodes.actions),
        "episodes": int(episodes.num_episodes),
        "content": h.hexdigest()[:16],
        "ref_min_score": episodes.ref_min_score,
        "ref_max_score": episodes.ref_max_score,
    }


@dataclass
class StageResult:
    stage: str
    artifact: Artifact
    skipped: bool
    seconds: float


@dataclass
class Context:
    cfg: DictConfig
    root: Path
    tracker: Tracker | None
    parent_run: str | None
    dataset: dict[str, Any] = field(default_factory=dict)
    results: dict[str, StageResult] = field(default_factory=dict)
    clock: StageClock | None = None  # the running stage's, across its attempts

    def stage_seconds(self) -> float | None:
        """Wall seconds the running stage has taken so far, earlier attempts included
        (``spec.json``'s ``seconds``)."""
        return None if self.clock is None else round(self.clock.seconds, 1)

    def stage_cfg(self, stage: str) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg[stage], resolve=True)

    def trainer_kwargs(self, stage: str) -> dict[str, Any]:
        return {
            **OmegaConf.to_container(self.cfg.trainer),
            **self.stage_cfg(stage).get("trainer", {}),
        }

    def upstream(self, stage: str) -> dict[str, str]:
        """Fingerprints of the artifacts ``stage`` consumes."""
        return {u: self.results[u].artifact.fingerprint for u in UPSTREAM[stage]}

    def stage_fingerprint(self, stage: str) -> str:
        return self.fingerprint(stage, list(self.upstream(stage).values()))

    def fingerprint(self, stage: str, upstream: Sequence[str]) -> str:
        cfg = self.stage_cfg(stage)
        trainer = {k: v for k, v in self.trainer_kwargs(stage).items() if k not in _RUN_ONLY_KEYS}
        payload = {
            "stage": stage,
            "config": {**cfg, "trainer": trainer},
            "seed": self.cfg.seed,
            "dataset": self.dataset,
            "upstream": list(upstream),
        }
        if stage == "latent_bank":
            data = self.stage_cfg("latent_bcq")["data"]
            payload["transitions"] = {k: data.get(k) for k in _BANK_TRANSITION_KEYS}
        return fingerprint(payload)


def global_rank() -> int:
    """This process's rank, known before any Trainer starts (from the launcher's env vars)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def _log(msg: str) -> None:
    from rich.console import Console

    if global_rank() == 0:
        Console(stderr=True).print(f"[bold cyan]ldcq[/] {msg}")


def _fit_stage(
    ctx: Context,
    stage: str,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    fp: str,
    upstream: dict[str, str],
    dims: dict[str, int],
) -> tuple[Artifact, bool]:
    """Train one stage (resuming from ``last.ckpt``) and write its artifact; skip it if done."""
    final = ctx.root / f"{stage}-{fp}"
    if is_done(final):
        return read_artifact(final, stage), True
    work = ctx.root / ".work" / f"{stage}-{fp}"
    last = work / "last.ckpt"
    handoff = _handoff(ctx, stage)
    run_id = None
    if ctx.tracker is not None:
        run_id = ctx.tracker.start_run(
            stage, {"stage": stage, "fingerprint": fp, "dataset": ctx.dataset["id"]}, ctx.parent_run
        )
        ctx.tracker.log_params(run_id, ctx.stage_cfg(stage))
    trainer, checkpoint = _stage_trainer(ctx, stage, work, run_id, handoff)
    resumed_from = _resume_point(stage, last)
    L.seed_everything(ctx.cfg.seed, workers=True, verbose=False)
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=str(last) if resumed_from is not None else None,
        weights_only=True,  # last.ckpt is read as data; a file that pickles code is refused
    )
    handed_on = _hand_on(stage, model, checkpoint, handoff)
    if trainer.is_global_zero:
        artifact = export_artifact(
            final,
            stage,
            model,
            checkpoint.metrics,
            OmegaConf.to_yaml(ctx.cfg[stage]),
            {
                "fingerprint": fp,
                "dims": dims,
                "dataset": ctx.dataset,
                "seed": ctx.cfg.seed,
                "upstream": upstream,
                "config_hash": fingerprint(ctx.stage_cfg(stage)),
                "pipeline": ctx.cfg.name,
                "resumed_from_step": resumed_from,
                # Every resume of this stage: from which step, and whether it was exact.
                "resumes": checkpoint.resumes,
                "resume_exact": checkpoint.exact,
                "global_step": trainer.global_step,
                "handoff": handed_on,
                "seconds": ctx.stage_seconds(),
            },
        )
        if ctx.tracker is not None:
            for name in ("spec.json", "config.yaml", "metrics.json"):
                ctx.tracker.log_artifact(run_id, artifact.path / name)
            ctx.tracker.end_run(run_id)
        shutil.rmtree(work, ignore_errors=True)
    trainer.strategy.barrier()
    return read_artifact(final, stage), False


def _stage_trainer(ctx: Context, stage: str, work: Path, run_id: str | None, handoff: str):
    """The stage's ``Trainer`` with the NaN guard and its :class:`ResumableCheckpoint` (which
    keeps the best validation's weights when ``handoff`` is ``best``); returns both."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ldcq.stages.checkpointing import ResumableCheckpoint
    from ldcq.stages.guards import FiniteLossGuard

    kwargs = ctx.trainer_kwargs(stage)
    every = kwargs.pop("checkpoint_every_n_steps", 500)
    monitor = "val/loss" if handoff == "best" else None
    checkpoint = ResumableCheckpoint(work, every, stage, say=_log, monitor=monitor)
    try:
        trainer = L.Trainer(
            **kwargs,
            default_root_dir=work,
            logger=ctx.tracker.logger(run_id) if ctx.tracker is not None else False,
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
        _log(f"{stage}: resuming from {last} (step {resumed_from})")
    elif last.exists() and global_rank() == 0:
        # Truncated, corrupted or pickling code: kept aside for a look, never loaded.
        last.replace(last.with_name("last.ckpt.unreadable"))
        _log(f"{stage}: {last} is unreadable; kept as last.ckpt.unreadable, training afresh")
    return resumed_from


HANDOFFS = ("best", "last")


def _handoff(ctx: Context, stage: str) -> str:
    """``<stage>.handoff``: the weights a trained stage hands on, ``best`` (its lowest val/loss,
    as the official code) or ``last``."""
    handoff = ctx.stage_cfg(stage).get("handoff", "last")
    if handoff not in HANDOFFS:
        raise ConfigError(f"{stage}.handoff={handoff!r}: valid values are {list(HANDOFFS)}")
    if handoff == "best" and stage == "latent_bcq":
        raise ConfigError(
            "latent_bcq.handoff=best: the Q stage has no validation loss to choose by; use last"
        )
    return handoff


def _hand_on(stage: str, model: L.LightningModule, checkpoint, handoff: str) -> dict[str, Any]:
    """Load the weights to hand on into ``model``; returns what ``spec.json`` records of them."""
    if handoff == "last":
        return {"weights": "last"}
    if checkpoint.best is None:
        _log(f"{stage}: no validation ran, so the last weights are handed on, not the best")
        return {"weights": "last", "why": "no validation ran (val_check_interval > max_steps?)"}
    model.load_state_dict(checkpoint.best["state_dict"])
    best = checkpoint.best
    return {
        "weights": "best",
        "monitor": checkpoint.monitor,
        "step": best["step"],
        "value": best["value"],
    }


def export_artifact(
    path: Path,
    stage: str,
    model: L.LightningModule,
    metrics: dict[str, float],
    config_yaml: str,
    spec: dict[str, Any],
) -> Artifact:
    """Write a trained stage module as a frozen artifact (rank 0 only)."""
    # LightningCLI adds private entries to hparams; the spec keeps constructor arguments only.
    params = inspect.signature(type(model).__init__).parameters
    kwargs = {k: v for k, v in model.hparams.items() if k in params}
    return write_artifact(
        path,
        stage=stage,
        modules={stage: (model, kwargs)},
        spec=spec,
        config_yaml=config_yaml,
        metrics=metrics,
    )


def _checkpoint_step(path: Path) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return None


def run_skill_vae(ctx: Context) -> Artifact:
    from ldcq.data.datamodules import TrajectorySnippetDataModule
    from ldcq.stages.skill_vae import SkillVAE

    cfg = ctx.stage_cfg("skill_vae")
    dm = TrajectorySnippetDataModule(**cfg["data"])
    fp = ctx.stage_fingerprint("skill_vae")
    model = SkillVAE(state_dim=dm.state_dim, action_dim=dm.action_dim, **cfg["model"])
    dims = {
        "S": dm.state_dim,
        "A": dm.action_dim,
        "Z": model.hparams.latent_dim,
        "H": model.hparams.horizon,
    }
    artifact, _ = _fit_stage(ctx, "skill_vae", model, dm, fp, {}, dims)
    return artifact


def run_diffusion_prior(ctx: Context) -> Artifact:
    from ldcq.stages.diffusion_prior import LatentDiffusionPrior
    from ldcq.stages.latent_data import LatentPairsDataModule

    vae = ctx.results["skill_vae"].artifact
    cfg = ctx.stage_cfg("diffusion_prior")
    fp = ctx.stage_fingerprint("diffusion_prior")
    dm = LatentPairsDataModule(vae_artifact=str(vae.path), **cfg["data"])
    model = LatentDiffusionPrior(state_dim=dm.state_dim, latent_dim=dm.latent_dim, **cfg["model"])
    dims = dict(vae.spec["dims"])
    artifact, _ = _fit_stage(
        ctx, "diffusion_prior", model, dm, fp, ctx.upstream("diffusion_prior"), dims
    )
    return artifact


def check_bank_config(cfg: dict[str, Any]) -> None:
    """The ``latent_bank`` section's values, named by their pipeline keys."""
    from ldcq.models import SAMPLERS
    from ldcq.stages.common import check_positive

    check_positive(
        "latent_bank",
        num_samples=cfg["num_samples"],
        sampling_steps=cfg["sampling_steps"],
        batch_size=cfg["batch_size"],
    )
    check_positive("latent_bank", allow_zero=True, extra_steps=cfg["extra_steps"])
    if cfg["sampler"] not in SAMPLERS:
        raise ConfigError(
            f"latent_bank.sampler={cfg['sampler']!r}: valid samplers are {list(SAMPLERS)}"
        )


def run_latent_bank(ctx: Context) -> Artifact:
    from ldcq.artifacts import load_modules
    from ldcq.stages.latent_bank import generate_bank
    from ldcq.stages.latent_bcq import LatentTransitionDataModule

    vae = ctx.results["skill_vae"].artifact
    prior = ctx.results["diffusion_prior"].artifact
    cfg = ctx.stage_cfg("latent_bank")
    data_cfg = ctx.stage_cfg("latent_bcq")["data"]
    fp = ctx.stage_fingerprint("latent_bank")
    final = ctx.root / f"latent_bank-{fp}"
    if is_done(final):
        return read_artifact(final, "latent_bank")
    check_bank_config(cfg)
    try:
        dm = LatentTransitionDataModule(
            vae_artifact=str(vae.path), bank_path="", **{**data_cfg, "prioritized": False}
        )
    except ConfigError as exc:  # the bank is drawn at latent_bcq's transitions
        raise ConfigError(
            f"latent_bcq.{exc}" if str(exc).startswith("data.") else str(exc)
        ) from exc
    next_states = dm.transitions()["next_states"]
    work = ctx.root / ".work" / f"latent_bank-{fp}"
    trainer_kwargs = {
        k: v
        for k, v in ctx.trainer_kwargs("latent_bank").items()
        if k in _RUN_ONLY_KEYS | {"precision"}
    }
    prior_module = load_modules(prior)["diffusion_prior"]
    bank_path = generate_bank(
        prior_module,
        next_states,
        work,
        num_samples=cfg["num_samples"],
        sampler=cfg["sampler"],
        sampling_steps=cfg["sampling_steps"],
        extra_steps=cfg["extra_steps"],
        seed=ctx.cfg.seed,
        batch_size=cfg["batch_size"],
        trainer_kwargs=trainer_kwargs,
    )
    if global_rank() == 0:
        bank = np.load(bank_path, mmap_mode="r")
        write_artifact(
            final,
            stage="latent_bank",
            modules={},
            spec={
                "fingerprint": fp,
                "dims": {**vae.spec["dims"], "K": int(bank.shape[1]), "N": int(bank.shape[0])},
                "dataset": ctx.dataset,
                "seed": ctx.cfg.seed,
                "upstream": ctx.upstream("latent_bank"),
                "config_hash": fingerprint(cfg),
                "pipeline": ctx.cfg.name,
                "bytes_per_transition": int(bank.shape[1] * bank.shape[2] * bank.itemsize),
                "seconds": ctx.stage_seconds(),
            },
            config_yaml=OmegaConf.to_yaml(ctx.cfg.latent_bank),
            metrics={"bank/bytes": float(Path(bank_path).stat().st_size)},
            extra_files={"bank.npy": Path(bank_path)},
        )
        shutil.rmtree(work, ignore_errors=True)
    _barrier()
    return read_artifact(final, "latent_bank")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_latent_bcq(ctx: Context) -> Artifact:
    from ldcq.stages.latent_bcq import LatentBCQ, LatentTransitionDataModule

    vae = ctx.results["skill_vae"].artifact
    bank = ctx.results["latent_bank"].artifact
    cfg = ctx.stage_cfg("latent_bcq")
    fp = ctx.stage_fingerprint("latent_bcq")
    dm = LatentTransitionDataModule(
        vae_artifact=str(vae.path), bank_path=str(bank.path / "bank.npy"), **cfg["data"]
    )
    model = LatentBCQ(
        state_dim=dm.state_dim,
        latent_dim=dm.latent_dim,
        horizon=vae.spec["dims"]["H"],
        **cfg["model"],
    )
    upstream = ctx.upstream("latent_bcq")
    artifact, _ = _fit_stage(ctx, "latent_bcq", model, dm, fp, upstream, dict(vae.spec["dims"]))
    return artifact


def run_evaluation(ctx: Context) -> Artifact:
    """The LDCQ policy in the simulator; rank 0 only (the others wait at the barrier)."""
    from ldcq.artifacts import load_modules
    from ldcq.data.datamodules import load_episodes
    from ldcq.evaluation.policy import LDCQPolicy
    from ldcq.evaluation.rollout import evaluate, evaluation_protocol

    cfg = ctx.stage_cfg("evaluation")
    fp = ctx.stage_fingerprint("evaluation")
    final = ctx.root / f"evaluation-{fp}"
    if is_done(final) or global_rank() != 0:
        _barrier()
        return read_artifact(final, "evaluation")
    modules = {
        stage: load_modules(ctx.results[stage].artifact)[stage]
        for stage in ("skill_vae", "diffusion_prior", "latent_bcq")
    }
    policy = LDCQPolicy(
        modules["skill_vae"],
        modules["diffusion_prior"],
        modules["latent_bcq"],
        selector=cfg["selector"],
        num_samples=cfg["num_samples"],
        replan_every=cfg["replan_every"],
        deterministic=cfg["deterministic"],
        sampler=cfg["sampler"],
        sampling_steps=cfg["sampling_steps"],
        extra_steps=cfg["extra_steps"],
        seed=cfg["seed"],
    )
    episodes = load_episodes(ctx.cfg.dataset, list(ctx.cfg.obs_keys))
    stored_ref = (episodes.ref_min_score, episodes.ref_max_score)
    protocol = evaluation_protocol(ctx.cfg.dataset, cfg["goal"], stored_ref)
    make_env = protocol.make_env
    run_id = None
    if ctx.tracker is not None:
        tags = {"stage": "evaluation", "fingerprint": fp, "dataset": ctx.dataset["id"]}
        run_id = ctx.tracker.start_run("evaluation", tags, ctx.parent_run)
        ctx.tracker.log_params(run_id, cfg)
    start = time.perf_counter()
    metrics, trajectories = evaluate(
        policy,
        make_env,
        obs_keys=list(ctx.cfg.obs_keys),
        episodes=cfg["episodes"],
        num_envs=cfg["num_envs"],
        seed=cfg["seed"],
        ref_scores=protocol.ref_scores,
        asynchronous=cfg["asynchronous"],
    )
    metrics["eval/seconds"] = time.perf_counter() - start
    work = ctx.root / ".work" / f"evaluation-{fp}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    np.savez_compressed(
        work / "rollouts.npz",
        positions=trajectories.positions,
        success=trajectories.success,
        returns=trajectories.returns,
        lengths=trajectories.lengths,
    )
    extra = {"rollouts.npz": work / "rollouts.npz"}
    if cfg["pictures"]:
        extra.update(_pictures(ctx, work, trajectories, modules, policy, make_env, episodes))
    artifact = write_artifact(
        final,
        stage="evaluation",
        modules={},
        spec={
            "fingerprint": fp,
            "dims": dict(ctx.results["skill_vae"].artifact.spec["dims"]),
            "dataset": ctx.dataset,
            "seed": cfg["seed"],
            "family": protocol.family,
            "protocol": protocol.description,
            "ref_scores": list(protocol.ref_scores),
            "upstream": ctx.upstream("evaluation"),
            "config_hash": fingerprint(cfg),
            "pipeline": ctx.cfg.name,
            "seconds": ctx.stage_seconds(),
        },
        config_yaml=OmegaConf.to_yaml(ctx.cfg.evaluation),
        metrics=metrics,
        extra_files=extra,
    )
    shutil.rmtree(work, ignore_errors=True)
    if ctx.tracker is not None:
        ctx.tracker.log_metrics(run_id, metrics)
        for path in sorted(artifact.path.iterdir()):
            if path.name != "DONE":
                ctx.tracker.log_artifact(run_id, path)
        ctx.tracker.end_run(run_id)
    _barrier()
    return artifact


def _pictures(ctx, out_dir, trajectories, modules, policy, make_env, episodes) -> dict[str, Path]:
    """Pictures of the evaluation, written to ``out_dir``; name -> file."""
    from ldcq.evaluation import plots

    env = make_env()
    try:
        maze = plots.MazeLayout.from_env(env, seed=ctx.stage_cfg("evaluation")["seed"])
    finally:
        env.close()
    files = plots.make_pictures(
        out_dir,
        traj=trajectories,
        maze=maze,
        vae=modules["skill_vae"],
        prior=modules["diffusion_prior"],
        q=modules["latent_bcq"],
        episodes=episodes,
        policy=policy,
        make_env=make_env,
        tracking_uri=ctx.tracker.uri if ctx.tracker is not None else None,
        run_ids=_training_runs(ctx) or None,
        obs_keys=list(ctx.cfg.obs_keys),
    )
    return {path.name: path for path in files.values()}


def _training_runs(ctx: Context) -> dict[str, str]:
    """MLflow run id of each trained stage's artifact, in pipeline order: the latest finished run
    with its stage and fingerprint, whichever invocation trained it."""
    if ctx.tracker is None:
        return {}
    run_ids = {}
    for stage in ("skill_vae", "diffusion_prior", "latent_bcq"):
        fp = ctx.results[stage].artifact.fingerprint
        runs = ctx.tracker.client.search_runs(
            [ctx.tracker.experiment_id],
            filter_string=(
                f"tags.stage = '{stage}' and tags.fingerprint = '{fp}' "
                f"and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            run_ids[stage] = runs[0].info.run_id
    return run_ids


RUNNERS = {
    "skill_vae": run_skill_vae,
    "diffusion_prior": run_diffusion_prior,
    "latent_bank": run_latent_bank,
    "latent_bcq": run_latent_bcq,
    "evaluation": run_evaluation,
}


def run_pipeline(
    cfg: DictConfig,
    stages: Sequence[str] | None = None,
    track: bool = True,
    train: bool = True,
) -> dict:
    """Run (or skip) the stages in order; returns ``{stage: StageResult}``.

    ``stages`` stops the run after the last of them; the stages before it are skipped when
    finished and run otherwise, unless ``train`` is False, which refuses to train any of them
    (``ldcq eval``: evaluate what is there).
    """
    from ldcq.data.datamodules import load_episodes

    wanted = list(stages or STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    last = max(STAGES.index(s) for s in wanted)
    episodes = load_episodes(cfg.dataset, list(cfg.obs_keys))
    root = Path(cfg.checkpoints_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    # Under DDP every rank runs this function; only rank 0 locks, talks to MLflow and writes
    # artifacts. The lock keeps a second run off this checkpoints folder.
    lock = RunLock(root).acquire() if global_rank() == 0 else None
    tracker = Tracker(cfg.name, cfg.get("tracking_uri")) if track and global_rank() == 0 else None
    ctx = Context(cfg=cfg, root=root, tracker=tracker, parent_run=None)
    ctx.dataset = dataset_identity(episodes)
    if tracker is not None:
        from ldcq.artifacts import git_sha

        ctx.parent_run = tracker.start_run(
            f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            {"git_sha": git_sha(), "dataset": ctx.dataset["id"], "scale": cfg.scale},
        )
        tracker.log_params(ctx.parent_run, OmegaConf.to_container(cfg, resolve=True))
    try:
        for stage in STAGES[: last + 1]:
            start = time.perf_counter()
            done_before = _finished(ctx, stage)
            if not done_before and not train and stage != "evaluation":
                raise ConfigError(
                    f"stage {stage} of pipeline {cfg.name} is not trained for this config (no "
                    f"{root}/{stage}-{ctx.stage_fingerprint(stage)}); train it with "
                    f"`ldcq pipeline run` and the same config and overrides"
                )
            _log(f"{stage}: {'finished earlier, skipping' if done_before else 'training'}")
            # Seeded before the stage builds its modules: their initial weights come from it.
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            ledger = root / ".work" / f"{stage}-{ctx.stage_fingerprint(stage)}.seconds"
            ctx.clock = StageClock(ledger, write=global_rank() == 0)
            try:
                with ctx.clock:
                    artifact = RUNNERS[stage](ctx)
            except ConfigError as exc:
                raise ConfigError(
                    f"{stage}.{exc}" if str(exc).startswith(("model.", "data.")) else str(exc)
                ) from exc
            ctx.clock.finish()
            ctx.clock = None
            seconds = time.perf_counter() - start
            ctx.results[stage] = StageResult(stage, artifact, done_before, seconds)
            if tracker is not None:
                tracker.client.set_tag(ctx.parent_run, f"fingerprint.{stage}", artifact.fingerprint)
                if stage == "evaluation":
                    tracker.log_metrics(ctx.parent_run, artifact.metrics)
                tracker.log_metrics(ctx.parent_run, {f"time/{stage}_s": seconds})
            _log(f"{stage}: {artifact.path} ({seconds:.1f} s)")
    except BaseException:
        if tracker is not None:
            tracker.end_open_runs("FAILED")  # the failed stage's run, then the pipeline's
        raise
    finally:
        if lock is not None:
            lock.release()
    if tracker is not None:
        tracker.end_run(ctx.parent_run)
    return ctx.results


def _finished(ctx: Context, stage: str) -> bool:
    return is_done(ctx.root / f"{stage}-{ctx.stage_fingerprint(stage)}")
