"""Prioritized experience replay over a fixed set of transitions (Schaul et al. 2016; reference §1.6).

Glossary: N transitions, B batch.

The official buffer draws every batch with ``np.random.choice`` over all N priorities (O(N) per
batch, reference §4.2). Here the priorities p^α live in a sum tree and a whole batch descends it
level by level in numpy: O(B log N) per batch with no Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ldcq.errors import ConfigError


class SumTree:
    """A complete binary tree whose leaves hold non-negative values and inner nodes their sums.

    Leaves ``0..capacity-1`` sit at ``leaf_base + i`` of one flat float64 array (the root is node 1);
    padding leaves up to the next power of two stay 0 and can never be drawn.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.depth = max(1, int(np.ceil(np.log2(capacity))))
        self.leaf_base = 1 << self.depth
        self.nodes = np.zeros(2 * self.leaf_base, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def leaves(self, indices: np.ndarray) -> np.ndarray:
        """Leaf values of ``indices (B,)``."""
        return self.nodes[self.leaf_base + np.asarray(indices, dtype=np.int64)]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaves ``indices (B,)`` to ``values (B,)``; for a repeated index the last value wins.

        Ancestors are recomputed from their children (not incremented), so repeated indices and
        rounding can never make an inner node drift from the sum of its leaves.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), indices.shape)
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.capacity:
            raise IndexError(f"replay indices must lie in [0, {self.capacity})")
        # Numpy does not promise which duplicate a fancy assignment keeps: take the last explicitly.
        unique, first_in_reversed = np.unique(indices[::-1], return_index=True)
        self.nodes[self.leaf_base + unique] = values[::-1][first_in_reversed]
        nodes = self.leaf_base + unique
        for _ in range(self.depth):
            nodes = np.unique(nodes >> 1)
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index of each prefix-sum target ``targets (B,)`` in [0, total): one pass per level."""
        u = np.asarray(targets, dtype=np.float64).copy()
        node = np.ones(u.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            left_sum = self.nodes[left]
            # Rounding can leave u just above the left sum with an empty right subtree: stay left.
            go_right = (u >= left_sum) & (self.nodes[left + 1] > 0)
            u = np.where(go_right, u - left_sum, u)
            node = left + go_right
        return node - self.leaf_base


class PrioritizedReplay:
    """Proportional prioritized replay over N fixed transitions.

    Entry i is drawn with probability P(i) = (p_i + eps)^α / Σ_j (p_j + eps)^α and weighted by
    w_i = (N·P(i))^−β / max_batch w; β goes linearly from ``beta_start`` to ``beta_end`` over the
    first ``beta_steps`` calls of :meth:`sample`. New entries get the largest priority seen so far.

    Args:
        capacity: N, the number of transitions.
        alpha: α, how strongly priorities shape sampling (0 = uniform).
        beta_start, beta_end, beta_steps: the importance-sampling exponent's schedule.
        eps: added to every priority, so no transition is starved.
        seed: seed (or seed sequence, e.g. ``(seed, rank)``) of the draws.
    """

    def __init__(
        self,
        capacity: int,
        alpha: float = 0.6,
        beta_start: float = 0.3,
        beta_end: float = 1.0,
        beta_steps: int = 100_000,
        eps: float = 5e-6,
        seed: int | Sequence[int] = 0,
    ) -> None:
        if alpha < 0 or eps < 0:
            raise ConfigError(f"replay alpha ({alpha}) and eps ({eps}) must be >= 0")
        if not (0 <= beta_start <= 1 and 0 <= beta_end <= 1):
            raise ConfigError(
                f"replay beta_start ({beta_start}), beta_end ({beta_end}): need [0, 1]"
            )
        if beta_steps < 1:
            raise ConfigError(f"replay beta_steps must be >= 1, got {beta_steps}")
        self.tree = SumTree(capacity)
        self.alpha, self.eps = alpha, eps
        self.beta_start, self.beta_end, self.beta_steps = beta_start, beta_end, beta_steps
        self.size = 0
        self.calls = 0
        self.max_priority = 1.0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def beta(self) -> float:
        frac = min(1.0, self.calls / self.beta_steps)
        return self.beta_start + frac * (self.beta_end - self.beta_start)

    def add(self, count: int) -> np.ndarray:
        """Append ``count`` entries at the current maximum priority; returns their indices."""
        if self.size + count > self.tree.capacity:
            raise ConfigError(f"replay is full: {self.size} + {count} > {self.tree.capacity}")
        indices = np.arange(self.size, self.size + count)
        self.size += count
        self.tree.set(indices, (self.max_priority + self.eps) ** self.alpha)
        return indices

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set the priorities ``(B,)`` (e.g. squared TD errors, before eps) of ``indices (B,)``.

        A repeated index keeps its last priority.
        """
        priorities = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if not np.isfinite(priorities).all() or (priorities < 0).any():
            raise ValueError("replay priorities must be finite and >= 0")
        if priorities.size:
            self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.set(indices, (priorities + self.eps) ** self.alpha)

    def draw(self, batch_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Draw ``batch_size`` indices i.i.d. ∝ p^α: ``(B,)`` int64; one step of the β schedule.

        ``rng`` (default: the replay's own) lets a caller make the draw a function of its own
        seed, e.g. ``(seed, rank, batch)``.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay")
        self.calls += 1
        rng = self.rng if rng is None else rng
        return self.tree.find(rng.random(batch_size) * self.tree.total)

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`draw` and the draws' :meth:`weights`: ``(indices (B,), is_weights (B,))``."""
        indices = self.draw(batch_size)
        return indices, self.weights(indices)

    def weights(self, indices: np.ndarray) -> np.ndarray:
        """Importance weights (N·P(i))^−β / max over ``indices (B,)`` at the current β: (B,) float32."""
        probs = self.tree.leaves(indices) / self.tree.total
        w = (self.size * probs) ** (-self.beta)
        return (w / w.max()).astype(np.float32)

    def state_dict(self) -> dict:
        """Tensors and numbers only, so it can sit in a Lightning checkpoint."""
        return {
            "nodes": torch.from_numpy(self.tree.nodes.copy()),
            "size": self.size,
            "calls": self.calls,
            "max_priority": self.max_priority,
        }

    def load_state_dict(self, state: dict) -> None:
        nodes = state["nodes"].numpy()
        if nodes.shape != self.tree.nodes.shape:
            raise ConfigError(
                f"the checkpoint's replay holds {nodes.shape[0] // 2} leaves but this one "
                f"{self.tree.leaf_base}: resume with the same data"
            )
        self.tree.nodes[:] = nodes
        self.size, self.calls = int(state["size"]), int(state["calls"])
        self.max_priority = float(state["max_priority"])
