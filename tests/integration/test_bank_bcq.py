"""The latent bank and stage 3 on a tiny dataset with tiny trained upstream stages (CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from conftest import random_episode, write_dataset
from helpers import tiny_diffusion_prior, tiny_skill_vae, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ldcq.artifacts import ArtifactError, load_modules, read_artifact
from ldcq.errors import ConfigError
from ldcq.stages import latent_bank as bank_module
from ldcq.stages.latent_bank import generate_bank, open_bank
from ldcq.stages.latent_bcq import LatentBCQ
from ldcq.stages.latent_data import LatentTransitionDataModule

DATASET = "test/bcq-v0"
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny dataset, a SkillVAE (H = 5, Z = 4) and a diffusion prior, as artifacts."""
    root = tmp_path_factory.mktemp("bcq")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
        episodes = [random_episode(40, seed=s) for s in range(6)]
        episodes[0]["terminations"] = np.eye(1, 40, 39, dtype=bool)[0]
        write_dataset(DATASET, episodes)
        vae = tiny_skill_vae(root, DATASET)
        prior = tiny_diffusion_prior(root, DATASET, vae)
        transitions = LatentTransitionDataModule(DATASET, str(vae)).transitions()
        yield {"root": root, "vae": vae, "prior": prior, "transitions": transitions}


def _prior(upstream):
    return load_modules(read_artifact(upstream["prior"]))["diffusion_prior"]


@pytest.fixture(scope="module")
def bank(upstream):
    states = upstream["transitions"]["next_states"]
    return generate_bank(
        _prior(upstream), states, upstream["root"] / "bank", 8, batch_size=64, trainer_kwargs=CPU
    )


def test_transitions_hold_h_step_windows(upstream):
    t = upstream["transitions"]
    n = 6 * (40 - 5 + 1)
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "states": (n, 4),
        "latents": (n, 4),
        "rewards": (n,),
        "next_states": (n, 4),
        "dones": (n,),
    }
    # s_{t+H} of a window is the s_t of the window H steps later in the same episode.
    torch.testing.assert_close(t["next_states"][:31], t["states"][5:36])
    # Episode 0 terminates at its last step: only its windows that contain that step are done.
    assert t["dones"][:36].sum() == 1 and t["dones"][35] == 1 and t["dones"][36:].sum() == 0


def test_bank_is_complete_float16_and_reused(upstream, bank, monkeypatch):
    data = open_bank(bank)
    assert data.shape == (len(upstream["transitions"]["states"]), 8, 4)
    assert data.dtype == np.float16 and np.isfinite(data).all()
    assert data.std() > 0
    assert not (bank.parent / bank_module.CHUNK_DIR).exists()

    def no_trainer(**kwargs):
        raise AssertionError("a finished bank must be returned without running the prior")

    monkeypatch.setattr(bank_module.L, "Trainer", no_trainer)
    states = upstream["transitions"]["next_states"]
    again = generate_bank(_prior(upstream), states, bank.parent, 8, batch_size=64)
    assert again == bank
    with pytest.raises(ConfigError, match="delete"):
        generate_bank(_prior(upstream), states, bank.parent, 8, batch_size=64, seed=1)


class _Killed(Exception):
    pass


class _Kill(L.Callback):
    """Counts predicted batches and fails after ``after`` of them, as a killed job would.

    It runs before the bank's writer, so the batch it fails on is never written.
    """

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += 1
        if self.seen > self.after:
            raise _Killed


def test_an_interrupted_bank_resumes_chunk_by_chunk(upstream, bank, tmp_path):
    states = upstream["transitions"]["next_states"]
    n_blocks = -(-len(states) // 64)
    kill = _Kill(after=2)
    with pytest.raises(_Killed):
        generate_bank(
            _prior(upstream), states, tmp_path, 8, batch_size=64,
            trainer_kwargs={**CPU, "callbacks": [kill]},
        )  # fmt: skip
    assert not (tmp_path / bank_module.BANK_FILE).exists()
    counter = _Kill(after=10**9)
    path = generate_bank(
        _prior(upstream), states, tmp_path, 8, batch_size=64,
        trainer_kwargs={**CPU, "callbacks": [counter]},
    )  # fmt: skip
    # The chunks written before the kill are kept; only the rest is computed, bit-identically.
    assert n_blocks > 3 and counter.seen == n_blocks - kill.after
    np.testing.assert_array_equal(open_bank(path), open_bank(bank))


@pytest.mark.slow
def test_the_bank_does_not_depend_on_the_number_of_ranks(upstream, bank, tmp_path):
    """Two DDP ranks on gloo (a subprocess: Lightning's DDP re-runs the command it starts from)."""
    torch.save(upstream["transitions"]["next_states"], tmp_path / "states.pt")
    script = tmp_path / "ddp_bank.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch
            from ldcq.artifacts import load_modules, read_artifact
            from ldcq.stages.latent_bank import generate_bank

            prior_dir, states_file, out = sys.argv[1:4]
            prior = load_modules(read_artifact(prior_dir))["diffusion_prior"]
            states = torch.load(states_file, weights_only=True)
            kwargs = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
            generate_bank(prior, states, out, 8, batch_size=64, trainer_kwargs=kwargs)
            """
        )
    )
    args = [str(upstream["prior"]), str(tmp_path / "states.pt"), str(tmp_path / "bank")]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(open_bank(tmp_path / "bank" / "bank.npy"), open_bank(bank))


@pytest.mark.parametrize("prioritized", [False, True])
def test_latent_bcq_trains_on_the_bank(upstream, bank, prioritized):
    vae_weights = torch.load(upstream["vae"] / "weights.pt", weights_only=True)["skill_vae"]
    dm = LatentTransitionDataModule(
        DATASET, str(upstream["vae"]), str(bank), batch_size=32, prioritized=prioritized,
        steps_per_epoch=6,
    )  # fmt: skip
    model = LatentBCQ(
        dm.state_dim, dm.latent_dim, horizon=dm.horizon, hidden_dim=32, latent_hidden=16,
        num_bank_samples=4,
    )  # fmt: skip
    trainer = tiny_trainer(10)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for key in ("train/q_loss", "train/q_mean", "train/target_mean", "train/td_abs"):
        assert torch.isfinite(metrics[key]), key
    assert trainer.global_step == 10
    # The frozen VAE is untouched, bit for bit.
    for name, value in dm.vae.state_dict().items():
        assert torch.equal(value, vae_weights[name]), name
    # Targets follow the online nets by Polyak averaging: moved, but not equal to them.
    online = torch.cat([p.flatten() for p in model.q.parameters()])
    target = torch.cat([p.flatten() for p in model.target_q.parameters()])
    assert not torch.equal(online, target)
    torch.testing.assert_close(model.state_normalizer.mean, dm.state_normalizer.mean)
    if prioritized:
        leaves = dm.replay.tree.leaves(np.arange(len(dm.replay)))
        assert len(np.unique(leaves)) > 1 and dm.replay.calls >= 10
        assert "replay" in dm.state_dict()
        # β anneals over the stage's own max_steps unless per_beta_steps is set: it reached 1
        assert dm.replay.beta_steps == 10 and dm.replay.beta == 1.0


def test_prioritized_training_resumes_with_its_replay_state(upstream, bank, tmp_path):
    def run(max_steps: int, ckpt_path=None):
        dm = LatentTransitionDataModule(
            DATASET, str(upstream["vae"]), str(bank), batch_size=16, prioritized=True,
            steps_per_epoch=4,
        )  # fmt: skip
        model = LatentBCQ(dm.state_dim, dm.latent_dim, horizon=dm.horizon, hidden_dim=16)
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return trainer, dm

    _, first = run(6)
    trainer, resumed = run(10, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 10
    # The sum tree and the β schedule's clock come back from the checkpoint.
    assert resumed.replay.calls >= 10 > first.replay.calls >= 6
    assert resumed.replay.max_priority >= first.replay.max_priority


def test_a_bank_of_other_transitions_is_refused(upstream, tmp_path):
    np.save(tmp_path / "bank.npy", np.zeros((7, 8, 4), dtype=np.float16))
    dm = LatentTransitionDataModule(DATASET, str(upstream["vae"]), str(tmp_path / "bank.npy"))
    with pytest.raises(ArtifactError, match=r"bank\.npy.*generate it again"):
        dm.setup("fit")
    dm = LatentTransitionDataModule(DATASET, str(upstream["vae"]))
    with pytest.raises(ConfigError, match="bank_path"):
        dm.setup("fit")


def test_a_model_that_does_not_fit_its_data_is_refused(upstream, bank):
    dm = LatentTransitionDataModule(DATASET, str(upstream["vae"]), str(bank), gamma=0.9)
    model = LatentBCQ(dm.state_dim, dm.latent_dim, horizon=dm.horizon, gamma=0.99)
    with pytest.raises(ConfigError, match="gamma"):
        tiny_trainer(1).fit(model, dm)


def test_the_bank_and_the_policy_sample_through_the_compiled_denoiser_when_asked(
    upstream, monkeypatch, tmp_path
):
    from ldcq.evaluation.policy import LDCQPolicy

    calls = []

    def fake_compile(fn, **kwargs):  # stands in for Inductor: counts the compiled calls
        def run(*a, **kw):
            calls.append(1)
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    prior = _prior(upstream)
    states = upstream["transitions"]["next_states"][:6]
    kwargs = {"sampling_steps": 3, "batch_size": 4, "trainer_kwargs": CPU}
    eager = np.load(generate_bank(prior, states, tmp_path / "eager", 2, **kwargs))
    assert calls == []
    fused = np.load(generate_bank(prior, states, tmp_path / "fused", 2, **kwargs, compile=True))
    assert len(calls) == 2 * 3  # two batches × three denoiser calls, all through the compile
    np.testing.assert_array_equal(fused, eager)

    calls.clear()
    vae = load_modules(read_artifact(upstream["vae"]))["skill_vae"]
    q = LatentBCQ(state_dim=4, latent_dim=4, horizon=5, hidden_dim=8, latent_hidden=8)
    policies = [
        LDCQPolicy(vae, prior, q, num_samples=3, sampling_steps=2, compile=c) for c in (False, True)
    ]
    actions = [p.act(states.numpy()) for p in policies]
    assert len(calls) == 2  # the compiled policy's one re-plan: two denoiser calls
    np.testing.assert_array_equal(actions[1], actions[0])

    # A value that is not a boolean is one clear error naming the key, before anything samples.
    with pytest.raises(ConfigError, match=r"evaluation.compile='yes': must be true or false"):
        LDCQPolicy(vae, prior, q, compile="yes")
    from ldcq.stages.latent_bank import check_bank_settings

    with pytest.raises(ConfigError, match=r"latent_bank.compile='maybe'"):
        check_bank_settings(2, "ddim", 3, 0, compile="maybe")
