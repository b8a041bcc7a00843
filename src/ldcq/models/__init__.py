"""Plain `nn.Module`s of LDCQ (no Lightning, no I/O); every constructor takes JSON-friendly args."""

from ldcq.models.denoiser import FiLMDenoiser, FiLMResBlock, StateContext, sinusoidal_embedding
from ldcq.models.diffusion import (
    SAMPLERS,
    SCHEDULES,
    NoiseSchedule,
    ddim_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp,
    sample_prior,
    x0_loss,
)
from ldcq.models.q import QNetwork, TwinQ
from ldcq.models.vae import (
    MIN_STD,
    AutoregressivePolicy,
    GaussianMLP,
    GaussianPrior,
    GRUEncoder,
    MLPPolicy,
    StateDecoder,
    gaussian_kl,
    gaussian_nll,
)

__all__ = [
    "MIN_STD",
    "SAMPLERS",
    "SCHEDULES",
    "AutoregressivePolicy",
    "FiLMDenoiser",
    "FiLMResBlock",
    "GRUEncoder",
    "GaussianMLP",
    "GaussianPrior",
    "MLPPolicy",
    "NoiseSchedule",
    "QNetwork",
    "StateContext",
    "StateDecoder",
    "TwinQ",
    "ddim_timesteps",
    "gaussian_kl",
    "gaussian_nll",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp",
    "sample_prior",
    "sinusoidal_embedding",
    "x0_loss",
]
