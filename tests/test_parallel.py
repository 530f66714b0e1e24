"""Parallel sweeps: N jobs at once, one process each; a failing job is reported and the others finish;
a restarted sweep skips finished runs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from test_notebooks import TINY_TRAINING

from divaware import parallel, pipeline

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def tests_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # the children import the task functions from this folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def test_thread_share() -> None:
    assert parallel.thread_share(2, cores=2) == 1 and parallel.thread_share(3, cores=16) == 5
    assert parallel.thread_share(8, cores=2) == 1


def test_jobs_run_in_their_own_processes_with_a_thread_share_and_survive_a_failure(
        tests_importable: None, tmp_path: Path) -> None:
    tasks = [parallel.Task("a", "parallel_tasks:report", {"x": 2, "pause": 1.0}),
             parallel.Task("bad", "parallel_tasks:fail", {"why": "broken case"}),
             parallel.Task("c", "parallel_tasks:report", {"x": 3})]
    out = parallel.run_parallel(tasks, jobs=2, work_dir=tmp_path, threads=1, echo=False)
    assert [o.name for o in out] == ["a", "bad", "c"] and [o.ok for o in out] == [True, False, True]
    assert out[0].result["square"] == 4 and out[2].result["square"] == 9
    assert out[0].result["omp"] == "1" and out[0].result["torch_threads"] == 1
    assert out[0].result["pid"] != out[2].result["pid"] != os.getpid()
    assert "planned failure: broken case" in out[1].error and Path(out[1].log).is_file()


def test_jobs_are_spread_over_gpus_round_robin(tests_importable: None, tmp_path: Path) -> None:
    tasks = [parallel.Task(f"t{i}", "parallel_tasks:report", {"x": i, "pause": 0.5}) for i in range(3)]
    out = parallel.run_parallel(tasks, jobs=2, work_dir=tmp_path, devices=["0", "1"], echo=False)
    seen = [o.result["cuda_visible"] for o in out]
    assert seen[:2] == ["0", "1"] and seen[2] in ("0", "1")


def test_parallel_sweep_reports_a_failing_run_and_skips_finished_runs(synthetic_root: Path, tmp_path: Path) -> None:
    config = {"data_root": str(synthetic_root), "methods": ["erm"], "training": {**TINY_TRAINING, "epochs": 1},
              "sweep": {"methods": ["erm", "no_such_method", "inverse_frequency"], "seeds": [0]}}
    with pytest.raises(pipeline.SweepFailed, match="no_such_method_seed0"):
        pipeline.sweep(config, tmp_path / "sweep", n_boot=20, jobs=2)
    out = tmp_path / "sweep"
    table = pd.read_csv(out / "sweep.csv")
    assert sorted(table["run"]) == ["erm_seed0", "inverse_frequency_seed0"]
    for row in table.itertuples():
        per_case = pd.read_csv(out / "runs" / row.run / "evaluation_test" / "per_case.csv")
        assert row.mean_dice == pytest.approx(per_case["dice"].mean())
    assert pd.read_csv(out / "sweep_failed.csv")["run"].tolist() == ["no_such_method_seed0"]
    # restarted without the broken run: the finished runs are skipped, not retrained
    executed = out / "notebooks" / "03_training_erm_seed0.ipynb"
    stamp = executed.stat().st_mtime_ns
    config["sweep"]["methods"] = ["erm", "inverse_frequency"]
    pipeline.sweep(config, out, n_boot=20, jobs=2)
    assert executed.stat().st_mtime_ns == stamp
    assert pd.read_csv(out / "sweep.csv").equals(table) and not (out / "sweep_failed.csv").exists()
