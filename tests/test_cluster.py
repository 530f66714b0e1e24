"""Sweeps on a real SLURM scheduler (a one-node cluster on localhost, see slurm_cluster.py) through submitit:
the same results as the local executor, a job killed mid-training resumes from its checkpoint when the sweep
is re-run, ``--status`` shows a failure with its log tail, an unreachable controller is a one-line error."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import submitit
import torch
from slurm_cluster import missing_reason, start_cluster, write_conf
from test_notebooks import TINY_TRAINING

from divaware import cli, executors, parallel, pipeline

REASON = missing_reason()
needs_slurm = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if REASON is not None:
        pytest.skip(REASON)
    folder = tmp_path_factory.mktemp("slurm")
    running = start_cluster(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(running.conf))
        yield running
    running.stop()


def slurm(**values: object) -> executors.SlurmExecutor:
    # one CPU per job: two jobs at once on the two-CPU node, one thread each, as `--jobs 2` locally
    options = {"cpus_per_task": 1, "array_parallelism": 2, "time": 10, "poll_s": 0.5, **values}
    return executors.SlurmExecutor(executors.SlurmOptions.from_mapping(options))


def _config(root: Path, methods: list[str], seeds: list[int], **training: object) -> dict:
    return {"data_root": str(root), "methods": ["erm"], "training": {**TINY_TRAINING, "epochs": 1, **training},
            "sweep": {"methods": methods, "seeds": seeds}}


# ------------------------------------------------------------------------------------------ no scheduler needed
def test_slurm_options_map_onto_sbatch_options(tmp_path: Path) -> None:
    options = executors.SlurmOptions.from_mapping(
        {"partition": "gpu", "time": "1:30:00", "gpus_per_task": 1, "cpus_per_task": 8, "mem": "32G",
         "account": "lab", "qos": "high", "ranks_per_job": 4, "array_parallelism": 3,
         "extra": {"constraint": "a100"}})
    assert options.time == 90
    executor = submitit.SlurmExecutor(folder=tmp_path)
    executor.update_parameters(**options.submitit_parameters())
    script = executor._make_submission_file_text("python -m x", "uid")  # what submitit hands to sbatch
    for line in ("--partition=gpu", "--time=90", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=32G",
                 "--account=lab", "--qos=high", "--ntasks-per-node=4", "--nodes=1", "--constraint=a100"):
        assert f"#SBATCH {line}" in script, line
    assert executors.parse_slurm_args(["constraint=a100", "exclusive="]) == {"constraint": "a100", "exclusive": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        executors.parse_slurm_args(["constraint"])
    with pytest.raises(ValueError, match="unknown SLURM option"):
        executors.SlurmOptions.from_mapping({"partiton": "gpu"})
    with pytest.raises(ValueError, match="time must be"):
        executors.SlurmOptions.from_mapping({"time": "soon"})


def test_a_job_reaching_its_time_limit_is_requeued_as_the_same_task() -> None:
    """submitit calls checkpoint() on SIGUSR2 (time limit, preemption) and requeues what it returns: the same
    function and arguments, so the training inside resumes from its last.pt."""
    task = executors.SlurmTask("divaware.pipeline:sweep_run", {"name": "erm_seed0"})
    again = task.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is task
    assert (again.function.function, again.function.kwargs) == ("divaware.pipeline:sweep_run", {"name": "erm_seed0"})


@needs_slurm
def test_unreachable_scheduler_is_one_line_naming_slurm_conf(tmp_path: Path, synthetic_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    conf = write_conf(tmp_path, 9, 10, tmp_path / "munge.socket")  # nothing listens there: no slurmctld
    monkeypatch.setenv("SLURM_CONF", str(conf))
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(_config(synthetic_root, ["erm"], [0])))
    code = cli.main(["sweep", "--config", str(config), "--out", str(tmp_path / "sweep"), "--executor", "slurm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"SLURM_CONF={conf}" in err and "slurmctld" in err
    assert not (tmp_path / "sweep" / "runs").exists()


# ------------------------------------------------------------------------------------------ on the one-node cluster
def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((out / "results").glob("*.json")):
        saved = json.loads(path.read_text())
        saved["params"].pop("out_dir")
        saved["row"].pop("notebook_minutes")  # wall time: the one field that may differ
        rows[path.stem] = saved
    return rows


def _sweep_in_background(config: dict, out: Path) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            pipeline.sweep(config, out, n_boot=20, executor=slurm())
        except BaseException as err:  # the cancelled job makes this sweep fail: checked by the caller
            errors.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


def test_slurm_sweep_resumes_a_killed_job_and_gives_the_local_sweeps_results(
        cluster, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Four tiny trainings through SLURM, one of them killed with scancel after its first epoch: the re-run
    resubmits only that one, which resumes from its checkpoint, and every result equals the local sweep's."""
    epochs = 3
    config = _config(synthetic_root, ["erm", "inverse_frequency"], [0, 1], epochs=epochs)
    out = tmp_path / "on_slurm"
    waiting, errors = _sweep_in_background(config, out)
    run = out / "runs" / "erm_seed0"
    deadline = time.monotonic() + 600
    while not (run / "last.pt").is_file() and time.monotonic() < deadline and waiting.is_alive():
        time.sleep(0.05)
    assert (run / "last.pt").is_file(), "training never wrote a checkpoint"
    book = json.loads((out / "jobs.json").read_text())["jobs"]
    killed = book["erm_seed0"]["job_id"]
    subprocess.run(["scancel", killed], check=True)
    waiting.join(timeout=900)
    assert len(errors) == 1 and isinstance(errors[0], pipeline.SweepFailed), errors
    # scancel's SIGTERM kills the notebook's kernel: the job ends with DeadKernelError, or without a result
    assert str(errors[0]).startswith("1 of 4 sweep run(s) failed: erm_seed0 (job")
    before = pd.read_csv(run / "metrics.csv")
    assert 1 <= len(before) < epochs, "the job was not killed mid-training"
    assert int(torch.load(run / "last.pt", weights_only=False)["epoch"]) == len(before)
    assert len(list((out / "results").glob("*.json"))) == 3  # the other three finished

    capsys.readouterr()
    pipeline.sweep(config, out, n_boot=20, executor=slurm())  # the re-run: only the killed run is resubmitted
    book_after = json.loads((out / "jobs.json").read_text())["jobs"]
    assert book_after["erm_seed0"]["job_id"] != killed and "submitted 1 job(s)" in capsys.readouterr().out
    assert all(book_after[n]["job_id"] == book[n]["job_id"] for n in book if n != "erm_seed0")
    assert {r["state"] for r in book_after.values()} == {"DONE"}
    after = pd.read_csv(run / "metrics.csv")
    assert after["epoch"].tolist() == list(range(1, epochs + 1))
    # the epochs trained before the kill were not trained again: their rows (wall times included) are kept
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)

    local = pipeline.sweep(config, tmp_path / "local", n_boot=20, jobs=2)
    assert {r["state"] for r in executors.status_rows(local)} == {"DONE"}  # the local executor keeps a book too
    assert len(_rows(out)) == 4 and _rows(out) == _rows(local)  # same seeds, same scores: resumed exactly
    for name in _rows(local):
        a = pd.read_csv(local / "runs" / name / "evaluation_test" / "per_case.csv")
        b = pd.read_csv(out / "runs" / name / "evaluation_test" / "per_case.csv")
        pd.testing.assert_frame_equal(a, b)
    assert all(Path(r["log"]).is_file() for r in book_after.values())
    assert cli.main(["sweep", "--status", str(out)]) == 0
    assert "4 done" in capsys.readouterr().out


def test_status_shows_a_failed_job_with_its_log_tail(cluster, synthetic_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    config = _config(synthetic_root, ["no_such_method"], [0])
    with pytest.raises(pipeline.SweepFailed, match="no_such_method_seed0"):
        pipeline.sweep(config, tmp_path / "sweep", n_boot=20, executor=slurm())
    capsys.readouterr()
    assert cli.main(["sweep", "--status", str(tmp_path / "sweep")]) == 0
    table = capsys.readouterr().out
    assert "1 failed" in table
    failure = [line for line in table.splitlines() if line.startswith("FAILED no_such_method_seed0")]
    assert failure and "no_such_method" in failure[0].split(":", 1)[1], table


def _files(folder: Path) -> set[str]:
    # every file a run leaves, minus what only a local or a SLURM run writes (logs, the job book, the lock)
    skip = ("logs", "slurm", "jobs.json", "run.lock")
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)}


def test_experiment_on_slurm_has_the_local_layout_and_records(cluster, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One job per (strategy or arm, seed); the same folders and recorded results as the local run, which
    benchmarks/experiment_report.py reads alike."""
    from test_experiment import _report_module

    from divaware import experiment as ex

    monkeypatch.setenv("DIVAWARE_CACHE", str(tmp_path / "cache"))
    config = {"disparity": "representation", "strategies": ["erm"], "arms": ["balanced"], "seeds": [0],
              "heldout": {"cases": 8, "seed": 7},
              "training": {"synthetic_cases": 24, "epochs": 1, "channels": [4, 8], "strides": [2],
                           "num_res_units": 0, "cpu_threads": 1, "progress": False, "min_val_cases": 4}}
    kwargs = {"challenge_test": False, "n_boot": 20}
    local = ex.run_experiment(config, tmp_path / "local", record=tmp_path / "rec_local" / "representation",
                              **kwargs)
    remote = ex.run_experiment(config, tmp_path / "on_slurm", record=tmp_path / "rec_slurm" / "representation",
                               executor=slurm(), **kwargs)
    book = json.loads((remote / "jobs.json").read_text())["jobs"]
    assert sorted(book) == ["representation/balanced_seed0", "representation/erm_seed0"]
    assert {r["state"] for r in book.values()} == {"DONE"} and len({r["job_id"] for r in book.values()}) == 2
    assert _files(remote) == _files(local) and "runs/balanced_seed0/best.pt" in _files(local)
    assert _files(tmp_path / "rec_slurm") == _files(tmp_path / "rec_local")
    report = _report_module()
    a, b = (report.load(tmp_path / f"rec_{w}" / "representation") for w in ("local", "slurm"))
    assert sorted(a["runs"]) == sorted(b["runs"]) == ["balanced_seed0", "erm_seed0"]
    for name in a["heldout"]:
        pd.testing.assert_frame_equal(a["heldout"][name], b["heldout"][name])


def test_a_job_with_two_ranks_joins_one_ddp_group_from_slurms_environment(cluster, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--ranks-per-job 2: one job, two SLURM tasks, which divaware.distributed.setup joins into one group."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", tests)  # the job imports the probe from this folder
    task = parallel.Task("probe", "parallel_tasks:ranks_probe", {})
    (outcome,) = slurm(ranks_per_job=2).run([task], tmp_path / "slurm", tmp_path / "jobs.json")
    assert outcome.ok, outcome.error
    result = outcome.result  # rank 0's
    assert result["world"] == 2 and result["rank"] == 0 and result["threads"] == "1"
    assert [g[0] for g in result["gathered"]] == [0, 1] and [g[2] for g in result["gathered"]] == ["0", "1"]
    assert result["gathered"][0][1] != result["gathered"][1][1]  # two processes


def test_series_trainings_run_as_slurm_jobs(cluster, synthetic_root: Path, tmp_path: Path) -> None:
    """`divaware run --executor slurm`: notebook 03 once per method, as one SLURM job each."""
    config = {"data_root": str(synthetic_root), "methods": ["erm", "inverse_frequency"],
              "training": {**TINY_TRAINING, "epochs": 1}}
    timings = pipeline.run_series(config, tmp_path / "series", only=["03"], executor=slurm())
    assert sorted(timings) == ["03_training_erm", "03_training_inverse_frequency"]
    book = json.loads((tmp_path / "series" / "jobs.json").read_text())["jobs"]
    assert {r["state"] for r in book.values()} == {"DONE"} and len({r["job_id"] for r in book.values()}) == 2
    for method in config["methods"]:
        results = json.loads((tmp_path / "series" / "runs" / method / "results.json").read_text())
        assert results and (tmp_path / "series" / "runs" / method / "best.pt").is_file()
    recorded = json.loads((tmp_path / "series" / "timings.json").read_text())["notebooks"]
    assert recorded["03_training_erm"]["executor"] == "slurm" and recorded["03_training_erm"]["peak_memory_gb"] is None


def _interrupted_runner(tmp_path: Path, cancel: bool, pidfile: Path) -> subprocess.Popen:
    import os
    import sys

    code = ("from pathlib import Path; from divaware import executors, parallel\n"
            "ex = executors.SlurmExecutor(executors.SlurmOptions(cpus_per_task=1, time=5, poll_s=0.3), "
            f"cancel={cancel})\n"
            f"ex.run([parallel.Task('long', 'parallel_tasks:sleeper', {{'pidfile': {str(pidfile)!r}, 'pause': 300}})], "
            f"Path({str(tmp_path / 'slurm')!r}), Path({str(tmp_path / 'jobs.json')!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(check, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_ctrl_c_leaves_jobs_running_unless_cancel(cluster, tmp_path: Path) -> None:
    """Ctrl-C on the waiting command asks nothing of the cluster; the re-run waits for the same job instead of
    submitting another, and Ctrl-C with cancel scancels it."""
    import signal

    pidfile = tmp_path / "task.pid"
    first = _interrupted_runner(tmp_path, False, pidfile)
    _wait_for(lambda: pidfile.is_file() and pidfile.read_text(), "the job to start")
    job = json.loads((tmp_path / "jobs.json").read_text())["jobs"]["long"]["job_id"]
    first.send_signal(signal.SIGINT)
    said = first.communicate(timeout=60)[0]
    assert first.returncode != 0 and "keep running on the cluster" in said, said
    time.sleep(1)
    assert executors.queue_states().get(job) == "RUNNING"

    second = _interrupted_runner(tmp_path, True, pidfile)
    attached = second.stdout.readline()  # it waits for the running job rather than submitting another
    assert f"job {job} is still RUNNING, waiting for it" in attached, attached
    time.sleep(1)
    second.send_signal(signal.SIGINT)
    said = second.communicate(timeout=60)[0]
    assert f"cancelled 1 job(s): {job}" in said and "submitted" not in said, said
    _wait_for(lambda: executors.queue_states().get(job) in (None, "CANCELLED"), "the job to be cancelled", 60)
    assert json.loads((tmp_path / "jobs.json").read_text())["jobs"]["long"]["state"] == "CANCELLED"
