"""Shared fixtures: every test writes its own tiny datasets under a temporary Minari root."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import pytest
import torch

# Tiny tensors gain nothing from a second thread, and on a 2-core machine shared with another job
# two threads per process slow torch by 5-50x; DDP children set their own thread count.
torch.set_num_threads(1)


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    """A private ``MINARI_DATASETS_PATH`` for the test."""
    root = tmp_path / "minari"
    root.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def write_dataset(
    dataset_id: str,
    episodes: Sequence[dict],
) -> str:
    """Write episodes (dicts of ``observations (L+1, …)``, ``actions (L, A)``, ``rewards (L,)``,
    optional ``terminations``/``truncations``) as a Minari dataset; returns the id."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = []
    for i, ep in enumerate(episodes):
        n = len(ep["actions"])
        terminations = ep.get("terminations", np.zeros(n, dtype=bool))
        truncations = ep.get("truncations", np.eye(1, n, n - 1, dtype=bool)[0] & ~terminations)
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=ep["observations"],
                actions=np.asarray(ep["actions"], dtype=np.float32),
                rewards=np.asarray(ep["rewards"], dtype=np.float64),
                terminations=terminations,
                truncations=truncations,
            )
        )
    first = episodes[0]
    obs = first["observations"]
    if isinstance(obs, dict):
        obs_space = gym.spaces.Dict(
            {
                k: gym.spaces.Box(-np.inf, np.inf, (np.shape(v)[1],), np.float64)
                for k, v in obs.items()
            }
        )
    else:
        obs_space = gym.spaces.Box(-np.inf, np.inf, (np.shape(obs)[1],), np.float64)
    act_space = gym.spaces.Box(-1.0, 1.0, (np.shape(first["actions"])[1],), np.float32)
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        observation_space=obs_space,
        action_space=act_space,
        algorithm_name="test",
        description="tiny dataset written by a test",
    )
    return dataset_id


def random_episode(length: int, state_dim: int = 4, action_dim: int = 2, seed: int = 0) -> dict:
    """One episode of random data with dict observations like PointMaze's."""
    rng = np.random.default_rng(seed)
    return {
        "observations": {
            "observation": rng.normal(size=(length + 1, state_dim)),
            "desired_goal": rng.normal(size=(length + 1, 2)),
        },
        "actions": rng.uniform(-1, 1, size=(length, action_dim)).astype(np.float32),
        "rewards": rng.integers(0, 2, size=length).astype(np.float64),
    }
