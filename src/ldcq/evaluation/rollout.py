"""Vectorized, seeded rollouts of a policy in the dataset's evaluation environment.

``evaluate(policy, env_fn, …) -> (metrics, trajectories)``: metrics are ready for the logger
(``eval/…``); trajectories hold what the pictures need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial

import gymnasium as gym
import numpy as np

from ldcq.data import pointmaze
from ldcq.data.minari_io import canonical_id, load_dataset, observation_vector
from ldcq.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    """How a dataset's agent is evaluated.

    ``make_env(**kw)`` builds the evaluation env (keyword arguments such as ``render_mode`` go to
    the env); ``family`` is ``maze2d``, ``antmaze``, ``kitchen`` or ``other``; ``description``
    says what the env pays, for the run summary and ``spec.json``; ``ref_scores`` are
    ``(R_min, R_max)`` under this very protocol (None where the dataset has none).
    """

    make_env: Callable[..., gym.Env]
    family: str
    description: str
    ref_scores: tuple[float | None, float | None]


def evaluation_protocol(
    dataset: str, goal: str = "fixed", stored_ref: tuple[float | None, float | None] = (None, None)
) -> Protocol:
    """The protocol of ``dataset``: a generated PointMaze dataset is evaluated with its goal
    ``fixed`` at the goal of its rewards (D4RL's maze2d protocol; its stored reference scores
    were computed so) or ``moving`` as gymnasium-robotics moves it (reference scores computed
    here under that protocol); a downloaded dataset on the eval env that Minari recorded, with
    ``stored_ref``.
    """
    if goal not in pointmaze.GOAL_PROTOCOLS:
        raise ConfigError(
            f"evaluation.goal={goal!r}: valid values are {list(pointmaze.GOAL_PROTOCOLS)}"
        )
    dataset_id = canonical_id(dataset)
    name = pointmaze.name_for_id(dataset_id)
    if name is not None:
        make_env = partial(pointmaze.make_eval_env, name, goal)
        if goal == "fixed":
            radius = pointmaze.SUCCESS_RADIUS
            description = (
                f"fixed goal: pays within {radius} of the goal cell's centre, the goal of the "
                f"dataset's rewards (D4RL maze2d)"
            )
            return Protocol(make_env, "maze2d", description, stored_ref)
        description = (
            "moving goal: gymnasium-robotics' goal, moved by U(-0.25, 0.25) per axis at every reset"
        )
        return Protocol(make_env, "maze2d", description, _moving_goal_ref_scores(name))
    if goal != "fixed":
        raise ConfigError(
            f"evaluation.goal={goal!r} applies to the generated mazes only; {dataset_id} is "
            f"evaluated on the eval env it records: leave evaluation.goal=fixed"
        )
    minari_dataset = load_dataset(dataset_id)
    family = "antmaze" if "antmaze" in dataset_id else "kitchen" if "kitchen" in dataset_id else ""
    family = family or ("maze2d" if "pointmaze" in dataset_id else "other")
    make_env = partial(minari_dataset.recover_environment, eval_env=True)
    return Protocol(make_env, family, f"the eval env recorded in {dataset_id}", stored_ref)


@lru_cache(maxsize=8)
def _moving_goal_ref_scores(name: str) -> tuple[float, float]:
    return pointmaze.reference_scores(name, goal="moving")


@dataclass
class Trajectories:
    """``positions (E, T, 2)`` (NaN after an episode ends), ``success (E,)``, ``returns (E,)``,
    ``lengths (E,)``; T is the env's step limit."""

    positions: np.ndarray
    success: np.ndarray
    returns: np.ndarray
    lengths: np.ndarray


def _positions(obs, states: np.ndarray) -> np.ndarray:
    # Maze envs report the agent's xy as achieved_goal; otherwise the state's first two dims.
    if isinstance(obs, Mapping) and "achieved_goal" in obs:
        goal = np.asarray(obs["achieved_goal"])
        if goal.ndim == 2 and goal.shape[1] >= 2:
            return goal[:, :2]
    return states[:, :2]


def evaluate(
    policy,
    env_fn: Callable[[], gym.Env],
    obs_keys: Sequence[str] = ("observation",),
    episodes: int = 100,
    num_envs: int = 10,
    seed: int = 0,
    ref_scores: tuple[float | None, float | None] = (None, None),
    asynchronous: bool = False,
    max_steps: int | None = None,
) -> tuple[dict[str, float], Trajectories]:
    """Run ``episodes`` seeded episodes (episode i resets with ``seed + i``) in waves of
    ``num_envs`` parallel envs; returns ``eval/…`` metrics and the trajectories.

    Metrics: return mean/std, normalized score 100·(R − R_min)/(R_max − R_min) with the dataset's
    reference scores (mean and std over episodes), success rate (``info["success"]`` at any step),
    episode length, and the official maze2d "first-hit" score (horizon − the first step at which
    the env reports ``success``, or with no success signal the first rewarded step; 0 if never)
    labeled as such, and that score normalized with the same reference scores (the
    figure the paper's maze2d table reports): both beside the return, never instead of it.
    """
    num_envs = max(1, min(num_envs, episodes))
    vector_cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    venv = vector_cls([env_fn] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    try:
        horizon = max_steps or venv.get_attr("spec")[0].max_episode_steps
        tally = _Tally.empty(episodes, horizon)
        for start in range(0, episodes, num_envs):
            ids = np.arange(start, min(start + num_envs, episodes))
            seeds = [seed + start + i for i in range(num_envs)]
            _run_wave(venv, policy, obs_keys, tally, ids, seeds, horizon)
    finally:
        venv.close()
    metrics = _metrics(tally, horizon, episodes, ref_scores)
    return metrics, Trajectories(tally.positions, tally.success, tally.returns, tally.lengths)


@dataclass
class _Tally:
    """Per episode: return, length, success, first-hit step (−1: none) and xy positions."""

    returns: np.ndarray
    lengths: np.ndarray
    success: np.ndarray
    first_hit: np.ndarray
    positions: np.ndarray

    @classmethod
    def empty(cls, episodes: int, horizon: int) -> _Tally:
        return cls(
            returns=np.zeros(episodes),
            lengths=np.zeros(episodes, dtype=np.int64),
            success=np.zeros(episodes, dtype=bool),
            first_hit=np.full(episodes, -1, dtype=np.int64),
            positions=np.full((episodes, horizon, 2), np.nan, dtype=np.float32),
        )


def _run_wave(venv, policy, obs_keys, tally: _Tally, ids, seeds, horizon: int) -> None:
    """Episodes ``ids`` in parallel, one per env (spare envs run masked out)."""
    n, num_envs = len(ids), venv.num_envs
    low, high = venv.single_action_space.low, venv.single_action_space.high
    obs, _ = venv.reset(seed=seeds)
    policy.reset(num_envs)
    active = np.arange(num_envs) < n
    for t in range(horizon):
        states = observation_vector(obs, obs_keys, "evaluation env")
        live = active[:n]
        tally.positions[ids[live], t] = _positions(obs, states)[:n][live]
        actions = np.clip(policy.act(states), low, high)
        obs, reward, terminated, truncated, info = venv.step(actions)
        reward = np.asarray(reward, dtype=np.float64)
        tally.returns[ids] += np.where(active, reward, 0.0)[:n]
        if "success" in info:
            reached = np.asarray(info["success"], dtype=bool)[:n]
            tally.success[ids] |= active[:n] & reached
        else:
            # Without a success signal a reward marks the goal: sparse rewards only.
            reached = reward[:n] > 0
        hit = active[:n] & reached & (tally.first_hit[ids] < 0)
        tally.first_hit[ids[hit]] = t
        ended = np.asarray(terminated) | np.asarray(truncated)
        done = active & ended
        tally.lengths[ids[done[:n]]] = t + 1
        active &= ~done
        if not active.any():
            break
        if ended.any():
            # Finished envs idle in a fresh episode until the wave ends; their steps are
            # masked out (autoreset is off so that every episode has its own seed).
            obs, _ = venv.reset(options={"reset_mask": ended})
    tally.lengths[ids[active[:n]]] = horizon


def _metrics(tally: _Tally, horizon: int, episodes: int, ref_scores) -> dict[str, float]:
    first_hit, returns = tally.first_hit, tally.returns
    metrics = {
        "eval/return_mean": float(returns.mean()),
        "eval/return_std": float(returns.std()),
        "eval/success_rate": float(tally.success.mean()),
        "eval/episode_length": float(tally.lengths.mean()),
        "eval/first_hit_score": float(np.where(first_hit >= 0, horizon - first_hit, 0).mean()),
        "eval/episodes": float(episodes),
    }
    r_min, r_max = ref_scores
    if r_min is not None and r_max is not None and r_max > r_min:
        normalized = 100.0 * (returns - r_min) / (r_max - r_min)
        metrics["eval/normalized_score"] = float(normalized.mean())
        metrics["eval/normalized_score_std"] = float(normalized.std())
        # The official code normalizes its first-hit score with the same reference scores; the
        # paper's maze2d numbers are this figure, which credits every step after the first hit.
        first_hit_score = metrics["eval/first_hit_score"]
        metrics["eval/first_hit_normalized"] = 100.0 * (first_hit_score - r_min) / (r_max - r_min)
    return metrics
