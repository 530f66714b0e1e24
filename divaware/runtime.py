"""The machine a run executes on: thread settings for busy CPUs, a description of the machine, peak memory.

Thread settings
---------------
PyTorch's CPU kernels run in an OpenMP thread pool (GNU OpenMP in the PyPI wheels). By default its idle
threads *spin* for a while at every barrier instead of sleeping. On an idle machine that saves a few
microseconds per parallel region; on a machine where another process wants a core it is a disaster: the
spinning threads take the CPU from the thread the barrier is waiting for, and a training step that takes
0.3 s alone took 3 s next to other work (measured on this project's 2-core CPU machine, see
``benchmarks/main_job_speed.py``). ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep; the cost on an
idle machine is a wake-up per parallel region. :func:`thread_env` is what ``divaware run`` / ``sweep``
give the notebook kernels they start (a value the user set in the environment is kept), because the policy
is read once, when the OpenMP runtime loads -- setting it inside a kernel after ``import torch`` does
nothing.

Machine and memory
------------------
:func:`machine_info` describes CPU, cores, memory, Python/torch versions and threads, so a timing is never
reported without the machine it came from. :class:`PeakMemory` samples the resident memory of this process
and all its descendants (the notebook kernels papermill starts) in a background thread.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Environment given to the notebook kernels started by the pipeline (user settings take precedence).
THREAD_ENV: dict[str, str] = {
    # idle OpenMP threads sleep instead of spinning against other processes (see the module docstring)
    "OMP_WAIT_POLICY": "PASSIVE",
}

# Variables recorded with every timing: they decide how many threads the numeric libraries use.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def thread_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The thread settings to export to child processes: :data:`THREAD_ENV` minus what ``environ``
    (default ``os.environ``) already sets, so a user's explicit choice always wins."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in THREAD_ENV.items() if k not in environ}


def apply_thread_env() -> dict[str, str]:
    """Export :func:`thread_env` into ``os.environ`` (inherited by kernels started afterwards); returns
    what was set."""
    added = thread_env()
    os.environ.update(added)
    return added


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity / container limits where the OS reports them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python / torch / MONAI versions, torch threads and thread variables."""
    import psutil

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_interop_threads=torch.get_num_interop_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        from importlib.metadata import version

        info["monai"] = version("monai")
    except Exception:  # pragma: no cover - only informative
        pass
    info["thread_env"] = {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line naming the machine of :func:`machine_info`, e.g. for a README table."""
    parts = [f"{info.get('cpu', '?')}", f"{info.get('usable_cores', '?')} of {info.get('logical_cores', '?')} cores"]
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB RAM")
    if info.get("cuda"):
        parts.append(str(info["cuda"]))
    parts.append(f"torch {info.get('torch', '?')} ({info.get('torch_threads', '?')} threads)")
    policy = (info.get("thread_env") or {}).get("OMP_WAIT_POLICY")
    if policy:
        parts.append(f"OMP_WAIT_POLICY={policy}")
    parts.append(f"Python {info.get('python', '?')}")
    return ", ".join(parts)


class PeakMemory:
    """Peak resident memory (bytes) of this process plus all its descendants, sampled every ``interval``
    seconds in a daemon thread while the ``with`` block runs.

    The sum over the process tree is what the machine has to hold at once (a papermill run is this
    process plus a kernel); sampling can miss a spike shorter than ``interval``.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = float(interval)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a child that ended between listing and reading
        self.peak = max(self.peak, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="divaware-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def utc_now() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def command_line() -> str:
    """The command that started this process, as typed (for the record)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
