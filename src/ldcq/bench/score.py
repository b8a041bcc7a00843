"""`make bench-score`: normalized score, success rate and wall time per stage of a maze2d pipeline
over N seeds, beside its baselines on the same data.

For each seed i it runs ``ldcq pipeline run <pipeline> --scale <scale> seed=i
evaluation.selector=q`` (LDCQ), then the same command with ``evaluation.selector=prior`` (one
diffusion-prior sample, no Q) and ``vae-prior`` (the VAE's decoder driven by its own Gaussian
prior: behaviour cloning), which reuse the trained stages and only evaluate. Each command's MLflow
parent run names the artifacts it used (tags ``fingerprint.<stage>``); the scores are read from
``<checkpoints_dir>/<pipeline>/evaluation-<fingerprint>/metrics.json`` and each stage's wall time
from its artifact's ``spec.json`` (``seconds``: every attempt, so a seed killed at the end of a
session and resumed in the next is timed whole). A baseline is timed for the stages it made
itself, its evaluation, not for the trained stages it shares with LDCQ.

Every run is recorded, as soon as it ends, in ``results/<pipeline>-<scale>.json`` (per run: seed,
method, metrics, config hash, stage fingerprints, git sha, the exact command, wall times, the
evaluation protocol); a run of the same seed, method and config replaces its earlier record.
A seed whose every method is already recorded under the same config is not run again (its records
join the summary), so ``SEEDS=3`` after a session that finished seed 0 trains seeds 1 and 2 only;
``--rerun`` trains and evaluates it again.
``make results`` renders the README's results table from those files (:mod:`ldcq.bench.results`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from ldcq.artifacts import atomic_write_text, fingerprint, git_sha
from ldcq.config import compose, without_neutral
from ldcq.data.pointmaze import ensure_dataset
from ldcq.errors import ConfigError, LdcqError
from ldcq.precision import resolve_config
from ldcq.stages import registry
from ldcq.tracking import resolve_uri

METHODS = {"q": "LDCQ", "prior": "diffusion prior, no Q", "vae-prior": "BC (VAE prior)"}
SCORES = ("eval/normalized_score", "eval/success_rate", "eval/return_mean")
# Reported when the evaluation has them (the official maze2d first-hit score, and normalized).
EXTRA_SCORES = ("eval/first_hit_normalized", "eval/first_hit_score")
_CLI = [sys.executable, "-m", "ldcq.cli"]


def require_evaluation() -> tuple[str, ...]:
    """The pipeline's stages; refuses a checkout whose pipeline has no ``evaluation`` stage."""
    if "evaluation" not in registry.STAGES:
        raise ConfigError(
            "make bench-score needs the pipeline's `evaluation` stage (ldcq.evaluation: the "
            "policy in the simulator and its normalized score), which this checkout does not "
            f"have: its stages are {list(registry.STAGES)}. Update the checkout, then rerun"
        )
    return registry.STAGES


def _parent_run(cfg, started: float):
    """The newest top-level MLflow run of the pipeline's experiment started after ``started``."""
    client = MlflowClient(resolve_uri(cfg.get("tracking_uri")))
    experiment = client.get_experiment_by_name(cfg.name)
    runs = []
    if experiment is not None:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.start_time >= {int(started * 1000)}",
            order_by=["attributes.start_time DESC"],
        )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise ConfigError(
            f"no MLflow run of pipeline {cfg.name!r} started by this command; bench-score reads "
            f"the stage fingerprints and times from tracking, so do not pass --no-tracking"
        )
    return parents[0]


def run_once(
    pipeline: Path, scale: str, seed: int, selector: str, overrides: list[str], stages
) -> dict[str, Any]:
    """One ``ldcq pipeline run``; returns its evaluation metrics and per-stage wall times."""
    run_overrides = [f"seed={seed}", f"evaluation.selector={selector}", *overrides]
    cfg = compose(pipeline, run_overrides, scale=scale)
    started, load_start = time.time(), os.getloadavg()
    cmd = [*_CLI, "pipeline", "run", str(pipeline), "--scale", scale, *run_overrides]
    print(f"bench-score: {' '.join(cmd[2:])}", flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise LdcqError(f"`{' '.join(cmd[2:])}` failed (exit code {done.returncode}); see above")
    command_s = time.time() - started
    parent = _parent_run(cfg, started)
    root = Path(cfg.checkpoints_dir) / cfg.name
    times, precisions = {}, {}
    for stage in stages:
        path = root / f"{stage}-{parent.data.tags[f'fingerprint.{stage}']}"
        # The artifact's own count (every attempt, a resumed one included); an artifact made
        # before it was recorded there falls back to this command's timing, if it made it.
        stage_spec = json.loads((path / "spec.json").read_text())
        seconds = stage_spec.get("seconds")
        precisions[stage] = stage_spec.get("precision")  # None: made before it was recorded
        if seconds is None and (path / "DONE").stat().st_mtime >= started:
            seconds = parent.data.metrics.get(f"time/{stage}_s")
        times[stage] = seconds
    evaluation = root / f"evaluation-{parent.data.tags['fingerprint.evaluation']}"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    missing = [k for k in SCORES if k not in metrics]
    if missing:
        raise ConfigError(f"{evaluation}/metrics.json lacks {missing}; the evaluation changed?")

    spec = json.loads((evaluation / "spec.json").read_text())
    return {
        "seed": seed,
        "selector": selector,
        "method": METHODS.get(selector, selector),
        "command": " ".join(["ldcq", *cmd[3:]]),
        "git_sha": git_sha(),
        "config_hash": config_hash(pipeline, scale, selector, overrides),
        "fingerprints": {s: parent.data.tags.get(f"fingerprint.{s}") for s in stages},
        "protocol": spec.get("protocol"),
        "command_s": command_s,
        # Seeds of one file may run on different hosts (a session ends, the next resumes); a
        # load average above the cores used means something else ran beside this command.
        "host": {**host(), "load_avg_start": list(load_start), "load_avg_end": os.getloadavg()},
        "stage_s": times,
        "precision": precisions,
        "metrics": {k: float(metrics[k]) for k in (*SCORES, *EXTRA_SCORES) if k in metrics},
        "artifact": str(evaluation),
    }


def host() -> dict[str, Any]:
    """The machine a run ran on: its name, CPU model and cores."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"name": socket.gethostname(), "cpu": model, "cores": os.cpu_count()}


def config_hash(pipeline: Path, scale: str, selector: str, overrides: list[str]) -> str:
    """Hash of the resolved config of a run apart from its seed: the runs of one method and config
    share it across seeds, so the results table averages them."""
    cfg = compose(pipeline, [f"evaluation.selector={selector}", *overrides, "seed=0"], scale=scale)
    return fingerprint(without_neutral(resolve_config(OmegaConf.to_container(cfg, resolve=True))))


def record(path: Path, meta: dict[str, Any], run: dict[str, Any]) -> None:
    """Add ``run`` to the results file at ``path`` (written atomically), replacing a record of the
    same seed, method and config; a stage the new run found cached keeps the earlier record's
    time for the same artifact (fingerprint)."""
    data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    key = (run["seed"], run["selector"], run["config_hash"])
    same = [r for r in data["runs"] if (r["seed"], r["selector"], r["config_hash"]) == key]
    runs = [r for r in data["runs"] if r not in same]
    # A stage this run found finished keeps the time measured when it was trained.
    for old in same:
        for stage, seconds in run["stage_s"].items():
            if seconds is None and old["fingerprints"].get(stage) == run["fingerprints"][stage]:
                run["stage_s"][stage] = old["stage_s"].get(stage)
    runs.append(run)
    runs.sort(key=lambda r: (r["selector"], r["seed"], r["config_hash"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**data, **meta, "runs": runs}, indent=2) + "\n")


def recorded(path: Path, seed: int, hashes: dict[str, str]) -> list[dict[str, Any]] | None:
    """The records of ``seed`` in the results file at ``path`` if every method in ``hashes``
    (selector → config hash) has one under that config, else None."""
    if not path.is_file():
        return None
    runs = json.loads(path.read_text())["runs"]
    found = []
    for selector, chash in hashes.items():
        mine = [
            r
            for r in runs
            if (r["seed"], r["selector"], r["config_hash"]) == (seed, selector, chash)
        ]
        if not mine:
            return None
        found.append(mine[0])
    return found


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def own_stage_s(run: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The times of the stages ``run`` made for itself: a baseline shares the trained stages of
    the LDCQ (``q``) run of its seed, whose times are LDCQ's, so only its own (its evaluation)
    count for it; None for a shared or untimed stage."""
    shared: set[str] = set()
    if run["selector"] != "q":
        for other in runs:
            if other["selector"] == "q" and other["seed"] == run["seed"]:
                fps = other["fingerprints"]
                shared |= {s for s, fp in run["fingerprints"].items() if fps.get(s) == fp}
    return {s: (None if s in shared else t) for s, t in run["stage_s"].items()}


def summarize(runs: list[dict], stages) -> list[dict[str, Any]]:
    """Per selector: mean ± std over seeds of every score and of each stage the method made
    for itself (:func:`own_stage_s`)."""
    rows = []
    for selector in dict.fromkeys(r["selector"] for r in runs):
        mine = [r for r in runs if r["selector"] == selector]
        own = [own_stage_s(r, runs) for r in mine]
        stage_s = {}
        for stage in stages:
            timed = [o[stage] for o in own if o.get(stage) is not None]
            stage_s[stage] = _mean_std(timed) if timed else None
        rows.append(
            {
                "method": METHODS.get(selector, selector),
                "selector": selector,
                "seeds": [r["seed"] for r in mine],
                "scores": {
                    k: _mean_std([r["metrics"][k] for r in mine])
                    for k in (*SCORES, *EXTRA_SCORES)
                    if all(k in r["metrics"] for r in mine)
                },
                "stage_s": stage_s,
                "command_s": _mean_std([r["command_s"] for r in mine]),
            }
        )
    return rows


def print_summary(summary: list[dict], stages, title: str, console) -> None:
    def pm(v: dict[str, float] | None, digits: int = 2, missing: str = "cached") -> str:
        return missing if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    table = Table(title=title, title_justify="left")
    table.add_column("method", no_wrap=True)
    for col in ("seeds", "normalized score", "success rate", "return", "first-hit normalized"):
        table.add_column(col, justify="right")
    for stage in stages:
        table.add_column(f"{stage} s", justify="right")
    table.add_column("command s", justify="right")
    for row in summary:
        s = row["scores"]
        table.add_row(
            f"{row['method']} ({row['selector']})",
            str(len(row["seeds"])),
            pm(s["eval/normalized_score"]),
            pm(s["eval/success_rate"]),
            pm(s["eval/return_mean"], 1),
            pm(s.get("eval/first_hit_normalized"), 1, missing="n/a"),
            *(pm(row["stage_s"][stage], 0) for stage in stages),
            pm(row["command_s"], 0),
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldcq.bench.score",
        description="Normalized score over seeds, LDCQ beside the BC baseline (make bench-score).",
    )
    p.add_argument("--pipeline", default="pipelines/pointmaze-umaze.yaml")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1")
    p.add_argument("--scale", default="quick", choices=["quick", "cpu", "paper"])
    p.add_argument(
        "--selectors",
        default="q,prior,vae-prior",
        help="evaluation.selector values, comma-separated",
    )
    p.add_argument("--out-dir", default="results", help="where <pipeline>-<scale>.json goes")
    p.add_argument(
        "--rerun",
        action="store_true",
        help="train and evaluate a seed again even when the results file holds it for this config",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or redirected: keep the table's 12 columns on one line
        console = Console(width=200)
    try:
        stages = require_evaluation()
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: need at least 1")
        pipeline = Path(args.pipeline)
        cfg = compose(pipeline, args.overrides, scale=args.scale)
        ensure_dataset(cfg.dataset)
        selectors = [s for s in args.selectors.split(",") if s]
        path = Path(args.out_dir) / f"{cfg.name}-{args.scale}.json"
        meta = {"pipeline": cfg.name, "pipeline_file": str(pipeline), "scale": args.scale}
        meta["bench_command"] = " ".join(["python -m ldcq.bench.score", *(argv or sys.argv[1:])])
        runs = []
        hashes = {s: config_hash(pipeline, args.scale, s, args.overrides) for s in selectors}
        for seed in range(args.seeds):
            done = None if args.rerun else recorded(path, seed, hashes)
            if done is not None:
                shas = sorted({r["git_sha"][:7] for r in done})
                print(
                    f"bench-score: seed {seed} is recorded in {path} for this config (git "
                    f"{', '.join(shas)}); skipped (--rerun trains it again)",
                    flush=True,
                )
                runs.extend(done)
                continue
            for selector in selectors:
                runs.append(run_once(pipeline, args.scale, seed, selector, args.overrides, stages))
                record(path, meta, runs[-1])
    except (LdcqError, subprocess.CalledProcessError) as exc:
        print(f"ldcq bench-score: error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(runs, stages)
    title = f"{cfg.name}, {args.scale} scale, seeds 0–{args.seeds - 1} (mean ± std over seeds)"
    print_summary(summary, stages, title, console)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
