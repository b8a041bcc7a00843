"""Stage 3: batch-constrained Q-learning over skill latents (reference §1.5, §1.6; decisions 2-4).

Glossary: N transitions, B batch, K bank samples per next state, S state dim, Z latent dim,
H skill horizon.

A transition is one skill window: ``s_t``, the VAE's latent ``z_t`` of the window, the chunk reward
``R_t = Σ_{k<H} γ^k r_{t+k}``, the bootstrap state ``s_{t+H}`` and ``done`` (the episode terminated
inside the window). The max over next latents runs over K prior samples at ``s_{t+H}`` drawn once,
offline, into the latent bank (:mod:`ldcq.stages.latent_bank`).
"""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ldcq.artifacts import ArtifactError
from ldcq.data.datamodules import load_episodes
from ldcq.data.normalizer import Normalizer
from ldcq.data.windows import make_windows
from ldcq.errors import ConfigError
from ldcq.models import TwinQ
from ldcq.stages.common import check_positive, fit_normalizer_from_datamodule, training_noise
from ldcq.stages.latent_bank import open_bank
from ldcq.stages.latent_data import FrozenVAEDataModule, cached_latents
from ldcq.stages.replay import PrioritizedReplay


def q_target(
    rewards: Tensor, dones: Tensor, next_q1: Tensor, next_q2: Tensor, discount: float
) -> tuple[Tensor, Tensor]:
    """Clipped double-Q targets over K candidate next latents, one per online net.

    For online net i, z* = argmax_k of the *other* net's target Q, and the bootstrap value is
    min(Q1_targ, Q2_targ) at z*: ``y_i = R + discount·(1 − done)·min(Q1, Q2)(s', z*_i)``.

    Args:
        rewards, dones: (B,); dones in {0, 1}.
        next_q1, next_q2: target nets' values at the next state, (B, K).
        discount: γ^H for an H-step transition (decision 2).

    Returns:
        ``(y1, y2)``, each (B,).
    """
    next_min = torch.minimum(next_q1, next_q2)
    pick1 = next_q2.argmax(dim=1, keepdim=True)
    pick2 = next_q1.argmax(dim=1, keepdim=True)
    bootstrap = discount * (1.0 - dones)
    y1 = rewards + bootstrap * next_min.gather(1, pick1).squeeze(1)
    y2 = rewards + bootstrap * next_min.gather(1, pick2).squeeze(1)
    return y1, y2


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


class LatentBCQ(L.LightningModule):
    """Twin Q(s, z) trained on H-step transitions with the Bellman max over bank latents.

    Batches: see :class:`TransitionBatches`; states are raw and normalized inside (the statistics
    are buffers fitted by the DataModule on s_t ∪ s_{t+H}).

    Args:
        state_dim, latent_dim, horizon: S, Z and H, linked from the data (the VAE's spec).
        hidden_dim, latent_hidden: widths of the Q networks' state and latent branches.
        gamma: per-step discount; the bootstrap uses γ^H.
        lr: Adam learning rate (one Adam over both nets: they share no parameter).
        tau: Polyak rate of the target nets, applied every optimizer step.
        grad_clip: gradient-norm clip, applied to each net separately.
        num_bank_samples: bank columns used per row and step, a fresh random subset per row
            (the official code used one subset for the whole batch, §4.1.12); None = all K.
        terminal_on_reward: treat a positive chunk reward as terminal (the official maze trick).
        reward_scale: multiplies the chunk rewards (the official locomotion code used 0.1).
    """

    def __init__(
        self,
        state_dim: int = 0,
        latent_dim: int = 0,
        horizon: int = 30,
        hidden_dim: int = 256,
        latent_hidden: int = 128,
        gamma: float = 0.995,
        lr: float = 1e-3,
        tau: float = 0.005,
        grad_clip: float = 1.0,
        num_bank_samples: int | None = None,
        terminal_on_reward: bool = False,
        reward_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive(
            "model",
            state_dim=state_dim,
            latent_dim=latent_dim,
            horizon=horizon,
            hidden_dim=hidden_dim,
            latent_hidden=latent_hidden,
            lr=lr,
            tau=tau,
            grad_clip=grad_clip,
            reward_scale=reward_scale,
        )
        if not 0.0 < gamma <= 1.0:
            raise ConfigError(f"model.gamma={gamma!r}: must be in (0, 1]")
        if tau > 1.0:
            raise ConfigError(f"model.tau={tau!r}: must be in (0, 1]")
        if num_bank_samples is not None:
            check_positive("model", num_bank_samples=num_bank_samples)
        self.save_hyperparameters()
        self.q = TwinQ(state_dim, latent_dim, hidden_dim, latent_hidden)
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)
        self.state_normalizer = Normalizer(state_dim)

    def on_fit_start(self) -> None:
        fit_normalizer_from_datamodule(self, self.state_normalizer, "state_normalizer")
        dm, hp = self.trainer.datamodule, self.hparams
        expected = {
            "state_dim": hp.state_dim,
            "latent_dim": hp.latent_dim,
            "horizon": hp.horizon,
            "gamma": hp.gamma,
        }
        got = {k: getattr(dm, k, None) or getattr(dm.hparams, k, None) for k in expected}
        wrong = [
            f"model.{k}={v!r} vs data {got[k]!r}"
            for k, v in expected.items()
            if got[k] is not None and got[k] != v
        ]
        if wrong:
            raise ConfigError(f"the model does not fit its data ({', '.join(wrong)}); link them")
        k = getattr(dm, "bank_samples", None)
        if hp.num_bank_samples is not None and k is not None and hp.num_bank_samples > k:
            raise ConfigError(
                f"model.num_bank_samples={hp.num_bank_samples} exceeds the bank's K={k}: lower it "
                f"or generate a larger bank"
            )

    @torch.no_grad()
    def score(self, states: Tensor, latents: Tensor) -> Tensor:
        """min(Q1, Q2) of raw ``states (N, S)`` and ``latents (N, K, Z)`` -> (N, K)."""
        return self.q.score_min(self.state_normalizer(states), latents)

    def _bank_columns(self, bank: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``bank (B, K, Z)`` -> ``(B, k, Z)``: a random subset of columns, drawn per row."""
        k = self.hparams.num_bank_samples
        if k is None or k >= bank.shape[1]:
            return bank
        draws = torch.rand(bank.shape[:2], generator=generator, device=bank.device)
        cols = draws.argsort(dim=1)[:, :k]
        return bank.gather(1, cols[..., None].expand(-1, -1, bank.shape[2]))

    @torch.no_grad()
    def td_targets(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-net targets ``(y1, y2)`` (B,) from the target nets over the batch's bank rows;
        ``generator`` draws the bank columns when ``num_bank_samples`` < K."""
        hp = self.hparams
        rewards = batch["rewards"] * hp.reward_scale
        dones = batch["dones"]
        if hp.terminal_on_reward:
            dones = torch.maximum(dones, (rewards > 0).to(dones.dtype))
        # TwinQ.score runs each target net's state branch once per next state, not once per latent.
        next_q1, next_q2 = self.target_q.score(
            self.state_normalizer(batch["next_states"]),
            self._bank_columns(batch["bank"], generator),
        )
        return q_target(rewards, dones, next_q1.float(), next_q2.float(), hp.gamma**hp.horizon)

    def losses(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Importance-weighted squared TD errors of both nets, weighted per sample (§4.1.1)."""
        y1, y2 = self.td_targets(batch, generator)
        q1, q2 = self.q(self.state_normalizer(batch["states"]), batch["latents"])
        d1, d2 = q1.float() - y1, q2.float() - y2
        w = batch["weights"]
        loss1, loss2 = (w * d1.square()).mean(), (w * d2.square()).mean()
        return {
            "loss": loss1 + loss2,
            "q_loss": (loss1 + loss2).detach() / 2,
            "q_mean": (q1 + q2).detach().float().mean() / 2,
            "target_mean": (y1 + y2).mean() / 2,
            "td_abs": (d1.abs() + d2.abs()).detach().mean() / 2,
            "priority": (d1.square() + d2.square()).detach() / 2,
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.losses(batch, training_noise(self))
        self._update_priorities(batch["index"], out["priority"])
        logs = {f"train/{k}": out[k] for k in ("q_loss", "q_mean", "target_mean", "td_abs")}
        self.log_dict(logs, batch_size=len(batch["index"]))
        return out["loss"]

    def _update_priorities(self, index: Tensor, priority: Tensor) -> None:
        replay = getattr(self.trainer.datamodule, "replay", None)
        if replay is None:
            return
        # Every rank applies every rank's updates, so the ranks' sum trees stay identical.
        index, priority = self.all_gather(index), self.all_gather(priority)
        replay.update(index.reshape(-1).cpu().numpy(), priority.reshape(-1).cpu().numpy())

    def on_before_optimizer_step(self, optimizer) -> None:
        # Per net, as the official two-optimizer code; here gradients are already unscaled.
        for net in (self.q.q1, self.q.q2):
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.hparams.grad_clip)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            online, target = list(self.q.parameters()), list(self.target_q.parameters())
            torch._foreach_lerp_(target, online, self.hparams.tau)

    def configure_optimizers(self):
        return torch.optim.Adam(self.q.parameters(), lr=self.hparams.lr)
