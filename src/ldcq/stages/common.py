"""Small pieces shared by the three stages."""

from __future__ import annotations

import lightning as L
import torch

from ldcq.data.batches import seeded_generator
from ldcq.data.normalizer import Normalizer
from ldcq.errors import ConfigError


def check_positive(section: str, allow_zero: bool = False, **values: float) -> None:
    """Raise one :class:`ConfigError` naming every key whose value is out of range."""
    bad = {
        k: v
        for k, v in values.items()
        if isinstance(v, bool)
        or not isinstance(v, int | float)
        or not (v >= 0 if allow_zero else v > 0)
    }
    if bad:
        need = ">= 0" if allow_zero else "> 0"
        listed = ", ".join(f"{section}.{k}={v!r}" for k, v in bad.items())
        raise ConfigError(f"{listed}: must be {need}")


def check_flags(section: str, **values: object) -> None:
    """Raise one :class:`ConfigError` naming every key whose value is not a boolean (a string
    such as ``"false"`` is truthy, so it must not pass for one)."""
    bad = {k: v for k, v in values.items() if not isinstance(v, bool)}
    if bad:
        listed = ", ".join(f"{section}.{k}={v!r}" for k, v in bad.items())
        raise ConfigError(f"{listed}: must be true or false")


def fit_normalizer_from_datamodule(module: L.LightningModule, normalizer: Normalizer, name: str):
    """Copy statistics the DataModule computed on its training split into ``normalizer``.

    The statistics are a pure function of the data and the split, so doing this again on a
    resumed run reproduces the checkpointed buffers exactly.
    """
    datamodule = getattr(module.trainer, "datamodule", None)
    source = getattr(datamodule, name, None)
    if source is None:
        raise ConfigError(
            f"{type(module).__name__} needs a DataModule that provides {name!r} statistics"
        )
    normalizer.load_state_dict(source.state_dict())


_TRAINING, _VALIDATION = 0, 1


def training_noise(module: L.LightningModule) -> torch.Generator:
    """The generator of the random draws of the training batch being computed.

    Seeded from the process seed (``seed_everything``), the rank and the batch's number counted
    across epochs, which Lightning restores on resume: a resumed stage draws the noise an
    uninterrupted one would, whatever validation or anything else drew before.
    """
    batch = module.trainer.fit_loop.total_batch_idx
    return seeded_generator(
        module.device, torch.initial_seed(), module.global_rank, _TRAINING, batch
    )


def validation_noise(module: L.LightningModule, batch_idx: int) -> torch.Generator:
    """The generator of validation batch ``batch_idx`` at the current global step: validation is a
    function of the weights and the step, and draws nothing from the training noise."""
    return seeded_generator(
        module.device,
        torch.initial_seed(),
        module.global_rank,
        _VALIDATION,
        module.global_step,
        batch_idx,
    )
