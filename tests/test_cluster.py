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

from divaware import cli, executors, pipeline

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


def test_slurm_sweep_gives_the_local_sweeps_results(cluster, synthetic_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    config = _config(synthetic_root, ["erm", "inverse_frequency"], [0, 1])
    local = pipeline.sweep(config, tmp_path / "local", n_boot=20, jobs=2)
    remote = pipeline.sweep(config, tmp_path / "slurm", n_boot=20, executor=slurm())
    assert len(_rows(remote)) == 4 and _rows(remote) == _rows(local)
    for run in _rows(local):
        a = pd.read_csv(local / "runs" / run / "evaluation_test" / "per_case.csv")
        b = pd.read_csv(remote / "runs" / run / "evaluation_test" / "per_case.csv")
        pd.testing.assert_frame_equal(a, b)
    book = json.loads((remote / "jobs.json").read_text())["jobs"]
    assert {r["state"] for r in book.values()} == {"DONE"} and len({r["job_id"] for r in book.values()}) == 4
    assert all(Path(r["log"]).is_file() for r in book.values())
    assert cli.main(["sweep", "--status", str(remote)]) == 0
    assert "4 done" in capsys.readouterr().out
    # re-running the finished sweep submits nothing
    stamp = (remote / "jobs.json").stat().st_mtime_ns
    pipeline.sweep(config, remote, n_boot=20, executor=slurm())
    assert {r["job_id"] for r in json.loads((remote / "jobs.json").read_text())["jobs"].values()} == \
        {r["job_id"] for r in book.values()} and (remote / "jobs.json").stat().st_mtime_ns >= stamp


def test_scancelled_job_is_resubmitted_and_resumes_from_its_checkpoint(cluster, synthetic_root: Path,
                                                                      tmp_path: Path) -> None:
    config = _config(synthetic_root, ["erm"], [0], epochs=6)
    out = tmp_path / "sweep"
    errors: list[BaseException] = []

    def first() -> None:
        try:
            pipeline.sweep(config, out, n_boot=20, executor=slurm())
        except BaseException as err:  # the cancelled job makes the sweep fail: expected
            errors.append(err)

    waiting = threading.Thread(target=first)
    waiting.start()
    run = out / "runs" / "erm_seed0"
    deadline = time.monotonic() + 300
    while not (run / "last.pt").is_file() and time.monotonic() < deadline and waiting.is_alive():
        time.sleep(0.05)
    assert (run / "last.pt").is_file(), "training never wrote a checkpoint"
    job = json.loads((out / "jobs.json").read_text())["jobs"]["erm_seed0"]["job_id"]
    subprocess.run(["scancel", job], check=True)
    waiting.join(timeout=120)
    assert errors and isinstance(errors[0], pipeline.SweepFailed) and "ended without a result" in str(errors[0])
    killed_at = int(torch.load(run / "last.pt", weights_only=False)["epoch"])
    before = pd.read_csv(run / "metrics.csv")
    assert 1 <= len(before) < 6, "the job was not killed mid-training"

    pipeline.sweep(config, out, n_boot=20, executor=slurm())
    book = json.loads((out / "jobs.json").read_text())["jobs"]["erm_seed0"]
    assert book["state"] == "DONE" and book["job_id"] != job  # resubmitted
    after = pd.read_csv(run / "metrics.csv")
    assert after["epoch"].tolist() == list(range(1, 7)) or after["epoch"].tolist() == list(range(6))
    # the epochs trained before the kill were not trained again: their rows (wall times included) are kept
    pd.testing.assert_frame_equal(after.iloc[: len(before)].reset_index(drop=True), before)
    assert killed_at >= 0 and json.loads((out / "results" / "erm_seed0.json").read_text())["row"]["run"] == "erm_seed0"


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
