"""Every picture is written, non-empty, from tiny untrained modules; the video where MuJoCo can
render here (EGL, checked on the development machine)."""

from __future__ import annotations

import ctypes.util
import os
import time

import numpy as np
import pytest
import torch

from ldcq.data import pointmaze
from ldcq.data.minari_io import episodes_from_dicts
from ldcq.errors import ConfigError
from ldcq.evaluation import plots
from ldcq.evaluation.policy import LDCQPolicy
from ldcq.evaluation.rollout import Trajectories
from ldcq.stages.diffusion_prior import LatentDiffusionPrior
from ldcq.stages.latent_bcq import LatentBCQ
from ldcq.stages.skill_vae import SkillVAE

S, A, Z, H = 4, 2, 3, 5


def _make_env(**kwargs):
    return pointmaze.make_eval_env("pointmaze-umaze", max_episode_steps=20, **kwargs)


MAZE = plots.MazeLayout.from_env(_make_env())


@pytest.fixture(scope="module")
def modules():
    torch.manual_seed(0)
    vae = SkillVAE(state_dim=S, action_dim=A, horizon=H, latent_dim=Z, hidden_dim=8, gru_layers=1)
    prior = LatentDiffusionPrior(
        state_dim=S, latent_dim=Z, hidden_dims=[8], time_embed_dim=8, state_embed_dim=8
    )
    q = LatentBCQ(state_dim=S, latent_dim=Z, horizon=H, hidden_dim=8, latent_hidden=8)
    return vae.eval(), prior.eval(), q.eval()


@pytest.fixture(scope="module")
def episodes():
    rng = np.random.default_rng(0)
    eps = []
    for length in (12, 20, 3):
        xy = np.cumsum(rng.normal(0, 0.1, (length + 1, 2)), axis=0)
        obs = np.concatenate([xy, rng.normal(size=(length + 1, 2))], axis=1)
        eps.append(
            {
                "observations": {"observation": obs},
                "actions": rng.uniform(-1, 1, (length, A)),
                "rewards": np.zeros(length),
                "terminations": np.zeros(length, dtype=bool),
                "truncations": np.eye(1, length, length - 1, dtype=bool)[0],
            }
        )
    return episodes_from_dicts(eps)


@pytest.fixture
def trajectories() -> Trajectories:
    # Straight paths from the bottom-left cell towards the goal, the second ending early.
    positions = np.full((3, 10, 2), np.nan, dtype=np.float32)
    positions[:, :, 0] = np.linspace(-1.0, 1.0, 10)
    positions[:, :, 1] = -1.0
    positions[1, 6:] = np.nan
    return Trajectories(
        positions=positions,
        success=np.array([True, False, False]),
        returns=np.array([5.0, 0.0, 0.0]),
        lengths=np.array([10, 6, 10]),
    )


def _written(path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def test_rollouts_with_and_without_maze(trajectories, tmp_path):
    assert _written(plots.plot_rollouts(trajectories, tmp_path / "maze.png", MAZE))
    assert _written(plots.plot_rollouts(trajectories, tmp_path / "free.png", max_episodes=2))


def test_the_maze_comes_from_the_env():
    spec = pointmaze.MAZES["umaze"]
    np.testing.assert_array_equal(MAZE.walls, np.array(spec.maze_map) == 1)
    np.testing.assert_array_equal(MAZE.goal_xy, spec.goal_xy)  # the fixed eval goal
    assert MAZE.scale == 1.0 and MAZE.extent == (-2.5, 2.5, -2.5, 2.5)


def test_grid_states_lie_in_free_cells_only():
    pixels, states = plots._grid_states(MAZE, 2, ["observation"])
    # umaze: 7 free cells of 2×2 points; each point maps back to its own free cell.
    assert len(states) == 7 * 4 and states.shape[1] == S
    h, w = MAZE.walls.shape
    cols = np.floor(states[:, 0] + w / 2).astype(int)
    rows = np.floor(h / 2 - states[:, 1]).astype(int)
    assert not MAZE.walls[rows, cols].any()
    np.testing.assert_array_equal(pixels // 2, np.stack([rows, cols], axis=1))
    assert np.all(states[:, 2:] == 0)  # standing still


def test_grid_states_follow_obs_keys_and_the_cell_size():
    _, states = plots._grid_states(MAZE, 1, ["observation", "desired_goal"])
    assert states.shape == (7, S + 2)
    np.testing.assert_array_equal(states[:, 4:], np.repeat(MAZE.goal_xy[None], 7, axis=0))
    # an AntMaze-like layout: cells of side 4, xy only in achieved_goal
    ant = plots.MazeLayout(
        MAZE.walls,
        4.0,
        MAZE.goal_xy * 4,
        {"achieved_goal": np.zeros(2), "observation": np.arange(27.0), "desired_goal": np.ones(2)},
    )
    _, states = plots._grid_states(ant, 1, ["achieved_goal", "observation"])
    assert states.shape == (7, 29) and np.abs(states[:, :2]).max() == 4.0  # 1 cell × 4
    np.testing.assert_array_equal(states[:, 2:], np.repeat(np.arange(27.0)[None], 7, axis=0))


def test_q_map_and_latents(modules, episodes, tmp_path):
    vae, prior, q = modules
    assert _written(plots.plot_q_map(vae, prior, q, MAZE, tmp_path / "q.png", num_samples=4))
    assert _written(plots.plot_q_map(None, prior, q, MAZE, tmp_path / "q0.png", resolution=1))
    path = plots.plot_latents(vae, prior, episodes, tmp_path / "z.png", num_windows=10)
    assert _written(path)
    assert _written(plots.plot_latents(vae, None, episodes, tmp_path / "z0.png"))


def test_training_curves_from_mlflow(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("plots", artifact_location=tmp_path.as_uri())
    now = int(time.time() * 1000)
    # 60 points: long enough to be smoothed; q_mean crosses 0, so that panel stays linear.
    metrics = [Metric("train/loss", 1.0 / (t + 1), now, t) for t in range(60)]
    metrics += [Metric("train/q_mean", t - 30.0, now, t) for t in range(60)]
    metrics += [Metric("val/loss", 0.5, now, 59), Metric("eval/success_rate", 0.5, now, 0)]
    runs = {}
    for stage in ("skill_vae", "latent_bcq", "evaluation"):
        runs[stage] = client.create_run(experiment).info.run_id
        client.log_batch(runs[stage], metrics=metrics if stage != "evaluation" else metrics[-1:])
    assert _written(plots.plot_training_curves(uri, runs, tmp_path / "curves.png"))
    # panels follow the given (pipeline) order; a stage without train/val curves gets none; the
    # Q values have their own linear panel that says whether q_mean still rises
    panels = plots.curve_panels(client, runs)
    assert [title.split(":")[0].split("\n")[0] for title, *_ in panels] == [
        "skill_vae",
        "skill_vae",
        "latent_bcq",
        "latent_bcq",
    ]
    title, _, keys, log_y = panels[-1]
    assert keys == ["train/q_mean"] and not log_y and "(still rising)" in title
    # q_mean rises to the end: the Q panel says so, and the evaluation's number agrees
    assert plots.late_change(np.arange(60), np.arange(60) - 30.0) > 0.1
    assert abs(plots.late_change(np.arange(60), np.full(60, 3.0))) < 1e-9
    change = plots.q_mean_late_change(client, runs["latent_bcq"])
    assert change == plots.late_change(np.arange(60), np.arange(60) - 30.0)
    assert plots.convergence_verdict(change) == "still rising"
    assert (
        plots.convergence_verdict(-0.01) == "flat" and plots.convergence_verdict(-0.5) == "falling"
    )
    # a run without q_mean (the VAE's here has one; the evaluation's none) has no convergence
    assert plots.q_mean_late_change(client, runs["evaluation"]) is None
    with pytest.raises(ConfigError, match="not-a-run"):
        plots.plot_training_curves(uri, {"skill_vae": "not-a-run"}, tmp_path / "bad.png")


@pytest.mark.skipif(
    os.environ.get("MUJOCO_GL", "egl") != "egl" or ctypes.util.find_library("EGL") is None,
    reason="needs MuJoCo's headless EGL renderer (libEGL)",
)
def test_render_video(modules, tmp_path):
    vae, prior, q = modules
    policy = LDCQPolicy(vae, prior, q, num_samples=4)
    path = plots.render_video(policy, _make_env, tmp_path / "video.mp4", every=3)
    # EGL renders headless wherever libEGL is installed; no video there is a regression.
    assert path is not None and _written(path)
    assert path.suffix in (".mp4", ".gif")
    if path.suffix == ".gif":
        import imageio.v3 as iio

        # Reset frame, one every 3 steps, and the last step's frame: 1 + 6 + 1.
        assert len(iio.imread(path, index=None)) == 8


def test_video_skipped_with_a_reason_when_the_env_cannot_render(modules, tmp_path):
    vae, prior, q = modules

    def no_render(**kwargs):
        raise RuntimeError("no OpenGL here")

    policy = LDCQPolicy(vae, prior, q, num_samples=4)
    with pytest.warns(UserWarning, match="no OpenGL here"):
        assert plots.render_video(policy, no_render, tmp_path / "video") is None


def test_make_pictures_skips_what_it_lacks(modules, episodes, trajectories, tmp_path):
    vae, prior, q = modules
    policy = LDCQPolicy(vae, prior, q, num_samples=4)
    written = plots.make_pictures(
        tmp_path,
        traj=trajectories,
        maze=MAZE,
        vae=vae,
        prior=prior,
        q=None,
        episodes=episodes,
        policy=policy,
        make_env=_make_env,
    )
    assert {"rollouts", "latents"} <= set(written) and "q_map" not in written
    assert "training_curves" not in written
    assert all(_written(p) for p in written.values())
