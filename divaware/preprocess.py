"""Preprocess once per data fingerprint, read only the patch: the data path for real-size volumes.

The in-memory path of :mod:`divaware.data` suits the CPU-sized synthetic cohort; for MAMA-MIA-sized volumes
(up to 512 x 512 x 184 voxels x 3-6 phases) it reads and re-pads whole cases to cut two patches. This module
follows the scheme nnU-Net made standard -- one preprocessing pass per dataset and setting, cropped to the
non-zero region, stored uncompressed so that a memory map reads about the patch, foreground locations kept
aside for the oversampled patches -- written for :func:`divaware.data.preprocessing`:

* **One store per machine**, shared by every run, sweep job and rank: ``$DIVAWARE_PREPROCESSED``, else
  ``<divaware cache>/preprocessed`` (:func:`store_root`; never inside the data folder). One entry per case,
  named by a hash of the contents of the case's files (:mod:`divaware.digests`), its breast box and every
  setting that changes the stored arrays (:func:`settings_key`), so an edited file (even with its size and
  mtime kept) or a changed setting gives a new entry and nothing stale is ever read. Each entry records a
  checksum per file and its patient id; an entry that fails them when used again (damaged bytes, a file cut
  short, an unreadable ``meta.json``, swapped folders) is rebuilt with a warning naming it. The split, seed, patch size and whether the case trains or validates do
  not enter: the stored arrays are the same for all of them, and padding/patch sampling happen at read time.
* **Atomic, concurrent, resumable fills.** A case is written into a private temporary folder and renamed
  into place; a per-case file lock makes a second process wait for the first instead of repeating the work.
  An interrupted fill leaves finished cases in place and only the unfinished ones are redone.
* **Compact and sliceable.** ``image.npy``: float16 channels x X x Y x Z, cropped to the box of the non-zero
  voxels (outside it every channel is exactly 0 after the nonzero z-score and the mask is empty, so the crop
  loses nothing and is re-padded with zeros on read); ``label.npy``: the mask as bits packed along Z;
  ``fg.npy``: up to :data:`MAX_FG_POINTS` foreground coordinates (int16). ``precision="uint8"``
  (:data:`PRECISIONS`) stores 1 byte per phase instead of 2, quantised per case and phase. A C-order array read through
  ``np.load(mmap_mode="r")`` touches, for a patch, whole Z rows of the patch's X x Y columns only, i.e.
  about ``Z / patch_z`` times the patch bytes (1-1.5x for MAMA-MIA's 44-200 slices at patch 128).
  Chunked/compressed stores (zarr, blosc) were not chosen: float16 z-scores of noisy MR images compress
  poorly, and a chunk grid costs whole chunks at every patch border.

:class:`PatchSampled` and :class:`LoadVolumed` are the MONAI transforms that read entries for training and
full validation; :func:`validation_windows` and :func:`patch_scores` give the cheap per-epoch validation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from divaware import data as D

# where the store lives is a path question (divaware.paths): the run folder asks it without loading torch
from divaware.paths import STORE_ENV, store_root, voxel_cache_path  # noqa: F401 (re-exported)

STORE_VERSION = 2
"""Version 2: entries keyed by content digests, with per-file checksums in meta.json. Bump when the stored format or the preprocessing code changes what is stored: old entries are not read."""
DIGESTS = "digests"
"""The store's memo of input-file digests (:mod:`divaware.digests`): a later run reads no input file to key it."""
MAX_FG_POINTS = 10_000
"""Foreground coordinates kept per case (a seeded subsample): enough to centre tumour patches uniformly."""
PAGE = 4096
PRECISIONS = ("float16", "uint8")
"""Stored image precision: float16 (2 bytes per channel and voxel), or uint8 (1 byte: per case and channel,
the non-zero voxels quantised linearly to 1..255 over their range, 0 kept for exact zeros; an error of at
most half a step, about 0.01-0.05 SD of the z-scored intensities)."""


def settings_key(spec: D.DataSpec, precision: str) -> str:
    """Hash of the settings that change the stored arrays (not patch size, sampling or augmentation)."""
    if precision not in PRECISIONS:
        raise ValueError(f"store precision must be one of {PRECISIONS}, got {precision!r}")
    payload = {"version": STORE_VERSION, "precision": precision, "phases": list(spec.phases), "subtraction": spec.subtraction,
               "spacing": None if spec.spacing is None else list(spec.spacing),
               "crop_to_breast": spec.crop_to_breast, "breast_margin": spec.breast_margin}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def case_key(record: Mapping[str, Any], spec: D.DataSpec, precision: str, memo: Path | None = None) -> str:
    """Hash of one case's files' contents (:func:`divaware.digests.file_digest`, remembered in ``memo``),
    its breast box and :func:`settings_key`: a file edited in place, even with its size and mtime kept,
    gives another key."""
    from divaware.digests import file_digest

    files = [file_digest(p, memo) for p in record[D.IMAGE]]
    if D.LABEL in record:
        files.append(file_digest(record[D.LABEL], memo))
    payload = {"settings": settings_key(spec, precision), "files": files, "box": record.get(D.BOX),
               "label": D.LABEL in record}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def entry_dir(root: Path, record: Mapping[str, Any], spec: D.DataSpec, precision: str) -> Path:
    """Where a case's entry lives (it exists only once complete)."""
    return (Path(root) / f"v{STORE_VERSION}-{settings_key(spec, precision)}"
            / f"{record[D.PID]}-{case_key(record, spec, precision, Path(root) / DIGESTS)}")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) held for the block; other processes wait for it.

    On a read-only store (a filled store shared read-only) no lock can be created, and none is needed:
    no process can write there either, so the block runs unlocked and only reads."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - closed below, after the block
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# filling
# --------------------------------------------------------------------------------------------------


def _write_entry(record: Mapping[str, Any], spec: D.DataSpec, final: Path, precision: str) -> None:
    """Preprocess one case (:func:`divaware.data.preprocessing`, the same steps as every mode) and store it."""
    from monai.transforms import Compose

    with_label = D.LABEL in record
    out = Compose(D.preprocessing(spec, with_label=with_label))(dict(record))
    image = out[D.IMAGE].as_subclass(torch.Tensor).numpy()
    label = (out[D.LABEL].as_subclass(torch.Tensor).numpy()[0] > 0.5) if with_label else None
    full_shape = image.shape[1:]
    nonzero = np.any(image != 0, axis=0)
    if label is not None:
        nonzero |= label  # never crop tumour away, even where every phase reads 0
    if nonzero.any():
        idx = [np.flatnonzero(nonzero.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        lo = [int(i[0]) for i in idx]
        hi = [int(i[-1]) + 1 for i in idx]
    else:
        lo, hi = [0, 0, 0], [int(s) for s in full_shape]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    image, quant = _encode(image[(slice(None), *sl)], precision)
    meta: dict[str, Any] = {"precision": precision, "quant": quant, "patient_id": str(record[D.PID]), "shape": list(image.shape[1:]),
                            "channels": int(image.shape[0]), "full_shape": [int(s) for s in full_shape],
                            "crop_start": lo, "has_label": with_label, "version": STORE_VERSION}
    tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _save_entry(tmp, final, image, label, sl, meta)
    except OSError as err:  # a full or read-only store: one line naming it, not numpy's traceback
        from divaware.outputs import output_error

        mapped = output_error(err, final, f"preprocessed store (${STORE_ENV})")
        if mapped is None:
            raise
        raise mapped from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_entry(tmp: Path, final: Path, image: np.ndarray, label: np.ndarray | None, sl: tuple[slice, ...],
                meta: dict[str, Any]) -> None:
    """Write the arrays and meta.json into ``tmp`` and rename it to ``final`` (see :func:`_write_entry`)."""
    tmp.mkdir()
    np.save(tmp / "image.npy", image)
    if label is not None:
        lab = label[sl]
        np.save(tmp / "label.npy", np.packbits(lab, axis=-1))
        fg = np.argwhere(lab)
        meta["fg_voxels"] = int(len(fg))
        meta["fg_box"] = ([int(v) for v in fg.min(axis=0)] + [int(v) + 1 for v in fg.max(axis=0)]
                          if len(fg) else None)
        if len(fg) > MAX_FG_POINTS:
            seed = int(hashlib.sha1(final.name.encode()).hexdigest()[:8], 16)
            keep = np.sort(np.random.default_rng(seed).choice(len(fg), MAX_FG_POINTS, replace=False))
            fg = fg[keep]
        np.save(tmp / "fg.npy", fg.astype(np.int16 if max(image.shape[1:]) < 2**15 else np.int32))
    from divaware.digests import bytes_digest

    # a checksum per file, verified whenever the entry is used again (_entry_problem); the entry's own
    # name, so an entry folder moved or swapped into another case's place is noticed too
    meta["entry"] = final.name
    meta["files"] = {f.name: {"size": f.stat().st_size, "blake2b": bytes_digest(f)}
                     for f in sorted(tmp.glob("*.npy"))}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.rename(tmp, final)
    except OSError as err:  # another process finished it first: theirs is as good as ours
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (final / "meta.json").is_file():
            raise
    else:
        from divaware.digests import remember

        for name, f in meta["files"].items():  # the next verification reads no byte of a fresh entry
            remember(final / name, f["blake2b"], final.parent.parent / DIGESTS)


def _entry_problem(final: Path, pid: str, memo: Path | None) -> str | None:
    """None when the entry is complete and intact; ``"absent"`` when it was never written; else what is wrong
    with it (unreadable meta.json, another case's entry, a file missing, cut short or changed)."""
    from divaware.digests import file_digest

    if not (final / "meta.json").is_file():
        return "absent"
    try:
        meta = json.loads((final / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return f"meta.json cannot be read ({type(err).__name__}: {err})"
    if str(meta.get("patient_id")) != str(pid):
        return f"it holds case {meta.get('patient_id')!r}, not {pid!r} (entry folders moved or swapped?)"
    if meta.get("entry") != final.name:
        return f"it was written as entry {meta.get('entry')!r} (entry folders moved or swapped?)"
    files = meta.get("files")
    if not isinstance(files, dict) or "image.npy" not in files:
        return "meta.json lists no checksums"
    for name, want in sorted(files.items()):
        path = final / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size')} were written"
        if file_digest(path, memo) != want.get("blake2b"):
            return f"{name}'s checksum differs from the one written (changed or damaged bytes)"
    return None


def _encode(image: np.ndarray, precision: str) -> tuple[np.ndarray, list[list[float]] | None]:
    """The stored form of a (C, X, Y, Z) float32 image, and the per-channel (low, step) of uint8."""
    if precision == "float16":
        return np.ascontiguousarray(image.astype(np.float16)), None
    out = np.zeros(image.shape, np.uint8)
    quant = []
    for c in range(image.shape[0]):
        x = image[c]
        nz = x != 0
        lo, hi = (float(x[nz].min()), float(x[nz].max())) if nz.any() else (0.0, 0.0)
        step = (hi - lo) / 254.0 or 1.0
        out[c][nz] = (np.clip(np.rint((x[nz] - lo) / step), 0, 254) + 1).astype(np.uint8)
        quant.append([lo, step])
    return out, quant


def _decode(block: np.ndarray, quant: Sequence[Sequence[float]] | None) -> np.ndarray:
    """float32 intensities of a stored (C, ...) block (uint8 code 0 is an exact zero)."""
    if quant is None:
        return np.asarray(block, np.float32)
    out = np.empty(block.shape, np.float32)
    for c, (lo, step) in enumerate(quant):
        q = np.asarray(block[c])
        out[c] = np.where(q > 0, np.float32(lo) + (q.astype(np.float32) - 1) * np.float32(step), 0)
    return out


def ensure_entry(record: Mapping[str, Any], spec: D.DataSpec, root: Path, precision: str) -> Path:
    """The entry of one case, written first if absent (under a per-case lock; stale temporaries removed)."""
    final = entry_dir(root, record, spec, precision)
    memo, pid = Path(root) / DIGESTS, str(record[D.PID])
    if _entry_problem(final, pid, memo) is None:
        return final
    with file_lock(final.parent / f".{final.name}.lock"):
        problem = _entry_problem(final, pid, memo)
        if problem is None:  # filled by another process while we waited
            return final
        if problem != "absent":
            _remove_damaged(final, problem)
        # we hold the lock: any temporary of this case is a leftover of an interrupted fill
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        _write_entry(record, spec, final, precision)
    return final


def _remove_damaged(final: Path, problem: str) -> None:
    """Warn, naming the entry and what is wrong, and remove it so that it is written again."""
    import warnings

    warnings.warn(f"preprocessed entry {final} is damaged: {problem}; rebuilding it from the data", stacklevel=4)
    try:
        shutil.rmtree(final)
    except OSError as err:
        raise ValueError(f"preprocessed entry {final} is damaged ({problem}) and cannot be removed "
                         f"({err.strerror or err}); delete that folder and run again") from None


def _fill_one(args: tuple[dict[str, Any], D.DataSpec, str, str]) -> str:
    record, spec, root, precision = args
    torch.set_num_threads(1)
    return str(ensure_entry(record, spec, Path(root), precision))


def fill(records: Sequence[Mapping[str, Any]], spec: D.DataSpec, root: str | Path | None = None,
         workers: int = 0, *, progress: bool, precision: str) -> list[Path]:
    """Make sure every case has its entry; returns the entry folders in the order of ``records``.

    ``workers`` > 0 preprocesses in that many worker processes (each single-threaded), with a progress
    bar when ``progress``. Safe to run from several processes at once (each case is written once).
    """
    from tqdm.auto import tqdm

    root = store_root(root)
    records = [dict(r) for r in records]
    # every entry checked against its checksums (the digests of unchanged files are remembered, so a later
    # run reads only what changed); a damaged one is rebuilt with a warning naming it (ensure_entry)
    todo = [r for r in records
            if _entry_problem(entry_dir(root, r, spec, precision), str(r[D.PID]), root / DIGESTS) is not None]
    if todo:
        bar = tqdm(total=len(todo), desc=f"preprocessing into {root}", unit="case", disable=not progress)
        jobs = [(r, spec, str(root), precision) for r in todo]
        if workers > 0 and len(todo) > 1:
            from concurrent.futures import ProcessPoolExecutor

            # the platform's default start method (fork on Linux): a spawned worker re-imports torch and
            # MONAI, which on a loaded 2-core machine took ~40 s before the first case
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                for _ in pool.map(_fill_one, jobs):
                    bar.update(1)
        else:
            for job in jobs:
                ensure_entry(job[0], spec, root, precision)
                bar.update(1)
        bar.close()
    return [entry_dir(root, r, spec, precision) for r in records]


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One stored case, opened lazily by memory map."""

    folder: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> Entry:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"preprocessed entry {folder} is missing or damaged ({err}); delete the folder "
                             "and run again to rebuild it") from None
        return cls(folder, meta)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.meta["shape"]
        return int(s[0]), int(s[1]), int(s[2])

    def image(self) -> np.memmap:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    def packed_label(self) -> np.memmap:
        return np.load(self.folder / "label.npy", mmap_mode="r")

    def fg(self) -> np.ndarray:
        return np.load(self.folder / "fg.npy") if (self.folder / "fg.npy").is_file() else np.zeros((0, 3), int)

    def read(self, start: Sequence[int], size: Sequence[int], counter: ByteCounter | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (float32, C x size) and mask (uint8, 1 x size) of the window at ``start``; parts outside
        the stored box are zeros (what the crop removed)."""
        shape = self.shape
        start = [int(s) for s in start]
        size = [int(s) for s in size]
        lo = [max(0, a) for a in start]
        hi = [min(n, a + p) for a, p, n in zip(start, size, shape, strict=True)]
        img_mm = self.image()
        out = np.zeros((img_mm.shape[0], *size), np.float32)
        lab = np.zeros((1, *size), np.uint8) if self.meta.get("has_label") else None
        if all(h > low for low, h in zip(lo, hi, strict=True)):
            src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
            out[(slice(None), *dst)] = _decode(img_mm[(slice(None), *src)], self.meta.get("quant"))
            if counter is not None:
                counter.add(img_mm, (slice(None), *src))
            if lab is not None:
                packed = self.packed_label()
                z0, z1 = lo[2] // 8, -(-hi[2] // 8)
                bits = np.unpackbits(packed[src[0], src[1], z0:z1], axis=-1)
                lab[(0, *dst)] = bits[..., lo[2] - 8 * z0: hi[2] - 8 * z0]
                if counter is not None:
                    counter.add(packed, (src[0], src[1], slice(z0, z1)))
        return out, lab


class ByteCounter:
    """Counts the file pages (4 KiB) a read of a C-order memory-mapped array touches: what the disk serves."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, array: np.memmap, index: tuple[slice, ...]) -> None:
        self.bytes += touched_bytes(array.shape, array.dtype.itemsize, index, int(getattr(array, "offset", 0)))


def touched_bytes(shape: Sequence[int], itemsize: int, index: Sequence[slice], offset: int = 0) -> int:
    """Bytes of the whole pages a strided read of ``array[index]`` (C order, unit steps) touches."""
    shape = [int(s) for s in shape]
    ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape, strict=True)]
    strides = np.cumprod([1, *shape[::-1]])[::-1][1:] * itemsize  # bytes per step along each axis
    row = (ranges[-1].stop - ranges[-1].start) * itemsize
    starts = np.zeros(1, np.int64) + offset + ranges[-1].start * itemsize
    for axis in range(len(shape) - 2, -1, -1):
        r = ranges[axis]
        starts = (np.arange(r.start, r.stop, dtype=np.int64)[:, None] * strides[axis] + starts[None, :]).ravel()
    starts = np.sort(starts)
    first, last = starts // PAGE, (starts + row - 1) // PAGE
    # union of the page intervals of consecutive rows (sorted): count each page once
    prev_last = np.maximum.accumulate(last)
    new_first = np.maximum(first[1:], prev_last[:-1] + 1)
    pages = (last[0] - first[0] + 1) + np.maximum(0, last[1:] - new_first + 1).sum()
    return int(pages) * PAGE


class PatchSampled(Randomizable, MapTransform):
    """Record -> ``samples_per_case`` patches read from its store entry (the training side).

    Centred on a stored foreground coordinate with probability ``pos_fraction``, else on a uniformly random
    voxel of the stored box; shifted to lie inside the box (or at its start when the box is smaller than
    the patch, zero-padded at the end), as :class:`divaware.data.RandPosNegPatchesd` does on the full grid.
    """

    def __init__(self, entries: Mapping[str, Path], spec: D.DataSpec, counter: ByteCounter | None = None) -> None:
        MapTransform.__init__(self, [D.IMAGE])
        if spec.patch_size is None:
            raise ValueError("the preprocessed store serves patch training: set patch_size")
        self.entries = {str(k): Path(v) for k, v in entries.items()}
        self.size = tuple(int(s) for s in spec.patch_size)
        self.num_samples = int(spec.samples_per_case)
        self.pos_fraction = float(spec.pos_fraction)
        self.counter = counter

    def randomize(self, data: Any = None) -> None:  # draws happen per patch in __call__
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        pid = str(data[D.PID])
        entry = Entry.open(self.entries[pid])
        shape = entry.shape
        fg = entry.fg()
        out = []
        for _ in range(self.num_samples):
            if len(fg) and self.R.rand() < self.pos_fraction:
                centre = [int(v) for v in fg[self.R.randint(len(fg))]]
            else:
                centre = [int(self.R.randint(max(s, 1))) for s in shape]
            start = [min(max(c - p // 2, 0), max(s - p, 0)) for c, p, s in zip(centre, self.size, shape, strict=True)]
            image, label = entry.read(start, self.size, self.counter)
            out.append({D.IMAGE: torch.from_numpy(image), D.LABEL: torch.from_numpy(label).float(), D.PID: pid})
        return out


class LoadVolumed(MapTransform):
    """Record -> the whole preprocessed volume from its entry, re-padded to the preprocessed grid (full
    validation: the same arrays the in-memory path computes, up to float16 rounding)."""

    def __init__(self, entries: Mapping[str, Path]) -> None:
        MapTransform.__init__(self, [D.IMAGE])
        self.entries = {str(k): Path(v) for k, v in entries.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        pid = str(data[D.PID])
        entry = Entry.open(self.entries[pid])
        start = [-int(c) for c in entry.meta["crop_start"]]
        image, label = entry.read(start, entry.meta["full_shape"])
        out: dict[Hashable, Any] = {D.IMAGE: torch.from_numpy(image), D.PID: pid}
        if label is not None:
            out[D.LABEL] = torch.from_numpy(label).float()
        return out


def make_datasets(train_records: Sequence[Mapping[str, Any]], val_records: Sequence[Mapping[str, Any]],
                  spec: D.DataSpec, root: str | Path | None = None, workers: int = 0, *, progress: bool,
                  precision: str, counter: ByteCounter | None = None) -> tuple[Any, Any, dict[str, Path]]:
    """Fill the store for both splits, then the training dataset (patches + augmentations; None without
    training records) and the full validation dataset; also returns ``patient_id -> entry folder`` for
    :func:`patch_scores`."""
    from monai.data import Dataset
    from monai.transforms import Compose

    folders = fill([*train_records, *val_records], spec, root, workers=workers, progress=progress,
                   precision=precision)
    entries = {str(r[D.PID]): f for r, f in zip([*train_records, *val_records], folders, strict=True)}
    train_ds = (Dataset([{D.PID: r[D.PID]} for r in train_records],
                        Compose([PatchSampled(entries, spec, counter), *D.augmentations(spec)]))
                if train_records else None)
    val_ds = Dataset([{D.PID: r[D.PID]} for r in val_records], Compose([LoadVolumed(entries)]))
    return train_ds, val_ds, entries


def load_cohort_once(data_root: str | Path, root: str | Path | None = None, **kwargs: Any) -> Any:
    """:func:`divaware.cohort.load_cohort` with voxel checks shared through the store: under a lock, so of
    concurrent runs and ranks the first checks the voxels and the others read its results."""
    from divaware.cohort import CohortError, load_cohort

    path = voxel_cache_path(data_root, root)
    data = Path(data_root).expanduser().resolve()
    if path.resolve().is_relative_to(data):  # refused before the lock file would be created in the data
        raise CohortError(f"the preprocessed store {store_root(root)} lies inside the data folder {data_root}; "
                          f"input data is read-only, so set ${STORE_ENV} to a folder elsewhere")
    with file_lock(path.with_name(f".{path.name}.lock")):
        return load_cohort(data_root, voxel_cache=path, **kwargs)


# --------------------------------------------------------------------------------------------------
# cheap validation on patches
# --------------------------------------------------------------------------------------------------


def validation_windows(meta: Mapping[str, Any], size: Sequence[int], val_patches: int, seed: int
                       ) -> list[tuple[int, int, int]]:
    """Fixed windows of one case: tiles covering the tumour's bounding box, then ``val_patches`` windows placed
    uniformly in the stored box (seeded by ``seed`` and the case), which catch false positives away from it.
    """
    shape = [int(s) for s in meta["shape"]]
    size = [int(s) for s in size]
    starts: list[tuple[int, int, int]] = []
    box = meta.get("fg_box")
    if box:
        axes = []
        for a in range(3):
            extent = box[a + 3] - box[a]
            n = max(1, -(-extent // size[a]))
            first = box[a] + extent // 2 - (n * size[a]) // 2  # tiles centred on the tumour box
            axes.append([min(max(first + i * size[a], 0), max(shape[a] - size[a], 0)) for i in range(n)])
        starts += [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]
    digest = hashlib.sha1(f"{seed}:{meta['patient_id']}".encode()).hexdigest()
    rng = np.random.default_rng(int(digest[:12], 16))
    for _ in range(int(val_patches)):
        starts.append(tuple(int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, size, strict=True)))
    return list(dict.fromkeys(starts))  # duplicates (a case smaller than the window) count once


@torch.no_grad()
def patch_scores(model: torch.nn.Module, entries: Mapping[str, Path], patient_ids: Sequence[str],
                 size: Sequence[int], val_patches: int, seed: int, device: torch.device, divisor: int,
                 amp: bool, score: str) -> Any:
    """Per-case scores on each case's fixed windows (:func:`validation_windows`), index ``patient_id``.

    Dice (and ``score``) over the union of the windows: the voxels outside them count as neither predicted
    nor true. Each window goes through the network once, without the sliding window's overlap and blending.
    """
    import pandas as pd

    from divaware import metrics
    from divaware.model import infer, segment

    model.eval()
    rows = []
    for pid in patient_ids:
        entry = Entry.open(entries[str(pid)])
        windows = validation_windows(entry.meta, size, val_patches, seed)
        shape = entry.shape
        reads = [entry.read(w, size) for w in windows]
        image = torch.from_numpy(np.stack([r[0] for r in reads])).to(device)
        logits = infer(model, image, divisor=divisor, roi_size=None, overlap=0.0, amp=amp)
        # two classes: the comparison is argmax (ties -> background alike) at a fraction of torch's strided
        # argmax over the channel axis, which took more than half of this function's time
        seg = ((logits[:, 1] > logits[:, 0]) if logits.shape[1] == 2 else segment(logits)).cpu().numpy()
        # count each voxel of the union once: a window's voxels already in an earlier window are masked out,
        # so no volume-sized array is allocated (a full-size case has ~50 M voxels, a window 2 M)
        tp = fp = fn = covered = 0
        boxes: list[tuple[list[int], list[int]]] = []
        for w, (_, lab), p in zip(windows, reads, seg, strict=True):
            hi = [min(a + s, n) for a, s, n in zip(w, size, shape, strict=True)]  # past the box: padding
            new = np.zeros(size, bool)
            new[tuple(slice(0, h - a) for a, h in zip(w, hi, strict=True))] = True
            for lo_b, hi_b in boxes:
                lo_i = [max(a, b) for a, b in zip(w, lo_b, strict=True)]
                hi_i = [min(a, b) for a, b in zip(hi, hi_b, strict=True)]
                if all(h > low for low, h in zip(lo_i, hi_i, strict=True)):
                    new[tuple(slice(low - a, h - a) for low, h, a in zip(lo_i, hi_i, w, strict=True))] = False
            boxes.append((list(w), hi))
            pr, tr = (p > 0) & new, (lab[0] > 0) & new
            tp += int((pr & tr).sum())
            fp += int((pr & ~tr).sum())
            fn += int((~pr & tr).sum())
            covered += int(new.sum())
        row: dict[str, Any] = {"patient_id": str(pid), "windows": len(windows),
                               "covered_fraction": covered / float(np.prod(shape))}
        # the challenge's Dice convention: 0 when both are empty
        d = 2.0 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        if score == "challenge":  # the distance needs the windows in place: their bounding box, this once
            lo = np.min([b[0] for b in boxes], axis=0)
            hi_all = np.max([b[1] for b in boxes], axis=0)
            pred_box = np.zeros(hi_all - lo, bool)
            truth_box = np.zeros(hi_all - lo, bool)
            for (w, hi), (_, lab), p in zip(boxes, reads, seg, strict=True):
                src = tuple(slice(0, h - a) for a, h in zip(w, hi, strict=True))
                dst = tuple(slice(a - o, h - o) for a, h, o in zip(w, hi, lo, strict=True))
                pred_box[dst] |= p[src] > 0
                truth_box[dst] |= lab[(0, *src)] > 0
            m = metrics.case_metrics(pred_box, truth_box)
            row.update(dice=d, norm_hd=m["norm_hd"], score=0.5 * (d + 1.0 - m["norm_hd"]))
        else:
            row.update(dice=d, score=d)
        rows.append(row)
    return pd.DataFrame(rows).set_index("patient_id")
