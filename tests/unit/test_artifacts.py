"""The hand-off contract: atomic writes, DONE last, safe loading, clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ldcq.artifacts import (
    ArtifactError,
    check_dims,
    fingerprint,
    load_modules,
    read_artifact,
    write_artifact,
)
from ldcq.stages.skill_vae import SkillVAE


def small_vae() -> SkillVAE:
    return SkillVAE(state_dim=4, action_dim=2, horizon=5, latent_dim=3, hidden_dim=8, gru_layers=1)


def write(tmp_path, name="skill_vae-abc"):
    vae = small_vae()
    return vae, write_artifact(
        tmp_path / name,
        stage="skill_vae",
        modules={"skill_vae": (vae, dict(vae.hparams))},
        spec={
            "fingerprint": "abc",
            "dims": {"S": 4, "A": 2, "Z": 3, "H": 5},
            "dataset": {"id": "x/y-v0"},
        },
        config_yaml="model: {}\n",
        metrics={"val/loss": 1.0},
    )


def test_roundtrip_rebuilds_frozen_identical_module(tmp_path):
    vae, artifact = write(tmp_path)
    assert sorted(p.name for p in artifact.path.iterdir()) == [
        "DONE",
        "config.yaml",
        "metrics.json",
        "spec.json",
        "weights.pt",
    ]
    loaded = load_modules(read_artifact(artifact.path, "skill_vae"))["skill_vae"]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert json.loads((artifact.path / "spec.json").read_text())["modules"]["skill_vae"][
        "class"
    ] == ("ldcq.stages.skill_vae.SkillVAE")


def test_unfinished_folder_is_refused(tmp_path):
    _, artifact = write(tmp_path)
    (artifact.path / "DONE").unlink()
    with pytest.raises(ArtifactError, match="unfinished"):
        read_artifact(artifact.path)


def test_wrong_stage_and_wrong_dims(tmp_path):
    _, artifact = write(tmp_path)
    with pytest.raises(ArtifactError, match="'skill_vae' artifact, but a 'diffusion_prior'"):
        read_artifact(artifact.path, "diffusion_prior")
    with pytest.raises(ArtifactError, match="does not fit"):
        check_dims(artifact, {"S": 29, "dataset": "x/y-v0"}, "the prior")


def test_truncated_weights_are_a_clear_error(tmp_path):
    _, artifact = write(tmp_path)
    weights = artifact.path / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated, corrupted or pickles code"):
        load_modules(read_artifact(artifact.path))


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_weights_that_pickle_code_are_refused(tmp_path, capsys):
    _, artifact = write(tmp_path)
    with open(artifact.path / "weights.pt", "wb") as f:
        pickle.dump({"skill_vae": Payload()}, f)
    torch.save({"skill_vae": Payload()}, artifact.path / "weights.pt")
    with pytest.raises(ArtifactError, match="pickles code"):
        load_modules(read_artifact(artifact.path))
    assert "code ran" not in capsys.readouterr().out


def test_finished_artifact_is_never_overwritten(tmp_path):
    write(tmp_path)
    with pytest.raises(ArtifactError, match="already exists"):
        write(tmp_path)


def test_fingerprint_ignores_key_order():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


@pytest.mark.parametrize(
    "override", ["latent_bcq.data.stride=3", "obs_keys=[observation,desired_goal]"]
)
def test_bank_fingerprint_follows_the_transitions_it_is_drawn_at(tmp_path, override):
    from pathlib import Path

    from ldcq.config import compose
    from ldcq.pipeline import Context

    pipeline = Path(__file__).parents[2] / "pipelines" / "pointmaze-umaze.yaml"

    def fingerprints(*overrides):
        ctx = Context(compose(pipeline, list(overrides), scale="quick"), tmp_path, None, None)
        return {s: ctx.fingerprint(s, ["up"]) for s in ("diffusion_prior", "latent_bank")}

    base, changed = fingerprints(), fingerprints(override)
    assert changed["latent_bank"] != base["latent_bank"]
    if override.startswith("latent_bcq"):  # a latent_bcq key leaves the earlier stages alone
        assert changed["diffusion_prior"] == base["diffusion_prior"]
