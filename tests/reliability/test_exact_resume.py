"""Exact resume: a stage killed with SIGKILL at a random step and rerun ends bit-identical to an
uninterrupted run — its weights, its metrics.json and every stage after it."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from tiny import (
    PIPELINE,
    UP_TO_BCQ,
    assert_identical,
    kill,
    pipeline_root,
    start_cli,
    tiny_dataset,
    tiny_overrides,
    wait_for,
)

from ldcq.config import compose
from ldcq.pipeline import run_pipeline
from ldcq.stages.checkpointing import inexact_reasons

STEPS, EVERY, VAL_EVERY = 10, 2, 4  # checkpoints at 2, 4, …; validation at 4 and 8, not at 10


def resume_overrides(tmp_path) -> list[str]:
    """The tiny pipeline with epochs of 4 batches (so runs cross epochs), checkpoints that fall on
    validation steps and between them, prioritized replay and a random subset of bank columns."""
    per_stage = [
        f"{stage}.trainer.{key}={value}"
        for stage in ("skill_vae", "diffusion_prior", "latent_bcq")
        for key, value in (("max_steps", STEPS), ("checkpoint_every_n_steps", EVERY))
    ]
    return [
        *tiny_overrides(tmp_path),
        *per_stage,
        f"skill_vae.trainer.val_check_interval={VAL_EVERY}",
        f"diffusion_prior.trainer.val_check_interval={VAL_EVERY}",
        "skill_vae.data.batch_size=32",
        "diffusion_prior.data.batch_size=32",
        "latent_bcq.data.prioritized=true",
        "latent_bcq.model.num_bank_samples=2",
    ]


def _run(tmp_path):
    return run_pipeline(
        compose(PIPELINE, resume_overrides(tmp_path)), stages=UP_TO_BCQ, track=False
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The pipeline up to latent_bcq, never interrupted: ``{stage: artifact}``."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tmp / "minari"))
        tiny_dataset()
        return {stage: r.artifact for stage, r in _run(tmp).items()}


def _kill_point(stage: str) -> tuple[int, str]:
    """A random step after the first checkpoint, after its training batch or inside validation;
    ``LDCQ_TEST_KILL_POINT=<step>:<train|validation>`` replays one that failed."""
    if os.environ.get("LDCQ_TEST_KILL_POINT"):
        step, phase = os.environ["LDCQ_TEST_KILL_POINT"].split(":")
        return int(step), phase
    rng = random.Random()
    phases = ["train", "validation"] if stage != "latent_bcq" else ["train"]
    phase = rng.choice(phases)
    step = rng.choice([4, 8]) if phase == "validation" else rng.randint(EVERY + 1, STEPS)
    return step, phase


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["skill_vae", "diffusion_prior", "latent_bcq"])
def test_a_stage_killed_at_a_random_step_resumes_bit_identical(
    stage, uninterrupted, minari_root, tmp_path
):
    tiny_dataset()
    step, phase = _kill_point(stage)
    context = f"{stage} killed at step {step} ({phase})"
    args = [*resume_overrides(tmp_path), "--stages", "latent_bcq", "--no-tracking"]
    proc, log = start_cli(args, tmp_path, LDCQ_TEST_KILL=f"{stage}:{step}:{phase}")
    proc.wait(timeout=300)
    assert proc.returncode == -9, (context, log.read_text()[-3000:])
    root = pipeline_root(tmp_path)
    assert not list(root.glob(f"{stage}-*/DONE")), context
    checkpoint = list(root.glob(f".work/{stage}-*/last.ckpt"))
    assert checkpoint, context
    saved_step = torch.load(checkpoint[0], weights_only=True)["global_step"]
    assert 0 < saved_step <= step, context

    results = _run(tmp_path)
    assert next(s for s, r in results.items() if not r.skipped) == stage, context
    spec = results[stage].artifact.spec
    assert spec["resumes"] == [{"from_step": saved_step, "exact": True, "reasons": []}], context
    assert spec["resume_exact"] is True and spec["resumed_from_step"] == saved_step
    assert_identical(results, uninterrupted, context)


@pytest.mark.slow
def test_the_bank_killed_midway_resumes_bit_identical(uninterrupted, minari_root, tmp_path):
    tiny_dataset()
    args = [*resume_overrides(tmp_path), "--stages", "latent_bank", "--no-tracking"]
    root = pipeline_root(tmp_path)
    chunks = lambda: list(root.glob(".work/latent_bank-*/chunks/*/*.idx.npy"))  # noqa: E731
    proc, _ = start_cli(args, tmp_path, LDCQ_TEST_CHUNK_DELAY="1.0")  # 3 chunks of 64 rows
    wait_for(lambda: len(chunks()) >= 1, proc, "a bank chunk", timeout=240)
    kill(proc)
    assert not list(root.glob("latent_bank-*/DONE")) and len(chunks()) < 3
    results = _run(tmp_path)
    assert [s for s, r in results.items() if not r.skipped] == ["latent_bank", "latent_bcq"]
    assert_identical(results, uninterrupted, "bank killed after its first chunk")


def test_inexact_resumes_are_named():
    saved = {"world_size": 1, "accelerator": "cpu", "deterministic": False, "threads": 2}
    assert inexact_reasons(saved, dict(saved)) == []
    assert inexact_reasons(saved, {**saved, "world_size": 2}) == [
        "world_size was 1 when the checkpoint was written, now 2"
    ]
    gpu = {**saved, "accelerator": "cuda"}
    assert any("trainer.deterministic=true" in r for r in inexact_reasons(gpu, dict(gpu)))
    assert inexact_reasons(gpu, {**gpu, "deterministic": True}) == [
        "deterministic was False when the checkpoint was written, now True"
    ]


def test_metrics_json_holds_the_last_training_and_validation_values(uninterrupted):
    # What the comparisons above rest on: metrics.json holds the last validation too.
    metrics = json.loads((uninterrupted["skill_vae"].path / "metrics.json").read_text())
    assert {"val/loss", "train/loss"} <= set(metrics)
