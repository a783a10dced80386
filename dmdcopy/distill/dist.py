"""torch.distributed glue: who am I, reduce metrics, wrap modules in DDP.

The distiller never starts a process group itself; ``torchrun`` (or a test spawning processes)
does, and :func:`init_from_env` is the one-liner for scripts: it initialises the default group from
torchrun's environment variables when ``WORLD_SIZE > 1``; :func:`process_group_from_env` does the
same for a block and also ends the group it started.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dmdcopy.contracts import dist_rank_world
from dmdcopy.errors import ConfigError

__all__ = ["DistInfo", "all_reduce_mean", "all_true", "dist_info", "init_from_env", "process_group_from_env",
           "wrap_ddp"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process's CUDA device on its node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank, world size and local rank (torchrun's ``LOCAL_RANK``, the CUDA device index) of this
    process (``DistInfo()`` without a process group)."""
    rank, world = dist_rank_world()
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def launched_world_size() -> int:
    """The process count a launcher (torchrun) announced in ``WORLD_SIZE``; 1 when unset."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} in the environment: expected a process count >= 1")
    return world


def check_launch(info: DistInfo) -> None:
    """Refuse a process that torchrun started as one of several but that joined no process group:
    each would train alone on the whole batch, and all would write the same run directory."""
    world = launched_world_size()
    if world > 1 and not info.distributed:
        raise ConfigError(f"WORLD_SIZE={world} (torchrun) but torch.distributed has no process group: "
                          "call dmdcopy.distill.init_from_env() first, or build the Distiller inside "
                          "`with dmdcopy.distill.process_group_from_env():`")


def init_from_env(backend: str | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's variables if ``WORLD_SIZE > 1``.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise.
    """
    if launched_world_size() > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    info = dist_info()
    if info.distributed and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


@contextlib.contextmanager
def process_group_from_env(backend: str | None = None):
    """:func:`init_from_env` for a ``with`` block; a group it started is destroyed when the block
    ends normally, after every rank has reached the end (so no rank exits while rank 0 still writes).

    Put the :class:`~dmdcopy.distill.Distiller` inside a function called in the block, so it is gone
    by then: a group that outlives ``destroy_process_group`` through live DDP wrappers is torn down
    during interpreter shutdown instead, where gloo can abort the process (exit by SIGABRT after the
    work is done). A block left by an exception keeps the group (a barrier would wait for ranks that
    are still working); the process is ending anyway.
    """
    started = not (dist.is_available() and dist.is_initialized())
    info = init_from_env(backend)
    yield info
    if started and dist.is_initialized():
        gc.collect()  # networks kept alive only by reference cycles release the group now
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(values: Sequence[float], device: torch.device) -> list[float]:
    """Mean of each value over processes (identity without a process group)."""
    info = dist_info()
    if not info.distributed or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every process iff ``flag`` is true on every process."""
    info = dist_info()
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` under a process group, else ``module`` itself."""
    if not dist_info().distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
