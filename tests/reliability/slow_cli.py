"""``python slow_cli.py <ldcq arguments>``: the real ``ldcq`` CLI, slowed so a test can kill it
in the middle of a stage. Not a test module.

Environment: ``LDCQ_TEST_CHUNK_DELAY`` seconds of sleep after each latent-bank chunk is written,
``LDCQ_TEST_STEP_DELAY`` seconds before each latent_bcq training step, ``LDCQ_TEST_ROWS_LOG`` a
file that gets one line with the rows of each bank chunk this process writes.
"""

from __future__ import annotations

import os
import sys
import time

from ldcq.cli import main
from ldcq.stages import bank, latent_bcq

CHUNK_DELAY = float(os.environ.get("LDCQ_TEST_CHUNK_DELAY", "0"))
STEP_DELAY = float(os.environ.get("LDCQ_TEST_STEP_DELAY", "0"))
ROWS_LOG = os.environ.get("LDCQ_TEST_ROWS_LOG")

_write_chunk = bank.write_chunk
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


bank.write_chunk = write_chunk
latent_bcq.LatentBCQ.training_step = training_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
