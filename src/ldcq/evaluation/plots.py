"""Pictures of a trained agent: rollouts in the maze, the Q landscape, the skill space, training
curves and a video. Each function writes one file and returns its path.

Figures are drawn on :class:`matplotlib.figure.Figure` (Agg canvas), never through pyplot: no
display is needed and no global figure state is left behind. Positions are xy in the
gymnasium-robotics maze frame: with cells of side c, cell ``(row, col)`` of an H × W map spans
``x ∈ [(col − W/2)·c, (col + 1 − W/2)·c]``, ``y ∈ [(H/2 − row − 1)·c, (H/2 − row)·c]``. The maze
(walls, cell side, goal) is read from the evaluation env itself (:meth:`MazeLayout.from_env`), so
a downloaded maze dataset is drawn as faithfully as a generated one.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter
from torch import Tensor

from ldcq.data.minari_io import EpisodeArrays, observation_vector
from ldcq.data.windows import make_windows
from ldcq.errors import ConfigError
from ldcq.evaluation.rollout import Trajectories

SUCCESS, FAILURE, WALL = "#2ca02c", "#d62728", "#3b3b3b"
DPI = 120
# Log axes labelled 0.25 and 10, not 2.5×10⁻¹ and 10¹.
_PLAIN = FuncFormatter(lambda v, _: f"{v:.3g}")
# States per prior/Q call in the Q map: bounds memory at N·K latents on the large maze.
_CHUNK = 4096
# MP4 writers imageio can use, each needing its own package; the first one installed is used.
_MP4_WRITERS = (
    ("imageio_ffmpeg", {"plugin": "FFMPEG"}),
    ("av", {"plugin": "pyav", "codec": "libx264"}),
)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


@dataclass(frozen=True)
class MazeLayout:
    """A maze as the env builds it: ``walls (H, W)`` bool, the cell side ``scale`` in xy units,
    the goal ``goal_xy (2,)`` the env pays against, and ``template``, the env's observation dict
    right after a reset: a standing agent, moved to other xy for the Q map."""

    walls: np.ndarray
    scale: float
    goal_xy: np.ndarray
    template: Mapping[str, np.ndarray]

    @classmethod
    def from_env(cls, env: gym.Env, seed: int = 0) -> MazeLayout | None:
        """The layout of a gymnasium-robotics maze env (PointMaze, AntMaze), else None."""
        obs, _ = env.reset(seed=seed)
        maze = getattr(env.unwrapped, "maze", None)
        if maze is None or not isinstance(obs, Mapping) or "desired_goal" not in obs:
            return None
        walls = np.array([[cell == 1 for cell in row] for row in maze.maze_map], dtype=bool)
        template = {k: np.asarray(v, dtype=np.float64) for k, v in obs.items()}
        return cls(walls, float(maze.maze_size_scaling), template["desired_goal"].copy(), template)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` in xy."""
        h, w = self.walls.shape
        return (-w / 2 * self.scale, w / 2 * self.scale, -h / 2 * self.scale, h / 2 * self.scale)

    def cell_xy(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """xy ``(N, 2)`` of fractional cell coordinates (``rows, cols`` (N,); +0.5 is a centre)."""
        h, w = self.walls.shape
        return np.stack([(cols - w / 2) * self.scale, (h / 2 - rows) * self.scale], axis=1)

    def states_at(self, xy: np.ndarray, obs_keys: Sequence[str]) -> np.ndarray:
        """The template state moved to each ``xy (N, 2)``, standing: ``(N, S)``.

        ``achieved_goal`` becomes xy, and so does an ``observation`` that begins with the xy
        (PointMaze's), whose velocity is then set to 0.
        """
        n = len(xy)
        obs = {k: np.repeat(v[None], n, axis=0) for k, v in self.template.items()}
        if "achieved_goal" in obs:
            observation = self.template.get("observation")
            if observation is not None and np.allclose(observation[:2], obs["achieved_goal"][0]):
                obs["observation"][:, :2] = xy
                obs["observation"][:, 2:4] = 0.0
            obs["achieved_goal"] = xy.astype(np.float64)
        return observation_vector(obs, obs_keys, "maze layout").astype(np.float32)


def _draw_maze(ax, maze: MazeLayout) -> None:
    """Walls as filled cells (free cells left transparent), the goal as a star."""
    ax.imshow(
        np.where(maze.walls, 1.0, np.nan),
        cmap=ListedColormap([WALL]),
        extent=maze.extent,
        origin="upper",
        interpolation="nearest",
        zorder=2,
    )
    ax.plot(*maze.goal_xy, "*", ms=20, color="gold", mec="black", zorder=6)
    left, right, bottom, top = maze.extent
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")


def plot_rollouts(
    traj: Trajectories, path: str | Path, maze: MazeLayout | None = None, max_episodes: int = 30
) -> Path:
    """The first ``max_episodes`` xy paths, green if the episode succeeded, red if not, each with
    a dot at its start; over the maze's walls and goal when ``maze`` is given."""
    total = len(traj.positions)
    shown = min(total, max_episodes)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    if maze is not None:
        _draw_maze(ax, maze)
    else:
        ax.set_aspect("equal", adjustable="datalim")
    for e in range(shown):
        xy = traj.positions[e]
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) == 0:
            continue
        colour = SUCCESS if traj.success[e] else FAILURE
        ax.plot(xy[:, 0], xy[:, 1], color=colour, lw=1.2, alpha=0.7, zorder=3)
        ax.plot(*xy[0], "o", color=colour, mec="black", ms=5, zorder=4)
    wins = int(np.sum(traj.success[:shown]))
    handles = [
        Line2D([], [], color=SUCCESS, label=f"success ({wins})"),
        Line2D([], [], color=FAILURE, label=f"failure ({shown - wins})"),
        Line2D([], [], ls="none", marker="o", color="grey", mec="black", label="start"),
    ]
    if maze is not None:
        handles.append(
            Line2D([], [], ls="none", marker="*", ms=12, color="gold", mec="black", label="goal")
        )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    rate = float(np.mean(traj.success)) if total else float("nan")
    ax.set_title(f"{shown} of {total} episodes; success rate over all {total}: {rate:.0%}")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return _save(fig, path)


def _grid_states(maze: MazeLayout, resolution: int, obs_keys: Sequence[str]):
    """States on a ``resolution``² grid per free cell: ``(pixels (G, 2) row/col indices into the
    (H·r, W·r) image, states (G, S))``, standing (see :meth:`MazeLayout.states_at`)."""
    h, w = maze.walls.shape
    rows, cols = np.meshgrid(np.arange(h * resolution), np.arange(w * resolution), indexing="ij")
    free = ~maze.walls[rows // resolution, cols // resolution]
    pixels = np.stack([rows[free], cols[free]], axis=1)
    xy = maze.cell_xy((pixels[:, 0] + 0.5) / resolution, (pixels[:, 1] + 0.5) / resolution)
    return pixels, maze.states_at(xy, obs_keys)


def _cell_centres(maze: MazeLayout, obs_keys: Sequence[str]) -> np.ndarray:
    cells = np.argwhere(~maze.walls)
    return maze.states_at(maze.cell_xy(cells[:, 0] + 0.5, cells[:, 1] + 0.5), obs_keys)


@torch.no_grad()
def _best_latents(prior, q, states: np.ndarray, k: int, generator) -> tuple[Tensor, Tensor]:
    """max_k min(Q1, Q2) over K prior samples per state and the argmax latent: ``(N,)``, ``(N, Z)``."""
    values, latents = [], []
    for chunk in torch.as_tensor(states).split(_CHUNK):
        z = prior.sample(chunk, k, generator=generator)
        best, arg = q.score(chunk, z).max(dim=1)
        values.append(best)
        latents.append(z[torch.arange(len(z)), arg])
    return torch.cat(values), torch.cat(latents)


@torch.no_grad()
def plot_q_map(
    vae,
    prior,
    q,
    maze: MazeLayout,
    path: str | Path,
    num_samples: int = 32,
    resolution: int = 4,
    seed: int = 0,
    obs_keys: Sequence[str] = ("observation",),
) -> Path:
    """Heat map of max over K = ``num_samples`` prior latents of min(Q1, Q2) at standing states
    (xy on a grid of ``resolution`` points per cell side), NaN on walls; ``obs_keys`` build the
    state from the env's observation, as in evaluation.

    When ``vae`` (may be None) has a state decoder, a white arrow at each free cell's centre
    points to the s_{t+H} that the decoder predicts for the greedy latent there: where the
    planner's chosen skill heads.
    """
    pixels, grid = _grid_states(maze, resolution, obs_keys)
    centres = _cell_centres(maze, obs_keys)
    generator = torch.Generator().manual_seed(seed)
    values, latents = _best_latents(
        prior, q, np.concatenate([grid, centres]), num_samples, generator
    )
    image = np.full((maze.walls.shape[0] * resolution, maze.walls.shape[1] * resolution), np.nan)
    image[pixels[:, 0], pixels[:, 1]] = values[: len(grid)].numpy()

    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    heat = ax.imshow(
        image, cmap="viridis", extent=maze.extent, origin="upper", interpolation="nearest"
    )
    fig.colorbar(heat, ax=ax, shrink=0.8, label="max over K of min(Q1, Q2)")
    _draw_maze(ax, maze)
    if getattr(vae, "state_decoder", None) is not None:
        _draw_skill_arrows(ax, vae, centres, latents[len(grid) :])
    ax.set_title(f"Q of the best of K={num_samples} prior latents, standing still")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return _save(fig, path)


def _pca(x: np.ndarray, ncomp: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean (Z,), components (Z, 2), explained variance ratio (2,))``; zero-padded if Z < 2."""
    mean = x.mean(axis=0)
    _, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = sing**2
    comps = np.zeros((x.shape[1], ncomp))
    ratio = np.zeros(ncomp)
    n = min(ncomp, len(sing))
    comps[:, :n] = vt[:n].T
    ratio[:n] = var[:n] / max(var.sum(), 1e-12)
    return mean, comps, ratio


@torch.no_grad()
def plot_latents(
    vae,
    prior,
    episodes: EpisodeArrays,
    path: str | Path,
    num_windows: int = 2000,
    seed: int = 0,
) -> Path:
    """The VAE's posterior means of ``num_windows`` random H-step windows in their first two
    principal components, coloured by the direction of motion over the window (angle of
    s_{t+H}.xy − s_t.xy); one diffusion-prior sample at each window's s_t, projected the same
    way, in grey (omitted when ``prior`` is None)."""
    h = vae.hparams.horizon
    windows = make_windows(episodes, h)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(windows), size=min(num_windows, len(windows)), replace=False)
    states = episodes.observations[windows.state_starts[pick, None] + np.arange(h + 1)]
    actions = episodes.actions[windows.action_starts[pick, None] + np.arange(h)]
    states_t = torch.as_tensor(states, dtype=torch.float32)
    means, _ = vae.encode(states_t, torch.as_tensor(actions, dtype=torch.float32))
    means = means.numpy()
    motion = states[:, h, :2] - states[:, 0, :2]
    angle = np.degrees(np.arctan2(motion[:, 1], motion[:, 0]))
    centre, comps, ratio = _pca(means)

    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    if prior is not None:
        generator = torch.Generator().manual_seed(seed)
        samples = prior.sample(states_t[:, 0], 1, generator=generator)[:, 0].numpy()
        projected = (samples - centre) @ comps
        ax.scatter(*projected.T, s=4, c="grey", alpha=0.5, lw=0)
    projected = (means - centre) @ comps
    points = ax.scatter(*projected.T, s=6, c=angle, cmap="twilight", vmin=-180, vmax=180, lw=0)
    bar = fig.colorbar(points, ax=ax, shrink=0.8, ticks=[-180, -90, 0, 90, 180])
    bar.set_label("direction of motion over the window (degrees, 0 = +x)")
    handles = [
        Line2D(
            [], [], ls="none", marker="o", color="black", label="posterior mean (colour: motion)"
        )
    ]
    if prior is not None:
        handles.append(
            Line2D([], [], ls="none", marker="o", color="grey", label="prior sample at s_t")
        )
    ax.legend(handles=handles, loc="best", frameon=False)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.set_title(f"Skill latents of {len(pick)} windows (H={h})")
    return _save(fig, path)


def _smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with a window of about ``span`` points."""
    alpha = 2.0 / (span + 1)
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


# Q-stage curves drawn on their own linear panel: whether they flatten shows if Q-learning converged.
_VALUE_KEYS = ("train/q_mean", "train/target_mean")


def late_change(steps: np.ndarray, values: np.ndarray, tail: float = 0.2) -> float:
    """Relative change of the smoothed ``values`` over the last ``tail`` of the steps:
    (v_end − v_start_of_tail) / |v_end|; about 0 once a curve has flattened."""
    smooth = _smooth(values, max(1, len(values) // 20))
    start = np.searchsorted(steps, steps[0] + (1 - tail) * (steps[-1] - steps[0]))
    end_value = smooth[-1]
    return float((end_value - smooth[min(start, len(smooth) - 1)]) / max(abs(end_value), 1e-12))


def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in history]), np.array([m.value for m in history], np.float64)


def q_mean_late_change(client, run_id: str) -> float | None:
    """:func:`late_change` of the Q stage run's ``train/q_mean`` (None when it logged fewer than
    two points): whether Q-learning was still moving when the stage stopped."""
    steps, values = _history(client, run_id, "train/q_mean")
    return late_change(steps, values) if len(values) > 1 else None


def convergence_verdict(change: float, tolerance: float = 0.02) -> str:
    """Words for a :func:`late_change`: within ``tolerance`` of 0 is flat."""
    if abs(change) <= tolerance:
        return "flat"
    return "still rising" if change > 0 else "falling"


def _draw_curves(ax, client, run_id: str, keys: Sequence[str], log_y: bool) -> None:
    """``train/*`` solid (raw faint, smoothed when longer than 50 points), ``val/*`` dashed, one
    colour per metric name; log-y when ``log_y`` and every value is positive."""
    names = sorted({k.split("/", 1)[1] for k in keys})
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    low, high = np.inf, -np.inf
    for key in keys:
        steps, values = _history(client, run_id, key)
        low, high = min(low, values.min()), max(high, values.max())
        split, name = key.split("/", 1)
        style = {"color": colours[name], "ls": "-" if split == "train" else "--"}
        if split == "train" and len(values) > 50:
            ax.plot(steps, values, color=colours[name], alpha=0.2, lw=0.8)
            values = _smooth(values, len(values) // 20)
        ax.plot(steps, values, **style)
    if log_y and low > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PLAIN)
        # Within one decade there is at most one major tick: label the minor ones too.
        ax.yaxis.set_minor_formatter(_PLAIN if high / low < 10 else NullFormatter())
    handles = [Line2D([], [], color=colours[n], label=n) for n in names]
    handles += [
        Line2D([], [], color="black", ls=ls, label=split)
        for split, ls in (("train", "-"), ("val", "--"))
        if any(k.startswith(f"{split}/") for k in keys)
    ]
    ax.legend(
        handles=handles,
        fontsize=8,
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=3,
    )
    ax.set_xlabel("step")


def curve_panels(client, run_ids: Mapping[str, str], tracking_uri: str = "") -> list[tuple]:
    """``(title, run id, metric keys, log-y)`` of each panel of :func:`plot_training_curves`."""
    from mlflow.exceptions import MlflowException

    panels = []
    for stage, run_id in run_ids.items():
        try:
            keys = sorted(client.get_run(run_id).data.metrics)
        except MlflowException as exc:
            raise ConfigError(
                f"MLflow run {run_id!r} of stage {stage!r} is not in {tracking_uri} "
                f"({exc.message}); pass the run ids of this tracking store"
            ) from exc
        keys = [k for k in keys if k.startswith(("train/", "val/"))]
        values = [k for k in keys if k in _VALUE_KEYS]
        rest = [k for k in keys if k not in _VALUE_KEYS]
        if rest:
            panels.append((stage, run_id, rest, True))
        if values:
            title = f"{stage}: values"
            change = q_mean_late_change(client, run_id) if "train/q_mean" in values else None
            if change is not None:
                verdict = convergence_verdict(change)
                title += f"\nq_mean {change:+.1%} over the last 20 % of steps ({verdict})"
            panels.append((title, run_id, values, False))
    return panels


def plot_training_curves(tracking_uri: str, run_ids: Mapping[str, str], path: str | Path) -> Path:
    """One panel per trained stage, in the order of ``run_ids`` (stage name -> MLflow run id),
    with every ``train/*`` and ``val/*`` metric against the step; a stage without such metrics
    gets no panel. The Q stage's ``q_mean`` and ``target_mean`` get a linear panel of their own,
    titled with q_mean's change over the last 20 % of steps: near 0 once Q-learning converged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    panels = curve_panels(client, run_ids, tracking_uri)
    fig = Figure(figsize=(5 * max(1, len(panels)), 4))
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (title, run_id, keys, log_y) in zip(axes, panels, strict=False):
        _draw_curves(ax, client, run_id, keys, log_y)
        ax.set_title(title)
    if not panels:
        axes[0].text(
            0.5, 0.5, "no train/ or val/ metrics", ha="center", transform=axes[0].transAxes
        )
    fig.tight_layout()
    return _save(fig, path)


def _batched(obs):
    if isinstance(obs, Mapping):
        return {k: _batched(v) for k, v in obs.items()}
    return np.asarray(obs)[None]


def _write_video(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """MP4 when imageio has a writer for it, else an animated GIF; the suffix says which."""
    import imageio.v3 as iio

    for package, kwargs in _MP4_WRITERS:
        if importlib.util.find_spec(package) is None:
            continue
        target = path.with_suffix(".mp4")
        try:
            iio.imwrite(target, np.stack(frames), fps=fps, **kwargs)
            return target
        except Exception as exc:  # a broken codec install: the GIF below still shows the episode
            warnings.warn(
                f"writing {target} with {package} failed ({exc}); writing a GIF instead",
                stacklevel=2,
            )
    target = path.with_suffix(".gif")
    iio.imwrite(target, np.stack(frames), plugin="pillow", duration=1000.0 / fps, loop=0)
    return target


def _look_from_above(env: gym.Env) -> None:
    """Point a gymnasium-robotics maze env's camera straight down at the whole maze; the default
    oblique view hides the agent behind walls. Other envs keep their camera."""
    base = env.unwrapped
    maze = getattr(base, "maze", None)
    agent = getattr(base, "point_env", None) or getattr(base, "ant_env", None)
    renderer = getattr(agent, "mujoco_renderer", None)
    if maze is None or renderer is None:
        return
    span = max(maze.map_length, maze.map_width) * maze.maze_size_scaling
    # MuJoCo's default vertical field of view is 45°; the margin keeps the outer walls' tops in.
    distance = 1.25 * 0.5 * span / math.tan(math.radians(45 / 2))
    renderer.default_cam_config = {
        **(renderer.default_cam_config or {}),
        "lookat": np.zeros(3),
        "distance": distance,
        "elevation": -90.0,
        "azimuth": 90.0,
    }


def _draw_skill_arrows(ax, vae, centres: np.ndarray, latents: torch.Tensor) -> None:
    """An arrow at each state of ``centres`` to the s_{t+H} the VAE's state decoder predicts
    for its latent."""
    s = torch.as_tensor(centres)
    mean, _ = vae.state_decoder(vae.state_normalizer(s), latents)
    shift = (vae.state_normalizer.unnormalize(mean) - s)[:, :2].numpy()
    ax.quiver(
        centres[:, 0],
        centres[:, 1],
        shift[:, 0],
        shift[:, 1],
        angles="xy",
        scale_units="xy",
        scale=1.0,
        color="white",
        edgecolor="black",
        linewidth=0.5,
        width=0.008,
        zorder=5,
    )


def render_video(
    policy,
    make_env: Callable[..., gym.Env],
    path: str | Path,
    seed: int = 0,
    max_steps: int | None = None,
    fps: int = 30,
    every: int = 2,
    obs_keys: Sequence[str] = ("observation",),
    top_down: bool = True,
) -> Path | None:
    """One episode of ``policy`` (``reset(1)``, ``act(states (1, S)) -> (1, A)``) in
    ``make_env(render_mode="rgb_array")``, reset with ``seed``, a frame every ``every`` steps.

    Written as ``path`` with suffix ``.mp4`` when imageio can encode MP4, else ``.gif``; returns
    the file written, or None (with a warning saying why) when the env cannot render here.
    ``top_down`` looks straight down on a maze env. Headless MuJoCo needs ``MUJOCO_GL``; it defaults to ``egl`` unless already set.
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    path = Path(path)
    try:
        env = make_env(render_mode="rgb_array")
    except Exception as exc:
        warnings.warn(
            f"no video: the env cannot be made with render_mode='rgb_array' ({exc})", stacklevel=2
        )
        return None
    try:
        if top_down:
            _look_from_above(env)
        obs, _ = env.reset(seed=seed)
        try:
            frames = [env.render()]
        except Exception as exc:
            warnings.warn(
                f"no video: rendering failed with MUJOCO_GL={os.environ['MUJOCO_GL']} ({exc}); "
                f"set MUJOCO_GL to a backend that works on this machine (egl, osmesa, glfw)",
                stacklevel=2,
            )
            return None
        horizon = max_steps or (env.spec.max_episode_steps if env.spec else None) or 1000
        frames += _episode_frames(env, policy, obs, horizon, every, obs_keys)
    finally:
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_video(frames, path, fps)


def _episode_frames(env, policy, obs, horizon: int, every: int, obs_keys) -> list[np.ndarray]:
    """The frames of one episode from ``obs`` on: one every ``every`` steps, and the last."""
    frames = []
    low, high = env.action_space.low, env.action_space.high
    policy.reset(1)
    for t in range(horizon):
        state = observation_vector(_batched(obs), obs_keys, "video env")
        action = np.clip(policy.act(state)[0], low, high)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        if (t + 1) % every == 0 or done:
            frames.append(env.render())
        if done:
            break
    return frames


def make_pictures(
    out_dir: str | Path,
    *,
    traj: Trajectories | None,
    maze: MazeLayout | None,
    vae,
    prior,
    q,
    episodes: EpisodeArrays | None,
    policy,
    make_env: Callable[..., gym.Env] | None,
    tracking_uri: str | None = None,
    run_ids: Mapping[str, str] | None = None,
    obs_keys: Sequence[str] = ("observation",),
) -> dict[str, Path]:
    """Every picture its inputs allow, in ``out_dir``: name -> file written.

    ``rollouts`` needs ``traj``; ``q_map`` a maze, ``prior`` and ``q``; ``latents`` ``vae`` and
    ``episodes``; ``training_curves`` a tracking URI and run ids; ``video`` a policy, an env and a
    renderer that works here; ``obs_keys`` build the policy's state from the env's observation.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    if traj is not None:
        written["rollouts"] = plot_rollouts(traj, out / "rollouts.png", maze)
    if maze is not None and prior is not None and q is not None:
        written["q_map"] = plot_q_map(vae, prior, q, maze, out / "q_map.png", obs_keys=obs_keys)
    if vae is not None and episodes is not None:
        written["latents"] = plot_latents(vae, prior, episodes, out / "latents.png")
    if tracking_uri and run_ids:
        written["training_curves"] = plot_training_curves(
            tracking_uri, run_ids, out / "training_curves.png"
        )
    if policy is not None and make_env is not None:
        video = render_video(policy, make_env, out / "video", obs_keys=obs_keys)
        if video is not None:
            written["video"] = video
    return written
