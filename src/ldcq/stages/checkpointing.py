"""``last.ckpt``: written so that a stage resumed from it ends as if it had never stopped.

What a resumed stage needs and where it lives in the checkpoint:

- weights, the EMA denoiser and the target nets (module state_dict), the optimizer, and the loop
  counters (global step, batches per epoch): Lightning's own state;
- the number of batches drawn and the prioritized replay (sum tree, β's step count, largest
  priority): the DataModule's ``state_dict`` (:mod:`ldcq.data.batches`);
- the latest value of every logged metric, the weights of the best validation so far (when the
  stage hands on its best weights), and the machine and libraries that wrote the checkpoint:
  this callback's state.

No random-number-generator state is needed: every draw of a step is a function of the seed, the
rank and the batch number (:func:`ldcq.stages.common.training_noise`).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from ldcq.artifacts import atomic_path

CHECKPOINT_NAME = "last.ckpt"


def environment(trainer: L.Trainer) -> dict[str, Any]:
    """What a CPU run's bits depend on besides the seed, the config and the checkpoint."""
    return {
        "world_size": trainer.world_size,
        "accelerator": trainer.strategy.root_device.type,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": str(torch.__version__),
        "lightning": str(L.__version__),
        "numpy": str(np.__version__),
    }


def inexact_reasons(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why a run resumed in ``now`` from a checkpoint written in ``saved`` may differ in its
    last bits from an uninterrupted run; empty when it cannot."""
    reasons = [
        f"{key} was {saved.get(key)!r} when the checkpoint was written, now {value!r}"
        for key, value in now.items()
        if saved.get(key) != value
    ]
    if now["accelerator"] != "cpu" and not now["deterministic"]:
        reasons.append(
            f"{now['accelerator']} kernels are not deterministic (set trainer.deterministic=true)"
        )
    return reasons


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


class ResumableCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_steps`` optimizer steps, atomically.

    A step followed by validation is saved after it, never before: Lightning resumes a checkpoint
    saved at the end of a training batch without running the validation due at that batch. The
    callback also keeps ``metrics``, the latest value of every logged scalar, across resumes
    (what ``metrics.json`` holds), ``resumes``: one record per resume of the stage, with the
    step it resumed from and whether the result can still equal an uninterrupted run, and with
    ``monitor`` set, ``best``: the step, value and weights of the validation where ``monitor``
    was lowest.

    Args:
        dirpath: the stage's work folder.
        every_n_steps: optimizer steps between checkpoints.
        stage: the stage's name, for messages.
        say: prints one message (global rank 0 only); default: ``print``.
        monitor: a validation metric to keep the best weights of (lower is better), or None.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int,
        stage: str,
        say: Callable[[str], None] = print,
        monitor: str | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.stage, self.say, self.monitor = stage, say, monitor
        self.best: dict[str, Any] | None = None
        self.metrics: dict[str, float] = {}
        self.resumes: list[dict[str, Any]] = []
        self._environment: dict[str, Any] = {}
        self._loaded: dict[str, Any] | None = None
        self._pending = False
        self._step = 0

    @property
    def path(self) -> Path:
        return self.dirpath / CHECKPOINT_NAME

    @property
    def exact(self) -> bool:
        """False once any resume of this stage could not be exact."""
        return all(r["exact"] for r in self.resumes)

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self._step,
            "metrics": dict(self.metrics),
            "environment": dict(self._environment),
            "resumes": [dict(r) for r in self.resumes],
            "best": self.best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = dict(state_dict["metrics"])
        self.best = state_dict.get("best")
        self.resumes = [dict(r) for r in state_dict["resumes"]]
        self._loaded = state_dict

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._environment = environment(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Called after the callbacks' states are loaded, before the loops' (so not global_step).
        if self._loaded is None:
            return
        reasons = inexact_reasons(self._loaded["environment"], self._environment)
        step = int(self._loaded["global_step"])
        self.resumes.append({"from_step": step, "exact": not reasons, "reasons": reasons})
        self._loaded = None
        if trainer.is_global_zero:
            if reasons:
                self.say(
                    f"{self.stage}: resumed from step {step}, not exactly: {'; '.join(reasons)}. "
                    f"The result may differ from an uninterrupted run; spec.json records it"
                )
            else:
                self.say(
                    f"{self.stage}: resumed from step {step} exactly (same machine and libraries)"
                )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._remember(trainer)
        due = trainer.global_step % self.every_n_steps == 0
        if not (due or self._pending):
            return
        if _validation_follows(trainer):
            self._pending = True
        else:
            # A save deferred to a validation that never ran its hooks (no batches) lands here.
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._remember(trainer)
        self._keep_best(trainer, pl_module)
        if self._pending:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remember(trainer)

    def _keep_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if value is None or (self.best is not None and float(value) >= self.best["value"]):
            return
        weights = {k: t.detach().cpu().clone() for k, t in pl_module.state_dict().items()}
        self.best = {"step": trainer.global_step, "value": float(value), "state_dict": weights}

    def _remember(self, trainer: L.Trainer) -> None:
        for key, value in trainer.callback_metrics.items():
            if value.numel() == 1:
                self.metrics[key] = float(value)

    def _save(self, trainer: L.Trainer) -> None:
        self._pending, self._step = False, trainer.global_step
        # Every rank calls save_checkpoint; rank 0 writes, and renames the file into place.
        target = atomic_path(self.path, fsync=True) if trainer.is_global_zero else None
        with target or contextlib.nullcontext(self.path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier("ResumableCheckpoint")
