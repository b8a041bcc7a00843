"""Tiny look-alikes of the downloadable D4RL Minari datasets, recorded from the real envs.

Same dataset id, env spec, observation structure and spaces as the Minari remote's datasets (see
Farama's minari-dataset-generation-scripts), only a few short random-action episodes, written into
the current ``MINARI_DATASETS_PATH``. The stored ``eval_env`` has a short step limit so that a
test's evaluation is quick; the reference scores are set so that the normalized score exists.

Minari's ``DataCollector`` needs jax (not installed here): the episodes are stacked into
``EpisodeBuffer``s directly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import gymnasium as gym
import numpy as np

# The fixed reset (r) / goal (g) cells of the antmaze eval env (large), as in the Minari script.
_ANTMAZE_LARGE_EVAL_MAP = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, "r", 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
    [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
    [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
    [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
    [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
    [1, 0, 0, 1, 0, 0, 0, 1, 0, "g", 0, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
]
# Minari's kitchen datasets: FrankaKitchen-v1 with these target tasks; mixed/partial use 450 steps.
KITCHEN_TASKS = {
    "complete": ["microwave", "kettle", "light switch", "slide cabinet"],
    "partial": ["microwave", "kettle", "light switch", "slide cabinet"],
    "mixed": ["microwave", "kettle", "bottom burner", "light switch"],
}


def _copy(obs):
    # the envs reuse their observation arrays from step to step: keep a copy of each
    if isinstance(obs, Mapping):
        return {k: _copy(v) for k, v in obs.items()}
    return np.array(obs, copy=True)


def _stack(items: Sequence):
    """A list of (nested) dict observations -> a (nested) dict of ``(L, …)`` arrays."""
    if isinstance(items[0], Mapping):
        return {k: _stack([it[k] for it in items]) for k in items[0]}
    return np.stack(items)


def _record(
    env: gym.Env,
    episodes: int,
    steps: int,
    seed: int,
    info_fn=None,
) -> list:
    """``episodes`` seeded random-action episodes of ``steps`` steps, the last one truncated."""
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    buffers = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        observations, infos = [_copy(obs)], []
        if info_fn is not None:
            infos.append(_copy(info_fn(obs, {})))
        actions = rng.uniform(low, high, size=(steps, *low.shape)).astype(env.action_space.dtype)
        rewards = np.zeros(steps, dtype=np.float64)
        terminations = np.zeros(steps, dtype=bool)
        truncations = np.zeros(steps, dtype=bool)
        for t in range(steps):
            obs, reward, terminated, truncated, info = env.step(actions[t])
            observations.append(_copy(obs))
            if info_fn is not None:
                infos.append(_copy(info_fn(obs, info)))
            rewards[t], terminations[t], truncations[t] = reward, terminated, truncated
            if terminated or truncated:
                break
        n = t + 1
        truncations[n - 1] |= not terminations[n - 1]
        buffers.append(
            EpisodeBuffer(
                id=e,
                seed=seed + e,
                observations=_stack(observations),
                actions=actions[:n],
                rewards=rewards[:n],
                terminations=terminations[:n],
                truncations=truncations[:n],
                infos=_stack(infos) if infos else None,
            )
        )
    return buffers


def _antmaze_info(obs, info) -> dict:
    # the fixed info keys of Minari's antmaze datasets: success, qpos (15), qvel (14), goal (2)
    return {
        "success": np.asarray(bool(info.get("success", False))),
        "qpos": np.concatenate([obs["achieved_goal"], obs["observation"][:13]]),
        "qvel": obs["observation"][13:],
        "goal": obs["desired_goal"],
    }


def record_antmaze(
    dataset_id: str = "D4RL/antmaze/large-diverse-v1",
    episodes: int = 3,
    steps: int = 60,
    seed: int = 0,
    eval_steps: int = 50,
) -> str:
    """A look-alike of ``D4RL/antmaze/large-diverse-v1``: ``AntMaze_Large_Diverse_GR-v4``
    (continuing task, fixed target, 1000 steps), dict observations ``observation (27)``,
    ``achieved_goal (2)``, ``desired_goal (2)``, actions (8); the eval env is the same spec with
    the fixed r/g map and ``eval_steps`` steps. Returns the id."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_Large_Diverse_GR-v4", continuing_task=True, reset_target=False)
    try:
        buffers = _record(env, episodes, steps, seed, info_fn=_antmaze_info)
        _write(dataset_id, env, buffers, eval_steps, 1.0, "antmaze", _ANTMAZE_LARGE_EVAL_MAP)
    finally:
        env.close()
    return dataset_id


def _write(dataset_id, env, buffers, eval_steps, ref_max, family, maze_map=None) -> None:
    """Store the buffers with the env's spec and an eval spec cut to ``eval_steps`` steps."""
    import minari

    eval_spec = copy.deepcopy(env.spec)
    eval_spec.max_episode_steps = eval_steps
    if maze_map is not None:
        eval_spec.kwargs["maze_map"] = maze_map
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=env,
        eval_env=eval_spec,
        algorithm_name="random (test look-alike)",
        ref_min_score=0.0,
        ref_max_score=ref_max,
        description=f"tiny look-alike of the D4RL {family} dataset, recorded by a test",
    )


def record_kitchen(
    dataset_id: str = "D4RL/kitchen/mixed-v2",
    episodes: int = 3,
    steps: int = 60,
    seed: int = 0,
    eval_steps: int = 50,
) -> str:
    """A look-alike of ``D4RL/kitchen/<variant>-v2``: ``FrankaKitchen-v1`` with the variant's
    four target tasks (tasks kept when completed, no termination), dict observations
    ``observation (59)`` and nested ``achieved_goal``/``desired_goal`` dicts over the tasks,
    actions (9); the eval env is the same spec with ``eval_steps`` steps. No infos (Kitchen's are
    ragged lists of task names). Returns the id."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    variant = dataset_id.rsplit("/", 1)[-1].split("-")[0]
    env = gym.make(
        "FrankaKitchen-v1",
        remove_task_when_completed=False,
        terminate_on_tasks_completed=False,
        tasks_to_complete=KITCHEN_TASKS.get(variant, KITCHEN_TASKS["mixed"]),
        max_episode_steps=280 if variant == "complete" else 450,
    )
    try:
        buffers = _record(env, episodes, steps, seed)
        _write(dataset_id, env, buffers, eval_steps, 4.0, "kitchen")
    finally:
        env.close()
    return dataset_id
