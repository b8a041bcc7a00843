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
    "latent_bank.compile=false",
    "evaluation.compile=false",
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


def _batch(row: dict) -> str:
    return f"B={row['batch']}" + (f", K={row['K']}" if "K" in row else "")


def _sampled(row: dict) -> str:
    return f"{row['sampler']}{' compiled' if row.get('compile') else ''}, K={row['K']}"


def _measures(report: dict, key: str) -> tuple[dict, dict, str, str, Any]:
    """(our row, the reference's row, the field compared, its unit, how a row's setting reads)."""
    ref = report["reference"]
    if key in ("skill_vae", "latent_bcq"):
        ours = _train_row(report["train"], ref["family"], key)
        base = _train_row(ref["train"], ref["family"], key)
        if key == "skill_vae":
            return ours, base, "samples_per_s", "windows/s", _batch
        return ours, base, "steps_per_s", "updates/s", _batch
    if key == "bank":
        return report["bank"], ref["bank"], "latents_per_s", "latents/s", _sampled
    ours, base = (next(r for r in x["latency"]["rows"] if r["envs"] == 1) for x in (report, ref))
    return ours, base, "replan_ms", "ms", _sampled


def speedups(report: dict) -> list[dict[str, Any]]:
    """One row per measure: the reference mode's figure, ours, and ours over the reference (a
    time's ratio the other way round, so a speedup is always above 1 when we are faster)."""
    out = []
    for key, label, target in SPEEDUPS:
        ours, base, field, unit, setting = _measures(report, key)
        ratio = ours[field] / base[field]
        out.append(
            {
                "measure": key,
                "label": label,
                "target": target,
                "reference": base[field],
                "ours": ours[field],
                "unit": unit,
                "speedup": 1.0 / ratio if unit == "ms" else ratio,
                "setting": setting(ours),
                "reference_setting": setting(base),
                "sampler": ours.get("sampler"),
            }
        )
    return out
