"""Layer stacks more than one network uses."""

from __future__ import annotations

from torch import nn


def mlp2(in_dim: int, width: int) -> nn.Sequential:
    """Lin(in, w)-LN-GELU-Lin(w, w)-LN-GELU: the official Q network's branches and the
    denoiser's time and state embeddings."""
    return nn.Sequential(
        nn.Linear(in_dim, width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.LayerNorm(width),
        nn.GELU(),
    )
