"""Skill β-VAE networks (reference §1.2): posterior encoder, low-level policies, state decoder, prior.

Glossary: B batch, H skill horizon, S state dim, A action dim, Z latent dim. Every Gaussian head
returns a mean and a standard deviation (not a log-std) of the same shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to every Softplus std: Softplus can underflow to 0 for very negative inputs, and a zero std
# turns the NLL and the KL into inf/nan. 1e-4 is far below any std the models learn in practice.
MIN_STD = 1e-4

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_nll(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Elementwise negative log-density −log N(x | mean, std²); all inputs broadcast together."""
    return 0.5 * ((x - mean) / std).square() + std.log() + 0.5 * _LOG_2PI


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """Elementwise KL(N(mean_q, std_q²) || N(mean_p, std_p²)); all inputs broadcast together."""
    var_ratio = (std_q / std_p).square()
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p).square() - 1.0 - var_ratio.log())


def _cat_features(*tensors: Tensor) -> Tensor:
    """Concatenate feature vectors whose leading dims broadcast, e.g. z (B, 1, Z) with (B, H, S)."""
    lead = torch.broadcast_shapes(*(x.shape[:-1] for x in tensors))
    return torch.cat([x.expand(*lead, x.shape[-1]) for x in tensors], dim=-1)


class GaussianMLP(nn.Module):
    """The official Gaussian MLP layout shared by the prior, the state decoder and the MLP policy.

    Trunk Lin-ReLU-Lin-ReLU, then a mean head Lin-ReLU-Lin and a std head Lin-ReLU-Lin-Softplus.
    Maps (..., in_dim) to mean (..., out_dim) and std (..., out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.mean_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )
        self.std_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
            nn.Softplus(),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.mean_head(h), self.std_head(h) + MIN_STD


class GRUEncoder(nn.Module):
    """Posterior q(z | s_{0:H}, a_{0:H}) of a skill window.

    States are embedded (S→h→h, ReLU), concatenated with the actions and read by a bidirectional
    GRU. The summary is the final hidden state of each direction of the last layer (h_n): the
    official code took the output at the last time step, whose backward half has seen one step
    only (reference §4.1.9).
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        latent_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 4,
    ) -> None:
        super().__init__()
        self.state_embed = nn.Sequential(
            nn.Linear(state_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.gru = nn.GRU(
            hidden_dim + action_dim,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
        )
        self.mean_head = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim)
        )
        self.std_head = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
            nn.Softplus(),
        )

    def forward(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """states (B, H, S), actions (B, H, A) -> mean (B, Z), std (B, Z).

        Pass the H states that the H actions were taken in (not the bootstrap state s_{t+H}).
        """
        feats = torch.cat([self.state_embed(states), actions], dim=-1)
        _, h_n = self.gru(feats)
        # h_n is (num_layers * 2, B, h), ordered layer by layer, forward direction first.
        summary = torch.cat([h_n[-2], h_n[-1]], dim=-1)
        return self.mean_head(summary), self.std_head(summary) + MIN_STD


class _HeadwiseLinear(nn.Module):
    """`num_heads` independent linear layers evaluated as one batched matmul.

    Weight (heads, out, in). `forward(x (..., heads, in)) -> (..., heads, out)`; with
    `head=i`, `x (..., in) -> (..., out)` through head i only. An optional 0/1 `mask`
    (heads, in) removes inputs from a head: the product with the mask keeps masked weights
    (and their gradients) at zero. `fan_in` is the number of unmasked inputs per head, used for
    the nn.Linear initialisation so every head starts like its standalone counterpart.
    """

    def __init__(
        self, num_heads: int, in_features: int, out_features: int, mask: Tensor | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_heads, out_features))
        if mask is None:
            mask = torch.ones(num_heads, in_features)
        # Derived from the constructor arguments, so it is not stored in the state_dict.
        self.register_buffer("mask", mask[:, None, :].clone(), persistent=False)
        with torch.no_grad():
            fan_in = mask.sum(dim=1)
            for i in range(num_heads):
                bound = 1.0 / math.sqrt(fan_in[i].item())
                self.weight[i].uniform_(-bound, bound)
                self.bias[i].uniform_(-bound, bound)

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask

    def forward_shared(self, x: Tensor) -> Tensor:
        """x (..., in), the same input for every head -> (..., heads, out)."""
        heads, out, _ = self.weight.shape
        y = F.linear(x, self.masked_weight().reshape(heads * out, -1), self.bias.reshape(-1))
        return y.unflatten(-1, (heads, out))

    def forward(self, x: Tensor, head: int | None = None) -> Tensor:
        if head is not None:
            return F.linear(x, self.masked_weight()[head], self.bias[head])
        return torch.einsum("...ki,koi->...ko", x, self.masked_weight()) + self.bias


class AutoregressivePolicy(nn.Module):
    """Low-level policy π(a | s, z) that models action dims one after another (reference §1.2).

    Head i sees cat(s, a[..., :i], z) through Lin-ReLU-Lin-ReLU, then a mean head Lin-ReLU-Lin→1 and
    a std head Lin-ReLU-Lin→1-Softplus. The A heads are stored as stacked weights over the input
    cat(s, a, z) with the action columns ≥ i masked out of head i, so teacher-forced training
    evaluates all heads in one batched matmul per layer.
    """

    def __init__(
        self, state_dim: int, action_dim: int, latent_dim: int, hidden_dim: int = 256
    ) -> None:
        super().__init__()
        self.state_dim = state_dim
        self.action_dim = action_dim
        in_dim = state_dim + action_dim + latent_dim
        mask = torch.ones(action_dim, in_dim)
        for i in range(action_dim):
            mask[i, state_dim + i : state_dim + action_dim] = 0.0
        self.fc1 = _HeadwiseLinear(action_dim, in_dim, hidden_dim, mask)
        self.fc2 = _HeadwiseLinear(action_dim, hidden_dim, hidden_dim)
        self.mean_fc = _HeadwiseLinear(action_dim, hidden_dim, hidden_dim)
        self.mean_out = _HeadwiseLinear(action_dim, hidden_dim, 1)
        self.std_fc = _HeadwiseLinear(action_dim, hidden_dim, hidden_dim)
        self.std_out = _HeadwiseLinear(action_dim, hidden_dim, 1)

    def _heads(self, h1: Tensor, head: int | None = None) -> tuple[Tensor, Tensor]:
        """Everything after the first layer's pre-activation, for all heads or for one."""
        h = F.relu(self.fc2(F.relu(h1), head))
        mean = self.mean_out(F.relu(self.mean_fc(h, head)), head)
        std = F.softplus(self.std_out(F.relu(self.std_fc(h, head)), head)) + MIN_STD
        return mean.squeeze(-1), std.squeeze(-1)

    def forward(self, states: Tensor, z: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced: states (..., S), z (..., Z), actions (..., A) -> mean, std (..., A).

        Leading dims broadcast (z (B, 1, Z) serves a window of states (B, H, S)). Head i reads the
        ground-truth a[..., :i]; a[..., i:] never reaches it.
        """
        x = _cat_features(states, actions, z)
        return self._heads(self.fc1.forward_shared(x))

    def sample(
        self,
        states: Tensor,
        z: Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """states (..., S), z (..., Z) (leading dims broadcast) -> actions (..., A), dim by dim.

        `deterministic` takes each head's mean instead of mean + std·ε (the official policy is
        stochastic at test time).
        """
        a_cols = slice(self.state_dim, self.state_dim + self.action_dim)
        no_actions = states.new_zeros(self.action_dim)
        # The (s, z) part of every head's first layer is computed once; each dim then adds only the
        # contribution of the action dims drawn before it.
        h1_sz = self.fc1.forward_shared(_cat_features(states, no_actions, z))
        weight_a = self.fc1.masked_weight()[:, :, a_cols]
        drawn: list[Tensor] = []
        for i in range(self.action_dim):
            h1 = h1_sz[..., i, :]
            if i > 0:
                h1 = h1 + F.linear(torch.stack(drawn, dim=-1), weight_a[i, :, :i])
            mean, std = self._heads(h1, head=i)
            if not deterministic:
                eps = torch.randn(
                    mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
                )
                mean = mean + std * eps
            drawn.append(mean)
        return torch.stack(drawn, dim=-1)


class MLPPolicy(nn.Module):
    """Plain Gaussian low-level policy π(a | s, z) (the official `'mlp'` decoder option).

    Same interface as `AutoregressivePolicy`; `actions` in `forward` is accepted and ignored.
    """

    def __init__(
        self, state_dim: int, action_dim: int, latent_dim: int, hidden_dim: int = 256
    ) -> None:
        super().__init__()
        self.net = GaussianMLP(state_dim + latent_dim, action_dim, hidden_dim)

    def forward(
        self, states: Tensor, z: Tensor, actions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """states (..., S), z (..., Z) (leading dims broadcast) -> mean (..., A), std (..., A)."""
        return self.net(_cat_features(states, z))

    def sample(
        self,
        states: Tensor,
        z: Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """states (..., S), z (..., Z) -> actions (..., A)."""
        mean, std = self(states, z)
        if deterministic:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * eps


class StateDecoder(nn.Module):
    """Skill dynamics p(s_{t+H} | s_t, z): s_0 (B, S), z (B, Z) -> mean (B, S), std (B, S).

    The official model detaches z so no gradient reaches the encoder; that is the caller's choice
    (the training stage), not this module's.
    """

    def __init__(self, state_dim: int, latent_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = GaussianMLP(state_dim + latent_dim, state_dim, hidden_dim)

    def forward(self, states: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(_cat_features(states, z))


class GaussianPrior(nn.Module):
    """Gaussian skill prior p(z | s_0): s_0 (B, S) -> mean (B, Z), std (B, Z)."""

    def __init__(self, state_dim: int, latent_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = GaussianMLP(state_dim, latent_dim, hidden_dim)

    def forward(self, states: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(states)
