"""A one-node SLURM cluster for the tests: Debian's ``slurm-wlm`` and ``munge`` on localhost, as root.

:func:`start_cluster` writes ``slurm.conf`` (slurmctld and slurmd on localhost, ``CPUs=2``, a ``debug``
partition, no accounting database: states come from ``squeue``), a munge key, state and spool folders, all
under one temporary folder; starts ``munged``, ``slurmctld`` and ``slurmd`` on free ports; and waits until
``sinfo`` shows the node idle. :meth:`Cluster.stop` stops the three daemons by the pids they wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(name: str) -> str | None:
    """``name`` on PATH or in the sbin folders (daemons live there and a user's PATH may lack them)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def missing_reason() -> str | None:
    """Why the cluster cannot start here (binaries absent, not root), or None."""
    missing = [b for b in BINARIES if which(b) is None]
    if missing:
        return (f"SLURM/munge binaries not found ({', '.join(missing)}): apt-get install slurm-wlm munge "
                "(.ci/run does it)")
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs slurmd, which must run as root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_conf(folder: Path, ctld_port: int, slurmd_port: int, socket_path: Path) -> Path:
    """A minimal one-node slurm.conf under ``folder`` (no cgroups, no accounting)."""
    conf = folder / "slurm.conf"
    settings = {
        "ClusterName": "divaware", "SlurmctldHost": "localhost(127.0.0.1)", "SlurmUser": "root",
        "SlurmctldPort": ctld_port, "SlurmdPort": slurmd_port, "AuthType": "auth/munge",
        "AuthInfo": f"socket={socket_path}", "CredType": "cred/munge", "StateSaveLocation": folder / "state",
        "SlurmdSpoolDir": folder / "spool", "SlurmctldPidFile": folder / "slurmctld.pid",
        "SlurmdPidFile": folder / "slurmd.pid", "SlurmctldLogFile": folder / "slurmctld.log",
        "SlurmdLogFile": folder / "slurmd.log", "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
        "SchedulerType": "sched/backfill", "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_CPU",
        "ReturnToService": 2, "MpiDefault": "none", "SwitchType": "switch/none",
        # a freed CPU is handed to the next job at once (the defaults wait for the scheduler's cycle)
        "SchedulerParameters": "sched_interval=1", "MinJobAge": 600, "KillWait": 5,
    }
    lines = [f"{k}={v}" for k, v in settings.items()]
    lines += ["NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
              "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"]
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class Cluster:
    folder: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def pids(self) -> list[int]:
        pids = []
        for name in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            path = self.folder / name
            if path.is_file() and path.read_text().strip().isdigit():
                pids.append(int(path.read_text().strip()))
        return pids

    def stop(self) -> None:
        """SIGTERM each daemon by its pid file (slurmd, slurmctld, then munged), SIGKILL after 10 s."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def log(self, name: str) -> str:
        path = self.folder / name
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_cluster(folder: Path, timeout_s: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd under ``folder``; returns once ``sinfo`` shows the node idle."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = folder / "munge.socket"
    subprocess.run([which("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                    f"--log-file={folder / 'munged.log'}", f"--pid-file={folder / 'munged.pid'}",
                    f"--seed-file={folder / 'munged.seed'}"], check=True, capture_output=True)
    conf = write_conf(folder, free_port(), free_port(), sock)
    cluster = Cluster(folder, conf)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        subprocess.run([which("slurmctld"), "-c", "-f", str(conf)], check=True, env=env, capture_output=True)
        subprocess.run([which("slurmd"), "-N", "localhost", "-f", str(conf)], check=True, env=env,
                       capture_output=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run([which("sinfo"), "--noheader", "--format=%t"], env=env, capture_output=True,
                                 text=True)
            if out.stdout.strip() == "idle":
                return cluster
            time.sleep(0.3)
        raise RuntimeError(f"the test SLURM node never became idle; slurmctld.log: {cluster.log('slurmctld.log')}"
                           f"\nslurmd.log: {cluster.log('slurmd.log')}")
    except BaseException:
        cluster.stop()
        raise
