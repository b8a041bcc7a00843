"""The antmaze and kitchen pipelines, end to end, on tiny look-alikes of their Minari datasets
recorded from the real envs: all three training stages, the bank and a short evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from lookalike import record_antmaze, record_kitchen
from test_pipeline import tiny_overrides

from ldcq.config import compose
from ldcq.pipeline import run_pipeline
from ldcq.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

FAMILIES = {
    # pipeline, recorder, dataset id, (S, A): antmaze S = achieved_goal 2 + observation 27
    "antmaze": (
        "antmaze-large-diverse.yaml",
        record_antmaze,
        "D4RL/antmaze/large-diverse-v1",
        (29, 8),
    ),
    "kitchen": ("kitchen-mixed.yaml", record_kitchen, "D4RL/kitchen/mixed-v2", (59, 9)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_pipeline_on_a_lookalike_dataset(family, minari_root, tmp_path):
    pipeline, record, dataset_id, (state_dim, action_dim) = FAMILIES[family]
    record(dataset_id, episodes=3, steps=60, seed=0, eval_steps=50)
    overrides = [
        *tiny_overrides(tmp_path, dataset=dataset_id),
        "evaluation.episodes=2",
        "evaluation.num_envs=2",
    ]
    cfg = compose(REPO / "pipelines" / pipeline, overrides)
    assert cfg.family == family
    assert cfg.evaluation.asynchronous  # the family's AsyncVectorEnv, as configured
    results = run_pipeline(cfg, track=False)

    assert list(results) == list(STAGES)
    for r in results.values():
        assert not r.skipped
        assert (r.artifact.path / "DONE").is_file(), r.stage
        spec = json.loads((r.artifact.path / "spec.json").read_text())
        assert spec["dataset"]["id"] == dataset_id
    dims = results["skill_vae"].artifact.spec["dims"]
    assert (dims["S"], dims["A"], dims["H"]) == (state_dim, action_dim, 4)

    evaluation = results["evaluation"].artifact
    assert evaluation.spec["family"] == family
    metrics = evaluation.metrics
    assert metrics["eval/episodes"] == 2
    assert metrics["eval/episode_length"] == 50  # the recorded eval env's step limit
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert "eval/normalized_score" in metrics
    # pictures are drawn from the env's own maze (AntMaze: cells of side 4) and obs_keys
    files = {p.name for p in evaluation.path.iterdir()}
    assert "rollouts.png" in files and "latents.png" in files
    assert ("q_map.png" in files) == (family == "antmaze")
