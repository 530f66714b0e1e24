"""Where the tasks of a batch command run: this machine (:class:`LocalExecutor`) or a SLURM cluster
(:class:`SlurmExecutor`, through submitit).

A batch command (``divaware sweep``, ``divaware experiment``) builds :class:`divaware.parallel.Task` objects
(``module:function`` plus JSON keyword arguments) and hands them to one executor's :meth:`Executor.run`,
which returns one :class:`~divaware.parallel.Outcome` per task and calls ``on_done`` as each one is known.
Both executors keep a **job book** (``jobs.json`` in the command's output folder): per task its job id, state,
log files and, for a failure, the end of its log. ``divaware sweep --status OUT`` reads it
(:func:`status_rows`).

* :class:`LocalExecutor` is what the commands always did: one task after another in this process
  (``jobs=1``), or :func:`divaware.parallel.run_parallel` (``jobs > 1`` or GPUs).
* :class:`SlurmExecutor` submits the tasks as one SLURM job array (``array_parallelism`` of them at once)
  with submitit, which writes the sbatch script from its parameters (nothing here writes one). Options map
  one to one onto sbatch's (:class:`SlurmOptions`). A re-run attaches to the jobs of the book that are still
  queued or running and resubmits only the failed or missing ones; a job stopped by its time limit or by
  preemption is requeued by submitit (the task is :class:`submitit.helpers.Checkpointable`) and, like a job
  killed with ``scancel`` and resubmitted by the re-run, continues from the run's last checkpoint, since every
  training resumes from ``last.pt``. Ctrl-C while waiting leaves the jobs running unless ``cancel=True``.
  Job states come from ``squeue`` (which every SLURM installation answers; ``sacct`` needs an accounting
  database), and a job that left the queue has finished: its submitit result file says done or failed, and
  no result file means it was killed (scancel, time limit without requeue, node failure).
* A job with ``ranks_per_job`` N > 1 runs N SLURM tasks on one node; each exports the torch distributed
  environment from SLURM's (submitit's :class:`~submitit.helpers.TorchDistributedEnvironment`), so the
  training inside joins the same :class:`divaware.distributed.Ranks` group that ``torchrun`` gives it.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import submitit

from divaware import parallel
from divaware.parallel import Outcome, Task

EXECUTORS = ("local", "slurm")
BOOK = "jobs.json"
# squeue states of a job that is still the scheduler's (it may yet run, or run again after a requeue)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
TAIL_LINES = 8


class SchedulerError(RuntimeError):
    """The SLURM scheduler cannot be used (client commands missing, controller unreachable); one line."""


# ---------------------------------------------------------------------------------------------- the job book
class JobBook:
    """``jobs.json``: task name -> {executor, job_id, state, log, ...}; written atomically at every change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.jobs: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.jobs = json.loads(self.path.read_text()).get("jobs", {})
            except (ValueError, OSError):
                self.jobs = {}

    def update(self, name: str, **values: Any) -> None:
        self.jobs[name] = {**self.jobs.get(name, {}), **values}
        self.save()

    def save(self) -> None:
        from divaware.runfolder import write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"jobs": self.jobs}, indent=1, default=str))


def _utc() -> str:
    from divaware.runtime import utc_now

    return utc_now()


def log_tail(path: str | Path | None, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a log file, joined by `` | `` ("" if absent)."""
    if not path or not Path(path).is_file():
        return ""
    text = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-2000:]


# ---------------------------------------------------------------------------------------------- the interface
class Executor:
    """Runs :class:`~divaware.parallel.Task` objects and records them in a job book."""

    name = "base"

    def run(self, tasks: Sequence[Task], work_dir: str | Path, book: str | Path,
            on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:  # pragma: no cover - interface
        """Run ``tasks``; ``work_dir`` holds their logs, ``book`` is the job book; one outcome per task, in order."""
        raise NotImplementedError


@dataclass
class LocalExecutor(Executor):
    """This machine: in this process one after another (``jobs == 1`` and no ``devices``), else child
    processes (:func:`divaware.parallel.run_parallel`)."""

    jobs: int = 1
    devices: list[str] | None = None
    name = "local"

    def run(self, tasks: Sequence[Task], work_dir: str | Path, book: str | Path,
            on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        ledger = JobBook(book)
        for task in tasks:
            ledger.update(task.name, executor="local", job_id=None, state="PENDING", error="",
                          log=str(Path(work_dir) / f"{task.name}.log") if self._children else "")

        def done(o: Outcome) -> None:
            ledger.update(o.name, state="DONE" if o.ok else "FAILED", error=o.error[-2000:], ended_utc=_utc(),
                          seconds=round(o.seconds, 1))
            if on_done is not None:
                on_done(o)

        if self._children:
            return parallel.run_parallel(tasks, self.jobs, work_dir, devices=self.devices, on_done=done)
        outcomes = []
        for i, task in enumerate(tasks, 1):  # in this process, one after another, as always
            print(f"[divaware] {i}/{len(tasks)} {task.name} ...", flush=True)
            ledger.update(task.name, state="RUNNING", started_utc=_utc())
            start = time.perf_counter()
            try:
                outcomes.append(Outcome(task.name, True, parallel.call(task.function, task.kwargs),
                                        seconds=time.perf_counter() - start))
            except Exception as err:  # reported by the caller; the other tasks go on
                outcomes.append(Outcome(task.name, False, error=f"{type(err).__name__}: {err}",
                                        seconds=time.perf_counter() - start))
            done(outcomes[-1])
        return outcomes

    @property
    def _children(self) -> bool:
        return self.jobs > 1 or bool(self.devices)


# ---------------------------------------------------------------------------------------------- SLURM options
@dataclass
class SlurmOptions:
    """The SLURM resources of every job (``None``: the cluster's default). Each maps onto one sbatch option:
    ``partition`` -> ``--partition``, ``time`` (minutes) -> ``--time``, ``gpus_per_task`` -> ``--gpus-per-task``,
    ``cpus_per_task`` -> ``--cpus-per-task``, ``mem`` -> ``--mem``, ``account`` -> ``--account``, ``qos`` ->
    ``--qos``, ``ranks_per_job`` -> ``--ntasks-per-node`` (DDP ranks of one training on one node),
    ``array_parallelism`` -> the ``%N`` of ``--array`` (jobs running at once), ``extra`` -> any other
    ``--KEY=VALUE``."""

    partition: str | None = None
    time: int = 60
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    ranks_per_job: int = 1
    array_parallelism: int = 64
    extra: dict[str, str] = field(default_factory=dict)
    poll_s: float = 5.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "slurm") -> SlurmOptions:
        """Options from a YAML ``slurm:`` section (or CLI values); unknown keys or bad values name themselves."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown SLURM option(s) {unknown}; expected some of {sorted(known)} "
                             "(anything else goes in extra: {KEY: VALUE}, passed as sbatch --KEY=VALUE)")
        for key in ("time", "gpus_per_task", "cpus_per_task", "ranks_per_job", "array_parallelism"):
            if values.get(key) is not None:
                try:
                    values[key] = _minutes(values[key]) if key == "time" else int(values[key])
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: {key} must be a whole number"
                                     f"{' of minutes or [D-]HH:MM[:SS]' if key == 'time' else ''}, "
                                     f"got {values[key]!r}") from None
                if values[key] < (0 if key == "gpus_per_task" else 1):
                    raise ValueError(f"{where}: {key} must be positive, got {values[key]}")
        extra = values.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"{where}: extra must map sbatch option names to values, got {extra!r}")
        values["extra"] = {str(k).lstrip("-").replace("_", "-"): str(v) for k, v in extra.items()}
        return cls(**{k: v for k, v in values.items() if v is not None})

    def submitit_parameters(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`submitit.SlurmExecutor.update_parameters`."""
        params: dict[str, Any] = {"time": self.time, "nodes": 1, "ntasks_per_node": self.ranks_per_job,
                                  "array_parallelism": self.array_parallelism}
        for key in ("partition", "gpus_per_task", "cpus_per_task", "mem", "account", "qos"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.extra:
            params["additional_parameters"] = dict(self.extra)
        return params


def _minutes(value: Any) -> int:
    """Minutes from an int or SLURM's ``[D-]HH:MM[:SS]`` / ``MM`` (rounded up)."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        minutes = parts[0] * 1.0
    else:
        parts += [0] * (3 - len(parts))
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return int(-(-(minutes + (int(days) * 1440 if days else 0)) // 1))


def parse_slurm_args(items: Sequence[str] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (``--slurm-arg``) as a dict; a malformed item names itself."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-arg {item!r} must be KEY=VALUE (an sbatch option without its dashes, "
                             "e.g. constraint=a100)")
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- the scheduler
def check_scheduler() -> None:
    """Raise :class:`SchedulerError` (one line) when SLURM's commands are missing or its controller does not
    answer (``scontrol ping``), naming the configuration file in use."""
    missing = [c for c in ("sbatch", "squeue", "scancel", "scontrol") if shutil.which(c) is None]
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf (SLURM_CONF is not set)"
    if missing:
        raise SchedulerError(f"--executor slurm needs SLURM's client commands; {', '.join(missing)} not found on "
                             "PATH (install slurm-client or load the cluster's slurm module)")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"the SLURM controller did not answer `scontrol ping` within 60 s; check that slurmctld "
                             f"runs and that SLURM_CONF={conf} names this cluster's slurm.conf") from None
    if "UP" not in ping.stdout:  # a backup controller that is down still leaves the primary UP
        said = " ".join((ping.stdout + " " + ping.stderr).split())[:300]
        raise SchedulerError(f"the SLURM controller does not answer ({said}); check that slurmctld runs and "
                             f"that SLURM_CONF={conf} names this cluster's slurm.conf")


def queue_states() -> dict[str, str]:
    """State of every job of this user that the scheduler still lists (array tasks one by one), by job id."""
    out = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--user", getpass.getuser(),
                          "--format=%i|%T"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
        raise SchedulerError(f"squeue failed ({' '.join(out.stderr.split())[:300]}); SLURM_CONF={conf}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state.strip()
    return states


class SlurmTask(submitit.helpers.Checkpointable):
    """The callable a SLURM job runs: one task's function, with the ranks and threads SLURM gave the job.

    A submitit Checkpointable: at the time limit or a preemption submitit requeues it as it is (same job id),
    and the training inside resumes from its last checkpoint."""

    def __init__(self, function: str, kwargs: dict[str, Any]) -> None:
        self.function, self.kwargs = function, kwargs

    def __call__(self) -> Any:
        cpus = _job_cpus()
        if cpus:  # torch (and a notebook's kernel, which inherits the environment) uses the job's cores only
            for name in parallel.THREAD_VARIABLES:
                os.environ[name] = str(cpus)
            import torch

            torch.set_num_threads(int(cpus))
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # one DDP rank per SLURM task: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's variables,
            # which divaware.distributed.setup reads exactly as it reads torchrun's
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if len(visible) == 1:
                # --gpus-per-task binds one GPU to each task, which then sees it as cuda:0; LOCAL_RANK is only
                # the device index in divaware.distributed.setup (ranks come from RANK)
                os.environ["LOCAL_RANK"] = "0"
        return parallel.call(self.function, self.kwargs)


def job_rank() -> int:
    """This process's DDP rank in a multi-task job (``RANK`` as exported by :class:`SlurmTask` or torchrun); 0
    otherwise. Tasks train on every rank and evaluate or write their results on rank 0 only."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0
    return int(os.environ.get("RANK", "0") or 0)


def _job_cpus() -> int | None:
    """CPUs SLURM allocated to this task: ``--cpus-per-task``, else the node's allocation over its tasks."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    node = os.environ.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0].split(",")[0]
    if not node.isdigit():
        return None
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", os.environ.get("SLURM_NTASKS", "1")).split("(")[0])
    return max(1, int(node) // max(1, per_node))


@dataclass
class SlurmExecutor(Executor):
    """A SLURM cluster through submitit: one job array per :meth:`run`, ``options.array_parallelism`` at once."""

    options: SlurmOptions = field(default_factory=SlurmOptions)
    cancel: bool = False  # Ctrl-C while waiting: scancel the jobs (else they keep running)
    echo: bool = True
    name = "slurm"

    def run(self, tasks: Sequence[Task], work_dir: str | Path, book: str | Path,
            on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        check_scheduler()
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        ledger = JobBook(book)
        queue = queue_states()
        jobs: dict[str, str] = {}
        fresh = []
        for task in tasks:
            record = ledger.jobs.get(task.name) or {}
            if record.get("executor") == "slurm" and queue.get(str(record.get("job_id"))) in ACTIVE:
                jobs[task.name] = str(record["job_id"])  # still queued or running: wait for it, do not resubmit
                self._say(f"{task.name}: job {record['job_id']} is still {queue[str(record['job_id'])]}, waiting for it")
            else:
                fresh.append(task)
        jobs.update(self._submit(fresh, work, ledger))
        outcomes: dict[str, Outcome] = {}
        try:
            self._wait(jobs, work, ledger, outcomes, on_done)
        except KeyboardInterrupt:
            left = [jobs[n] for n in jobs if n not in outcomes]
            if self.cancel and left:
                subprocess.run(["scancel", *left], check=False)
                for name in jobs:
                    if name not in outcomes:
                        ledger.update(name, state="CANCELLED", ended_utc=_utc())
                self._say(f"cancelled {len(left)} job(s): {' '.join(left)}")
            elif left:
                self._say(f"interrupted; {len(left)} job(s) keep running on the cluster ({' '.join(left)}): "
                          f"`divaware sweep --status {Path(book).parent}` shows them, re-running the same command "
                          "waits for them and collects the results (--cancel cancels them on Ctrl-C)")
            raise
        return [outcomes[t.name] for t in tasks]

    def _say(self, text: str) -> None:
        if self.echo:
            print(f"[divaware slurm] {text}", flush=True)

    def _submit(self, tasks: Sequence[Task], work: Path, ledger: JobBook) -> dict[str, str]:
        if not tasks:
            return {}
        executor = submitit.SlurmExecutor(folder=work, max_num_timeout=20)
        executor.update_parameters(job_name=f"divaware-{work.parent.name}"[:60], **self.options.submitit_parameters())
        with executor.batch():
            submitted = [executor.submit(SlurmTask(t.function, dict(t.kwargs))) for t in tasks]
        ids = {}
        for task, job in zip(tasks, submitted, strict=True):
            ids[task.name] = str(job.job_id)
            ledger.update(task.name, executor="slurm", job_id=str(job.job_id), state="PENDING", error="",
                          submitted_utc=_utc(), submitted_at=time.time(), started_at=None,
                          log=str(job.paths.stdout), err_log=str(job.paths.stderr),
                          result=str(job.paths.result_pickle))
        self._say(f"submitted {len(tasks)} job(s) to SLURM: {' '.join(ids.values())} (logs in {work})")
        return ids

    def _wait(self, jobs: dict[str, str], work: Path, ledger: JobBook, outcomes: dict[str, Outcome],
              on_done: Callable[[Outcome], None] | None) -> None:
        gone_once: set[str] = set()
        while len(outcomes) < len(jobs):
            queue = queue_states()
            for name, job_id in jobs.items():
                if name in outcomes:
                    continue
                state = queue.get(job_id)
                record = ledger.jobs[name]
                if state in ACTIVE:
                    if state != record.get("state"):
                        values: dict[str, Any] = {"state": state}
                        if state == "RUNNING" and not record.get("started_at"):
                            values["started_at"] = time.time()
                        ledger.update(name, **values)
                    continue
                result = Path(record.get("result") or submitit.core.utils.JobPaths(work, job_id).result_pickle)
                if not result.is_file() and name not in gone_once:
                    gone_once.add(name)  # left the queue a moment before its result file shows: look once more
                    continue
                outcomes[name] = self._outcome(name, job_id, state, result, record)
                o = outcomes[name]
                ledger.update(name, state="DONE" if o.ok else "FAILED", error=o.error[-2000:], ended_utc=_utc())
                self._say(f"{name} (job {job_id}) {'done' if o.ok else 'FAILED: ' + o.error[-300:]}")
                if on_done is not None:
                    on_done(o)
            if len(outcomes) < len(jobs):
                time.sleep(self.options.poll_s)

    @staticmethod
    def _outcome(name: str, job_id: str, state: str | None, result: Path, record: Mapping[str, Any]) -> Outcome:
        log = record.get("log", "")
        seconds = time.time() - float(record.get("started_at") or record.get("submitted_at") or time.time())
        if result.is_file():
            outcome, value = submitit.core.utils.pickle_load(result)
            if outcome == "success":
                return Outcome(name, True, value, log=log, seconds=seconds, device=f"slurm job {job_id}")
            why = str(value).strip().splitlines()[-1:] or [""]
            return Outcome(name, False, error=f"job {job_id} raised: {why[0]} | log: {log_tail(record.get('err_log'))}",
                           log=log, seconds=seconds, device=f"slurm job {job_id}")
        ended = state or "no longer in the queue"
        return Outcome(name, False, error=f"job {job_id} ended without a result ({ended}: killed by scancel, its "
                                          f"time limit or a node failure) | log: {log_tail(record.get('err_log'))}",
                       log=log, seconds=seconds, device=f"slurm job {job_id}")


# ---------------------------------------------------------------------------------------------- choosing, status
def make_executor(kind: str = "local", *, jobs: int = 1, devices: list[str] | None = None,
                  slurm: Mapping[str, Any] | SlurmOptions | None = None, cancel: bool = False) -> Executor:
    """The executor ``kind`` (``local`` or ``slurm``) of a batch command."""
    if kind == "local":  # a YAML slurm: section is kept for --executor slurm; it does not change a local run
        return LocalExecutor(jobs=jobs, devices=devices)
    if kind == "slurm":
        options = slurm if isinstance(slurm, SlurmOptions) else SlurmOptions.from_mapping(slurm)
        return SlurmExecutor(options=options, cancel=cancel)
    raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")


def work_folder(out: str | Path, executor: Executor) -> Path:
    """Where an executor keeps the logs of a command writing into ``out``: ``logs/`` (local, as always) or
    ``slurm/`` (submitit's scripts, logs and result files)."""
    return Path(out) / ("slurm" if executor.name == "slurm" else "logs")


def status_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per task of the job book in ``out``: name, executor, job id, state (PENDING, RUNNING, DONE,
    FAILED, ...) and, for a failed one, the end of its log. SLURM jobs the book still lists as queued or
    running are looked up in ``squeue``; one that left the queue is DONE or FAILED by its result file."""
    path = Path(out) / BOOK
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out} is not the folder of a sweep or experiment "
                                "started by this version of divaware (or nothing was started yet)")
    ledger = JobBook(path)
    live = None
    rows = []
    for name, record in ledger.jobs.items():
        state = record.get("state", "?")
        tail = record.get("error", "") if state == "FAILED" else ""
        if record.get("executor") == "slurm" and state not in ("DONE", "FAILED", "CANCELLED"):
            if live is None:
                try:
                    live = queue_states()
                except (SchedulerError, OSError, subprocess.SubprocessError) as err:
                    live = {}
                    print(f"[divaware status] cannot ask the scheduler ({err}); showing the recorded states")
            now = live.get(str(record.get("job_id")))
            if now is not None and now in ACTIVE:
                state = now
            elif live:
                result = Path(record.get("result", ""))
                if result.is_file() and submitit.core.utils.pickle_load(result)[0] == "success":
                    state = "DONE"
                else:
                    state = "FAILED"
                    tail = log_tail(record.get("err_log")) or f"ended without a result ({now or 'left the queue'})"
        elif state == "FAILED" and record.get("err_log"):
            tail = log_tail(record.get("err_log")) or tail
        rows.append({"task": name, "executor": record.get("executor", ""), "job_id": record.get("job_id") or "",
                     "state": state, "log": record.get("log", ""), "log_tail": tail})
    return rows


def status_table(out: str | Path) -> str:
    """:func:`status_rows` as text: a count per state, one line per task, then each failure's log tail."""
    rows = status_rows(out)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    width = max([len(r["task"]) for r in rows] + [4])
    lines = [f"{out}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())),
             f"{'task':<{width}}  {'executor':<8}  {'job':<12}  {'state':<10}  log"]
    for r in rows:
        lines.append(f"{r['task']:<{width}}  {r['executor']:<8}  {str(r['job_id']):<12}  {r['state']:<10}  {r['log']}")
    for r in rows:
        if r["state"] == "FAILED":
            lines.append(f"FAILED {r['task']}: {r['log_tail']}")
    return "\n".join(lines)
