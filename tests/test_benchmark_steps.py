"""The benchmarks time the training step divaware runs, not copies of it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TIMED_STEPS = ("main_job_speed.py", "train_throughput.py", "preprocess_realistic.py")


def _calls(path: Path) -> set[str]:
    return {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def test_step_benchmarks_call_the_engine_step_and_no_backward_of_their_own() -> None:
    for name in TIMED_STEPS:
        calls = _calls(BENCHMARKS / name)
        assert "training_step" in calls, name
        assert not {"backward", "zero_grad"} & calls, f"{name} copies the training step"


def test_main_job_speed_step_moves_the_network_by_the_real_objective() -> None:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their helpers as `_common`
    import main_job_speed

    from divaware.engine import SegmentationTask

    trainer = main_job_speed.Trainer("after")
    assert isinstance(trainer.task, SegmentationTask) and trainer.task.alpha == 1.0
    before = [p.detach().clone() for p in trainer.net.parameters()]
    trainer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters(), strict=True))
    assert np.array_equal(trainer.weights, np.ones(len(trainer.batch["patient_id"])))
