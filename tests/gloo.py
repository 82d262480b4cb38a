"""Joining a CPU (Gloo) process group from a test's spawned rank."""

import datetime

import torch
import torch.distributed as dist


def join(rank: int, world: int, init_file: str) -> None:
    """Join the ``world``-rank group rendezvousing at ``init_file``; one thread per rank, and a
    deadline, so a rank whose peer died fails instead of hanging."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
