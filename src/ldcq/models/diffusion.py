"""Noise schedule, x0-prediction loss and samplers of the latent diffusion prior (reference §1.4).

Glossary: B batch, N states, K prior samples per state, S state dim, Z latent dim, T diffusion steps.

Timesteps are integers t = 0..T. Index 0 means "clean": ᾱ_0 = 1, and ᾱ_t = Π_{s=1..t} (1 − β_s).
The official code's ᾱ carried one extra factor (1 − β_1) (its cumprod started at a padding entry);
with the fix, the DDPM step at t = 1 returns exactly the predicted x0.

Samplers: ``ddpm`` (the official ancestral sampler over all T steps), ``ddim`` (deterministic,
few steps) and ``dpmpp`` (DPM-Solver++(2M), Lu et al. 2022: the same probability-flow ODE as DDIM
solved to second order in log-SNR from the x0 predictions of the last two steps, so fewer steps
reach the same accuracy).

Every sampler embeds each conditioning state once (`FiLMDenoiser.embed_state`) and denoises all K
samples of that state against the broadcast context: the only Python loop is over timesteps.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from ldcq.models.denoiser import FiLMDenoiser, StateContext

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpmpp")


class NoiseSchedule(nn.Module):
    """Variance schedule with buffers `betas`, `alphas`, `alpha_bars` and `one_minus_alpha_bars`
    (1 − ᾱ_t, computed in float64 so it stays accurate near t = 1), each of shape (T + 1,), index = t.

    `linear`: β_t evenly spaced from `beta_start` (t = 1) to `beta_end` (t = T), the official
    schedule. `cosine`: Nichol & Dhariwal (2021), ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2) / ᾱ(0),
    with β_t clipped to 0.999. Index 0 holds β_0 = 0, ᾱ_0 = 1.

    The official linear schedule with T = 100 ends at ᾱ_T ≈ 0.36, not ≈ 0: its β range was made
    for T = 1000. Sampling still starts from N(0, I), as in the official code; `cosine` ends near 0.
    """

    def __init__(
        self,
        num_steps: int = 100,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"NoiseSchedule: num_steps must be >= 1, got {num_steps}.")
        if schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        elif schedule == "cosine":
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2).square()
            betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(
                f"NoiseSchedule: unknown schedule {schedule!r}; valid schedules are {SCHEDULES}."
            )
        self.num_steps = num_steps
        betas = torch.cat([betas.new_zeros(1), betas])
        alphas = 1.0 - betas
        # Derived from the constructor arguments, so they are not stored in the state_dict.
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        alpha_bars = alphas.cumprod(0)
        self.register_buffer("alpha_bars", alpha_bars.float(), persistent=False)
        self.register_buffer("one_minus_alpha_bars", (1.0 - alpha_bars).float(), persistent=False)

    def _at(self, values: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
        """values[t] shaped to broadcast against `like` (t (B,) against (B, ...), or a scalar)."""
        v = values[torch.as_tensor(t, device=values.device).long()]
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim())).to(like.dtype)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), shape of t (inf at t = 0)."""
        return self.alpha_bars[t.long()] / self.one_minus_alpha_bars[t.long()]

    def min_snr_weight(self, t: Tensor, gamma: float = 5.0) -> Tensor:
        """Min-SNR-γ loss weight for x0 prediction, min(SNR_t, γ), shape of t."""
        return self.snr(t).clamp(max=gamma)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε: x0, noise (B, ...), t (B,) -> (B, ...)."""
        alpha_bar = self._at(self.alpha_bars, t, x0)
        return alpha_bar.sqrt() * x0 + self._at(self.one_minus_alpha_bars, t, x0).sqrt() * noise

    def eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """The noise implied by a predicted x0: ε = (x_t − √ᾱ_t·x0) / √(1 − ᾱ_t), for t >= 1."""
        alpha_bar = self._at(self.alpha_bars, t, x_t)
        return (x_t - alpha_bar.sqrt() * x0) / self._at(self.one_minus_alpha_bars, t, x_t).sqrt()

    def ddpm_step(self, x_t: Tensor, t: int, x0: Tensor, noise: Tensor | None) -> Tensor:
        """Official ancestral step t -> t−1 (reference §1.4, Sampling); `noise` None adds none.

        x_{t−1} = (x_t − ε·β_t/√(1 − ᾱ_t)) / √α_t + √β_t·ξ.
        """
        eps = self.eps_from_x0(x_t, t, x0)
        beta, alpha = self.betas[t], self.alphas[t]
        x_prev = (x_t - eps * beta / self.one_minus_alpha_bars[t].sqrt()) / alpha.sqrt()
        if noise is not None:
            x_prev = x_prev + beta.sqrt() * noise
        return x_prev

    def ddim_step(
        self, x_t: Tensor, t: int, t_prev: int, x0: Tensor, eta: float, noise: Tensor | None
    ) -> Tensor:
        """DDIM step t -> t_prev < t (Song et al. 2021, Eq. 12); eta = 0 is deterministic.

        x_{t_prev} = √ᾱ_prev·x0 + √(1 − ᾱ_prev − σ²)·ε + σ·ξ, with
        σ = eta·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev).
        """
        eps = self.eps_from_x0(x_t, t, x0)
        alpha_bar, alpha_bar_prev = self.alpha_bars[t], self.alpha_bars[t_prev]
        noise_var_prev = self.one_minus_alpha_bars[t_prev]
        sigma = (
            eta
            * (noise_var_prev / self.one_minus_alpha_bars[t]).sqrt()
            * (1.0 - alpha_bar / alpha_bar_prev).sqrt()
        )
        x_prev = alpha_bar_prev.sqrt() * x0
        x_prev = x_prev + (noise_var_prev - sigma.square()).clamp(min=0.0).sqrt() * eps
        if noise is not None and eta > 0:
            x_prev = x_prev + sigma * noise
        return x_prev

    def half_log_snr(self, t: int) -> Tensor:
        """λ_t = log(√ᾱ_t / √(1 − ᾱ_t)), the log signal-to-noise ratio over 2, for t >= 1."""
        return 0.5 * (self.alpha_bars[t].log() - self.one_minus_alpha_bars[t].log())

    def dpmpp_step(
        self, x_t: Tensor, t: int, t_prev: int, x0: Tensor, x0_last: Tensor | None, h_last
    ) -> tuple[Tensor, Tensor]:
        """DPM-Solver++(2M) step t -> t_prev (1 <= t_prev < t) from the x0 predictions at t and,
        when given, at the step before (``x0_last``, whose log-SNR step was ``h_last``); returns
        x_{t_prev} and this step's h = λ_prev − λ_t.

        x_prev = (σ_prev/σ_t)·x_t − α_prev·(e^{−h} − 1)·D, with D = x0 (first order) or
        D = (1 + 1/(2r))·x0 − 1/(2r)·x0_last, r = h_last / h (second order).
        """
        h = self.half_log_snr(t_prev) - self.half_log_snr(t)
        d = x0
        if x0_last is not None:
            r = h_last / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_last
        sigma_ratio = (self.one_minus_alpha_bars[t_prev] / self.one_minus_alpha_bars[t]).sqrt()
        alpha_prev = self.alpha_bars[t_prev].sqrt()
        return sigma_ratio * x_t - alpha_prev * torch.expm1(-h) * d, h


def _randn(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """Standard normal noise on `like`'s device and dtype."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def x0_loss(
    denoiser: FiLMDenoiser,
    x0: Tensor,
    states: Tensor,
    schedule: NoiseSchedule,
    gamma: float = 5.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Official prior loss: mean(min(SNR_t, γ)·(x0 − x̂0)²) with t ~ U{1..T}; x0 (B, Z), states (B, S)."""
    batch = x0.shape[0]
    t = torch.randint(1, schedule.num_steps + 1, (batch,), generator=generator, device=x0.device)
    noise = _randn(x0.shape, generator, x0)
    pred = denoiser(schedule.q_sample(x0, t, noise), t, states)
    weight = schedule.min_snr_weight(t, gamma).to(x0.dtype)
    return (weight[:, None] * (x0 - pred).square()).mean()


def _start(
    denoiser: FiLMDenoiser, states: Tensor, num_samples: int, generator: torch.Generator | None
) -> tuple[Tensor, StateContext]:
    """Pure noise x_T (N, K, Z) and the state context with rows (N, 1, ·), computed once.

    x follows the weights' dtype, not the context's: under bf16 autocast the denoiser's outputs are
    bf16, but the iterate x_t is kept in full precision across steps.
    """
    out = denoiser.output_proj
    context = denoiser.embed_state(states[:, None, :])
    x = _randn((states.shape[0], num_samples, out.out_features), generator, out.weight)
    return x, context


def _denoise(
    denoiser: FiLMDenoiser, x: Tensor, t: int, context: StateContext, clip_x0: float | None
) -> Tensor:
    """x̂0 at a scalar step t, optionally clipped to [−clip_x0, clip_x0]."""
    x0 = denoiser(x, torch.tensor(float(t), device=x.device), state_context=context)
    return x0 if clip_x0 is None else x0.clamp(-clip_x0, clip_x0)


@torch.no_grad()
def sample_ddpm(
    denoiser: FiLMDenoiser,
    states: Tensor,
    num_samples: int,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    extra_steps: int = 0,
    clip_x0: float | None = None,
) -> Tensor:
    """Ancestral DDPM with x0 prediction, as the official `sample_extra`: states (N, S) -> (N, K, Z).

    Runs t = T..1 and then `extra_steps` more iterations at t = 1; no noise is added at t = 1.
    """
    x, context = _start(denoiser, states, num_samples, generator)
    timesteps = [*range(schedule.num_steps, 0, -1), *([1] * extra_steps)]
    for t in timesteps:
        x0 = _denoise(denoiser, x, t, context, clip_x0)
        noise = _randn(x.shape, generator, x) if t > 1 else None
        x = schedule.ddpm_step(x, t, x0, noise)
    return x


def ddim_timesteps(num_steps: int, num_inference_steps: int) -> list[int]:
    """Evenly spaced, strictly decreasing timesteps from T down to 1 (at most T of them)."""
    n = max(1, min(num_inference_steps, num_steps))
    if n == 1:
        return [num_steps]
    steps = torch.linspace(num_steps, 1, n, dtype=torch.float64).round().long().tolist()
    return list(dict.fromkeys(steps))


@torch.no_grad()
def sample_ddim(
    denoiser: FiLMDenoiser,
    states: Tensor,
    num_samples: int,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    num_inference_steps: int = 10,
    eta: float = 0.0,
    extra_steps: int = 0,
    clip_x0: float | None = None,
) -> Tensor:
    """Few-step DDIM with x0 prediction: states (N, S) -> (N, K, Z).

    Visits `ddim_timesteps(T, num_inference_steps)` and ends at t = 0. `extra_steps` repeat the
    last step (t = 1 -> 0, i.e. x ← x̂0(x, 1)), the DDIM analogue of the official extra steps.
    """
    x, context = _start(denoiser, states, num_samples, generator)
    timesteps = ddim_timesteps(schedule.num_steps, num_inference_steps)
    pairs = [*zip(timesteps, [*timesteps[1:], 0], strict=True), *([(1, 0)] * extra_steps)]
    for t, t_prev in pairs:
        x0 = _denoise(denoiser, x, t, context, clip_x0)
        noise = _randn(x.shape, generator, x) if eta > 0 and t_prev > 0 else None
        x = schedule.ddim_step(x, t, t_prev, x0, eta, noise)
    return x


@torch.no_grad()
def sample_dpmpp(
    denoiser: FiLMDenoiser,
    states: Tensor,
    num_samples: int,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    num_inference_steps: int = 10,
    extra_steps: int = 0,
    clip_x0: float | None = None,
) -> Tensor:
    """DPM-Solver++(2M) with x0 prediction, deterministic: states (N, S) -> (N, K, Z).

    Visits `ddim_timesteps(T, num_inference_steps)` like DDIM (one denoiser call each); every
    step after the first is second order; the last (to t = 0, where σ = 0) is first order, i.e.
    the last x0 prediction. `extra_steps` then repeat x ← x̂0(x, 1), as in DDIM.
    """
    x, context = _start(denoiser, states, num_samples, generator)
    timesteps = ddim_timesteps(schedule.num_steps, num_inference_steps)
    x0_last, h_last = None, None
    for t, t_prev in zip(timesteps, [*timesteps[1:], 0], strict=True):
        x0 = _denoise(denoiser, x, t, context, clip_x0).to(x.dtype)
        if t_prev == 0:
            x = x0
            break
        # The step into the last visited t (= 1, whose log-SNR is far above the others) is
        # first order, as DPM-Solver++'s "lower order final": its h dwarfs the step before, and
        # the second-order extrapolation over such a ratio is unstable with few steps.
        second = x0_last if t_prev != timesteps[-1] else None
        x, h_last = schedule.dpmpp_step(x, t, t_prev, x0, second, h_last)
        x0_last = x0
    for _ in range(extra_steps):
        x = _denoise(denoiser, x, 1, context, clip_x0).to(x.dtype)
    return x


def sample_prior(
    denoiser: FiLMDenoiser,
    schedule: NoiseSchedule,
    states: Tensor,
    num_samples: int,
    sampler: str = "ddim",
    num_inference_steps: int = 10,
    extra_steps: int = 0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """Draw K = `num_samples` latents per state with the sampler named in config: (N, S) -> (N, K, Z).

    `num_inference_steps` applies to "ddim" and "dpmpp", `eta` to "ddim" only; "ddpm" always
    runs all T steps.
    """
    args = (denoiser, states, num_samples, schedule, generator)
    if sampler == "ddpm":
        return sample_ddpm(*args, extra_steps=extra_steps, clip_x0=clip_x0)
    few_step = {"ddim": partial(sample_ddim, eta=eta), "dpmpp": sample_dpmpp}
    if sampler in few_step:
        return few_step[sampler](
            *args,
            num_inference_steps=num_inference_steps,
            extra_steps=extra_steps,
            clip_x0=clip_x0,
        )
    raise ValueError(f"sample_prior: unknown sampler {sampler!r}; valid samplers are {SAMPLERS}.")
