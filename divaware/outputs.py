"""Writing into output folders: one-line errors for read-only, forbidden and full output folders.

Every command writes only under its own output folder (run folder, prediction folder, evaluation folder).
When that fails for a reason the user must fix -- a read-only file system (``EROFS``), no permission
(``EACCES``/``EPERM``) or a full disk (``ENOSPC``/``EDQUOT``) -- :func:`output_error` turns the ``OSError``
into an :class:`OutputError` whose one line names the path, the cause, the free space (in units that fit
the disk: ``0 B free of 10.0 MiB``, not ``0 MiB free of 0.0 GiB``) and what to do. :func:`ensure_writable`
checks a folder up front, so a run fails before its first hour of work rather than after it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS,)
FORBIDDEN = (errno.EACCES, errno.EPERM)


class OutputError(ValueError):
    """An output folder cannot be written (read-only, forbidden, full); the message names path and fix."""


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 (``0 B``, ``512 KiB``, ``3.2 GiB``)."""
    value = float(max(n, 0))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    """The mount point of the disk holding ``path`` (or its nearest existing parent)."""
    mount = _existing(path).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return mount


def free_space(path: Path) -> str:
    """``"<free> free of <total> on the disk mounted at <mount>"`` for the disk holding ``path``."""
    try:
        usage = shutil.disk_usage(_existing(path))
        space = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    except OSError:
        space = "free space unknown"
    return f"{space} on the disk mounted at {mount_point(path)}"


def output_error(err: BaseException, path: Path, what: str = "output folder") -> OutputError | None:
    """The one-line :class:`OutputError` for a read-only/forbidden/full output ``path``, or None for other errors."""
    code = getattr(err, "errno", None)
    if code in FULL:
        return OutputError(f"disk full writing {path} ({free_space(path)}); free space there or choose another "
                           f"{what}, then run again (the partial file was removed)")
    if code in READ_ONLY:
        return OutputError(f"cannot write {path}: the {what} is on a read-only file system ({mount_point(path)}); "
                           f"choose a writable {what}")
    if code in FORBIDDEN:
        return OutputError(f"cannot write {path}: no permission to write the {what} ({os.strerror(code)}); "
                           f"choose a {what} you may write to, or fix its permissions")
    return None


def ensure_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file (removed again); returns it.

    Raises :class:`OutputError` (one line, path named) when it is read-only, forbidden or full."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".divaware-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        mapped = output_error(err, Path(getattr(err, "filename", None) or folder), what)
        if mapped is None:
            raise
        raise mapped from None
    return folder
