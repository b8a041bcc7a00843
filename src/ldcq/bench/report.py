"""The `make bench` report: the issue's targets as pass/fail lines, the JSON file, the tables."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

# Cores that other processes kept busy during a section above which its timings are suspect.
DISTURBED_CORES = 0.2


def targets(report: dict) -> list[dict[str, Any]]:
    """The issue's targets as pass/fail lines; the speedups are over the reference mode measured
    in the same run (none without it)."""
    lines = [_sampler_target(s) for s in report["sampling"]["schedules"]]
    lines += [_bank_target(report["bank"]), _replay_target(report["q_learning"])]
    return lines + [_speedup_target(r, report["sampling"]) for r in report.get("speedups", [])]


def _quality(sampling: dict, name: str) -> str:
    """Whether sampler ``name``'s samples are as good as DDPM's by the bench's MMD check, for the
    prior trained with the configured schedule."""
    if name.startswith("DDPM"):
        return "DDPM itself"
    schedule = next(s for s in sampling["schedules"] if s["configured"])
    rows = [r for r in schedule["samplers"] if r["name"] == name]
    if not rows:
        return f"{name}'s quality not measured (not in --ddim_steps / --dpmpp_steps)"
    equal = "equal to" if rows[0]["equal_quality"] else "NOT equal to"
    return f"{name} samples {equal} DDPM's by MMD² ({schedule['schedule']} schedule)"


def _speedup_target(row: dict, sampling: dict) -> dict[str, Any]:
    result = (
        f"{row['speedup']:.1f}×: {_g(row['ours'])} vs {_g(row['reference'])} {row['unit']} "
        f"({row['setting']} vs {row['reference_setting']})"
    )
    if row.get("sampler"):
        result += f"; {_quality(sampling, row['sampler'])}"
    return {
        "target": f"{row['label']} ≥ {row['target']:.0f}× the reference mode",
        "result": result,
        "pass": row["speedup"] >= row["target"],
    }


def _bank_target(bank: dict) -> dict[str, Any]:
    mapped = "memory-mapped np.memmap" if bank["memory_mapped"] else "NOT memory-mapped"
    return {
        "target": "bank ≤ 64 B per stored sample, never whole in RAM",
        "result": f"{bank['bytes_per_sample']} B/sample (fp16), "
        f"{bank['bytes_per_transition']:,.0f} B/transition at K={bank['K']}; {mapped}",
        "pass": bank["bytes_per_sample"] <= 64 and bank["memory_mapped"],
    }


def _replay_target(q_learning: dict) -> dict[str, Any]:
    q_rows = q_learning["rows"]
    worst = max(q_rows, key=lambda r: r["replay_share"])
    worst_run = max(q_rows, key=lambda r: r["prioritized_cost"])
    return {
        "target": "prioritized sampling ≤ 20 % over uniform per update",
        # The two runs differ only by the replay's work (draw, weights, priority update), so
        # that work, timed alone, is the cost; whole runs swing by ±20 % between runs here.
        "result": f"the replay's own work: worst {100 * worst['replay_share']:.1f} % of a "
        f"uniform update (B={worst['batch']}, K={worst['K']}); whole runs, best of "
        f"{q_learning['rounds']}: worst "
        f"{100 * worst_run['prioritized_cost']:+.1f} % (B={worst_run['batch']}, "
        f"K={worst_run['K']})",
        "pass": worst["replay_share"] <= 0.20,
    }


def _sampler_target(schedule: dict) -> dict[str, Any]:
    """The few-step target for the prior trained with one noise schedule: the fastest few-step
    sampler (DDIM or DPM-Solver++, any step count) whose samples are as good as DDPM's."""
    ddpm, few = schedule["samplers"][0], schedule["samplers"][1:]
    equal = [r for r in few if r["equal_quality"]]
    fastest = max(equal, key=lambda r: r["speedup"]) if equal else None
    if fastest is None:
        closest = min(few, key=lambda r: r["mmd2_excess"])
        result = (
            f"no few-step sampler reaches DDPM's quality (MMD² {ddpm['mmd2']:.4f}); closest "
            f"{closest['name']} at {closest['mmd2']:.4f}, {closest['speedup']:.1f}× DDPM"
        )
    else:
        result = (
            f"{fastest['name']}: {fastest['speedup']:.1f}× DDPM's latents/s; MMD² "
            f"{fastest['mmd2']:.4f} vs DDPM {ddpm['mmd2']:.4f} (excess "
            f"{fastest['mmd2_excess']:+.4f} ± {fastest['mmd2_excess_se']:.4f})"
        )
    which = "configured" if schedule["configured"] else "alternative"
    return {
        "target": f"few-step sampler ≥ 20× DDPM latents/s at equal quality, "
        f"{schedule['schedule']} schedule ({which})",
        "result": result,
        "pass": fastest is not None and fastest["speedup"] >= 20,
    }


def write_report(report: dict, out_dir: str | Path) -> Path:
    """``<out_dir>/<date>-<host>.json``; the date carries the time, so runs never overwrite."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(report["meta"]["date"]).strftime("%Y-%m-%d-%H%M%S")
    path = out_dir / f"{stamp}-{report['meta']['host']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def sections(report: dict) -> list[tuple[str, dict]]:
    """(label, result) of every measured section of ``report``."""
    out = [("matmul peak", report["peak"])]
    out += [(f"train {r['family']} {r['stage']}", r) for r in report["train"]]
    out += [(k.replace("_", " "), report[k]) for k in ("sampling", "bank", "q_learning")]
    out.append(("latency", report["latency"]))
    ref = report.get("reference")
    if ref is not None:
        out += [(f"reference train {r['family']} {r['stage']}", r) for r in ref["train"]]
        out += [("reference bank", ref["bank"]), ("reference latency", ref["latency"])]
    return out


def _g(x: float) -> str:
    """A number for a table: thousands separators when large, 3 significant digits otherwise."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _table(title: str, columns: list[str], rows: list[list[str]], left: int = 1) -> Table:
    """A rich table; the first ``left`` columns are left-justified, the others right."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_report(report: dict, console) -> None:
    """Every section of ``report`` as rich tables on ``console``."""
    console.print(_header(report["meta"], report["peak"]["gflops"]))
    console.print(_train_table(report["train"]))
    console.print(_sampler_table(report["sampling"]))
    console.print(_bank_line(report["bank"]))
    console.print(_q_table(report["q_learning"]))
    console.print(_latency_table(report["latency"]["rows"]))
    if "speedups" in report:
        console.print(_speedup_table(report))
    console.print(_memory_table(report))
    disturbed = [
        label for label, r in sections(report) if r.get("other_cpu_cores", 0) > DISTURBED_CORES
    ]
    if disturbed:
        console.print(
            f"[yellow]Other processes kept > {DISTURBED_CORES} cores busy during: "
            f"{', '.join(disturbed)}; their timings are pessimistic. Rerun on a quiet machine.[/]"
        )
    console.print(
        "[bold]Projected time at the configured steps here[/]: "
        + ", ".join(f"{r['family']} {r['stage']} {r['hours']:.2g} h" for r in report["projection"])
    )
    console.print(_slowest_line(report["slowest"]))
    console.print(_targets_table(report["targets"]))


def _header(meta: dict, peak: dict[str, float]) -> str:
    return (
        f"[bold]ldcq bench[/] {meta['date']} on {meta['host']}: {meta['device']} "
        f"({meta['device_name']}, {meta['torch_threads']} threads), {meta['precision']}"
        + (f" ({meta['precision_reason']})" if meta.get("precision_reason") else "")
        + ", "
        f"{meta['scale']} sizes; matmul peak "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peak.items())
        + f"; load average {meta['load_avg_start'][0]:.2f} → {meta['load_avg_end'][0]:.2f}, "
        f"other processes at the start {meta['other_cpu_cores_start']:.2f} cores"
    )


def _train_table(train: list[dict]) -> Table:
    rows = [
        [
            r["family"],
            r["stage"],
            str(r["batch"]),
            _g(r["steps_per_s"]),
            _g(r["samples_per_s"]),
            _g(r["step_ms"]),
            _g(r["gflop_per_step"]),
            _g(r["gflops"]),
            f"{100 * r['peak_fraction']:.1f}",
        ]
        for r in train
    ]
    columns = ["family", "stage", "B", "steps/s", "samples/s", "ms/step", "GFLOP/step"]
    return _table(
        "Training throughput (Trainer.fit on synthetic batches; GFLOP = forward + backward)",
        [*columns, "GFLOP/s", "% of peak"],
        rows,
        left=2,
    )


def _sampler_table(s: dict) -> Table:
    rows = [
        [
            f"{r['name']}, {schedule['schedule']}",
            str(r["denoiser_calls"]),
            _g(r["latents_per_s"]),
            f"{r['speedup']:.1f}",
            f"{r['mmd2']:.4f} ± {r['mmd2_se']:.4f}",
            f"{r['mmd2_excess']:+.4f} ± {r['mmd2_excess_se']:.4f}",
            "yes" if r["equal_quality"] else "no",
        ]
        for schedule in s["schedules"]
        for r in schedule["samplers"]
    ]
    rows += [
        [name.replace("_", " "), "", "", "", f"{v['mmd2']:.4f} ± {v['mmd2_se']:.4f}", "", ""]
        for name, v in s["references"].items()
    ]
    title = (
        f"Prior samplers ({s['family']}; {s['throughput_batch'][0]} states × "
        f"{s['throughput_batch'][1]} latents per call; MMD² over {s['states']} states × "
        f"{s['samples_per_state']} samples, RBF bandwidth {s['bandwidth']})"
    )
    columns = ["sampler", "denoiser calls", "latents/s", "× DDPM", "MMD²", "excess vs DDPM"]
    return _table(title, [*columns, "equal quality"], rows)


def _bank_line(b: dict) -> str:
    compiled = (
        f", compiled (the warm-up with its compile: {b['warm_up_s']:.1f} s)"
        if b.get("compile")
        else ""
    )
    return (
        f"[bold]Latent bank[/] ({b['family']}, generate_bank, {b['sampler']}{compiled}): "
        f"{b['transitions']:,} transitions × K={b['K']} in {b['seconds']:.1f} s = "
        f"{b['latents_per_s']:,.0f} latents/s; {b['bytes_per_sample']} B/sample, "
        f"{b['bytes_per_transition']:,.0f} B/transition; memory-mapped: {b['memory_mapped']}. "
        f"prior.sample alone, latents/s by rows per batch (configured {b['batch_size']}): "
        + ", ".join(f"{k}: {v:,.0f}" for k, v in b["sample_latents_per_s_by_rows"].items())
    )


def _q_table(q: dict) -> Table:
    rows = [
        [
            str(r["batch"]),
            str(r["K"]),
            _g(r["uniform_per_s"]),
            _g(r["prioritized_per_s"]),
            f"{100 * r['prioritized_cost']:+.1f} %",
            f"{r['replay_ms_per_update']:.2f} ms ({100 * r['replay_share']:.1f} %)",
        ]
        for r in q["rows"]
    ]
    return _table(
        f"Q-learning updates/s ({q['family']}, N={q['transitions']:,}, Trainer.fit, best of "
        f"{q['rounds']} alternating runs each)",
        ["B", "K", "uniform/s", "prioritized/s", "prioritized cost", "replay alone/update"],
        rows,
        left=0,
    )


def _latency_table(lat: list[dict]) -> Table:
    rows = [
        [
            r["family"],
            str(r["envs"]),
            str(r["K"]),
            _g(r["replan_ms"])
            + (
                f" (compiled; first {r['first_replan_ms'] / 1e3:.1f} s)" if r.get("compile") else ""
            ),
            _g(r["step_ms"]),
            f"{_g(r['amortized_step_ms'])} (re-plan every {r['replan_every']})",
        ]
        for r in lat
    ]
    sources = ", ".join(sorted({r["source"] for r in lat}))
    columns = ["family", "envs", "K", "re-plan ms", "step ms", "per env step, amortized ms"]
    return _table(f"Decision latency (timed: {sources})", columns, rows)


def _speedup_table(report: dict) -> Table:
    ref = report["reference"]
    rows = [
        [
            r["label"],
            f"{_g(r['reference'])} ({r['reference_setting']})",
            f"{_g(r['ours'])} ({r['setting']})",
            f"{r['speedup']:.1f}×",
        ]
        for r in report["speedups"]
    ]
    return _table(
        f"Ours ({report['meta']['precision']}) over the reference mode ({ref['precision']}, "
        f"DDPM T+5, the official batch sizes and K), both measured in this run",
        ["measure", "reference mode", "ours", "speedup"],
        rows,
    )


def _memory_table(report: dict) -> Table:
    rows = []
    for label, r in sections(report):
        m = r["memory"]
        cuda = f" (CUDA {_g(m['cuda_peak_mb'])})" if "cuda_peak_mb" in m else ""
        other = f"{r['other_cpu_cores']:.2f}" if "other_cpu_cores" in r else "?"
        row = [label, _g(m["rss_start_mb"]), _g(m["rss_peak_mb"]) + cuda, _g(r["seconds_total"])]
        rows.append([*row, other])
    return _table(
        f"Peak memory per section ({report['meta']['memory_method']})",
        ["section", "RSS after imports MB", "peak RSS MB", "wall s", "other processes, cores"],
        rows,
    )


def _slowest_line(slow: dict) -> str:
    return (
        f"[bold]Slowest stage[/]: {slow['family']} {slow['stage']} ({slow['work']}, "
        f"{slow['hours']:.3g} h here); top operators by self time: "
        + "; ".join(f"{o['op']} {100 * o['share']:.0f} %" for o in slow["ops"])
    )


def _targets_table(lines: list[dict[str, Any]]) -> Table:
    status = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[dim]info[/]"}
    rows = [[line["target"], line["result"], status[line["pass"]]] for line in lines]
    return _table("Targets", ["target", "result", ""], rows, left=3)
