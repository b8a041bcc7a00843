"""Training guards: stop a stage whose loss is no longer finite, before it checkpoints garbage."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ldcq.errors import LdcqError
from ldcq.stages.checkpointing import ResumableCheckpoint


class NonFiniteLossError(LdcqError):
    """A training loss became NaN or inf."""


def _last_checkpoint(trainer: L.Trainer) -> str:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ResumableCheckpoint):
            candidates = [str(cb.path)]
        elif isinstance(cb, ModelCheckpoint):
            candidates = [cb.last_model_path, cb.best_model_path]
            if cb.dirpath:
                candidates.append(str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}.ckpt"))
        else:
            continue
        for path in candidates:
            if path and Path(path).is_file():
                return f"the last good checkpoint is {path}"
    return "no checkpoint was saved before it"


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` naming the stage, the first bad global step and the last
    good checkpoint when the training loss is NaN or inf.

    The check is kept on the loss's device and read back every ``check_every_n_steps`` steps
    (default: every step on CPU, where reading it costs nothing, every 100 steps on an accelerator,
    which is then not synchronized at each step) and before every checkpoint, so no checkpoint is
    written after the loss went bad. Under DDP the ranks agree before raising, so none is left
    waiting in a collective.
    """

    def __init__(
        self, stage: str, lr_key: str = "", check_every_n_steps: int | None = None
    ) -> None:
        self.stage = stage
        self.lr_key = lr_key or f"{stage}.model.lr"
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: torch.Tensor | None = None  # (2,): global step, loss value; step -1: none

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float().reshape(-1)[:1]
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        # The step this loss was computed at: global_step has already counted its update.
        step = torch.tensor([float(max(trainer.global_step - 1, 0))], device=loss.device)
        record = (self._first_bad[:1] < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(record, torch.cat([step, loss]), self._first_bad)
        every = self.check_every_n_steps or (1 if loss.device.type == "cpu" else 100)
        if trainer.global_step % every == 0:
            self._check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.training:
            self._check(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        bad = self._first_bad is not None and bool(self._first_bad[0] >= 0)
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        step, value = self._first_bad.tolist() if bad else (trainer.global_step, float("nan"))
        raise NonFiniteLossError(
            f"{self.stage}: the training loss became {value} at global step {int(step)}; "
            f"{_last_checkpoint(trainer)}. Lower the learning rate ({self.lr_key}) or check "
            f"the data, then rerun (finished stages are kept)"
        )
