"""One run of a sweep (a grid point and a seed), picklable for submitit, and the launchers that run them."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldcq.artifacts import atomic_write_text, git_sha
from ldcq.config import compose
from ldcq.errors import ConfigError
from ldcq.process import say
from ldcq.sweep.compare import METHODS

LAUNCHERS = ("inline", "slurm", "submitit-local")


@dataclass(frozen=True)
class SweepJob:
    """Everything a worker needs to run one point and seed (it pickles for submitit)."""

    pipeline: str
    scale: str
    overrides: tuple[str, ...]  # the sweep's own, then the point's
    point: dict[str, Any]
    seed: int
    selectors: tuple[str, ...]
    key: str
    parent_run: str | None
    record_dir: str
    cwd: str
    track: bool
    shared: bool

    def run_overrides(self, selector: str) -> list[str]:
        return [
            *self.overrides,
            f"seed={self.seed}",
            f"evaluation.selector={selector}",
            "evaluation.diagnostics=true",
        ]


def point_key(pipeline: Path, scale: str, overrides: list[str]) -> str:
    """Names a point by its resolved config (seed aside): the same point of another sweep
    command, or the same grid value written differently, is the same; a run is
    ``<point key>-seed<i>``."""
    from ldcq.bench.score import config_hash

    return config_hash(pipeline, scale, "q", overrides)


def run_job(job: SweepJob) -> list[dict[str, Any]]:
    """Run one point and seed (LDCQ, then each baseline selector); write its records file in the
    sweep's work folder and return the records."""
    from ldcq.bench.score import config_hash, host
    from ldcq.pipeline import run_pipeline

    os.chdir(job.cwd)
    pipeline = Path(job.pipeline)
    records = []
    for selector in job.selectors:
        cfg = compose(pipeline, job.run_overrides(selector), scale=job.scale)
        started = time.time()
        results = run_pipeline(cfg, track=job.track, parent_run=job.parent_run, shared=job.shared)
        evaluation = results["evaluation"].artifact
        records.append(
            {
                "key": job.key,
                "point": job.point,
                "seed": job.seed,
                "selector": selector,
                "method": METHODS[selector],
                "config_hash": config_hash(
                    pipeline, job.scale, selector, [*job.overrides, "evaluation.diagnostics=true"]
                ),
                "fingerprints": {s: r.artifact.fingerprint for s, r in results.items()},
                "precision": {s: r.artifact.spec.get("precision") for s, r in results.items()},
                "metrics": {k: float(v) for k, v in evaluation.metrics.items()},
                "stage_s": {
                    s: None if r.skipped else r.artifact.spec.get("seconds")
                    for s, r in results.items()
                },
                "command_s": time.time() - started,
                "command": "ldcq pipeline run "
                + " ".join([job.pipeline, "--scale", job.scale, *job.run_overrides(selector)]),
                "git_sha": git_sha(),
                "host": {**host(), "python": platform.python_version()},
                "artifact": str(evaluation.path),
            }
        )
    path = Path(job.record_dir) / f"{job.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=2) + "\n")
    return records


def launch(
    jobs: list[SweepJob],
    launcher: str,
    slurm: dict[str, Any],
    folder: Path,
    after_each: Callable[[], Any] = lambda: None,
) -> None:
    """Run ``jobs`` with ``launcher``; a failed job raises after the others finished. Inline,
    ``after_each`` runs after every run (the sweep rewrites its results file: a sweep killed
    later keeps every finished run there)."""
    if launcher == "inline":
        for i, job in enumerate(jobs):
            say(
                f"sweep: run {i + 1}/{len(jobs)}: {' '.join(job.overrides) or '(base)'} "
                f"seed={job.seed}"
            )
            run_job(job)
            after_each()
        return
    import submitit

    cluster = {"slurm": "slurm", "submitit-local": "local"}[launcher]
    executor = submitit.AutoExecutor(folder=str(folder / "submitit"), cluster=cluster)
    params = {k: v for k, v in slurm.items() if v is not None}
    executor.update_parameters(name="ldcq-sweep", **params)
    # The local executor starts every task at once: there the array's parallelism is kept by
    # submitting it in chunks.
    chunk = len(jobs)
    if cluster == "local" and params.get("slurm_array_parallelism"):
        chunk = params["slurm_array_parallelism"]
    submitted = []
    for start in range(0, len(jobs), chunk):
        part = executor.map_array(run_job, jobs[start : start + chunk])
        if start + chunk < len(jobs):
            for handle in part:
                handle.wait()
        submitted.extend(part)
    say(
        f"sweep: {len(submitted)} runs submitted as {cluster} job array "
        f"{submitted[0].job_id.split('_')[0]}; logs in {folder / 'submitit'}"
    )
    failed = []
    for job, handle in zip(jobs, submitted, strict=True):
        try:
            handle.result()
        except Exception as exc:  # a task's failure, with its log path; the others go on
            failed.append(f"{' '.join(job.overrides)} seed={job.seed}: {exc}".strip()[:2000])
    if failed:
        raise ConfigError(
            f"{len(failed)} of {len(jobs)} sweep runs failed (finished runs are kept; rerun the "
            f"same command to retry the rest):\n" + "\n".join(failed)
        )
