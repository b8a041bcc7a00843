"""Stage 2: the latent diffusion prior p(z | s) (reference §1.4, decisions 4 and 5)."""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ldcq.data.normalizer import Normalizer
from ldcq.errors import ConfigError
from ldcq.models import SAMPLERS, FiLMDenoiser, NoiseSchedule, sample_prior, x0_loss
from ldcq.models.compiled import CompiledForward
from ldcq.models.denoiser import MLPDenoiser, mlp_width_like
from ldcq.stages.common import (
    check_positive,
    fit_normalizer_from_datamodule,
    training_noise,
    validation_noise,
)

# Latents per denoiser call on a CPU (see LatentDiffusionPrior.sample).
CPU_SAMPLE_ROWS = 4096
# The denoiser architectures: the reference FiLM residual "UNet", and the plain MLP of the same
# parameter count that the architecture ablation compares it with.
DENOISERS = ("film_unet", "mlp")
MLP_DEPTH = 4


class LatentDiffusionPrior(L.LightningModule):
    """x0-predicting DDPM over normalized latents, conditioned on the normalized state.

    Batches: ``states (B, S)`` raw, ``latents (B, Z)`` raw (the VAE's posterior means).
    The EMA copy of the denoiser is what validation, sampling and the artifact use.

    Args:
        state_dim, latent_dim: S and Z, linked from the data (the VAE's spec).
        denoiser: ``film_unet`` (the reference FiLM residual MLP) or ``mlp`` (a plain 4-layer
            MLP over cat[x_t, t_emb, s_emb] as wide as makes its parameter count that of the
            FiLM UNet these widths describe).
        mlp_width: the MLP's width; None chooses it as above (and records it).
        hidden_dims, time_embed_dim, state_embed_dim: the FiLM residual MLP's widths.
        num_steps: T. schedule: ``linear`` (official, β 1e-4→0.02) or ``cosine``.
        snr_gamma: γ of the Min-SNR-γ weighting.
        lr, weight_decay: Adam settings. ema_decay: per-step EMA decay of the denoiser weights.
        sampler: ``ddim`` (few-step), ``dpmpp`` (DPM-Solver++(2M), few-step, second order) or
            ``ddpm`` (the reference ancestral sampler over all T steps).
        sampling_steps: DDIM or DPM-Solver++ steps (denoiser calls). extra_steps: extra denoising steps at t = 1.
    """

    def __init__(
        self,
        state_dim: int = 0,
        latent_dim: int = 0,
        hidden_dims: list[int] | None = None,
        denoiser: Literal["film_unet", "mlp"] = "film_unet",
        mlp_width: int | None = None,
        time_embed_dim: int = 256,
        state_embed_dim: int = 256,
        num_steps: int = 100,
        schedule: Literal["linear", "cosine"] = "linear",
        snr_gamma: float = 5.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        sampler: Literal["ddim", "dpmpp", "ddpm"] = "ddim",
        sampling_steps: int = 10,
        extra_steps: int = 0,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims or [128, 32, 16, 8])
        check_positive(
            "model",
            state_dim=state_dim,
            latent_dim=latent_dim,
            num_steps=num_steps,
            snr_gamma=snr_gamma,
            lr=lr,
            sampling_steps=sampling_steps,
        )
        check_positive("model", allow_zero=True, weight_decay=weight_decay, extra_steps=extra_steps)
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay!r}: must be in [0, 1)")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler={sampler!r}: valid samplers are {list(SAMPLERS)}")
        if denoiser not in DENOISERS:
            raise ConfigError(f"model.denoiser={denoiser!r}: valid denoisers are {list(DENOISERS)}")
        self.save_hyperparameters()
        self.hparams.hidden_dims = hidden_dims
        widths = (latent_dim, state_dim, hidden_dims, time_embed_dim, state_embed_dim)
        if denoiser == "mlp":
            # Chosen once and kept in the hyperparameters: a saved MLP loads as it was trained.
            width = mlp_width or mlp_width_like(*widths, depth=MLP_DEPTH)
            self.hparams.mlp_width = width
            self.denoiser = MLPDenoiser(
                latent_dim, state_dim, width, MLP_DEPTH, time_embed_dim, state_embed_dim
            )
        else:
            self.denoiser = FiLMDenoiser(*widths)
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.schedule = NoiseSchedule(num_steps, schedule)
        self.state_normalizer = Normalizer(state_dim)
        self.latent_normalizer = Normalizer(latent_dim)
        self.val_loss = MeanMetric()

    def on_fit_start(self) -> None:
        fit_normalizer_from_datamodule(self, self.state_normalizer, "state_normalizer")
        fit_normalizer_from_datamodule(self, self.latent_normalizer, "latent_normalizer")

    def loss(
        self,
        denoiser: nn.Module,
        states: Tensor,
        latents: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The x0 loss at raw ``states (B, S)``, ``latents (B, Z)``; ``generator`` draws t and the
        noise (default: torch's global generator)."""
        return x0_loss(
            denoiser,
            self.latent_normalizer(latents),
            self.state_normalizer(states),
            self.schedule,
            gamma=self.hparams.snr_gamma,
            generator=generator,
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self.denoiser, batch["states"], batch["latents"], training_noise(self))
        self.log("train/loss", loss)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: that hook runs after the checkpoint callbacks, so a
        # checkpoint would hold an EMA one update behind its weights.
        step = self.global_step + 1  # this update's number: global_step counts it only after
        decay = self.hparams.ema_decay
        # Warm-up: early on the EMA follows the weights closely instead of averaging random init.
        decay = min(decay, (1 + step) / (10 + step))
        with torch.no_grad():
            ema = list(self.ema_denoiser.parameters())
            torch._foreach_lerp_(ema, [p.detach() for p in self.denoiser.parameters()], 1.0 - decay)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        noise = validation_noise(self, batch_idx)
        loss = self.loss(self.ema_denoiser, batch["states"], batch["latents"], noise)
        self.val_loss.update(loss, weight=len(batch["states"]))
        self.log("val/loss", self.val_loss, prog_bar=True)

    @torch.no_grad()
    def sample(
        self,
        states: Tensor,
        num_samples: int,
        sampler: str | None = None,
        sampling_steps: int | None = None,
        extra_steps: int | None = None,
        generator: torch.Generator | None = None,
        denoiser: nn.Module | CompiledForward | None = None,
    ) -> Tensor:
        """K = ``num_samples`` latents per raw state with the EMA denoiser: (N, S) -> (N, K, Z) raw.

        Sampler settings default to the configured ones. On a CPU the states go through in chunks
        of about ``CPU_SAMPLE_ROWS`` latents: the denoiser's activations then stay in cache, which
        doubles the latents/s of a 20,000-row call (make bench). ``denoiser`` replaces the EMA
        denoiser as the samplers call it: a caller's :class:`CompiledForward` of it, which keeps
        its compilation across calls (see :meth:`compiled_denoiser`).
        """
        hp = self.hparams
        normalized = self.state_normalizer(states)
        chunks = (normalized,)
        if normalized.device.type == "cpu" and len(normalized):
            chunks = normalized.split(max(1, CPU_SAMPLE_ROWS // num_samples))
        z = torch.cat(
            [
                sample_prior(
                    self.ema_denoiser if denoiser is None else denoiser,
                    self.schedule,
                    chunk,
                    num_samples,
                    sampler=sampler or hp.sampler,
                    num_inference_steps=sampling_steps or hp.sampling_steps,
                    extra_steps=hp.extra_steps if extra_steps is None else extra_steps,
                    generator=generator,
                )
                for chunk in chunks
            ]
        )
        return self.latent_normalizer.unnormalize(z)

    def compiled_denoiser(self, option: str) -> CompiledForward:
        """The EMA denoiser with its forward through ``torch.compile`` (eager after one warning
        naming ``option`` where compiling fails), for :meth:`sample`'s ``denoiser``."""
        return CompiledForward(self.ema_denoiser, option)

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.denoiser.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
