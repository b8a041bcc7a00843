"""``ldcq …`` entry point: parses and dispatches; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import warnings

from ldcq.errors import ConfigError, LdcqError


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
    from ldcq.pipeline import compose, global_rank, run_pipeline

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
    for col in ("stage", "status", "seconds", "artifact"):
        table.add_column(col)
    for r in results.values():
        status = "finished earlier" if r.skipped else "done"
        table.add_row(r.stage, status, f"{r.seconds:.1f}", str(r.artifact.path))
    console = Console()
    console.print(table)
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
    from ldcq.pipeline import compose, global_rank, run_pipeline

    cfg = compose(args.pipeline, args.overrides, scale=args.scale, trainer=args.trainer)
    results = run_pipeline(cfg, stages=["evaluation"], track=not args.no_tracking, train=False)
    if global_rank() == 0:
        _print_summary(cfg, results)


def _pipeline_config(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from ldcq.pipeline import compose

    cfg = compose(args.pipeline, args.overrides, scale=args.scale, trainer=args.trainer)
    print(OmegaConf.to_yaml(cfg[args.stage] if args.stage else cfg).rstrip())


# `ldcq <stage> fit …`: each trained stage alone through LightningCLI.
STAGE_COMMANDS = {
    "skill_vae": (
        "ldcq.stages.skill_vae:SkillVAE",
        "ldcq.data.datamodules:TrajectorySnippetDataModule",
        ("state_dim", "action_dim"),
    ),
    "diffusion_prior": (
        "ldcq.stages.diffusion_prior:LatentDiffusionPrior",
        "ldcq.stages.latent_data:LatentPairsDataModule",
        ("state_dim", "latent_dim"),
    ),
    "latent_bcq": (
        "ldcq.stages.latent_bcq:LatentBCQ",
        "ldcq.stages.latent_bcq:LatentTransitionDataModule",
        ("state_dim", "latent_dim", "horizon"),
    ),
}
# Short aliases of the stage commands, kept for the scripts that use them.
STAGE_ALIASES = {"vae": "skill_vae", "prior": "diffusion_prior", "bcq": "latent_bcq"}


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run_stage_cli(command: str, argv: list[str]) -> None:
    """One stage alone through LightningCLI: ``ldcq skill_vae fit --config f.yaml --model.beta=0.1``
    (``command`` is a stage name or one of ``STAGE_ALIASES``).

    Dims come from the data (linked on instantiation); ``--artifact_dir DIR`` exports the trained
    stage as a frozen artifact that the next stage's ``--data.vae_artifact`` accepts.
    """
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from ldcq.stages.guards import FiniteLossGuard
    from ldcq.tracking import check_server, resolve_uri

    stage = STAGE_ALIASES.get(command, command)
    model_path, data_path, linked = STAGE_COMMANDS[stage]

    class LogConfigToMLflow(SaveConfigCallback):
        # The stock callback asserts on an MLflow logger with an sqlite store; log the resolved
        # config as a run artifact instead.
        def setup(self, trainer, pl_module, stage: str) -> None:
            if not self.already_saved and trainer.is_global_zero:
                self.save_config(trainer, pl_module, stage)
            self.already_saved = True

        def save_config(self, trainer, pl_module, stage: str) -> None:
            import tempfile
            from pathlib import Path

            logger = trainer.logger
            if logger is None or not hasattr(logger, "experiment"):
                return
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                self.parser.save(self.config, path, format="yaml", skip_check=True)
                logger.experiment.log_artifact(logger.run_id, str(path))

    class StageCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            for name in linked:
                parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
            if stage == "skill_vae":
                parser.link_arguments("data.horizon", "model.horizon")
            parser.add_argument(
                "--artifact_dir", default=None, help="export the trained stage to this folder"
            )

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except argparse.ArgumentError as exc:
                raise _stage_cli_error(parser, exc, command) from None

        def before_instantiate_classes(self) -> None:
            logger = self.config[self.subcommand]["trainer"]["logger"]
            uri = getattr(getattr(logger, "init_args", None), "tracking_uri", None)
            if isinstance(uri, str):
                check_server(uri)

        def after_fit(self) -> None:
            target = self.config[self.subcommand].get("artifact_dir")
            if target and self.trainer.is_global_zero:
                _export_from_cli(stage, self, target)

    # LightningCLI reads sys.argv; its program name shows in --help and in errors.
    sys.argv = [f"ldcq {command}", *argv]
    StageCLI(
        _load(model_path),
        _load(data_path),
        save_config_callback=LogConfigToMLflow,
        seed_everything_default=0,
        # Parse errors come back as exceptions, to be told as one line with the closest key.
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={
            "callbacks": [FiniteLossGuard(stage, lr_key="--model.lr")],
            "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {
                    "experiment_name": f"ldcq-{stage}",
                    "tracking_uri": resolve_uri(None),
                },
            },
        },
    )


def _stage_cli_error(parser, exc: argparse.ArgumentError, command: str) -> ConfigError:
    """A LightningCLI parse error as one line; an unknown option gets the closest valid one."""
    import difflib

    message = " ".join(str(exc).split())
    help_hint = f"`ldcq {command} fit --help` lists every option"
    if not message.startswith("unrecognized arguments"):
        return ConfigError(f"ldcq {command}: {message}; {help_hint}")
    valid = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                valid.update(sub._option_string_actions)
    unknown = []
    for token in message.split(":", 1)[1].split():
        if token.startswith("--"):
            key = token.split("=", 1)[0]
            match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            unknown.append(f"{key!r}" + (f" (did you mean {match[0]!r}?)" if match else ""))
    return ConfigError(
        f"ldcq {command}: unknown option {', '.join(unknown) or message}; {help_hint}"
    )


def _export_from_cli(stage: str, cli, target: str) -> None:
    from pathlib import Path

    from ldcq.artifacts import fingerprint
    from ldcq.data.datamodules import load_episodes
    from ldcq.pipeline import dataset_identity, export_artifact

    model, dm = cli.model, cli.datamodule
    episodes = load_episodes(dm.hparams.dataset, dm.obs_keys)
    if stage == "skill_vae":
        hp = model.hparams
        dims = {"S": hp.state_dim, "A": hp.action_dim, "Z": hp.latent_dim, "H": hp.horizon}
        upstream = {}
    else:
        dims = dict(dm.vae_spec.spec["dims"])
        upstream = {"skill_vae": dm.vae_spec.fingerprint}
    config = {k: v for k, v in cli.config[cli.subcommand].items() if k in ("model", "data")}
    fp = fingerprint({"stage": stage, "config": str(config), "upstream": upstream})
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    artifact = export_artifact(
        Path(target),
        stage,
        model,
        metrics,
        cli.parser.dump(cli.config, skip_check=True),
        {
            "fingerprint": fp,
            "dims": dims,
            "dataset": dataset_identity(episodes),
            "seed": cli.config[cli.subcommand].get("seed_everything"),
            "upstream": upstream,
            "config_hash": fp,
            "global_step": cli.trainer.global_step,
        },
    )
    print(f"exported {stage} artifact to {artifact.path}")


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
    return parser


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def drop_library_notices() -> None:
    """Hide two Lightning notices that say nothing about the run: its advert for a cloud logger,
    and a deprecation that the pinned torch raises inside Lightning's own code."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    drop_library_notices()
    try:
        if argv and (argv[0] in STAGE_COMMANDS or argv[0] in STAGE_ALIASES):
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
