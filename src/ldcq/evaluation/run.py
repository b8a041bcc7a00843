"""The evaluation stage's parts: the policy built from the three trained artifacts, rolled out
in the simulator under the dataset's protocol, its rollouts file and its pictures.

Runs on global rank 0 only (the stage registry says so); the pipeline writes the artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldcq.artifacts import ArtifactParts, load_modules
from ldcq.data.datamodules import load_episodes
from ldcq.evaluation import plots
from ldcq.evaluation.diagnostics import (
    choice_support,
    plot_diagnostics,
    skill_diagnostics,
    stall_points,
    stalled_episodes,
    value_propagation,
)
from ldcq.evaluation.policy import LDCQPolicy
from ldcq.evaluation.rollout import evaluate, evaluation_protocol
from ldcq.process import say

TRAINED_INPUTS = ("skill_vae", "diffusion_prior", "latent_bcq")


def make_evaluation(ctx, work: Path) -> ArtifactParts:
    """Roll the policy out over ``evaluation.episodes`` episodes; its parts, pictures included
    when ``evaluation.pictures`` is true."""
    cfg = ctx.stage_cfg("evaluation")
    modules = {s: load_modules(ctx.artifact(s))[s] for s in TRAINED_INPUTS}
    policy = build_policy(modules, cfg, ctx.precision("evaluation")[0])
    episodes = load_episodes(ctx.cfg.dataset, list(ctx.cfg.obs_keys))
    stored_ref = (episodes.ref_min_score, episodes.ref_max_score)
    protocol = evaluation_protocol(ctx.cfg.dataset, cfg["goal"], stored_ref)
    start = time.perf_counter()
    metrics, trajectories = evaluate(
        policy,
        protocol.make_env,
        obs_keys=list(ctx.cfg.obs_keys),
        episodes=cfg["episodes"],
        num_envs=cfg["num_envs"],
        seed=cfg["seed"],
        ref_scores=protocol.ref_scores,
        asynchronous=cfg["asynchronous"],
    )
    metrics["eval/seconds"] = time.perf_counter() - start
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        work / "rollouts.npz",
        positions=trajectories.positions,
        success=trajectories.success,
        returns=trajectories.returns,
        lengths=trajectories.lengths,
    )
    extra = {"rollouts.npz": work / "rollouts.npz"}
    maze = _maze(protocol, cfg["seed"]) if cfg["pictures"] or cfg["diagnostics"] else None
    if cfg["diagnostics"]:
        found, pictures = _diagnostics(ctx, cfg, modules, maze, work, trajectories)
        metrics.update(found)
        extra.update(pictures)
    if cfg["pictures"]:
        extra.update(_pictures(ctx, work, trajectories, modules, policy, protocol, episodes, maze))
    spec = {
        "dims": dict(ctx.artifact("skill_vae").spec["dims"]),
        "family": protocol.family,
        "protocol": protocol.description,
        "ref_scores": list(protocol.ref_scores),
    }
    return ArtifactParts(spec=spec, metrics=metrics, extra_files=extra, logged=None)


def _stalls(ends: np.ndarray, episodes: int, maze) -> dict[str, float]:
    """The stalled-episode metrics of the rollouts (docs/method.md), the top cell said aloud."""
    metrics, cell = stalled_episodes(ends, episodes, maze)
    if cell is not None:
        share, top = metrics["diag/stalled_share"], metrics["diag/stalled_top_cell_share"]
        say(
            f"evaluation diagnostics: {share:.0%} of episodes stalled without success, "
            f"{top:.0%} in cell (row {cell[0]}, col {cell[1]})"
        )
    return metrics


def _diagnostics(
    ctx, cfg, modules, maze, work: Path, trajectories
) -> tuple[dict[str, float], dict[str, Path]]:
    """The skill diagnostics, the support of Q's picks and, on a maze, the value propagation and
    the stalled episodes (docs/method.md): their metrics and, with pictures on,
    ``diagnostics.png``."""
    sampling = {k: cfg[k] for k in ("sampler", "sampling_steps", "extra_steps")}
    prior_data = ctx.stage_cfg("diffusion_prior")["data"]
    obs_keys = list(ctx.cfg.obs_keys)
    result = skill_diagnostics(
        modules["skill_vae"],
        modules["diffusion_prior"],
        ctx.stage_cfg("skill_vae")["data"],
        maze=maze,
        num_samples=cfg["num_samples"],
        seed=cfg["seed"],
        prior_split=(prior_data["val_fraction"], prior_data["seed"]),
        sampling=sampling,
    )
    metrics, extra = dict(result.metrics), {}
    for note in result.notes:
        say(f"evaluation diagnostics: {note}")
    if cfg["pictures"] and result.support:
        extra["diagnostics.png"] = plot_diagnostics(result, maze, work / "diagnostics.png")
    stall_states = None
    if maze is not None:
        values = value_propagation(
            modules["diffusion_prior"],
            modules["latent_bcq"],
            maze,
            obs_keys,
            num_samples=cfg["num_samples"],
            seed=cfg["seed"],
            sampling=sampling,
        )
        metrics.update(values)
        if not values:
            say("evaluation diagnostics: the state holds no position: value propagation skipped")
        ends = stall_points(
            trajectories.positions, trajectories.lengths, trajectories.success, maze
        )
        metrics.update(_stalls(ends, len(trajectories.positions), maze))
        if len(ends) and values:  # values: the state holds the position
            stall_states = torch.as_tensor(maze.states_at(ends, obs_keys))
    if result.reference is not None:
        metrics.update(
            choice_support(
                modules["skill_vae"],
                modules["diffusion_prior"],
                modules["latent_bcq"],
                result.reference,
                stall_states,
                num_samples=cfg["num_samples"],
                seed=cfg["seed"],
                sampling=sampling,
            )
        )
    metrics.update(q_convergence(ctx))
    return metrics, extra


def q_convergence(ctx) -> dict[str, float]:
    """``diag/q_mean_late_change``: the relative change of the Q stage's smoothed ``q_mean`` over
    its last 20 % of steps (about 0 once Q-learning converged), read from the MLflow run that
    finished the stage; nothing without tracking or without that history."""
    if ctx.tracker is None:
        return {}
    run_id = training_runs(ctx).get("latent_bcq")
    change = None if run_id is None else plots.q_mean_late_change(ctx.tracker.client, run_id)
    if change is None:
        say("evaluation diagnostics: no q_mean history of the Q stage: its convergence is skipped")
        return {}
    return {"diag/q_mean_late_change": change}


def build_policy(
    modules: dict[str, Any], cfg: dict[str, Any], precision: str = "32-true"
) -> LDCQPolicy:
    """The policy of the ``evaluation`` section over the frozen trained modules, sampling in
    ``precision`` (the latent bank's)."""
    return LDCQPolicy(
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
        precision=precision,
        compile=cfg["compile"],
    )


def _maze(protocol, seed: int) -> plots.MazeLayout | None:
    """The walls and goal of the evaluation env's maze (None when it is not one)."""
    env = protocol.make_env()
    try:
        return plots.MazeLayout.from_env(env, seed=seed)
    finally:
        env.close()


def _pictures(
    ctx, out_dir, trajectories, modules, policy, protocol, episodes, maze
) -> dict[str, Path]:
    """Pictures of the evaluation, written to ``out_dir``; name -> file."""
    files = plots.make_pictures(
        out_dir,
        traj=trajectories,
        maze=maze,
        vae=modules["skill_vae"],
        prior=modules["diffusion_prior"],
        q=modules["latent_bcq"],
        episodes=episodes,
        policy=policy,
        make_env=protocol.make_env,
        tracking_uri=ctx.tracker.uri if ctx.tracker is not None else None,
        run_ids=training_runs(ctx) or None,
        obs_keys=list(ctx.cfg.obs_keys),
    )
    return {path.name: path for path in files.values()}


def training_runs(ctx) -> dict[str, str]:
    """MLflow run id of each trained stage's artifact, in pipeline order: the latest finished run
    with its stage and fingerprint, whichever invocation trained it."""
    if ctx.tracker is None:
        return {}
    run_ids = {}
    for stage in TRAINED_INPUTS:
        fp = ctx.artifact(stage).fingerprint
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
