"""The e2e tests' tiny pipeline (``tiny_overrides``), shared with the reliability tests, and the
helpers that run it in a subprocess through ``slow_cli.py`` and kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_episode, write_dataset

# test_pipeline lives beside the e2e tests, which pytest may not have imported yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_pipeline import PIPELINE, tiny_overrides

# Every stage that trains: the tiny dataset has no simulator to evaluate in.
UP_TO_BCQ = ["latent_bcq"]
SLOW_CLI = Path(__file__).with_name("slow_cli.py")
ARTIFACTS = ("skill_vae", "diffusion_prior", "latent_bank", "latent_bcq")
__all__ = [
    "ARTIFACTS",
    "PIPELINE",
    "UP_TO_BCQ",
    "assert_identical",
    "kill",
    "pipeline_root",
    "start_cli",
    "tiny_dataset",
    "tiny_overrides",
    "wait_for",
]


def tiny_dataset(dataset_id: str = "test/tiny-v0", episodes: int = 6, length: int = 30) -> str:
    """The e2e tests' tiny dataset (S=4, A=2), written under ``$MINARI_DATASETS_PATH``."""
    return write_dataset(dataset_id, [random_episode(length, seed=s) for s in range(episodes)])


def pipeline_root(tmp_path: Path) -> Path:
    """The checkpoints folder ``tiny_overrides(tmp_path)`` gives the pipeline."""
    return tmp_path / "ckpt" / "pointmaze-umaze"


def start_cli(args: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    """``ldcq pipeline run PIPELINE *args`` through ``slow_cli.py`` (see its ``env`` options) in
    the background; returns the process and its log file."""
    log = tmp_path / f"run-{time.monotonic_ns()}.log"
    cmd = [sys.executable, str(SLOW_CLI), "pipeline", "run", str(PIPELINE), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **env}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_identical(results, reference, context: str) -> None:
    """``results`` (``run_pipeline``'s) hold the same artifacts as ``reference`` (``{stage:
    artifact}``), bit for bit: fingerprints, metrics, weights and the bank."""
    for stage in ARTIFACTS:
        a, b = results[stage].artifact, reference[stage]
        assert a.fingerprint == b.fingerprint, (context, stage)
        assert a.metrics == b.metrics, (context, stage)
        if stage == "latent_bank":
            bank_a, bank_b = np.load(a.path / "bank.npy"), np.load(b.path / "bank.npy")
            assert np.array_equal(bank_a, bank_b), context
            continue
        wa = torch.load(a.path / "weights.pt", weights_only=True)
        wb = torch.load(b.path / "weights.pt", weights_only=True)
        for module, state in wb.items():
            for key, tensor in state.items():
                assert torch.equal(wa[module][key], tensor), (context, stage, key)
