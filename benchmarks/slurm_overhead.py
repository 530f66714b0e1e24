"""What a SLURM job costs before a task starts: submission to start, per job, on the one-node test cluster.

Starts the tests' one-node cluster (Debian's slurm-wlm and munge, as root: tests/slurm_cluster.py), then
submits one trivial task at a time through :class:`divaware.executors.SlurmExecutor` (the task is
``time:time``, so its result is the moment it started inside the job) and measures, per job:

* **submission to start**: from the call that submits the job to the moment the task function runs (sbatch,
  scheduling, slurmd launching the batch script, srun, Python starting, submitit unpickling the task and
  importing torch for the thread setting);
* **submission to result**: until the executor has collected the result (adds the job's end and the
  executor's ``squeue`` poll, here every 0.5 s).

Writes the README's ``slurm-overhead`` section (labelled when the machine was loaded).

    python benchmarks/slurm_overhead.py [--jobs 5] [--force]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="jobs submitted one after another")
    _common.add_force_argument(parser)
    args = parser.parse_args()
    label = _common.load_label(args.force)
    sys.path.insert(0, str(ROOT / "tests"))
    import os

    from slurm_cluster import missing_reason, start_cluster

    from divaware import executors, parallel

    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="divaware-slurm-") as tmp:
        cluster = start_cluster(Path(tmp) / "cluster")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            executor = executors.SlurmExecutor(executors.SlurmOptions(cpus_per_task=1, time=5, poll_s=0.5),
                                               echo=False)
            start, total = [], []
            for i in range(args.jobs):
                t0 = time.time()
                (outcome,) = executor.run([parallel.Task(f"job{i}", "time:time", {})], Path(tmp) / "work",
                                          Path(tmp) / "jobs.json")
                if not outcome.ok:
                    raise SystemExit(f"job {i} failed: {outcome.error}")
                start.append(float(outcome.result) - t0)
                total.append(time.time() - t0)
                _common.log(f"job {i}: start after {start[-1]:.2f} s, result after {total[-1]:.2f} s", "slurm")
        finally:
            cluster.stop()
    rows = [{"measure": name, "median s": f"{statistics.median(v):.2f}", "min s": f"{min(v):.2f}",
             "max s": f"{max(v):.2f}", "jobs": len(v)}
            for name, v in (("submission to start", start), ("submission to result collected", total))]
    text = _common.markdown_table(rows) + (
        "\n\nMeasured by `python benchmarks/slurm_overhead.py` on the one-node test cluster (slurmctld and slurmd "
        f"on this machine: {_common.usable_cores()} cores; one trivial job at a time, no other job queued).")
    _common.rewrite_section(README, "slurm-overhead", _common.labelled(text, label))
    print(text)


if __name__ == "__main__":
    main()
