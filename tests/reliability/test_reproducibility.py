"""Same seed, same config, same machine (CPU): identical stage metrics, weights and bank."""

from __future__ import annotations

import numpy as np
import torch
from tiny import PIPELINE, UP_TO_BCQ, tiny_dataset, tiny_overrides

from ldcq.pipeline import compose, run_pipeline


def _run(tmp_path, *extra, stages=UP_TO_BCQ):
    tmp_path.mkdir(exist_ok=True)
    cfg = compose(PIPELINE, [*tiny_overrides(tmp_path), *extra])
    return run_pipeline(cfg, stages=stages, track=False)


def test_same_seed_and_config_give_identical_stages(minari_root, tmp_path):
    tiny_dataset()
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    for stage, a in first.items():
        b = second[stage]
        assert a.artifact.fingerprint == b.artifact.fingerprint
        assert a.artifact.path != b.artifact.path
        assert a.artifact.metrics == b.artifact.metrics, stage
        wa = torch.load(a.artifact.path / "weights.pt", weights_only=True)
        wb = torch.load(b.artifact.path / "weights.pt", weights_only=True)
        assert wa.keys() == wb.keys()
        for module in wa:
            for k, tensor in wa[module].items():
                assert torch.equal(tensor, wb[module][k]), (stage, k)
    bank_a = np.load(first["latent_bank"].artifact.path / "bank.npy")
    bank_b = np.load(second["latent_bank"].artifact.path / "bank.npy")
    assert np.array_equal(bank_a, bank_b)

    # ... and the seed matters: another seed, other metrics
    other = _run(tmp_path / "c", "seed=1", stages=["skill_vae"])
    assert other["skill_vae"].artifact.metrics != first["skill_vae"].artifact.metrics
