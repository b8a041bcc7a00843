"""The run's config: included fragments, a scale, the pipeline file, a trainer preset and the
command line, merged in that order into one OmegaConf tree (``compose``).

A pipeline file (``pipelines/<task>.yaml``) names the fragments it includes and its default
scale; it may retune a scale for its task in a ``scales.<scale>`` section. Command-line
overrides use OmegaConf's dotted syntax (``skill_vae.model.beta=0.1``). The family defaults
(``configs/family/ldcq.yaml``) fix the keys: any later part, file or override, that names a key
they lack is refused with the closest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ldcq.errors import ConfigError
from ldcq.tracking import flatten

# Options added after artifacts and results were recorded, each with the value that keeps the
# earlier behaviour. At that value an option is left out of stage fingerprints and config hashes
# (:func:`without_neutral`), so what was trained or recorded before it existed keeps its identity:
# its artifacts are still found, its results still average with new seeds. Any other value is
# part of the identity as usual. Add an entry with every new config key.
STAGE_TRAINERS = ("skill_vae", "diffusion_prior", "latent_bank", "latent_bcq")
NEUTRAL = {
    "diffusion_prior.model.denoiser": "film_unet",
    "evaluation.diagnostics": False,
    "latent_bcq.model.compile": False,
    "latent_bank.compile": False,
    "evaluation.compile": False,
    # null: the stage inherits the shared trainer.precision (see ldcq.pipeline.Context.precision)
    **{f"{stage}.trainer.precision": None for stage in STAGE_TRAINERS},
}


def without_neutral(tree: dict, prefix: str = "") -> dict:
    """``tree`` (a plain config section whose keys sit under ``prefix``, e.g. ``"evaluation."``)
    without the :data:`NEUTRAL` options that hold their neutral value."""
    out = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = without_neutral(value, f"{full}.")
        elif not (full in NEUTRAL and value == NEUTRAL[full]):
            out[key] = value
    return out


def project_root(pipeline_path: Path) -> Path:
    """The folder holding ``configs/``: the pipeline file's parent's parent, else the cwd."""
    for candidate in (pipeline_path.resolve().parent.parent, Path.cwd()):
        if (candidate / "configs").is_dir():
            return candidate
    raise ConfigError(f"no configs/ folder found beside {pipeline_path} or in {Path.cwd()}")


def _closest(key: str, cfg: DictConfig) -> str:
    keys = list(flatten(OmegaConf.to_container(cfg, resolve=False)))
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _preset(root: Path, kind: str, name: str) -> DictConfig:
    path = root / "configs" / kind / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (root / "configs" / kind).glob("*.yaml"))
        raise ConfigError(f"{kind} {name!r} does not exist; valid values are {valid}")
    return OmegaConf.load(path)


def compose(
    pipeline: str | Path,
    overrides: Sequence[str] = (),
    scale: str | None = None,
    trainer: str | None = None,
) -> DictConfig:
    """Merge, in order: the included fragments, ``configs/scale/<scale>.yaml``, the pipeline
    file's own keys, its ``scales.<scale>`` section (a task's own retuning of a scale),
    ``configs/trainer/<trainer>.yaml``, then ``overrides`` (``a.b.c=value``). Unknown keys are
    refused with the closest valid key."""
    path = Path(pipeline)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist; see pipelines/ for the tasks")
    root = project_root(path)
    try:
        body = OmegaConf.load(path)
        includes = [OmegaConf.load(root / inc) for inc in body.pop("include", [])]
        per_scale = body.pop("scales", None) or {}
    except (OSError, OmegaConfBaseException, yaml.YAMLError) as exc:
        # YAML is read with a safe loader: a tag that would build an object lands here too.
        raise ConfigError(f"cannot read pipeline {path}: {' '.join(str(exc).split())}") from exc
    scale = scale or body.get("scale", "quick")
    parts = [*includes, _preset(root, "scale", scale), body]
    unknown = sorted(set(per_scale) - {p.stem for p in (root / "configs" / "scale").glob("*.yaml")})
    if unknown:
        raise ConfigError(f"{path}: scales.{unknown[0]} names no configs/scale/*.yaml file")
    if scale in per_scale:
        parts.append(per_scale[scale])
    if trainer:
        parts.append(_preset(root, "trainer", trainer))
    cfg = _merge_strict(parts, path)
    cfg.scale = scale
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. skill_vae.model.beta=0.1)")
        key = item.split("=", 1)[0].lstrip("+")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except ConfigKeyError as exc:
            raise ConfigError(f"unknown config key {key!r}{_closest(key, cfg)}") from exc
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r} is not valid: {exc}") from exc
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config of {path} does not resolve: {exc}") from exc
    return cfg


def _merge_strict(parts: Sequence[DictConfig], path: Path) -> DictConfig:
    """The first part (the family defaults) fixes the keys; a later part that names a key it does
    not have is refused, so a typo in a scale or pipeline file cannot pass silently."""
    cfg = OmegaConf.merge(parts[0], {"scale": None})
    OmegaConf.set_struct(cfg, True)
    for part in parts[1:]:
        try:
            cfg = OmegaConf.merge(cfg, part)
        except ConfigKeyError as exc:
            key = exc.full_key or str(exc)
            raise ConfigError(f"{path}: unknown config key {key!r}{_closest(key, cfg)}") from exc
    return cfg
