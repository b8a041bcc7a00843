"""A sweep: its runs (skipping recorded ones), its MLflow parent run, its results file."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldcq.artifacts import atomic_write_text, fingerprint, git_sha
from ldcq.config import compose
from ldcq.data.pointmaze import ensure_dataset
from ldcq.errors import ConfigError
from ldcq.process import say
from ldcq.sweep.compare import flat_summary, plot_key, summarize
from ldcq.sweep.grid import grid_points, point_to_overrides
from ldcq.sweep.jobs import LAUNCHERS, SweepJob, launch, point_key

SELECTORS = ("q", "vae-prior")


@dataclass
class Sweep:
    pipeline: Path
    grid: dict[str, list[Any]]
    seeds: int
    scale: str
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    selectors: tuple[str, ...] = SELECTORS
    out_dir: Path = Path("results/sweeps")
    track: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        self.cfg = compose(self.pipeline, self.overrides, scale=self.scale)
        # The full keys: diffusion_prior.model.lr and skill_vae.model.lr are two sweeps.
        self.name = self.name or f"{self.cfg.name}-{self.scale}-{'+'.join(self.grid)}"
        self.identity = fingerprint(
            {
                "pipeline": self.cfg.name,
                "scale": self.scale,
                "grid": self.grid,
                "overrides": self.overrides,
                "selectors": list(self.selectors),
            }
        )
        self.work = Path(self.cfg.checkpoints_dir) / self.cfg.name / "sweeps" / self.name
        self.results = self.out_dir / f"{self.name}.json"

    def jobs(self, parent_run: str | None, shared: bool) -> list[SweepJob]:
        # Seed-major: every value at seed 0, then at seed 1, … A sweep cut short (a session that
        # ends, a lost checkpoints folder) has compared every value on the same seeds so far, and
        # the values that share upstream stages meet them while those are still on disk.
        points = []
        for point in grid_points(self.grid):
            overrides = [*self.overrides, *point_to_overrides(point)]
            points.append((point, overrides, point_key(self.pipeline, self.scale, overrides)))
        out = []
        for seed in range(self.seeds):
            for point, overrides, point_id in points:
                key = f"{point_id}-seed{seed}"
                out.append(
                    SweepJob(
                        pipeline=str(self.pipeline),
                        scale=self.scale,
                        overrides=tuple(overrides),
                        point=point,
                        seed=seed,
                        selectors=self.selectors,
                        key=key,
                        parent_run=parent_run,
                        record_dir=str(self.work / "runs"),
                        cwd=os.getcwd(),
                        track=self.track,
                        shared=shared,
                    )
                )
        return out

    def recorded(self) -> dict[str, list[dict]]:
        """The runs recorded so far, by job key: the results file's, then the work folder's."""
        found: dict[str, list[dict]] = {}
        if self.results.is_file():
            for run in json.loads(self.results.read_text()).get("runs", []):
                found.setdefault(run["key"], []).append(run)
        for path in sorted((self.work / "runs").glob("*.json")):
            found[path.stem] = json.loads(path.read_text())
        return {k: v for k, v in found.items() if {r["selector"] for r in v} >= set(self.selectors)}

    def write(self, current: set[str]) -> dict[str, Any]:
        """The results file and one plot per swept key. The file keeps every run ever recorded
        under this name (another command's seeds, values or overrides); the comparison counts
        only the runs of this command's grid and config (job keys ``current``), in grid order."""
        recorded = self.recorded()
        keys = list(self.grid)

        def order(run):
            point = run["point"]
            place = tuple(
                self.grid[k].index(point[k]) if k in point and point[k] in self.grid[k] else -1
                for k in keys
            )
            return (run["key"] not in current, place, json.dumps(point), run["seed"])

        everything = sorted((r for k in recorded for r in recorded[k]), key=order)
        compared = [r for r in everything if r["key"] in current]
        grid = {k: list(v) for k, v in self.grid.items()}
        summary = summarize(compared, keys) if compared else {"rows": [], "effects": {}}
        runs = everything
        data = {
            "name": self.name,
            "pipeline": self.cfg.name,
            "pipeline_file": str(self.pipeline),
            "scale": self.scale,
            "grid": grid,
            "seeds": sorted({r["seed"] for r in compared}),
            "overrides": self.overrides,
            "selectors": list(self.selectors),
            "command": self.command,
            "git_sha": git_sha(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "summary": summary,
            "plots": [],
            "runs": runs,
        }
        if summary["rows"]:
            for key in keys:
                stem = self.name if len(keys) == 1 else f"{self.name}-{key}"
                path = self.out_dir / f"{stem}.png"
                title = f"{self.cfg.name} ({self.scale}): {key}, mean ± std over seeds"
                data["plots"].append(str(plot_key(summary, key, keys, path, title)))
        if everything or self.results.is_file():  # a sweep that recorded nothing leaves no file
            self.results.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.results, json.dumps(data, indent=2) + "\n")
        return data


def _sweep_run(sweep: Sweep) -> tuple[Any, str] | None:
    """The sweep's MLflow parent run (the one an earlier attempt of this sweep opened, if any)."""
    if not sweep.track:
        return None
    from ldcq.tracking import Tracker

    tracker = Tracker(sweep.cfg.name, sweep.cfg.get("tracking_uri"))
    found = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`ldcq.sweep` = '{sweep.name}' and tags.`ldcq.sweep_id` = "
        f"'{sweep.identity}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run_id = tracker.reopen_run(found[0].info.run_id)
    else:
        tags = {"ldcq.sweep": sweep.name, "ldcq.sweep_id": sweep.identity, "git_sha": git_sha()}
        run_id = tracker.start_run(f"sweep-{sweep.name}", tags)
        tracker.log_params(
            run_id,
            {
                "grid": {k: json.dumps(v) for k, v in sweep.grid.items()},
                "seeds": sweep.seeds,
                "scale": sweep.scale,
                "overrides": " ".join(sweep.overrides),
            },
        )
    return tracker, run_id


def run_sweep(
    sweep: Sweep, launcher: str = "inline", slurm: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every run of ``sweep`` not recorded yet, then the comparison; returns the results file's
    content (with the plots' paths)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}: valid launchers are {list(LAUNCHERS)}")
    shared = launcher != "inline"
    if launcher == "slurm" and sweep.track:
        from ldcq.tracking import resolve_uri

        if resolve_uri(sweep.cfg.get("tracking_uri")).startswith("sqlite:"):
            warnings.warn(
                "--launcher slurm with the sqlite MLflow store: tasks on many nodes writing one "
                "sqlite file can fail; start an MLflow server they can reach and set "
                "tracking_uri=http://… (or MLFLOW_TRACKING_URI)",
                stacklevel=2,
            )
    opened = _sweep_run(sweep)
    tracker, parent = opened if opened else (None, None)
    try:
        jobs = sweep.jobs(parent, shared)
        done = sweep.recorded()
        pending = [j for j in jobs if j.key not in done]
        say(
            f"sweep {sweep.name}: {len(jobs)} runs, {len(jobs) - len(pending)} recorded before, "
            f"{len(pending)} to run"
        )
        if pending:
            # Generated datasets are made here, once, before any run (as bench-score does).
            points = dict.fromkeys((j.pipeline, j.scale, j.overrides) for j in pending)
            for dataset in dict.fromkeys(
                compose(Path(p), list(o), scale=s).dataset for p, s, o in points
            ):
                ensure_dataset(dataset)
            try:
                keys = {j.key for j in jobs}
                launch(pending, launcher, slurm or {}, sweep.work, lambda: sweep.write(keys))
            finally:
                data = sweep.write({j.key for j in jobs})
        else:
            data = sweep.write({j.key for j in jobs})
    except BaseException:
        if tracker is not None:
            tracker.end_open_runs("FAILED")
        raise
    if tracker is not None:
        for key, stats in flat_summary(data["summary"]).items():
            tracker.client.log_metric(parent, key, stats)
        tracker.log_artifact(parent, sweep.results)
        for plot in data["plots"]:
            tracker.log_artifact(parent, plot)
        tracker.end_run(parent)
    return data
