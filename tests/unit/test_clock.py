"""A stage's time is the sum of its attempts, a killed one included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ldcq.stages.clock import StageClock


def test_a_killed_attempt_counts_toward_the_resumed_one(tmp_path):
    ledger = tmp_path / ".work" / "skill_vae-abc.seconds"
    # The first attempt is SIGKILLed: only what its clock had written by then survives.
    code = (
        "import time, sys\n"
        "from ldcq.stages.clock import StageClock\n"
        f"with StageClock({str(ledger)!r}, every_s=0.05):\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(0.5)
    os.kill(child.pid, 9)
    child.wait()
    first = json.loads(ledger.read_text())
    assert first["attempts"] == 1 and 0.3 <= first["seconds"] < 30

    clock = StageClock(ledger, every_s=0.05)
    assert clock.carried_s == first["seconds"]
    with clock:
        time.sleep(0.1)
    assert clock.seconds >= first["seconds"] + 0.1
    clock.finish()
    assert not ledger.exists()


def test_a_failed_attempt_leaves_its_time_and_other_ranks_only_read(tmp_path):
    ledger = tmp_path / "latent_bank-abc.seconds"
    try:
        with StageClock(ledger, every_s=60):
            time.sleep(0.05)
            raise RuntimeError("disk full")
    except RuntimeError:
        pass
    assert json.loads(ledger.read_text())["seconds"] >= 0.05
    reader = StageClock(ledger, write=False)
    with reader:
        pass
    reader.finish()
    assert ledger.exists()  # only rank 0 writes or removes the ledger
    ledger.write_text("not json")
    assert StageClock(ledger).carried_s == 0.0
