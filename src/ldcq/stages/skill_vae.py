"""Stage 1: the skill β-VAE (reference §1.2, with our decisions 1 and 4)."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ldcq.data.normalizer import Normalizer
from ldcq.errors import ConfigError
from ldcq.models import (
    AutoregressivePolicy,
    GaussianPrior,
    GRUEncoder,
    MLPPolicy,
    StateDecoder,
    gaussian_kl,
    gaussian_nll,
)
from ldcq.stages.common import (
    check_positive,
    fit_normalizer_from_datamodule,
    training_noise,
    validation_noise,
)

LOSS_TERMS = ("loss", "action_nll", "kl", "state_nll")


class SkillVAE(L.LightningModule):
    """q(z | τ) encoder, π(a | s, z) decoder, p(s_{t+H} | s_t, z) state decoder, p(z | s_t) prior.

    Batches: ``states (B, H+1, S)`` raw, ``actions (B, H, A)``. States are normalized inside; the
    statistics are buffers, so they travel with the weights.

    Args:
        state_dim: S, read from the dataset (linked from ``data.state_dim``).
        action_dim: A, read from the dataset.
        horizon: H (linked from ``data.horizon``).
        latent_dim: Z.
        hidden_dim: width of every MLP and of the GRU.
        gru_layers: layers of the bidirectional GRU encoder.
        policy: ``autoregressive`` (one Gaussian head per action dim) or ``mlp``.
        state_decoder: train the state decoder p(s_{t+H} | s_t, z) (needs no gradient to z).
        beta: weight of KL(q(z | τ) || p(z | s_t)).
        lr, weight_decay: Adam settings.
    """

    def __init__(
        self,
        state_dim: int = 0,
        action_dim: int = 0,
        horizon: int = 30,
        latent_dim: int = 16,
        hidden_dim: int = 256,
        gru_layers: int = 4,
        policy: Literal["autoregressive", "mlp"] = "autoregressive",
        state_decoder: bool = True,
        beta: float = 0.05,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(
            "model",
            state_dim=state_dim,
            action_dim=action_dim,
            horizon=horizon,
            latent_dim=latent_dim,
            hidden_dim=hidden_dim,
            gru_layers=gru_layers,
            lr=lr,
        )
        check_positive("model", allow_zero=True, beta=beta, weight_decay=weight_decay)
        policies = {"autoregressive": AutoregressivePolicy, "mlp": MLPPolicy}
        if policy not in policies:
            raise ConfigError(f"model.policy={policy!r}: valid values are {list(policies)}")
        self.save_hyperparameters()
        self.encoder = GRUEncoder(state_dim, action_dim, latent_dim, hidden_dim, gru_layers)
        self.policy = policies[policy](state_dim, action_dim, latent_dim, hidden_dim)
        self.state_decoder = (
            StateDecoder(state_dim, latent_dim, hidden_dim) if state_decoder else None
        )
        self.prior = GaussianPrior(state_dim, latent_dim, hidden_dim)
        self.state_normalizer = Normalizer(state_dim)
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in LOSS_TERMS})

    def on_fit_start(self) -> None:
        fit_normalizer_from_datamodule(self, self.state_normalizer, "state_normalizer")

    def encode(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Raw ``states (B, H+1, S)`` or ``(B, H, S)``, ``actions (B, H, A)`` -> q mean, std (B, Z)."""
        h = self.hparams.horizon
        return self.encoder(self.state_normalizer(states[:, :h]), actions)

    def act(
        self,
        states: Tensor,
        z: Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """π(a | s, z): raw ``states (N, S)``, ``z (N, Z)`` -> actions ``(N, A)``."""
        s = self.state_normalizer(states)
        return self.policy.sample(s, z, deterministic=deterministic, generator=generator)

    def prior_mean(self, states: Tensor) -> Tensor:
        """Mean of the VAE's Gaussian prior p(z | s): raw ``states (N, S)`` -> ``(N, Z)``."""
        return self.prior(self.state_normalizer(states))[0]

    def losses(
        self, states: Tensor, actions: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Reference §1.2 loss: per-step action NLL + β·KL/H (+ state NLL/H).

        ``generator`` draws the reparameterization noise (default: torch's global generator).
        """
        h = self.hparams.horizon
        s = self.state_normalizer(states)
        mean_q, std_q = self.encoder(s[:, :h], actions)
        noise = torch.randn(
            std_q.shape, generator=generator, device=std_q.device, dtype=std_q.dtype
        )
        z = mean_q + std_q * noise
        z_steps = z[:, None, :].expand(-1, h, -1)
        mean_a, std_a = self.policy(s[:, :h], z_steps, actions)
        action_nll = gaussian_nll(actions, mean_a, std_a).sum(-1).mean()
        mean_p, std_p = self.prior(s[:, 0])
        kl = gaussian_kl(mean_q, std_q, mean_p, std_p).sum(-1).mean() / h
        loss = action_nll + self.hparams.beta * kl
        out = {"action_nll": action_nll, "kl": kl}
        if self.state_decoder is not None:
            # z is detached: the state decoder must not shape the skills (reference §1.2).
            mean_s, std_s = self.state_decoder(s[:, 0], z.detach())
            state_nll = gaussian_nll(s[:, h], mean_s, std_s).sum(-1).mean() / h
            loss = loss + state_nll
            out["state_nll"] = state_nll
        out["loss"] = loss
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.losses(batch["states"], batch["actions"], training_noise(self))
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=False)
        return out["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self.losses(batch["states"], batch["actions"], validation_noise(self, batch_idx))
        n = len(batch["states"])
        for k, v in out.items():
            self.val_metrics[k].update(v, weight=n)
            self.log(f"val/{k}", self.val_metrics[k], prog_bar=k == "loss")

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
