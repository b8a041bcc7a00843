"""Resolve a Minari dataset id (local first, then the Minari remote) and read it into flat arrays.

Episodes are stored back to back in contiguous arrays, never as lists of per-step tuples:
episode ``e`` owns actions ``episode_starts[e]:episode_starts[e + 1]`` (``L_e`` of them) and the
``L_e + 1`` observations starting at ``episode_starts[e] + e``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldcq.data import names
from ldcq.data.names import canonical_id
from ldcq.errors import DatasetError

# Datasets this project generates live under their own namespace; they are never downloadable.
GENERATED_NAMESPACE = "ldcq/"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*-v\d+$")
_REMOTE_HOST = ("huggingface.co", 443)


def datasets_root() -> Path:
    """Where Minari datasets live: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def _generate_hint(dataset_id: str) -> str:
    name = names.name_for_id(dataset_id)
    if name is not None:
        older = [
            names.dataset_id(name, v)
            for v in range(names.VERSION)
            if (datasets_root() / names.dataset_id(name, v)).exists()
        ]
        note = f" (the older {', '.join(older)} is not used: its evaluation goal moved)" * bool(
            older
        )
        return f"generate it with `ldcq data generate {name}`{note}"
    return "the datasets this project generates are: " + ", ".join(names.GENERATED_NAMES)


def _remote_reachable(timeout: float = 3.0) -> bool:
    # Minari's downloader retries for ~25 s before giving up when there is no network; one quick
    # connection attempt tells us the same thing at once.
    try:
        with socket.create_connection(_REMOTE_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _checked_id(name_or_id: str) -> str:
    """The Minari id of a name or id, refusing a malformed id or an outdated generated one."""
    dataset_id = canonical_id(name_or_id)
    if not _ID_PATTERN.match(dataset_id):
        raise DatasetError(
            f"dataset id {dataset_id!r} is not a Minari id: expected 'namespace/name-vN' such as "
            f"'D4RL/antmaze/large-diverse-v1' or a generated name such as 'pointmaze-umaze'"
        )
    outdated = names.outdated_name(dataset_id)
    if outdated is not None:
        raise DatasetError(
            f"dataset {dataset_id!r} is an older version of {outdated}, generated when its "
            f"evaluation goal moved at every reset, so its reference scores belong to another "
            f"protocol; generate the current one with `ldcq data generate {outdated}` and use "
            f"`dataset={outdated}` (id {names.dataset_id(outdated)})"
        )
    return dataset_id


def load_dataset(name_or_id: str, download: bool = True):
    """Return the ``minari.MinariDataset`` for an id, downloading it when it is not local.

    Raises:
        DatasetError: the id is malformed, or the dataset is neither local nor downloadable; the
            message names the id and both remedies.
    """
    import minari

    dataset_id = _checked_id(name_or_id)
    local = datasets_root() / dataset_id / "data"
    if local.exists():
        try:
            return minari.load_dataset(dataset_id)
        except Exception as exc:
            raise DatasetError(
                f"dataset {dataset_id!r} at {local.parent} cannot be opened ({exc}); delete that "
                f"folder and download or generate it again"
            ) from exc

    where = f"not found in {datasets_root()} (set MINARI_DATASETS_PATH to look elsewhere)"
    if dataset_id.startswith(GENERATED_NAMESPACE):
        raise DatasetError(f"dataset {dataset_id!r} is {where}; {_generate_hint(dataset_id)}")
    remedies = (
        f"download it on a machine with a network (`minari download {dataset_id}`) and copy "
        f"the folder to {datasets_root() / dataset_id}, or use a dataset this project generates "
        f"(`ldcq data generate pointmaze-umaze`)"
    )
    if not download:
        raise DatasetError(f"dataset {dataset_id!r} is {where}; {remedies}")
    if not _remote_reachable():
        raise DatasetError(
            f"dataset {dataset_id!r} is {where}, and the Minari remote "
            f"({_REMOTE_HOST[0]}) cannot be reached from this machine; {remedies}"
        )
    try:
        minari.download_dataset(dataset_id)
    except Exception as exc:
        raise DatasetError(
            f"dataset {dataset_id!r} is {where}, and downloading it from the Minari remote "
            f"failed: {exc}. Check the id with `minari list remote`; or {remedies}"
        ) from exc
    return minari.load_dataset(dataset_id)


@dataclass(frozen=True)
class EpisodeArrays:
    """All episodes of a dataset, back to back.

    Shapes (N steps, E episodes, S state dim, A action dim): ``observations (N + E, S)``,
    ``actions (N, A)``, ``rewards (N,)``, ``terminations (N,)``, ``truncations (N,)``,
    ``episode_starts (E + 1,)`` offsets into the step arrays.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    episode_starts: np.ndarray
    dataset_id: str = ""
    obs_keys: tuple[str, ...] = ()
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    metadata: Mapping = field(default_factory=dict)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        """``(E,)`` actions per episode."""
        return np.diff(self.episode_starts)

    @property
    def state_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def episode(self, e: int) -> dict[str, np.ndarray]:
        """One episode's arrays: ``observations (L+1, S)``, ``actions (L, A)``, rewards, flags."""
        a0, a1 = self.episode_starts[e], self.episode_starts[e + 1]
        return {
            "observations": self.observations[a0 + e : a1 + e + 1],
            "actions": self.actions[a0:a1],
            "rewards": self.rewards[a0:a1],
            "terminations": self.terminations[a0:a1],
            "truncations": self.truncations[a0:a1],
        }


def _flatten(value, key_path: str, where: str = "the dataset") -> np.ndarray:
    """``(L, d)`` float32 from an array or a (nested) dict of arrays, keys in sorted order."""
    if isinstance(value, Mapping):
        parts = [_flatten(value[k], f"{key_path}/{k}", where) for k in sorted(value)]
        return np.concatenate(parts, axis=1)
    arr = np.asarray(value)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        fix = "" if key_path in ("actions", "observations") else " (or choose other obs_keys)"
        raise DatasetError(
            f"{where}: {key_path!r} has shape {arr.shape} and dtype {arr.dtype}, but numeric "
            f"(steps, dim) values are needed; regenerate or re-download the dataset{fix}"
        )
    return arr.reshape(len(arr), -1).astype(np.float32, copy=False)


def observation_vector(obs, obs_keys: Sequence[str], dataset_id: str) -> np.ndarray:
    if not isinstance(obs, Mapping):
        return _flatten(obs, "observations", f"dataset {dataset_id!r}")
    missing = [k for k in obs_keys if k not in obs]
    if missing:
        raise DatasetError(
            f"dataset {dataset_id!r} has observation keys {sorted(obs)}, not {missing}; "
            f"set the data config's obs_keys to some of {sorted(obs)}"
        )
    where = f"dataset {dataset_id!r}"
    return np.concatenate([_flatten(obs[k], k, where) for k in obs_keys], axis=1)


def _checked_episode(ep: Mapping, where: str, obs_keys, dataset_id: str):
    """One episode's observation vectors and actions, once its fields are there and agree."""
    for key in ("observations", "actions", "rewards", "terminations", "truncations"):
        if ep.get(key) is None:
            raise DatasetError(f"{where} has no {key!r}: regenerate or re-download the dataset")
    obs = observation_vector(ep["observations"], obs_keys, dataset_id)
    act = _flatten(ep["actions"], "actions", where)
    n = len(act)
    sizes = {
        "observations": (len(obs), n + 1),
        "rewards": (len(ep["rewards"]), n),
        "terminations": (len(ep["terminations"]), n),
        "truncations": (len(ep["truncations"]), n),
    }
    for key, (got, want) in sizes.items():
        if got != want:
            raise DatasetError(
                f"{where} has {n} actions but {got} {key} (expected {want}): the dataset is "
                f"malformed; regenerate or re-download it"
            )
    for key in ("rewards", "terminations", "truncations"):
        arr = np.asarray(ep[key])
        if arr.size != n or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DatasetError(
                f"{where}: {key!r} has shape {arr.shape} and dtype {arr.dtype}, but {n} "
                f"numbers (one per action) are needed; regenerate or re-download the dataset"
            )
    return obs, act


def episodes_from_dicts(
    episodes: Sequence[Mapping],
    obs_keys: Sequence[str] = ("observation",),
    dataset_id: str = "<in memory>",
) -> EpisodeArrays:
    """Validate per-episode dicts (Minari's fields) and pack them into :class:`EpisodeArrays`."""
    obs_parts, act_parts, rew_parts, term_parts, trunc_parts, lengths = [], [], [], [], [], []
    for i, ep in enumerate(episodes):
        obs, act = _checked_episode(
            ep, f"dataset {dataset_id!r}, episode {ep.get('id', i)}", obs_keys, dataset_id
        )
        n = len(act)
        if n == 0:
            continue
        obs_parts.append(obs)
        act_parts.append(act)
        rew_parts.append(np.asarray(ep["rewards"], dtype=np.float32).reshape(n))
        term_parts.append(np.asarray(ep["terminations"], dtype=bool).reshape(n))
        trunc_parts.append(np.asarray(ep["truncations"], dtype=bool).reshape(n))
        lengths.append(n)
    if not lengths:
        raise DatasetError(f"dataset {dataset_id!r} has no episode with at least one step")
    dims = {p.shape[1] for p in obs_parts}, {p.shape[1] for p in act_parts}
    if len(dims[0]) > 1 or len(dims[1]) > 1:
        raise DatasetError(
            f"dataset {dataset_id!r} mixes state dims {sorted(dims[0])} or action dims "
            f"{sorted(dims[1])} across episodes"
        )
    values = np.concatenate([*obs_parts, *act_parts, *rew_parts], axis=None)
    if not np.isfinite(values).all():
        raise DatasetError(
            f"dataset {dataset_id!r} has NaN or inf in its observations, actions or rewards; "
            f"clean or regenerate it"
        )
    return EpisodeArrays(
        observations=np.concatenate(obs_parts),
        actions=np.concatenate(act_parts),
        rewards=np.concatenate(rew_parts),
        terminations=np.concatenate(term_parts),
        truncations=np.concatenate(trunc_parts),
        episode_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        dataset_id=dataset_id,
        obs_keys=tuple(obs_keys),
    )


def read_episodes(name_or_id: str, obs_keys: Sequence[str] = ("observation",)) -> EpisodeArrays:
    """Resolve a dataset and read all its episodes into :class:`EpisodeArrays`.

    ``obs_keys`` picks and concatenates fields of a dict observation, in order (e.g.
    ``("observation", "desired_goal")`` for a goal-conditioned state); nested dicts such as
    kitchen's goals are flattened with their keys sorted. Box observations ignore ``obs_keys``.
    """
    dataset = load_dataset(name_or_id)
    spec_meta = dataset.storage.metadata
    try:
        raw = list(dataset.storage.get_episodes(dataset.episode_indices))
    except Exception as exc:
        raise DatasetError(
            f"dataset {dataset.id!r} cannot be read ({exc}); delete {dataset.storage.data_path} "
            f"and download or generate it again"
        ) from exc
    arrays = episodes_from_dicts(raw, obs_keys=obs_keys, dataset_id=dataset.id)
    ref_min, ref_max = spec_meta.get("ref_min_score"), spec_meta.get("ref_max_score")
    return EpisodeArrays(
        **{
            **arrays.__dict__,
            "ref_min_score": None if ref_min is None else float(ref_min),
            "ref_max_score": None if ref_max is None else float(ref_max),
            "metadata": {
                "dataset_id": dataset.id,
                "minari_version": spec_meta.get("minari_version"),
                "total_steps": int(spec_meta.get("total_steps", 0)),
                "total_episodes": int(spec_meta.get("total_episodes", 0)),
            },
        }
    )
