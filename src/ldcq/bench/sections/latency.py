"""Decision latency: a re-plan (K prior samples, min(Q1, Q2), argmax, first action) and an env
step between re-plans, for 1 and many envs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldcq.bench.config import BenchConfig
from ldcq.bench.measure import autocast, load_family, sync
from ldcq.bench.sections.sampling import sampler_name
from ldcq.evaluation.policy import LDCQPolicy
from ldcq.stages.registry import TRAINED


def section_latency(cfg: BenchConfig) -> dict[str, Any]:
    """ms per re-plan (K prior samples, min(Q1, Q2), argmax, first action) and per env step."""
    rows = []
    for name in cfg.families:
        fam = load_family(cfg, name)
        vae, prior, q = (fam.build(s).eval().requires_grad_(False).to(cfg.device) for s in TRAINED)
        evaluation = fam.cfg.get("evaluation") or {}
        k = int(evaluation.get("num_samples", 50))
        every = int(evaluation.get("replan_every", 10))
        compile_ = bool(evaluation.get("compile", False))
        for n in cfg.envs:
            states = torch.randn(n, fam.S, generator=torch.Generator().manual_seed(cfg.seed))
            times = decision_times(cfg, vae, prior, q, states, k, every, compile_)
            replan_s, step_s, first_s, source = times
            hp = prior.hparams
            rows.append(
                {
                    "family": name,
                    "envs": n,
                    "K": k,
                    "replan_every": every,
                    "replan_ms": replan_s * 1e3,
                    "first_replan_ms": first_s * 1e3,
                    "compile": compile_,
                    "step_ms": step_s * 1e3,
                    "amortized_step_ms": (replan_s + (every - 1) * step_s) / every * 1e3,
                    "source": source,
                    "sampler": sampler_name(
                        hp.sampler, hp.sampling_steps, hp.num_steps, hp.extra_steps
                    ),
                }
            )
    return {"rows": rows}


def decision_times(
    cfg: BenchConfig, vae, prior, q, states: Tensor, k: int, every: int, compile_: bool = False
) -> tuple[float, float, float, str]:
    """(seconds per re-plan, seconds per env step between re-plans, seconds of the first re-plan
    (which compiles when ``compile_``), what was timed).

    ``ldcq.evaluation.policy.LDCQPolicy`` on a CPU (it takes numpy states); on an accelerator the
    same computation on device tensors, written out here.
    """
    if cfg.device == "cpu":
        replan, step, source = _policy_calls(
            vae, prior, q, states, k, every, cfg.precision, compile_
        )
    else:
        replan, step, source = _direct_calls(cfg, vae, prior, q, states, k, compile_)
    replans, steps = [], []
    with autocast(cfg):
        for _ in range(1 + max(5, cfg.repeats)):
            for fn, out in ((replan, replans), (step, steps)):
                sync(cfg.device)
                start = time.perf_counter()
                fn()
                sync(cfg.device)
                out.append(time.perf_counter() - start)
    return min(replans[1:]), min(steps[1:]), replans[0], source


def _policy_calls(
    vae, prior, q, states: Tensor, k: int, every: int, precision: str, compile_: bool
) -> tuple[Callable[[], None], Callable[[], None], str]:
    """(a re-plan, an env step, their name) through ``LDCQPolicy.act`` on numpy states."""
    policy = LDCQPolicy(
        vae,
        prior,
        q,
        selector="q",
        num_samples=k,
        replan_every=every,
        precision=precision,
        compile=compile_,
    )
    s = states.numpy()

    def replan() -> None:
        policy.reset(len(s))
        policy.act(s)

    def step() -> None:
        # Right after a re-plan, so no env is due: the decoder only (every > 1).
        policy.act(s)

    return replan, step, "LDCQPolicy.act"


def _direct_calls(
    cfg: BenchConfig, vae, prior, q, states: Tensor, k: int, compile_: bool
) -> tuple[Callable[[], None], Callable[[], None], str]:
    """(a re-plan, an env step, their name): the policy's computation on ``cfg.device`` tensors."""
    states = states.to(cfg.device)
    z = torch.zeros(len(states), prior.hparams.latent_dim, device=cfg.device)
    denoiser = prior.compiled_denoiser("evaluation.compile") if compile_ else None

    @torch.no_grad()
    def replan() -> None:
        latents = prior.sample(states, k, denoiser=denoiser)
        best = q.score(states, latents).argmax(dim=1)
        z.copy_(latents[torch.arange(len(states)), best])
        vae.act(states, z)

    @torch.no_grad()
    def step() -> None:
        vae.act(states, z)

    return replan, step, "direct (prior.sample, LatentBCQ.score, SkillVAE.act)"
