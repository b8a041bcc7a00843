"""A tiny pipeline through the real config and entry points: train, skip, resume, track."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_episode, write_dataset

from ldcq.cli import main
from ldcq.config import compose
from ldcq.errors import ConfigError
from ldcq.pipeline import run_pipeline
from ldcq.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "pointmaze-umaze.yaml"


def tiny_overrides(tmp_path, dataset="test/tiny-v0", steps=6):
    stage_steps = [
        f"{s}.trainer.{k}={v}"
        for s in ("skill_vae", "diffusion_prior", "latent_bcq")
        for k, v in (("max_steps", steps), ("checkpoint_every_n_steps", 2))
    ]
    return [
        f"dataset={dataset}",
        f"checkpoints_dir={tmp_path / 'ckpt'}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "horizon=4",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        *stage_steps,
        "skill_vae.trainer.val_check_interval=3",
        "diffusion_prior.trainer.val_check_interval=3",
        "skill_vae.model.hidden_dim=16",
        "skill_vae.data.batch_size=8",
        "diffusion_prior.model.hidden_dims=[16,8]",
        "diffusion_prior.model.time_embed_dim=16",
        "diffusion_prior.model.state_embed_dim=16",
        "diffusion_prior.data.batch_size=8",
        "diffusion_prior.data.stride=1",
        "latent_bank.num_samples=4",
        "latent_bank.batch_size=64",
        "latent_bcq.model.hidden_dim=16",
        "latent_bcq.model.latent_hidden=8",
        "latent_bcq.data.batch_size=8",
        "latent_bcq.data.stride=1",
        "latent_bcq.data.steps_per_epoch=4",
        "evaluation.episodes=2",
        "evaluation.num_envs=2",
        "evaluation.num_samples=4",
    ]


@pytest.fixture
def tiny_dataset(minari_root):
    return write_dataset("test/tiny-v0", [random_episode(30, seed=s) for s in range(6)])


@pytest.fixture
def tiny_maze(minari_root):
    """pointmaze-umaze with 3000 steps (10 episodes of 300): a dataset with a real eval env."""
    from ldcq.data.pointmaze import generate_dataset

    return generate_dataset("pointmaze-umaze", 3000, seed=0, ref_episodes=2, progress=False)


def test_pipeline_trains_then_skips_everything(tiny_maze, tmp_path):
    overrides = tiny_overrides(tmp_path, dataset="pointmaze-umaze")
    cfg = compose(PIPELINE, overrides)
    first = run_pipeline(cfg)
    assert list(first) == list(STAGES)
    assert not any(r.skipped for r in first.values())
    for r in first.values():
        assert (r.artifact.path / "DONE").is_file()
        spec = json.loads((r.artifact.path / "spec.json").read_text())
        assert spec["dataset"]["id"] == "ldcq/pointmaze/umaze-v1"
    bcq_spec = first["latent_bcq"].artifact.spec
    assert bcq_spec["upstream"]["latent_bank"] == first["latent_bank"].artifact.fingerprint

    evaluation = first["evaluation"].artifact
    metrics = evaluation.metrics
    assert metrics["eval/episodes"] == 2 and 0.0 <= metrics["eval/success_rate"] <= 1.0
    assert "eval/normalized_score" in metrics
    for picture in (
        "rollouts.npz",
        "rollouts.png",
        "q_map.png",
        "latents.png",
        "training_curves.png",
    ):
        assert (evaluation.path / picture).stat().st_size > 0, picture

    again = run_pipeline(compose(PIPELINE, overrides))
    assert all(r.skipped for r in again.values())
    assert {k: r.artifact.path for k, r in again.items()} == {
        k: r.artifact.path for k, r in first.items()
    }

    # a changed hyperparameter retrains that stage and everything downstream, nothing upstream
    changed = run_pipeline(
        compose(
            PIPELINE, [*overrides, "diffusion_prior.model.lr=0.002", "evaluation.diagnostics=true"]
        )
    )
    assert [s for s, r in changed.items() if r.skipped] == ["skill_vae"]
    # ... and its evaluation carries the skill diagnostics, as metrics and a picture.
    diagnosed = changed["evaluation"].artifact
    assert 0.0 <= diagnosed.metrics["diag/oos_rate_diffusion"] <= 1.0
    assert 0.0 <= diagnosed.metrics["diag/pick_oos_rate"] <= 1.0
    assert (diagnosed.path / "diagnostics.png").stat().st_size > 0
    _check_tracked_runs(tmp_path)


def _check_tracked_runs(tmp_path):
    """Three pipeline runs, a child run per stage with its metrics and artifact files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pointmaze-umaze")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 3
    assert {r.data.tags["mlflow.runName"] for r in children} == set(STAGES)
    child = next(r for r in children if r.data.tags["mlflow.runName"] == "skill_vae")
    assert "train/loss" in child.data.metrics
    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"spec.json", "config.yaml", "metrics.json"} <= names
    ev = next(r for r in children if r.data.tags["mlflow.runName"] == "evaluation")
    assert "eval/normalized_score" in ev.data.metrics
    ev_files = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"rollouts.png", "q_map.png", "metrics.json"} <= ev_files


def test_unknown_key_and_bad_value_are_clear(tiny_dataset, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"did you mean 'skill_vae\.model\.beta'"):
        compose(PIPELINE, ["skill_vae.model.bta=0.1"])
    cfg = compose(PIPELINE, [*tiny_overrides(tmp_path), "skill_vae.model.lr=-1"])
    with pytest.raises(ConfigError, match=r"skill_vae\.model\.lr=-1"):
        run_pipeline(cfg, track=False)
    assert main(["pipeline", "run", str(PIPELINE), "skill_vae.model.bta=0.1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_killed_stage_resumes_from_last_checkpoint(tiny_dataset, tmp_path):
    overrides = [
        *tiny_overrides(tmp_path, steps=300),
        "skill_vae.trainer.checkpoint_every_n_steps=10",
        "skill_vae.trainer.val_check_interval=100",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ldcq.cli", "pipeline", "run", str(PIPELINE), *overrides]
    cmd += ["--stages", "skill_vae", "--no-tracking"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "ckpt" / "pointmaze-umaze" / ".work"
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob("skill_vae-*/last.ckpt")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(work.glob("skill_vae-*/last.ckpt")), "no checkpoint was written before the kill"
    assert not list((tmp_path / "ckpt" / "pointmaze-umaze").glob("skill_vae-*/DONE"))

    result = run_pipeline(compose(PIPELINE, overrides), stages=["skill_vae"], track=False)
    spec = result["skill_vae"].artifact.spec
    assert spec["resumed_from_step"] and spec["resumed_from_step"] > 0
    assert spec["global_step"] == 300
    # The stage's time, every attempt included; its ledger goes once the artifact is written.
    assert spec["seconds"] > 0
    assert not list(work.glob("*.seconds"))


def test_stages_run_alone_through_lightning_cli(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false"]
    vae_dir, prior_dir = tmp_path / "vae", tmp_path / "prior"
    vae_args = ["--data.dataset=test/tiny-v0", "--data.horizon=4", "--model.hidden_dim=16"]
    vae_args += ["--model.gru_layers=1", "--model.beta=0.1", f"--artifact_dir={vae_dir}"]
    assert main(["vae", "fit", *vae_args, *common]) == 0
    spec = json.loads((vae_dir / "spec.json").read_text())
    assert spec["modules"]["skill_vae"]["kwargs"]["beta"] == 0.1
    assert spec["dims"] == {"S": 4, "A": 2, "Z": 16, "H": 4}
    prior_args = ["--data.dataset=test/tiny-v0", f"--data.vae_artifact={vae_dir}"]
    prior_args += [
        "--model.hidden_dims=[16,8]",
        "--data.batch_size=8",
        f"--artifact_dir={prior_dir}",
    ]
    assert main(["prior", "fit", *prior_args, *common]) == 0
    assert (prior_dir / "DONE").is_file()
    # the wrong kind of artifact handed to a stage is one clear error
    assert (
        main(["prior", "fit", "--data.dataset=test/tiny-v0", f"--data.vae_artifact={prior_dir}"])
        == 2
    )


def test_pipeline_under_ddp_two_cpu_processes(tiny_maze, tmp_path):
    # Lightning's DDP launcher re-runs the command line in each child, so this runs as a subprocess.
    cmd = [sys.executable, "-m", "ldcq.cli", "pipeline", "run", str(PIPELINE), "--trainer", "ddp"]
    cmd += [*tiny_overrides(tmp_path, dataset="pointmaze-umaze"), "trainer.accelerator=cpu"]
    cmd += ["evaluation.pictures=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stderr + out.stdout
    assert "MEMBER: 2/2" in printed
    # Lightning's cloud-logger advert and its internal deprecation are not the user's business.
    assert "litlogger" not in printed and "LeafSpec" not in printed
    root = tmp_path / "ckpt" / "pointmaze-umaze"
    assert len(list(root.glob("*/DONE"))) == len(STAGES)
    bank = next(root.glob("latent_bank-*/bank.npy"))

    transitions = 10 * (300 - 4 + 1)
    assert np.load(bank, mmap_mode="r").shape == (transitions, 4, 16)


def test_pipeline_in_bf16_mixed_precision(tiny_maze, tmp_path, capsys):
    # The shared precision reaches every stage that does not set its own; the latent bank samples
    # in the prior's; each artifact's spec.json says which and why.
    overrides = [*tiny_overrides(tmp_path, dataset="pointmaze-umaze"), "evaluation.pictures=false"]
    cfg = compose(
        PIPELINE,
        [*overrides, "trainer.precision=bf16-mixed", "latent_bcq.trainer.precision=32-true"],
    )
    results = run_pipeline(cfg, track=False)
    for r in results.values():
        metrics = r.artifact.metrics
        assert all(np.isfinite(v) for v in metrics.values()), (r.stage, metrics)
    used = {
        s: (r.artifact.spec["precision"], r.artifact.spec["precision_reason"])
        for s, r in results.items()
    }
    assert used["latent_bcq"] == ("32-true", "set in the config")
    for stage in ("skill_vae", "diffusion_prior", "latent_bank"):
        assert used[stage] == ("bf16-mixed", "set in the config"), stage
    # The policy runs on this CPU: in bf16 where that is native here.
    from ldcq.precision import native_bf16

    assert used["evaluation"][0] == ("bf16-mixed" if native_bf16("cpu")[0] else "32-true")
    # ... and the run summary says so.
    from ldcq.cli import _print_summary

    _print_summary(cfg, results)
    printed = " ".join(capsys.readouterr().out.split())
    stages = "skill_vae, diffusion_prior, latent_bank" + (
        ", evaluation" if used["evaluation"][0] == "bf16-mixed" else ""
    )
    assert f"precision of {stages}: bf16-mixed: set in the config" in printed
    assert "precision of latent_bcq: 32-true: set in the config" in printed


@pytest.mark.parametrize("pipeline", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
@pytest.mark.parametrize("scale", ["quick", "cpu", "paper"])
def test_every_pipeline_composes_at_every_scale(pipeline, scale):
    cfg = compose(REPO / "pipelines" / pipeline, scale=scale)
    assert cfg.family in {"maze2d", "antmaze", "kitchen"}
    assert cfg.skill_vae.data.horizon == cfg.skill_vae.model.horizon == cfg.horizon


def test_downloaded_dataset_without_network_stops_at_once(minari_root, tmp_path, monkeypatch):
    from ldcq.data import minari_io
    from ldcq.errors import DatasetError

    monkeypatch.setattr(minari_io, "_remote_reachable", lambda timeout=3.0: False)
    cfg = compose(REPO / "pipelines" / "antmaze-large-diverse.yaml", tiny_overrides(tmp_path)[1:])
    with pytest.raises(DatasetError, match="minari download D4RL/antmaze/large-diverse-v1"):
        run_pipeline(cfg)
    assert not (tmp_path / "ckpt" / "antmaze-large-diverse").exists()
