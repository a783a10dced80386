"""Helpers shared by the tests that start torch.distributed process groups."""

import gc
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tcp_rendezvous() -> str:
    """An ``init_method`` on a free TCP port of 127.0.0.1."""
    return f"tcp://127.0.0.1:{free_port()}"


def in_gloo_group(rank: int, world: int, init_method: str, body, *args) -> None:
    """The function to spawn: ``body(rank, *args)`` inside a gloo group of ``world`` processes.

    ``body`` returns before the group is destroyed, and a collection then frees what its reference
    cycles kept (a distiller's DDP wrappers hold the group): a group that outlives
    ``destroy_process_group`` is torn down during interpreter shutdown, where gloo can abort the
    process with SIGABRT after the test's work is done (seen about once in eight runs).
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        body(rank, *args)
        dist.barrier()  # no rank tears down while another still works
    finally:
        gc.collect()
        dist.destroy_process_group()
