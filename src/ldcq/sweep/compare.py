"""The comparison of a sweep's runs: mean ± std per point and method, the effect of each key against the seed noise, plots and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

METHODS = {"q": "LDCQ", "prior": "diffusion prior, no Q", "vae-prior": "BC (VAE prior)"}
SCORES = ("eval/normalized_score", "eval/success_rate", "eval/first_hit_normalized")
DIAGNOSTICS = (
    "diag/oos_rate_diffusion",
    "diag/oos_rate_vae_prior",
    "diag/mode_coverage_diffusion",
    "diag/mode_coverage_vae_prior",
    "diag/recon_mse_relative",
    "diag/value_ascent_share",
    "diag/value_distance_corr",
    "diag/q_mean_late_change",
    "diag/stalled_share",
    "diag/stalled_top_cell_share",
    "diag/pick_oos_rate",
    "diag/stalled_pick_oos_share",
    "diag/stalled_sample_oos_rate",
)


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


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``dof`` degrees of freedom, by bisection
    on its CDF (the density integrated numerically; about 1e-6 accurate)."""
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        density = np.exp(log_c - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2) * (grid[1] - grid[0]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


ALPHA = 0.05  # the effect test's level


def effect(rows: list[dict], key: str, keys: list[str], metric: str = SCORES[0]) -> dict:
    """How much ``key`` moves LDCQ's ``metric``: the best minus the worst value's mean (the other
    keys held at each of their combinations) beside the seed-to-seed spread (the standard
    deviation over seeds, pooled over the values). The effect counts as larger than the seed
    noise when a two-sided pooled t-test of those two means rejects equality at 5 %, Bonferroni-
    corrected for the k(k−1)/2 pairs among k values (the best and worst are chosen after the
    fact); ``critical_t`` and the t statistic are recorded."""
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
        t_stat = critical = verdict = None
        if pooled is not None:
            n_b, n_w = best["metrics"][metric]["n"], worst["metrics"][metric]["n"]
            se = pooled * math.sqrt(1 / n_b + 1 / n_w)
            pairs = len(group) * (len(group) - 1) // 2
            critical = t_quantile(1 - ALPHA / (2 * pairs), dof)
            t_stat = diff / se if se > 0 else (math.inf if diff > 0 else 0.0)
            verdict = bool(t_stat > critical)
        out.append(
            {
                "others": dict(zip(others, (json.loads(c) for c in combo), strict=True)),
                "best": best["point"][key],
                "worst": worst["point"][key],
                "difference": diff,
                "seed_std": pooled,
                "dof": dof,
                "t": t_stat,
                "critical_t": critical,
                "beyond_seed_noise": verdict,
            }
        )
    return {"metric": metric, "method": "LDCQ", "groups": out}


_SCORE_PANELS = (
    ("eval/normalized_score", "normalized score"),
    ("eval/success_rate", "success rate"),
)
_STYLES = {"q": ("tab:blue", "o"), "vae-prior": ("tab:orange", "s"), "prior": ("tab:green", "^")}
_DIAGNOSTIC_LINES = (
    ("diag/oos_rate_diffusion", "out of support, diffusion", "tab:blue"),
    ("diag/oos_rate_vae_prior", "out of support, VAE prior", "tab:orange"),
    ("diag/mode_coverage_diffusion", "mode coverage, diffusion", "tab:cyan"),
    ("diag/mode_coverage_vae_prior", "mode coverage, VAE prior", "tab:red"),
    ("diag/value_distance_corr", "rank corr. of V with closeness to goal", "tab:purple"),
)


def _combo(row: dict, others: list[str]) -> tuple[str, ...]:
    return tuple(json.dumps(row["point"][k]) for k in others)


def _errorbar(ax, rows, key, others, values, selector, combo, metric, offset, **style) -> None:
    """Mean ± std of ``metric`` over the values of ``key`` for one method and one combination
    of the other keys."""
    place = {v: i for i, v in enumerate(values)}
    points = [
        (place[json.dumps(r["point"][key])], r["metrics"][metric])
        for r in rows
        if r["selector"] == selector and _combo(r, others) == combo and metric in r["metrics"]
    ]
    if points:
        xs, stats = zip(*points, strict=True)
        ys, es = [m["mean"] for m in stats], [m["std"] for m in stats]
        ax.errorbar(np.array(xs) + offset, ys, yerr=es, capsize=3, **style)


def plot_key(summary: dict, key: str, keys: list[str], path: Path, title: str) -> Path:
    """Scores (LDCQ beside BC) and the diagnostics against the values of ``key``, mean ± std over
    seeds; one line per combination of the other keys."""
    from matplotlib import pyplot as plt

    rows = summary["rows"]
    others = [k for k in keys if k != key]
    values = list(dict.fromkeys(json.dumps(r["point"][key]) for r in rows))
    combos = list(dict.fromkeys(_combo(r, others) for r in rows))
    diagnosed = any(d in r["metrics"] for r in rows for d, _, _ in _DIAGNOSTIC_LINES)
    panels = len(_SCORE_PANELS) + diagnosed
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 3.8), squeeze=False)
    axes = axes[0]
    line = (rows, key, others, values)
    for ax, (metric, label) in zip(axes, _SCORE_PANELS, strict=False):
        for selector in dict.fromkeys(r["selector"] for r in rows):
            color, marker = _STYLES.get(selector, ("black", "x"))
            for j, combo in enumerate(combos):
                extra = ", ".join(f"{k}={c}" for k, c in zip(others, combo, strict=True))
                name = METHODS[selector] + (f" ({extra})" if extra else "")
                style = {"color": color, "marker": marker, "alpha": 1.0 - 0.25 * j, "label": name}
                _errorbar(ax, *line, selector, combo, metric, 0.04 * j, **style)
        ax.set_ylabel(label)
    if diagnosed:
        ax = axes[-1]
        for metric, label, color in _DIAGNOSTIC_LINES:
            for j, combo in enumerate(combos):
                style = {"color": color, "marker": "o", "label": label if j == 0 else None}
                _errorbar(ax, *line, "q", combo, metric, 0.04 * j, **style)
        ax.set_ylabel("share (correlation for V)")
        ax.set_title("skill and value diagnostics")
    for ax in axes:
        ax.set_xticks(np.arange(len(values)), [v.strip('"') for v in values])
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def flat_summary(summary: dict) -> dict[str, float]:
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
