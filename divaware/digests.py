"""Content digests of input files: what the preprocessed store and the voxel-check cache are keyed by.

A file edited in place with its size and modification time restored (``touch -d``, a copy tool that keeps
times) is the same file to a (path, size, mtime) key, so a cache keyed that way serves the old voxels. The
key here is a digest of the file's bytes (BLAKE2b, 128 bits) -- of the *compressed* bytes of a ``.nii.gz``,
which costs a read but no decompression, a fraction of what the first voxel check spends anyway.

Re-reading every file on every run would cost that read each time, so a digest is remembered together
with the file's status (size, mtime, ctime, inode, device): in this process, and in ``memo`` folders
(one small JSON per file) where the caller keeps one. The ctime cannot be set back by a user (only the
system clock can), so any write to the file gives a new status and the bytes are read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = ["file_digest", "file_status", "bytes_digest", "files_digests", "remember"]

_MEMO: dict[str, tuple[list[int], str]] = {}


def file_status(path: str | Path) -> list[int]:
    """What changes whenever the file's bytes may have: size, mtime, ctime (ns), inode and device."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def bytes_digest(path: str | Path) -> str:
    """BLAKE2b-128 of the file's bytes, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _memo_file(memo: Path, resolved: str) -> Path:
    return memo / f"{hashlib.sha1(resolved.encode()).hexdigest()[:24]}.json"


def _read_memo(memo: Path | None, resolved: str, status: list[int]) -> str | None:
    if memo is None:
        return None
    try:
        entry = json.loads(_memo_file(memo, resolved).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(entry, dict) and entry.get("path") == resolved and entry.get("status") == status:
        return str(entry.get("digest") or "") or None
    return None


def _write_memo(memo: Path | None, resolved: str, status: list[int], digest: str) -> None:
    if memo is None:
        return
    target = _memo_file(memo, resolved)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    # a read-only or full store only loses the memo (the bytes are read again next time), never the run
    with contextlib.suppress(OSError):
        memo.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"path": resolved, "status": status, "digest": digest}), encoding="utf-8")
        os.replace(tmp, target)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def file_digest(path: str | Path, memo: str | Path | None = None) -> str:
    """The content digest of one file, read again only when its status (:func:`file_status`) changed."""
    resolved = str(Path(path).resolve())
    status = file_status(resolved)
    known = _MEMO.get(resolved)
    if known is not None and known[0] == status:
        return known[1]
    memo_dir = Path(memo) if memo is not None else None
    digest = _read_memo(memo_dir, resolved, status)
    if digest is None:
        digest = bytes_digest(resolved)
        _write_memo(memo_dir, resolved, status, digest)
    _MEMO[resolved] = (status, digest)
    return digest


def files_digests(paths: Sequence[str | Path], memo: str | Path | None = None) -> list[str]:
    """:func:`file_digest` of each path, in order."""
    return [file_digest(p, memo) for p in paths]


def remember(path: str | Path, digest: str, memo: str | Path | None = None) -> None:
    """Record a digest just computed from the bytes written (so the next :func:`file_digest` reads nothing)."""
    resolved = str(Path(path).resolve())
    status = file_status(resolved)
    _MEMO[resolved] = (status, digest)
    _write_memo(Path(memo) if memo is not None else None, resolved, status, digest)
