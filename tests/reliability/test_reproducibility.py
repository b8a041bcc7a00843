"""Same seed, same config, same machine (CPU): identical stage metrics, weights and bank."""

from __future__ import annotations

from tiny import PIPELINE, UP_TO_BCQ, assert_identical, tiny_dataset, tiny_overrides

from ldcq.config import compose
from ldcq.pipeline import run_pipeline


def _run(tmp_path, *extra, stages=UP_TO_BCQ):
    tmp_path.mkdir(exist_ok=True)
    cfg = compose(PIPELINE, [*tiny_overrides(tmp_path), *extra])
    return run_pipeline(cfg, stages=stages, track=False)


def test_same_seed_and_config_give_identical_stages(minari_root, tmp_path):
    tiny_dataset()
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert all(first[s].artifact.path != second[s].artifact.path for s in first)
    assert_identical(second, {s: r.artifact for s, r in first.items()}, "second run")

    # ... and the seed matters: another seed, other metrics
    other = _run(tmp_path / "c", "seed=1", stages=["skill_vae"])
    assert other["skill_vae"].artifact.metrics != first["skill_vae"].artifact.metrics
