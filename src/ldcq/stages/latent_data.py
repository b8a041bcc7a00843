"""DataModules whose batches come from a frozen upstream stage (the VAE's latents): the
prior's (state, latent) pairs and the Q stage's transitions with their bank rows.

They read upstream artifacts through :mod:`ldcq.artifacts` only; the frozen modules are rebuilt
from ``spec.json`` and never trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ldcq.artifacts import (
    Artifact,
    ArtifactError,
    atomic_path,
    check_dims,
    load_modules,
    read_artifact,
)
from ldcq.data.batches import EpochOrder, StepDrawnBatches
from ldcq.data.datamodules import collate_batch, load_episodes
from ldcq.data.minari_io import EpisodeArrays, canonical_id
from ldcq.data.normalizer import Normalizer
from ldcq.data.windows import Windows, make_windows, split_episodes
from ldcq.errors import ConfigError
from ldcq.stages.common import check_positive
from ldcq.stages.latent_bank import open_bank
from ldcq.stages.replay import PrioritizedReplay


class TensorRows(Dataset):
    """Rows of equally long tensors; ``__getitems__`` gathers a whole batch in one op per tensor."""

    def __init__(self, **tensors: Tensor) -> None:
        lengths = {len(t) for t in tensors.values()}
        assert len(lengths) == 1, lengths
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitems__(self, indices) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def load_vae(path: str | Path, dataset_id: str):
    """The frozen SkillVAE of an artifact, checked against the dataset it will encode."""
    artifact = read_artifact(path, stage="skill_vae")
    check_dims(artifact, {"dataset": dataset_id}, "this stage's data.dataset")
    return artifact, load_modules(artifact)["skill_vae"]


@torch.no_grad()
def encode_windows(
    vae, episodes: EpisodeArrays, windows: Windows, batch_size: int = 4096
) -> Tensor:
    """Posterior means ``(W, Z)`` of every window, encoded by the frozen VAE in batches."""
    obs = torch.from_numpy(episodes.observations)
    act = torch.from_numpy(episodes.actions)
    h = windows.horizon
    steps = torch.arange(h)
    out = []
    for i in range(0, len(windows), batch_size):
        s0 = torch.from_numpy(windows.state_starts[i : i + batch_size])[:, None] + steps
        a0 = torch.from_numpy(windows.action_starts[i : i + batch_size])[:, None] + steps
        out.append(vae.encode(obs[s0], act[a0])[0])
    return torch.cat(out)


def cached_latents(
    vae_artifact: Artifact, vae, episodes: EpisodeArrays, windows: Windows, key: str
) -> Tensor:
    """:func:`encode_windows`, cached on disk beside the VAE artifact, keyed by its fingerprint."""
    cache_dir = vae_artifact.path.parent / "cache"
    path = cache_dir / f"latents-{vae_artifact.fingerprint}-{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)["latents"]
        except Exception:
            path.unlink(missing_ok=True)
    latents = encode_windows(vae, episodes, windows)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"latents": latents}, tmp)
    return latents


class FrozenVAEDataModule(StepDrawnBatches):
    """Base of the DataModules whose batches hold latents of a frozen ``skill_vae`` artifact.

    The dims (S, Z, H) come from the artifact's spec, so the model's dims are linked to them.
    Training batches are drawn at their step (:mod:`ldcq.data.batches`).
    """

    def __init__(self, dataset: str, vae_artifact: str, obs_keys: list[str] | None) -> None:
        super().__init__()
        if not vae_artifact:
            raise ConfigError("data.vae_artifact is required: the skill_vae artifact folder")
        self.obs_keys = tuple(obs_keys or ["observation"])
        self.vae_spec, self.vae = load_vae(vae_artifact, canonical_id(dataset))
        episodes = load_episodes(dataset, self.obs_keys)
        # Same dataset, other obs_keys: the VAE would otherwise fail deep inside a matmul.
        check_dims(
            self.vae_spec,
            {"S": episodes.state_dim, "A": episodes.action_dim},
            "this stage's data.obs_keys",
        )

    @property
    def state_dim(self) -> int:
        return self.vae_spec.spec["dims"]["S"]

    @property
    def latent_dim(self) -> int:
        return self.vae_spec.spec["dims"]["Z"]

    @property
    def horizon(self) -> int:
        return self.vae_spec.spec["dims"]["H"]


class LatentPairsDataModule(FrozenVAEDataModule):
    """``(s_t, z_t)`` pairs for the diffusion prior: batches of ``states (B, S)`` raw and
    ``latents (B, Z)``, the frozen VAE's posterior means, split by episode like stage 1. One pass
    over a fresh permutation of the training pairs per epoch, seeded by ``(seed, epoch)``.

    Args:
        dataset: the dataset the VAE was trained on.
        vae_artifact: the ``skill_vae`` artifact folder.
        stride: step between window starts (the VAE's horizon is read from its spec).
    """

    def __init__(
        self,
        dataset: str = "pointmaze-umaze",
        vae_artifact: str = "",
        stride: int = 1,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        obs_keys: list[str] | None = None,
    ) -> None:
        super().__init__(dataset, vae_artifact, obs_keys)
        check_positive("data", batch_size=batch_size, stride=stride)
        check_positive("data", allow_zero=True, val_fraction=val_fraction)
        if val_fraction >= 1:
            raise ConfigError(f"data.val_fraction={val_fraction!r}: must be in [0, 1)")
        self.save_hyperparameters()
        self.train_set = self.val_set = None
        self.order: EpochOrder | None = None
        self.state_normalizer: Normalizer | None = None
        self.latent_normalizer: Normalizer | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        episodes = load_episodes(hp.dataset, self.obs_keys)
        windows = make_windows(episodes, self.horizon, hp.stride)
        latents = cached_latents(self.vae_spec, self.vae, episodes, windows, f"stride{hp.stride}")
        states = torch.from_numpy(episodes.observations[windows.state_starts])
        _, val_eps = split_episodes(episodes.num_episodes, hp.val_fraction, hp.seed)
        in_val = np.isin(windows.episode, val_eps)
        tr, va = torch.from_numpy(~in_val), torch.from_numpy(in_val)
        self.train_set = TensorRows(states=states[tr], latents=latents[tr])
        self.order = EpochOrder(len(self.train_set), hp.batch_size, hp.seed)
        if va.any():
            self.val_set = TensorRows(states=states[va], latents=latents[va])
        self.state_normalizer = Normalizer(self.state_dim).fit(states[tr])
        self.latent_normalizer = Normalizer(self.latent_dim).fit(latents[tr])

    def batches_per_epoch(self, world_size: int) -> int:
        return self.order.per_epoch(world_size)

    def draw_batch(self, n: int, rank: int, world_size: int) -> dict[str, Tensor]:
        return self.train_set.__getitems__(self.order.rows(n, rank, world_size))

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.hparams.batch_size, collate_fn=collate_batch
        )


def draw_transitions(
    tensors: dict[str, Tensor],
    bank: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    replay: PrioritizedReplay | None = None,
) -> dict[str, Tensor]:
    """B transitions drawn with ``rng``, uniformly or ∝ priority, gathered with their bank rows.

    Returns ``states (B, S)``, ``latents (B, Z)``, ``rewards (B,)``, ``next_states (B, S)``,
    ``dones (B,)`` float, ``bank (B, K, Z)`` float32, ``index (B,)`` long and ``weights (B,)``,
    the replay's importance weights (ones without a replay).
    """
    if replay is None:
        index = rng.integers(0, len(tensors["states"]), batch_size)
        weights = torch.ones(batch_size)
    else:
        index = replay.draw(batch_size, rng)
        weights = torch.from_numpy(replay.weights(index))
    idx = torch.from_numpy(index)
    batch = {k: v[idx] for k, v in tensors.items()}
    batch["bank"] = torch.from_numpy(bank[index].astype(np.float32))
    batch["index"] = idx
    batch["weights"] = weights
    return batch


class LatentTransitionDataModule(FrozenVAEDataModule):
    """H-step transitions of every episode, encoded by the frozen VAE, with their bank rows.

    Args:
        dataset: the dataset the VAE was trained on.
        vae_artifact: the ``skill_vae`` artifact folder (gives H and the encoder).
        bank_path: the ``bank.npy`` generated from :meth:`transitions`' ``next_states``; may be
            empty when only :meth:`transitions` is needed.
        gamma: γ of the chunk reward Σ_{k<H} γ^k r_{t+k}; must equal the model's γ.
        stride: step between window starts.
        batch_size: B.
        prioritized: prioritized replay (α, β schedule, eps below) instead of uniform sampling.
        per_beta_steps: batches over which β goes from ``per_beta_start`` to ``per_beta_end``;
            None: the trainer's ``max_steps`` (so β reaches its end within the run).
        seed: seed of the draws: batch n of rank r is drawn with ``(seed, r, n)`` when its step
            begins (:mod:`ldcq.data.batches`), so it sees every priority written before it.
        obs_keys: fields of a dict observation concatenated into the state.
        steps_per_epoch: batches per epoch (sampling is with replacement, so epochs are nominal).
    """

    def __init__(
        self,
        dataset: str = "pointmaze-umaze",
        vae_artifact: str = "",
        bank_path: str = "",
        gamma: float = 0.995,
        stride: int = 1,
        batch_size: int = 128,
        prioritized: bool = False,
        per_alpha: float = 0.6,
        per_beta_start: float = 0.3,
        per_beta_end: float = 1.0,
        per_beta_steps: int | None = None,
        per_eps: float = 5e-6,
        seed: int = 0,
        obs_keys: list[str] | None = None,
        steps_per_epoch: int = 1000,
    ) -> None:
        super().__init__(dataset, vae_artifact, obs_keys)
        check_positive(
            "data", stride=stride, batch_size=batch_size, steps_per_epoch=steps_per_epoch
        )
        if not 0.0 < gamma <= 1.0:
            raise ConfigError(f"data.gamma={gamma!r}: must be in (0, 1]")
        self.save_hyperparameters()
        self._transitions: dict[str, Tensor] | None = None
        self.bank: np.ndarray | None = None
        self.replay: PrioritizedReplay | None = None
        self.state_normalizer: Normalizer | None = None

    @property
    def bank_samples(self) -> int | None:
        """K of the opened bank (None before :meth:`setup`)."""
        return None if self.bank is None else int(self.bank.shape[1])

    def transitions(self) -> dict[str, Tensor]:
        """``states (N, S)``, ``latents (N, Z)``, ``rewards (N,)``, ``next_states (N, S)`` (s_{t+H})
        and ``dones (N,)`` float of every window of every episode, in window order."""
        if self._transitions is None:
            hp = self.hparams
            episodes = load_episodes(hp.dataset, self.obs_keys)
            windows = make_windows(episodes, self.horizon, hp.stride, hp.gamma)
            latents = cached_latents(
                self.vae_spec, self.vae, episodes, windows, f"stride{hp.stride}"
            )
            obs = torch.from_numpy(episodes.observations)
            starts = torch.from_numpy(windows.state_starts)
            self._transitions = {
                "states": obs[starts],
                "latents": latents,
                "rewards": torch.from_numpy(windows.rewards).float(),
                "next_states": obs[starts + self.horizon],
                "dones": torch.from_numpy(windows.dones).float(),
            }
        return self._transitions

    def setup(self, stage: str | None = None) -> None:
        if self.bank is not None:
            return
        hp = self.hparams
        data = self.transitions()
        self.state_normalizer = Normalizer(self.state_dim).fit(
            torch.cat([data["states"], data["next_states"]])
        )
        if not hp.bank_path:
            raise ConfigError(
                "data.bank_path is required to train: generate the latent bank from this "
                "DataModule's transitions()['next_states'] first"
            )
        bank = open_bank(hp.bank_path)
        n = len(data["states"])
        if bank.shape[0] != n or bank.shape[2] != self.latent_dim:
            raise ArtifactError(
                f"latent bank {hp.bank_path} has shape {bank.shape}, but these transitions need "
                f"({n}, K, {self.latent_dim}) (dataset {hp.dataset!r}, stride {hp.stride}, "
                f"H {self.horizon}); it was generated for other data: delete its folder and "
                f"generate it again from this DataModule's transitions()"
            )
        self.bank = bank
        if hp.prioritized:
            self.replay = PrioritizedReplay(
                n,
                alpha=hp.per_alpha,
                beta_start=hp.per_beta_start,
                beta_end=hp.per_beta_end,
                beta_steps=self._beta_steps(),
                eps=hp.per_eps,
                seed=hp.seed,
            )
            self.replay.add(n)

    def _beta_steps(self) -> int:
        if self.hparams.per_beta_steps is not None:
            return self.hparams.per_beta_steps
        trainer = self.trainer
        if trainer is None or trainer.max_steps < 1:
            raise ConfigError(
                "data.per_beta_steps is needed when the trainer has no max_steps (β anneals over "
                "the stage's max_steps by default)"
            )
        return trainer.max_steps

    def batches_per_epoch(self, world_size: int) -> int:
        return self.hparams.steps_per_epoch

    def draw_batch(self, n: int, rank: int, world_size: int) -> dict[str, Tensor]:
        rng = np.random.default_rng((self.hparams.seed, rank, n))
        return draw_transitions(
            self.transitions(), self.bank, self.hparams.batch_size, rng, self.replay
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.replay is not None and "replay" in state_dict:
            self.replay.load_state_dict(state_dict["replay"])
