"""Helpers shared by the tests that run 2 CPU processes joined by a gloo process group."""

import datetime
import os
import socket

import torch
import torch.multiprocessing as mp


def init_gloo(rank: int, world_size: int, port: int):
    """Join the gloo group on 127.0.0.1:port as ``rank``; returns torch.distributed (destroy the group after)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    return dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(fn, out_dir, *args) -> None:
    """Run fn(rank, world_size=2, port, out_dir, *args) in 2 processes (each calls init_gloo itself)."""
    mp.spawn(fn, args=(2, free_port(), str(out_dir), *args), nprocs=2, join=True)
