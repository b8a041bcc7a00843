"""Skill windows: H actions and the H + 1 states around them, never across an episode boundary.

Windows are index arithmetic over :class:`~ldcq.data.minari_io.EpisodeArrays`; nothing is copied
per window until a batch is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldcq.data.minari_io import EpisodeArrays
from ldcq.errors import DatasetError


@dataclass(frozen=True)
class Windows:
    """``W`` windows. ``action_starts (W,)`` index the first action, ``state_starts (W,)`` the first
    state (``s_t``; the window's states are ``state_starts + 0..H``), ``episode (W,)`` its episode,
    ``rewards (W,)`` the chunk reward Σ_{k<H} γ^k r_{t+k} and ``dones (W,)`` whether the episode
    terminates inside the window (a truncation is not terminal)."""

    action_starts: np.ndarray
    state_starts: np.ndarray
    episode: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    horizon: int

    def __len__(self) -> int:
        return len(self.action_starts)


def window_starts(
    lengths: np.ndarray, horizon: int, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """``(episode (W,), offset (W,))``: every ``t`` with ``t % stride == 0`` and ``t + H <= L_e``."""
    if horizon < 1 or stride < 1:
        raise DatasetError(f"horizon ({horizon}) and stride ({stride}) must both be >= 1")
    per_episode = np.where(lengths >= horizon, (lengths - horizon) // stride + 1, 0)
    total = int(per_episode.sum())
    episode = np.repeat(np.arange(len(lengths)), per_episode)
    # Position of each window within its episode: a global arange minus the episode's first slot.
    first_slot = np.concatenate([[0], np.cumsum(per_episode)[:-1]])
    offset = (np.arange(total) - np.repeat(first_slot, per_episode)) * stride
    return episode, offset


def _discounted_chunk_sums(values: np.ndarray, starts: np.ndarray, horizon: int, gamma: float):
    """Σ_{k<H} γ^k values[start + k] for every start, in blocks to bound memory."""
    weights = gamma ** np.arange(horizon, dtype=np.float64)
    view = np.lib.stride_tricks.sliding_window_view(values.astype(np.float64), horizon)
    out = np.empty(len(starts), dtype=np.float64)
    block = 1 << 16
    for i in range(0, len(starts), block):
        out[i : i + block] = view[starts[i : i + block]] @ weights
    return out


def make_windows(
    episodes: EpisodeArrays,
    horizon: int,
    stride: int = 1,
    gamma: float = 1.0,
    episode_subset: np.ndarray | None = None,
) -> Windows:
    """All windows of ``horizon`` actions, optionally only from the episodes in ``episode_subset``.

    Raises:
        DatasetError: no episode is long enough for one window (all shorter than H + 1 states).
    """
    lengths = episodes.lengths
    if episode_subset is not None:
        keep = np.zeros(len(lengths), dtype=bool)
        keep[episode_subset] = True
        lengths = np.where(keep, lengths, 0)
    episode, offset = window_starts(lengths, horizon, stride)
    if len(episode) == 0:
        raise DatasetError(
            f"dataset {episodes.dataset_id!r} has no episode with at least {horizon + 1} states "
            f"(longest: {int(episodes.lengths.max()) + 1}); lower the skill horizon H "
            f"(model.horizon / data.horizon) below {int(episodes.lengths.max())}"
        )
    action_starts = episodes.episode_starts[episode] + offset
    terminations = np.concatenate([[0], np.cumsum(episodes.terminations, dtype=np.int64)])
    dones = terminations[action_starts + horizon] - terminations[action_starts] > 0
    return Windows(
        action_starts=action_starts,
        state_starts=action_starts + episode,
        episode=episode,
        rewards=_discounted_chunk_sums(episodes.rewards, action_starts, horizon, gamma).astype(
            np.float32
        ),
        dones=dones,
        horizon=horizon,
    )


def split_episodes(
    num_episodes: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of episode indices into ``(train, val)``; overlapping windows never straddle it.

    With a single episode there is nothing to hold out, and ``val`` is empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(num_episodes)
    n_val = round(val_fraction * num_episodes)
    n_val = min(max(n_val, 1), num_episodes - 1) if val_fraction > 0 and num_episodes > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])
