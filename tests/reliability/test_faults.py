"""Faults: SIGKILL mid-stage resumes that stage and redoes no finished one; a partly written
artifact is never taken as finished; two runs cannot share a checkpoints folder."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import (
    PIPELINE,
    UP_TO_BCQ,
    kill,
    pipeline_root,
    start_cli,
    tiny_dataset,
    tiny_overrides,
    wait_for,
)

from ldcq.artifacts import load_modules, read_artifact
from ldcq.cli import main
from ldcq.config import compose
from ldcq.locking import LockError, RunLock
from ldcq.pipeline import run_pipeline

N_ROWS = 6 * (30 - 4 + 1)  # transitions of the tiny dataset at H = 4, stride 1


def test_sigkill_in_the_bank_then_in_latent_bcq_resumes_each_and_redoes_nothing(
    minari_root, tmp_path
):
    tiny_dataset()
    overrides = [
        *tiny_overrides(tmp_path),
        "latent_bank.batch_size=16",  # 11 chunks
        "latent_bcq.trainer.max_steps=40",
        "latent_bcq.trainer.checkpoint_every_n_steps=5",
    ]
    args = [*overrides, "--stages", "latent_bcq", "--no-tracking"]
    root = pipeline_root(tmp_path)
    chunk_files = lambda: list(root.glob(".work/latent_bank-*/chunks/*/*.idx.npy"))  # noqa: E731

    # 1. killed while the bank is being sampled, after a few chunks
    proc, _ = start_cli(args, tmp_path, LDCQ_TEST_CHUNK_DELAY="0.5")
    wait_for(lambda: len(chunk_files()) >= 2, proc, "two bank chunks")
    kill(proc)
    finished = {p.parent.name.split("-")[0]: p.stat().st_mtime_ns for p in root.glob("*/DONE")}
    assert set(finished) == {"skill_vae", "diffusion_prior"}
    before = set(np.concatenate([np.load(f) for f in chunk_files()]).tolist())
    assert 0 < len(before) < N_ROWS

    # 2. rerun: the bank samples only the rows no chunk holds; killed inside latent_bcq
    rows_log = tmp_path / "rows.txt"
    proc, log = start_cli(
        args, tmp_path, LDCQ_TEST_STEP_DELAY="0.1", LDCQ_TEST_ROWS_LOG=str(rows_log)
    )
    wait_for(lambda: list(root.glob(".work/latent_bcq-*/last.ckpt")), proc, "a bcq checkpoint")
    kill(proc)
    text = log.read_text()
    for stage in ("skill_vae", "diffusion_prior"):
        assert f"{stage}: finished earlier, skipping" in text
    assert {p.parent.name.split("-")[0] for p in root.glob("*/DONE")} == {
        "skill_vae",
        "diffusion_prior",
        "latent_bank",
    }
    resampled = [int(r) for line in rows_log.read_text().split("\n") for r in line.split()]
    assert len(resampled) == len(set(resampled))
    assert not before & set(resampled), "rows of finished chunks were sampled again"
    assert before | set(resampled) == set(range(N_ROWS))

    # 3. rerun: latent_bcq resumes from its checkpoint, nothing else is redone
    results = run_pipeline(compose(PIPELINE, overrides), stages=UP_TO_BCQ, track=False)
    assert [s for s, r in results.items() if not r.skipped] == ["latent_bcq"]
    spec = results["latent_bcq"].artifact.spec
    assert spec["resumed_from_step"] and spec["resumed_from_step"] >= 5
    assert spec["global_step"] == 40
    for stage, mtime in finished.items():
        assert (results[stage].artifact.path / "DONE").stat().st_mtime_ns == mtime


def test_a_folder_without_done_is_retrained_not_used(minari_root, tmp_path):
    tiny_dataset()
    overrides = tiny_overrides(tmp_path)
    first = run_pipeline(compose(PIPELINE, overrides), stages=["skill_vae"], track=False)
    folder = first["skill_vae"].artifact.path
    # killed between the rename and DONE, with a half-written file: must not be read
    (folder / "DONE").unlink()
    weights = folder / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:64])

    again = run_pipeline(compose(PIPELINE, overrides), stages=["diffusion_prior"], track=False)
    assert not again["skill_vae"].skipped
    assert again["skill_vae"].artifact.path == folder and (folder / "DONE").is_file()
    load_modules(read_artifact(folder, "skill_vae"))
    assert not again["diffusion_prior"].skipped


@pytest.mark.parametrize("content", ["truncated", "pickled code"])
def test_an_unreadable_last_checkpoint_is_set_aside_not_loaded(minari_root, tmp_path, content):
    tiny_dataset()
    overrides = tiny_overrides(tmp_path)
    first = run_pipeline(compose(PIPELINE, overrides), stages=["skill_vae"], track=False)
    folder = first["skill_vae"].artifact.path
    work = folder.parent / ".work" / folder.name
    work.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    if content == "truncated":
        (work / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    else:
        (work / "last.ckpt").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    import shutil

    shutil.rmtree(folder)  # the stage was interrupted: only its work folder is left

    again = run_pipeline(compose(PIPELINE, overrides), stages=["skill_vae"], track=False)
    assert not again["skill_vae"].skipped
    assert again["skill_vae"].artifact.spec["resumed_from_step"] is None
    assert again["skill_vae"].artifact.spec["global_step"] == 6
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


_HOLD = "import sys, time; from ldcq.locking import RunLock; RunLock(sys.argv[1]).acquire(); "
_HOLD += "print('locked', flush=True); time.sleep(120)"


def _hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_checkpoints_folder_fails_at_once(minari_root, tmp_path, capsys):
    tiny_dataset()
    root = pipeline_root(tmp_path)
    args = ["pipeline", "run", str(PIPELINE), *tiny_overrides(tmp_path), "--stages", "skill_vae"]
    holder = _hold_lock(root)
    try:
        start = time.perf_counter()
        assert main([*args, "--no-tracking"]) == 2
        assert time.perf_counter() - start < 10
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("ldcq: error: the checkpoints folder")
        assert f"pid {holder.pid}" in err and str(root / ".lock") in err
        assert "command: " + sys.executable in err and "time.sleep(120)" in err
        assert not list(root.glob("skill_vae-*")), "the second run trained anyway"
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            RunLock(root).acquire()
    finally:
        kill(holder)

    # the holder died without releasing: its lock file is left, and blocks nothing
    assert (root / ".lock").read_text()
    assert main([*args, "--no-tracking"]) == 0
    assert list(root.glob("skill_vae-*/DONE"))
    assert (root / ".lock").read_text() == ""  # released at the end of the run


def test_a_sweeps_runs_share_the_folder_and_keep_an_ordinary_run_out(tmp_path):
    # A sweep's concurrent tasks lock the folder shared (and each artifact they make on its own).
    root = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _HOLD.replace("RunLock(sys.argv[1])", "RunLock(sys.argv[1], True)"),
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match="one of a sweep's runs"):
            RunLock(root).acquire()
        second = RunLock(root, shared=True).acquire()  # another task of the sweep
        second.release()
    finally:
        kill(holder)


def test_an_artifact_being_made_is_waited_for(tmp_path):
    from ldcq.locking import ArtifactLock

    work = tmp_path / ".work" / "skill_vae-abc"
    code = (
        "import sys, time; from ldcq.locking import ArtifactLock; "
        "lock = ArtifactLock(sys.argv[1]).__enter__(); print('locked', flush=True); "
        "time.sleep(1.5)"
    )
    maker = subprocess.Popen(
        [sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert maker.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with ArtifactLock(work):
            waited = time.perf_counter() - start
        assert waited > 0.5  # it blocked until the maker exited
    finally:
        kill(maker)


def test_the_lock_is_released_after_a_failed_run(minari_root, tmp_path):
    tiny_dataset()
    root = pipeline_root(tmp_path)
    bad = compose(PIPELINE, [*tiny_overrides(tmp_path), "skill_vae.model.lr=-1"])
    with pytest.raises(Exception, match="lr"):
        run_pipeline(bad, stages=["skill_vae"], track=False)
    # another process can take it at once
    holder = _hold_lock(root)
    kill(holder)
