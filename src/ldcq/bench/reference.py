"""The reference mode of `make bench`: the official LDCQ algorithm's settings run in our code,
measured in the same run as our defaults, so every speedup is a ratio of two figures measured on
one host minutes apart rather than against a constant from another machine.

The official settings (see docs/method.md): fp32; the prior sampled by ancestral DDPM over all
T = 100 steps plus 5 extra steps at t = 1; skill VAE batch 128; Q batch 128 with K = 100 bank
latents per next state; the latent bank drawn in batches of 256 states; a re-plan scores 50 prior
samples. The official code itself is slower still than this mode (its replay buffer, its
per-latent Q state branch, its Python loops), so a ratio over the reference mode is a lower bound
of the speedup over the official code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ldcq.bench.config import BenchConfig

REFERENCE_PRECISION = "32-true"
REFERENCE_OVERRIDES = (
    "diffusion_prior.model.sampler=ddpm",
    "diffusion_prior.model.extra_steps=5",
    "latent_bank.sampler=ddpm",
    "latent_bank.extra_steps=5",
    "latent_bank.batch_size=256",
    "latent_bank.num_samples=100",
    "skill_vae.data.batch_size=128",
    "latent_bcq.data.batch_size=128",
    "latent_bcq.model.num_bank_samples=null",
    "latent_bcq.model.compile=false",
    "evaluation.num_samples=50",
)
# What each speedup is measured on, and the target for it (× the reference mode).
SPEEDUPS = (
    ("skill_vae", "skill VAE training, windows/s", 2.0),
    ("latent_bcq", "Q updates/s", 5.0),
    ("bank", "latent bank, latents/s", 50.0),
    ("replan", "re-plan, 1 env", 50.0),
)


def reference_config(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` in the reference mode: the official settings over the same family and sizes; the
    bank on ``reference_bank_states`` states (DDPM is ~10× slower per latent) and one env."""
    tiny_bank = cfg.reference_bank_states
    return replace(
        cfg,
        precision=REFERENCE_PRECISION,
        overrides=(*cfg.overrides, *REFERENCE_OVERRIDES),
        families=cfg.families[:1],
        bank_states=tiny_bank,
        envs=(1,),
        reference=False,
    )


def _train_row(rows: list[dict], family: str, stage: str) -> dict[str, Any]:
    return next(r for r in rows if r["family"] == family and r["stage"] == stage)


def speedups(report: dict) -> list[dict[str, Any]]:
    """One row per measure: the reference mode's figure, ours, and ours over the reference."""
    ref = report["reference"]
    family = ref["family"]
    out = []
    for key, label, target in SPEEDUPS:
        if key in ("skill_vae", "latent_bcq"):
            ours = _train_row(report["train"], family, key)
            base = _train_row(ref["train"], family, key)
            unit = "windows/s" if key == "skill_vae" else "updates/s"
            field = "samples_per_s" if key == "skill_vae" else "steps_per_s"
            row = {
                "reference": base[field],
                "ours": ours[field],
                "unit": unit,
                "speedup": ours[field] / base[field],
                "setting": f"B={ours['batch']}" + (f", K={ours['K']}" if "K" in ours else ""),
                "reference_setting": f"B={base['batch']}"
                + (f", K={base['K']}" if "K" in base else ""),
            }
        elif key == "bank":
            ours, base = report["bank"], ref["bank"]
            row = {
                "reference": base["latents_per_s"],
                "ours": ours["latents_per_s"],
                "unit": "latents/s",
                "speedup": ours["latents_per_s"] / base["latents_per_s"],
                "setting": f"{ours['sampler']}, K={ours['K']}",
                "reference_setting": f"{base['sampler']}, K={base['K']}",
            }
        else:
            ours = next(r for r in report["latency"]["rows"] if r["envs"] == 1)
            base = next(r for r in ref["latency"]["rows"] if r["envs"] == 1)
            row = {
                "reference": base["replan_ms"],
                "ours": ours["replan_ms"],
                "unit": "ms",
                "speedup": base["replan_ms"] / ours["replan_ms"],
                "setting": f"K={ours['K']}",
                "reference_setting": f"K={base['K']}",
            }
        out.append({"measure": key, "label": label, "target": target, **row})
    return out
