"""The benchmarks at toy sizes: every section reports finite numbers (no timed assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ldcq.bench import score
from ldcq.bench.perf import TRAINED, BenchConfig, run_bench
from ldcq.bench.report import print_report, write_report
from ldcq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("meta", "peak", "train", "sampling", "bank", "q_learning", "latency")


def _numbers(value, path="report"):
    """Every (path, number) in a JSON tree; booleans are not numbers here."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


@pytest.fixture
def one_thread():
    """One torch thread: toy-sized ops gain nothing from two, and a second thread waiting on a
    core that another process holds can make the test many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_reports_every_section_with_finite_numbers(tmp_path, one_thread):
    from rich.console import Console

    report = run_bench(BenchConfig.tiny(root=str(ROOT)))
    path = write_report(report, tmp_path)
    loaded = json.loads(path.read_text())

    for section in (*SECTIONS, "projection", "slowest", "targets", "reference", "speedups"):
        assert section in loaded, section
    assert [(r["family"], r["stage"]) for r in loaded["train"]] == [("maze2d", s) for s in TRAINED]
    for row in loaded["train"]:
        assert row["gflop_per_step"] > 0 and row["steps_per_s"] > 0
    schedules = loaded["sampling"]["schedules"]
    assert [(s["schedule"], s["configured"]) for s in schedules] == [
        ("linear", True),
        ("cosine", False),
    ]
    for schedule in schedules:
        names = [r["name"] for r in schedule["samplers"]]
        assert names == ["DDPM T=10+5", "DDIM 2", "DDIM 5", "DPM-Solver++ 5"]
    assert loaded["bank"]["bytes_per_sample"] == 32 and loaded["bank"]["memory_mapped"]
    assert {(r["batch"], r["K"]) for r in loaded["q_learning"]["rows"]} == {(16, 4)}
    assert all(r["replay_ms_per_update"] > 0 for r in loaded["q_learning"]["rows"])
    assert [r["envs"] for r in loaded["latency"]["rows"]] == [1, 4]
    assert loaded["slowest"]["ops"], "the profile of the slowest stage is empty"
    assert all(isinstance(t["pass"], bool) for t in loaded["targets"])
    # The reference mode ran the official settings beside ours, in this run.
    ref = loaded["reference"]
    assert ref["precision"] == "32-true" and loaded["meta"]["precision"] in (
        "32-true",
        "bf16-mixed",
    )
    assert ref["bank"]["sampler"] == "DDPM T=10+5" and ref["bank"]["transitions"] == 16
    assert [r["sampler"] for r in ref["latency"]["rows"]] == ["DDPM T=10+5"]
    assert [(r["stage"], r["batch"]) for r in ref["train"]] == [
        ("skill_vae", 128),
        ("latent_bcq", 128),
    ]
    speedups = {r["measure"]: r for r in loaded["speedups"]}
    assert set(speedups) == {"skill_vae", "latent_bcq", "bank", "replan"}
    bank = speedups["bank"]
    assert bank["speedup"] == pytest.approx(
        loaded["bank"]["latents_per_s"] / ref["bank"]["latents_per_s"]
    )
    replan = speedups["replan"]
    assert replan["speedup"] == pytest.approx(replan["reference"] / replan["ours"])
    assert [t["target"] for t in loaded["targets"][-4:]] == [
        f"{r['label']} ≥ {r['target']:.0f}× the reference mode" for r in loaded["speedups"]
    ]
    for section in SECTIONS[1:]:
        entries = loaded[section] if isinstance(loaded[section], list) else [loaded[section]]
        for entry in entries:
            assert entry["memory"]["rss_peak_mb"] > 0
    bad = [(p, v) for p, v in _numbers(loaded) if not math.isfinite(v)]
    assert not bad, bad

    console = Console(record=True, width=150)
    print_report(loaded, console)
    # make results renders the speedups of a committed report, one row per measure.
    from ldcq.bench.results import speed

    rendered = speed([path])
    for r in loaded["speedups"]:
        assert f"| {r['label']} | " in rendered and f"| {r['speedup']:.1f}× | ≥ " in rendered
    assert "no benchmark is recorded" in speed([]).lower()
    printed = console.export_text()
    assert "Targets" in printed and "over the reference mode" in printed
    assert "official" not in printed.split("Targets")[-1].lower()  # no quoted constants


def test_bank_rate_is_timed_on_the_whole_bank(monkeypatch, one_thread):
    # The per-batch-size timings after it once overwrote the bank's own time (4x too fast a rate).
    from ldcq.bench.sections import bank as bank_section

    monkeypatch.setattr(bank_section, "best_time", lambda *args, **kwargs: 1e6)
    bank = bank_section.section_bank(BenchConfig.tiny(root=str(ROOT)).resolved()[0])
    assert bank["seconds"] < 1e6
    assert bank["latents_per_s"] == pytest.approx(bank["transitions"] * bank["K"] / bank["seconds"])
    assert set(bank["sample_latents_per_s_by_rows"].values()) == {
        int(r) * bank["K"] / 1e6 for r in bank["sample_latents_per_s_by_rows"]
    }


def test_bench_config_refuses_what_cannot_run():
    with pytest.raises(ConfigError, match="16-mixed needs --device cuda"):
        BenchConfig(precision="16-mixed").check()
    with pytest.raises(ConfigError, match="valid values"):
        BenchConfig(precision="fp8").check()
    with pytest.raises(ConfigError, match="1-env re-plan; add 1 or pass --reference false"):
        BenchConfig(envs=(64,)).check()
    BenchConfig(envs=(64,), reference=False).check()
    with pytest.raises(ConfigError, match="valid families"):
        BenchConfig(families=("kitchen",)).check()


def test_bench_score_needs_the_evaluation_stage(monkeypatch):
    import ldcq.stages.registry

    monkeypatch.setattr(ldcq.stages.registry, "STAGES", ("skill_vae", "diffusion_prior"))
    with pytest.raises(ConfigError, match="needs the pipeline's `evaluation` stage"):
        score.require_evaluation()


def test_bench_score_summary_counts_for_a_baseline_only_the_stages_it_made():
    from rich.console import Console

    metrics = {"eval/normalized_score": 50.0, "eval/success_rate": 0.5, "eval/return_mean": 9.0}
    runs = [
        {
            "seed": seed,
            "selector": selector,
            "command_s": 10.0,
            # The baseline reuses the seed's skill VAE: its time is LDCQ's, not BC's.
            "fingerprints": {"skill_vae": f"vae{seed}"},
            "stage_s": {"skill_vae": 4.0 + seed},
            "metrics": {**metrics, "eval/normalized_score": 50.0 + 10 * seed}
            | ({"eval/first_hit_normalized": 100.0 + seed} if selector == "q" or seed else {}),
        }
        for seed in range(2)
        for selector in ("q", "vae-prior")
    ]
    q, bc = score.summarize(runs, ("skill_vae",))
    assert (q["method"], bc["method"]) == ("LDCQ", "BC (VAE prior)")
    assert q["scores"]["eval/normalized_score"] == pytest.approx({"mean": 55.0, "std": 7.0710678})
    assert q["stage_s"]["skill_vae"] == pytest.approx({"mean": 4.5, "std": 0.7071068})
    assert bc["stage_s"]["skill_vae"] is None
    # an extra score counts only when every seed's evaluation has it
    assert q["scores"]["eval/first_hit_normalized"]["mean"] == pytest.approx(100.5)
    assert "eval/first_hit_normalized" not in bc["scores"]
    console = Console(record=True, width=200)
    score.print_summary([q, bc], ("skill_vae",), "umaze", console)
    text = console.export_text()
    assert "100.5 ± 0.7" in text and "n/a" in text and "BC (VAE prior) (vae-prior)" in text
