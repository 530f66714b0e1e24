"""Run independent jobs (the trainings of a sweep) several at a time, one process each.

:func:`run_parallel` keeps up to ``jobs`` child processes running. Each child runs
``python -m divaware.parallel TASK.json``, which calls the function the task names (``module:function``)
with the task's keyword arguments and writes its JSON result next to the task. What a child gets:

* a GPU: with ``devices`` (``["0", "1"]``), each child sees one of them as its only device
  (``CUDA_VISIBLE_DEVICES``), the one with the fewest running children at its start (round robin);
* a CPU share always (GPU jobs too): ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = usable cores // jobs (at
  least 1; usable = the CPU affinity, not ``os.cpu_count()``), which torch (and the Jupyter kernel a
  notebook job starts, which inherits the environment) uses as its thread count, so N jobs do not each spin
  up a thread per core against each other. With more jobs than GPUs, several share one GPU (said at start).

SIGTERM, Ctrl-C or an error in the runner stops its children (each in its own process group, so the
kernels and ranks they start go too) before it exits.

A failing child (non-zero exit) is recorded with the end of its log and the others go on; its log stays in
``log_dir``. Nothing here knows about sweeps: :func:`divaware.pipeline.sweep` builds the tasks.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class Task:
    """One job: ``function`` (``"module:name"``) called with ``kwargs`` (JSON types) in its own process."""

    name: str
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of a task: its result (JSON) or the error and where its log is."""

    name: str
    ok: bool
    result: Any = None
    error: str = ""
    log: str = ""
    seconds: float = 0.0
    device: str = ""


def thread_share(jobs: int, cores: int | None = None) -> int:
    """CPU threads per job when ``jobs`` run at once on ``cores`` cores (at least 1); ``cores`` defaults to the
    cores this process may use (CPU affinity, :func:`divaware.runtime.usable_cores`), not the machine's."""
    from divaware.runtime import usable_cores

    cores = cores or usable_cores()
    return max(1, cores // max(1, jobs))


def run_parallel(tasks: Sequence[Task], jobs: int, work_dir: str | Path, devices: Sequence[str] | None = None,
                 threads: int | None = None, poll_s: float = 0.2, echo: bool = True,
                 on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``tasks`` with up to ``jobs`` at once; returns one :class:`Outcome` per task, in task order.

    ``work_dir`` receives ``<name>.task.json``, ``<name>.result.json`` and ``<name>.log`` per task.
    ``devices``: GPU indices to spread the children over (None: CPU). Every child gets ``threads`` CPU threads
    (default :func:`thread_share` of the usable cores), GPU jobs too: N jobs on fewer GPUs share each GPU and
    must not each spin up a thread per core. ``on_done`` is called with each outcome as soon as it is known.
    SIGTERM, Ctrl-C or an error in the runner stops every running child (and the processes it started).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    devices = [str(d) for d in devices] if devices else []
    threads = threads or thread_share(jobs)
    if devices and jobs > len(devices):
        # several jobs per GPU share its memory and compute; each still needs CPU threads of its own
        print(f"[divaware parallel] {jobs} jobs on {len(devices)} GPU(s): up to {-(-jobs // len(devices))} per GPU "
              f"(they share its memory and time), {threads} CPU thread(s) each", flush=True)
    pending = list(tasks)
    running: dict[str, tuple[subprocess.Popen, Any, float, str]] = {}
    outcomes: dict[str, Outcome] = {}
    with _children_stopped_on_exit(running):
        _loop(pending, running, outcomes, jobs, work, devices, threads, poll_s, echo, on_done)
    return [outcomes[n] for n in names]


class _Terminated(SystemExit):
    """Raised in the runner by SIGTERM, so that its children are stopped before it exits."""


@contextlib.contextmanager
def _children_stopped_on_exit(running: dict[str, Any]) -> Iterator[None]:
    """Stop every running child (and its own children: each runs in its own process group) when the runner
    leaves by an exception, Ctrl-C or SIGTERM; a rerun then never trains twice into one folder."""
    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        for proc, log, _start, _device in running.values():
            _stop(proc)
            log.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue


def _loop(pending: list[Task], running: dict[str, Any], outcomes: dict[str, Outcome], jobs: int, work: Path,
          devices: list[str], threads: int, poll_s: float, echo: bool,
          on_done: Callable[[Outcome], None] | None) -> None:
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            busy = [r[3] for r in running.values()]
            device = min(devices, key=lambda d: (busy.count(d), devices.index(d))) if devices else ""
            running[task.name] = (*_start(task, work, device, threads), device)
            if echo:
                where = f"GPU {device}" if device else f"{threads} CPU thread(s)"
                print(f"[divaware parallel] start {task.name} ({where})", flush=True)
        time.sleep(poll_s)
        for name, (proc, log, start, device) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            outcomes[name] = _outcome(name, proc.returncode, work, time.perf_counter() - start, device)
            if echo:
                o = outcomes[name]
                state = "done" if o.ok else f"FAILED (see {o.log})"
                print(f"[divaware parallel] {name} {state} in {o.seconds:.0f} s", flush=True)
            if on_done is not None:
                on_done(outcomes[name])  # e.g. record the result at once: an interrupted sweep resumes


def _start(task: Task, work: Path, device: str, threads: int) -> tuple[subprocess.Popen, Any, float]:
    spec = work / f"{task.name}.task.json"
    spec.parent.mkdir(parents=True, exist_ok=True)  # a task name may hold a folder (experiment: mechanism/run)
    spec.write_text(json.dumps({"name": task.name, "function": task.function, "kwargs": task.kwargs}, indent=1))
    (work / f"{task.name}.result.json").unlink(missing_ok=True)
    env = dict(os.environ)
    if device:
        env["CUDA_VISIBLE_DEVICES"] = device
    env.update({k: str(threads) for k in THREAD_VARIABLES})
    log = open(work / f"{task.name}.log", "w")  # noqa: SIM115 - closed when the child ends
    # its own process group (session): the runner stops it together with the kernels/ranks it starts
    proc = subprocess.Popen([sys.executable, "-m", "divaware.parallel", str(spec)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log, time.perf_counter()


def _outcome(name: str, code: int, work: Path, seconds: float, device: str) -> Outcome:
    log = work / f"{name}.log"
    result = work / f"{name}.result.json"
    if code == 0 and result.is_file():
        return Outcome(name, True, json.loads(result.read_text()), log=str(log), seconds=seconds, device=device)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
    why = " | ".join(tail) or f"exit code {code}"
    return Outcome(name, False, error=f"exit code {code}: {why}", log=str(log), seconds=seconds, device=device)


def call(function: str, kwargs: Mapping[str, Any]) -> Any:
    """Call ``"module:name"`` with ``kwargs``."""
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    result = call(spec["function"], spec["kwargs"])
    out = Path(spec_path).with_name(f"{spec['name']}.result.json")
    from divaware.runfolder import write_text

    write_text(out, json.dumps(result, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover - the child side of run_parallel
    sys.exit(_main(sys.argv[1]))
