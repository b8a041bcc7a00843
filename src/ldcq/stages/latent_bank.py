"""The latent sample bank: K prior samples z' ~ p(z | s_{t+H}) per transition (reference §1.5, §4.3).

Glossary: N transitions, B rows per batch, K samples per row, S state dim, Z latent dim.

The Bellman max of stage 3 runs over these samples, so they are drawn once, offline, instead of
sampling the diffusion prior inside every Q update. Layout of ``<bank_dir>``:

- ``chunks/<request>/rank{r}-{first:09d}.npy`` ``(B, K, Z)`` float16 and ``….idx.npy`` ``(B,)``:
  what rank r computed for the rows listed in the index file. Each file is written to a temporary
  name and renamed into place; the index file is renamed last, so it marks a finished chunk.
  ``<request>`` hashes the prior's weights, the states and every sampling setting: chunks of
  another request are never mixed in.
- ``bank.npy`` ``(N, K, Z)`` float16 (2·Z bytes per sample) and ``bank.json``: the consolidated
  bank, written by global rank 0 once every row has a chunk; the chunks are then removed.

Rows are cut into blocks aligned on multiples of the batch size and the noise of each block is
seeded from ``(seed, first row)``, so the bank does not depend on the number of ranks or on how
often generation was interrupted and resumed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ldcq.artifacts import ArtifactError, atomic_path, atomic_write_text
from ldcq.errors import ConfigError
from ldcq.models import SAMPLERS
from ldcq.stages.common import check_flags, check_positive

BANK_FILE = "bank.npy"
META_FILE = "bank.json"
CHUNK_DIR = "chunks"
_INDEX_SUFFIX = ".idx.npy"


def block_seed(seed: int, first_index: int) -> int:
    """A 63-bit generator seed for the block starting at row ``first_index``."""
    words = np.random.SeedSequence([seed, first_index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def check_sampler_settings(
    section: str,
    sampler: str | None = None,
    sampling_steps: int | None = None,
    extra_steps: int | None = None,
) -> None:
    """How ``section`` samples the prior, each value named by its pipeline key when wrong; a
    None is not checked (the evaluation's null means "the prior's own", checked with the prior)."""
    if sampling_steps is not None:
        check_positive(section, sampling_steps=sampling_steps)
    if extra_steps is not None:
        check_positive(section, allow_zero=True, extra_steps=extra_steps)
    if sampler is not None and sampler not in SAMPLERS:
        raise ConfigError(f"{section}.sampler={sampler!r}: valid samplers are {list(SAMPLERS)}")


def check_bank_settings(
    num_samples: int,
    sampler: str,
    sampling_steps: int,
    extra_steps: int,
    batch_size: int | None = None,
    compile: bool = False,
) -> None:
    """The values of the ``latent_bank`` section, each named by its pipeline key when wrong."""
    check_flags("latent_bank", compile=compile)
    check_positive("latent_bank", num_samples=num_samples)
    if batch_size is not None:
        check_positive("latent_bank", batch_size=batch_size)
    check_sampler_settings("latent_bank", sampler, sampling_steps, extra_steps)


class PriorSampler(L.LightningModule):
    """Predict-only wrapper of a frozen :class:`~ldcq.stages.diffusion_prior.LatentDiffusionPrior`.

    ``predict_step({"index": (B,) long, "next_states": (B, S) raw})`` returns
    ``(index (B,), samples (B, K, Z) float16)``, raw (unnormalized) latents.
    """

    def __init__(
        self,
        prior: nn.Module,
        num_samples: int,
        sampler: str = "ddim",
        sampling_steps: int = 10,
        extra_steps: int = 0,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_bank_settings(num_samples, sampler, sampling_steps, extra_steps)
        self.prior = prior.eval().requires_grad_(False)
        self.num_samples, self.sampler = num_samples, sampler
        self.sampling_steps, self.extra_steps, self.seed = sampling_steps, extra_steps, seed
        # One compiled denoiser for every batch: it compiles once per batch shape.
        self.denoiser = prior.compiled_denoiser("latent_bank.compile") if compile else None

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> tuple[Tensor, Tensor]:
        index, states = batch["index"], batch["next_states"]
        if index.numel() == 0:
            return index, states.new_zeros((0, self.num_samples, self.prior.hparams.latent_dim))
        generator = torch.Generator(device=states.device)
        generator.manual_seed(block_seed(self.seed, int(index[0])))
        samples = self.prior.sample(
            states,
            self.num_samples,
            sampler=self.sampler,
            sampling_steps=self.sampling_steps,
            extra_steps=self.extra_steps,
            generator=generator,
            denoiser=self.denoiser,
        ).to(torch.float16)
        if not torch.isfinite(samples).all():
            raise ArtifactError(
                "the diffusion prior produced non-finite latents (or latents beyond float16's "
                "range); the diffusion_prior artifact is broken: retrain that stage"
            )
        return index, samples


class BankWriter(BasePredictionWriter):
    """Writes each predicted batch as one chunk of this rank under ``chunk_dir``; keeps nothing."""

    def __init__(self, chunk_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.chunk_dir = Path(chunk_dir)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        index, samples = prediction
        if index.numel() == 0:
            return
        write_chunk(self.chunk_dir, trainer.global_rank, index.cpu().numpy(), samples.cpu().numpy())


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_chunk(chunk_dir: Path, rank: int, index: np.ndarray, samples: np.ndarray) -> Path:
    """Write ``samples (B, K, Z)`` for rows ``index (B,)``; the index file last marks it finished."""
    chunk_dir.mkdir(parents=True, exist_ok=True)
    stem = f"rank{rank}-{int(index[0]):09d}"
    _atomic_save(chunk_dir / f"{stem}.npy", np.ascontiguousarray(samples, dtype=np.float16))
    _atomic_save(chunk_dir / f"{stem}{_INDEX_SUFFIX}", np.asarray(index, dtype=np.int64))
    return chunk_dir / f"{stem}.npy"


def finished_chunks(chunk_dir: Path) -> list[tuple[Path, Path]]:
    """``(samples file, index file)`` of every finished chunk, in name order."""
    if not chunk_dir.is_dir():
        return []
    pairs = []
    for index_file in sorted(chunk_dir.glob(f"*{_INDEX_SUFFIX}")):
        samples_file = index_file.with_name(index_file.name[: -len(_INDEX_SUFFIX)] + ".npy")
        if samples_file.is_file():
            pairs.append((samples_file, index_file))
    return pairs


def missing_rows(chunk_dir: str | Path, num_rows: int) -> np.ndarray:
    """Sorted rows in ``[0, num_rows)`` that no finished chunk of ``chunk_dir`` covers."""
    covered = np.zeros(num_rows, dtype=bool)
    for _, index_file in finished_chunks(Path(chunk_dir)):
        covered[np.load(index_file)] = True
    return np.flatnonzero(~covered)


def plan_blocks(rows: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Split sorted ``rows`` into blocks of at most ``block_size`` aligned on its multiples.

    Alignment keeps a row in the same block (hence the same noise seed) whatever was already done.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows // block_size)) + 1
    return np.split(rows, cuts)


class _Blocks(Dataset):
    """Item ``i`` is a whole batch: ``{"index": (B,), "next_states": (B, S)}`` of block ``i``."""

    def __init__(self, next_states: Tensor, blocks: list[np.ndarray]) -> None:
        self.next_states, self.blocks = next_states, blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        index = torch.from_numpy(self.blocks[i])
        return {"index": index, "next_states": self.next_states[index]}


def _only_item(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return items[0]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _request(prior: nn.Module, next_states: Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """What the bank is a function of; its hash names the chunk folder."""
    weights = prior.state_dict()
    weights_digest = _digest(*(weights[k].detach().cpu().numpy() for k in sorted(weights)))
    request = {
        **settings,
        "shape": [int(next_states.shape[0]), settings["num_samples"], settings["latent_dim"]],
        "prior": weights_digest[:16],
        "next_states": _digest(next_states.detach().cpu().numpy())[:16],
    }
    request["id"] = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    return request


def consolidate(chunk_dir: Path, bank_path: Path, shape: tuple[int, int, int]) -> Path:
    """Copy every finished chunk into a new (N, K, Z) float16 file beside ``bank_path``, one chunk
    at a time; returns that temporary file, for the caller to rename into place."""
    tmp = bank_path.with_name(f"{bank_path.name}.tmp-{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    try:
        # Reserve the blocks now: a full disk then fails here, not later with SIGBUS on a write.
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
    except OSError as exc:
        # Any other error: a filesystem that cannot reserve, written as it comes.
        if exc.errno == errno.ENOSPC:
            del out
            tmp.unlink(missing_ok=True)
            raise ArtifactError(
                f"the disk is full: the latent bank {bank_path} needs "
                f"{np.prod(shape) * 2 / 2**20:.1f} MiB. Free space and rerun the same command: "
                f"the sampled chunks in {chunk_dir} are kept"
            ) from exc
    covered = np.zeros(shape[0], dtype=bool)
    for samples_file, index_file in finished_chunks(chunk_dir):
        index = np.load(index_file)
        samples = np.load(samples_file, mmap_mode="r")
        if samples.shape != (len(index), *shape[1:]):
            raise ArtifactError(
                f"bank chunk {samples_file} has shape {samples.shape}, expected "
                f"{(len(index), *shape[1:])}; delete {chunk_dir} and rerun"
            )
        contiguous = index.size and index[-1] - index[0] + 1 == index.size
        out[slice(index[0], index[-1] + 1) if contiguous else index] = samples
        covered[index] = True
    if not covered.all():
        raise ArtifactError(
            f"bank chunks in {chunk_dir} miss {int((~covered).sum())} rows; rerun to compute them"
        )
    out.flush()
    del out
    return tmp


def generate_bank(
    prior_module: nn.Module,
    next_states: Tensor,
    bank_dir: str | Path,
    num_samples: int = 100,
    sampler: str = "ddim",
    sampling_steps: int = 10,
    extra_steps: int = 0,
    seed: int = 0,
    batch_size: int = 1024,
    trainer_kwargs: dict[str, Any] | None = None,
    compile: bool = False,
) -> Path:
    """Draw ``num_samples`` (K) latents from the prior at each of ``next_states (N, S)`` (raw).

    Runs ``Trainer(**trainer_kwargs).predict`` over the rows no finished chunk covers yet, so a
    killed run resumes chunk by chunk; under DDP each rank writes its own chunks. Global rank 0 then
    consolidates them into ``<bank_dir>/bank.npy`` (N, K, Z) float16. A finished bank of the same
    request is returned at once.

    Args:
        prior_module: a frozen ``LatentDiffusionPrior`` (its ``hparams`` give S and Z).
        batch_size: rows per predict batch (B·K latents are denoised together).
        trainer_kwargs: ``lightning.Trainer`` arguments (accelerator, devices, strategy, precision).
        compile: sample through the ``torch.compile``d denoiser (eager if compiling fails); how
            the bank is computed, not what it holds, so it is not part of the request.

    Returns:
        The path of ``bank.npy``, on every rank, once it is complete.

    Raises:
        ConfigError: bad sizes, states that do not fit the prior, or a finished bank in
            ``bank_dir`` made by another request.
    """
    check_positive("latent_bank", num_samples=num_samples, batch_size=batch_size)
    state_dim, latent_dim = prior_module.hparams.state_dim, prior_module.hparams.latent_dim
    _check_states(next_states, state_dim)
    bank_dir = Path(bank_dir)
    settings = {"sampler": sampler, "sampling_steps": sampling_steps, "extra_steps": extra_steps}
    request = _request(
        prior_module,
        next_states,
        {"num_samples": num_samples, "latent_dim": latent_dim, **settings, "seed": seed}
        | {"batch_size": batch_size},
    )
    if _finished(bank_dir, request):
        return bank_dir / BANK_FILE
    chunk_dir = bank_dir / CHUNK_DIR / request["id"]
    trainer = _predict_trainer(chunk_dir, trainer_kwargs or {})
    sampler_module = PriorSampler(prior_module, num_samples, **settings, seed=seed, compile=compile)
    loader = _missing_blocks(next_states, chunk_dir, batch_size, trainer.world_size)
    # Called even with nothing left to do: under DDP it is what joins the ranks for the barriers.
    trainer.predict(sampler_module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("bank-chunks")
    if trainer.is_global_zero:
        _consolidate_bank(bank_dir, chunk_dir, request)
    trainer.strategy.barrier("bank-done")
    return bank_dir / BANK_FILE


def _check_states(next_states: Tensor, state_dim: int) -> None:
    if next_states.dim() != 2 or next_states.shape[1] != state_dim:
        raise ConfigError(
            f"next_states of shape {tuple(next_states.shape)} do not fit the diffusion prior "
            f"(S={state_dim}): generate the bank from the same dataset the prior was trained on"
        )


def _predict_trainer(chunk_dir: Path, trainer_kwargs: dict[str, Any]) -> L.Trainer:
    """A predict-only Trainer whose :class:`BankWriter` writes each batch as a chunk."""
    kwargs = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **trainer_kwargs,
    }
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), BankWriter(chunk_dir)]
    return L.Trainer(**kwargs)


def _finished(bank_dir: Path, request: dict[str, Any]) -> bool:
    """True if ``bank_dir`` holds the finished bank of ``request``; refuses another one."""
    bank_path, meta_path = bank_dir / BANK_FILE, bank_dir / META_FILE
    if not bank_path.is_file():
        return False
    previous = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if previous.get("id") == request["id"]:
        return True
    raise ConfigError(
        f"{bank_path} was generated for another prior, other transitions or other sampling "
        f"settings; delete {bank_dir} (or choose another bank folder) to generate it again"
    )


def _missing_blocks(
    next_states: Tensor, chunk_dir: Path, batch_size: int, world_size: int
) -> DataLoader:
    """A loader of one block of rows per batch, over the rows no finished chunk covers."""
    blocks = plan_blocks(missing_rows(chunk_dir, int(next_states.shape[0])), batch_size)
    if 0 < len(blocks) < world_size:
        # Lightning's predict sampler refuses a rank without any batch: give it an empty one.
        blocks += [np.zeros(0, dtype=np.int64)] * (world_size - len(blocks))
    # batch_size=1 (not None) lets Lightning track indices without a warning.
    return DataLoader(
        _Blocks(next_states.detach().cpu(), blocks), batch_size=1, collate_fn=_only_item
    )


def _consolidate_bank(bank_dir: Path, chunk_dir: Path, request: dict[str, Any]) -> None:
    """The chunks into ``bank.npy`` beside ``bank.json`` (global rank 0); the chunks go."""
    bank_path = bank_dir / BANK_FILE
    for stale in bank_dir.glob(f"{BANK_FILE}.tmp-*"):  # left by a consolidation that was killed
        stale.unlink(missing_ok=True)
    tmp = consolidate(chunk_dir, bank_path, tuple(request["shape"]))
    # bank.json goes first: a bank.npy is never seen without the request it answers.
    atomic_write_text(bank_dir / META_FILE, json.dumps(request, indent=2, sort_keys=True))
    os.replace(tmp, bank_path)
    shutil.rmtree(bank_dir / CHUNK_DIR, ignore_errors=True)


def open_bank(path: str | Path) -> np.ndarray:
    """The bank at ``path`` as a read-only memory map ``(N, K, Z)`` float16."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"latent bank {path} does not exist; generate it first (stage latent_bank)"
        )
    try:
        bank = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ArtifactError(
            f"latent bank {path} is unreadable ({exc}); delete it and rerun"
        ) from exc
    if bank.ndim != 3 or bank.dtype != np.float16:
        raise ArtifactError(
            f"latent bank {path} holds {bank.dtype} {bank.shape}, not (N, K, Z) float16; "
            f"delete it and generate it again"
        )
    return bank
