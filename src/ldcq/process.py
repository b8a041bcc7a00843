"""This process: its rank under DDP (known before any Trainer starts), waiting for the other
ranks, one line of output from rank 0, and the library notices it keeps out of that output."""

from __future__ import annotations

import logging
import warnings

import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console

_console = Console(stderr=True)


def global_rank() -> int:
    """This process's rank (from the launcher's environment; 0 without DDP)."""
    return getattr(rank_zero_only, "rank", 0)


def barrier() -> None:
    """Wait for every rank; nothing to do in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def say(msg: str) -> None:
    """One ``ldcq …`` line on stderr, from global rank 0 only."""
    if global_rank() == 0:
        _console.print(f"[bold cyan]ldcq[/] {msg}")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def drop_library_notices() -> None:
    """Hide two Lightning notices that say nothing about the run: its advert for a cloud logger,
    and a deprecation that the pinned torch raises inside Lightning's own code."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
