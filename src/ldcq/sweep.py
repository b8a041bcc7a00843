"""``ldcq sweep``: a grid of config values × seeds, each point one pipeline run, and a comparison.

``ldcq sweep pipelines/pointmaze-umaze.yaml --grid horizon=10,20,30 --seeds 3`` runs, for every
grid point and seed, the pipeline with LDCQ's evaluation (``evaluation.selector=q``) and then the
BC baseline's (``vae-prior``), which reuses the trained stages. The runs share every artifact
whose fingerprint the point does not change (a sweep over the prior's schedule trains one skill
VAE per seed). Every run evaluates with ``evaluation.diagnostics=true``.

- Before anything trains, every grid key and value is checked: it must exist, hold a value of the
  key's type, be one a user may set (not a dataset-derived dim, not a key that follows another
  by interpolation), and build every stage's model.
- One MLflow parent run per sweep (tag ``ldcq.sweep``), the pipeline runs nested under it; the
  comparison is logged on it as artifacts.
- ``results/sweeps/<name>.json`` holds every run (point, seed, method, metrics, config hash,
  fingerprints, git sha, wall times) and the comparison: per swept key, mean ± std over seeds of
  each score for LDCQ and BC, with the effect of the key set against the seed-to-seed spread;
  ``results/sweeps/<name>-<key>.png`` plots it.
- A rerun of the same command skips the runs already recorded (in that file or, from a cluster's
  tasks, in the sweep's work folder); finished stages of an interrupted run are skipped as always.
- Launchers: ``inline`` (default) runs the runs one after another in this process; ``slurm``
  submits them as one SLURM job array through submitit, each task one run on the shared
  checkpoints folder (artifacts are locked one by one, so tasks that need the same upstream
  artifact wait for one maker); ``submitit-local`` runs the same array as local processes
  (submitit's local executor), the way the tests exercise the cluster path.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf

from ldcq.artifacts import atomic_write_text, fingerprint, git_sha
from ldcq.config import _closest, compose, project_root
from ldcq.errors import ConfigError
from ldcq.process import say
from ldcq.stages.latent_bank import check_bank_settings
from ldcq.stages.registry import REGISTRY, TRAINED

SELECTORS = ("q", "vae-prior")
METHODS = {"q": "LDCQ", "prior": "diffusion prior, no Q", "vae-prior": "BC (VAE prior)"}
SCORES = ("eval/normalized_score", "eval/success_rate", "eval/first_hit_normalized")
DIAGNOSTICS = (
    "diag/oos_rate_diffusion",
    "diag/oos_rate_vae_prior",
    "diag/mode_coverage_diffusion",
    "diag/mode_coverage_vae_prior",
    "diag/recon_mse_relative",
)
LAUNCHERS = ("inline", "slurm", "submitit-local")
# Keys a sweep cannot vary: what names the run and where it goes, and what has its own option.
FIXED = {
    "name": "it names the experiment and the checkpoints folder",
    "family": "it selects the task family's defaults",
    "seed": "use --seeds",
    "scale": "use --scale",
    "checkpoints_dir": "the sweep's runs share one checkpoints folder",
    "tracking_uri": "the sweep's runs share one MLflow store",
}


# ---------------------------------------------------------------------------------------------
# The grid


def split_values(text: str) -> list[str]:
    """``"10,20,30"`` -> ``["10", "20", "30"]``; commas inside brackets stay
    (``"[128,32],[256,64]"`` -> two lists)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["horizon=10,20", "skill_vae.model.latent_dim=8,16"]`` -> ``{key: [value text, …]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r}: write key=v1,v2,… (e.g. --grid horizon=10,20,30)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; put all its values in one --grid")
        texts = split_values(values)
        if "" in texts or len(set(texts)) != len(texts):
            raise ConfigError(f"--grid {item!r}: a value is empty or repeated")
        grid[key] = texts
    if not grid:
        raise ConfigError("ldcq sweep needs at least one --grid key=v1,v2,…")
    return grid


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _check_type(key: str, text: str, value: Any, default: Any) -> Any:
    """``value`` (parsed from ``text``) as the type of the key's ``default``, or a ConfigError."""
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"--grid {key}: value {text!r} is {_type_name(value)}, but {key} holds "
            f"{_type_name(default)} (default {default!r})"
        )
    return value


def _raw_defaults(pipeline: Path):
    """The family defaults as written (interpolations unresolved)."""
    return OmegaConf.load(project_root(pipeline) / "configs" / "family" / "ldcq.yaml")


def check_grid(
    pipeline: Path, scale: str, grid: dict[str, list[str]], overrides: list[str]
) -> dict[str, list[Any]]:
    """Typed values per key, once every key and value is known to be one a run can take: the key
    exists, may be swept, each value has the key's type, and every point composes and builds
    every trained stage's model. Raises one ConfigError naming the key and the fix."""
    base = compose(pipeline, overrides, scale=scale)
    raw = _raw_defaults(pipeline)
    dims = {f"{name}.model.{dim}": name for name in TRAINED for dim in REGISTRY[name].data_dims}
    typed: dict[str, list[Any]] = {}
    for key, texts in grid.items():
        top = key.split(".", 1)[0]
        if key in FIXED or (top in FIXED and "." not in key):
            raise ConfigError(f"--grid {key}: cannot be swept ({FIXED[top]})")
        if key in dims:
            raise ConfigError(
                f"--grid {key}: cannot be swept; {dims[key]} reads it from the dataset or the "
                f"skill VAE's artifact (sweep skill_vae.model.latent_dim for Z, horizon for H)"
            )
        default = OmegaConf.select(base, key, default="<missing>")
        if isinstance(default, str) and default == "<missing>":
            raise ConfigError(f"--grid {key}: unknown config key{_closest(key, base)}")
        source = OmegaConf.to_container(raw, resolve=False)
        for part in key.split("."):
            source = source.get(part) if isinstance(source, dict) else None
        if isinstance(source, str) and source.startswith("${"):
            raise ConfigError(
                f"--grid {key}: cannot be swept; it follows {source[2:-1]} ({source}): sweep "
                f"{source[2:-1]} instead"
            )
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default, resolve=True)
        values = []
        for text in texts:
            value = yaml.safe_load(text)
            values.append(_check_type(key, text, value, default))
        typed[key] = values
    for point in grid_points(typed):
        point_overrides = [*overrides, *point_to_overrides(point)]
        try:
            cfg = compose(pipeline, point_overrides, scale=scale)
            check_buildable(cfg)
        except ConfigError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"--grid point {where}: {exc}") from exc
    return typed


def check_buildable(cfg) -> None:
    """Build every trained stage's model on placeholder dataset dims (S=4, A=2) and check the
    bank's and the evaluation's settings: a value a stage refuses fails here, before training."""
    dims = {"S": 4, "A": 2, "Z": int(cfg.skill_vae.model.latent_dim), "H": int(cfg.horizon)}
    for name in TRAINED:
        model_cfg = OmegaConf.to_container(cfg[name].model, resolve=True)
        try:
            REGISTRY[name].new_model(model_cfg, dims)
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}.model: {exc}") from exc
    bank = cfg.latent_bank
    check_bank_settings(
        num_samples=bank.num_samples,
        sampler=bank.sampler,
        sampling_steps=bank.sampling_steps,
        extra_steps=bank.extra_steps,
        batch_size=bank.batch_size,
    )
    if cfg.evaluation.selector not in METHODS:
        raise ConfigError(
            f"evaluation.selector={cfg.evaluation.selector!r}: valid selectors are {list(METHODS)}"
        )


def grid_points(typed: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cross product of the grid, first key slowest."""
    keys = list(typed)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*typed.values())]


def point_to_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]


# ---------------------------------------------------------------------------------------------
# One run (a grid point and a seed: LDCQ, then the baselines on the same trained stages)


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
    sweep: str
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


def job_key(pipeline: Path, scale: str, overrides: list[str], seed: int) -> str:
    """Names a run by its resolved config (seed aside) and seed: the same point of another sweep
    command, or the same grid value written differently, is the same run."""
    from ldcq.bench.score import config_hash

    return f"{config_hash(pipeline, scale, 'q', overrides)}-seed{seed}"


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


# ---------------------------------------------------------------------------------------------
# The comparison


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "n": len(a),
    }


def summarize(runs: list[dict], keys: list[str]) -> dict[str, Any]:
    """Per grid point and method, mean ± std over seeds of every score and diagnostic; per
    swept key, the effect on LDCQ's normalized score against the seed-to-seed spread."""
    rows = []
    points = []
    for run in runs:
        if run["point"] not in points:
            points.append(run["point"])
    for point in points:
        for selector in dict.fromkeys(r["selector"] for r in runs):
            mine = [r for r in runs if r["point"] == point and r["selector"] == selector]
            if not mine:
                continue
            metrics = {
                k: _mean_std([r["metrics"][k] for r in mine])
                for k in (*SCORES, *DIAGNOSTICS)
                if all(k in r["metrics"] for r in mine)
            }
            rows.append(
                {
                    "point": point,
                    "selector": selector,
                    "method": METHODS[selector],
                    "seeds": sorted(r["seed"] for r in mine),
                    "metrics": metrics,
                }
            )
    effects = {key: effect(rows, key, keys) for key in keys}
    return {"rows": rows, "effects": effects}


def effect(rows: list[dict], key: str, keys: list[str], metric: str = SCORES[0]) -> dict:
    """How much ``key`` moves LDCQ's ``metric``: the spread of the per-value means (largest minus
    smallest, the other keys at each of their combinations) beside the seed-to-seed spread (the
    pooled standard deviation over seeds). The effect counts as larger than the seed noise when
    the two extreme means differ by more than twice the standard error of their difference."""
    mine = [r for r in rows if r["selector"] == "q" and metric in r["metrics"]]
    others = [k for k in keys if k != key]
    out = []
    for combo in dict.fromkeys(tuple(json.dumps(r["point"][k]) for k in others) for r in mine):
        group = [r for r in mine if tuple(json.dumps(r["point"][k]) for k in others) == combo]
        if len(group) < 2:
            continue
        stats = [r["metrics"][metric] for r in group]
        dof = sum(s["n"] - 1 for s in stats)
        pooled = math.sqrt(sum((s["n"] - 1) * s["std"] ** 2 for s in stats) / dof) if dof else None
        best = max(group, key=lambda r: r["metrics"][metric]["mean"])
        worst = min(group, key=lambda r: r["metrics"][metric]["mean"])
        diff = best["metrics"][metric]["mean"] - worst["metrics"][metric]["mean"]
        se = None
        if pooled is not None:
            n_b, n_w = best["metrics"][metric]["n"], worst["metrics"][metric]["n"]
            se = pooled * math.sqrt(1 / n_b + 1 / n_w)
        out.append(
            {
                "others": dict(zip(others, (json.loads(c) for c in combo), strict=True)),
                "best": best["point"][key],
                "worst": worst["point"][key],
                "difference": diff,
                "seed_std": pooled,
                "beyond_seed_noise": None if se is None else bool(diff > 2 * se),
            }
        )
    return {"metric": metric, "method": "LDCQ", "groups": out}


def plot_key(summary: dict, key: str, keys: list[str], path: Path, title: str) -> Path:
    """Scores (LDCQ beside BC) and the diagnostics against the values of ``key``, mean ± std over
    seeds; one line per combination of the other keys."""
    from matplotlib import pyplot as plt

    rows = summary["rows"]
    others = [k for k in keys if k != key]
    values = list(dict.fromkeys(json.dumps(r["point"][key]) for r in rows))
    x = np.arange(len(values))
    panels = [
        ("eval/normalized_score", "normalized score"),
        ("eval/success_rate", "success rate"),
    ]
    diag_panel = any(d in r["metrics"] for r in rows for d in DIAGNOSTICS[:2])
    fig, axes = plt.subplots(1, len(panels) + diag_panel, figsize=(5.0 * (len(panels) + 1), 3.8))
    combos = list(dict.fromkeys(tuple(json.dumps(r["point"][k]) for k in others) for r in rows))
    styles = {"q": ("tab:blue", "o"), "vae-prior": ("tab:orange", "s"), "prior": ("tab:green", "^")}

    def series(selector, combo, metric):
        ys, es, xs = [], [], []
        for i, v in enumerate(values):
            for r in rows:
                if (
                    r["selector"] == selector
                    and json.dumps(r["point"][key]) == v
                    and tuple(json.dumps(r["point"][k]) for k in others) == combo
                    and metric in r["metrics"]
                ):
                    xs.append(i)
                    ys.append(r["metrics"][metric]["mean"])
                    es.append(r["metrics"][metric]["std"])
        return xs, ys, es

    for ax, (metric, label) in zip(axes, panels, strict=False):
        for selector in dict.fromkeys(r["selector"] for r in rows):
            color, marker = styles.get(selector, ("black", "x"))
            for j, combo in enumerate(combos):
                xs, ys, es = series(selector, combo, metric)
                extra = ", ".join(f"{k}={c}" for k, c in zip(others, combo, strict=True))
                name = METHODS[selector] + (f" ({extra})" if extra else "")
                ax.errorbar(
                    np.array(xs) + 0.04 * j,
                    ys,
                    yerr=es,
                    color=color,
                    marker=marker,
                    capsize=3,
                    alpha=1.0 - 0.25 * j,
                    label=name,
                )
        ax.set_ylabel(label)
    if diag_panel:
        ax = axes[-1]
        q_combo = [
            ("diag/oos_rate_diffusion", "out of support, diffusion", "tab:blue"),
            ("diag/oos_rate_vae_prior", "out of support, VAE prior", "tab:orange"),
            ("diag/mode_coverage_diffusion", "mode coverage, diffusion", "tab:cyan"),
            ("diag/mode_coverage_vae_prior", "mode coverage, VAE prior", "tab:red"),
        ]
        for metric, label, color in q_combo:
            for j, combo in enumerate(combos):
                xs, ys, es = series("q", combo, metric)
                if xs:
                    ax.errorbar(
                        np.array(xs) + 0.04 * j,
                        ys,
                        yerr=es,
                        color=color,
                        marker="o",
                        capsize=3,
                        label=label if j == 0 else None,
                    )
        ax.set_ylabel("share")
        ax.set_title("skill diagnostics")
    for ax in axes:
        ax.set_xticks(x, [v.strip('"') for v in values])
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The sweep


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
        keys = "-".join(k.rsplit(".", 1)[-1].replace("_", "-") for k in self.grid)
        self.name = self.name or f"{self.cfg.name}-{self.scale}-{keys}"
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
        out = []
        for point in grid_points(self.grid):
            overrides = [*self.overrides, *point_to_overrides(point)]
            for seed in range(self.seeds):
                key = job_key(self.pipeline, self.scale, overrides, seed)
                out.append(
                    SweepJob(
                        pipeline=str(self.pipeline),
                        scale=self.scale,
                        overrides=tuple(overrides),
                        point=point,
                        seed=seed,
                        selectors=self.selectors,
                        key=key,
                        sweep=self.name,
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

    def write(self, keys_wanted: set[str]) -> dict[str, Any]:
        """The results file and one plot per swept key from every recorded run of this sweep."""
        recorded = self.recorded()
        runs = [r for k in sorted(recorded) if k in keys_wanted for r in recorded[k]]
        runs.sort(key=lambda r: (json.dumps(r["point"]), r["seed"], r["selector"]))
        keys = list(self.grid)
        summary = summarize(runs, keys) if runs else {"rows": [], "effects": {}}
        data = {
            "name": self.name,
            "pipeline": self.cfg.name,
            "pipeline_file": str(self.pipeline),
            "scale": self.scale,
            "grid": self.grid,
            "seeds": self.seeds,
            "overrides": self.overrides,
            "selectors": list(self.selectors),
            "command": self.command,
            "git_sha": git_sha(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "summary": summary,
            "runs": runs,
        }
        self.results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results, json.dumps(data, indent=2) + "\n")
        plots = []
        if summary["rows"]:
            for key in keys:
                path = self.out_dir / f"{self.name}-{key.replace('.', '_')}.png"
                title = f"{self.cfg.name} ({self.scale}): {key}, mean ± std over seeds"
                plots.append(plot_key(summary, key, keys, path, title))
        data["plots"] = [str(p) for p in plots]
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
        run_id = found[0].info.run_id
        tracker.client.update_run(run_id, status="RUNNING")
        tracker._open_runs.append(run_id)
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


def launch(jobs: list[SweepJob], launcher: str, slurm: dict[str, Any], folder: Path) -> None:
    """Run ``jobs`` with ``launcher``; a failed job raises after the others finished."""
    if launcher == "inline":
        for i, job in enumerate(jobs):
            say(
                f"sweep: run {i + 1}/{len(jobs)}: {' '.join(job.overrides) or '(base)'} "
                f"seed={job.seed}"
            )
            run_job(job)
        return
    import submitit

    cluster = {"slurm": "slurm", "submitit-local": "local"}[launcher]
    executor = submitit.AutoExecutor(folder=str(folder / "submitit"), cluster=cluster)
    params = {k: v for k, v in slurm.items() if v is not None}
    executor.update_parameters(name="ldcq-sweep", **params)
    submitted = executor.map_array(run_job, jobs)
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
            try:
                launch(pending, launcher, slurm or {}, sweep.work)
            finally:
                data = sweep.write({j.key for j in jobs})
        else:
            data = sweep.write({j.key for j in jobs})
    except BaseException:
        if tracker is not None:
            tracker.end_open_runs("FAILED")
        raise
    if tracker is not None:
        for key, stats in _flat_summary(data["summary"]).items():
            tracker.client.log_metric(parent, key, stats)
        tracker.log_artifact(parent, sweep.results)
        for plot in data["plots"]:
            tracker.log_artifact(parent, plot)
        tracker.end_run(parent)
    return data


def _flat_summary(summary: dict) -> dict[str, float]:
    """Mean scores per point and method as MLflow metric names (for the sweep run's table)."""
    out = {}
    for row in summary["rows"]:
        point = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["point"].items())
        for metric, stats in row["metrics"].items():
            name = f"{row['selector']}/{point}/{metric.split('/', 1)[-1]}"
            out["".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)] = stats["mean"]
    return out


def print_summary(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200) if not Console().is_terminal else Console()
    table = Table(title=f"sweep {data['name']} (mean ± std over seeds)")
    for col in (
        "point",
        "method",
        "seeds",
        "normalized score",
        "success",
        "first-hit norm.",
        "OOS diffusion / VAE",
        "modes diffusion / VAE",
    ):
        table.add_column(col)

    def pm(m, k, scale=1.0, digits=1):
        if k not in m:
            return "–"
        return f"{scale * m[k]['mean']:.{digits}f} ± {scale * m[k]['std']:.{digits}f}"

    for row in data["summary"]["rows"]:
        m = row["metrics"]
        table.add_row(
            ", ".join(f"{k}={v}" for k, v in row["point"].items()),
            row["method"],
            str(len(row["seeds"])),
            pm(m, "eval/normalized_score"),
            pm(m, "eval/success_rate", 100, 0),
            pm(m, "eval/first_hit_normalized"),
            f"{pm(m, 'diag/oos_rate_diffusion', 100, 1)} / {pm(m, 'diag/oos_rate_vae_prior', 100, 1)}",
            f"{pm(m, 'diag/mode_coverage_diffusion', 1, 2)} / "
            f"{pm(m, 'diag/mode_coverage_vae_prior', 1, 2)}",
        )
    console.print(table)
    for key, eff in data["summary"]["effects"].items():
        for g in eff["groups"]:
            noise = "n/a" if g["seed_std"] is None else f"{g['seed_std']:.1f}"
            verdict = {True: "larger than", False: "within", None: "not compared with"}[
                g["beyond_seed_noise"]
            ]
            console.print(
                f"{key}: best {g['best']} vs worst {g['worst']}: {g['difference']:+.1f} "
                f"{eff['metric'].split('/')[-1]} (seed std {noise}): {verdict} the seed noise"
            )
    console.print(f"wrote {(data.get('plots') and ', '.join(data['plots'])) or 'no plots'}")
