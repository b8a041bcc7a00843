"""`make bench`: speed, latency, memory and FLOP efficiency of every LDCQ stage on synthetic
tensors, at the family's real network sizes (`pipelines/*.yaml` composed at `--scale`, paper by
default), written to ``bench/results/<date>-<host>.json`` and printed as tables.

Glossary: B batch, N states or transitions, K prior samples per state, H skill horizon, S state
dim, A action dim, Z latent dim, T diffusion steps.

How each figure is measured:

- Training: the stage's own LightningModule in a real ``Trainer.fit`` (its ``training_step``,
  optimizer step, EMA or target update, prioritized-replay update) on synthetic batches of the
  configured shapes; time per step = the shortest interval between consecutive
  ``on_train_batch_end`` after the warm-up steps (it includes fetching the batch). FLOPs per
  step (forward + backward, optimizer excluded) come from ``torch.utils.flop_counter.
  FlopCounterMode`` over one pass of the stage's loss; the fraction is against this machine's
  measured matmul peak (``a @ b`` of ``matmul_size``², fp32, or the autocast dtype).
- Anything called as a whole (sampling, re-plans, matmul): best of ``repeats`` calls after one
  warm-up call.
- Sample quality: a paper-size prior is trained briefly on :class:`SkillMixture` (a state-
  conditioned Gaussian mixture), once per noise schedule (the configured one, then
  ``schedules``); each sampler draws ``quality_samples`` latents at ``quality_states`` held-out
  states, compared with as many true latents at the same states by the unbiased RBF MMD² with a
  fixed bandwidth (``mmd_bandwidth`` = 2, about half the distance between the mixture's modes),
  averaged over states. A DDIM step count has *equal quality* when its MMD² exceeds DDPM's by
  less than two standard errors of the paired per-state difference.
- Memory: peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh spawned process per section,
  beside the RSS it had after its imports (``rss_start_mb``); plus CUDA's peak allocation on GPU.
- Interference: the CPU other processes used during each section (``other_cpu_cores``, from
  /proc/stat minus our own rusage); best-of timings resist short bursts, not a busy machine.

Where it lives: :mod:`ldcq.bench.config` (the knobs and the command line),
:mod:`ldcq.bench.measure` (timing, memory, FLOPs, the stages' modules and batches),
``ldcq.bench.sections.*`` (one module per section), and here the order they run in, each in its
own process, the projection, and ``main``.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from datetime import datetime
from multiprocessing import get_context
from typing import Any

import lightning as L
import torch
from rich.console import Console

from ldcq.artifacts import git_sha
from ldcq.bench.config import DATASET_STEPS, PRECISIONS, BenchConfig, parse_cli
from ldcq.bench.measure import (
    busy_cpu_s,
    load_family,
    other_busy_cores,
    own_cpu_s,
    quiet,
    rss_mb,
)
from ldcq.bench.reference import REFERENCE_OVERRIDES, reference_config, speedups
from ldcq.bench.report import print_report, targets, write_report
from ldcq.bench.sections.bank import section_bank
from ldcq.bench.sections.latency import section_latency
from ldcq.bench.sections.peak import section_peak
from ldcq.bench.sections.profile import section_profile
from ldcq.bench.sections.q_learning import section_q_learning
from ldcq.bench.sections.sampling import section_sampling
from ldcq.bench.sections.train import section_train
from ldcq.errors import LdcqError
from ldcq.stages.registry import TRAINED

SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "peak": section_peak,
    "train": section_train,
    "sampling": section_sampling,
    "bank": section_bank,
    "q_learning": section_q_learning,
    "latency": section_latency,
    "profile": section_profile,
}


def run_section(cfg: BenchConfig, name: str, *args: Any) -> dict[str, Any]:
    """Run one section here; adds its wall time and memory high-water marks."""
    quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_start, start = rss_mb(), time.perf_counter()
    out = SECTIONS[name](cfg, *args)
    memory = {"rss_start_mb": rss_start, "rss_peak_mb": rss_mb()}
    if cfg.device == "cuda":
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**out, "memory": memory, "seconds_total": time.perf_counter() - start}


def _call(cfg: BenchConfig, name: str, *args: Any) -> dict[str, Any]:
    """One section, in a fresh process when ``cfg.isolate`` (so ru_maxrss is its own peak).

    Adds ``other_cpu_cores``: the CPU other processes used meanwhile (machine-wide busy time
    minus ours), in cores; above ~0.2 the section's timings were disturbed.
    """
    busy, own, start = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    if cfg.isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            out = pool.submit(run_section, cfg, name, *args).result()
    else:
        out = run_section(cfg, name, *args)
    if busy is not None:
        other = busy_cpu_s() - busy - (own_cpu_s() - own)
        out["other_cpu_cores"] = max(0.0, other) / (time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------------------- report


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Every section, then the projection, the profile of the slowest stage and the targets."""
    cfg.check()
    cfg, precision_reason = cfg.resolved()
    start = time.perf_counter()
    meta = {**_meta(cfg), "precision_reason": precision_reason}
    report: dict[str, Any] = {"meta": meta}
    progress("matmul peak")
    report["peak"] = _call(cfg, "peak")
    report["train"] = []
    for family in cfg.families:
        for stage in TRAINED:
            progress(f"training throughput: {family} {stage}")
            report["train"].append(_call(cfg, "train", family, stage))
    for name in ("sampling", "bank", "q_learning", "latency"):
        progress(name.replace("_", " "))
        report[name] = _call(cfg, name)
    if cfg.reference:
        report["reference"] = run_reference(cfg, progress)
    peak = _peak_gflops(report)
    for row in report["train"]:
        row["peak_fraction"] = row["gflops"] / peak
    if cfg.reference:
        for row in report["reference"]["train"]:
            row["peak_fraction"] = row["gflops"] / report["peak"]["gflops"]["float32"]
        report["speedups"] = speedups(report)
    report["projection"] = projection(cfg, report)
    slowest = max(report["projection"], key=lambda r: r["hours"])
    progress(f"profile of the slowest stage: {slowest['family']} {slowest['stage']}")
    report["slowest"] = {**slowest, **_call(cfg, "profile", slowest["family"], slowest["stage"])}
    report["targets"] = targets(report)
    meta["load_avg_end"] = list(os.getloadavg())
    meta["elapsed_s"] = time.perf_counter() - start
    return report


def run_reference(
    cfg: BenchConfig, progress: Callable[[str], None] = lambda msg: None
) -> dict[str, Any]:
    """The sections a speedup is measured on, in the reference mode (:mod:`ldcq.bench.reference`):
    skill-VAE and Q training, the latent bank and a 1-env re-plan."""
    ref = reference_config(cfg)
    family = ref.families[0]
    out: dict[str, Any] = {
        "family": family,
        "precision": ref.precision,
        "overrides": list(REFERENCE_OVERRIDES),
        "train": [],
    }
    for stage in ("skill_vae", "latent_bcq"):
        progress(f"reference mode: training throughput {family} {stage}")
        out["train"].append(_call(ref, "train", family, stage))
    progress("reference mode: latent bank (DDPM)")
    out["bank"] = _call(ref, "bank")
    progress("reference mode: re-plan latency (DDPM)")
    out["latency"] = _call(ref, "latency")
    return out


def _meta(cfg: BenchConfig) -> dict[str, Any]:
    """The run's date, host, device, versions, config, and how busy the machine is at its start."""
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name()
        if cfg.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": cfg.threads or torch.get_num_threads(),
        "precision": cfg.precision,
        "scale": cfg.scale,
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "load_avg_start": list(os.getloadavg()),
        "other_cpu_cores_start": other_busy_cores(1.0) or 0.0,
        "memory_method": "ru_maxrss of a fresh spawned process per section"
        if cfg.isolate
        else "ru_maxrss of this process (cumulative: sections not isolated)",
        "config": asdict(cfg),
    }


def _peak_gflops(report: dict) -> float:
    gflops = report["peak"]["gflops"]
    dtype = PRECISIONS[report["meta"]["precision"]]
    return gflops[str(dtype).removeprefix("torch.")] if dtype is not None else gflops["float32"]


def projection(cfg: BenchConfig, report: dict) -> list[dict[str, Any]]:
    """Hours each stage would take at the configured max_steps (and the bank for a 1M-step
    dataset) at the measured rates: which stage is the slowest."""
    rows = [
        {
            "family": r["family"],
            "stage": r["stage"],
            "work": f"{r['max_steps']:,} steps",
            "hours": r["max_steps"] * r["step_ms"] / 3.6e6,
        }
        for r in report["train"]
    ]
    bank = report["bank"]
    fam = load_family(cfg, bank["family"])
    n = DATASET_STEPS // int(fam.cfg.latent_bcq.data.stride)
    rows.append(
        {
            "family": bank["family"],
            "stage": "latent_bank",
            "work": f"{n:,} transitions × K={bank['K']}",
            "hours": n * bank["K"] / bank["latents_per_s"] / 3600,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg, out_dir = parse_cli(argv)
    console = Console()
    if not console.is_terminal:  # piped or redirected: keep the tables' rows on one line
        console = Console(width=150)
    busy = other_busy_cores()
    if busy is not None and busy > 0.2:
        console.print(
            f"[yellow]other processes keep {busy:.1f} cores busy right now: the timings will be "
            f"pessimistic (the memory table shows it per section); a quiet machine is better[/]"
        )
    try:
        report = run_bench(cfg, progress=lambda msg: console.print(f"[cyan]bench[/] {msg}"))
    except LdcqError as exc:
        print(f"ldcq bench: error: {exc}", file=sys.stderr)
        return 2
    report["meta"]["command"] = " ".join(["python -m ldcq.bench.perf", *(argv or sys.argv[1:])])
    path = write_report(report, out_dir)
    print_report(report, console)
    console.print(f"wrote {path} ({report['meta']['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
