"""``python slow_cli.py <ldcq arguments>``: the real ``ldcq`` CLI, slowed so a test can kill it
in the middle of a stage. Not a test module.

Environment: ``LDCQ_TEST_CHUNK_DELAY`` seconds of sleep after each latent-bank chunk is written,
``LDCQ_TEST_STEP_DELAY`` seconds before each latent_bcq training step, ``LDCQ_TEST_ROWS_LOG`` a
file that gets one line with the rows of each bank chunk this process writes,
``LDCQ_TEST_KILL=<stage>:<step>:<train|validation>`` SIGKILLs this process at that global step of
that stage, after the training batch (before its checkpoint) or inside its validation, and
``LDCQ_TEST_THREADS`` torch's thread count (default 1, as in the test process).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from ldcq.cli import main
from ldcq.stages import latent_bank, latent_bcq
from ldcq.stages.guards import FiniteLossGuard

CHUNK_DELAY = float(os.environ.get("LDCQ_TEST_CHUNK_DELAY", "0"))
STEP_DELAY = float(os.environ.get("LDCQ_TEST_STEP_DELAY", "0"))
ROWS_LOG = os.environ.get("LDCQ_TEST_ROWS_LOG")
KILL = os.environ.get("LDCQ_TEST_KILL", "::").split(":")
torch.set_num_threads(int(os.environ.get("LDCQ_TEST_THREADS", "1")))

_write_chunk = latent_bank.write_chunk
_training_step = latent_bcq.LatentBCQ.training_step


def write_chunk(chunk_dir, rank, index, samples):
    path = _write_chunk(chunk_dir, rank, index, samples)
    if ROWS_LOG:
        with open(ROWS_LOG, "a") as f:
            f.write(" ".join(map(str, index.tolist())) + "\n")
    time.sleep(CHUNK_DELAY)
    return path


def training_step(self, batch, batch_idx):
    time.sleep(STEP_DELAY)
    return _training_step(self, batch, batch_idx)


def _kill_at(guard, trainer, phase: str) -> None:
    stage, step, when = KILL
    if guard.stage == stage and when == phase and str(trainer.global_step) == step:
        os.kill(os.getpid(), signal.SIGKILL)


_guard_batch_end = FiniteLossGuard.on_train_batch_end


def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
    _guard_batch_end(self, trainer, pl_module, outputs, batch, batch_idx)
    _kill_at(self, trainer, "train")


def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
    if not trainer.sanity_checking:
        _kill_at(self, trainer, "validation")


latent_bank.write_chunk = write_chunk
latent_bcq.LatentBCQ.training_step = training_step
FiniteLossGuard.on_train_batch_end = on_train_batch_end
FiniteLossGuard.on_validation_batch_end = on_validation_batch_end

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
