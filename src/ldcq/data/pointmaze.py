"""D4RL maze2d-equivalent datasets generated on gymnasium-robotics PointMaze, stored with Minari.

The recipe is D4RL's (reference §5): one continuous stream from a single seeded reset, a waypoint
controller following goals that the env re-draws whenever one is reached, N(0, 0.5²) action noise,
and rewards relabeled to the maze's fixed evaluation goal. The stream is cut into fixed-length
Minari episodes. Reference scores for normalization come from a uniform random policy (min) and
the noise-free controller (max) on the evaluation env.

The evaluation env pays against exactly the goal the rewards were relabeled to, D4RL's maze2d
protocol (:func:`make_eval_env`); ``goal="moving"`` gives gymnasium-robotics' own goal, moved by
U(−0.25, 0.25) per axis at every reset, for agents that observe it (``desired_goal``).

Names, ids and versions are in :mod:`ldcq.data.names` (re-exported here), which imports no
simulator.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import math
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ldcq.data.minari_io import datasets_root
from ldcq.data.names import (
    GENERATED_NAMES,
    NAMESPACE,
    VERSION,
    UnknownDatasetName,
    dataset_id,
    name_for_id,
    outdated_name,
    split_name,
)
from ldcq.data.waypoints import WaypointController, cell_centre
from ldcq.errors import DatasetError
from ldcq.process import say

# gymnasium_robotics prints a notice about Adroit envs to stderr on import; it concerns none of ours.
with contextlib.redirect_stderr(io.StringIO()):
    import gymnasium_robotics
    from gymnasium_robotics.envs.maze import maps

gym.register_envs(gymnasium_robotics)

GOAL_PROTOCOLS = ("fixed", "moving")
ACTION_NOISE_STD = 0.5
# gymnasium-robotics counts a goal reached within this distance (D4RL used 0.5).
SUCCESS_RADIUS = 0.45
_PROGRESS_EVERY = 1000
__all__ = [
    "GENERATED_NAMES",
    "MAZES",
    "NAMESPACE",
    "VERSION",
    "DatasetExists",
    "FixedGoal",
    "MazeSpec",
    "UnknownDatasetName",
    "dataset_id",
    "ensure_dataset",
    "generate_dataset",
    "make_eval_env",
    "name_for_id",
    "outdated_name",
    "parse_name",
    "reference_scores",
    "relabel_rewards",
]


@dataclass(frozen=True)
class MazeSpec:
    """One maze of the maze2d family.

    ``maze_map`` holds rows of 0 (free) and 1 (wall); ``goal_cell`` is D4RL's ``'G'`` cell as
    ``(row, col)``, the same indices in the gymnasium-robotics map. ``horizon`` is the evaluation
    episode length in env steps, ``default_steps`` the D4RL dataset size.
    """

    # Lists do not hash; the other fields identify a maze all the same.
    maze_map: list[list[int]] = field(hash=False)
    goal_cell: tuple[int, int]
    horizon: int
    default_steps: int
    gym_id: str

    @property
    def goal_xy(self) -> np.ndarray:
        """Centre of the goal cell, ``(2,)`` xy in the PointMaze frame: the reward's goal."""
        return cell_centre(self.maze_map, self.goal_cell)


def _copy(maze_map: list[list[int]]) -> list[list[int]]:
    # Our specs must never alias gymnasium-robotics' module-level maps.
    return [list(row) for row in maze_map]


MAZES: dict[str, MazeSpec] = {
    "umaze": MazeSpec(_copy(maps.U_MAZE), (1, 1), 300, 1_000_000, "PointMaze_UMaze-v3"),
    "medium": MazeSpec(_copy(maps.MEDIUM_MAZE), (6, 6), 600, 2_000_000, "PointMaze_Medium-v3"),
    "large": MazeSpec(_copy(maps.LARGE_MAZE), (7, 9), 800, 4_000_000, "PointMaze_Large-v3"),
}


class DatasetExists(DatasetError, FileExistsError):
    """The dataset to generate is already stored and ``overwrite`` was not given."""


def parse_name(name: str) -> tuple[MazeSpec, bool]:
    """The maze of ``name`` and whether its reward is dense."""
    maze, dense = split_name(name)
    return MAZES[maze], dense


class FixedGoal(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Puts a PointMaze env's goal at exactly ``goal_xy`` after every reset.

    gymnasium-robotics moves the goal by U(−0.25, 0.25) per axis at each reset and pays (reward,
    ``info["success"]``) against the moved goal, which an agent that sees only its own state
    cannot know. The dataset's rewards are relabeled to the goal cell's centre, and so are D4RL's
    maze2d evaluations: this wrapper makes the env pay there. The env's random stream is left as
    it is, so the reset positions are those of the unwrapped env for the same seed.
    """

    def __init__(self, env: gym.Env, goal_xy: Sequence[float]) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, goal_xy=[float(v) for v in goal_xy])
        gym.Wrapper.__init__(self, env)
        self.goal_xy = np.asarray(goal_xy, dtype=np.float64)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        maze = self.env.unwrapped
        maze.goal = self.goal_xy.copy()
        maze.update_target_site_pos()
        obs = {**obs, "desired_goal": self.goal_xy.copy()}
        distance = np.linalg.norm(obs["achieved_goal"] - self.goal_xy)
        info = {**info, "success": bool(distance <= SUCCESS_RADIUS)}
        return obs, info


def make_eval_env(name: str, goal: str = "fixed", **kwargs) -> gym.Env:
    """The evaluation env of ``name``; ``kwargs`` go to ``gymnasium.make``.

    Marking the goal cell ``'g'`` makes it the only goal location, while gymnasium-robotics still
    draws resets from every ``0`` cell (all free cells but the goal's); the goal is never re-drawn
    within an episode, and the episode only ends at the horizon. ``goal="fixed"`` (D4RL's maze2d
    protocol) pays against exactly the goal cell's centre, the goal of the dataset's rewards;
    ``"moving"`` keeps gymnasium-robotics' U(−0.25, 0.25) per-axis goal noise at each reset.
    """
    if goal not in GOAL_PROTOCOLS:
        raise DatasetError(f"evaluation.goal={goal!r}: valid values are {list(GOAL_PROTOCOLS)}")
    spec, dense = parse_name(name)
    maze_map: list[list[int | str]] = _copy(spec.maze_map)
    maze_map[spec.goal_cell[0]][spec.goal_cell[1]] = maps.GOAL
    options = {
        "reward_type": "dense" if dense else "sparse",
        "continuing_task": True,
        "reset_target": False,
        "max_episode_steps": spec.horizon,
    }
    env = gym.make(spec.gym_id, maze_map=maze_map, **{**options, **kwargs})
    return FixedGoal(env, spec.goal_xy) if goal == "fixed" else env


def relabel_rewards(achieved_xy: np.ndarray, spec: MazeSpec, dense: bool) -> np.ndarray:
    """Rewards ``(N,)`` for positions ``(N, 2)`` reached after each step, w.r.t. the fixed goal.

    Sparse: 1.0 within ``SUCCESS_RADIUS`` of the goal cell's centre, else 0.0; dense: exp(-distance).
    """
    distance = np.linalg.norm(achieved_xy - spec.goal_xy, axis=-1)
    return np.exp(-distance) if dense else (distance <= SUCCESS_RADIUS).astype(np.float64)


def _uniform_policy(rng: np.random.Generator) -> Callable[[dict], np.ndarray]:
    return lambda _obs: rng.uniform(-1.0, 1.0, 2)


def _controller_policy(controller: WaypointController) -> Callable[[dict], np.ndarray]:
    return lambda obs: controller.act(obs["observation"], obs["desired_goal"])


def _episode_return(env: gym.Env, seed: int, policy: Callable[[dict], np.ndarray]) -> float:
    obs, _ = env.reset(seed=seed)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        if terminated or truncated:
            return total


def reference_scores(
    name: str, episodes: int = 100, seed: int = 0, goal: str = "fixed"
) -> tuple[float, float]:
    """``(R_min, R_max)``: mean returns of a uniform random policy and the noise-free controller.

    Each is averaged over ``episodes`` full-horizon episodes of ``make_eval_env(name, goal)``;
    episode i is reset with seed ``seed + i``, and the same seed drives its random actions or
    waypoint jitter. The controller steers to ``desired_goal``, the goal the env pays against.
    """
    spec, _ = parse_name(name)
    env = make_eval_env(name, goal)
    random_returns, controller_returns = [], []
    try:
        for episode_seed in range(seed, seed + episodes):
            random_policy = _uniform_policy(np.random.default_rng(episode_seed))
            random_returns.append(_episode_return(env, episode_seed, random_policy))
            controller = WaypointController(spec, np.random.default_rng(episode_seed))
            controller_returns.append(
                _episode_return(env, episode_seed, _controller_policy(controller))
            )
    finally:
        env.close()
    return float(np.mean(random_returns)), float(np.mean(controller_returns))


@dataclass(frozen=True)
class _Stream:
    """One continuous trajectory of N steps. ``goals[t]`` is the goal the controller pursued at
    step t (``goals[N]`` the one it would pursue next); ``success[t]`` whether ``observations[t]``
    is within the success radius of the env's goal at that time (the reset's or a step's info)."""

    observations: np.ndarray  # (N+1, 4) x, y, vx, vy
    goals: np.ndarray  # (N+1, 2)
    success: np.ndarray  # (N+1,) bool
    actions: np.ndarray  # (N, 2)


def _generation_env(spec: MazeSpec, dense: bool, steps: int) -> gym.Env:
    # reset_target=True makes the env re-draw its goal (a random free cell plus U(-0.25, 0.25) per
    # axis, from its seeded np_random) each time the point comes within 0.45 of it.
    return gym.make(
        spec.gym_id,
        continuing_task=True,
        reset_target=True,
        reward_type="dense" if dense else "sparse",
        max_episode_steps=steps + 1,
    )


def _collect(spec: MazeSpec, dense: bool, steps: int, seed: int, progress: Progress) -> _Stream:
    env = _generation_env(spec, dense, steps)
    # The unwrapped env skips the per-step wrapper checks; it never ends a continuing task.
    maze_env = env.unwrapped
    noise_rng, jitter_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    )
    controller = WaypointController(spec, jitter_rng)
    observations = np.empty((steps + 1, 4))
    goals = np.empty((steps + 1, 2))
    success = np.empty(steps + 1, dtype=bool)
    actions = np.empty((steps, 2))

    obs, info = maze_env.reset(seed=seed)
    observations[0] = obs["observation"]
    success[0] = info["success"]
    x, y, vx, vy = obs["observation"].tolist()
    task = progress.add_task(spec.gym_id, total=steps)
    try:
        for start in range(0, steps, _PROGRESS_EVERY):
            stop = min(start + _PROGRESS_EVERY, steps)
            noise = noise_rng.normal(0.0, ACTION_NOISE_STD, (stop - start, 2)).tolist()
            for t in range(start, stop):
                goal = maze_env.goal
                goals[t] = goal
                ax, ay = controller.control(x, y, vx, vy, *goal.tolist())
                nx, ny = noise[t - start]
                action = np.array((min(1.0, max(-1.0, ax + nx)), min(1.0, max(-1.0, ay + ny))))
                actions[t] = action
                obs, _, _, _, info = maze_env.step(action)
                point = obs["observation"]
                observations[t + 1] = point
                success[t + 1] = info["success"]
                x, y, vx, vy = point.tolist()
            progress.advance(task, stop - start)
        goals[steps] = maze_env.goal
    finally:
        env.close()
    return _Stream(observations, goals, success, actions)


def _episode_buffers(
    stream: _Stream, rewards: np.ndarray, episode_length: int, seed: int
) -> list[EpisodeBuffer]:
    """Cut the stream every ``episode_length`` steps; neighbours share the boundary observation."""
    steps = len(stream.actions)
    buffers = []
    for k in range(math.ceil(steps / episode_length)):
        start, stop = k * episode_length, min((k + 1) * episode_length, steps)
        truncations = np.zeros(stop - start, dtype=bool)
        truncations[-1] = True
        points = stream.observations[start : stop + 1]
        goals = stream.goals[start : stop + 1]
        buffers.append(
            EpisodeBuffer(
                id=k,
                # Only the first episode starts from a reset; the others continue the stream.
                seed=seed if k == 0 else None,
                observations={
                    "observation": points,
                    "achieved_goal": np.ascontiguousarray(points[:, :2]),
                    "desired_goal": goals,
                },
                actions=stream.actions[start:stop],
                rewards=rewards[start:stop],
                terminations=np.zeros(stop - start, dtype=bool),
                truncations=truncations,
                infos={"goal": goals, "success": stream.success[start : stop + 1]},
            )
        )
    return buffers


def _check_request(steps, episode_length, ref_episodes, id_, path, overwrite: bool) -> None:
    if steps < 1 or episode_length < 1 or ref_episodes < 1:
        raise DatasetError(
            f"steps ({steps}), episode_length ({episode_length}) and ref_episodes ({ref_episodes})"
            " must all be positive"
        )
    if path.exists() and not overwrite:
        raise DatasetExists(
            f"dataset {id_} already exists at {path}; pass --overwrite (overwrite=True) to replace it"
        )


def generate_dataset(
    name: str,
    steps: int | None = None,
    seed: int = 0,
    *,
    episode_length: int | None = None,
    ref_episodes: int = 100,
    progress: bool = True,
    overwrite: bool = False,
) -> str:
    """Generate the dataset ``name`` under ``$MINARI_DATASETS_PATH`` and return its Minari id.

    Args:
        name: one of ``GENERATED_NAMES``.
        steps: env steps in the stream; default the maze's D4RL size (1M / 2M / 4M).
        seed: seeds the env reset, the action noise, the waypoint jitter and the reference scores;
            the same seed gives bit-identical data.
        episode_length: steps per stored episode; default the maze's evaluation horizon. The last
            episode holds the remainder.
        ref_episodes: episodes per reference score (see ``reference_scores``).
        progress: show a progress bar while stepping.
        overwrite: replace a stored dataset of the same id instead of refusing.
    """
    spec, dense = parse_name(name)
    steps = spec.default_steps if steps is None else steps
    episode_length = spec.horizon if episode_length is None else episode_length
    id_ = dataset_id(name)
    path = get_dataset_path(id_)
    _check_request(steps, episode_length, ref_episodes, id_, path, overwrite)

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeRemainingColumn(),
        disable=not progress,
    )
    with bar:
        stream = _collect(spec, dense, steps, seed, bar)
    rewards = relabel_rewards(stream.observations[1:, :2], spec, dense)
    ref_scores = reference_scores(name, ref_episodes, seed)
    buffers = _episode_buffers(stream, rewards, episode_length, seed)

    # Replace an old dataset only once the new one is ready to be written.
    if path.exists():
        shutil.rmtree(path)
    if NAMESPACE not in list_local_namespaces():
        create_namespace(NAMESPACE, description="D4RL maze2d-equivalent datasets made by ldcq.")
    description = _description(name, spec, dense, steps, seed, episode_length)
    _write(id_, buffers, name, spec, dense, steps, ref_scores, ref_episodes, description)
    return id_


def ensure_dataset(name_or_id: str) -> str | None:
    """Generate ``name_or_id`` with its default recipe when it is one of ours and not stored yet;
    return the id it generated, else None. Any other dataset is left to loading, which downloads
    it or says how to get it."""
    name = name_or_id if name_or_id in GENERATED_NAMES else name_for_id(name_or_id)
    if name is None:
        return None
    if (datasets_root() / dataset_id(name) / "data").exists():
        return None
    say(f"dataset {name} is not there yet: generating it (`ldcq data generate {name}`)")
    return generate_dataset(name)


def _write(id_, buffers, name, spec, dense, steps, ref_scores, ref_episodes, description) -> None:
    """The episodes as a local Minari dataset, with its generation and evaluation envs."""
    generation_env = _generation_env(spec, dense, steps)
    eval_env = make_eval_env(name)
    try:
        with warnings.catch_warnings():
            # A dataset generated locally has no versioned code link or contact address to record.
            warnings.filterwarnings("ignore", message=r"`(code_permalink|author_email)` is set")
            minari.create_dataset_from_buffers(
                id_,
                buffers,
                env=generation_env,
                eval_env=eval_env.spec,
                algorithm_name="QIteration waypoint controller + N(0, 0.5^2) action noise",
                author="ldcq",
                ref_min_score=ref_scores[0],
                ref_max_score=ref_scores[1],
                num_episodes_average_score=ref_episodes,
                description=description,
                requirements=[
                    f"gymnasium-robotics=={importlib.metadata.version('gymnasium-robotics')}",
                    f"mujoco=={importlib.metadata.version('mujoco')}",
                ],
            )
    finally:
        generation_env.close()
        eval_env.close()


def _description(
    name: str, spec: MazeSpec, dense: bool, steps: int, seed: int, episode_length: int
) -> str:
    reward = "exp(-distance)" if dense else f"1 within {SUCCESS_RADIUS} else 0"
    return (
        f"{name}: D4RL maze2d recipe on {spec.gym_id}. One stream of {steps} steps from a single "
        f"reset (seed {seed}); a Q-iteration waypoint controller with N(0, {ACTION_NOISE_STD}^2) "
        "action noise follows goals re-drawn by the env on success (reset_target=True). Cut into "
        f"episodes of {episode_length} steps (truncated, never terminated; neighbours share the "
        f"boundary observation). Rewards relabeled to the fixed goal cell {spec.goal_cell} "
        f"(centre {spec.goal_xy.tolist()}): {reward}. desired_goal and infos['goal'] hold the "
        "data-collection goal, not the reward's. Reference scores: uniform random policy (min) and "
        "noise-free controller (max) on the evaluation env, whose goal is fixed at the goal cell's "
        "centre (no per-reset goal noise), as in D4RL's maze2d."
    )
