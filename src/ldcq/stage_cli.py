"""``ldcq <stage> fit …``: one trained stage alone through LightningCLI (``ldcq skill_vae fit
--config f.yaml --model.beta=0.1``; the stages and their aliases come from the stage registry).

Dims come from the data (linked on instantiation); ``--artifact_dir DIR`` exports the trained
stage as a frozen artifact that the next stage's ``--data.vae_artifact`` accepts. These runs
resume through Lightning's own checkpoints; the pipeline's exact resume is not theirs.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ldcq.artifacts import dataset_identity, fingerprint, module_kwargs, write_artifact
from ldcq.data.datamodules import load_episodes
from ldcq.errors import ConfigError
from ldcq.precision import AUTO
from ldcq.precision import resolve as resolve_precision
from ldcq.stages.guards import FiniteLossGuard
from ldcq.stages.registry import StageSpec, stage
from ldcq.tracking import check_server, resolve_uri


def run_stage_cli(command: str, argv: list[str]) -> None:
    """Parse ``argv`` for the stage ``command`` (a name or an alias) and run it."""
    spec = stage(command)
    # LightningCLI reads sys.argv; its program name shows in --help and in errors.
    sys.argv = [f"ldcq {command}", *argv]
    StageCLI(
        spec,
        command,
        spec.module,
        spec.datamodule,
        save_config_callback=LogConfigToMLflow,
        seed_everything_default=0,
        # Parse errors come back as exceptions, to be told as one line with the closest key.
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={
            # The pipeline's trainer.precision: auto (bf16-mixed where the hardware has it).
            "precision": resolve_precision(AUTO, "auto")[0],
            "callbacks": [FiniteLossGuard(spec.name, lr_key="--model.lr")],
            "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {
                    "experiment_name": f"ldcq-{spec.name}",
                    "tracking_uri": resolve_uri(None),
                },
            },
        },
    )


class LogConfigToMLflow(SaveConfigCallback):
    """The resolved config as an artifact of the stage's MLflow run (the stock callback asserts
    on an MLflow logger with an sqlite store)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if logger is None or not hasattr(logger, "experiment"):
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            self.parser.save(self.config, path, format="yaml", skip_check=True)
            logger.experiment.log_artifact(logger.run_id, str(path))


class StageCLI(LightningCLI):
    """LightningCLI over one stage: its dims linked from the data, ``--artifact_dir``, one-line
    parse errors, a tracking server checked before anything trains."""

    def __init__(self, spec: StageSpec, command: str, *args, **kwargs) -> None:
        self.spec, self.command = spec, command  # before LightningCLI builds its parser
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for name in self.spec.data_dims:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        if self.spec.name == "skill_vae":
            parser.link_arguments("data.horizon", "model.horizon")
        parser.add_argument(
            "--artifact_dir", default=None, help="export the trained stage to this folder"
        )

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            raise _stage_cli_error(parser, exc, self.command) from None

    def before_instantiate_classes(self) -> None:
        logger = self.config[self.subcommand]["trainer"]["logger"]
        uri = getattr(getattr(logger, "init_args", None), "tracking_uri", None)
        if isinstance(uri, str):
            check_server(uri)

    def after_fit(self) -> None:
        target = self.config[self.subcommand].get("artifact_dir")
        if target and self.trainer.is_global_zero:
            export_from_cli(self.spec.name, self, target)


def _stage_cli_error(parser, exc: argparse.ArgumentError, command: str) -> ConfigError:
    """A LightningCLI parse error as one line; an unknown option gets the closest valid one."""
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


def export_from_cli(stage: str, cli: LightningCLI, target: str) -> None:
    """The stage ``cli`` trained, as a frozen artifact in ``target``."""
    model, dm = cli.model, cli.datamodule
    episodes = load_episodes(dm.hparams.dataset, dm.obs_keys)
    if stage == "skill_vae":
        hp = model.hparams
        dims = {"S": hp.state_dim, "A": hp.action_dim, "Z": hp.latent_dim, "H": hp.horizon}
        upstream = {}
    else:
        dims = dict(dm.vae_spec.spec["dims"])
        upstream = {"skill_vae": dm.vae_spec.fingerprint}
    run = cli.config[cli.subcommand]
    config = {k: run[k].as_dict() for k in ("model", "data")}
    dataset, seed = dataset_identity(episodes), run.get("seed_everything")
    # The pipeline's recipe (stage, config, seed, dataset, upstream), over this CLI's sections.
    payload = {"stage": stage, "config": config, "seed": seed, "dataset": dataset}
    fp = fingerprint({**payload, "upstream": list(upstream.values())})
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    spec = {
        "fingerprint": fp,
        "dims": dims,
        "dataset": dataset,
        "seed": seed,
        "upstream": upstream,
        "config_hash": fingerprint(config),
        "global_step": cli.trainer.global_step,
    }
    artifact = write_artifact(
        Path(target),
        stage=stage,
        modules={stage: (model, module_kwargs(model))},
        spec=spec,
        config_yaml=cli.parser.dump(cli.config, skip_check=True),
        metrics=metrics,
    )
    print(f"exported {stage} artifact to {artifact.path}")
