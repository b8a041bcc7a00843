"""The evaluation policy and rollout metrics against hand computations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from ldcq.errors import ConfigError
from ldcq.evaluation.policy import LDCQPolicy
from ldcq.evaluation.rollout import evaluate


class FixedPrior:
    """Returns the same K hand-made latents at every state."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents  # (K, Z)

    def sample(self, states, num_samples, generator=None, **kwargs):
        assert num_samples <= len(self.latents)
        return self.latents[:num_samples].expand(len(states), -1, -1).clone()


class FirstCoordinateQ:
    """min(Q1, Q2)(s, z) = z[0] + s[0]: the best latent has the largest first coordinate."""

    def score(self, states, latents):
        return latents[..., 0] + states[:, :1]


class EchoVAE:
    """Decodes a latent into its own first A dims, so the chosen latent is visible in actions."""

    class hparams:
        latent_dim = 3

    def act(self, states, z, deterministic=False, generator=None):
        return z[:, :2].clone()

    def prior_mean(self, states):
        return torch.full((len(states), 3), -7.0)


LATENTS = torch.tensor([[0.1, 1.0, 0.0], [0.9, 2.0, 0.0], [0.5, 3.0, 0.0], [-1.0, 4.0, 0.0]])


def test_q_selector_takes_the_argmax_latent_per_state():
    policy = LDCQPolicy(EchoVAE(), FixedPrior(LATENTS), FirstCoordinateQ(), num_samples=4)
    chosen = policy.select(torch.tensor([[0.0, 0.0], [5.0, 1.0]]))
    torch.testing.assert_close(chosen, LATENTS[[1, 1]])


def test_replanning_happens_every_replan_every_steps():
    prior = FixedPrior(LATENTS)
    policy = LDCQPolicy(EchoVAE(), prior, FirstCoordinateQ(), num_samples=4, replan_every=3)
    calls = []
    original = policy.select
    policy.select = lambda s: calls.append(len(s)) or original(s)
    states = np.zeros((2, 2), dtype=np.float32)
    actions = [policy.act(states) for _ in range(7)]
    assert calls == [2, 2, 2]  # steps 0, 3 and 6
    np.testing.assert_allclose(actions[0], LATENTS[[1, 1], :2].numpy())


def test_baseline_selectors():
    prior = FixedPrior(LATENTS)
    one = LDCQPolicy(EchoVAE(), prior, None, selector="prior")
    torch.testing.assert_close(one.select(torch.zeros(2, 2)), LATENTS[[0, 0]])
    vae_prior = LDCQPolicy(EchoVAE(), None, None, selector="vae-prior")
    assert (vae_prior.select(torch.zeros(2, 2)) == -7.0).all()
    with pytest.raises(ConfigError, match="valid selectors"):
        LDCQPolicy(EchoVAE(), prior, None, selector="greedy")
    with pytest.raises(ConfigError, match="needs the latent_bcq"):
        LDCQPolicy(EchoVAE(), prior, None, selector="q")


class Line(gym.Env):
    """Position p on a line, starting at the reset seed mod 2; action +1 or -1 moves it.
    Reward 1 while p >= 3; terminates (success) at p >= 5."""

    observation_space = gym.spaces.Dict({"observation": gym.spaces.Box(-100, 100, (2,))})
    action_space = gym.spaces.Box(-1.0, 1.0, (2,))

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.p = float((seed or 0) % 2)
        return {"observation": np.array([self.p, 0.0], np.float32)}, {}

    def step(self, action):
        self.p += float(np.sign(action[0]))
        done = self.p >= 5
        obs = {"observation": np.array([self.p, 0.0], np.float32)}
        return obs, float(self.p >= 3), done, False, {"success": done}


class Forward:
    def reset(self, n):
        pass

    def act(self, states):
        return np.ones((len(states), 2), dtype=np.float32)


def test_rollout_metrics_match_a_hand_computation():
    metrics, traj = evaluate(
        Forward(), Line, episodes=3, num_envs=2, seed=0, ref_scores=(1.0, 5.0), max_steps=10
    )
    # seeds 0, 1, 2 start at 0, 1, 0: positions after each step 1..5 (or 2..5), reward from p >= 3
    returns = np.array([3.0, 3.0, 3.0])
    lengths = np.array([5, 4, 5])
    # the first step at which the env reports success (p >= 5), not the first reward (p >= 3)
    first_hit = np.array([4, 3, 4])
    np.testing.assert_array_equal(traj.returns, returns)
    np.testing.assert_array_equal(traj.lengths, lengths)
    assert metrics["eval/return_mean"] == pytest.approx(3.0)
    assert metrics["eval/success_rate"] == 1.0
    assert metrics["eval/episode_length"] == pytest.approx(lengths.mean())
    assert metrics["eval/first_hit_score"] == pytest.approx((10 - first_hit).mean())
    # normalized with the dataset's reference scores: 100 * (3 - 1) / (5 - 1)
    assert metrics["eval/normalized_score"] == pytest.approx(50.0)
    # the official first-hit score, normalized the same way: 100 * (8.33 - 1) / (5 - 1)
    assert metrics["eval/first_hit_normalized"] == pytest.approx(
        100 * ((10 - first_hit).mean() - 1) / 4
    )
    assert np.isnan(traj.positions[1, 4:]).all() and not np.isnan(traj.positions[1, :4]).any()


def test_same_seed_gives_identical_evaluation_returns():
    from ldcq.data import pointmaze
    from ldcq.stages.diffusion_prior import LatentDiffusionPrior
    from ldcq.stages.latent_bcq import LatentBCQ
    from ldcq.stages.skill_vae import SkillVAE

    torch.manual_seed(0)
    vae = SkillVAE(state_dim=4, action_dim=2, horizon=5, latent_dim=3, hidden_dim=8, gru_layers=1)
    prior = LatentDiffusionPrior(
        state_dim=4, latent_dim=3, hidden_dims=[8], time_embed_dim=8, state_embed_dim=8
    )
    q = LatentBCQ(state_dim=4, latent_dim=3, horizon=5, hidden_dim=8, latent_hidden=8)

    def run(seed):
        policy = LDCQPolicy(vae.eval(), prior.eval(), q.eval(), num_samples=4, seed=seed)
        make_env = lambda: pointmaze.make_eval_env("pointmaze-umaze", max_episode_steps=30)  # noqa: E731
        return evaluate(policy, make_env, episodes=3, num_envs=3, seed=seed)[1]

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.returns, b.returns)
    assert not np.array_equal(a.positions, c.positions)


class StandStill:
    """Zero actions: the point stays near its reset."""

    def reset(self, num_envs):
        self.n = num_envs

    def act(self, states):
        return np.zeros((len(states), 2))


def test_first_hit_is_the_first_success_not_the_first_reward_with_dense_rewards():
    from ldcq.data import pointmaze

    make_env = lambda: pointmaze.make_eval_env("pointmaze-umaze-dense", max_episode_steps=30)  # noqa: E731
    metrics, traj = evaluate(StandStill(), make_env, episodes=4, num_envs=2, seed=0)
    assert (traj.returns > 0).all()  # dense: every step pays exp(-distance) > 0
    # resets are never in the goal cell, and the point hardly moves: no success, no hit
    assert metrics["eval/success_rate"] == 0.0
    assert metrics["eval/first_hit_score"] == 0.0


def test_the_evaluation_protocol_is_named_and_checked():
    from ldcq.evaluation.rollout import evaluation_protocol

    fixed = evaluation_protocol("pointmaze-umaze", "fixed", (1.0, 2.0))
    assert fixed.description.startswith("fixed goal") and fixed.ref_scores == (1.0, 2.0)
    with pytest.raises(ConfigError, match=r"evaluation\.goal='nearby'"):
        evaluation_protocol("pointmaze-umaze", "nearby")
