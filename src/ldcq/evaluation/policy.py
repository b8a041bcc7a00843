"""The LDCQ policy (reference §1.7, decision 6), batched over N environments.

At a re-plan, K latents are sampled from the diffusion prior at each current state, scored with
min(Q1, Q2), and the argmax is kept; the low-level policy π(a | s, z) then runs closed-loop until
the next re-plan, ``replan_every`` steps later. The paper's baselines are selectors too:
``prior`` (one diffusion sample, no Q) and ``vae-prior`` (the mean of the VAE's Gaussian prior,
no Q), so a run shows what the diffusion prior and the Q-function each add.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldcq.errors import ConfigError
from ldcq.precision import DTYPES, autocast
from ldcq.stages.common import check_flags

SELECTORS = ("q", "prior", "vae-prior")


def check_policy_settings(
    selector: str, num_samples: int, replan_every: int, compile: bool = False
) -> None:
    """The ``evaluation`` section's policy values, each named by its pipeline key when wrong."""
    check_flags("evaluation", compile=compile)
    if selector not in SELECTORS:
        raise ConfigError(f"evaluation.selector={selector!r}: valid selectors are {SELECTORS}")
    for key, value in (("num_samples", num_samples), ("replan_every", replan_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"evaluation.{key}={value!r}: must be an integer >= 1")


class LDCQPolicy:
    """``act(states (N, S)) -> actions (N, A)``, re-planning each env every ``replan_every`` steps.

    Args:
        vae: frozen :class:`~ldcq.stages.skill_vae.SkillVAE` (decoder and Gaussian prior).
        prior: frozen :class:`~ldcq.stages.diffusion_prior.LatentDiffusionPrior` (for q, prior).
        q: frozen :class:`~ldcq.stages.latent_bcq.LatentBCQ` (for q).
        selector: ``q``, ``prior`` or ``vae-prior``.
        num_samples: K candidate latents per re-plan (``q`` only).
        replan_every: env steps between re-plans.
        deterministic: decoder mean instead of a sample.
        sampler, sampling_steps, extra_steps: prior sampler overrides (None: the prior's config).
        seed: seeds the prior's and the decoder's noise.
        precision: concrete precision the prior samples and Q scores in (the latent bank's, so
            the policy picks among latents drawn as Q was trained on); latents come out fp32.
        compile: sample through the ``torch.compile``d denoiser (``evaluation.compile``; eager
            after one warning where compiling fails); it compiles at the first re-plan.
    """

    def __init__(
        self,
        vae,
        prior=None,
        q=None,
        selector: str = "q",
        num_samples: int = 50,
        replan_every: int = 10,
        deterministic: bool = False,
        sampler: str | None = None,
        sampling_steps: int | None = None,
        extra_steps: int | None = None,
        seed: int = 0,
        precision: str = "32-true",
        compile: bool = False,
    ) -> None:
        if precision not in DTYPES:  # Lightning's -true precisions cast weights, not the policy
            raise ConfigError(f"precision={precision!r}: valid values are {list(DTYPES)}")
        check_policy_settings(selector, num_samples, replan_every, compile)
        if selector in ("q", "prior") and prior is None:
            raise ConfigError(f"evaluation.selector={selector!r} needs the diffusion prior")
        if selector == "q" and q is None:
            raise ConfigError("evaluation.selector='q' needs the latent_bcq artifact")
        self.vae, self.prior, self.q = vae, prior, q
        self.selector = selector
        self.num_samples, self.replan_every = num_samples, replan_every
        self.deterministic = deterministic
        self.precision = precision
        self.sample_kwargs = {
            "sampler": sampler,
            "sampling_steps": sampling_steps,
            "extra_steps": extra_steps,
        }
        if compile and prior is not None:
            self.sample_kwargs["denoiser"] = prior.compiled_denoiser("evaluation.compile")
        self.generator = torch.Generator().manual_seed(seed)
        self.z: Tensor | None = None
        self.age = np.zeros(0, dtype=np.int64)

    def reset(self, num_envs: int) -> None:
        """Forget every env's skill: the next ``act`` re-plans all of them."""
        self.z = None
        self.age = np.full(num_envs, self.replan_every, dtype=np.int64)

    @torch.no_grad()
    def select(self, states: Tensor) -> Tensor:
        """Latents ``(N, Z)`` for raw ``states (N, S)`` with the configured selector."""
        if self.selector == "vae-prior":
            return self.vae.prior_mean(states)
        k = self.num_samples if self.selector == "q" else 1
        with autocast(self.precision, states.device):
            z = self.prior.sample(states, k, generator=self.generator, **self.sample_kwargs)
            z = z.float()
            if self.selector == "prior":
                return z[:, 0]
            best = self.q.score(states, z).argmax(dim=1)  # fp32: Q's output layer is
        return z[torch.arange(len(z)), best]

    @torch.no_grad()
    def act(self, states: np.ndarray) -> np.ndarray:
        """Raw ``states (N, S)`` -> actions ``(N, A)`` (float32)."""
        s = torch.as_tensor(states, dtype=torch.float32)
        if self.z is None or len(self.age) != len(s):
            self.reset(len(s))
            self.z = torch.zeros(len(s), self.vae.hparams.latent_dim)
        due = torch.from_numpy(self.age >= self.replan_every)
        if due.any():
            self.z[due] = self.select(s[due])
            self.age[due.numpy()] = 0
        self.age += 1
        a = self.vae.act(s, self.z, deterministic=self.deterministic, generator=self.generator)
        return a.float().numpy()
