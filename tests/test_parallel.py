"""Parallel sweeps: N jobs at once, one process each; a failing job is reported and the others finish;
a restarted sweep skips finished runs."""

from __future__ import annotations

import os
import warnings
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


def test_thread_share_counts_the_usable_cores_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parallel.thread_share(2) == 1 and parallel.thread_share(1) == 2


def test_gpu_jobs_get_a_thread_share_too(tests_importable: None, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs 3 on one GPU: three jobs share GPU 0 and each gets a CPU share, not every core."""
    for name in parallel.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tasks = [parallel.Task(f"t{i}", "parallel_tasks:report", {"x": i}) for i in range(3)]
    out = parallel.run_parallel(tasks, jobs=3, work_dir=tmp_path, devices=["0"], threads=2, echo=False)
    assert [o.result["cuda_visible"] for o in out] == ["0", "0", "0"]
    assert [o.result["omp"] for o in out] == ["2", "2", "2"] and out[0].result["torch_threads"] == 2


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_to_the_runner_stops_its_children(tests_importable: None, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    code = ("from divaware import parallel; parallel.run_parallel([parallel.Task('long', 'parallel_tasks:sleeper', "
            f"{{'pidfile': {str(pidfile)!r}, 'pause': 120}})], jobs=1, work_dir={str(tmp_path / 'work')!r}, "
            "echo=False)")
    runner = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
    child = None
    try:
        deadline = time.monotonic() + 120
        while not pidfile.is_file() or not pidfile.read_text():
            assert time.monotonic() < deadline and runner.poll() is None, "the child never started"
            time.sleep(0.2)
        child = int(pidfile.read_text())
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the runner left its child running"
    finally:
        if runner.poll() is None:
            runner.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)  # the child this test started, by its id


def test_interrupted_sweep_resumes_from_each_finished_runs_result(synthetic_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_run(**kw: object) -> dict:
        calls.append(str(kw["name"]))
        if calls == ["erm_seed0", "inverse_frequency_seed0"]:
            raise KeyboardInterrupt  # the sweep is interrupted during its second run
        (Path(str(kw["out"])) / "runs" / str(kw["name"])).mkdir(parents=True, exist_ok=True)
        return {"run": kw["name"], **dict(kw["grid_params"]), "mean_dice": 0.5, "P": 0.5, "F": 0.5, "ranking": 0.5}

    monkeypatch.setattr(pipeline, "sweep_run", fake_run)
    config = {"data_root": str(synthetic_root), "methods": ["erm"], "training": {**TINY_TRAINING, "epochs": 1},
              "sweep": {"methods": ["erm", "inverse_frequency"], "seeds": [0]}}
    with pytest.raises(KeyboardInterrupt):
        pipeline.sweep(config, tmp_path / "sweep", n_boot=5)
    assert (tmp_path / "sweep" / "results" / "erm_seed0.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake runs have no evaluation folder
        pipeline.sweep(config, tmp_path / "sweep", n_boot=5)
    assert calls == ["erm_seed0", "inverse_frequency_seed0", "inverse_frequency_seed0"]  # erm not run again
    assert sorted(pd.read_csv(tmp_path / "sweep" / "sweep.csv")["run"]) == ["erm_seed0", "inverse_frequency_seed0"]
