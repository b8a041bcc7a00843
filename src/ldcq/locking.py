"""One pipeline run at a time per checkpoints folder: an advisory ``flock`` on ``<folder>/.lock``;
or, for the runs of a sweep that share a folder, one maker per artifact (:class:`ArtifactLock`).

The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL and power loss of a
client included), so a lock file left behind by a dead run never blocks the next one; the file is
never deleted (deleting it would let two runs lock two different files of the same name). While
held it records the holder's pid, host, start time and command, for the message a second run shows.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path

from ldcq.errors import LdcqError

LOCK_FILE = ".lock"

# Locks this process holds, by path: a run that failed before releasing its lock (in a process
# that goes on, as a test or a notebook) hands it to the next run of the same process.
_HELD: dict[Path, int] = {}


class LockError(LdcqError):
    """Another run is using the checkpoints folder."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another run (it has not written its details yet)"
    return (
        f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}, "
        f"command: {info.get('command')}"
    )


def _command_line() -> str:
    try:  # the whole command, interpreter included, where the platform tells it
        return shlex.join(Path("/proc/self/cmdline").read_bytes().decode().split("\0")[:-1])
    except OSError:
        return shlex.join([sys.executable, *sys.argv])


class RunLock:
    """Non-blocking lock of a checkpoints folder; a context manager. Exclusive by default;
    ``shared=True`` for the concurrent runs of a sweep, which lock each artifact they make
    instead (:class:`ArtifactLock`) and together keep an ordinary run out."""

    def __init__(self, folder: str | Path, shared: bool = False) -> None:
        self.path = (Path(folder) / LOCK_FILE).resolve()
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`LockError` naming the run that holds it."""
        if self.path in _HELD:
            self._fd = _HELD[self.path]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without flock (some network filesystems): run unprotected.
                os.close(fd)
                warnings.warn(
                    f"cannot lock {self.path} ({exc}); make sure no other run uses this "
                    f"checkpoints folder at the same time",
                    stacklevel=2,
                )
                return self
            holder = _holder(fd)
            os.close(fd)
            raise LockError(
                f"the checkpoints folder {self.path.parent} is in use by {holder}. Wait for that "
                f"run to finish or stop it, or give this run another checkpoints_dir or name "
                f"(lock file: {self.path}; a lock of a run that died is released by itself)"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": _command_line() + (" (one of a sweep's runs)" if self.shared else ""),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = _HELD[self.path] = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if _HELD.get(self.path) != fd:
            return
        del _HELD[self.path]
        try:
            if not self.shared:  # other holders of a shared lock may still be running
                os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ArtifactLock:
    """Exclusive, *blocking* lock of one artifact being made, for runs that share a checkpoints
    folder (the parallel tasks of a sweep): a run that wants an artifact another run is making
    waits for it, then finds it finished. A context manager; ``<work>.lock`` beside the work folder.
    """

    def __init__(self, work: str | Path) -> None:
        work = Path(work)
        self.path = work.parent / f"{work.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> ArtifactLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            warnings.warn(
                f"cannot lock {self.path} ({exc}); runs sharing this checkpoints folder may make "
                f"the same artifact twice",
                stacklevel=2,
            )
            return self
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
