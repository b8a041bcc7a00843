"""The only code that writes or reads a stage's frozen output.

An artifact is a folder ``<root>/<pipeline>/<stage>-<fingerprint>/`` holding ``weights.pt``
(state_dicts only), ``spec.json`` (class and constructor arguments of the stage module, dims,
dataset identity, seed, versions, git sha, config hash, upstream fingerprints), ``config.yaml``,
``metrics.json`` and ``DONE``. The folder is written under a temporary name, renamed into place in
one step, and ``DONE`` is written last: a folder without ``DONE`` is never taken as finished.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import importlib
import inspect
import io
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldcq.errors import LdcqError

DONE = "DONE"


class ArtifactError(LdcqError):
    """An artifact folder that is missing, unfinished, corrupted or incompatible."""


def fingerprint(payload: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of a JSON-serializable mapping (key order does not matter)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dataset_identity(episodes) -> dict[str, Any]:
    """Id plus a cheap content hash, so a regenerated dataset invalidates every stage."""
    h = hashlib.sha256()
    for arr in (episodes.observations, episodes.actions, episodes.rewards, episodes.episode_starts):
        h.update(np.ascontiguousarray(arr[:: max(1, len(arr) // 4096)]).tobytes())
        h.update(str(arr.shape).encode())
    return {
        "id": episodes.dataset_id,
        "steps": len(episodes.actions),
        "episodes": int(episodes.num_episodes),
        "content": h.hexdigest()[:16],
        "ref_min_score": episodes.ref_min_score,
        "ref_max_score": episodes.ref_max_score,
    }


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str]:
    import lightning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type:
    # Only our own classes may be rebuilt from a spec: a spec is data, not a licence to import.
    if not path.startswith("ldcq."):
        raise ArtifactError(f"spec.json names class {path!r}, which is not an ldcq class")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(
            f"spec.json names class {path!r}, which this version of ldcq does not have; "
            f"retrain the stage with this version"
        ) from exc


@dataclass(frozen=True)
class Artifact:
    """A finished artifact folder and its spec."""

    path: Path
    spec: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.spec["fingerprint"]

    @property
    def stage(self) -> str:
        return self.spec["stage"]

    @property
    def metrics(self) -> dict[str, float]:
        return json.loads((self.path / "metrics.json").read_text())


@dataclass
class ArtifactParts:
    """What a stage made, before it is written as an artifact (:func:`write_artifact`).

    Attributes:
        modules: name -> (module, constructor kwargs); empty for a stage without weights.
        spec: the stage's own ``spec.json`` entries (the pipeline adds the common ones).
        metrics: ``metrics.json``.
        extra_files: name -> file moved into the artifact (the bank, rollouts, pictures).
        logged: the artifact's files that go to the stage's MLflow run; None: all but DONE.
    """

    modules: dict[str, tuple[nn.Module, dict[str, Any]]] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)
    logged: tuple[str, ...] | None = ("spec.json", "config.yaml", "metrics.json")


def module_kwargs(module: nn.Module) -> dict[str, Any]:
    """A Lightning module's constructor arguments, from its ``hparams`` (LightningCLI adds
    private entries there; only the constructor's own parameters are kept)."""
    params = inspect.signature(type(module).__init__).parameters
    return {k: v for k, v in getattr(module, "hparams", {}).items() if k in params}


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False):
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block
    ends without an error (after an ``fsync`` if asked), removed otherwise. Readers see the old
    file or the new one, never half of it.

    Usage: ``with atomic_path(p) as tmp: torch.save(obj, tmp)``.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).is_file()


def write_artifact(
    path: str | Path,
    *,
    stage: str,
    modules: Mapping[str, tuple[nn.Module, Mapping[str, Any]]],
    spec: Mapping[str, Any],
    config_yaml: str,
    metrics: Mapping[str, float],
    extra_files: Mapping[str, Path] | None = None,
) -> Artifact:
    """Write a finished artifact atomically.

    Args:
        path: the final folder; it must not exist yet as a finished artifact.
        modules: name -> (module, constructor kwargs); ``weights.pt`` holds their state_dicts.
        spec: dims, dataset identity, seed, fingerprint, upstream fingerprints, config hash.
        extra_files: name -> file to move into the folder (e.g. a memory-mapped bank).

    Raises:
        ArtifactError: the disk is full or not writable; nothing half-written is left behind,
            and the ``extra_files`` are back where they were.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    full_spec = {**spec, "stage": stage, "modules": _module_specs(modules)}
    full_spec.update(versions=library_versions(), git_sha=git_sha())
    if is_done(final):
        raise ArtifactError(
            f"artifact {final} already exists and is finished; it is never overwritten"
        )
    try:
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # also those of killed writers
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        _write_files(tmp, modules, full_spec, config_yaml, metrics, extra_files or {})
        if final.exists():
            # an unfinished folder from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(final / DONE, "w") as f:
            f.write(full_spec.get("fingerprint", "") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        _hand_back(extra_files or {}, (tmp, final))
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        raise ArtifactError(
            f"could not write artifact {final}: {reason}. Free space (or choose another "
            f"checkpoints folder) and rerun the same command: finished stages are kept"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(final, full_spec)


def _module_specs(modules: Mapping[str, tuple[nn.Module, Mapping[str, Any]]]) -> dict:
    """What ``spec.json`` says of each module: its class and constructor arguments."""
    return {
        name: {"class": class_path(module), "kwargs": dict(kwargs)}
        for name, (module, kwargs) in modules.items()
    }


def _write_files(
    folder: Path,
    modules: Mapping[str, tuple[nn.Module, Mapping[str, Any]]],
    spec: Mapping[str, Any],
    config_yaml: str,
    metrics: Mapping[str, float],
    extra_files: Mapping[str, Path],
) -> None:
    """Every file of an artifact into ``folder``, each on disk (fsync) before DONE can be."""
    state = {name: module.state_dict() for name, (module, _) in modules.items()}
    # Serialized in memory, then written by Python: torch.save's own file writer reports a
    # full disk as an opaque RuntimeError, this write as OSError(ENOSPC).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (folder / "weights.pt").write_bytes(buffer.getbuffer())
    (folder / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
    (folder / "config.yaml").write_text(config_yaml)
    (folder / "metrics.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
    for name, src in extra_files.items():
        shutil.move(str(src), folder / name)
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _hand_back(extra_files: Mapping[str, Path], folders: tuple[Path, ...]) -> None:
    """Move the extra files a failed write had moved in back where they came from."""
    for name, src in extra_files.items():
        for folder in folders:
            if (folder / name).is_file() and not Path(src).exists():
                with contextlib.suppress(OSError):
                    shutil.move(str(folder / name), src)


def read_artifact(path: str | Path, stage: str | None = None) -> Artifact:
    """Open a finished artifact folder, checking that it is one (and of ``stage``, if given)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; train that stage first")
    if not is_done(folder):
        raise ArtifactError(
            f"artifact folder {folder} is unfinished (no DONE file): its stage was interrupted; "
            f"rerun the pipeline to finish it"
        )
    try:
        spec = json.loads((folder / "spec.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"{folder / 'spec.json'} is unreadable ({exc}); retrain the stage"
        ) from exc
    if stage is not None and spec.get("stage") != stage:
        raise ArtifactError(
            f"{folder} is a {spec.get('stage')!r} artifact, but a {stage!r} artifact is "
            f"needed here; pass the {stage} stage's folder"
        )
    return Artifact(folder, spec)


def load_modules(artifact: Artifact) -> dict[str, nn.Module]:
    """Rebuild every module of an artifact from its spec and load its weights, frozen.

    ``weights.pt`` is loaded with ``weights_only=True``: a file that pickles code is refused.
    """
    weights_path = artifact.path / "weights.pt"
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(
            f"{weights_path} cannot be loaded as plain weights ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is truncated, corrupted or "
            f"pickles code. Delete {artifact.path} and rerun the pipeline to retrain the stage"
        ) from exc
    modules = {}
    for name, entry in artifact.spec["modules"].items():
        # An empty context: LightningCLI hands hyperparameters to save_hyperparameters() through
        # a context variable, which would otherwise leak into a module built while it instantiates.
        module = contextvars.Context().run(_import_class(entry["class"]), **entry["kwargs"])
        if name not in state:
            raise ArtifactError(f"{weights_path} has no weights for {name!r}; retrain the stage")
        try:
            module.load_state_dict(state[name])
        except RuntimeError as exc:
            raise ArtifactError(
                f"{weights_path} does not match the {name!r} module described in spec.json "
                f"({str(exc).splitlines()[0]}); retrain the stage"
            ) from exc
        modules[name] = module.eval().requires_grad_(False)
    return modules


def check_dims(artifact: Artifact, expected: Mapping[str, Any], consumer: str) -> None:
    """Fail with one message when an upstream artifact's dims or dataset differ from ours."""
    dims = artifact.spec.get("dims", {})
    got = {**dims, "dataset": artifact.spec.get("dataset", {}).get("id")}
    wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if wrong:
        detail = ", ".join(
            f"{k}: artifact {a!r} vs {consumer} {b!r}" for k, (a, b) in wrong.items()
        )
        raise ArtifactError(
            f"artifact {artifact.path} does not fit {consumer} ({detail}); use an artifact "
            f"trained on the same dataset and dims"
        )
