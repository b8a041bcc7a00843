"""Stage 3: batch-constrained Q-learning over skill latents (reference §1.5, §1.6; decisions 2-4).

Glossary: N transitions, B batch, K bank samples per next state, S state dim, Z latent dim,
H skill horizon.

A transition is one skill window: ``s_t``, the VAE's latent ``z_t`` of the window, the chunk reward
``R_t = Σ_{k<H} γ^k r_{t+k}``, the bootstrap state ``s_{t+H}`` and ``done`` (the episode terminated
inside the window). The max over next latents runs over K prior samples at ``s_{t+H}`` drawn once,
offline, into the latent bank (:mod:`ldcq.stages.latent_bank`). The transitions and their
DataModule live beside the other latent DataModules, in :mod:`ldcq.stages.latent_data`.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import Tensor

from ldcq.data.normalizer import Normalizer
from ldcq.errors import ConfigError
from ldcq.models import TwinQ
from ldcq.models.compiled import CompiledOrEager
from ldcq.stages.common import (
    check_flags,
    check_positive,
    fit_normalizer_from_datamodule,
    training_noise,
)


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
        compile: score the bank latents with ``torch.compile``d target nets (the hot path:
            B×K latents through two heads each step); a backend that cannot compile falls back
            to eager with one warning.
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
        compile: bool = False,
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
        check_flags("model", compile=compile)
        self.save_hyperparameters()
        self.q = TwinQ(state_dim, latent_dim, hidden_dim, latent_hidden)
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)
        self.state_normalizer = Normalizer(state_dim)
        self._target_score = CompiledOrEager(self.target_q, "score", "latent_bcq.model.compile")
        self._target_score.enabled = compile

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
        next_q1, next_q2 = self._target_score(
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
