"""`ldcq sweep` on tiny data: the grid is checked before anything trains, the runs share what a
point does not change, the comparison is written and tracked, a killed sweep resumes, and the
SLURM path runs through submitit's local executor."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_pipeline import tiny_overrides

from ldcq.cli import main
from ldcq.sweep import grid as sweep_grid

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "pointmaze-umaze.yaml"
SCHEDULE = "pointmaze-umaze-quick-diffusion_prior.model.schedule"


@pytest.fixture
def tiny_maze(minari_root):
    from ldcq.data.pointmaze import generate_dataset

    return generate_dataset("pointmaze-umaze", 3000, seed=0, ref_episodes=2, progress=False)


def _args(tmp_path, *grid, seeds=1, extra=()):
    overrides = [
        *tiny_overrides(tmp_path, dataset="pointmaze-umaze"),
        "evaluation.pictures=false",
        "latent_bcq.trainer.max_steps=4",
    ]
    out = ["sweep", str(PIPELINE), *overrides, "--seeds", str(seeds)]
    out += ["--out-dir", str(tmp_path / "sweeps"), *extra]
    for g in grid:
        out += ["--grid", g]
    return out


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            "skill_vae.model.latnt_dim=4,8",
            "unknown config key; did you mean 'skill_vae.model.latent_dim'",
        ),
        ("skill_vae.model.latent_dim=4,eight", "value 'eight' is a string, but"),
        ("skill_vae.model.beta=0.1,true", "value 'true' is a boolean"),
        ("diffusion_prior.model.latent_dim=4,8", "reads it from the dataset or the skill VAE"),
        ("skill_vae.model.horizon=4,8", "it follows horizon (${horizon}): sweep horizon instead"),
        ("seed=0,1", "cannot be swept (use --seeds)"),
        ("evaluation.selector=q,prior", "use --selectors"),
        ("diffusion_prior.model.schedule=linear,cosin", "unknown schedule 'cosin'"),
        ("latent_bank.sampler=ddim,dpm", "latent_bank.sampler='dpm': valid samplers"),
        ("diffusion_prior.model.denoiser=mlp,resnet", "valid denoisers are"),
        ("horizon", "write key=v1,v2"),
        ("horizon=4,4", "a value is empty or repeated"),
    ],
)
def test_a_bad_grid_is_one_clear_error_before_anything_trains(tmp_path, capsys, grid, message):
    assert main(_args(tmp_path, grid)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error") == 1
    assert not (tmp_path / "ckpt").exists()


def test_a_sweep_makes_a_missing_generated_dataset_first_and_records_nothing_if_it_fails(
    minari_root, tmp_path, monkeypatch, capsys
):
    """Like bench-score, a sweep on a fresh machine generates its dataset before the first run;
    a sweep whose runs all fail leaves no empty results file behind to be committed."""
    import ldcq.sweep.run as sweep_run

    asked = []
    monkeypatch.setattr(sweep_run, "ensure_dataset", asked.append)  # generates nothing
    assert main(_args(tmp_path, "skill_vae.model.beta=0.05,0.1", extra=["--no-tracking"])) == 2
    assert asked == ["pointmaze-umaze"]  # once for the sweep, not once per run
    assert "ldcq data generate pointmaze-umaze" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("selectors", ["vae-prior", "q,bc"])
def test_selectors_must_include_ldcq_and_be_known(tmp_path, capsys, selectors):
    assert main(_args(tmp_path, "horizon=4,5", extra=["--selectors", selectors])) == 2
    assert "--selectors" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "ckpt").exists()


def test_grid_values_parse_as_overrides_do(tmp_path):
    typed = sweep_grid.check_grid(
        PIPELINE,
        "quick",
        {"skill_vae.model.beta": ["1e-2", "1"], "diffusion_prior.model.hidden_dims": ["[16,8]"]},
        [],
    )
    assert typed == {
        "skill_vae.model.beta": [0.01, 1.0],
        "diffusion_prior.model.hidden_dims": [[16, 8]],
    }


def test_grid_values_split_outside_brackets():
    assert sweep_grid.split_values("[128,32],[256, 64]") == ["[128,32]", "[256, 64]"]
    assert sweep_grid.parse_grid(["horizon=10,20", "a.b=x"]) == {
        "horizon": ["10", "20"],
        "a.b": ["x"],
    }


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pointmaze-umaze")
    return client, client.search_runs([exp.experiment_id], max_results=500)


def test_the_runs_go_seed_by_seed_so_a_cut_short_sweep_compares_every_value(tmp_path):
    from ldcq.sweep.run import Sweep

    sweep = Sweep(
        PIPELINE,
        {"horizon": [10, 20, 30]},
        seeds=2,
        scale="quick",
        overrides=[f"checkpoints_dir={tmp_path / 'ckpt'}"],
        out_dir=tmp_path / "sweeps",
        track=False,
    )
    jobs = sweep.jobs(parent_run=None, shared=False)
    assert [(j.seed, j.point["horizon"]) for j in jobs] == [
        (0, 10), (0, 20), (0, 30), (1, 10), (1, 20), (1, 30)
    ]  # fmt: skip
    assert len({j.key for j in jobs}) == 6


def test_a_sweep_shares_upstream_stages_compares_and_skips_what_it_recorded(
    tiny_maze, tmp_path, capsys
):
    args = _args(tmp_path, "diffusion_prior.model.schedule=linear,cosine")
    assert main(args) == 0
    out, err = capsys.readouterr()
    err = " ".join(err.split())  # the console wraps long lines
    assert (
        "sweep pointmaze-umaze-quick-diffusion_prior.model.schedule" in out
        and "2 runs, 0 recorded before" in err
    )
    data = json.loads((tmp_path / "sweeps" / f"{SCHEDULE}.json").read_text())
    runs = data["runs"]
    # In the grid's order, which the table and the plot follow.
    assert [(r["point"]["diffusion_prior.model.schedule"], r["selector"]) for r in runs] == [
        ("linear", "q"),
        ("linear", "vae-prior"),
        ("cosine", "q"),
        ("cosine", "vae-prior"),
    ]
    # The schedule leaves the skill VAE alone: one VAE for both points; two priors.
    fps = {(r["fingerprints"]["skill_vae"], r["fingerprints"]["diffusion_prior"]) for r in runs}
    assert len({vae for vae, _ in fps}) == 1 and len({prior for _, prior in fps}) == 2
    # Every run carries its diagnostics; BC's evaluation shares LDCQ's trained stages.
    for r in runs:
        assert 0.0 <= r["metrics"]["diag/oos_rate_diffusion"] <= 1.0
        assert 0.0 <= r["metrics"]["diag/pick_oos_rate"] <= 1.0
        assert "diag/recon_mse" in r["metrics"] and r["git_sha"] and r["command"]
        assert -1.0 <= r["metrics"]["diag/value_distance_corr"] <= 1.0
        # Q's convergence, from the Q stage's q_mean history in MLflow (finite: it was logged)
        assert math.isfinite(r["metrics"]["diag/q_mean_late_change"])
        assert (
            0.0
            <= r["metrics"]["diag/stalled_top_cell_share"]
            <= r["metrics"]["diag/stalled_share"]
            <= 1.0
        )
    summary = data["summary"]
    assert len(summary["rows"]) == 4 and summary["rows"][0]["seeds"] == [0]
    assert "diffusion_prior.model.schedule" in summary["effects"]
    plot = tmp_path / "sweeps" / f"{SCHEDULE}.png"
    assert plot.stat().st_size > 0

    # MLflow: one sweep run, every pipeline run nested under it, the comparison on it.
    client, all_runs = _runs(tmp_path)
    sweeps = [r for r in all_runs if r.data.tags.get("ldcq.sweep")]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    sweep_id = sweeps[0].info.run_id
    pipelines = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == sweep_id]
    assert len(pipelines) == 4  # two points × (LDCQ, BC)
    logged = {a.path for a in client.list_artifacts(sweep_id)}
    assert {f"{SCHEDULE}.json", plot.name} <= logged

    # The same command again runs nothing and reuses the sweep's MLflow run.
    assert main(args) == 0
    assert "2 runs, 2 recorded before, 0 to run" in " ".join(capsys.readouterr().err.split())
    _, again = _runs(tmp_path)
    assert len(again) == len(all_runs)
    # One more seed trains only seed 1 (its runs nest under the same sweep run).
    args[args.index("--seeds") + 1] = "2"
    assert main(args) == 0
    assert "4 runs, 2 recorded before, 2 to run" in " ".join(capsys.readouterr().err.split())
    _, more = _runs(tmp_path)
    assert len([r for r in more if r.data.tags.get("ldcq.sweep")]) == 1
    nested = [r for r in more if r.data.tags.get("mlflow.parentRunId") == sweep_id]
    assert len(nested) == 8
    data = json.loads((tmp_path / "sweeps" / f"{SCHEDULE}.json").read_text())
    assert {row["seeds"] == [0, 1] for row in data["summary"]["rows"]} == {True}


def test_a_killed_sweep_rerun_skips_its_finished_runs(tiny_maze, tmp_path):
    args = _args(tmp_path, "skill_vae.model.beta=0.05,0.1", extra=["--no-tracking"])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldcq.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runs_dir = (
        tmp_path
        / "ckpt"
        / "pointmaze-umaze"
        / "sweeps"
        / "pointmaze-umaze-quick-skill_vae.model.beta"
        / "runs"
    )
    results = tmp_path / "sweeps" / "pointmaze-umaze-quick-skill_vae.model.beta.json"
    deadline = time.time() + 300
    # Killed once the first run is recorded (its record, then the results file rewritten).
    while time.time() < deadline and not results.is_file():
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(runs_dir.glob("*.json"))
    assert len(first) == 1
    before = first[0].read_text()
    # The results file holds that run: it survives losing the checkpoints folder.
    assert [r["key"] for r in json.loads(results.read_text())["runs"]][:1] == [first[0].stem]

    assert main(args) == 0
    data = json.loads(
        (tmp_path / "sweeps" / "pointmaze-umaze-quick-skill_vae.model.beta.json").read_text()
    )
    assert len(data["runs"]) == 4
    # The run finished before the kill was not run again.
    assert first[0].read_text() == before
    done_before = json.loads(before)
    kept = [r for r in data["runs"] if r["key"] == done_before[0]["key"]]
    assert [r["command_s"] for r in kept] == [r["command_s"] for r in done_before]


def test_the_slurm_path_runs_as_a_job_array_through_the_local_executor(tiny_maze, tmp_path):
    # Two points that share the skill VAE, as two concurrent tasks on one checkpoints folder:
    # the artifact lock lets one of them train it while the other waits.
    args = _args(
        tmp_path,
        "diffusion_prior.model.denoiser=film_unet,mlp",
        extra=["--launcher", "submitit-local", "--timeout-min", "20"],
    )
    assert main(args) == 0
    data = json.loads(
        (
            tmp_path / "sweeps" / "pointmaze-umaze-quick-diffusion_prior.model.denoiser.json"
        ).read_text()
    )
    assert len(data["runs"]) == 4
    assert len({r["fingerprints"]["skill_vae"] for r in data["runs"]}) == 1
    root = tmp_path / "ckpt" / "pointmaze-umaze"
    assert len(list(root.glob("skill_vae-*"))) == 1
    assert (
        len(
            list(
                (
                    root
                    / "sweeps"
                    / "pointmaze-umaze-quick-diffusion_prior.model.denoiser"
                    / "submitit"
                ).glob("*")
            )
        )
        > 0
    )
    _, all_runs = _runs(tmp_path)
    sweep_id = next(r.info.run_id for r in all_runs if r.data.tags.get("ldcq.sweep"))
    assert len([r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == sweep_id]) == 4
