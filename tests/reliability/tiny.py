"""The e2e tests' tiny pipeline (``tiny_overrides``), shared with the reliability tests."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import random_episode, write_dataset

# test_pipeline lives beside the e2e tests, which pytest may not have imported yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_pipeline import PIPELINE, tiny_overrides

# Every stage that trains: the tiny dataset has no simulator to evaluate in.
UP_TO_BCQ = ["latent_bcq"]
__all__ = ["PIPELINE", "UP_TO_BCQ", "tiny_dataset", "tiny_overrides"]


def tiny_dataset(dataset_id: str = "test/tiny-v0", episodes: int = 6, length: int = 30) -> str:
    """The e2e tests' tiny dataset (S=4, A=2), written under ``$MINARI_DATASETS_PATH``."""
    return write_dataset(dataset_id, [random_episode(length, seed=s) for s in range(episodes)])


def pipeline_root(tmp_path: Path) -> Path:
    """The checkpoints folder ``tiny_overrides(tmp_path)`` gives the pipeline."""
    return tmp_path / "ckpt" / "pointmaze-umaze"
