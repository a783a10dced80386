"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the Distiller: shard, gather, load.

``DistillConfig(sharding="fsdp")`` shards the student, its EMA copy, the fake score, the GAN
head and the teacher over the processes of the default group instead of replicating them with
DistributedDataParallel, so networks whose weights and AdamW states do not fit one device train.
Each attention/residual block (:class:`~dmdcopy.nets.layers.UNetBlock`,
:class:`~dmdcopy.nets.edm2.Block`) is one FSDP unit, then the whole network (an MLP is one
unit), so a UNet's forward all-gathers one block's weights at a time.

Checkpoints stay the run format of :mod:`dmdcopy.io.run_checkpoint`: every process takes part in
gathering each tensor (:func:`full_state`, :func:`full_optimizer_state`) and rank 0 writes the
full tensors, so one file holds the run and its ``student/`` or ``ema/`` entry converts to a
single safetensors student for ``dmdcopy delta-e`` like a DDP run's. Loading scatters the full
tensors back into the shards (:func:`load_full_state`, :func:`load_full_optimizer_state`); on the
same process count the local shards are the ones saved, bit for bit. The gathered state passes
through host memory one tensor at a time (each rank holds the full copy of the state on the CPU
while a checkpoint is written); per-rank sharded files (``torch.distributed.checkpoint``) are not
built.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dmdcopy.errors import ConfigError

__all__ = [
    "broadcast_from_rank0",
    "fsdp_units",
    "full_optimizer_state",
    "full_state",
    "is_sharded",
    "load_full_optimizer_state",
    "load_full_state",
    "meta_copy",
    "shard",
    "unsharded_copy",
]


def _block_types() -> tuple[type, ...]:
    # modules whose forward is called (FSDP gathers a unit in its forward's pre-hook); the MLP's
    # blocks are ModuleDicts read by the MLP's own forward, so an MLP is one unit
    from dmdcopy.nets.edm2 import Block
    from dmdcopy.nets.layers import UNetBlock

    return (UNetBlock, Block)


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own (residual / attention blocks), outermost first;
    the network itself is the last unit and is not in the list."""
    kinds = _block_types()
    units, inside = [], set()
    for m in module.modules():
        if m is module or id(m) in inside:
            continue
        if isinstance(m, kinds):
            units.append(m)
            inside.update(id(s) for s in m.modules())
    return units


def broadcast_from_rank0(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers (as DistributedDataParallel does when it
    wraps a module); no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no storage): the
    architecture, to fill with gathered weights later (:func:`unsharded_copy`)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def shard(module: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each block of ``module`` and then ``module`` over the default group's
    processes (in place; returns ``module``). Needs ``torch.distributed`` initialised."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("sharding='fsdp' needs torch.distributed initialised (torchrun with "
                          "dmdcopy.distill.init_from_env(), or init_process_group); use 'ddp' otherwise")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in fsdp_units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` holds FSDP-sharded (DTensor) parameters."""
    return module is not None and any(isinstance(p, DTensor) for p in module.parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a DTensor: every process must call)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shard gathered into a full CPU tensor (every process
    calls; every process gets the result)."""
    return {k: _full(v) for k, v in module.state_dict().items()}


def _like(full: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``current``: this process's shard when ``current`` is a DTensor."""
    if isinstance(current, DTensor):
        return distribute_tensor(full.to(current.device, current.dtype), current.device_mesh,
                                 current.placements, src_data_rank=None)  # every rank has ``full``
    return full


def load_full_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (full tensors, e.g. read from a checkpoint) as shards laid out like ``module``'s
    own state dict, ready for ``load_state_dict``; keys ``module`` does not have pass unchanged."""
    current = module.state_dict()
    return {k: (_like(v, current[k]) if k in current else v) for k, v in state.items()}


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with the moments of sharded parameters gathered into full CPU tensors
    (every process calls)."""
    sd = opt.state_dict()
    state = {pid: {k: (_full(v) if isinstance(v, DTensor) else v) for k, v in st.items()}
             for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, sd: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimiser state (:func:`full_optimizer_state`, read back) with each moment laid out
    like its parameter (this process's shard), ready for ``opt.load_state_dict``."""
    params = _params(opt)
    state = {}
    for pid, st in sd["state"].items():
        p = params[int(pid)]
        state[pid] = {k: (_like(v, p.data) if isinstance(v, torch.Tensor) and isinstance(p, DTensor)
                          and tuple(v.shape) == tuple(p.shape) else v) for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def unsharded_copy(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain CPU module: ``template`` (a :func:`meta_copy`) filled with the full ``state``."""
    module = copy.deepcopy(template).to_empty(device="cpu")
    module.load_state_dict(dict(state), strict=True)
    return module
