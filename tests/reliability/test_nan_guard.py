"""FiniteLossGuard: a NaN or inf loss stops training naming the step and the last good checkpoint,
and no checkpoint is written after it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ldcq.stages.guards import FiniteLossGuard, NonFiniteLossError


class GoesBad(L.LightningModule):
    """Trains a scalar; its loss is ``bad`` from step ``bad_step`` on."""

    def __init__(self, bad_step: int, bad: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.bad_step, self.bad = bad_step, bad

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch).pow(2).mean()
        return loss * self.bad if self.global_step >= self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(64, 1), batch_size=2)


@pytest.mark.parametrize("check_every", [None, 5])  # every step (CPU) / deferred (accelerators)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_names_step_and_last_good_checkpoint(tmp_path, check_every, bad):
    trainer = L.Trainer(
        max_steps=30,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            FiniteLossGuard("toy", check_every_n_steps=check_every),
            ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2),
        ],
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(GoesBad(bad_step=7, bad=bad))
    message = str(info.value)
    last = tmp_path / "last.ckpt"
    assert message.startswith(f"toy: the training loss became {bad} at global step 7;")
    assert f"the last good checkpoint is {last}" in message and "toy.model.lr" in message
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6
    assert torch.isfinite(checkpoint["state_dict"]["w"]).all()


def test_no_checkpoint_yet_is_said(tmp_path):
    trainer = L.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[FiniteLossGuard("toy", lr_key="--model.lr")],
    )
    with pytest.raises(NonFiniteLossError, match="at global step 0; no checkpoint was saved"):
        trainer.fit(GoesBad(bad_step=0, bad=float("nan")))
