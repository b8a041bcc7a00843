"""Synthetic inputs of the benchmarks: batches of the stages' shapes, replay data with a
memory-mapped bank, and a conditional latent distribution whose true samples score the prior.

Glossary: B batch, N states or transitions, K samples per state, H skill horizon, S state dim,
A action dim, Z latent dim.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Batch = dict[str, Tensor]


class SkillMixture:
    """p(z | s): an equal mixture of ``modes`` Gaussians in Z dims whose means move with the state.

    States are uniform in [−1, 1]^S. Mode m has mean c_m + W_m·tanh(2s), with |c_m| = 3 and
    W_m ~ N(0, 0.5²) per entry, and std ``std`` per dim. The mode centres are about 4 apart, so a
    sampler that blurs or drops modes shows up in the MMD (see :func:`mmd2_rbf`).
    """

    def __init__(
        self, state_dim: int, latent_dim: int, modes: int = 3, std: float = 0.3, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(modes, latent_dim, generator=g)
        self.centres = 3.0 * centres / centres.norm(dim=1, keepdim=True)
        self.slopes = 0.5 * torch.randn(modes, latent_dim, state_dim, generator=g)
        self.state_dim, self.std = state_dim, std

    def states(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n, S)`` uniform in [−1, 1]."""
        return torch.rand(n, self.state_dim, generator=generator) * 2.0 - 1.0

    def sample(self, states: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """``k`` latents from p(z | s) at each of ``states (N, S)``: ``(N, k, Z)``."""
        mode = torch.randint(0, len(self.centres), (states.shape[0], k), generator=generator)
        shift = torch.einsum("nkzs,ns->nkz", self.slopes[mode], torch.tanh(2.0 * states))
        noise = torch.randn(*mode.shape, self.centres.shape[1], generator=generator)
        return self.centres[mode] + shift + self.std * noise


def mmd2_rbf(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """Unbiased MMD² between ``x (N, k, Z)`` and ``y (N, k, Z)``, per state: ``(N,)``.

    Kernel exp(−|a − b|² / (2·bandwidth²)); each row compares the k samples of one state with the k
    references at the same state. The estimate is unbiased, so it scatters around 0 (and can be
    slightly negative) when both sets come from the same distribution.
    """
    x, y = x.float(), y.float()
    k = x.shape[1]

    def gram(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).square() / (2.0 * bandwidth**2))

    def off_diagonal_mean(g: Tensor) -> Tensor:
        return (g.sum((1, 2)) - g.diagonal(dim1=1, dim2=2).sum(1)) / (k * (k - 1))

    return (
        off_diagonal_mean(gram(x, x)) + off_diagonal_mean(gram(y, y)) - 2 * gram(x, y).mean((1, 2))
    )


def skill_batch(batch: int, horizon: int, state_dim: int, action_dim: int, seed: int) -> Batch:
    """A SkillVAE batch: ``states (B, H+1, S)``, ``actions (B, H, A)`` in [−1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(batch, horizon + 1, state_dim, generator=g),
        "actions": torch.rand(batch, horizon, action_dim, generator=g) * 2.0 - 1.0,
    }


def pair_batch(batch: int, state_dim: int, latent_dim: int, seed: int) -> Batch:
    """A LatentDiffusionPrior batch: ``states (B, S)``, ``latents (B, Z)``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(batch, state_dim, generator=g),
        "latents": torch.randn(batch, latent_dim, generator=g),
    }


def transitions(n: int, state_dim: int, latent_dim: int, seed: int) -> dict[str, Tensor]:
    """LatentBCQ transitions: ``states``, ``next_states (N, S)``, ``latents (N, Z)``,
    ``rewards (N,)`` and ``dones (N,)`` (1 % terminal)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(n, state_dim, generator=g),
        "latents": torch.randn(n, latent_dim, generator=g),
        "rewards": torch.rand(n, generator=g),
        "next_states": torch.randn(n, state_dim, generator=g),
        "dones": (torch.rand(n, generator=g) < 0.01).float(),
    }


def write_bank(path: Path, n: int, k: int, latent_dim: int, seed: int) -> np.ndarray:
    """A random ``(N, K, Z)`` float16 bank at ``path``, written in slices; returns its memmap."""
    bank = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, k, latent_dim))
    rng = np.random.default_rng(seed)
    step = max(1, 4_000_000 // (k * latent_dim))
    for i in range(0, n, step):
        rows = min(step, n - i)
        bank[i : i + rows] = rng.standard_normal((rows, k, latent_dim), dtype=np.float32)
    bank.flush()
    del bank
    return np.load(path, mmap_mode="r")


class _Batches(Dataset):
    """Item i is the whole batch ``make_batch(i)``."""

    def __init__(self, make_batch: Callable[[int], Batch], length: int) -> None:
        self.make_batch, self.length = make_batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Batch:
        return self.make_batch(i)


class SyntheticDataModule(L.LightningDataModule):
    """Feeds a stage module without a dataset.

    ``data`` yields whole batches (a ``torch`` Dataset or IterableDataset) or is a function
    ``i -> batch`` served ``length`` times. Keyword attributes (``state_normalizer``,
    ``latent_normalizer``, ``replay``, …) are what the stages read from their DataModule.
    """

    def __init__(
        self, data: Dataset | Callable[[int], Batch], length: int | None = None, **attrs
    ) -> None:
        super().__init__()
        self.data = data if length is None else _Batches(data, length)
        for name, value in attrs.items():
            setattr(self, name, value)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None)
