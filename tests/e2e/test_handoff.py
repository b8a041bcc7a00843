"""Which weights a trained stage hands on: its best validation's (skill VAE, prior) or its last."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from tiny import PIPELINE, tiny_dataset, tiny_overrides

from ldcq.config import compose
from ldcq.errors import ConfigError
from ldcq.pipeline import run_pipeline


def _weights(result):
    return torch.load(result.artifact.path / "weights.pt", weights_only=True)


def test_the_best_validation_weights_are_handed_on_and_recorded(minari_root, tmp_path):
    tiny_dataset()
    stages = ["diffusion_prior"]
    best = run_pipeline(compose(PIPELINE, tiny_overrides(tmp_path / "a")), stages, track=False)
    last = run_pipeline(
        compose(PIPELINE, [*tiny_overrides(tmp_path / "b"), "skill_vae.handoff=last"]),
        ["skill_vae"],
        track=False,
    )
    handoff = best["skill_vae"].artifact.spec["handoff"]
    assert handoff["weights"] == "best" and handoff["monitor"] == "val/loss"
    assert handoff["step"] in (3, 6)  # validations of the tiny pipeline
    assert last["skill_vae"].artifact.spec["handoff"] == {"weights": "last"}
    assert best["diffusion_prior"].artifact.spec["handoff"]["weights"] == "best"
    a, b = _weights(best["skill_vae"])["skill_vae"], _weights(last["skill_vae"])["skill_vae"]
    same = all(torch.equal(a[k], b[k]) for k in a)
    # the same training; the weights differ exactly when the best validation was not the last
    assert same == (handoff["step"] == 6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("skill_vae.handoff=first", "skill_vae.handoff='first': valid values"),
        ("latent_bcq.handoff=best", "no validation loss"),
    ],
)
def test_a_bad_handoff_is_one_clear_error(minari_root, tmp_path, override, message):
    tiny_dataset()
    cfg = compose(PIPELINE, [*tiny_overrides(tmp_path), override])
    stage = override.split(".")[0]
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg, stages=[stage], track=False)
