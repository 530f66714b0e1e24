"""Functions run as child processes by tests/test_parallel.py (through divaware.parallel)."""

from __future__ import annotations

import os
import time


def report(x: int, pause: float = 0.0) -> dict:
    """What the child was given: its thread share, its visible GPU, and x squared."""
    import torch

    time.sleep(pause)
    return {"square": x * x, "omp": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}


def fail(why: str) -> None:
    raise RuntimeError(f"planned failure: {why}")


def sleeper(pidfile: str, pause: float = 120.0) -> dict:
    """Write this process's id to ``pidfile``, then sleep (a long job for the SIGTERM test)."""
    from pathlib import Path

    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(pause)
    return {"pid": os.getpid()}


def ranks_probe() -> dict:
    """Join the rank group the way training does (divaware.distributed.setup) and gather every rank's
    (rank, pid, SLURM task id): what a multi-task SLURM job's training would see."""
    import torch.distributed as dist

    from divaware import distributed

    ranks, device = distributed.setup("cpu")
    mine = (ranks.rank, os.getpid(), os.environ.get("SLURM_PROCID"))
    gathered: list = [None] * ranks.world
    if ranks.distributed:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    ranks.close()
    return {"rank": ranks.rank, "world": ranks.world, "device": device, "gathered": gathered,
            "threads": os.environ.get("OMP_NUM_THREADS")}
