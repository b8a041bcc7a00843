"""Per-dimension standardization whose statistics are buffers, so they travel inside the weights."""

from __future__ import annotations

import torch
from torch import nn


class Normalizer(nn.Module):
    """``(x - mean) / std`` over the last dim ``D``; constant dims keep std 1 so they pass unchanged."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> Normalizer:
        """Set the statistics from samples ``x (N, D)``; returns self."""
        x = x.reshape(-1, self.mean.shape[0]).double()
        std = x.std(dim=0, unbiased=False)
        self.mean.copy_(x.mean(dim=0).to(self.mean))
        self.std.copy_(torch.where(std > self.eps, std, torch.ones_like(std)).to(self.std))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)
