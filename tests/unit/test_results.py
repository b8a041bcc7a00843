"""Committed results: bench-score's records and the README table `make results` renders."""

from __future__ import annotations

import json
from pathlib import Path

from ldcq.bench import results
from ldcq.bench.score import record

REPO = Path(__file__).resolve().parents[2]


def _run(seed, selector, score, config="abc123", stage_s=None):
    return {
        "seed": seed,
        "selector": selector,
        "method": {"q": "LDCQ", "vae-prior": "BC (VAE prior)"}[selector],
        "config_hash": config,
        "fingerprints": {"skill_vae": "fp-vae", "evaluation": f"fp-{selector}"},
        "protocol": "fixed goal: pays within 0.45 of the goal cell's centre",
        "stage_s": stage_s or {"skill_vae": 1800.0, "evaluation": None},
        "metrics": {
            "eval/normalized_score": score,
            "eval/first_hit_normalized": score + 50,
            "eval/success_rate": 0.5,
            "eval/return_mean": score / 2,
        },
    }


def test_the_table_says_which_precision_each_config_ran_in(tmp_path):
    path = tmp_path / "pointmaze-umaze-quick.json"
    meta = {"pipeline": "pointmaze-umaze", "scale": "quick"}
    record(path, meta, _run(0, "q", 50.0))  # recorded before precision was: 32-true
    bf16 = {**_run(0, "q", 55.0, config="bf16"), "precision": {"skill_vae": "bf16-mixed"}}
    record(path, meta, bf16)
    mixed = {"skill_vae": "bf16-mixed", "latent_bcq": "32-true"}
    record(path, meta, {**_run(0, "q", 52.0, config="mixed"), "precision": mixed})
    cells = {
        line.split(" | ")[-1]: line.split(" | ")[2]
        for line in results.table([path]).splitlines()
        if line.startswith("| pointmaze")
    }
    assert cells == {
        "`abc123` |": "32-true",
        "`bf16` |": "bf16-mixed",
        "`mixed` |": "skill_vae=bf16-mixed, latent_bcq=32-true",
    }


def test_a_rerun_replaces_its_record_and_others_are_kept(tmp_path):
    path = tmp_path / "pointmaze-umaze-cpu.json"
    meta = {"pipeline": "pointmaze-umaze", "scale": "cpu"}
    record(path, meta, _run(0, "q", 10.0))
    record(path, meta, _run(1, "q", 20.0))
    record(path, meta, _run(0, "q", 30.0))  # the same seed, method and config again
    record(path, meta, _run(0, "q", 40.0, config="other"))
    data = json.loads(path.read_text())
    assert data["pipeline"] == "pointmaze-umaze" and len(data["runs"]) == 3
    scores = {
        (r["seed"], r["config_hash"]): r["metrics"]["eval/normalized_score"] for r in data["runs"]
    }
    assert scores == {(0, "abc123"): 30.0, (1, "abc123"): 20.0, (0, "other"): 40.0}


def test_the_table_is_mean_and_std_over_seeds_per_method_and_config(tmp_path):
    path = tmp_path / "pointmaze-umaze-cpu.json"
    meta = {"pipeline": "pointmaze-umaze", "scale": "cpu"}
    for seed, score in enumerate((50.0, 60.0, 70.0)):
        record(path, meta, _run(seed, "q", score))
        record(path, meta, _run(seed, "vae-prior", 10.0, stage_s={"evaluation": 36.0}))
    text = results.table([path])
    rows = [line for line in text.splitlines() if line.startswith("| pointmaze")]
    assert rows[0] == (
        "| pointmaze-umaze (cpu) | LDCQ (`q`) | 32-true | 0, 1, 2 | 60.0 ± 10.0 | 110.0 ± 10.0 "
        "| 50 ± 0 | 0.50 ± 0.00 | `abc123` |"
    )
    assert rows[1].startswith(
        "| pointmaze-umaze (cpu) | BC (VAE prior) (`vae-prior`) | 32-true | 0, 1, 2 | 10.0"
    )
    assert (
        "`results/pointmaze-umaze-cpu.json`" in text and "Evaluation protocol: fixed goal" in text
    )
    readme = f"intro\n{results.BEGIN}\nold\n{results.END}\nrest\n"
    assert results.render(readme, text) == f"intro\n{results.BEGIN}\n{text}\n{results.END}\nrest\n"


def test_the_targets_table_states_each_target_met_or_missed_by_how_much(tmp_path):
    def rec(name, scale, runs):
        path = tmp_path / f"{name}-{scale}.json"
        for run in runs:
            record(path, {"pipeline": name, "scale": scale}, run)
        return path

    def q(seed, score, success, first_hit, config="abc123"):
        run = _run(seed, "q", score, config=config)
        run["metrics"] |= {"eval/success_rate": success, "eval/first_hit_normalized": first_hit}
        return run

    large = rec(
        "pointmaze-large",
        "cpu",
        [
            q(0, 40.0, 0.8, 90.0),
            q(1, 60.0, 0.9, 110.0),
            q(0, 99.0, 1.0, 120.0, config="option"),  # one seed of an option: not the main config
            _run(0, "vae-prior", 25.0),
            _run(1, "vae-prior", 35.0),
        ],
    )
    umaze = rec("pointmaze-umaze", "cpu", [q(0, 70.0, 1.0, 105.0), _run(0, "vae-prior", -3.0)])
    quick = rec("pointmaze-medium", "quick", [q(0, 10.0, 0.1, 5.0)])
    text = results.targets([large, umaze, quick])
    assert (
        "| pointmaze-large (cpu) | 0, 1 | 85 ± 7: missed by 5 | 100.0 ± 14.1: met "
        "| 50.0 vs 60.0: missed by 10.0 | – |" in text
    )
    assert (
        "| pointmaze-umaze (cpu) | 0 | 100: met | 105.0: met | 70.0 vs -6.0: met "
        "| 70.0 vs 80: missed by 10.0 |" in text
    )
    assert "pointmaze-medium" not in text  # the targets are the cpu scale's
    assert results.targets([quick]) == ""


def test_the_readme_table_is_generated_from_the_committed_results(monkeypatch):
    # `make results` was run after the last results file changed: the README says what they say.
    monkeypatch.chdir(REPO)
    assert results.main(["--check"]) == 0


def test_the_config_hash_leaves_out_the_seed_only():
    from ldcq.bench.score import config_hash

    pipeline = REPO / "pipelines" / "pointmaze-umaze.yaml"
    base = config_hash(pipeline, "quick", "q", [])
    assert config_hash(pipeline, "quick", "q", ["seed=5"]) == base
    assert config_hash(pipeline, "quick", "vae-prior", []) != base
    assert config_hash(pipeline, "quick", "q", ["skill_vae.model.beta=0.1"]) != base


def test_pictures_of_seed_0_come_from_the_recorded_artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "PICTURED", {"maze-cpu": (("q", "q_map.png"),)})
    path = tmp_path / "results" / "maze-cpu.json"
    meta = {"pipeline": "maze", "scale": "cpu"}
    for seed in (0, 1):
        artifact = tmp_path / f"evaluation-{seed}"
        artifact.mkdir()
        (artifact / "q_map.png").write_bytes(b"png of seed %d" % seed)
        record(path, meta, {**_run(seed, "q", 50.0), "artifact": str(artifact)})
    # An option tried on seed 0 alone is not what the README shows.
    option = tmp_path / "evaluation-option"
    option.mkdir()
    (option / "q_map.png").write_bytes(b"the option")
    record(path, meta, {**_run(0, "q", 70.0, config="option"), "artifact": str(option)})

    img = tmp_path / "docs" / "img"
    copied = results.copy_pictures([path], img)
    assert [p.name for p in copied] == ["maze-cpu-q-seed0-q_map.png"]
    assert copied[0].read_bytes() == b"png of seed 0"
    text = results.pictures([path], img, tmp_path)
    assert "![LDCQ: q_map](docs/img/maze-cpu-q-seed0-q_map.png)" in text
    # A clone without the artifacts keeps the committed pictures and still renders them.
    for artifact in tmp_path.glob("evaluation-*"):
        (artifact / "q_map.png").unlink()
    assert results.copy_pictures([path], img) == []
    assert results.pictures([path], img, tmp_path) == text


def test_bench_score_skips_a_seed_recorded_for_this_config(tmp_path, monkeypatch):
    # A session that finished seed 0 leaves its records; SEEDS=2 in the next trains seed 1 only.
    from ldcq.bench import score

    pipeline = REPO / "pipelines" / "pointmaze-umaze.yaml"
    hashes = {s: score.config_hash(pipeline, "quick", s, []) for s in ("q", "vae-prior")}
    path = tmp_path / "pointmaze-umaze-quick.json"
    meta = {"pipeline": "pointmaze-umaze", "scale": "quick"}
    for selector, chash in hashes.items():
        run = {**_run(0, selector, 10.0, config=chash), "git_sha": "abc1234", "command_s": 1.0}
        record(path, meta, run)
    # Seed 1 holds only one of the two methods: it is run again, whole.
    record(path, meta, {**_run(1, "q", 5.0, config=hashes["q"]), "git_sha": "a", "command_s": 1.0})
    ran = []

    def fake_run(pipeline, scale, seed, selector, overrides, stages):
        ran.append((seed, selector))
        run = _run(seed, selector, 20.0, config=hashes[selector])
        return {**run, "git_sha": "def5678", "command_s": 2.0}

    monkeypatch.setattr(score, "run_once", fake_run)
    monkeypatch.setattr(score, "ensure_dataset", lambda dataset: None)
    monkeypatch.setattr(score, "require_evaluation", lambda: ("skill_vae", "evaluation"))
    argv = ["--pipeline", str(pipeline), "--seeds", "2", "--selectors", "q,vae-prior"]
    assert score.main([*argv, "--out-dir", str(tmp_path)]) == 0
    assert ran == [(1, "q"), (1, "vae-prior")]
    # --rerun trains the recorded seed too.
    ran.clear()
    assert score.main([*argv, "--out-dir", str(tmp_path), "--rerun"]) == 0
    assert ran == [(0, "q"), (0, "vae-prior"), (1, "q"), (1, "vae-prior")]
    # Another config (an override) has no records: every seed runs.
    ran.clear()
    hashes = {s: score.config_hash(pipeline, "quick", s, ["horizon=20"]) for s in hashes}
    assert score.main([*argv, "--out-dir", str(tmp_path), "horizon=20"]) == 0
    assert len(ran) == 4


def test_findings_are_rendered_from_the_sweep_files(tmp_path):
    from ldcq.sweep.compare import summarize

    def run(h, seed, selector, score):
        metrics = {"eval/normalized_score": score, "eval/success_rate": 0.5}
        metrics["eval/first_hit_normalized"] = score
        if selector == "q":
            oos = 0.02 if h == 10 else 0.10 + 0.01 * seed  # H=20: 8-10 points more
            metrics |= {"diag/oos_rate_diffusion": oos, "diag/oos_rate_vae_prior": 0.2}
            metrics["diag/value_distance_corr"] = 0.8 if h == 10 else 0.9
            metrics["diag/mode_coverage_diffusion"] = 0.75  # a key downstream of the prior
            metrics["diag/q_mean_late_change"] = 0.03 if h == 10 else 0.01
            metrics["diag/stalled_share"] = 0.02 if h == 10 else 0.1 + 0.01 * seed
            metrics["diag/stalled_top_cell_share"] = 0.01 if h == 10 else 0.05
            if h == 20:  # measured at H=20 only, as in a file from before Q's pick was measured
                metrics |= {"diag/pick_oos_rate": 0.3, "diag/stalled_pick_oos_share": 0.8}
        return {"point": {"horizon": h}, "seed": seed, "selector": selector, "metrics": metrics}

    # H=20 beats H=10 by 30 points with a seed std of 1: an effect beyond the seed noise.
    runs = [
        run(h, s, sel, base + s + (0 if sel == "q" else -40))
        for h, base in ((10, 40.0), (20, 70.0))
        for s in (0, 1, 2)
        for sel in ("q", "vae-prior")
    ]
    summary = summarize(runs, ["horizon"])
    plot = tmp_path / "results" / "sweeps" / "maze-quick-horizon-horizon.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"png")
    data = {
        "name": "maze-quick-horizon",
        "pipeline": "maze",
        "scale": "quick",
        "seeds": [0, 1, 2],
        "grid": {"horizon": [10, 20]},
        "command": "ldcq sweep p --grid horizon=10,20",
        "git_sha": "abcdef123",
        "summary": summary,
        "plots": ["results/sweeps/" + plot.name],
        "runs": runs,
    }
    path = plot.parent / "maze-quick-horizon.json"
    path.write_text(json.dumps(data))
    text = results.findings([path], tmp_path)
    assert (
        "| 10 | 0, 1, 2 | 41.0 ± 1.0 | 1.0 ± 1.0 | 50 ± 0 | 41.0 ± 1.0 | 2 ± 0 (1 ± 0; –) | "
        "0.80 ± 0.00 | 3.0 ± 0.0 | 2.0 ± 0.0 / 20.0 ± 0.0 / – | 0.75 ± 0.00 / – |" in text
    )
    assert (
        "| 20 | 0, 1, 2 | 71.0 ± 1.0 | 31.0 ± 1.0 | 50 ± 0 | 71.0 ± 1.0 | 11 ± 1 (5 ± 0; 80 ± 0) |"
        in text
    )
    assert "| 11.0 ± 1.0 / 20.0 ± 0.0 / 30.0 ± 0.0 |" in text
    assert "q_mean change over its last 20 % of steps is highest at 10 and lowest at 20" in text
    assert (
        "LDCQ's share of episodes that stall without success is highest at 20 and lowest at 10, "
        "+9.00 points apart (seed std 0.71): larger than the seed-to-seed variation" in text
    )
    assert results._stalled({}) == "–"  # a file from before the stall diagnostic
    assert (
        "correlation of V with closeness to the goal is highest at 20 and lowest at 10, +0.10"
        in text
    )
    assert "the diffusion prior's mode coverage is the same at every value." in text
    assert "LDCQ's success rate is the same at every value." in text
    assert (
        "LDCQ's first-hit normalized score is highest at 20 and lowest at 10, +30.00 apart" in text
    )
    assert "best at 20 and worst at 10, +30.0 apart (seed std 1.0): larger than the seed" in text
    assert (
        "out-of-support rate is highest at 20 and lowest at 10, +9.00 points apart "
        "(seed std 0.71): larger than the seed-to-seed variation" in text
    )
    assert "![maze-quick-horizon](results/sweeps/maze-quick-horizon-horizon.png)" in text
    # Seeds that differ more than the values do: within the noise.
    noisy = [
        {**r, "metrics": {**r["metrics"], "eval/normalized_score": 50.0 + 30 * r["seed"]}}
        for r in runs
    ]
    data["summary"] = summarize(noisy, ["horizon"])
    path.write_text(json.dumps(data))
    assert "within the seed-to-seed variation" in results.findings([path], tmp_path)
    readme = f"a\n{results.FINDINGS_BEGIN}\nold\n{results.FINDINGS_END}\n"
    rendered = results.render(readme, "new", results.FINDINGS_BEGIN, results.FINDINGS_END)
    assert rendered == f"a\n{results.FINDINGS_BEGIN}\nnew\n{results.FINDINGS_END}\n"
