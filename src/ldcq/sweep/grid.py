"""The grid of a sweep: parsed from ``--grid key=v1,v2,…`` and checked before anything trains."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldcq.config import _closest, compose, project_root
from ldcq.errors import ConfigError
from ldcq.stages.registry import REGISTRY, TRAINED, check_config

# Keys a sweep cannot vary: what names the run and where it goes, and what has its own option.
FIXED = {
    "name": "it names the experiment and the checkpoints folder",
    "family": "it selects the task family's defaults",
    "seed": "use --seeds",
    "scale": "use --scale",
    "checkpoints_dir": "the sweep's runs share one checkpoints folder",
    "tracking_uri": "the sweep's runs share one MLflow store",
    "evaluation.selector": "every run evaluates LDCQ and its baselines: use --selectors",
    "evaluation.diagnostics": "every sweep run computes the diagnostics",
}


def split_values(text: str) -> list[str]:
    """``"10,20,30"`` -> ``["10", "20", "30"]``; commas inside brackets stay
    (``"[128,32],[256,64]"`` -> two lists)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["horizon=10,20", "skill_vae.model.latent_dim=8,16"]`` -> ``{key: [value text, …]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r}: write key=v1,v2,… (e.g. --grid horizon=10,20,30)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; put all its values in one --grid")
        texts = split_values(values)
        if "" in texts or len(set(texts)) != len(texts):
            raise ConfigError(f"--grid {item!r}: a value is empty or repeated")
        grid[key] = texts
    if not grid:
        raise ConfigError("ldcq sweep needs at least one --grid key=v1,v2,…")
    return grid


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _check_type(key: str, text: str, value: Any, default: Any) -> Any:
    """``value`` (parsed from ``text``) as the type of the key's ``default``, or a ConfigError."""
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"--grid {key}: value {text!r} is {_type_name(value)}, but {key} holds "
            f"{_type_name(default)} (default {default!r})"
        )
    return value


def parse_value(text: str) -> Any:
    """A value as an override ``key=<text>`` would give it (OmegaConf's YAML: ``1e-4`` is a
    number, ``[128,32]`` a list, ``null`` None)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]


def _raw_defaults(pipeline: Path):
    """The family defaults as written (interpolations unresolved)."""
    return OmegaConf.load(project_root(pipeline) / "configs" / "family" / "ldcq.yaml")


def check_grid(
    pipeline: Path, scale: str, grid: dict[str, list[str]], overrides: list[str]
) -> dict[str, list[Any]]:
    """Typed values per key, once every key and value is known to be one a run can take: the key
    exists, may be swept, each value has the key's type, and every point composes and builds
    every trained stage's model. Raises one ConfigError naming the key and the fix."""
    base = compose(pipeline, overrides, scale=scale)
    raw = _raw_defaults(pipeline)
    dims = {f"{name}.model.{dim}": name for name in TRAINED for dim in REGISTRY[name].data_dims}
    typed: dict[str, list[Any]] = {}
    for key, texts in grid.items():
        if key in FIXED:
            raise ConfigError(f"--grid {key}: cannot be swept ({FIXED[key]})")
        if key in dims:
            raise ConfigError(
                f"--grid {key}: cannot be swept; {dims[key]} reads it from the dataset or the "
                f"skill VAE's artifact (sweep skill_vae.model.latent_dim for Z, horizon for H)"
            )
        default = OmegaConf.select(base, key, default="<missing>")
        if isinstance(default, str) and default == "<missing>":
            raise ConfigError(f"--grid {key}: unknown config key{_closest(key, base)}")
        source = OmegaConf.to_container(raw, resolve=False)
        for part in key.split("."):
            source = source.get(part) if isinstance(source, dict) else None
        if isinstance(source, str) and source.startswith("${"):
            raise ConfigError(
                f"--grid {key}: cannot be swept; it follows {source[2:-1]} ({source}): sweep "
                f"{source[2:-1]} instead"
            )
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default, resolve=True)
        typed[key] = [_check_type(key, text, parse_value(text), default) for text in texts]
    for point in grid_points(typed):
        point_overrides = [*overrides, *point_to_overrides(point)]
        try:
            cfg = compose(pipeline, point_overrides, scale=scale)
            check_config(cfg)
        except ConfigError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"--grid point {where}: {exc}") from exc
    return typed


def grid_points(typed: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cross product of the grid, first key slowest."""
    keys = list(typed)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*typed.values())]


def point_to_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
