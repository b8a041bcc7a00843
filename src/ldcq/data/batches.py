"""Training batches that a resumed run draws exactly as an uninterrupted run would.

Batch n of a rank is drawn when its training step begins, not when Lightning prefetches it, and
only from ``(seed, rank, n)`` and, for prioritized replay, the priorities written by the steps
before it. A DataModule counts the batches it has drawn and keeps that count in the checkpoint
(Lightning saves ``LightningDataModule.state_dict``), so a stage resumed from ``last.ckpt`` draws
batch n next, the same batch the killed run would have drawn.

Glossary: N rows, B batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ldcq.errors import ConfigError


def derive_seed(*words: int) -> int:
    """A 63-bit seed from non-negative integers, e.g. ``(seed, rank, batch)``."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(device: torch.device | str, *words: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``words``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*words))


class Tick:
    """What the training loader yields: a placeholder the DataModule turns into batch n."""

    __slots__ = ()


class Ticks:
    """``length`` ticks per pass: one nominal epoch.

    A plain iterable, not a ``DataLoader``, so Lightning neither injects a distributed sampler
    nor prefetches real data: the draws follow the ranks and the steps (see the module doc).
    """

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Tick]:
        tick = Tick()
        return (tick for _ in range(self.length))

    # Lightning asks a loader for its state to resume mid-epoch (and warns when it has none). A
    # tick carries nothing: the position lives in the DataModule's ``batches_drawn``.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class StepDrawnBatches(L.LightningDataModule):
    """Base of the DataModules whose training batches are drawn at their step.

    Subclasses implement :meth:`batches_per_epoch` and :meth:`draw_batch`; batch ``n`` must be a
    function of ``(n, rank, world_size)`` and of state that is in :meth:`state_dict`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches_drawn = 0

    def batches_per_epoch(self, world_size: int) -> int:
        raise NotImplementedError

    def draw_batch(self, n: int, rank: int, world_size: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def train_dataloader(self) -> Ticks:
        return Ticks(self.batches_per_epoch(self.trainer.world_size))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, Tick):
            return batch
        trainer = self.trainer
        drawn = self.draw_batch(self.batches_drawn, trainer.global_rank, trainer.world_size)
        self.batches_drawn += 1
        return drawn

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_drawn = int(state_dict.get("batches_drawn", 0))


class EpochOrder:
    """Rows of batch n of a rank: a fresh permutation of the N rows per epoch, cut into batches
    of B per rank, the remainder dropped, as a shuffled ``DataLoader(drop_last=True)`` under a
    ``DistributedSampler``, but a function of ``(seed, epoch, position)`` only.

    Fewer than B rows per rank give one batch per epoch holding every rank's share.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        if num_rows < 1:
            raise ConfigError("no training rows to draw batches from: the split left none")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def per_epoch(self, world_size: int) -> int:
        if self.num_rows < world_size:
            raise ConfigError(
                f"{self.num_rows} training rows cannot be shared by {world_size} ranks: use fewer "
                f"devices or more data"
            )
        return max(1, self.num_rows // (self.batch_size * world_size))

    def rows(self, n: int, rank: int, world_size: int) -> Tensor:
        """Row indices ``(B,)`` long of batch ``n`` of ``rank``."""
        epoch, position = divmod(n, self.per_epoch(world_size))
        if epoch != self._epoch:
            g = seeded_generator("cpu", self.seed, epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_rows, generator=g)
        b = self.batch_size
        if self.num_rows < b * world_size:
            return self._order[rank::world_size]
        start = (position * world_size + rank) * b
        return self._order[start : start + b]
