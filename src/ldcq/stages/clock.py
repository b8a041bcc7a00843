"""How long a stage's artifact took to make, across every attempt (a killed run and its resume).

The pipeline starts a :class:`StageClock` when it begins a stage that is not finished. The clock
adds the seconds of this attempt to those of earlier attempts, which it reads from
``<work>.seconds``, and rewrites that file every ``every_s`` seconds, so an attempt that is killed
loses at most that much of its count. The stage writes :attr:`StageClock.seconds` into its
``spec.json``. The sum is conservative: work a killed attempt did after its last checkpoint is
counted, although the resumed attempt does it again.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from ldcq.artifacts import atomic_write_text


class StageClock:
    """Wall seconds spent on one stage's artifact, carried across attempts in a small file.

    Args:
        path: the ledger file (``<checkpoints>/<pipeline>/.work/<stage>-<fp>.seconds``).
        write: False on the ranks other than 0: they only read.
        every_s: seconds between two rewrites of the ledger.
    """

    def __init__(self, path: str | Path, write: bool = True, every_s: float = 15.0) -> None:
        self.path = Path(path)
        self.write, self.every_s = write, every_s
        self.carried_s, self.attempts = self._read()
        self._start: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[float, int]:
        try:
            data = json.loads(self.path.read_text())
            return float(data["seconds"]), int(data["attempts"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0, 0  # no earlier attempt (or an unreadable ledger: count from here)

    @property
    def seconds(self) -> float:
        """Seconds of the earlier attempts plus this one's so far."""
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return self.carried_s + running

    def _save(self) -> None:
        record = {"seconds": round(self.seconds, 3), "attempts": self.attempts + 1}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(record))

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            # A full disk shows up in the stage itself; the count is best effort.
            with contextlib.suppress(OSError):
                self._save()

    def __enter__(self) -> StageClock:
        self._start = time.perf_counter()
        if self.write:
            self._thread = threading.Thread(target=self._tick, name="stage-clock", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.write and exc[0] is not None:
            with contextlib.suppress(OSError):
                self._save()  # a failed attempt's time counts toward the next one

    def finish(self) -> None:
        """The stage's artifact is written: the ledger is no longer needed."""
        if self.write:
            self.path.unlink(missing_ok=True)
