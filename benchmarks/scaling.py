"""Scaling out, measured: the data-parallel training path (torchrun) and parallel sweeps.

* ``ddp``: samples/s of ``divaware train`` on a generated synthetic cohort, plain (one process) against
  ``torchrun --nproc_per_node N`` (DistributedDataParallel): on CPU with gloo, N = 1 and 2 ranks of one
  thread each; on a GPU machine, N = 1 (the DDP path's overhead on one GPU) and N = all GPUs when > 1.
  Samples/s = training cases / ``train_time_s`` of the last epoch (the first fills the memory cache).
* ``sweep`` (CPU): wall time of a 4-run tiny sweep (``divaware sweep``: notebook 03 + evaluation per run)
  with ``--jobs 1`` against ``--jobs 2``, one torch thread per job (target: jobs 2 <= 0.6x jobs 1 on 2 cores).

The load average is recorded next to each number: on a shared machine the ratios move with it. Results go
to ``benchmarks/RESULTS.md`` (section ``scaling-<device>``), through the same writer as train_throughput.py.

    python benchmarks/scaling.py [--only ddp|sweep] [--epochs 3] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import torch
import yaml

from divaware.runfolder import RunFolder

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = ("# Training throughput\n\nWritten by `benchmarks/train_throughput.py` and `benchmarks/scaling.py`; "
                  "one section per device and mode.\n")

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    _common.log(msg, "scaling")


def load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def train_config(data_root: Path, out: Path, epochs: int, cuda: bool) -> dict[str, Any]:
    """A small whole-volume run; on a GPU the default network, on a CPU a tiny one."""
    cfg: dict[str, Any] = {"data_root": str(data_root), "out_dir": str(out), "epochs": epochs, "batch_size": 4,
                           "val_fraction": 0.2, "warmup_epochs": 1, "update_every": 1, "scheduler": "constant",
                           "progress": False, "cache": "memory", "strategy": "divaware", "val_every": 1000}
    if not cuda:
        cfg.update(spacing=[5.0, 5.0, 5.0], channels=[8, 16, 32], strides=[2, 2], num_res_units=1, cpu_threads=1,
                   device="cpu")
    return cfg


def _samples_per_s(run: Path, n_train: int) -> float:
    metrics = RunFolder(run).read_metrics()
    return n_train / float(metrics["train_time_s"].iloc[-1])


def ddp_throughput(work: Path, epochs: int = 3, cases: int = 60) -> list[dict[str, Any]]:
    """Rows ``{setup, ranks, samples_s, x_plain, load}``: plain ``divaware train`` against torchrun."""
    from divaware.synthetic import make_cohort

    cuda = torch.cuda.is_available()
    root = make_cohort(work / "cohort", n_cases=cases, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows: list[dict[str, Any]] = []
    gpus = torch.cuda.device_count() if cuda else 0
    launches = [("plain", 0)] + [("torchrun", n) for n in sorted({1, gpus} if cuda else {1, 2}) if n >= 1]
    for label, nproc in launches:
        out = work / f"run_{label}_{nproc}"
        cfg = work / f"{out.name}.yaml"
        cfg.write_text(yaml.safe_dump(train_config(root, out, epochs, cuda)))
        prefix = [sys.executable] if nproc == 0 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [*prefix, "-m", "divaware", "train", "--config", str(cfg)]
        log(f"{label} ({max(nproc, 1)} process(es)): {' '.join(cmd[1:])}")
        before = load()
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=work, capture_output=True)
        wall = time.perf_counter() - start
        n_train = len(RunFolder(out).split_ids("train"))
        rows.append({"setup": label if nproc == 0 else f"torchrun, {nproc} rank(s)", "ranks": max(nproc, 1),
                     "samples_s": _samples_per_s(out, n_train), "wall_s": wall, "load": f"{before} -> {load()}"})
    base = rows[0]["samples_s"]
    for r in rows:
        r["x_plain"] = r["samples_s"] / base
    return rows


def sweep_ratio(work: Path, runs: int = 4) -> list[dict[str, Any]]:
    """Wall time of the same ``runs``-run sweep with --jobs 1 and --jobs 2 (one thread per job)."""
    from divaware.synthetic import make_cohort

    root = make_cohort(work / "cohort_sweep", n_cases=40, seed=0)
    config = {"data_root": str(root), "methods": ["erm"],
              "training": {"epochs": 2, "channels": [4, 8], "warmup_epochs": 1, "update_every": 1, "batch_size": 4},
              "sweep": {"methods": ["erm", "inverse_frequency"], "seeds": list(range(runs // 2))}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    for jobs in (1, 2):
        cmd = [sys.executable, "-m", "divaware", "sweep", "--config", str(work / "sweep.yaml"), "--out",
               str(work / f"sweep_jobs{jobs}"), "--n-boot", "50", "--jobs", str(jobs)]
        log(f"sweep --jobs {jobs} ({runs} runs) ...")
        before = load()
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=work, capture_output=True)
        rows.append({"jobs": jobs, "wall_s": time.perf_counter() - start, "load": f"{before} -> {load()}"})
        log(f"  {rows[-1]['wall_s']:.0f} s")
    for r in rows:
        r["x_jobs1"] = r["wall_s"] / rows[0]["wall_s"]
    return rows


def report(ddp: list[dict[str, Any]] | None, sweep: list[dict[str, Any]] | None, command: str) -> str:
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} logical cores, shared)"
    lines = [f"## Scaling out: {device}", "",
             f"{dt.date.today().isoformat()} · torch {torch.__version__} · `{command}` · load average "
             "(1/5/15 min) before -> after each measurement", ""]
    if ddp:
        backend = "NCCL" if cuda else "gloo, 1 thread per rank"
        lines += [f"DDP path ({backend}): samples/s of the last epoch's training, same config and data:", "",
                  "| setup | ranks | samples/s | x plain | wall (s) | load |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['setup']} | {r['ranks']} | {r['samples_s']:.2f} | {r['x_plain']:.2f} | "
                  f"{r['wall_s']:.0f} | {r['load']} |" for r in ddp]
        if not cuda:
            lines += ["", "CPU/gloo numbers say whether the DDP path works and what its communication costs "
                      "here; they are not the GPU target (2 GPUs >= 1.6x 1 GPU), which is unmeasured until a "
                      "multi-GPU machine runs this script."]
        lines.append("")
    if sweep:
        lines += ["Sweep of 4 tiny runs (notebook 03 + test evaluation each), 1 torch thread per job:", "",
                  "| jobs | wall (s) | x jobs 1 | load |", "|---:|---:|---:|---|"]
        lines += [f"| {r['jobs']} | {r['wall_s']:.0f} | {r['x_jobs1']:.2f} | {r['load']} |" for r in sweep]
        lines += ["", "Target: --jobs 2 <= 0.6x --jobs 1 on 2 cores. On a machine shared with other work the "
                  "second job competes with it too, so the ratio here is an upper bound of the idle one."]
    loads = [float(r["load"].split(" / ")[0]) for r in (ddp or []) + (sweep or []) if r["load"][0].isdigit()]
    if loads and max(loads) > (os.cpu_count() or 1):
        lines += ["", f"**Caution:** the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores "
                  "during these measurements, so other processes held the cores: the ratios above measure that "
                  "competition as much as the code (e.g. identical work in two setups can differ by 2x), and the "
                  "targets are neither met nor refuted by them. Rerun on an idle machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("ddp", "sweep"), default=None)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each DDP measurement run")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    _common.add_force_argument(parser)
    args = parser.parse_args(argv)
    # the load before measuring (the runs load the machine themselves): refuse, or label the table
    label = "" if args.no_write else _common.load_label(args.force)
    command = "python benchmarks/scaling.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="divaware_scaling_") as tmp:
        work = Path(tmp)
        ddp = ddp_throughput(work, args.epochs) if args.only in (None, "ddp") else None
        sweep = sweep_ratio(work) if args.only in (None, "sweep") and not torch.cuda.is_available() else None
    text = report(ddp, sweep, command)
    print("\n" + text + "\n", flush=True)
    if not args.no_write:
        key = "scaling-cuda" if torch.cuda.is_available() else "scaling-cpu"
        _common.rewrite_section(RESULTS, key + (f"-{args.only}" if args.only else ""),
                                _common.labelled(text, label), header=RESULTS_HEADER)
        log("wrote benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
