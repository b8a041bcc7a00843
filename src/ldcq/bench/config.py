"""What `make bench` measures: the families and precisions it knows, the paper-scale projection's
dataset size, :class:`BenchConfig` (every knob, with the defaults of a full run and
:meth:`BenchConfig.tiny`'s toy sizes), and the command line that fills it (:func:`parse_config`:
every field of the dataclass is an option, derived by jsonargparse).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from ldcq.errors import ConfigError
from ldcq.precision import DTYPES, VALID, resolve

# family -> (pipeline composed for its config, dims of its datasets' observation fields, A).
# S and A come from the data in a real run; here they are the datasets' known dims, and S follows
# the family's obs_keys.
FAMILIES: dict[str, tuple[str, dict[str, int], int]] = {
    "maze2d": (
        "pipelines/pointmaze-umaze.yaml",
        {"observation": 4, "achieved_goal": 2, "desired_goal": 2},
        2,
    ),
    "antmaze": (
        "pipelines/antmaze-large-diverse.yaml",
        {"observation": 27, "achieved_goal": 2, "desired_goal": 2},
        8,
    ),
}
PRECISIONS = DTYPES  # Lightning's precision names -> autocast dtype (None: fp32)
# The quality prior trains for only ``quality_train_steps``: a faster learning rate and a shorter
# EMA than the paper's let it converge that quickly. Sampling cost does not depend on them.
QUALITY_LR, QUALITY_EMA = 1e-3, 0.99
# Steps of the datasets the paper-scale projection assumes (D4RL maze2d-umaze and antmaze: ~1M).
DATASET_STEPS = 1_000_000


@dataclass
class BenchConfig:
    """Every knob of `make bench`; the defaults finish within 10 minutes on a 2-core CPU."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "auto"  # auto (as trainer.precision) | 32-true | bf16-mixed | 16-mixed (cuda)
    scale: str = "paper"  # configs/scale/<scale>.yaml: the network sizes and batch sizes
    families: tuple[str, ...] = ("maze2d", "antmaze")  # the first one also runs the other sections
    overrides: tuple[str, ...] = ()  # dotted config overrides, as for `ldcq pipeline run`
    root: str = "."  # the repository: holds pipelines/ and configs/
    seed: int = 0
    isolate: bool = True  # each section in a fresh process (for its peak RSS)
    threads: int | None = None  # torch threads per section; None: torch's default (all cores)
    repeats: int = 3
    matmul_size: int = 2048
    train_warmup: dict[str, int] = field(
        default_factory=lambda: {"skill_vae": 1, "diffusion_prior": 5, "latent_bcq": 5}
    )
    train_steps: dict[str, int] = field(
        default_factory=lambda: {"skill_vae": 3, "diffusion_prior": 40, "latent_bcq": 40}
    )
    profile_steps: int = 2
    transitions: int = 50_000  # N rows of the synthetic replay data
    q_batches: tuple[int, ...] = (128, 256)
    q_bank_sizes: tuple[int, ...] = (16, 100)
    q_warmup: int = 5
    q_steps: int = 30
    # Uniform and prioritized runs alternate this many times; each keeps its best step. One pair
    # of runs drifted by up to ±20 % between runs on this CPU, the size of the target itself.
    q_rounds: int = 3
    quality_train_steps: int = 1500
    quality_batch: int = 256
    quality_states: int = 128
    quality_samples: int = 64
    mmd_bandwidth: float = 2.0
    ddpm_extra_steps: int = 5
    ddim_steps: tuple[int, ...] = (2, 3, 5, 10, 20)
    dpmpp_steps: tuple[int, ...] = (5, 10)  # DPM-Solver++(2M) step counts beside DDIM's
    # The configured noise schedule is always measured; these are compared beside it.
    schedules: tuple[str, ...] = ("linear", "cosine")
    throughput_states: int = 64
    throughput_samples: int = 100
    bank_states: int = 4096
    envs: tuple[int, ...] = (1, 64)
    # The reference mode (ldcq.bench.reference): the official settings in our code, measured in
    # the same run, so each speedup is a ratio of two figures from this host.
    reference: bool = True  # also measure the reference mode and print our speedup over it
    reference_bank_states: int = 512  # states of the reference bank (DDPM: ~10x slower a latent)

    def resolved(self) -> tuple[BenchConfig, str]:
        """This config with ``auto`` precision made concrete for ``device``, and why."""
        concrete, reason = resolve(self.precision, "gpu" if self.device == "cuda" else "cpu")
        return replace(self, precision=concrete), reason

    @classmethod
    def tiny(cls, **changes: Any) -> BenchConfig:
        """Every section at toy sizes, in this process: a smoke test in seconds."""
        overrides = (
            "horizon=5",
            "skill_vae.model.hidden_dim=16",
            "skill_vae.model.gru_layers=1",
            "skill_vae.data.batch_size=8",
            "diffusion_prior.model.hidden_dims=[16,8]",
            "diffusion_prior.model.time_embed_dim=16",
            "diffusion_prior.model.state_embed_dim=16",
            "diffusion_prior.model.num_steps=10",
            "diffusion_prior.data.batch_size=16",
            "latent_bank.num_samples=4",
            "latent_bank.batch_size=64",
            "latent_bcq.model.hidden_dim=16",
            "latent_bcq.model.latent_hidden=16",
            "latent_bcq.data.batch_size=16",
        )
        small = {"skill_vae": 2, "diffusion_prior": 2, "latent_bcq": 2}
        values: dict[str, Any] = {
            "scale": "quick",
            "families": ("maze2d",),
            "overrides": overrides,
            "isolate": False,
            "repeats": 1,
            "matmul_size": 128,
            "train_warmup": {k: 1 for k in small},
            "train_steps": small,
            "profile_steps": 1,
            "transitions": 512,
            "q_batches": (16,),
            "q_bank_sizes": (4,),
            "q_warmup": 1,
            "q_steps": 2,
            "q_rounds": 1,
            "quality_train_steps": 10,
            "quality_batch": 32,
            "quality_states": 8,
            "quality_samples": 8,
            "ddim_steps": (2, 5),
            "dpmpp_steps": (5,),
            "throughput_states": 4,
            "throughput_samples": 8,
            "bank_states": 128,
            "envs": (1, 4),
            "reference_bank_states": 16,
        }
        return cls(**{**values, **changes})

    def check(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
        if self.precision not in VALID:
            raise ConfigError(f"--precision {self.precision!r}: valid values are {list(VALID)}")
        if self.precision == "16-mixed" and self.device != "cuda":
            raise ConfigError("--precision 16-mixed needs --device cuda; use bf16-mixed on a CPU")
        if self.reference_bank_states < 1:
            raise ConfigError("--reference_bank_states must be >= 1")
        if self.reference and 1 not in self.envs:
            raise ConfigError(
                f"--envs {list(self.envs)}: the reference mode compares a 1-env re-plan; add 1 "
                f"or pass --reference false"
            )
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ConfigError(f"--families {unknown}: valid families are {list(FAMILIES)}")


# ------------------------------------------------------------------------------ command line

# Fields the command line spells its own way: --families as one comma-separated string, the
# overrides as positional arguments (appended to the config's own, e.g. tiny()'s).
_OWN_SPELLING = ("families", "overrides")
# --tiny keeps tiny()'s scale whatever --scale says (`make bench` always passes one).
_TINY_KEEPS = ("scale",)


def _field_comments(cls: type) -> dict[str, str]:
    """The comment on each field's line of ``cls``'s source: its --help text."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): help without the comments
        return {}
    names = {f.name for f in fields(cls)}
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.+)", line) for line in lines)
    return {m[1]: m[2] for m in found if m and m[1] in names}


def build_parser() -> ArgumentParser:
    """``python -m ldcq.bench.perf``'s options: every :class:`BenchConfig` field but those in
    ``_OWN_SPELLING`` as ``--name value``, then --families, --out-dir, --tiny and the overrides."""
    parser = ArgumentParser(
        prog="python -m ldcq.bench.perf",
        description="Speed, latency, memory and FLOP efficiency of every LDCQ stage (make bench).",
    )
    added = parser.add_class_arguments(BenchConfig, skip=set(_OWN_SPELLING))
    comments = _field_comments(BenchConfig)
    for name in added:
        if name in comments:
            parser._option_string_actions[f"--{name}"].help = comments[name]
    parser.add_argument(
        "--families", help="comma-separated (default maze2d,antmaze; --tiny: maze2d)"
    )
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON report goes")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="toy sizes, one process: a smoke run (at scale quick: --scale does not apply)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="dotted config overrides (skill_vae.model.hidden_dim=128)",
    )
    return parser


def parse_cli(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    """The config the command line asks for, checked, and its --out-dir; an invalid option or
    config exits with status 2 and the usage (jsonargparse's ``error``).

    With --tiny the options given apply over :meth:`BenchConfig.tiny` instead of the defaults
    (but for ``_TINY_KEEPS``), and the overrides come after tiny()'s own.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    base = BenchConfig.tiny() if args.tiny else BenchConfig()
    if args.tiny:  # again, over tiny()'s values: the options given still win
        options = {k: v for k, v in asdict(base).items() if k not in _OWN_SPELLING}
        parser.set_defaults(options)
        args = parser.parse_args(argv)
    cfg = _config(base, args)
    try:
        cfg.check()
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, args.out_dir


def parse_config(argv: list[str] | None = None) -> BenchConfig:
    """The :class:`BenchConfig` the command line asks for (see :func:`parse_cli`)."""
    return parse_cli(argv)[0]


def _config(base: BenchConfig, args: Namespace) -> BenchConfig:
    """``base`` with the parsed options."""
    values: dict[str, Any] = {
        f.name: args[f.name] for f in fields(BenchConfig) if f.name not in _OWN_SPELLING
    }
    if args.tiny:
        values.update({k: getattr(base, k) for k in _TINY_KEEPS})
    if args.families:
        values["families"] = tuple(f for f in args.families.split(",") if f)
    values["overrides"] = (*base.overrides, *args.overrides)
    return replace(base, **values)
