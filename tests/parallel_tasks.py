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
