"""Every bad input ends in one ``ldcq: error: …`` line (exit code 2) naming the input and the fix,
with no finished work lost."""

from __future__ import annotations

import errno
import os
import pickle
import socket
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tiny import PIPELINE, UP_TO_BCQ, pipeline_root, tiny_dataset, tiny_overrides

from ldcq.artifacts import ArtifactError, load_modules, read_artifact
from ldcq.cli import main
from ldcq.config import compose
from ldcq.data.minari_io import episodes_from_dicts
from ldcq.errors import ConfigError, DatasetError, LdcqError
from ldcq.pipeline import run_pipeline


def _error_line(capsys) -> str:
    """The last stderr line, which must be the only message a user sees for the error."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("ldcq: error: ")
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every stage of the tiny pipeline, trained once for this module (do not modify)."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tmp / "minari"))
        tiny_dataset()
        tiny_dataset("test/other-v0", episodes=4)
        run_pipeline(compose(PIPELINE, tiny_overrides(tmp)), stages=UP_TO_BCQ, track=False)
        yield tmp


def _finished(root) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/DONE")}


# --- dataset contents ---------------------------------------------------------------------------


def _episode(n=10, **fields):
    rng = np.random.default_rng(0)
    ep = {
        "observations": {"observation": rng.normal(size=(n + 1, 4))},
        "actions": rng.uniform(-1, 1, size=(n, 2)),
        "rewards": np.zeros(n),
        "terminations": np.zeros(n, dtype=bool),
        "truncations": np.zeros(n, dtype=bool),
    }
    return {**ep, **fields}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"actions": None}, r"episode 0 has no 'actions'"),
        (
            {"observations": {"observation": np.full((11, 4), "x")}},
            r"'observation' has shape \(11, 4\) and dtype <U1, but numeric .* obs_keys",
        ),
        ({"observations": {"goal": np.zeros((11, 2))}}, r"set the data config's obs_keys"),
        ({"actions": np.zeros((10, 2, 3))}, r"'actions' has shape \(10, 2, 3\)"),
        ({"rewards": np.full(10, "a")}, r"'rewards' has shape \(10,\) and dtype <U1"),
        ({"rewards": np.zeros((10, 2))}, r"'rewards' has shape \(10, 2\)"),
        ({"terminations": np.zeros(9, dtype=bool)}, r"10 actions but 9 terminations"),
        ({"rewards": np.full(10, np.nan)}, r"NaN or inf in its observations, actions or rewards"),
    ],
)
def test_malformed_dataset_contents_are_one_clear_error(fields, message):
    with pytest.raises(DatasetError, match=message) as info:
        episodes_from_dicts([_episode(**fields)], dataset_id="test/bad-v0")
    assert "test/bad-v0" in str(info.value)
    assert "regenerate" in str(info.value) or "obs_keys" in str(info.value)


def test_a_stored_dataset_with_3d_actions_through_the_cli(minari_root, capsys):
    import minari
    from minari.data_collector import EpisodeBuffer

    n = 10
    buffer = EpisodeBuffer(
        id=0,
        observations=np.zeros((n + 1, 4)),
        actions=np.zeros((n, 2, 3), dtype=np.float32),
        rewards=np.zeros(n),
        terminations=np.zeros(n, dtype=bool),
        truncations=np.eye(1, n, n - 1, dtype=bool)[0],
    )
    minari.create_dataset_from_buffers(
        "test/act3d-v0",
        [buffer],
        observation_space=gym.spaces.Box(-np.inf, np.inf, (4,)),
        action_space=gym.spaces.Box(-1, 1, (2, 3), np.float32),
        algorithm_name="test",
    )
    assert main(["data", "show", "test/act3d-v0"]) == 2
    assert "'actions' has shape (10, 2, 3)" in _error_line(capsys)


def test_episodes_shorter_than_the_horizon_through_the_pipeline(minari_root, tmp_path, capsys):
    tiny_dataset()
    args = ["pipeline", "run", str(PIPELINE), *tiny_overrides(tmp_path), "horizon=40"]
    assert main([*args, "--stages", "skill_vae", "--no-tracking"]) == 2
    line = _error_line(capsys)
    assert "no episode with at least 41 states" in line and "lower the skill horizon" in line


# --- configuration ------------------------------------------------------------------------------


def test_unknown_stage_cli_option_suggests_the_closest(capsys):
    assert main(["vae", "fit", "--model.bta", "0.1"]) == 2
    assert "unknown option '--model.bta' (did you mean '--model.beta'?)" in _error_line(capsys)
    assert main(["vae", "fit", "--model.lr=abc"]) == 2
    assert 'Parser key "model.lr"' in _error_line(capsys)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["skill_vae.model.lr=0"], "skill_vae.model.lr=0: must be > 0"),
        (["skill_vae.model.lr=abc"], "skill_vae.model.lr='abc': must be > 0"),
        (["horizon=0"], "skill_vae.model.horizon=0: must be > 0"),
        (["skill_vae.data.batch_size=0"], "skill_vae.data.batch_size must be >= 1, got 0"),
        (["skill_vae.trainer.max_steps=-5"], "trainer settings of skill_vae are not valid"),
        (["diffusion_prior.model.num_steps=0"], "diffusion_prior.model.num_steps=0: must be > 0"),
        (["diffusion_prior.model.lr=-1"], "diffusion_prior.model.lr=-1: must be > 0"),
        (["diffusion_prior.data.batch_size=0"], "diffusion_prior.data.batch_size=0: must be > 0"),
        (["latent_bank.num_samples=0"], "latent_bank.num_samples=0: must be > 0"),
        (["latent_bank.sampling_steps=0"], "latent_bank.sampling_steps=0: must be > 0"),
        (["latent_bank.sampler=ddpx"], "latent_bank.sampler='ddpx': valid samplers are"),
        (
            ["latent_bank.num_samples=3", "latent_bcq.data.batch_size=0"],
            "latent_bcq.data.batch_size=0: must be > 0",
        ),
        (["latent_bcq.model.gamma=1.5"], "latent_bcq.model.gamma=1.5: must be in (0, 1]"),
        (["latent_bcq.model.gamma=0"], "latent_bcq.model.gamma=0: must be in (0, 1]"),
        (["latent_bcq.model.lr=-1"], "latent_bcq.model.lr=-1: must be > 0"),
        (["latent_bcq.model.num_bank_samples=0"], "latent_bcq.model.num_bank_samples=0"),
        (["latent_bcq.model.num_bank_samples=99"], "exceeds latent_bank.num_samples=4"),
    ],
)
def test_invalid_values_name_the_key_and_keep_finished_stages(trained, overrides, message):
    root = pipeline_root(trained)
    before = _finished(root)
    cfg = compose(PIPELINE, [*tiny_overrides(trained), *overrides])
    with pytest.raises(ConfigError) as info:
        run_pipeline(cfg, stages=UP_TO_BCQ, track=False)
    assert message in str(info.value)
    assert _finished(root) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("latent_bank.compile=maybe", "latent_bank.compile='maybe': must be true or false"),
        ("latent_bank.sampler=ddpx", "latent_bank.sampler='ddpx': valid samplers are"),
        ("evaluation.compile=1", "evaluation.compile=1: must be true or false"),
        ("evaluation.selector=best", "evaluation.selector='best': valid selectors are"),
        ("evaluation.num_samples=0", "evaluation.num_samples=0: must be an integer >= 1"),
        ("latent_bcq.model.gamma=2", "latent_bcq.model.gamma=2: must be in (0, 1]"),
        ("latent_bcq.model.compile=yes please", "latent_bcq.model.compile='yes please': must be"),
        ("latent_bcq.handoff=best", "latent_bcq.handoff=best: the Q stage has no validation"),
        ("latent_bcq.model.num_bank_samples=99", "num_bank_samples=99 exceeds latent_bank."),
        ("skill_vae.model.latent_dim=abc", "skill_vae.model.latent_dim='abc': must be > 0"),
        ("skill_vae.model.policy=rnn", "skill_vae.model.policy='rnn': valid values are"),
        ("evaluation.goal=random", "evaluation.goal='random': valid values are"),
        ("evaluation.sampler=euler", "evaluation.sampler='euler': valid samplers are"),
        ("evaluation.sampling_steps=0", "evaluation.sampling_steps=0: must be > 0"),
        ("evaluation.episodes=0", "evaluation.episodes=0: must be > 0"),
    ],
)
def test_a_later_stage_value_fails_before_the_first_stage_trains(
    trained, tmp_path, override, message
):
    """A bad value of the bank, Q or evaluation section is refused before the skill VAE trains,
    not after the stages ahead of it spent their hours."""
    overrides = [*tiny_overrides(trained), f"checkpoints_dir={tmp_path / 'fresh'}", override]
    with pytest.raises(ConfigError) as info:
        run_pipeline(compose(PIPELINE, overrides), track=False)
    assert message in str(info.value)
    assert not list((tmp_path / "fresh").glob("**/skill_vae-*"))


# --- artifacts ----------------------------------------------------------------------------------


def _vae_folder(trained):
    return next(pipeline_root(trained).glob("skill_vae-*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.dataset=test/other-v0"], "dataset: artifact 'test/tiny-v0' vs"),
        (
            ["--data.dataset=test/tiny-v0", "--data.obs_keys=[observation,desired_goal]"],
            "S: artifact 4 vs this stage's data.obs_keys 6",
        ),
    ],
)
def test_an_artifact_of_other_data_is_refused_by_a_stage(trained, capsys, args, message):
    vae = _vae_folder(trained)
    assert main(["prior", "fit", *args, f"--data.vae_artifact={vae}"]) == 2
    line = _error_line(capsys)
    assert f"artifact {vae} does not fit" in line and message in line


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("damage", ["truncated", "pickled code"])
def test_a_damaged_upstream_artifact_names_the_folder_to_delete(
    minari_root, tmp_path, capsys, damage
):
    tiny_dataset()
    overrides = tiny_overrides(tmp_path)
    run_pipeline(compose(PIPELINE, overrides), stages=["skill_vae"], track=False)
    folder = next(pipeline_root(tmp_path).glob("skill_vae-*"))
    weights, marker = folder / "weights.pt", tmp_path / "code-ran"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        weights.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    args = ["pipeline", "run", str(PIPELINE), *overrides, "--stages", "diffusion_prior"]
    assert main([*args, "--no-tracking"]) == 2
    line = _error_line(capsys)
    assert f"{weights} cannot be loaded as plain weights" in line
    assert f"Delete {folder} and rerun the pipeline" in line
    assert not marker.exists() and (folder / "DONE").is_file()


# --- training -----------------------------------------------------------------------------------


def test_a_nan_loss_stops_the_pipeline_and_fails_its_mlflow_runs(minari_root, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    tiny_dataset()
    overrides = [*tiny_overrides(tmp_path), "skill_vae.model.lr=1e30"]
    args = ["pipeline", "run", str(PIPELINE), *overrides, "--stages", "skill_vae"]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "ldcq: error: skill_vae: the training loss became" in line
    assert "at global step" in line and "skill_vae.model.lr" in line
    assert not list(pipeline_root(tmp_path).glob("skill_vae-*"))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pointmaze-umaze")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}


# --- environment --------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_fails_fast_naming_it(
    minari_root, tmp_path, capsys, monkeypatch
):
    tiny_dataset()
    uri = f"http://127.0.0.1:{_closed_port()}"
    args = ["pipeline", "run", str(PIPELINE), *tiny_overrides(tmp_path), f"tracking_uri={uri}"]
    start = time.perf_counter()
    assert main([*args, "--stages", "skill_vae"]) == 2
    assert time.perf_counter() - start < 15
    line = _error_line(capsys)
    assert f"MLflow tracking server {uri} cannot be reached" in line and "unset both" in line
    assert not list(pipeline_root(tmp_path).glob("skill_vae-*"))

    # the stages alone read MLFLOW_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["vae", "fit", "--data.dataset=test/tiny-v0", "--trainer.max_steps=1"]) == 2
    assert f"MLflow tracking server {uri} cannot be reached" in _error_line(capsys)


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_an_artifact_keeps_everything_finished(
    minari_root, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    tiny_dataset()
    overrides = tiny_overrides(tmp_path)
    root = pipeline_root(tmp_path)
    run_pipeline(compose(PIPELINE, overrides), stages=["skill_vae"])
    vae = next(root.glob("skill_vae-*"))

    real_write = Path.write_bytes

    def write_bytes(self, data):
        if self.name == "weights.pt":  # the disk fills up while the weights are written
            real_write(self, bytes(data)[:100])
            _full_disk()
        return real_write(self, data)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", write_bytes)
        with pytest.raises(ArtifactError, match=r"diffusion_prior-\w+: the disk is full"):
            run_pipeline(compose(PIPELINE, overrides), stages=["diffusion_prior"])
    assert not list(root.glob("diffusion_prior-*")), "an unfinished artifact is left"
    assert not list(root.glob("*.tmp-*")), "a half-written folder is left"
    load_modules(read_artifact(vae, "skill_vae"))
    assert list(root.glob(".work/diffusion_prior-*/last.ckpt")), "the trained weights were lost"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pointmaze-umaze").experiment_id])
    failed = {r.data.tags["mlflow.runName"] for r in runs if r.info.status == "FAILED"}
    assert "diffusion_prior" in failed

    # once there is space again, the same command finishes from the kept checkpoint
    again = run_pipeline(compose(PIPELINE, overrides), stages=["diffusion_prior"], track=False)
    assert again["diffusion_prior"].artifact.spec["resumed_from_step"] == 6


def test_a_full_disk_at_the_bank_artifact_keeps_the_sampled_bank(
    minari_root, tmp_path, monkeypatch
):
    import ldcq.artifacts
    import ldcq.stages.latent_bank

    tiny_dataset()
    overrides = tiny_overrides(tmp_path)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst).startswith("latent_bank-"):
            _full_disk()
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ldcq.artifacts.os, "replace", replace)
        with pytest.raises(ArtifactError, match="the disk is full"):
            run_pipeline(compose(PIPELINE, overrides), stages=["latent_bank"], track=False)
    root = pipeline_root(tmp_path)
    assert list(root.glob(".work/latent_bank-*/bank.npy")), "the sampled bank was lost"
    assert not list(root.glob("latent_bank-*")) and not list(root.glob(".latent_bank-*"))

    def no_resampling(*args, **kwargs):
        raise AssertionError("the bank was sampled again")

    monkeypatch.setattr(ldcq.stages.latent_bank.PriorSampler, "predict_step", no_resampling)
    again = run_pipeline(compose(PIPELINE, overrides), stages=["latent_bank"], track=False)
    assert again["latent_bank"].skipped is False
    assert (again["latent_bank"].artifact.path / "bank.npy").is_file()


def test_a_full_disk_anywhere_else_is_one_line(minari_root, tmp_path, capsys, monkeypatch):
    import ldcq.stages.latent_bank

    tiny_dataset()
    monkeypatch.setattr(ldcq.stages.latent_bank, "write_chunk", _full_disk)
    args = ["pipeline", "run", str(PIPELINE), *tiny_overrides(tmp_path), "--stages", "latent_bank"]
    assert main([*args, "--no-tracking"]) == 2
    line = _error_line(capsys)
    assert "no space left on device" in line and "finished stages are kept" in line
    assert len(list(pipeline_root(tmp_path).glob("*/DONE"))) == 2


def test_errors_raised_inside_lightning_keep_their_type():
    # Lightning re-raises what a hook raised; the CLI relies on it to print LdcqError alone.
    import lightning as L

    class Boom(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            raise ConfigError("model.x=1: boom")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, barebones=True)
    with pytest.raises(LdcqError, match=r"model\.x=1: boom"):
        trainer.fit(Boom())
