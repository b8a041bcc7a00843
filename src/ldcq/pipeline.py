"""Orchestration: the run context, one artifact lifecycle shared by every stage, and the run loop.

A stage's artifact is made at most once per fingerprint (its config, seed, dataset and upstream
fingerprints): finished, it is skipped; interrupted, its work folder resumes. What the stages are
comes from :mod:`ldcq.stages.registry`, the config from :mod:`ldcq.config`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ldcq.artifacts import (
    Artifact,
    ArtifactParts,
    dataset_identity,
    fingerprint,
    git_sha,
    is_done,
    read_artifact,
    write_artifact,
)
from ldcq.config import without_neutral
from ldcq.data.datamodules import load_episodes
from ldcq.errors import ConfigError
from ldcq.locking import ArtifactLock, RunLock
from ldcq.precision import on_cpu
from ldcq.precision import resolve as resolve_precision
from ldcq.process import barrier, global_rank, say
from ldcq.stages.clock import StageClock
from ldcq.stages.fit import check_handoff, fit_stage
from ldcq.stages.registry import (
    REGISTRY,
    RUN_ONLY_KEYS,
    STAGES,
    Built,
    StageSpec,
    check_config,
)
from ldcq.tracking import Tracker

# A stage whose trainer.precision is null runs in another stage's precision, not the shared one:
# the latent bank samples the diffusion prior in the precision the prior was trained in, and the
# evaluation's policy samples and scores latents in the bank's.
PRECISION_FROM = {"latent_bank": "diffusion_prior", "evaluation": "latent_bank"}


@dataclass
class StageResult:
    stage: str
    artifact: Artifact
    skipped: bool
    seconds: float


@dataclass
class Context:
    """One pipeline run: its config, checkpoints folder, tracker and the stages done so far."""

    cfg: DictConfig
    root: Path
    tracker: Tracker | None
    parent_run: str | None
    dataset: dict[str, Any] = field(default_factory=dict)
    results: dict[str, StageResult] = field(default_factory=dict)
    clock: StageClock | None = None  # the running stage's, across its attempts
    shared: bool = False  # the folder is shared with concurrent runs: lock per artifact

    def stage_seconds(self) -> float | None:
        """Wall seconds the running stage has taken so far, earlier attempts included
        (``spec.json``'s ``seconds``)."""
        return None if self.clock is None else round(self.clock.seconds, 1)

    def stage_cfg(self, stage: str) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg[stage], resolve=True)

    def trainer_kwargs(self, stage: str) -> dict[str, Any]:
        """The stage's Lightning Trainer arguments: the shared ``trainer`` section, then the
        stage's own, with the precision made concrete (:meth:`precision`)."""
        return {**self._merged_trainer(stage), "precision": self.precision(stage)[0]}

    def precision(self, stage: str) -> tuple[str, str]:
        """The stage's concrete precision and why: its own ``trainer.precision`` if set, else
        that of the stage in :data:`PRECISION_FROM`, else the shared ``trainer.precision``
        (``auto``: bf16-mixed where the hardware has native bf16, see :mod:`ldcq.precision`)."""
        own = self.stage_cfg(stage).get("trainer", {}).get("precision")
        if own is None and stage in PRECISION_FROM:
            inherited = self.precision(PRECISION_FROM[stage])
            # The evaluation's policy runs on this CPU, whatever device sampled the bank.
            return on_cpu(*inherited) if stage == "evaluation" else inherited
        merged = self._merged_trainer(stage)
        value = own if own is not None else merged.get("precision")
        return resolve_precision(value or "auto", merged.get("accelerator"))

    def _merged_trainer(self, stage: str) -> dict[str, Any]:
        own = dict(self.stage_cfg(stage).get("trainer", {}))
        if own.get("precision") is None:  # null: inherited (see precision)
            own.pop("precision", None)
        return {**OmegaConf.to_container(self.cfg.trainer, resolve=True), **own}

    def artifact(self, stage: str) -> Artifact:
        """The artifact a stage earlier in this run made or found."""
        return self.results[stage].artifact

    def upstream(self, stage: str) -> dict[str, str]:
        """Fingerprints of the artifacts ``stage`` consumes."""
        return {u: self.artifact(u).fingerprint for u in REGISTRY[stage].upstream}

    def stage_fingerprint(self, stage: str) -> str:
        return self.fingerprint(stage, list(self.upstream(stage).values()))

    def fingerprint(self, stage: str, upstream: Sequence[str]) -> str:
        cfg = without_neutral(self.stage_cfg(stage), f"{stage}.")
        trainer = {k: v for k, v in self.trainer_kwargs(stage).items() if k not in RUN_ONLY_KEYS}
        payload = {
            "stage": stage,
            "config": {**cfg, "trainer": trainer},
            "seed": self.cfg.seed,
            "dataset": self.dataset,
            "upstream": list(upstream),
        }
        identity = REGISTRY[stage].identity
        if identity is not None:
            payload.update(identity(self))
        return fingerprint(payload)


def produce(ctx: Context, spec: StageSpec) -> tuple[Artifact, bool]:
    """The stage's artifact: read if finished, else made (trained, or by the stage's ``make``) in
    ``.work/<stage>-<fp>`` under its own MLflow run, written, logged, its work folder removed.
    Returns it and whether it was finished before."""
    fp = ctx.stage_fingerprint(spec.name)
    final = ctx.root / f"{spec.name}-{fp}"
    if is_done(final):
        return read_artifact(final, spec.name), True
    if not spec.every_rank and global_rank() != 0:
        barrier()  # rank 0 makes it
        return read_artifact(final, spec.name), False
    work = ctx.root / ".work" / final.name
    if spec.trained:
        # Built, and its handoff checked, before the stage's MLflow run opens: a config error
        # leaves no run behind.
        handoff = check_handoff(spec.name, ctx.stage_cfg(spec.name).get("handoff", "last"))
        built = spec.build(ctx)
        run_id = _start_stage_run(ctx, spec.name, fp)
        parts = _fit(ctx, spec.name, built, work, run_id, handoff)
    else:
        run_id = _start_stage_run(ctx, spec.name, fp)
        parts = spec.make(ctx, work)
    if global_rank() == 0:
        artifact = write_artifact(
            final,
            stage=spec.name,
            modules=parts.modules,
            spec={**_common_spec(ctx, spec.name, fp), **parts.spec},
            config_yaml=OmegaConf.to_yaml(ctx.cfg[spec.name]),
            metrics=parts.metrics,
            extra_files=parts.extra_files,
        )
        _log_stage_run(ctx, run_id, artifact, parts, trained=spec.trained)
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return read_artifact(final, spec.name), False


def _fit(ctx: Context, stage: str, built: Built, work: Path, run_id: str | None, handoff: str):
    parts = fit_stage(
        stage,
        built.model,
        built.datamodule,
        work=work,
        trainer_kwargs=ctx.trainer_kwargs(stage),
        handoff=handoff,
        seed=ctx.cfg.seed,
        logger=ctx.tracker.logger(run_id) if ctx.tracker is not None else False,
    )
    parts.spec["dims"] = built.dims
    return parts


def _common_spec(ctx: Context, stage: str, fp: str) -> dict[str, Any]:
    cfg = ctx.stage_cfg(stage)
    precision, reason = ctx.precision(stage)
    return {
        "fingerprint": fp,
        "dataset": ctx.dataset,
        "seed": cfg.get("seed", ctx.cfg.seed),
        "upstream": ctx.upstream(stage),
        "config_hash": fingerprint(cfg),
        "pipeline": ctx.cfg.name,
        "seconds": ctx.stage_seconds(),
        "precision": precision,
        "precision_reason": reason,
    }


def _start_stage_run(ctx: Context, stage: str, fp: str) -> str | None:
    if ctx.tracker is None:
        return None
    tags = {"stage": stage, "fingerprint": fp, "dataset": ctx.dataset["id"]}
    run_id = ctx.tracker.start_run(stage, tags, ctx.parent_run)
    ctx.tracker.log_params(run_id, ctx.stage_cfg(stage))
    return run_id


def _log_stage_run(
    ctx: Context, run_id: str | None, artifact: Artifact, parts: ArtifactParts, trained: bool
) -> None:
    """The artifact's files (and an untrained stage's metrics: Lightning logs the others') on
    the stage's MLflow run, which ends."""
    if ctx.tracker is None:
        return
    if not trained:
        ctx.tracker.log_metrics(run_id, parts.metrics)
    names = parts.logged or sorted(p.name for p in artifact.path.iterdir() if p.name != "DONE")
    for name in names:
        ctx.tracker.log_artifact(run_id, artifact.path / name)
    ctx.tracker.end_run(run_id)


def run_pipeline(
    cfg: DictConfig,
    stages: Sequence[str] | None = None,
    track: bool = True,
    train: bool = True,
    parent_run: str | None = None,
    shared: bool = False,
) -> dict:
    """Run (or skip) the stages in order; returns ``{stage: StageResult}``.

    ``stages`` stops the run after the last of them; the stages before it are skipped when
    finished and run otherwise, unless ``train`` is False, which refuses to train any of them
    (``ldcq eval``: evaluate what is there). ``parent_run`` nests the pipeline's MLflow run
    under that run (a sweep's). ``shared``: other runs use the checkpoints folder at the same
    time (a sweep's parallel tasks); instead of locking the folder, each artifact is locked
    while it is made, and a run that needs one being made waits for it.
    """
    wanted = list(stages or STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    last = max(STAGES.index(s) for s in wanted)
    check_config(cfg)
    episodes = load_episodes(cfg.dataset, list(cfg.obs_keys))
    root = Path(cfg.checkpoints_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    # Under DDP every rank runs this function; only rank 0 locks, talks to MLflow and writes
    # artifacts. The lock keeps a second run off this checkpoints folder.
    # Shared runs (a sweep's tasks) hold it shared: they keep an ordinary run out, not each other.
    lock = RunLock(root, shared=shared).acquire() if global_rank() == 0 else None
    tracker = Tracker(cfg.name, cfg.get("tracking_uri")) if track and global_rank() == 0 else None
    ctx = Context(cfg=cfg, root=root, tracker=tracker, parent_run=None, shared=shared)
    ctx.dataset = dataset_identity(episodes)
    if tracker is not None:
        ctx.parent_run = tracker.start_run(
            f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            {"git_sha": git_sha(), "dataset": ctx.dataset["id"], "scale": cfg.scale},
            parent=parent_run,
        )
        tracker.log_params(ctx.parent_run, OmegaConf.to_container(cfg, resolve=True))
    try:
        for stage in STAGES[: last + 1]:
            ctx.results[stage] = _run_stage(ctx, REGISTRY[stage], train)
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


@contextmanager
def _maker(ctx: Context, stage: str, fp: str):
    """In a shared folder (``ctx.shared``), the right to make one artifact: rank 0 waits while
    another run makes it, then every rank goes on together (and finds it finished, or makes it)."""
    if not ctx.shared:
        yield
        return
    maker = global_rank() == 0
    with ArtifactLock(ctx.root / ".work" / f"{stage}-{fp}") if maker else nullcontext():
        barrier()
        yield


def _run_stage(ctx: Context, spec: StageSpec, train: bool) -> StageResult:
    """One stage of the loop: skipped, refused (``train`` False) or made, timed and tracked."""
    fp = ctx.stage_fingerprint(spec.name)
    with _maker(ctx, spec.name, fp):
        return _run_stage_locked(ctx, spec, train, fp)


def _run_stage_locked(ctx: Context, spec: StageSpec, train: bool, fp: str) -> StageResult:
    stage, start = spec.name, time.perf_counter()
    done_before = is_done(ctx.root / f"{stage}-{fp}")
    if not done_before and not train and stage != "evaluation":
        raise ConfigError(
            f"stage {stage} of pipeline {ctx.cfg.name} is not trained for this config (no "
            f"{ctx.root}/{stage}-{fp}); train it with `ldcq pipeline run` and the same config "
            f"and overrides"
        )
    say(f"{stage}: {'finished earlier, skipping' if done_before else 'training'}")
    # Seeded before the stage builds its modules: their initial weights come from it.
    L.seed_everything(ctx.cfg.seed, workers=True, verbose=False)
    ctx.clock = StageClock(ctx.root / ".work" / f"{stage}-{fp}.seconds", write=global_rank() == 0)
    try:
        with ctx.clock:
            artifact, _ = produce(ctx, spec)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            f"{stage}.{message}" if message.startswith(("model.", "data.")) else message
        ) from exc
    ctx.clock.finish()
    ctx.clock = None
    seconds = time.perf_counter() - start
    if ctx.tracker is not None:
        ctx.tracker.client.set_tag(ctx.parent_run, f"fingerprint.{stage}", artifact.fingerprint)
        if stage == "evaluation":
            ctx.tracker.log_metrics(ctx.parent_run, artifact.metrics)
        ctx.tracker.log_metrics(ctx.parent_run, {f"time/{stage}_s": seconds})
    say(f"{stage}: {artifact.path} ({seconds:.1f} s)")
    return StageResult(stage, artifact, done_before, seconds)
