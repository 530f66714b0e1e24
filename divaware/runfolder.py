"""The layout of a run folder, in one place, and the one atomic-write helper every run file goes through.

A training run writes one folder (``TrainConfig.out_dir``)::

    <run>/
        config.yaml            the resolved config (``train(TrainConfig.from_yaml(...))`` reproduces the run)
        splits.csv             patient_id, split (train | val), stratum: the fairness-validation split
        metrics.csv            one row per epoch (divaware.train.METRIC_COLUMNS)
        val_scores.csv         per-case validation scores of every validated epoch
        weights_history.csv    the weighting strategy's history (one row per training case and refresh)
        last.pt                everything needed to resume exactly (written after every epoch)
        best.pt                the model with the best fairness-validation selection criterion
        run.lock               present while a process trains the run (owner pid, host, since when)
        results.json           notebook 03's summary of the run
        cache/                 preprocessed cases and voxel-check results, unless ``cache_dir`` is set
        evaluation_<split>[_<checkpoint>][_<tag>]/   evaluations (divaware.evaluate)
        predictions_<split>[_<checkpoint>]/          predictions written by divaware.predict by default

Every reader and writer of these files (package, notebooks, benchmarks) goes through :class:`RunFolder`, so
the names live here only. This module imports neither torch nor the data pipeline at import time, so that
scoring existing predictions stays light.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from divaware.outputs import human_bytes, mount_point, output_error

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
VOXEL_CACHE = "voxel_checks.json"
"""Per-file voxel-check results, in the run's cache folder."""


class DiskFullError(OSError):
    """Writing a run file failed for lack of space; the message names the disk and the space needed."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock; the message names it (pid, host, since when)."""


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------


def temp_path(path: Path, suffix: str = "") -> Path:
    """A hidden temporary name beside ``path``, unique per process and call (pid + random suffix), so two
    processes writing the same file never share a temporary file; ``suffix`` is appended for writers that
    choose the format by extension (``.nii.gz``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], None], size_hint: Callable[[], int] | None = None,
                 suffix: str = "") -> Path:
    """Write ``path`` through ``write(temporary path)`` then rename: readers never see a half-written file
    and an interrupted write leaves the old one. The temporary file is removed on any failure; a full disk
    becomes a :class:`DiskFullError` naming the disk and (with ``size_hint``) the space needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and _is_disk_full(err, path):
            raise DiskFullError(_disk_full_message(path, size_hint() if size_hint else 0)) from None
        mapped = output_error(err, path) if isinstance(err, OSError) else None  # read-only, forbidden
        if mapped is not None:
            raise mapped from None
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text (newlines as given)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write, lambda: len(text.encode()))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN refused: convert it to None first)."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame, index: bool = False) -> Path:
    """Atomically write a table as CSV."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=index),
                        lambda: int(frame.memory_usage(deep=True).sum()))


def torch_save(path: str | Path, obj: Any) -> Path:
    """Atomically ``torch.save`` (a crash never leaves a truncated checkpoint)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), lambda: _state_bytes(obj))


def _is_disk_full(err: BaseException, path: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a full disk as "unexpected pos" / "file write failed" (RuntimeError)
    text = str(err)
    if isinstance(err, RuntimeError) and ("unexpected pos" in text or "write failed" in text):
        try:
            return shutil.disk_usage(path.parent).free < 64 * 1024**2
        except OSError:
            return True
    return False


def _state_bytes(obj: Any) -> int:
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, Mapping):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _disk_full_message(path: Path, needed: int) -> str:
    try:
        usage = shutil.disk_usage(path.parent)
        free = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    except OSError:
        free = "free space unknown"
    return (f"disk full writing {path} (on the disk mounted at {mount_point(path)}: {free}; this file needs about "
            f"{human_bytes(needed)}); free space there or choose another output folder, then run again (the "
            "partial file was removed)")


# ------------------------------------------------------------------------------------------------
# the layout
# ------------------------------------------------------------------------------------------------


def check_name(value: str, what: str) -> str:
    """``value`` if it can name a folder (letters, digits and . + _ -), else a ValueError naming ``what``."""
    if not _NAME_RE.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits and . + _ - (it names a folder)")
    return value


def split_name(split: str | None) -> str:
    """The name a split takes in folder names (``None``: every case, ``all``)."""
    return "all" if split is None else check_name(str(split), "split")


class RunFolder:
    """One run folder: where each of its files lives, and how the tables in it are read."""

    CONFIG = "config.yaml"
    SPLITS = "splits.csv"
    METRICS = "metrics.csv"
    VAL_SCORES = "val_scores.csv"
    WEIGHTS_HISTORY = "weights_history.csv"
    LAST = "last.pt"
    BEST = "best.pt"
    LOCK = "run.lock"
    NOTEBOOK_RESULTS = "results.json"  # notebook 03's summary of the run (divaware.train.run_summary)
    CACHE = "cache"
    CHECKPOINTS = ("best", "last")
    # written by training; an overwrite removes them (evaluations and the cache are kept)
    RESULT_FILES = (LAST, BEST, METRICS, WEIGHTS_HISTORY, VAL_SCORES, SPLITS)
    # what a run writes before its config.yaml: a folder holding only these may be (re)started
    EARLY_FILES = frozenset({SPLITS, CACHE, LOCK})

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def splits(self) -> Path:
        return self.path / self.SPLITS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def val_scores(self) -> Path:
        return self.path / self.VAL_SCORES

    @property
    def weights_history(self) -> Path:
        return self.path / self.WEIGHTS_HISTORY

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def notebook_results(self) -> Path:
        return self.path / self.NOTEBOOK_RESULTS

    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    def checkpoint(self, name: str) -> Path:
        """``best.pt`` or ``last.pt`` (no fallback; see :meth:`checkpoint_to_use`)."""
        if name not in self.CHECKPOINTS:
            raise ValueError(f"checkpoint must be 'best' or 'last', got {name!r}")
        return self.best if name == "best" else self.last

    def checkpoint_to_use(self, name: str) -> Path:
        """The checkpoint file for ``name``: ``best`` falls back to ``last.pt`` when the run never validated.
        A ValueError when neither exists."""
        path = self.checkpoint(name)
        if not path.is_file() and name == "best" and self.last.is_file():
            path = self.last
        if not path.is_file():
            raise ValueError(f"{self.path} holds no checkpoint ({name}.pt); train the run first, or pass "
                             "predictions= to score an existing prediction folder")
        return path

    def cache_dir(self, configured: str | Path | None = None) -> Path:
        """The disk cache of this run: ``configured`` (a config's ``cache_dir``) when given, else the
        ``cache_dir`` recorded in config.yaml, else ``<run>/cache``. Training, predict and evaluate all
        ask here, so the preprocessed cases and voxel checks of a run are found wherever they were put."""
        if configured is None:
            configured = self.read_config().get("cache_dir") or ""
        return Path(configured).expanduser() if str(configured) else self.path / self.CACHE

    def voxel_cache(self, configured: str | Path | None = None, data_root: str | Path | None = None) -> Path:
        """Where this run's voxel checks live: with ``cache`` auto or preprocessed (the default), in the shared
        preprocessed store, one file per data folder (checked once for all runs and ranks); else beside the
        run's own disk cache. ``data_root``: the data folder checked (default: the run's)."""
        config = self.read_config() if self.config.is_file() else {}
        if config.get("cache", "auto") in ("auto", "preprocessed") and (data_root or config.get("data_root")):
            from divaware.paths import voxel_cache_path

            store = configured if configured is not None else config.get("cache_dir") or None
            return voxel_cache_path(data_root or config["data_root"], store or None)
        return self.cache_dir(configured) / VOXEL_CACHE

    def evaluation_dir(self, split: str | None = "test", checkpoint: str = "best", tag: str | None = None
                       ) -> Path:
        """``evaluation_<split>[_<checkpoint>][_<tag>]`` (``best`` is left out of the name)."""
        name = f"evaluation_{split_name(split)}"
        if checkpoint != "best":
            name += f"_{check_name(checkpoint, 'checkpoint')}"
        if tag:
            name += f"_{check_name(tag, 'tag')}"
        return self.path / name

    def predictions_dir(self, split: str | None, checkpoint: str = "best") -> Path:
        """Where :func:`divaware.predict.predict` writes by default: ``predictions_<split>[_last]``."""
        return self.path / (f"predictions_{split or 'all'}" + ("" if checkpoint == "best" else f"_{checkpoint}"))

    # -- reading -----------------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether the folder holds a training run (its config.yaml)."""
        return self.config.is_file()

    def read_config(self) -> dict[str, Any]:
        """config.yaml as a dict ({} when absent); read with yaml, not TrainConfig, so that evaluating
        existing predictions never imports torch."""
        import yaml

        if not self.config.is_file():
            return {}
        values = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        return values if isinstance(values, dict) else {}

    def read_splits(self) -> pd.DataFrame:
        if not self.splits.is_file():
            raise ValueError(f"{self.splits} not found (written by training); is {self.path} a run folder?")
        return pd.read_csv(self.splits, dtype={"patient_id": str})

    def split_ids(self, split: str) -> list[str]:
        """The patient_ids of ``split`` (``train`` or ``val``) in splits.csv, in file order."""
        splits = self.read_splits()
        return splits.loc[splits["split"] == split, "patient_id"].tolist()

    def read_metrics(self) -> pd.DataFrame:
        return pd.read_csv(self.metrics)

    def read_val_scores(self) -> pd.DataFrame:
        return pd.read_csv(self.val_scores, dtype={"patient_id": str})

    def epoch_val_scores(self, epoch: int | None = None) -> pd.DataFrame:
        """One validated epoch's per-case scores (default: the last), index patient_id, one row per case: the
        full sliding-window scores (``kind`` full) where cheap validation also wrote window scores."""
        scores = self.read_val_scores()
        if "kind" in scores.columns:  # with val_patches > 0, refreshes and the last epoch hold both kinds
            scores = scores[scores["kind"].fillna("full") == "full"]
        epoch = int(scores["epoch"].max()) if epoch is None else int(epoch)
        return scores[scores["epoch"] == epoch].set_index("patient_id")

    def read_weights_history(self, **read_csv: Any) -> pd.DataFrame:
        """weights_history.csv (``read_csv`` keywords passed on; patient_id always read as text)."""
        dtype = {"patient_id": str, **read_csv.pop("dtype", {})}
        return pd.read_csv(self.weights_history, dtype=dtype, **read_csv)

    @classmethod
    def find(cls, root: str | Path) -> list[RunFolder]:
        """Every run folder under ``root`` (those holding a config.yaml), sorted by path."""
        return [cls(p.parent) for p in sorted(Path(root).rglob(cls.CONFIG))]

    def only_early_files(self) -> bool:
        """Whether the folder holds only what a run writes before its config.yaml (a kill there must resume)."""
        return all(p.name in self.EARLY_FILES or (p.name.startswith(".") and p.name.endswith(".tmp"))
                   for p in self.path.iterdir())

    def remove_results(self) -> None:
        """Delete what training wrote (for an overwrite); evaluations and the cache stay."""
        for name in self.RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)

    # -- ownership -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the run folder while the block runs: a second process refuses with :class:`RunFolderBusy`
        naming the owner; a lock left by a dead process of this host is taken over with a warning."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise RunFolderBusy(
                        f"run folder {self.path} is in use by pid {owner.get('pid')} on host {owner.get('host')} "
                        f"since {owner.get('since')}; wait for it to finish or choose another out_dir") from None
                warnings.warn(f"{self.lock_file}: taking over a stale lock of a process that no longer runs "
                              f"({owner})", stacklevel=3)
                self.lock_file.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(mine, f)
            return
        raise RunFolderBusy(f"run folder {self.path}: could not take its lock {self.lock_file}")

    def release(self) -> None:
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.lock_file.unlink(missing_ok=True)

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.lock_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # vanished or half-written: treated as stale
        return owner if isinstance(owner, dict) else None

    @staticmethod
    def _stale(owner: Mapping[str, Any]) -> bool:
        """A lock of a process on this host that no longer exists (other hosts' locks are never stale)."""
        if owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError, OverflowError):
            return False
        return False
