"""Run the decisive experiment's sweep in the background and commit each finished run's small result files.

    python benchmarks/experiment_sweep.py                 # every mechanism, 2 processes of 1 thread each
    python benchmarks/experiment_sweep.py --no-commit     # the same without git commits

A sweep is ~75 trainings of 3-4 minutes each on one CPU thread: longer than a working session, and a
background process does not outlive its machine. So each finished run is recorded under
``benchmarks/experiment/<mechanism>/<run>/`` (:mod:`divaware.experiment_record`) and committed at once, with
the report regenerated from the records (``benchmarks/EXPERIMENT.md``); the same command on a fresh clone
skips every recorded run and resumes with the rest. Runs go in the order that answers the question soonest:
the look-alike ladder (erm, counterfactual, oracle, balanced) and divaware seed by seed, then the weak-drop
and intrinsic controls, then the other strategies.

A control file (``--control``, JSON, re-read before each run starts) lets a long sweep follow the
repository without restarting: ``{"code": DIR}`` runs the next runs with the package in DIR (a checkout pinned
at a commit, so a run never mixes two code versions), ``{"hold": ["divaware"]}`` postpones strategies
whose code is about to change. A failed run is retried once at the end; its log stays in ``--logs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MECHANISMS = ("lookalike", "lookalike_weak", "intrinsic")
LADDER = ("erm", "counterfactual", "oracle", "balanced")


def plan(seeds: list[int]) -> list[tuple[str, str, int]]:
    """(mechanism, strategy or arm, seed) in the order that answers the question soonest (module docstring)."""
    import yaml

    cfgs = {m: yaml.safe_load((ROOT / "configs" / f"experiment_{m}.yaml").read_text()) for m in MECHANISMS}
    names = {m: [*c["strategies"], *(c.get("arms") or [])] for m, c in cfgs.items()}
    order: list[tuple[str, str, int]] = []

    def add(mech: str, strategies: tuple[str, ...] | list[str]) -> None:
        for seed in seeds:
            order.extend((mech, s, seed) for s in strategies if s in names[mech] and (mech, s, seed) not in order)

    for seed in seeds:  # seed by seed, so that every finished seed pairs divaware with its ladder
        order.extend(("lookalike", s, seed) for s in (*LADDER, "divaware") if s in names["lookalike"])
    for mech in ("lookalike_weak", "intrinsic"):
        add(mech, ["erm", "oracle", "divaware"])
    add("lookalike", names["lookalike"])
    return order


def recorded(mech: str, strategy: str, seed: int, records: Path) -> bool:
    return (records / mech / f"{strategy}_seed{seed}" / "run.json").is_file()


def busy(job: tuple[str, str, int]) -> bool:
    """Whether another process (e.g. left running by an earlier sweep) is running this job now: its
    ``divaware experiment`` command line is in /proc (Linux; elsewhere nothing is seen as busy)."""
    mech, strategy, seed = job
    want = ["--strategies", strategy, "--seeds", str(seed)]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "experiment" in args and any(a.endswith(f"experiment_{mech}.yaml") for a in args) and any(
                args[i:i + 4] == want for i in range(len(args))):
            return True
    return False


def control(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        print(f"[sweep] {path} is not JSON; ignored", flush=True)
        return {}


def start(job: tuple[str, str, int], args: argparse.Namespace, code: Path) -> subprocess.Popen:
    mech, strategy, seed = job
    log = Path(args.logs) / f"{mech}_{strategy}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "divaware", "experiment",
           "--config", str(code / "configs" / f"experiment_{mech}.yaml"), "--out", str(Path(args.runs) / mech),
           "--record", str(Path(args.records) / mech), "--strategies", strategy, "--seeds", str(seed),
           "--no-challenge-test", "--n-boot", "200"]
    print(f"[sweep] {time.strftime('%H:%M:%S')} start {mech}/{strategy}_seed{seed} (code {code})", flush=True)
    # run from the code's folder: python puts the working directory first on sys.path
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, cwd=str(code))


def git(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *argv], cwd=ROOT, text=True, capture_output=True)


def commit(job: tuple[str, str, int], args: argparse.Namespace, minutes: float) -> None:
    """Regenerate the report and commit it with the run's record (only those paths; retried while a merge is
    in progress or the index is locked)."""
    mech, strategy, seed = job
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experiment_report.py")], cwd=ROOT,
                            text=True, capture_output=True)
    if report.returncode != 0:
        print(f"[sweep] report failed (record committed without it): {report.stderr.strip()[-500:]}", flush=True)
    paths = [str(Path(args.records) / mech), "benchmarks/EXPERIMENT.md",
             *(str(f.relative_to(ROOT)) for f in sorted((ROOT / "figures").glob("experiment_*.png")))]
    took = "" if math.isnan(minutes) else f" ({minutes:.1f} min)"
    message = f"experiment: {mech}/{strategy}_seed{seed} recorded{took}; report regenerated"
    for _ in range(60):
        if not (ROOT / ".git" / "MERGE_HEAD").exists() and not (ROOT / ".git" / "index.lock").exists():
            git("add", "--", *paths)
            done = git("commit", "-m", message, "--", *paths)
            if done.returncode == 0 or "nothing" in done.stdout + done.stderr:
                print(f"[sweep] committed {mech}/{strategy}_seed{seed}", flush=True)
                return
            print(f"[sweep] commit failed: {(done.stdout + done.stderr).strip()[-300:]}", flush=True)
        time.sleep(30)
    print(f"[sweep] gave up committing {mech}/{strategy}_seed{seed}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one CPU thread)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--runs", default=str(ROOT / "runs" / "experiment"), help="run folders (not committed)")
    p.add_argument("--records", default=str(ROOT / "benchmarks" / "experiment"), help="committed result files")
    p.add_argument("--logs", default=str(ROOT / "runs" / "experiment" / "logs"))
    p.add_argument("--control", default=None, help="JSON control file (module docstring)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the runs (leave the machine usable)")
    p.add_argument("--no-commit", action="store_true", help="record only; commit nothing")
    args = p.parse_args(argv)
    ctl_path = Path(args.control) if args.control else None
    records = Path(args.records)
    todo = [j for j in plan(args.seeds) if not recorded(*j, records)]
    print(f"[sweep] {len(todo)} runs to do ({len(plan(args.seeds)) - len(todo)} already recorded)", flush=True)
    running: dict[tuple[str, str, int], tuple[subprocess.Popen, float]] = {}
    tries: dict[tuple[str, str, int], int] = {}
    while todo or running:
        ctl = control(ctl_path)
        hold = set(ctl.get("hold", []))
        code = Path(ctl.get("code", ROOT))
        for job in [j for j in todo if recorded(*j, records)]:  # finished by a process of an earlier sweep
            todo.remove(job)
            print(f"[sweep] {job} was recorded by another process", flush=True)
            if not args.no_commit:
                commit(job, args, math.nan)
        ready = [j for j in todo if j[1] not in hold and j not in running and not busy(j)]
        while len(running) < args.jobs and ready:
            job = ready.pop(0)
            todo.remove(job)
            running[job] = (start(job, args, code), time.time())
        for job, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[job]
            minutes = (time.time() - t0) / 60
            if proc.returncode == 0 and recorded(*job, records):
                print(f"[sweep] {time.strftime('%H:%M:%S')} done {job} in {minutes:.1f} min", flush=True)
                if not args.no_commit:
                    commit(job, args, minutes)
            else:
                tries[job] = tries.get(job, 0) + 1
                print(f"[sweep] {job} failed (exit {proc.returncode}); see {args.logs}", flush=True)
                if tries[job] < 2:
                    todo.append(job)
        if not running and todo and not ready:
            print(f"[sweep] only held or busy runs left ({sorted({j[1] for j in todo})}); waiting", flush=True)
            time.sleep(60)
        time.sleep(5)
    print("[sweep] finished", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
