"""Loading, windows, split and the snippet DataModule on hand-made datasets."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import random_episode, write_dataset

from ldcq.data import minari_io
from ldcq.data.batches import EpochOrder
from ldcq.data.datamodules import TrajectorySnippetDataModule
from ldcq.data.minari_io import episodes_from_dicts, read_episodes
from ldcq.data.windows import make_windows, split_episodes
from ldcq.errors import ConfigError, DatasetError


def hand_episodes(lengths, terminal_last=None):
    """Episodes whose state is (episode, step) and whose reward at step t is 10*e + t."""
    eps = []
    for e, n in enumerate(lengths):
        steps = np.arange(n + 1, dtype=np.float32)
        obs = np.stack([np.full(n + 1, e, np.float32), steps], axis=1)
        term = np.zeros(n, dtype=bool)
        if terminal_last and terminal_last[e]:
            term[-1] = True
        eps.append(
            {
                "observations": {"observation": obs},
                "actions": np.stack([steps[:-1], -steps[:-1]], axis=1),
                "rewards": 10.0 * e + steps[:-1],
                "terminations": term,
                "truncations": ~term & (np.arange(n) == n - 1),
            }
        )
    return eps


def test_windows_never_cross_episodes_and_states_are_consecutive():
    arrays = episodes_from_dicts(hand_episodes([5, 2, 7]))
    w = make_windows(arrays, horizon=3, stride=1)
    # 5 -> 3 windows, 2 -> none (needs 4 states), 7 -> 5 windows
    assert len(w) == 8
    states = arrays.observations[w.state_starts[:, None] + np.arange(4)]
    assert (states[:, :, 0] == states[:, :1, 0]).all(), "a window mixes episodes"
    assert (np.diff(states[:, :, 1], axis=1) == 1).all()
    actions = arrays.actions[w.action_starts[:, None] + np.arange(3)]
    np.testing.assert_array_equal(actions[:, :, 0], states[:, :3, 1])


def test_stride_and_episode_subset():
    arrays = episodes_from_dicts(hand_episodes([9, 9]))
    w = make_windows(arrays, horizon=3, stride=2, episode_subset=np.array([1]))
    np.testing.assert_array_equal(w.episode, [1, 1, 1, 1])
    np.testing.assert_array_equal(arrays.observations[w.state_starts, 1], [0, 2, 4, 6])


def test_chunk_rewards_are_discounted_sums_and_done_only_from_terminations():
    arrays = episodes_from_dicts(hand_episodes([4, 4], terminal_last=[True, False]))
    gamma = 0.9
    w = make_windows(arrays, horizon=3, gamma=gamma)
    for start, ep in zip(w.action_starts, w.episode, strict=True):
        t = start - arrays.episode_starts[ep]
        expected = sum(gamma**k * (10 * ep + t + k) for k in range(3))
        assert w.rewards[list(w.action_starts).index(start)] == pytest.approx(expected, rel=1e-6)
    # episode 0 terminates at its last step (only its last window is done); episode 1 is truncated
    np.testing.assert_array_equal(w.dones, [False, True, False, False])


def test_split_is_by_episode_seeded_and_disjoint():
    train, val = split_episodes(50, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val)
    again = split_episodes(50, 0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    assert not np.array_equal(val, split_episodes(50, 0.2, seed=4)[1])


def test_datamodule_split_leaks_nothing(minari_root):
    write_dataset("test/snippets-v0", [random_episode(40, seed=s) for s in range(10)])
    dm = TrajectorySnippetDataModule("test/snippets-v0", horizon=5, batch_size=8, val_fraction=0.3)
    dm.setup("fit")
    assert (dm.state_dim, dm.action_dim) == (4, 2)
    train_eps, val_eps = dm.split()
    episode_of_row = np.repeat(np.arange(10), 41)
    train_rows = dm.train_set.state_starts[:, None] + torch.arange(6)
    val_rows = dm.val_set.state_starts[:, None] + torch.arange(6)
    assert set(episode_of_row[train_rows.numpy()].ravel()) == set(train_eps)
    assert set(episode_of_row[val_rows.numpy()].ravel()) == set(val_eps)
    batch = dm.draw_batch(0, rank=0, world_size=1)
    assert batch["states"].shape == (8, 6, 4) and batch["actions"].shape == (8, 5, 2)
    assert batch["states"].dtype == torch.float32
    # normalizer statistics come from the training episodes only
    train_obs = np.concatenate([dm.episodes.episode(e)["observations"] for e in train_eps])
    np.testing.assert_allclose(dm.state_normalizer.mean.numpy(), train_obs.mean(0), atol=1e-5)


def test_goal_conditioned_obs_keys_concatenate(minari_root):
    write_dataset("test/goals-v0", [random_episode(10, seed=0)])
    arrays = read_episodes("test/goals-v0", obs_keys=("observation", "desired_goal"))
    assert arrays.state_dim == 6


def test_unknown_id_is_a_clear_error(minari_root):
    with pytest.raises(DatasetError, match="not a Minari id"):
        read_episodes("not an id")


def test_missing_generated_dataset_says_how_to_generate(minari_root):
    with pytest.raises(DatasetError, match="ldcq data generate pointmaze-medium"):
        read_episodes("pointmaze-medium")


def test_missing_dataset_without_network_names_both_remedies(minari_root, monkeypatch):
    monkeypatch.setattr(minari_io, "_remote_reachable", lambda timeout=3.0: False)
    with pytest.raises(DatasetError) as info:
        read_episodes("D4RL/antmaze/large-diverse-v1")
    message = str(info.value)
    assert "D4RL/antmaze/large-diverse-v1" in message
    assert "minari download D4RL/antmaze/large-diverse-v1" in message
    assert "ldcq data generate" in message


def test_malformed_dataset_without_actions(minari_root):
    write_dataset("test/broken-v0", [random_episode(6, seed=0), random_episode(6, seed=1)])
    with h5py.File(minari_root / "test/broken-v0/data/main_data.hdf5", "a") as f:
        del f["episode_1/actions"]
    with pytest.raises(DatasetError, match=r"cannot be read|no 'actions'"):
        read_episodes("test/broken-v0")


def test_mismatched_lengths_are_reported():
    ep = random_episode(6)
    ep["rewards"] = ep["rewards"][:-1]
    ep["terminations"] = np.zeros(6, bool)
    ep["truncations"] = np.zeros(6, bool)
    with pytest.raises(DatasetError, match="6 actions but 5 rewards"):
        episodes_from_dicts([ep])


def test_episodes_shorter_than_horizon(minari_root):
    write_dataset("test/short-v0", [random_episode(4, seed=s) for s in range(3)])
    dm = TrajectorySnippetDataModule("test/short-v0", horizon=10, val_fraction=0.0)
    with pytest.raises(DatasetError, match="at least 11 states"):
        dm.setup("fit")


def test_epoch_order_is_a_seeded_permutation_per_epoch_shared_by_ranks():
    order = EpochOrder(num_rows=50, batch_size=8, seed=3)
    assert order.per_epoch(1) == 6 and order.per_epoch(2) == 3
    epoch0 = torch.cat([order.rows(n, 0, 1) for n in range(6)])
    assert len(set(epoch0.tolist())) == 48  # one pass without repeats, 2 rows dropped
    epoch1 = torch.cat([order.rows(n, 0, 1) for n in range(6, 12)])
    assert not torch.equal(epoch0, epoch1)
    # a function of (seed, n) only: the same rows in any order of calls, in another instance
    again = EpochOrder(50, 8, seed=3)
    assert torch.equal(again.rows(7, 0, 1), order.rows(7, 0, 1))
    assert torch.equal(again.rows(2, 0, 1), epoch0[16:24])
    assert not torch.equal(EpochOrder(50, 8, seed=4).rows(0, 0, 1), epoch0[:8])
    # two ranks share the epoch's permutation without overlap
    ranks = [torch.cat([order.rows(n, r, 2) for n in range(3)]) for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert len(torch.cat(ranks)) == 48


def test_epoch_order_refuses_more_ranks_than_rows():
    with pytest.raises(ConfigError, match="cannot be shared by 4 ranks"):
        EpochOrder(3, 8, seed=0).per_epoch(4)
