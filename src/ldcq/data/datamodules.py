"""LightningDataModules. Batches are gathered from contiguous tensors in one indexing op each."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ldcq.data.batches import EpochOrder, StepDrawnBatches
from ldcq.data.minari_io import EpisodeArrays, canonical_id, datasets_root, read_episodes
from ldcq.data.normalizer import Normalizer
from ldcq.data.windows import Windows, make_windows, split_episodes
from ldcq.errors import ConfigError


@lru_cache(maxsize=4)
def _cached_episodes(dataset_id: str, obs_keys: tuple[str, ...], stamp: tuple) -> EpisodeArrays:
    return read_episodes(dataset_id, obs_keys)


def load_episodes(dataset: str, obs_keys: Sequence[str]) -> EpisodeArrays:
    """:func:`read_episodes`, cached per process so the stages of one pipeline read a dataset once.

    The key includes the dataset folder's path and modification time, so a regenerated dataset
    is read again.
    """
    dataset_id = canonical_id(dataset)
    folder = datasets_root() / dataset_id
    stamp = (str(folder), folder.stat().st_mtime_ns if folder.exists() else None)
    return _cached_episodes(dataset_id, tuple(obs_keys), stamp)


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The datasets below return whole batches from ``__getitems__``; nothing is left to collate."""
    return batch


class SnippetDataset(Dataset):
    """Windows of one split. Item ``i``: ``states (H+1, S)``, ``actions (H, A)`` (raw, not normalized)."""

    def __init__(self, observations: torch.Tensor, actions: torch.Tensor, windows: Windows) -> None:
        self.observations = observations
        self.actions = actions
        self.state_starts = torch.from_numpy(windows.state_starts)
        self.action_starts = torch.from_numpy(windows.action_starts)
        self.steps = torch.arange(windows.horizon + 1)

    def __len__(self) -> int:
        return len(self.state_starts)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        state_idx = self.state_starts[idx, None] + self.steps
        action_idx = self.action_starts[idx, None] + self.steps[:-1]
        return {"states": self.observations[state_idx], "actions": self.actions[action_idx]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}


class TrajectorySnippetDataModule(StepDrawnBatches):
    """Trajectory snippets for the skill VAE: batches of ``states (B, H+1, S)``, ``actions (B, H, A)``.

    Training batches are drawn at their step (:mod:`ldcq.data.batches`): one pass over a fresh
    permutation of the training windows per epoch, seeded by ``(seed, epoch)``.

    Args:
        dataset: a Minari dataset id, or the short name of a dataset this project generates.
        horizon: H, actions per window.
        stride: step between consecutive window starts within an episode.
        batch_size: B.
        val_fraction: share of *episodes* held out for validation (split by episode, seeded).
        seed: seed of the split and of the batch order.
        obs_keys: fields of a dict observation concatenated into the state.
    """

    def __init__(
        self,
        dataset: str = "pointmaze-umaze",
        horizon: int = 30,
        stride: int = 1,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        obs_keys: list[str] | None = None,
    ) -> None:
        super().__init__()
        if horizon < 1:
            raise ConfigError(f"data.horizon must be >= 1, got {horizon}")
        if stride < 1:
            raise ConfigError(f"data.stride must be >= 1, got {stride}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.obs_keys = tuple(obs_keys or ["observation"])
        self._episodes: EpisodeArrays | None = None
        self.train_set: SnippetDataset | None = None
        self.val_set: SnippetDataset | None = None
        self.state_normalizer: Normalizer | None = None
        self.order: EpochOrder | None = None

    @property
    def episodes(self) -> EpisodeArrays:
        if self._episodes is None:
            self._episodes = load_episodes(self.hparams.dataset, self.obs_keys)
        return self._episodes

    @property
    def state_dim(self) -> int:
        return self.episodes.state_dim

    @property
    def action_dim(self) -> int:
        return self.episodes.action_dim

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """``(train, val)`` episode indices."""
        return split_episodes(
            self.episodes.num_episodes, self.hparams.val_fraction, self.hparams.seed
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        episodes = self.episodes
        train_eps, val_eps = self.split()
        h, stride = self.hparams.horizon, self.hparams.stride
        observations = torch.from_numpy(episodes.observations)
        actions = torch.from_numpy(episodes.actions)
        train_windows = make_windows(episodes, h, stride, episode_subset=train_eps)
        self.train_set = SnippetDataset(observations, actions, train_windows)
        self.order = EpochOrder(len(self.train_set), self.hparams.batch_size, self.hparams.seed)
        if len(val_eps):
            val_windows = make_windows(episodes, h, stride, episode_subset=val_eps)
            self.val_set = SnippetDataset(observations, actions, val_windows)
        train_state_rows = np.unique(
            train_windows.state_starts[:, None] + np.arange(h + 1)[None, :]
        )
        self.state_normalizer = Normalizer(episodes.state_dim).fit(observations[train_state_rows])

    def batches_per_epoch(self, world_size: int) -> int:
        return self.order.per_epoch(world_size)

    def draw_batch(self, n: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        return self.train_set.__getitems__(self.order.rows(n, rank, world_size))

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.hparams.batch_size, collate_fn=collate_batch
        )
