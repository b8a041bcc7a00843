"""FiLM residual-MLP "UNet" that predicts the clean latent x0 (reference §1.4, Network).

Glossary: B batch, N states, K prior samples per state, S state dim, Z latent dim, T diffusion steps.

Most of the network's FLOPs depend only on the conditioning state: the state-embedding MLP, each
block's state projection, and the state half of each block's first linear layer (which reads
cat[x, s_e]). `embed_state` computes all of that once per state; `forward` then only does the
latent path. Rows broadcast: to draw K latents for N states, call `embed_state(states[:, None])`
(context rows (N, 1, ·)) and denoise x of shape (N, K, Z) — nothing is repeated K times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldcq.models.layers import mlp2

StateContext = tuple[Tensor, ...]
"""One tensor (..., d_block) per residual block: the state's contribution to that block's first
linear layer (bias included), as returned by `FiLMDenoiser.embed_state`."""


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer-style sin/cos features of the (integer-valued) timestep: t (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    )
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FiLMResBlock(nn.Module):
    """ResBlock(d) of the official UNet.

    scale, shift = Lin(t_emb); s_e = LN(Lin(s_emb)); h = LN(Lin(2d,d)(cat[x, s_e]));
    h = GELU(h·(1+scale)+shift); h = GELU(LN(Lin(d,d)(h))); return h + x.
    One LayerNorm module is shared within the block, as in the official code.
    """

    def __init__(self, dim: int, time_embed_dim: int, state_embed_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.time_proj = nn.Linear(time_embed_dim, 2 * dim)
        self.state_proj = nn.Linear(state_embed_dim, dim)
        self.fc1 = nn.Linear(2 * dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def state_context(self, state_emb: Tensor) -> Tensor:
        """(..., state_embed_dim) -> (..., d): Lin(2d,d)'s s_e half applied to s_e, plus its bias.

        Lin(2d,d)(cat[x, s_e]) = W_x·x + (W_s·s_e + b), and the bracket depends on the state only.
        """
        s_e = self.norm(self.state_proj(state_emb))
        return F.linear(s_e, self.fc1.weight[:, self.dim :], self.fc1.bias)

    def forward(self, x: Tensor, time_emb: Tensor, context: Tensor) -> Tensor:
        """x (..., d), time_emb and context broadcastable to x's rows -> (..., d)."""
        scale, shift = self.time_proj(time_emb).chunk(2, dim=-1)
        h = self.norm(F.linear(x, self.fc1.weight[:, : self.dim]) + context)
        h = F.gelu(h * (1.0 + scale) + shift)
        h = F.gelu(self.norm(self.fc2(h)))
        return h + x


def _context(denoiser, states: Tensor | None, state_context: StateContext | None) -> StateContext:
    """The state context ``forward`` conditions on: the given one, or ``embed_state(states)``."""
    if (states is None) == (state_context is None):
        raise ValueError(
            f"{type(denoiser).__name__}.forward: pass exactly one of states or state_context."
        )
    return denoiser.embed_state(states) if state_context is None else state_context


def _time_embedding(mlp: nn.Sequential, t: Tensor | float, sinusoidal_dim: int) -> Tensor:
    """t (...,) integer-valued timesteps (any dtype) -> (..., time_embed_dim)."""
    t = torch.as_tensor(t, device=mlp[0].weight.device)
    return mlp(sinusoidal_embedding(t, sinusoidal_dim))


def _down_or_up(in_dim: int, out_dim: int) -> nn.Sequential:
    """GELU(LN(Lin(in, out))), the projection between blocks of different widths."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU())


class FiLMDenoiser(nn.Module):
    """x0-predicting denoiser x̂0(x_t, t, s) with the official layout for hidden_dims (128, 32, 16, 8).

    x0 = Lin(Z,128)(x_t); RB128; down to RB32, RB16, RB8 (each after GELU(LN(Lin)))); up to RB16,
    RB32, RB128 with the down path's outputs added as skips; + x0; RB128; Lin(128, Z).
    `hidden_dims` may be a tuple or a list (it comes back from spec.json as a list).
    """

    def __init__(
        self,
        latent_dim: int,
        state_dim: int,
        hidden_dims: Sequence[int] = (128, 32, 16, 8),
        time_embed_dim: int = 256,
        state_embed_dim: int = 256,
        sinusoidal_dim: int = 128,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in hidden_dims]
        if not dims:
            raise ValueError("FiLMDenoiser: hidden_dims must name at least one width, e.g. [128].")
        if sinusoidal_dim < 4 or sinusoidal_dim % 2:
            raise ValueError(
                f"FiLMDenoiser: sinusoidal_dim must be an even number >= 4, got {sinusoidal_dim}."
            )
        self.sinusoidal_dim = sinusoidal_dim
        self.time_mlp = mlp2(sinusoidal_dim, time_embed_dim)
        self.state_mlp = mlp2(state_dim, state_embed_dim)

        def block(d: int) -> FiLMResBlock:
            return FiLMResBlock(d, time_embed_dim, state_embed_dim)

        self.input_proj = nn.Linear(latent_dim, dims[0])
        self.down_blocks = nn.ModuleList([block(d) for d in dims])
        self.down_projs = nn.ModuleList([_down_or_up(a, b) for a, b in pairwise(dims)])
        up_dims = dims[::-1]
        self.up_projs = nn.ModuleList([_down_or_up(a, b) for a, b in pairwise(up_dims)])
        self.up_blocks = nn.ModuleList([block(d) for d in up_dims[1:]])
        self.final_block = block(dims[0])
        self.output_proj = nn.Linear(dims[0], latent_dim)

    def _blocks(self) -> list[FiLMResBlock]:
        """Every residual block in the order `forward` uses them (the order of a StateContext)."""
        return [*self.down_blocks, *self.up_blocks, self.final_block]

    def embed_state(self, states: Tensor) -> StateContext:
        """states (..., S) -> one context tensor (..., d) per block; compute once per state."""
        state_emb = self.state_mlp(states)
        return tuple(b.state_context(state_emb) for b in self._blocks())

    def embed_time(self, t: Tensor | float) -> Tensor:
        """t (...,) integer-valued timesteps (any dtype) -> (..., time_embed_dim).

        The samplers pass a scalar t, so one embedding serves every row of a step.
        """
        return _time_embedding(self.time_mlp, t, self.sinusoidal_dim)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        states: Tensor | None = None,
        *,
        state_context: StateContext | None = None,
    ) -> Tensor:
        """Predict x0: x (..., Z), t broadcastable to x's rows (e.g. (B,) or a scalar) -> (..., Z).

        Condition on either `states` (rows matching x's) or a precomputed `state_context` from
        `embed_state` whose rows broadcast against x's (e.g. (N, 1, ·) against x (N, K, Z)).
        """
        state_context = _context(self, states, state_context)
        time_emb = self.embed_time(t)
        contexts = iter(state_context)

        x0 = self.input_proj(x)
        h = self.down_blocks[0](x0, time_emb, next(contexts))
        skips = [h]
        for proj, blk in zip(self.down_projs, self.down_blocks[1:], strict=True):
            h = blk(proj(h), time_emb, next(contexts))
            skips.append(h)
        skips.pop()  # The deepest output feeds the up path directly, not as a skip.
        for proj, blk in zip(self.up_projs, self.up_blocks, strict=True):
            h = blk(proj(h) + skips.pop(), time_emb, next(contexts))
        h = self.final_block(h + x0, time_emb, next(contexts))
        return self.output_proj(h)


class MLPDenoiser(nn.Module):
    """A plain MLP x̂0(x_t, t, s), the architecture ablation of the FiLM UNet: the same time and
    state embeddings, then ``depth`` GELU(LN(Lin)) layers of one ``width`` over cat[x_t, t_e, s_e]
    and Lin(width, Z); no FiLM, no skips, no residual blocks.

    Like `FiLMDenoiser`, the state's share of the first layer is computed once per state
    (`embed_state`), so K samples per state cost only the latent path.
    """

    def __init__(
        self,
        latent_dim: int,
        state_dim: int,
        width: int = 256,
        depth: int = 4,
        time_embed_dim: int = 256,
        state_embed_dim: int = 256,
        sinusoidal_dim: int = 128,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"MLPDenoiser: width and depth must be >= 1, got {width}, {depth}.")
        self.sinusoidal_dim = sinusoidal_dim
        self.latent_dim, self.time_embed_dim = latent_dim, time_embed_dim
        self.time_mlp = mlp2(sinusoidal_dim, time_embed_dim)
        self.state_mlp = mlp2(state_dim, state_embed_dim)
        self.input = nn.Linear(latent_dim + time_embed_dim + state_embed_dim, width)
        self.input_norm = nn.LayerNorm(width)
        self.hidden = nn.ModuleList(_down_or_up(width, width) for _ in range(depth - 1))
        self.output_proj = nn.Linear(width, latent_dim)

    def embed_state(self, states: Tensor) -> StateContext:
        """states (..., S) -> (the state's share of the first layer, bias included,)."""
        split = self.latent_dim + self.time_embed_dim
        weight = self.input.weight[:, split:]
        return (F.linear(self.state_mlp(states), weight, self.input.bias),)

    def embed_time(self, t: Tensor | float) -> Tensor:
        """t (...,) integer-valued timesteps -> (..., time_embed_dim)."""
        return _time_embedding(self.time_mlp, t, self.sinusoidal_dim)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        states: Tensor | None = None,
        *,
        state_context: StateContext | None = None,
    ) -> Tensor:
        """Predict x0 as `FiLMDenoiser.forward` does (same arguments, same broadcasting)."""
        state_context = _context(self, states, state_context)
        z, split = self.latent_dim, self.latent_dim + self.time_embed_dim
        t_part = F.linear(self.embed_time(t), self.input.weight[:, z:split])
        h = F.linear(x, self.input.weight[:, :z]) + t_part + state_context[0]
        h = F.gelu(self.input_norm(h))
        for layer in self.hidden:
            h = layer(h)
        return self.output_proj(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mlp_width_like(
    latent_dim: int,
    state_dim: int,
    hidden_dims: Sequence[int],
    time_embed_dim: int,
    state_embed_dim: int,
    depth: int = 4,
) -> int:
    """The width of a ``depth``-layer `MLPDenoiser` whose parameter count is closest to that of
    the `FiLMDenoiser` with these widths: the architecture ablation compares networks of one size."""
    target = count_parameters(
        FiLMDenoiser(latent_dim, state_dim, hidden_dims, time_embed_dim, state_embed_dim)
    )

    def size(width: int) -> int:
        return count_parameters(
            MLPDenoiser(latent_dim, state_dim, width, depth, time_embed_dim, state_embed_dim)
        )

    lo, hi = 1, 4096
    while lo < hi:  # the smallest width whose MLP is at least as large as the UNet
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if size(mid) < target else (lo, mid)
    # That width or the one below it, whichever is closer in size.
    return lo - 1 if lo > 1 and target - size(lo - 1) < size(lo) - target else lo
