"""Latent Q networks Q(s, z) (reference §1.6).

Glossary: B batch, N states, K latents scored per state, S state dim, Z latent dim.

Scoring K candidate latents of one state is the hot path (Bellman max, planning). The head's first
layer reads cat[f_s, f_z] = W_s·f_s + W_z·f_z + b, so the state branch *and* the state half of
that layer are computed once per state and broadcast over the K latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldcq.models.layers import mlp2

# The official head widths after the concatenation: Lin(·,128)-LN-GELU-Lin(128,32)-LN-GELU-Lin(32,1).
_HEAD_DIMS = (128, 32)


class QNetwork(nn.Module):
    """Q(s, z) with a state branch (S→256→256), a latent branch (Z→128→128) and an MLP head."""

    def __init__(
        self, state_dim: int, latent_dim: int, state_hidden: int = 256, latent_hidden: int = 128
    ) -> None:
        super().__init__()
        self.state_hidden = state_hidden
        self.state_branch = mlp2(state_dim, state_hidden)
        self.latent_branch = mlp2(latent_dim, latent_hidden)
        h1, h2 = _HEAD_DIMS
        self.head_in = nn.Linear(state_hidden + latent_hidden, h1)
        self.head = nn.Sequential(
            nn.LayerNorm(h1),
            nn.GELU(),
            nn.Linear(h1, h2),
            nn.LayerNorm(h2),
            nn.GELU(),
            nn.Linear(h2, 1),
        )

    def state_features(self, states: Tensor) -> Tensor:
        """states (..., S) -> (..., head width): the state's share of the head's first layer."""
        f_s = self.state_branch(states)
        return F.linear(f_s, self.head_in.weight[:, : self.state_hidden], self.head_in.bias)

    def score(self, state_feats: Tensor, latents: Tensor) -> Tensor:
        """state_feats (N, ·) or (N, 1, ·) from `state_features`, latents (N, K, Z) -> (N, K)."""
        if state_feats.dim() == latents.dim() - 1:
            state_feats = state_feats.unsqueeze(-2)
        f_z = self.latent_branch(latents)
        h = state_feats + F.linear(f_z, self.head_in.weight[:, self.state_hidden :])
        return self._value(self.head[:-1](h))

    def forward(self, states: Tensor, latents: Tensor) -> Tensor:
        """states (B, S), latents (B, Z) -> Q values (B,); any matching leading dims work."""
        h = self.state_features(states) + F.linear(
            self.latent_branch(latents), self.head_in.weight[:, self.state_hidden :]
        )
        return self._value(self.head[:-1](h))

    def _value(self, h: Tensor) -> Tensor:
        """The output layer, always in fp32: under bf16 autocast a value near 100 would be
        rounded to steps of 0.5, and the argmax over K candidates would pick among ties."""
        out = self.head[-1]
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), out.weight.float(), out.bias.float()).squeeze(-1)


class TwinQ(nn.Module):
    """Two independent Q networks for clipped double-Q learning."""

    def __init__(
        self, state_dim: int, latent_dim: int, state_hidden: int = 256, latent_hidden: int = 128
    ) -> None:
        super().__init__()
        self.q1 = QNetwork(state_dim, latent_dim, state_hidden, latent_hidden)
        self.q2 = QNetwork(state_dim, latent_dim, state_hidden, latent_hidden)

    def forward(self, states: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """states (B, S), latents (B, Z) -> (q1 (B,), q2 (B,))."""
        return self.q1(states, latents), self.q2(states, latents)

    def score(self, states: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """states (N, S), latents (N, K, Z) -> (q1 (N, K), q2 (N, K)); state branches once per state."""
        return (
            self.q1.score(self.q1.state_features(states), latents),
            self.q2.score(self.q2.state_features(states), latents),
        )

    def score_min(self, states: Tensor, latents: Tensor) -> Tensor:
        """states (N, S), latents (N, K, Z) -> min(Q1, Q2) of shape (N, K)."""
        return torch.minimum(*self.score(states, latents))
