"""``ldcq …`` entry point: parses and dispatches; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import errno
import sys

from ldcq.errors import LdcqError
from ldcq.process import drop_library_notices


def _data_generate(args: argparse.Namespace) -> None:
    from ldcq.data import pointmaze

    dataset_id = pointmaze.generate_dataset(
        args.name, steps=args.steps, seed=args.seed, overwrite=args.overwrite
    )
    print(f"wrote {dataset_id}")


def _data_show(args: argparse.Namespace) -> None:
    from ldcq.data.minari_io import read_episodes

    episodes = read_episodes(args.dataset_id)
    lengths = episodes.lengths
    print(
        f"{episodes.dataset_id}: {episodes.num_episodes} episodes, {int(lengths.sum())} steps "
        f"(episode length {int(lengths.min())}–{int(lengths.max())}), S={episodes.state_dim}, "
        f"A={episodes.action_dim}, ref scores {episodes.ref_min_score} / {episodes.ref_max_score}"
    )


def _pipeline_run(args: argparse.Namespace) -> None:
    from ldcq.config import compose
    from ldcq.pipeline import run_pipeline
    from ldcq.process import global_rank

    cfg = compose(args.pipeline, args.overrides, scale=args.scale, trainer=args.trainer)
    stages = args.stages.split(",") if args.stages else None
    results = run_pipeline(cfg, stages=stages, track=not args.no_tracking)
    if global_rank() == 0:
        _print_summary(cfg, results)


def _print_summary(cfg, results) -> None:
    from rich.console import Console
    from rich.table import Table

    from ldcq.tracking import resolve_uri

    table = Table(title=f"{cfg.name} ({cfg.scale} scale, seed {cfg.seed})")
    for col in ("stage", "status", "seconds", "precision", "artifact"):
        table.add_column(col)
    reasons: dict[str, list[str]] = {}
    for r in results.values():
        status = "finished earlier" if r.skipped else "done"
        precision = r.artifact.spec.get("precision", "")
        reason = r.artifact.spec.get("precision_reason")
        if reason:
            reasons.setdefault(f"{precision}: {reason}", []).append(r.stage)
        table.add_row(r.stage, status, f"{r.seconds:.1f}", precision, str(r.artifact.path))
    console = Console()
    console.print(table)
    for why, stages in reasons.items():
        console.print(f"precision of {', '.join(stages)}: {why}")
    if "evaluation" in results:
        m = results["evaluation"].artifact.metrics
        scores = Table(
            title=f"evaluation: {int(m['eval/episodes'])} episodes, selector {cfg.evaluation.selector}"
        )
        for col in (
            "normalized score",
            "success rate",
            "return",
            "first-hit score (official maze2d)",
        ):
            scores.add_column(col, justify="right")
        normalized = m.get("eval/normalized_score")
        first_hit_norm = m.get("eval/first_hit_normalized")
        scores.add_row(
            "n/a (no reference scores)"
            if normalized is None
            else f"{normalized:.1f} ± {m['eval/normalized_score_std']:.1f}",
            f"{100 * m['eval/success_rate']:.0f} %",
            f"{m['eval/return_mean']:.1f} ± {m['eval/return_std']:.1f}",
            f"{m['eval/first_hit_score']:.1f}"
            + (f" ({first_hit_norm:.1f} normalized)" if first_hit_norm is not None else ""),
        )
        console.print(scores)
        protocol = results["evaluation"].artifact.spec.get("protocol")
        if protocol:
            console.print(f"evaluation protocol: {protocol}")
        console.print(f"pictures and rollouts: {results['evaluation'].artifact.path}")
    if getattr(cfg, "tracking_uri", None) is not False:
        console.print(f"MLflow: {resolve_uri(cfg.get('tracking_uri'))} (make mlflow-ui)")


def _eval(args: argparse.Namespace) -> None:
    from ldcq.config import compose
    from ldcq.pipeline import run_pipeline
    from ldcq.process import global_rank

    cfg = compose(args.pipeline, args.overrides, scale=args.scale, trainer=args.trainer)
    results = run_pipeline(cfg, stages=["evaluation"], track=not args.no_tracking, train=False)
    if global_rank() == 0:
        _print_summary(cfg, results)


def _pipeline_config(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from ldcq.config import compose

    cfg = compose(args.pipeline, args.overrides, scale=args.scale, trainer=args.trainer)
    print(OmegaConf.to_yaml(cfg[args.stage] if args.stage else cfg).rstrip())


def _sweep(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ldcq.errors import ConfigError
    from ldcq.sweep import LAUNCHERS, Sweep, check_grid, parse_grid, print_summary, run_sweep

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: need at least 1")
    if args.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {args.launcher!r}: valid launchers are {list(LAUNCHERS)}")
    pipeline = Path(args.pipeline)
    scale = args.scale or "quick"
    grid = check_grid(pipeline, scale, parse_grid(args.grid), args.overrides)
    from ldcq.sweep.compare import METHODS

    selectors = tuple(dict.fromkeys(s for s in args.selectors.split(",") if s))
    if "q" not in selectors or not set(selectors) <= set(METHODS):
        raise ConfigError(
            f"--selectors {args.selectors!r}: name q (LDCQ) and any of {list(METHODS)}, "
            f"comma-separated (default q,vae-prior)"
        )
    sweep = Sweep(
        pipeline,
        grid,
        seeds=args.seeds,
        scale=scale,
        overrides=args.overrides,
        name=args.name,
        selectors=selectors,
        out_dir=Path(args.out_dir),
        track=not args.no_tracking,
        command=" ".join(["ldcq", *sys.argv[1:]]) if sys.argv[1:2] == ["sweep"] else "",
    )
    slurm = {
        "slurm_partition": args.slurm_partition,
        "timeout_min": args.timeout_min,
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": args.mem_gb,
        "slurm_array_parallelism": args.array_parallelism,
    }
    print_summary(run_sweep(sweep, args.launcher, slurm))


# The top-level commands; any other first word names a trained stage (``ldcq <stage> fit …``).
COMMANDS = ("data", "pipeline", "eval", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldcq",
        description=__doc__,
        epilog="Stages alone (LightningCLI): ldcq skill_vae|diffusion_prior|latent_bcq fit --help "
        "(aliases: vae, prior, bcq)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate and inspect Minari datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    gen = data_commands.add_parser(
        "generate", help="generate a PointMaze dataset with the D4RL maze2d recipe"
    )
    gen.add_argument("name", help="e.g. pointmaze-umaze, pointmaze-large-dense")
    gen.add_argument("--steps", type=int, default=None, help="env steps (default: D4RL's size)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    gen.set_defaults(func=_data_generate)
    show = data_commands.add_parser("show", help="summarize a dataset as ldcq reads it")
    show.add_argument("dataset_id", help="a Minari id or a generated name")
    show.set_defaults(func=_data_show)

    pipe = commands.add_parser("pipeline", help="run a pipeline of stages (pipelines/*.yaml)")
    pipe_commands = pipe.add_subparsers(dest="pipeline_command", required=True)
    evaluate = commands.add_parser(
        "eval", help="evaluate a pipeline's trained stages in the simulator (trains nothing)"
    )
    for name, func, help_text in (
        ("run", _pipeline_run, "train (or skip, or resume) every stage in order"),
        ("config", _pipeline_config, "print the composed, resolved config"),
        ("eval", _eval, ""),
    ):
        cmd = evaluate if name == "eval" else pipe_commands.add_parser(name, help=help_text)
        cmd.add_argument("pipeline", help="e.g. pipelines/pointmaze-umaze.yaml")
        cmd.add_argument(
            "overrides",
            nargs="*",
            help="dotted overrides, e.g. skill_vae.model.beta=0.1 latent_bank.num_samples=32",
        )
        cmd.add_argument("--scale", default=None, help="quick | cpu | paper (configs/scale/)")
        cmd.add_argument("--trainer", default=None, help="cpu | gpu | ddp (configs/trainer/)")
        cmd.set_defaults(func=func)
        if name in ("run", "eval"):
            cmd.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        if name == "run":
            cmd.add_argument(
                "--stages", default=None, help="comma-separated subset, e.g. skill_vae"
            )
        elif name == "config":
            cmd.add_argument("--stage", default=None, help="print only this stage's section")
    _add_sweep_parser(commands)
    return parser


def _add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="a grid of config values × seeds, LDCQ beside BC, compared (results/sweeps/)",
        description="Each grid point and seed is one pipeline run (LDCQ, then the BC baseline "
        "on the same stages); runs share the artifacts a point does not change; a rerun skips "
        "recorded runs. Writes results/sweeps/<name>.json and a plot per swept key.",
    )
    sweep.add_argument("pipeline", help="e.g. pipelines/pointmaze-umaze.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides for every run (not swept)")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,…",
        help="a swept key and its values (repeat for a cross product); lists in brackets: "
        "diffusion_prior.model.hidden_dims=[128,32],[256,64]",
    )
    sweep.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 per point")
    sweep.add_argument("--scale", default=None, help="quick (default) | cpu | paper")
    sweep.add_argument("--name", default=None, help="default: <pipeline>-<scale>-<keys>")
    sweep.add_argument(
        "--selectors", default="q,vae-prior", help="evaluation.selector values per run"
    )
    sweep.add_argument("--out-dir", default="results/sweeps")
    sweep.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    sweep.add_argument(
        "--launcher",
        default="inline",
        help="inline (one after another here) | slurm (a job array via submitit) | "
        "submitit-local (the same array as local processes)",
    )
    cluster = sweep.add_argument_group("slurm (and submitit-local) task resources")
    cluster.add_argument("--slurm-partition", default=None)
    cluster.add_argument("--timeout-min", type=int, default=None, help="per task")
    cluster.add_argument("--gpus-per-node", type=int, default=None)
    cluster.add_argument("--cpus-per-task", type=int, default=None)
    cluster.add_argument("--mem-gb", type=int, default=None)
    cluster.add_argument("--array-parallelism", type=int, default=None, help="tasks at once")
    sweep.set_defaults(func=_sweep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    drop_library_notices()
    try:
        if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
            from ldcq.stage_cli import run_stage_cli
            from ldcq.stages.registry import ALIASES, REGISTRY

            name = ALIASES.get(argv[0], argv[0])
            if name in REGISTRY and REGISTRY[name].trained:
                run_stage_cli(argv[0], argv[1:])
                return 0
        parser = build_parser()
        # Overrides may come after options (``--trainer ddp a.b=1``), which argparse's
        # positional handling leaves unparsed: collect them here.
        args, rest = parser.parse_known_args(argv)
        stray = [r for r in rest if r.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if rest:
            args.overrides = [*args.overrides, *rest]
        args.func(args)
    except LdcqError as exc:
        print(f"ldcq: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk anywhere (a Lightning checkpoint, a bank chunk): say so, not a traceback.
        if exc.errno != errno.ENOSPC:
            raise
        print(
            f"ldcq: error: no space left on device writing {exc.filename or 'a file'}. Free space "
            f"and rerun the same command: finished stages are kept and the interrupted one "
            f"resumes from its last checkpoint",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
