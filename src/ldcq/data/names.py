"""Names and Minari ids of the datasets this project generates: a lookup that imports no simulator.

A generated dataset is named ``pointmaze-<maze>[-dense]`` and stored as
``ldcq/pointmaze/<maze>[-dense]-v<VERSION>``, a namespace that never collides with the
downloadable ``D4RL/pointmaze/*``. Version 1 datasets are evaluated with the goal fixed at their
rewards' goal; version 0 ones were made when the evaluation goal moved at every reset, so their
reference scores belong to another protocol, and they are refused (:func:`outdated_name`).
"""

from __future__ import annotations

from ldcq.errors import DatasetError

NAMESPACE = "ldcq/pointmaze"
# v1: the evaluation goal is fixed at the reward's goal (v0: moved per reset).
VERSION = 1
MAZE_NAMES = ("umaze", "medium", "large")
GENERATED_NAMES: tuple[str, ...] = tuple(
    f"pointmaze-{maze}{suffix}" for maze in MAZE_NAMES for suffix in ("", "-dense")
)


class UnknownDatasetName(DatasetError, ValueError):
    """A name that is not one of ``GENERATED_NAMES``."""


def split_name(name: str) -> tuple[str, bool]:
    """``(maze, dense)`` of a generated dataset's name: ``pointmaze-large-dense`` -> ``("large", True)``."""
    if name not in GENERATED_NAMES:
        raise UnknownDatasetName(
            f"unknown pointmaze dataset name {name!r}; valid names: {', '.join(GENERATED_NAMES)}"
        )
    maze, _, dense = name.removeprefix("pointmaze-").partition("-")
    return maze, dense == "dense"


def dataset_id(name: str, version: int = VERSION) -> str:
    """Minari id of a generated dataset: ``pointmaze-large-dense`` -> ``ldcq/pointmaze/large-dense-v1``."""
    split_name(name)
    return f"{NAMESPACE}/{name.removeprefix('pointmaze-')}-v{version}"


def name_for_id(minari_id: str) -> str | None:
    """The generated dataset's name for its id (``ldcq/pointmaze/umaze-v1`` -> ``pointmaze-umaze``),
    or None when the id is not one of ours at the current version."""
    return next((n for n in GENERATED_NAMES if dataset_id(n) == minari_id), None)


def outdated_name(minari_id: str) -> str | None:
    """The name of a generated dataset of which ``minari_id`` is an older version, else None."""
    return next(
        (n for n in GENERATED_NAMES for v in range(VERSION) if dataset_id(n, v) == minari_id),
        None,
    )


def canonical_id(name_or_id: str) -> str:
    """Map a generated dataset's short name (``pointmaze-umaze``) to its id; pass ids through."""
    return dataset_id(name_or_id) if name_or_id in GENERATED_NAMES else name_or_id
