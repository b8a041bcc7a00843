"""Unit tests of ldcq.models on random tensors (plus one tiny trained diffusion prior)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ldcq.models import (
    AutoregressivePolicy,
    FiLMDenoiser,
    GaussianPrior,
    GRUEncoder,
    MLPPolicy,
    NoiseSchedule,
    QNetwork,
    StateDecoder,
    TwinQ,
    ddim_timesteps,
    gaussian_kl,
    gaussian_nll,
    sample_ddim,
    sample_ddpm,
    sample_prior,
    x0_loss,
)

B, H, S, A, Z, K = 5, 7, 4, 3, 6, 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- VAE -----------------------------------------------------------------------------------------


def test_gru_encoder_shapes_and_positive_std() -> None:
    enc = GRUEncoder(S, A, Z, hidden_dim=32, num_layers=2)
    mean, std = enc(torch.randn(B, H, S), torch.randn(B, H, A))
    assert mean.shape == std.shape == (B, Z)
    assert (std > 0).all()


def test_gru_encoder_summary_reads_the_whole_window_both_ways() -> None:
    # With h_n, the backward direction's summary has read the whole window, so the first action
    # changes the output even when the forward direction is frozen out of the comparison.
    enc = GRUEncoder(S, A, Z, hidden_dim=16, num_layers=1)
    states, actions = torch.randn(1, H, S), torch.randn(1, H, A)
    feats = torch.cat([enc.state_embed(states), actions], dim=-1)
    _, h_n = enc.gru(feats)
    changed = actions.clone()
    changed[:, 0] += 1.0
    _, h_n2 = enc.gru(torch.cat([enc.state_embed(states), changed], dim=-1))
    assert not torch.allclose(h_n[-1], h_n2[-1])


@pytest.mark.parametrize("policy_cls", [AutoregressivePolicy, MLPPolicy])
def test_policy_shapes_any_leading_dims(policy_cls: type) -> None:
    policy = policy_cls(S, A, Z, hidden_dim=32)
    states, z, actions = torch.randn(B, H, S), torch.randn(B, H, Z), torch.randn(B, H, A)
    mean, std = policy(states, z, actions)
    assert mean.shape == std.shape == (B, H, A)
    assert (std > 0).all()
    assert policy.sample(states[:, 0], z[:, 0]).shape == (B, A)
    assert policy.sample(states, z, deterministic=True).shape == (B, H, A)
    # One skill latent per window broadcasts over its H states.
    mean_b, _ = policy(states, z[:, :1], actions)
    torch.testing.assert_close(mean_b, policy(states, z[:, :1].expand(B, H, Z), actions)[0])


def test_autoregressive_head_ignores_later_action_dims() -> None:
    policy = AutoregressivePolicy(S, A, Z, hidden_dim=32)
    states, z, actions = torch.randn(B, S), torch.randn(B, Z), torch.randn(B, A)
    mean, std = policy(states, z, actions)
    for i in range(A):
        perturbed = actions.clone()
        perturbed[..., i:] += torch.randn(B, A - i)
        mean_p, std_p = policy(states, z, perturbed)
        torch.testing.assert_close(mean_p[..., : i + 1], mean[..., : i + 1])
        torch.testing.assert_close(std_p[..., : i + 1], std[..., : i + 1])
        if i + 1 < A:
            assert not torch.allclose(mean_p[..., i + 1 :], mean[..., i + 1 :])


def test_autoregressive_sample_matches_teacher_forced_heads() -> None:
    # The incremental sampler must compute the same heads as the teacher-forced forward pass.
    policy = AutoregressivePolicy(S, A, Z, hidden_dim=32)
    states, z = torch.randn(B, S), torch.randn(B, Z)
    actions = policy.sample(states, z, deterministic=True)
    mean, _ = policy(states, z, actions)
    torch.testing.assert_close(actions, mean, atol=1e-5, rtol=1e-5)

    draw = [policy.sample(states, z, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(draw[0], draw[1])
    assert not torch.allclose(draw[0], actions)


def test_autoregressive_masked_weights_get_no_gradient() -> None:
    policy = AutoregressivePolicy(S, A, Z, hidden_dim=16)
    mean, std = policy(torch.randn(B, S), torch.randn(B, Z), torch.randn(B, A))
    (mean.sum() + std.sum()).backward()
    grad = policy.fc1.weight.grad
    for i in range(A):
        assert (grad[i, :, S + i : S + A] == 0).all()


def test_state_decoder_and_prior_shapes() -> None:
    mean, std = StateDecoder(S, Z, hidden_dim=32)(torch.randn(B, S), torch.randn(B, Z))
    assert mean.shape == std.shape == (B, S)
    mean, std = GaussianPrior(S, Z, hidden_dim=32)(torch.randn(B, S))
    assert mean.shape == std.shape == (B, Z)
    assert (std > 0).all()


def test_gaussian_nll_hand_values() -> None:
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    nll = gaussian_nll(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]))
    expected = torch.tensor([0.5 + half_log_2pi, math.log(2.0) + half_log_2pi])
    torch.testing.assert_close(nll, expected)
    x, mean, std = torch.randn(10), torch.randn(10), torch.rand(10) + 0.1
    ref = -torch.distributions.Normal(mean, std).log_prob(x)
    torch.testing.assert_close(gaussian_nll(x, mean, std), ref)


def test_gaussian_kl_hand_values() -> None:
    # KL(N(0,1) || N(1,2²)) = log 2 + (1 + 1)/(2·4) − 1/2.
    kl = gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0))
    torch.testing.assert_close(kl, torch.tensor(math.log(2.0) + 0.25 - 0.5))
    mean, std = torch.randn(4, Z), torch.rand(4, Z) + 0.1
    torch.testing.assert_close(gaussian_kl(mean, std, mean, std), torch.zeros(4, Z))


# --- Denoiser ------------------------------------------------------------------------------------


def test_denoiser_default_layout_and_shapes() -> None:
    den = FiLMDenoiser(Z, S)
    assert [b.dim for b in den._blocks()] == [128, 32, 16, 8, 16, 32, 128, 128]
    out = den(torch.randn(B, Z), torch.randint(1, 101, (B,)).float(), torch.randn(B, S))
    assert out.shape == (B, Z)
    with pytest.raises(ValueError, match="exactly one"):
        den(torch.randn(B, Z), torch.ones(B))


def test_denoiser_rebuilds_from_json_kwargs() -> None:
    kwargs = {"latent_dim": Z, "state_dim": S, "hidden_dims": (32, 16), "time_embed_dim": 32}
    den = FiLMDenoiser(**kwargs)
    rebuilt = FiLMDenoiser(**json.loads(json.dumps(kwargs)))
    rebuilt.load_state_dict(den.state_dict())
    x, t, s = torch.randn(B, Z), torch.full((B,), 3.0), torch.randn(B, S)
    torch.testing.assert_close(rebuilt(x, t, s), den(x, t, s))


def test_denoiser_cached_state_context_equals_uncached() -> None:
    den = FiLMDenoiser(Z, S)
    n = 3
    states, x, t = torch.randn(n, S), torch.randn(n, K, Z), 17.0
    cached = den(x, torch.tensor(t), state_context=den.embed_state(states[:, None]))
    uncached = den(
        x.reshape(n * K, Z), torch.full((n * K,), t), states.repeat_interleave(K, dim=0)
    ).reshape(n, K, Z)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_the_mlp_denoiser_matches_the_unets_size_and_caches_its_state_share() -> None:
    from ldcq.models.denoiser import MLPDenoiser, count_parameters, mlp_width_like
    from ldcq.stages.diffusion_prior import LatentDiffusionPrior

    width = mlp_width_like(Z, S, (128, 32, 16, 8), 256, 256)
    mlp, unet = MLPDenoiser(Z, S, width), FiLMDenoiser(Z, S)
    assert abs(count_parameters(mlp) / count_parameters(unet) - 1) < 0.01
    n = 3
    states, x = torch.randn(n, S), torch.randn(n, K, Z)
    cached = mlp(x, torch.tensor(9.0), state_context=mlp.embed_state(states[:, None]))
    uncached = mlp(
        x.reshape(n * K, Z), torch.full((n * K,), 9.0), states.repeat_interleave(K, dim=0)
    ).reshape(n, K, Z)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    # As the prior's denoiser: it trains a step and samples through the same samplers.
    prior = LatentDiffusionPrior(S, Z, hidden_dims=[16, 8], denoiser="mlp", sampling_steps=3)
    assert isinstance(prior.denoiser, MLPDenoiser)
    assert (
        abs(count_parameters(prior.denoiser) / count_parameters(FiLMDenoiser(Z, S, [16, 8])) - 1)
        < 0.05
    )
    loss = prior.loss(prior.denoiser, torch.randn(8, S), torch.randn(8, Z))
    loss.backward()
    assert prior.sample(torch.randn(2, S), 5).shape == (2, 5, Z)


# --- Schedule, loss, samplers --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_noise_schedule(kind: str) -> None:
    sched = NoiseSchedule(100, kind)
    ab = sched.alpha_bars
    assert ab.shape == (101,)
    assert ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all()
    torch.testing.assert_close(sched.one_minus_alpha_bars, 1.0 - ab)
    t = torch.arange(101)
    assert (sched.min_snr_weight(t, gamma=5.0) <= 5.0).all()
    x0 = torch.randn(101, Z)
    torch.testing.assert_close(sched.q_sample(x0, torch.zeros(101, dtype=torch.long), x0 * 3), x0)


def test_linear_schedule_endpoints_and_bad_name() -> None:
    sched = NoiseSchedule(100, "linear")
    torch.testing.assert_close(sched.betas[1], torch.tensor(1e-4))
    torch.testing.assert_close(sched.betas[100], torch.tensor(0.02))
    torch.testing.assert_close(sched.alpha_bars[1], 1.0 - sched.betas[1])
    with pytest.raises(ValueError, match="linear"):
        NoiseSchedule(100, "quadratic")


def test_ddpm_step_at_t1_returns_x0_prediction() -> None:
    sched = NoiseSchedule(100)
    x_t, x0 = torch.randn(B, Z), torch.randn(B, Z)
    torch.testing.assert_close(sched.ddpm_step(x_t, 1, x0, None), x0)
    torch.testing.assert_close(sched.ddim_step(x_t, 12, 0, x0, 0.0, None), x0)


def test_ddim_timesteps() -> None:
    steps = ddim_timesteps(100, 10)
    assert steps[0] == 100 and steps[-1] == 1 and len(steps) == 10
    assert steps == sorted(set(steps), reverse=True)
    assert ddim_timesteps(5, 50) == [5, 4, 3, 2, 1]


def test_x0_loss_is_a_differentiable_scalar() -> None:
    den = FiLMDenoiser(Z, S, hidden_dims=[16, 8], time_embed_dim=16, state_embed_dim=16)
    loss = x0_loss(den, torch.randn(B, Z), torch.randn(B, S), NoiseSchedule(10))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert den.input_proj.weight.grad is not None


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sampler_shapes_and_reproducibility(sampler: str) -> None:
    den = FiLMDenoiser(Z, S, hidden_dims=[16, 8], time_embed_dim=16, state_embed_dim=16)
    sched, states = NoiseSchedule(20), torch.randn(3, S)

    def draw() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return sample_prior(den, sched, states, K, sampler=sampler, extra_steps=2, generator=gen)

    z = draw()
    assert z.shape == (3, K, Z) and torch.isfinite(z).all()
    torch.testing.assert_close(z, draw())


class _GaussianDenoiser(nn.Module):
    """The exact x0 predictor of data N(0, s²·I) in Z dims: E[x0 | x_t] = √ᾱ·s²/(ᾱ·s² + 1 − ᾱ)·x_t."""

    def __init__(self, schedule: NoiseSchedule, scale: float) -> None:
        super().__init__()
        self.schedule, self.var = schedule, scale**2
        self.output_proj = nn.Linear(1, Z)

    def embed_state(self, states):
        return None

    def forward(self, x, t, state_context=None):
        a = self.schedule.alpha_bars[t.long()].double()
        return (a.sqrt() * self.var / (a * self.var + 1 - a)).float() * x


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_solves_the_flow_ode_more_accurately_than_ddim(kind: str) -> None:
    # For data N(0, s²·I) and its exact denoiser, the probability-flow ODE that DDIM and
    # DPM-Solver++ both integrate maps the start noise x_T to s·x_T / √(ᾱ_T·s² + 1 − ᾱ_T).
    sched = NoiseSchedule(100, kind)
    den = _GaussianDenoiser(sched, scale=0.5)
    states = torch.zeros(64, S)
    x_t = torch.randn(64, 8, Z, generator=torch.Generator().manual_seed(3)).double()
    a = sched.alpha_bars[-1].double()
    exact = 0.5 * x_t / (a * 0.25 + 1 - a).sqrt()

    def error(sampler, steps):
        gen = torch.Generator().manual_seed(3)  # the same x_T as above
        z = sample_prior(den, sched, states, 8, sampler, steps, generator=gen).double()
        return (z - exact).abs().max().item()

    assert error("dpmpp", 10) < error("ddim", 10) / 2
    assert error("dpmpp", 20) < error("ddim", 20) / 3
    assert error("dpmpp", 100) < error("ddim", 100) / 5
    # Up to 3 steps every step is first order: DDIM's.
    for steps in (1, 3):
        assert error("dpmpp", steps) == pytest.approx(error("ddim", steps), rel=1e-5)


def test_sample_prior_rejects_unknown_sampler() -> None:
    den = FiLMDenoiser(Z, S, hidden_dims=[8], time_embed_dim=8, state_embed_dim=8)
    with pytest.raises(ValueError, match="ddim"):
        sample_prior(den, NoiseSchedule(5), torch.randn(2, S), 2, sampler="dpm-solver")


# --- Q networks ----------------------------------------------------------------------------------


def test_q_score_equals_forward_loop() -> None:
    q = QNetwork(S, Z)
    states, latents = torch.randn(B, S), torch.randn(B, K, Z)
    assert q(states, latents[:, 0]).shape == (B,)
    looped = torch.stack([q(states, latents[:, k]) for k in range(K)], dim=1)
    feats = q.state_features(states)
    torch.testing.assert_close(q.score(feats, latents), looped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.score(feats[:, None], latents), looped, atol=1e-5, rtol=1e-5)


def test_twin_q_score_min() -> None:
    twin = TwinQ(S, Z)
    states, latents = torch.randn(B, S), torch.randn(B, K, Z)
    q1, q2 = twin(states, latents[:, 0])
    assert q1.shape == q2.shape == (B,)
    looped = torch.stack([torch.minimum(*twin(states, latents[:, k])) for k in range(K)], dim=1)
    torch.testing.assert_close(twin.score_min(states, latents), looped, atol=1e-5, rtol=1e-5)


# --- A tiny prior learns a bimodal, state-dependent distribution ----------------------------------


@pytest.fixture(scope="module")
def toy_prior() -> tuple[FiLMDenoiser, NoiseSchedule]:
    """Z = 2, state s ∈ {−1, +1}: z = (±2, 0) when s = −1 and (0, ±2) when s = +1 (± equally)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    den = FiLMDenoiser(
        2, 1, hidden_dims=[64, 32, 16], time_embed_dim=64, state_embed_dim=32, sinusoidal_dim=32
    )
    sched = NoiseSchedule(50)
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    for _ in range(300):
        states = torch.randint(0, 2, (256, 1), generator=gen).float() * 2 - 1
        signs = torch.randint(0, 2, (256,), generator=gen).float() * 2 - 1
        x0 = 0.05 * torch.randn(256, 2, generator=gen)
        x0[torch.arange(256), (states[:, 0] > 0).long()] += 2 * signs
        loss = x0_loss(den, x0, states, sched, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return den.eval(), sched


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_trained_prior_samples_both_modes(
    toy_prior: tuple[FiLMDenoiser, NoiseSchedule], sampler: str
) -> None:
    den, sched = toy_prior
    gen = torch.Generator().manual_seed(1)
    if sampler == "ddpm":
        z = sample_ddpm(den, torch.tensor([[-1.0], [1.0]]), 512, sched, gen, extra_steps=2)
    else:
        z = sample_ddim(den, torch.tensor([[-1.0], [1.0]]), 512, sched, gen, num_inference_steps=10)
    for row, axis in enumerate([0, 1]):
        along, across = z[row, :, axis], z[row, :, 1 - axis]
        assert 0.3 < (along > 0).float().mean() < 0.7
        assert ((along.abs() - 2).abs() < 0.5).float().mean() > 0.9
        assert (across.abs() < 0.5).float().mean() > 0.9


def test_prior_samples_in_chunks_on_cpu_with_the_same_shapes_and_seeding(monkeypatch):
    from ldcq.stages import diffusion_prior
    from ldcq.stages.diffusion_prior import LatentDiffusionPrior

    torch.manual_seed(0)
    prior = LatentDiffusionPrior(
        state_dim=4, latent_dim=3, hidden_dims=[8], time_embed_dim=8, state_embed_dim=8
    ).eval()
    states = torch.randn(7, 4)

    def draw(rows):
        monkeypatch.setattr(diffusion_prior, "CPU_SAMPLE_ROWS", rows)
        return prior.sample(states, 5, generator=torch.Generator().manual_seed(1))

    whole, chunked = draw(10_000), draw(10)  # one call vs chunks of 2 states
    assert whole.shape == chunked.shape == (7, 5, 3)
    assert torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, draw(10))
    assert prior.sample(states[:0], 5).shape == (0, 5, 3)


def test_the_prior_samples_through_a_real_compiled_denoiser_as_it_does_eagerly():
    # One real torch.compile (Inductor, C++ on this CPU): the compiled forward gives eager's
    # samples to float tolerance, the wrapper lends the samplers the module's other attributes,
    # and a copy compiles anew.
    import copy

    from ldcq.models.compiled import CompiledForward
    from ldcq.stages.diffusion_prior import LatentDiffusionPrior

    torch.manual_seed(0)
    prior = LatentDiffusionPrior(
        state_dim=4, latent_dim=3, hidden_dims=[8, 4], time_embed_dim=8, state_embed_dim=8
    ).eval()
    states = torch.randn(3, 4)
    compiled = prior.compiled_denoiser("latent_bank.compile")
    assert isinstance(compiled, CompiledForward)
    assert compiled.output_proj is prior.ema_denoiser.output_proj
    for sampler in ("ddim", "dpmpp"):
        eager = prior.sample(states, 5, sampler, generator=torch.Generator().manual_seed(1))
        fused = prior.sample(
            states, 5, sampler, generator=torch.Generator().manual_seed(1), denoiser=compiled
        )
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    assert compiled.forward.failed is None and compiled.forward.compile_s is not None
    assert copy.deepcopy(compiled).forward._compiled is None
