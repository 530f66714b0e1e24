"""Loader for the MAMA-MIA folder layout (the real download and the synthetic stand-in alike).

``load_cohort(root)`` reads ``clinical_and_imaging_info.xlsx`` (sheet ``dataset_info``),
``train_test_splits.csv``, ``images/<ID>/<id>_<phase>.nii.gz``, ``segmentations/expert/<ID>.nii.gz`` and
``patient_info_files/<id>.json`` and returns a :class:`Cohort`: normalised metadata (index ``patient_id``),
one :class:`Case` per usable case, and the list of every problem found. It never writes into ``root``.

Normalised metadata columns (the raw spreadsheet columns follow them unchanged):

* ``dataset`` -- collection, upper-case (``DUKE``, ``ISPY1``, ``ISPY2``, ``NACT``);
* ``age`` (float) and ``age_group``: the challenge's bins ``0-40, 41-50, 51-60, 61-70, 71+``. The organisers
  use ``pd.cut(age, [0, 40, 50, 60, 70, 100])``, i.e. right-closed intervals, so on integer ages 41-50 means
  41 <= age <= 50 and a fractional age falls in the bin whose right edge is the next one up: 40.5 -> 41-50,
  50.0 -> 41-50, 70.2 -> 71+. Ages above 100 (NaN in the organisers' code) are put in 71+; missing, non-numeric,
  zero/negative or > 120 ages are ``unknown`` (the invalid ones are also reported as problems);
* ``menopause``: ``pre`` (including peri), ``post`` or ``unknown``, from the ``menopause`` column or, when
  that is absent or empty, ``menopausal_status``. Every real spelling is understood: ``pre``, ``post``, NaN,
  the I-SPY2 long forms ``pre (<6 months since LMP ...)`` / ``peri (6-12 months ...)`` / ``post (...)``, and
  ``premenopausal``, ``Post-menopausal`` etc. The raw value is kept in ``menopause_raw``;
* ``breast_density``: ``a``-``d`` or ``unknown`` (also from ``A``, ``c (heterogeneously dense)``, BI-RADS 1-4);
  from the spreadsheet column, or from the JSON ``clinical_data.breast_density`` when the spreadsheet has no
  such column (releases before the challenge);
* ``split``: ``train``/``test`` from ``train_test_splits.csv`` (columns ``train_split``, ``test_split``, the
  shorter one NaN-padded), ``unknown`` for a case in neither column.

Matching is case-insensitive throughout (``images/DUKE_001/duke_001_0000.nii.gz`` and any other spelling);
files that are not NIfTI (the stray ``*.tsv`` of the real download, ``.DS_Store``) are ignored; a sheet that
is not called ``dataset_info`` is read from the first sheet with a warning. Unknown top-level files (for
example the synthetic ``synthetic_truth.csv``) are ignored.

Bad input. Problems that make the whole cohort meaningless stop with a :class:`CohortError` naming the
file, column or case and what to do; problems with one case exclude that case with one warning listing all
of them (and each stays in ``Cohort.problems`` and ``Cohort.excluded``); the rest are reported and the case
is kept. ``strict=True`` turns *any* problem into a ``CohortError`` listing them all.

=========================================================  ===========================================
problem                                                    outcome (``strict=False``)
=========================================================  ===========================================
root folder missing                                        stop
``images/`` missing                                        stop
``segmentations/expert/`` missing                          stop (``require_masks=False``: allowed)
spreadsheet missing / unreadable                           stop
required column missing (patient_id, dataset, age,         stop
menopause or menopausal_status)
duplicate patient ids (also differing only in case)        stop
split file missing / unreadable / without its columns      stop
a patient id in both train_split and test_split            stop (would leak test cases into training)
split file naming ids absent from the spreadsheet          report, ignore those ids
spreadsheet case in neither split column                   report, keep with ``split = "unknown"``
no usable case left                                        stop
spreadsheet case without an image folder or any phase      exclude
phases not numbered 0000, 0001, ... without gaps,          exclude
or the same phase twice
corrupt / unreadable NIfTI header                          exclude
image that is not 3-D, phases with different shapes        exclude
spreadsheet case without an expert mask                    exclude (``require_masks=False``: keep,
                                                           ``mask_path = None``)
mask shape differs from the image shape                    exclude
empty mask (``check_voxels``)                              report, keep
fewer than 3 phases                                        report, keep
missing or unreadable patient-info JSON                    report, keep with ``info = {}``
unrecognised menopause/density value, invalid age          report, keep as ``unknown``
image folders / masks with no spreadsheet row              report (one line), ignore
=========================================================  ===========================================

Defects of one case's files. The same rule holds for ``divaware check``, :func:`load_cohort` and so for
training, prediction and evaluation, which load the cohort through it: an excluded case is never trained
on, predicted or scored, and a warning names the case, the file and what to do. ``tests/test_corpus.py``
builds every row of this table in a tiny cohort and checks the outcome in all five commands (and that the
data folder stays byte-identical); it fails if this table and its registry drift apart.

=====================  ================================================================  ========
defect id              defect                                                            outcome
=====================  ================================================================  ========
truncated_image        truncated ``.nii.gz`` phase image (gzip stream cut)               exclude
truncated_mask         truncated ``.nii.gz`` expert mask                                 exclude
phase_affine           phase 0001 with a different affine (origin shifted) from 0000     exclude
mask_0_2               mask values {0, 2}                                                exclude
mask_0_255             mask values {0, 255}                                              exclude
mask_half              mask values {0, 0.5}                                              exclude
mask_0_3               mask values {0, 0.3}                                              exclude
mask_nan               NaN inside the tumour of the mask                                 exclude
mask_inverted          mask with 0 and 1 swapped (> 50 % of the volume is tumour)        exclude
mask_transposed        mask with two axes swapped (a flipped/transposed copy enhances m  report
mask_pasted            another case's mask on this case's grid, off its tumour           report
necrotic_core          no contrast rise over the deepest 55 % of the mask (necrotic cor  report
rim_enhancing          only a thin rim (outer 30 % of the mask voxels) enhances           report
phases_swapped         phases 0000 and 0001 swapped (the tumour darkens after contrast)  report
mask_affine_flipped    mask affine with a flipped axis (same voxels)                     exclude
mask_spacing_x2        mask affine with doubled spacing (same voxels)                    exclude
image_nan              NaN voxels in a phase image                                       exclude
image_inf              Inf voxels in a phase image                                       exclude
image_huge             1e36 voxels in a phase image (|value| > ``MAX_ABS_INTENSITY``)    exclude
phase_all_zero         an all-zero (constant) phase image                                exclude
blank_patient_id       spreadsheet row with a blank patient_id                           report
breast_box_inverted    patient-info breast box with x_min > x_max                        report
breast_box_no_tumour   patient-info breast box holding no tumour voxel                   report
spacing_zero           pixdim z and the sform's z column 0 in every file                 exclude
pixdim_zero_sform_intact  pixdim z 0, sform intact (nibabel would read 1 mm)                exclude
spacing_nan            NaN pixdim z                                                      exclude
spacing_1e6            a consistent 1e6 mm spacing (pixdim and sform)                    exclude
pixdim_sform_disagree  pixdim z twice the sform's z spacing                              exclude
affine_nan             NaN in the sform of phase 0001                                    exclude
mask_affine_nan        NaN in the sform of the mask                                      exclude
gzip_crc               phase 0001 with a corrupted gzip CRC-32                           exclude
dangling_symlink       phase 0001 a symbolic link to a missing file                      exclude
id_bom                 byte-order mark before a spreadsheet patient_id                   report
=====================  ================================================================  ========

Masks must hold exactly 0 and 1 (any dtype). A {0, 2} or {0, 255} mask, interpolated values (0.5, 0.3) or
NaN are *not* thresholded: any threshold silently turns some of them into tumour and others into
background, so the case is excluded with the values found and the repair to make (e.g. save ``mask > 0``
for a 0/255 mask after checking that is what it means). "exclude" under ``strict=True`` (``--strict``)
stops everything with a :class:`CohortError` listing every problem; "report" keeps the case and warns.

Voxel checks. Shapes, spacings and affines come from the NIfTI headers (nibabel reads the first bytes of
each gzip stream), always. The checks that need the voxels -- data that decompresses completely, finite
intensities below ``MAX_ABS_INTENSITY``, no constant phase, a binary mask that is neither inverted nor off
the enhancing tumour -- read every file in full: on the real data that is ~1 GB of gzip per 20 cases, so
``load_cohort(voxel_cache=...)`` remembers each case's result keyed by its files' path, size and
modification time. Training keeps that cache in the run's cache folder (next to the preprocessed cases) and
evaluation/prediction in the run folder, so a run's files are voxel-checked once and a resume or an
evaluation reads no voxels for checking. ``check_voxels=False`` (``divaware check --headers-only``) skips
them: only for a quick look, since a case that fails them breaks or corrupts every computation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

AGE_GROUPS = ("0-40", "41-50", "51-60", "61-70", "71+")
MENOPAUSE_GROUPS = ("pre", "post")
DENSITY_GROUPS = ("a", "b", "c", "d")
SPLITS = ("train", "test")
UNKNOWN = "unknown"

SPREADSHEET = "clinical_and_imaging_info.xlsx"
SHEET = "dataset_info"
SPLIT_FILE = "train_test_splits.csv"
REQUIRED_COLUMNS = ("patient_id", "dataset", "age")
MENOPAUSE_COLUMNS = ("menopause", "menopausal_status")
NORMALISED_COLUMNS = ("dataset", "age", "age_group", "menopause", "breast_density", "split", "menopause_raw")

_PHASE_RE = re.compile(r"^(?P<stem>.+)_(?P<phase>\d{4})\.nii(?:\.gz)?$", re.IGNORECASE)
_NIFTI_RE = re.compile(r"^(?P<stem>.+)\.nii(?:\.gz)?$", re.IGNORECASE)
_MISSING_TEXT = {"", "nan", "none", "null", "na", "n/a", "unknown", "unk", "not available", "missing", "?", "-"}


class CohortError(ValueError):
    """The cohort cannot be used as it is; the message names the file/column/case and what to do."""


class CohortWarning(UserWarning):
    """Cases were excluded or problems found; details in ``Cohort.problems``."""


@dataclass(frozen=True)
class Case:
    """One usable case: phase images in phase order, expert mask and the patient-info JSON."""

    patient_id: str  # as in the spreadsheet, e.g. "DUKE_001"
    image_paths: tuple[Path, ...]  # _0000 pre-contrast, _0001 first post-contrast, ...
    mask_path: Path | None  # expert segmentation; None only with require_masks=False
    info: dict = field(compare=False, repr=False)  # the patient_info JSON ({} when missing)

    @property
    def n_phases(self) -> int:
        return len(self.image_paths)


@dataclass
class Cohort:
    """A loaded cohort. ``metadata`` and ``cases`` hold the usable cases, in spreadsheet order."""

    root: Path
    metadata: pd.DataFrame  # index "patient_id"; NORMALISED_COLUMNS first, then the raw spreadsheet columns
    cases: dict[str, Case]
    problems: list[str]  # everything found wrong (excluded cases listed here too)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # patient_id -> reasons
    # per usable case, from the NIfTI headers: n_phases, nx, ny, nz, spacing_x/y/z (mm), dtype;
    # with voxel checks also mask_voxels and tumour_ml
    geometry: pd.DataFrame = field(default_factory=pd.DataFrame)
    ignored_files: list[Path] = field(default_factory=list)  # stray non-NIfTI files inside image folders
    voxels_checked: bool = False
    sheet: str = SHEET
    n_rows: int = 0  # spreadsheet rows with a patient id

    def ids(self, split: str | None = None) -> list[str]:
        """Usable patient ids in spreadsheet order, optionally of one split (``train``/``test``/``unknown``)."""
        if split is None:
            return list(self.metadata.index)
        if split not in (*SPLITS, UNKNOWN):
            raise ValueError(f"split must be 'train', 'test', 'unknown' or None, got {split!r}")
        return list(self.metadata.index[self.metadata["split"] == split])

    def __len__(self) -> int:
        return len(self.cases)


# --------------------------------------------------------------------------------------------------
# Normalisation of single values
# --------------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TEXT


def age_group(age: Any) -> str:
    """The challenge's age bin of ``age`` (right-closed: 40 -> 0-40, 40.5 and 50 -> 41-50), else ``unknown``."""
    value = _age_value(age)
    if value is None:
        return UNKNOWN
    for edge, name in zip((40, 50, 60, 70), AGE_GROUPS, strict=False):
        if value <= edge:
            return name
    return AGE_GROUPS[-1]


def _age_value(age: Any) -> float | None:
    """A valid age in years, or None (missing, non-numeric, <= 0 or > 120)."""
    if _is_missing(age) or isinstance(age, bool):
        return None
    try:
        value = float(str(age).strip()) if isinstance(age, str) else float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value <= 0 or value > 120:
        return None
    return value


def _menopause(value: Any) -> str | None:
    """``pre``/``post``/``unknown``; None when the value is present but not understood."""
    if _is_missing(value):
        return UNKNOWN
    text = str(value).strip().lower()
    # The leading word decides: the I-SPY2 long forms ("pre (<6 months since LMP ...)", "peri (6-12 ...)")
    # mention other words later on. Peri-menopausal women count as pre, as in the challenge.
    m = re.match(r"(post|peri|pre)", text)
    if m:
        return "post" if m.group(1) == "post" else "pre"
    return None


def normalise_menopause(value: Any) -> str:
    """``pre`` (incl. peri), ``post`` or ``unknown`` from any real spelling of the menopause column."""
    return _menopause(value) or UNKNOWN


_DENSITY_WORDS = (("fatty", "a"), ("scattered", "b"), ("heterogeneous", "c"), ("extremely", "d"))


def _density(value: Any) -> str | None:
    """``a``-``d``/``unknown``; None when the value is present but not understood."""
    if _is_missing(value):
        return UNKNOWN
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
        return "abcd"[int(number) - 1] if number in (1.0, 2.0, 3.0, 4.0) else None
    text = str(value).strip().lower()
    m = re.match(r"^(?:bi-?rads\s*|acr\s*)?([abcd])(?![a-z])", text)
    if m:
        return m.group(1)
    m = re.match(r"^(?:bi-?rads\s*)?([1-4])(?:\.0)?(?![0-9])", text)
    if m:
        return "abcd"[int(m.group(1)) - 1]
    for word, letter in _DENSITY_WORDS:
        if word in text:
            return letter
    return None


def normalise_density(value: Any) -> str:
    """``a``-``d`` or ``unknown`` from a breast density value (``c``, ``C``, ``3``, ``heterogeneously dense``)."""
    return _density(value) or UNKNOWN


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return [e for e in it if not e.name.startswith(".")]


def _child(parent: Path, name: str, *, is_dir: bool) -> Path | None:
    """The child of ``parent`` called ``name`` in any letter case; CohortError when ambiguous."""
    hits = [Path(e.path) for e in _entries(parent)
            if e.name.lower() == name.lower() and (e.is_dir() if is_dir else e.is_file())]
    if len(hits) > 1:
        raise CohortError(f"{parent} holds {len(hits)} entries named {name!r} in different letter cases "
                          f"({', '.join(sorted(p.name for p in hits))}); keep one")
    return hits[0] if hits else None


def _few(items: Iterable[Any], n: int = 8) -> str:
    items = list(items)
    text = ", ".join(str(x) for x in items[:n])
    return text + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    dtype: str
    affine: np.ndarray
    image: Any  # the nibabel image; its voxels are only read on demand (``voxels``)

    def voxels(self, path: Path | None = None) -> np.ndarray:
        """All voxels. With the ``path`` of a gzip file, the whole stream is decompressed first, which checks
        its stored CRC-32 and length (nibabel reads only the bytes it needs and never checks them): a
        corrupted byte inside the data is an error here, not silently different voxels."""
        if path is not None and path.name.lower().endswith(".gz"):
            import gzip

            data = gzip.decompress(path.read_bytes())
            return np.asanyarray(type(self.image).from_bytes(data).dataobj)
        return np.asanyarray(self.image.dataobj)


def _read_header(path: Path) -> _Header:
    """Shape, voxel sizes, dtype and affine from the NIfTI header only (no voxel data is read)."""
    import nibabel as nib

    img = nib.load(str(path))
    return _Header(tuple(int(s) for s in img.shape), tuple(float(z) for z in img.header.get_zooms()),
                   str(img.get_data_dtype()), np.asarray(img.affine, dtype=float), img)


# --------------------------------------------------------------------------------------------------
# Spreadsheet and split
# --------------------------------------------------------------------------------------------------


def _read_spreadsheet(path: Path) -> tuple[pd.DataFrame, str, list[str]]:
    notes: list[str] = []
    try:
        book = pd.ExcelFile(path, engine="openpyxl")
        names = list(book.sheet_names)
        matches = [s for s in names if str(s).strip().lower() == SHEET]
        if matches:
            sheet = matches[0]
        elif names:
            sheet = names[0]
            msg = (f"{path.name} has no sheet {SHEET!r} (sheets: {_few(names)}); read the first sheet "
                   f"{sheet!r} instead")
            warnings.warn(msg, CohortWarning, stacklevel=3)
            notes.append(msg)
        else:
            raise CohortError(f"{path} has no sheets; re-download clinical_and_imaging_info.xlsx")
        frame = book.parse(sheet)
        book.close()
    except CohortError:
        raise
    except Exception as err:  # openpyxl raises many types for a damaged file
        raise CohortError(f"cannot read {path} ({type(err).__name__}: {err}); re-download "
                          "clinical_and_imaging_info.xlsx or re-save it as .xlsx") from err
    # Known columns are matched whatever their case/spacing; all other columns stay untouched.
    known = {*REQUIRED_COLUMNS, *MENOPAUSE_COLUMNS, "breast_density"}
    rename = {c: str(c).strip().lower() for c in frame.columns if str(c).strip().lower() in known}
    frame = frame.rename(columns=rename)
    return frame, str(sheet), notes


_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d\u2060\u00ad"))


def _clean_id(value: Any) -> str:
    """A patient id without surrounding spaces and without invisible characters (a byte-order mark or a
    zero-width space pasted into a cell would make the id match no folder, and print as if it should)."""
    return str(value).translate(_INVISIBLE).strip()


def _read_split(path: Path) -> tuple[list[str], list[str]]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    except Exception as err:
        raise CohortError(f"cannot read {path} ({type(err).__name__}: {err}); it must be a CSV with columns "
                          "train_split and test_split") from err
    frame.columns = [_clean_id(c).lower() for c in frame.columns]
    missing = [c for c in ("train_split", "test_split") if c not in frame.columns]
    if missing:
        raise CohortError(f"{path} lacks column(s) {', '.join(missing)} (has: {_few(frame.columns)}); it must "
                          "list training ids under train_split and test ids under test_split")

    def ids(col: str) -> list[str]:
        # NaN padding of the shorter column (and blank cells) is dropped here.
        values = frame[col].dropna().astype(str).map(_clean_id)
        return [v for v in values if v and v.lower() not in _MISSING_TEXT]

    return ids("train_split"), ids("test_split")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_cohort(root: str | Path, strict: bool = False, *, check_voxels: bool = True,
                require_masks: bool = True, voxel_cache: str | Path | None = None) -> Cohort:
    """Load a MAMA-MIA-layout cohort from ``root``.

    ``strict``: raise :class:`CohortError` on any problem instead of excluding/reporting (see the module
    docstring for what each problem does otherwise). ``check_voxels``: also read every mask and image in full
    (complete data, finite and non-constant intensities, binary plausible masks; see the module docstring);
    ``False`` checks the headers only. ``voxel_cache``: a JSON file (outside ``root``) remembering the voxel
    checks per file (path, size, modification time), so later loads of the same files read no voxels;
    training and evaluation keep it in the run's cache folder. ``require_masks=False`` allows a cohort without
    expert segmentations (inference only).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise CohortError(f"cohort folder {root} does not exist; pass the folder that "
                          f"holds images/, segmentations/, {SPREADSHEET} and {SPLIT_FILE}")
    if not root.is_dir():
        raise CohortError(f"cohort folder {root} is a file, not a folder; pass the folder that "
                          f"holds images/, segmentations/, {SPREADSHEET} and {SPLIT_FILE}")
    cache = _VoxelCache(Path(voxel_cache), root) if (check_voxels and voxel_cache) else None
    problems: list[str] = []
    images_dir = _child(root, "images", is_dir=True)
    if images_dir is None:
        raise CohortError(f"{root} has no images/ folder; pass the MAMA-MIA root that holds images/<ID>/")
    expert_dir = None
    seg_dir = _child(root, "segmentations", is_dir=True)
    if seg_dir is not None:
        expert_dir = _child(seg_dir, "expert", is_dir=True)
    if expert_dir is None and require_masks:
        raise CohortError(f"{root} has no segmentations/expert/ folder; add the expert masks or load with "
                          "require_masks=False for inference only")
    info_dir = _child(root, "patient_info_files", is_dir=True)
    if info_dir is None:
        problems.append(f"{root} has no patient_info_files/ folder: every case gets info = {{}} (no breast "
                        "coordinates)")
    xlsx = _child(root, SPREADSHEET, is_dir=False)
    if xlsx is None:
        raise CohortError(f"{root} has no {SPREADSHEET}; the loader needs it for patient ids and metadata")
    split_path = _child(root, SPLIT_FILE, is_dir=False)
    if split_path is None:
        raise CohortError(f"{root} has no {SPLIT_FILE}; add the challenge split (columns train_split, "
                          "test_split)")

    frame, sheet, notes = _read_spreadsheet(xlsx)
    problems.extend(notes)
    meta = _normalise(frame, xlsx, problems)
    _assign_split(meta, split_path, problems)

    index = _Index(root, images_dir, expert_dir, info_dir)
    unmatched_folders = sorted(set(index.folders) - {pid.upper() for pid in meta.index})
    if unmatched_folders:
        problems.append(f"{len(unmatched_folders)} image folder(s) have no spreadsheet row and were ignored: "
                        f"{_few(unmatched_folders)}")
    unmatched_masks = sorted(set(index.masks) - {pid.upper() for pid in meta.index})
    if unmatched_masks:
        problems.append(f"{len(unmatched_masks)} expert mask(s) have no spreadsheet row and were ignored: "
                        f"{_few(unmatched_masks)}")

    cases: dict[str, Case] = {}
    excluded: dict[str, list[str]] = {}
    geometry: dict[str, dict[str, Any]] = {}
    ignored: list[Path] = []
    json_density = "breast_density" not in frame.columns
    for pid in meta.index:
        result = _load_case(pid, index, check_voxels, require_masks, problems, ignored, cache)
        if isinstance(result, list):
            excluded[pid] = result
            problems.extend(f"{pid}: excluded: {reason}" for reason in result)
            continue
        case, geo = result
        cases[pid] = case
        geometry[pid] = geo
        if json_density:
            raw = (case.info.get("clinical_data") or {}).get("breast_density")
            meta.loc[pid, "breast_density"] = _density_or_report(pid, raw, problems, "JSON breast_density")

    if cache is not None:
        cache.save()
    if not cases:
        raise CohortError(f"no usable case in {root}: {len(excluded)} of {len(meta)} spreadsheet cases were "
                          f"excluded (first problems: {_few(problems, 3)}); run `divaware check {root}`")
    if strict and problems:
        raise CohortError(f"{len(problems)} problem(s) in {root} (strict=True):\n  " + "\n  ".join(problems))
    _warn_excluded(excluded, len(meta), root)
    others = [p for p in problems if ": excluded: " not in p and p not in notes]
    if others:
        warnings.warn(f"{len(others)} problem(s) in {root} (cases kept): {_few(others, 5)}", CohortWarning,
                      stacklevel=2)

    n_rows = len(meta)
    meta = meta.loc[list(cases)]
    geo_frame = pd.DataFrame.from_dict(geometry, orient="index")
    geo_frame.index.name = "patient_id"
    return Cohort(root=root, metadata=meta, cases=cases, problems=problems, excluded=excluded,
                  geometry=geo_frame, ignored_files=ignored, voxels_checked=check_voxels, sheet=sheet,
                  n_rows=n_rows)


def run_val_ids(run_dir: str | Path, cohort: Cohort) -> list[str]:
    """The run's fairness-validation cases (its ``splits.csv``) that the cohort still holds.

    Cases excluded by the cohort's checks since training are left out with a warning naming them.
    """
    from divaware.runfolder import RunFolder

    run = RunFolder(run_dir)
    path = run.splits
    if not path.is_file():
        raise ValueError(f"split 'val' needs the run's {path} (written by training); none found")
    ids = run.split_ids("val")
    gone = [i for i in ids if i not in cohort.cases]
    if gone:
        warnings.warn(f"{len(gone)} validation case(s) of {path} are not usable in {cohort.root} and are left "
                      f"out: {', '.join(gone[:10])}", stacklevel=3)
    return [i for i in ids if i in cohort.cases]


# ------------------------------------------------------------------------------------------------
# the fairness-validation split (training carves it from the challenge's train split; see run_val_ids)
# ------------------------------------------------------------------------------------------------


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from (run seed, purpose, epoch, ...): independent streams, stable across runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# The fairness-validation split never takes more than this share of the training cases (≥ 60 % train).
MAX_VAL_SHARE = 0.4


def val_case_count(n: int, val_fraction: float, min_val_cases: int) -> int:
    """How many of ``n`` training cases form the fairness-validation split.

    round(n · val_fraction), raised to ``min_val_cases`` where that leaves ≥ 60 % of the cases for
    training, else to floor(n · 0.4), never lowered: the detector's power to flag a 0.08 Dice gap of a
    ~13 % subgroup is 18 % per refresh at 48 validation cases and 52 % at 96 (benchmarks/DIVERGENCE.md),
    so 96 is the floor where the cohort allows it. At least 1 case on each side.
    """
    base = round(n * val_fraction)
    floor = min(int(min_val_cases), math.floor(n * MAX_VAL_SHARE))
    return max(1, min(n - 1, max(base, floor)))


def split_train_val(
    metadata: pd.DataFrame,
    patient_ids: Sequence[str],
    val_fraction: float,
    stratify: Sequence[str],
    seed: int,
    min_val_cases: int,
) -> pd.DataFrame:
    """Divide ``patient_ids`` into ``train`` and ``val``, stratified by ``stratify``, seeded.

    Strata are the combinations of the stratify attributes; a case whose full combination has fewer than
    ``ceil(1 / val_fraction)`` members falls back to the combination of the first k-1 attributes, and so on
    (down to one pooled stratum), so rare intersections do not make the split degenerate. Each stratum gives
    floor(n * val_fraction) cases and the remaining slots (to reach round(N * val_fraction)) go to the strata
    with the largest remainders. Returns ``patient_id, split, stratum`` sorted by patient_id.
    ``min_val_cases`` raises the split's size by :func:`val_case_count` (the fraction used in the strata
    is then that count / N).
    """
    from divaware.subgroups import attribute_table

    ids = sorted(str(i) for i in patient_ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 training cases to carve a validation split, got {len(ids)}")
    attrs = list(stratify)
    if attrs:
        table = attribute_table(metadata.loc[ids], attrs)
    else:
        table = pd.DataFrame(index=pd.Index(ids, name="patient_id"))
    n_val = val_case_count(len(ids), val_fraction, min_val_cases)
    val_fraction = n_val / len(ids)
    min_n = math.ceil(1.0 / val_fraction)
    stratum = pd.Series("all", index=table.index, dtype=object)
    assigned = pd.Series(False, index=table.index)
    for k in range(len(attrs), 0, -1):
        keys = table[attrs[:k]].astype(str).agg("|".join, axis=1)
        counts = keys[~assigned].value_counts()
        ok = keys.map(counts).fillna(0).ge(min_n) & ~assigned
        stratum[ok] = keys[ok]
        assigned |= ok
    rng = np.random.default_rng(derived_seed(seed, "split"))
    total_val = n_val
    groups = {s: sorted(stratum.index[stratum == s]) for s in sorted(stratum.unique())}
    quota = {s: int(math.floor(len(m) * val_fraction)) for s, m in groups.items()}
    remainder = {s: len(m) * val_fraction - quota[s] for s, m in groups.items()}
    tiebreak = rng.random(len(groups))
    order = sorted(groups, key=lambda s: (-remainder[s], tiebreak[list(groups).index(s)]))
    for s in order[: max(0, total_val - sum(quota.values()))]:
        quota[s] += 1
    val: set[str] = set()
    for s, members in groups.items():
        perm = rng.permutation(len(members))
        val.update(members[i] for i in perm[: quota[s]])
    out = pd.DataFrame({"patient_id": ids, "split": ["val" if i in val else "train" for i in ids],
                        "stratum": [stratum[i] for i in ids]})
    return out


MAX_CASE_WARNINGS = 20  # one warning per excluded case up to this many, then one for the rest


def _warn_excluded(excluded: dict[str, list[str]], n_rows: int, root: Path) -> None:
    """One warning per excluded case (case, file, what to do), so each can be seen and acted on."""
    items = list(excluded.items())
    for pid, reasons in items[:MAX_CASE_WARNINGS]:
        warnings.warn(f"case {pid} excluded: {'; '.join(reasons)}", CohortWarning, stacklevel=3)
    rest = items[MAX_CASE_WARNINGS:]
    if rest:
        warnings.warn(f"{len(rest)} more case(s) excluded: {_few([pid for pid, _ in rest], 10)}; see "
                      f"Cohort.problems or run `divaware check {root}`", CohortWarning, stacklevel=3)
    if items:
        warnings.warn(f"{len(items)} of {n_rows} cases excluded in total; the rest are used", CohortWarning,
                      stacklevel=3)


def _density_or_report(pid: str, raw: Any, problems: list[str], what: str) -> str:
    value = _density(raw)
    if value is None:
        problems.append(f"{pid}: unrecognised {what} {raw!r}; treated as unknown (expected a-d)")
        return UNKNOWN
    return value


def _normalise(frame: pd.DataFrame, xlsx: Path, problems: list[str]) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if not any(c in frame.columns for c in MENOPAUSE_COLUMNS):
        missing.append("menopause (or menopausal_status)")
    if missing:
        raise CohortError(f"{xlsx} lacks required column(s) {', '.join(missing)} (has: {_few(frame.columns, 12)}); "
                          "use the clinical_and_imaging_info.xlsx of the MAMA-MIA release")
    ids = frame["patient_id"].map(lambda v: None if _is_missing(v) else _clean_id(v))
    hidden = [f"{v!r} -> {_clean_id(v)!r}" for v in frame["patient_id"]
              if not _is_missing(v) and _clean_id(v) != str(v).strip()]
    if hidden:
        problems.append(f"{xlsx.name}: {len(hidden)} patient_id(s) held invisible characters (byte-order mark, "
                        f"zero-width space), removed: {_few(hidden)}")
    # pandas turns the None of map() into NaN: test with notna(), not `is None`
    blank = [i + 2 for i, ok in enumerate(ids.notna()) if not ok]  # +2: 1-based rows below the header
    if blank:
        problems.append(f"{xlsx.name}: {len(blank)} row(s) without patient_id ignored (sheet rows {_few(blank)})")
    frame = frame.loc[ids.notna().to_numpy()].copy()
    frame["patient_id"] = ids[ids.notna()].to_numpy()
    upper = frame["patient_id"].str.upper()
    dupes = sorted(set(frame["patient_id"][upper.duplicated(keep=False)]))
    if dupes:
        raise CohortError(f"{xlsx} has duplicate patient ids (letter case ignored): {_few(dupes)}; each case "
                          "must appear once")

    meta = pd.DataFrame(index=pd.Index(frame["patient_id"].to_list(), name="patient_id"))
    raw = frame.set_index("patient_id", drop=True)

    datasets = []
    for pid, value in raw["dataset"].items():
        if _is_missing(value):
            datasets.append(pid.rsplit("_", 1)[0].upper())
            problems.append(f"{pid}: dataset missing; taken from the id prefix ({datasets[-1]})")
        else:
            datasets.append(str(value).strip().upper())
    meta["dataset"] = datasets

    ages, groups = [], []
    for pid, value in raw["age"].items():
        age = _age_value(value)
        if age is None and not _is_missing(value):
            problems.append(f"{pid}: invalid age {value!r}; treated as unknown (expected years, 1-120)")
        ages.append(np.nan if age is None else age)
        groups.append(age_group(age))
    meta["age"] = np.asarray(ages, dtype=float)
    meta["age_group"] = groups

    meno_raw = raw["menopause"] if "menopause" in raw.columns else pd.Series(np.nan, index=raw.index)
    if "menopausal_status" in raw.columns:
        # Prefer `menopause`; fall back to the `menopausal_status` spelling some tools use.
        fallback = raw["menopausal_status"]
        meno_raw = pd.Series([fb if _is_missing(v) else v for v, fb in zip(meno_raw, fallback, strict=True)],
                             index=raw.index, dtype=object)
    menopause = []
    for pid, value in meno_raw.items():
        m = _menopause(value)
        if m is None:
            problems.append(f"{pid}: unrecognised menopause value {value!r}; treated as unknown "
                            "(expected pre/peri/post or their long forms)")
            m = UNKNOWN
        menopause.append(m)
    meta["menopause"] = menopause

    if "breast_density" in raw.columns:
        meta["breast_density"] = [_density_or_report(pid, v, problems, "breast_density")
                                  for pid, v in raw["breast_density"].items()]
    else:
        meta["breast_density"] = UNKNOWN  # filled from the JSON files later
    meta["split"] = UNKNOWN
    meta["menopause_raw"] = [None if _is_missing(v) else str(v) for v in meno_raw]
    rest = raw[[c for c in raw.columns if c not in meta.columns]]
    return pd.concat([meta, rest.set_axis(meta.index)], axis=1)


def _assign_split(meta: pd.DataFrame, path: Path, problems: list[str]) -> None:
    train, test = _read_split(path)
    by_upper = {pid.upper(): pid for pid in meta.index}
    both = sorted({t.upper() for t in train} & {t.upper() for t in test})
    if both:
        raise CohortError(f"{path} lists {len(both)} id(s) under both train_split and test_split: {_few(both)}; "
                          "a case must be in one split only (test cases must never be trained on)")
    unknown = []
    split = pd.Series(UNKNOWN, index=meta.index, dtype=object)
    for name, ids in (("train", train), ("test", test)):
        for raw_id in ids:
            pid = by_upper.get(raw_id.upper())
            if pid is None:
                unknown.append(raw_id)
            else:
                split[pid] = name
    if unknown:
        problems.append(f"{path.name} names {len(unknown)} id(s) that are not in the spreadsheet (ignored): "
                        f"{_few(unknown)}")
    none = list(split.index[split == UNKNOWN])
    if none:
        problems.append(f"{len(none)} case(s) are in neither split column of {path.name} (split 'unknown'): "
                        f"{_few(none)}")
    meta["split"] = split.to_numpy()


class _Index:
    """Case-insensitive listing of the image folders, expert masks and JSON files (one scan each)."""

    def __init__(self, root: Path, images: Path, expert: Path | None, info: Path | None) -> None:
        self.root = root
        self.folders: dict[str, list[Path]] = {}
        for e in _entries(images):
            if e.is_dir():
                self.folders.setdefault(e.name.upper(), []).append(Path(e.path))
        self.masks: dict[str, list[Path]] = {}
        self.not_masks: dict[str, list[str]] = {}  # mask names that are folders or dangling links: why
        if expert is not None:
            for e in _entries(expert):
                m = _NIFTI_RE.match(e.name)
                if m and e.is_file():
                    self.masks.setdefault(m.group("stem").upper(), []).append(Path(e.path))
                elif m:
                    self.not_masks.setdefault(m.group("stem").upper(), []).append(_not_a_file(Path(e.path), self))
        self.info: dict[str, Path] = {}
        self.has_info = info is not None
        if info is not None:
            for e in _entries(info):
                if e.name.lower().endswith(".json") and e.is_file():
                    self.info[e.name[:-5].upper()] = Path(e.path)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def _not_a_file(path: Path, index: _Index) -> str:
    """Why a path named like a NIfTI file is not one: a folder, a dangling symbolic link, something else."""
    rel = index.rel(path)
    if path.is_symlink() and not path.exists():
        return (f"{rel} is a symbolic link to {os.readlink(path)}, which does not exist; restore the file it "
                "points to or replace the link by the file")
    if path.is_dir():
        return f"{rel} is a folder, not a NIfTI file; put the file itself there"
    return f"{rel} is not a regular file; replace it by the NIfTI file"


def _load_case(pid: str, index: _Index, check_voxels: bool, require_masks: bool, problems: list[str],
               ignored: list[Path], voxel_cache: _VoxelCache | None = None) -> tuple[Case, dict[str, Any]] | list[str]:
    """The Case and its geometry, or the list of reasons to exclude it."""
    key = pid.upper()
    folders = index.folders.get(key, [])
    if not folders:
        return [f"no image folder images/{pid}/; add it or remove the spreadsheet row"]
    if len(folders) > 1:
        return [f"several image folders match in different letter case ({_few(p.name for p in folders)}); "
                "keep one"]
    folder = folders[0]
    phases: dict[int, list[Path]] = {}
    not_files: list[str] = []
    for e in _entries(folder):
        if not e.is_file():
            if _PHASE_RE.match(e.name):  # a folder or dangling link where a phase should be: say so
                not_files.append(_not_a_file(Path(e.path), index))
            continue
        m = _PHASE_RE.match(e.name)
        if m is None:
            if _NIFTI_RE.match(e.name):
                problems.append(f"{pid}: unexpected NIfTI name {index.rel(Path(e.path))} (expected "
                                f"{pid.lower()}_<phase>.nii.gz); ignored")
            else:
                ignored.append(Path(e.path))  # stray .tsv and the like: not ours to judge
            continue
        if m.group("stem").upper() != key:
            problems.append(f"{pid}: {index.rel(Path(e.path))} is named for another case; ignored")
            continue
        phases.setdefault(int(m.group("phase")), []).append(Path(e.path))
    if not_files:
        return not_files
    if not phases:
        return [f"images/{folder.name}/ holds no phase images ({pid.lower()}_0000.nii.gz, ...)"]
    twice = [k for k, v in phases.items() if len(v) > 1]
    if twice:
        return [f"phase(s) {', '.join(f'{k:04d}' for k in sorted(twice))} present more than once "
                f"(e.g. .nii and .nii.gz) in images/{folder.name}/; keep one file per phase"]
    numbers = sorted(phases)
    if numbers != list(range(len(numbers))) or len(numbers) < 2:
        return [f"phases found {', '.join(f'{k:04d}' for k in numbers)} in images/{folder.name}/; they must be "
                "numbered 0000 (pre-contrast), 0001, ... without gaps, with at least 0000 and 0001"]
    paths = tuple(phases[k][0] for k in numbers)

    reasons: list[str] = []
    headers = []
    for p in paths:
        try:
            headers.append(_read_header(p))
        except Exception as err:
            reasons.append(f"cannot read {index.rel(p)} ({type(err).__name__}: {err}); re-download or re-convert it")
    if reasons:
        return reasons
    reasons += [r for p, h in zip(paths, headers, strict=True) if (r := _geometry_reason(index.rel(p), h))]
    if reasons:
        return reasons
    shape0, affine0 = headers[0].shape, headers[0].affine
    zooms0 = voxel_spacing(affine0)  # what MONAI's loader (training, prediction) and scoring use
    if len(shape0) != 3:
        return [f"{index.rel(paths[0])} has shape {shape0}; expected a 3-D volume"]
    for p, h in zip(paths[1:], headers[1:], strict=True):
        if h.shape != shape0:
            reasons.append(f"phase {index.rel(p)} has shape {h.shape}, phase 0000 has {shape0}; phases must be "
                           "on the same grid (resample them)")
        elif not np.allclose(h.affine, affine0):
            # MONAI stacks the phases as channels and refuses differing affines (with its default
            # np.allclose tolerance), so such a case could never be loaded: exclude it up front.
            reasons.append(f"phase {index.rel(p)} has a different affine (orientation/spacing/origin) from phase "
                           f"0000 ({_affine_diff(h.affine, affine0)}); resample it onto phase 0000's grid")
    if len(paths) < 3:
        problems.append(f"{pid}: only {len(paths)} phases (the real cases have at least 3)")

    mask_path, mask_header = _case_mask(pid, index, require_masks, shape0, affine0, reasons, problems)
    if reasons:
        return reasons

    geo: dict[str, Any] = {
        "n_phases": len(paths), "nx": shape0[0], "ny": shape0[1], "nz": shape0[2],
        "spacing_x": zooms0[0], "spacing_y": zooms0[1], "spacing_z": zooms0[2], "dtype": headers[0].dtype,
    }
    if check_voxels:
        checked = _cached_voxel_check(pid, paths, mask_path, headers, mask_header, index, voxel_cache)
        problems.extend(f"{pid}: {p}" for p in checked["problems"])
        if checked["reasons"]:
            return list(checked["reasons"])
        geo.update(checked["geometry"])

    return Case(pid, paths, mask_path, _case_info(pid, index, shape0, problems, geo.get("tumour_box"))), geo


def _case_mask(pid: str, index: _Index, require_masks: bool, shape0: tuple[int, ...], affine0: np.ndarray,
               reasons: list[str], problems: list[str]) -> tuple[Path | None, _Header | None]:
    """The case's expert mask and its header (None when absent); what makes it unusable goes to ``reasons``,
    what is reported but kept to ``problems``."""
    mask_path: Path | None = None
    mask_header: _Header | None = None
    key = pid.upper()
    masks = index.masks.get(key, [])
    if len(masks) > 1:
        reasons.append(f"several expert masks match ({_few(index.rel(p) for p in masks)}); keep one")
    elif not masks and index.not_masks.get(key):
        # a folder or dangling link named like the mask: say that, not "no expert mask"
        if require_masks:
            reasons += index.not_masks[key]
        else:
            problems.extend(f"{pid}: {why}; the case has no usable mask" for why in index.not_masks[key])
    elif not masks:
        if require_masks:
            reasons.append(f"no expert mask segmentations/expert/{pid}.nii.gz; add it, or load with "
                           "require_masks=False for inference only")
    else:
        mask_path = masks[0]
        try:
            mask_header = _read_header(mask_path)
        except Exception as err:
            reasons.append(f"cannot read {index.rel(mask_path)} ({type(err).__name__}: {err}); re-download it")
        mask_geometry = _geometry_reason(index.rel(mask_path), mask_header) if mask_header is not None else None
        if mask_geometry:
            reasons.append(mask_geometry)
        elif mask_header is not None and _squeezed(mask_header.shape) != shape0:
            reasons.append(f"mask {index.rel(mask_path)} has shape {mask_header.shape}, the images {shape0}; the "
                           "mask must be on the image grid")
        elif mask_header is not None and not np.allclose(mask_header.affine, affine0, atol=1e-3):
            # Same voxels, other placement (flipped axis, doubled spacing): after reorientation/resampling
            # the label would no longer cover the tumour, so training and scoring would be garbage.
            reasons.append(f"mask {index.rel(mask_path)} has a different affine from the images "
                           f"({_affine_diff(mask_header.affine, affine0)}); the mask must be on the image grid "
                           "(copy the image's affine if only the header is wrong, else resample it)")
    return mask_path, mask_header


def _case_info(pid: str, index: _Index, shape: tuple[int, ...], problems: list[str],
               tumour_box: Any = None) -> dict:
    """The case's patient-info JSON ({} when absent or unreadable, with a problem noted)."""
    info: dict = {}
    info_path = index.info.get(pid.upper())
    if info_path is None:
        if index.has_info:  # a missing folder is reported once, not per case
            problems.append(f"{pid}: no patient_info_files/{pid.lower()}.json; info = {{}}")
    else:
        try:
            loaded = json.loads(info_path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError("top level is not an object")
            info = loaded
        except Exception as err:
            problems.append(f"{pid}: cannot read {index.rel(info_path)} ({type(err).__name__}: {err}); info = {{}}")
        else:
            box_problem = _breast_box_problem(info, shape) or _box_without_tumour(info, tumour_box)
            if box_problem:
                problems.append(f"{pid}: {index.rel(info_path)}: {box_problem}")
    return info


# --------------------------------------------------------------------------------------------------
# Voxel checks (one rule for check, load, train, predict and evaluate)
# --------------------------------------------------------------------------------------------------

MAX_ABS_INTENSITY = 1e10
"""Largest plausible absolute image intensity. MRI scanners write at most ~1e5; values beyond this overflow
the float32 z-score normalisation (its variance squares them: 1e36 -> inf), so the case would train on NaN."""
MAX_TUMOUR_FRACTION = 0.5
"""A mask covering more than this fraction of the volume is taken to be inverted (tumour <-> background)."""
VOXEL_CHECK_VERSION = 2  # bump when the checks change, so cached results are not reused


MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 20.0
"""Plausible voxel sizes of a breast MRI (per axis). Outside this range the header is corrupt or in other
units (a consistent 1e6 mm spacing once gave HD95 values of 1.7 km), so the case is excluded."""


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm of the array axes: the lengths of the affine's first three columns.

    The one spacing source of the package: MONAI's loader (training, prediction) orients and resamples
    with the affine nibabel reports (sform, else qform), and scoring uses this function, so all three agree.
    The header's pixdim must agree with it (checked by :func:`load_cohort`)."""
    return tuple(float(x) for x in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))  # type: ignore[return-value]


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing singleton axes: an (X, Y, Z, 1) mask is one 3-D mask."""
    out = tuple(shape)
    while len(out) > 3 and out[-1] == 1:
        out = out[:-1]
    return out


def _geometry_reason(rel: str, header: _Header) -> str | None:
    """Why a file's geometry is meaningless (NaN affine, zero/negative/NaN/implausible or ambiguous
    spacing), naming the file, or None. Checked on the headers, before anything loads the voxels."""
    affine = np.asarray(header.affine, dtype=float)
    if not np.isfinite(affine).all():
        return (f"NaN in affine of {rel} (its sform/qform holds NaN or Inf): the header is corrupt; re-convert "
                "the file, or copy the affine of a good phase of the same case")
    spacing = np.asarray(voxel_spacing(affine))
    # the raw pixdim: nibabel's get_zooms() silently turns 0 into 1 and -x into x
    raw = getattr(getattr(header.image, "header", None), "get", lambda key: None)("pixdim")
    pixdim = np.asarray(raw[1:4] if raw is not None else header.zooms[:3], dtype=float)
    if not np.isfinite(pixdim).all() or (pixdim <= 0).any():
        return (f"{rel}: header pixdim spacing {_fmt_vec(pixdim)} mm is zero, negative or NaN (its affine says "
                f"{_fmt_vec(spacing)} mm); fix the header (e.g. nibabel header.set_zooms) and re-save")
    if (spacing <= 1e-6).any():
        return (f"{rel}: its affine (sform/qform) has zero spacing {_fmt_vec(spacing)} mm (a zero column); fix "
                "the header (e.g. copy a good phase's affine) and re-save")
    if not np.allclose(pixdim, spacing, rtol=1e-3, atol=1e-4):
        return (f"{rel}: header pixdim spacing {_fmt_vec(pixdim)} mm disagrees with its affine (sform/qform) "
                f"spacing {_fmt_vec(spacing)} mm; which one is right is unknown, so fix the header and re-save")
    if ((spacing < MIN_SPACING_MM) | (spacing > MAX_SPACING_MM)).any():
        return (f"{rel}: implausible voxel spacing {_fmt_vec(spacing)} mm (breast MRI: {MIN_SPACING_MM:g}-"
                f"{MAX_SPACING_MM:g} mm per axis); the header is corrupt or in other units, fix it")
    return None


def _affine_diff(a: np.ndarray, b: np.ndarray) -> str:
    za, zb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(za, zb, atol=1e-3):
        return f"spacing {_fmt_vec(za)} mm vs {_fmt_vec(zb)} mm"
    if not np.allclose(a[:3, :3], b[:3, :3], atol=1e-3):
        return "orientation differs (flipped or permuted axes)"
    return f"origin {_fmt_vec(a[:3, 3])} vs {_fmt_vec(b[:3, 3])}"


def _fmt_vec(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _breast_box_problem(info: dict, shape: tuple[int, ...]) -> str | None:
    """Why the JSON's breast box is unusable (a min above its max, outside the image), or None."""
    coords = (info.get("primary_lesion") or {}).get("breast_coordinates")
    if not coords:
        return None
    keys = ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")
    try:
        c = {k: int(coords[k]) for k in keys}
    except (KeyError, TypeError, ValueError):
        return f"breast_coordinates {coords!r} incomplete or not integers; crop_to_breast cannot use this case"
    bad = [a for a in "xyz" if c[f"{a}_min"] >= c[f"{a}_max"]]
    if bad:
        spans = ", ".join(f"{a}_min {c[a + '_min']} >= {a}_max {c[a + '_max']}" for a in bad)
        return (f"breast box has {spans}; "
                "crop_to_breast cannot use this case, fix the JSON")
    # x/y/z index the SimpleITK array: x -> NIfTI axis k, z -> axis i (see divaware.data.breast_box)
    limits = {"x": shape[2], "y": shape[1], "z": shape[0]} if len(shape) == 3 else {}
    outside = [a for a, n in limits.items() if c[f"{a}_min"] >= n or c[f"{a}_max"] <= 0]
    if outside:
        return f"breast box lies outside the image along {', '.join(outside)}; crop_to_breast cannot use this case"
    return None


def json_breast_box(info: dict) -> tuple[int, int, int, int, int, int] | None:
    """The JSON's breast box on the NIfTI array (i0, i1, j0, j1, k0, k1; ends exclusive), unclamped; None
    when absent or not integers. Its x/y/z index the SimpleITK array: x -> NIfTI axis k, z -> axis i."""
    coords = (info.get("primary_lesion") or {}).get("breast_coordinates") or {}
    try:
        c = {k: int(coords[k]) for k in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")}
    except (KeyError, TypeError, ValueError):
        return None
    return c["z_min"], c["z_max"], c["y_min"], c["y_max"], c["x_min"], c["x_max"]


def box_holds_tumour(box: Sequence[int], tumour_box: Sequence[int]) -> bool:
    """Whether two (i0, i1, j0, j1, k0, k1) boxes overlap (the breast box and the tumour's bounding box)."""
    return all(max(box[2 * a], tumour_box[2 * a]) < min(box[2 * a + 1], tumour_box[2 * a + 1]) for a in range(3))


def _box_without_tumour(info: dict, tumour_box: Any) -> str | None:
    """A breast box that holds none of the expert mask's tumour (a plausibility check: reported, kept)."""
    box = json_breast_box(info)
    if box is None or not isinstance(tumour_box, (list, tuple)) or len(tumour_box) != 6:
        return None
    if box_holds_tumour(box, tumour_box):
        return None
    return (f"breast box (i, j, k) {list(box)} holds no tumour voxel (the expert mask spans {list(tumour_box)}); "
            "with crop_to_breast this case falls back to the whole volume; fix the JSON's breast_coordinates "
            "(kept; --strict refuses it)")


def _image_reasons(rel: str, arr: np.ndarray) -> list[str]:
    """Why the voxels of one phase image cannot be used (non-finite, absurd, constant)."""
    finite = np.isfinite(arr)
    if not finite.all():
        n_bad = int(arr.size - np.count_nonzero(finite))
        return [f"{rel} holds {n_bad} NaN/Inf voxel(s) (of {arr.size}); the image is corrupt, re-convert or "
                "re-download it"]
    lo, hi = float(arr.min()), float(arr.max())
    if max(abs(lo), abs(hi)) > MAX_ABS_INTENSITY:
        return [f"{rel} holds intensities up to {max(abs(lo), abs(hi)):.3g} (plausible MRI: below "
                f"{MAX_ABS_INTENSITY:.0g}); the scaling is corrupt, re-convert or re-download it"]
    if lo == hi:
        return [f"{rel} is constant (every voxel {lo:g}): a blank phase; re-convert or re-download it"]
    return []


def _mask_reasons(rel: str, mask: np.ndarray) -> tuple[list[str], int]:
    """(why the mask cannot be used, number of tumour voxels). Only exactly 0 and 1 are accepted."""
    # Exactly {0, 1}: a 0/255 or 0/2 mask, interpolated values (0.5, 0.3) or NaN all mean the mask was
    # written by a tool we cannot second-guess; thresholding silently would make 0.3 background and 2
    # tumour, so we refuse and say how to repair it instead.
    is0, is1 = mask == 0, mask == 1
    ok = is0 | is1
    if not ok.all():
        bad = mask[~ok]
        values = np.unique(bad[np.isfinite(bad)]) if np.issubdtype(bad.dtype, np.floating) else np.unique(bad)
        nan = bool(np.issubdtype(bad.dtype, np.floating) and not np.isfinite(bad).all())
        shown = [*(["NaN/Inf"] if nan else []), *(f"{v:g}" for v in values[:6].tolist())]
        return [f"mask {rel} is not binary (values other than 0/1: {', '.join(shown)}); expected 0 = background, "
                "1 = tumour (e.g. save (mask > 0) for a 0/255 mask, after checking that is what it means)"], 0
    count = int(np.count_nonzero(is1))
    if count > MAX_TUMOUR_FRACTION * mask.size:
        return [f"mask {rel} marks {100.0 * count / mask.size:.0f} % of the volume as tumour: it looks inverted "
                "(0 and 1 swapped); fix it"], count
    return [], count


MIN_ENHANCING_FRACTION = 0.5
"""Below this fraction of mask voxels enhancing like the top 5 % of the rest of the volume, a mask is
*suspect* -- but only reported as misplaced when a relative test agrees (see :func:`_placement`)."""
COPY_MARGIN = 0.2
"""A flipped/transposed copy that enhances this much more (in enhancing fraction) than the mask marks the
mask as misplaced (a transposed or flipped mask: the copy lies on the tumour)."""
CONFIRM_MARGIN = 0.3
"""A weakly enhancing mask counts as confirmed when it enhances this much more than its best copy."""
MIN_PEAK_RATIO = 1.0
"""A weakly enhancing mask whose 90th-percentile rise stays below this multiple of the rest of the volume's
99.5th-percentile rise holds none of the strongest enhancement: unconfirmed. (A necrotic core or an
enhancing rim still holds the tumour's strongest voxels.)"""
MIN_COPY_SHIFT = 0.1
"""A flipped/transposed copy is a fair comparison only if it overlaps the mask by less than this fraction."""


def _enhancing_fraction(diff: np.ndarray, region: np.ndarray, threshold: float) -> float:
    n = int(np.count_nonzero(region))
    return float(np.count_nonzero(diff[region] > threshold)) / n if n else 0.0


def _placement(mask: np.ndarray, pre: np.ndarray, post: np.ndarray) -> dict[str, Any]:
    """How well the mask's place is confirmed by contrast enhancement: measured values, and a verdict.

    ``enhancing``: fraction of mask voxels whose post - pre rise exceeds the 95th percentile of the rest of
    the volume (DCE tumours are segmented because they enhance). ``copy``: the same for the best of the
    mask's flipped (each axis) and transposed (same-size axes) copies that lie elsewhere (overlap <
    ``MIN_COPY_SHIFT``). ``peak``: the mask's 90th-percentile rise over the 99.5th percentile of the rest.
    The mask is reported as misplaced when a copy enhances clearly more than the mask (``COPY_MARGIN``: a
    transposed or flipped mask, the copy is the true place), or when it enhances little (<
    ``MIN_ENHANCING_FRACTION``), holds none of the strongest enhancement (``peak`` < ``MIN_PEAK_RATIO``) and
    no more than its copies (``CONFIRM_MARGIN``) -- another case's mask on this grid. A necrotic or
    rim-enhancing tumour enhances little in absolute terms but still holds the strongest voxels, far more
    than any copy of itself, so it is not flagged (``benchmarks/MASK_PLACEMENT.md``: false alarms and
    catches on the synthetic cohorts). A plausibility heuristic: reported, the case kept (``--strict``
    refuses it).
    """
    tumour = mask == 1
    n = int(np.count_nonzero(tumour))
    if n == 0 or n == mask.size:
        return {}
    diff = post.astype(np.float32) - pre.astype(np.float32)
    rest = diff[~tumour]
    threshold = float(np.percentile(rest, 95))
    own = _enhancing_fraction(diff, tumour, threshold)
    top = float(np.percentile(rest, 99.5))
    peak = float(np.percentile(diff[tumour], 90)) / top if top > 0 else math.inf
    copies: dict[str, np.ndarray] = {f"flipped along axis {a}": np.flip(tumour, a) for a in range(3)}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if tumour.shape[a] == tumour.shape[b]:
            copies[f"axes {a} and {b} swapped"] = np.swapaxes(tumour, a, b)
    best, best_name = None, ""
    for name, copy in copies.items():
        if np.count_nonzero(copy & tumour) >= MIN_COPY_SHIFT * n:
            continue  # the copy lies (mostly) on the mask itself: no comparison
        value = _enhancing_fraction(diff, copy, threshold)
        if best is None or value > best:
            best, best_name = value, name
    flagged = ""
    if best is not None and best > own + COPY_MARGIN:
        flagged = f"its copy {best_name} enhances more ({100 * best:.0f} % of voxels)"
    elif own < MIN_ENHANCING_FRACTION and peak < MIN_PEAK_RATIO and (best is None or own < best + CONFIRM_MARGIN):
        flagged = (f"its strongest voxels rise only {peak:.2f}x the rest of the volume's top 0.5 %, and it enhances "
                   "no more than its flipped/transposed copies" + (f" (best {100 * best:.0f} %)" if best is not None
                                                                   else ""))
    return {"enhancing": own, "copy": best, "peak": peak, "flagged": flagged}


def _enhancement_reason(rel: str, placement: dict[str, Any]) -> list[str]:
    """The report line of a mask that does not lie on enhancing tissue, or that enhances weakly but clearly
    more than its copies (necrotic core, rim enhancement); kept either way (``--strict`` refuses it)."""
    if not placement:
        return []
    own = 100 * placement["enhancing"]
    if placement.get("flagged"):
        return [f"mask {rel} may be misplaced: {own:.0f} % of its voxels enhance like the top 5 % of the rest of "
                f"the volume, {placement['flagged']}; it may be transposed, flipped or another case's: check it "
                "against the images (kept and scored; --strict refuses it)"]
    if placement["enhancing"] < MIN_ENHANCING_FRACTION:
        best = placement.get("copy")
        than = f"clearly more than its flipped/transposed copies (best {100 * best:.0f} %)" if best is not None \
            else "and has no flipped/transposed copy elsewhere to compare with"
        return [f"mask {rel} enhances weakly: {own:.0f} % of its voxels enhance like the top 5 % of the rest of the "
                f"volume, {than}; kept as it is (a necrotic core or a rim-enhancing tumour?)"]
    return []


def _swapped_phases(rel0: str, rel1: str, mask: np.ndarray, pre: np.ndarray, post: np.ndarray) -> str:
    """Why phases 0000 and 0001 look swapped (the tumour loses signal after contrast), or ''."""
    reverse = _placement(mask, post, pre)
    if not reverse or reverse["flagged"] or reverse["enhancing"] < MIN_ENHANCING_FRACTION:
        return ""
    return (f"phases {rel0} and {rel1} look swapped: the tumour is brighter before contrast than after "
            f"({100 * reverse['enhancing']:.0f} % of the mask's voxels drop like the top 5 % of the rest rises); "
            "check the phase order (kept; --strict refuses it)")


def _check_voxels(paths: Sequence[Path], mask_path: Path | None, headers: Sequence[_Header],
                  mask_header: _Header | None, rel: Any) -> dict[str, Any]:
    """Read every file of one case once; reasons to exclude it, problems to report, mask geometry."""
    reasons: list[str] = []
    plausibility: list[str] = []  # heuristics: reported with their measured value, the case kept
    arrays: dict[int, np.ndarray] = {}
    for k, (p, h) in enumerate(zip(paths, headers, strict=True)):
        try:
            arr = np.asarray(h.voxels(p))
        except Exception as err:
            reasons.append(f"cannot read the voxels of {rel(p)} ({type(err).__name__}: {err}); the file is "
                           "truncated or corrupt, re-download it")
            continue
        reasons += _image_reasons(rel(p), arr)
        if k < 2:
            arrays[k] = arr  # pre and first post-contrast: for the mask-placement check
    geometry: dict[str, Any] = {}
    if mask_path is not None and mask_header is not None:
        try:
            mask = np.asarray(mask_header.voxels(mask_path))
        except Exception as err:
            reasons.append(f"cannot read the voxels of {rel(mask_path)} ({type(err).__name__}: {err}); the "
                           "file is truncated or corrupt, re-download it")
        else:
            while mask.ndim > 3 and mask.shape[-1] == 1:
                mask = mask[..., 0]
            mask_reasons, count = _mask_reasons(rel(mask_path), mask)
            reasons += mask_reasons
            if not mask_reasons:
                if len(arrays) == 2 and not reasons:
                    placement = _placement(mask, arrays[0], arrays[1])
                    swapped = _swapped_phases(rel(paths[0]), rel(paths[1]), mask, arrays[0], arrays[1]) \
                        if placement.get("flagged") else ""
                    # phases in the wrong order are not the mask's fault: say so instead of blaming it
                    plausibility += [swapped] if swapped else _enhancement_reason(rel(mask_path), placement)
                    if placement:
                        geometry["mask_enhancing"] = round(placement["enhancing"], 4)
                if count:
                    where = np.nonzero(mask.any(axis=(1, 2))), np.nonzero(mask.any(axis=(0, 2))), \
                        np.nonzero(mask.any(axis=(0, 1)))
                    geometry["tumour_box"] = [int(v) for w in where for v in (w[0][0], w[0][-1] + 1)]
                geometry["mask_voxels"] = count
                geometry["tumour_ml"] = count * float(np.prod(voxel_spacing(headers[0].affine))) / 1000.0
    problems = [] if reasons else plausibility
    if not reasons and geometry.get("mask_voxels") == 0:
        problems.append(f"expert mask {rel(mask_path)} is empty (no tumour voxel)")
    return {"reasons": reasons, "problems": problems, "geometry": geometry}


class _VoxelCache:
    """Voxel-check results per case, keyed by its files' (path, size, mtime): later loads read no voxels."""

    def __init__(self, path: Path, root: Path) -> None:
        if path.resolve().is_relative_to(root.resolve()):
            raise CohortError(f"voxel_cache {path} lies inside the data folder {root}; input data is read-only, "
                              "keep caches in the run folder")
        self.path = path
        self.entries: dict[str, Any] = {}
        self.dirty = False
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if loaded.get("version") == VOXEL_CHECK_VERSION:
                self.entries = dict(loaded.get("cases") or {})
        except (OSError, ValueError, AttributeError):
            pass  # absent or damaged: check again and rewrite it

    @staticmethod
    def stamp(files: Sequence[Path]) -> list[Any]:
        out = []
        for p in files:
            st = p.stat()
            out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        return out

    def get(self, pid: str, stamp: list[Any]) -> dict[str, Any] | None:
        entry = self.entries.get(pid)
        return entry["result"] if entry and entry.get("files") == stamp else None

    def put(self, pid: str, stamp: list[Any], result: dict[str, Any]) -> None:
        self.entries[pid] = {"files": stamp, "result": result}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        from divaware.runfolder import write_text

        write_text(self.path, json.dumps({"version": VOXEL_CHECK_VERSION, "cases": self.entries}))
        self.dirty = False


def _cached_voxel_check(pid: str, paths: Sequence[Path], mask_path: Path | None, headers: Sequence[_Header],
                        mask_header: _Header | None, index: _Index, cache: _VoxelCache | None) -> dict[str, Any]:
    files = [*paths, *([mask_path] if mask_path is not None else [])]
    stamp = _VoxelCache.stamp(files) if cache is not None else []
    if cache is not None:
        hit = cache.get(pid, stamp)
        if hit is not None:
            return hit
    result = _check_voxels(paths, mask_path, headers, mask_header, lambda p: index.rel(p))
    if cache is not None:
        cache.put(pid, stamp, result)
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _counts(series: pd.Series, order: Iterable[str]) -> str:
    counts = series.value_counts()
    keys = [k for k in order if k in counts.index] + sorted(str(k) for k in counts.index if k not in order)
    return ", ".join(f"{k} {int(counts[k])}" for k in keys)


def _range(values: pd.Series, fmt: str = "{:g}") -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    lo, med, hi = values.min(), values.median(), values.max()
    return f"{fmt.format(lo)}-{fmt.format(hi)} (median {fmt.format(med)})"


def validation_report(cohort: Cohort) -> str:
    """A plain-text report: cases, phases, shapes/spacings, missingness, group sizes and every problem."""
    meta, geo = cohort.metadata, cohort.geometry
    n = len(meta)
    lines = [f"MAMA-MIA cohort at {cohort.root}",
             f"cases: {n} usable of {cohort.n_rows} spreadsheet rows ({len(cohort.excluded)} excluded); "
             f"sheet {cohort.sheet!r}",
             f"split: {_counts(meta['split'], (*SPLITS, UNKNOWN))}",
             f"datasets: {_counts(meta['dataset'], ('DUKE', 'ISPY1', 'ISPY2', 'NACT'))}"]
    if not geo.empty:
        lines.append("phases per case: " + ", ".join(f"{k}: {v}" for k, v in
                                                      sorted(geo["n_phases"].value_counts().items())))
        lines.append("shape (voxels): " + "; ".join(f"{a} {_range(geo[c], '{:.0f}')}"
                                                     for a, c in (("x", "nx"), ("y", "ny"), ("z", "nz"))))
        top = geo.assign(s=geo["nx"].astype(str) + "x" + geo["ny"].astype(str) + "x" + geo["nz"].astype(str))
        lines.append("most common shapes: " + ", ".join(f"{s} ({c})" for s, c in
                                                         top["s"].value_counts().head(5).items()))
        lines.append("spacing (mm): " + "; ".join(f"{a} {_range(geo[c], '{:.3g}')}" for a, c in
                                                   (("x", "spacing_x"), ("y", "spacing_y"), ("z", "spacing_z"))))
        lines.append(f"image dtypes: {_counts(geo['dtype'], ())}")
        if "tumour_ml" in geo.columns:
            lines.append(f"tumour volume (ml): {_range(geo['tumour_ml'], '{:.3g}')}; "
                         f"voxels {_range(geo['mask_voxels'], '{:.0f}')}")
    lines.append("voxel checks (binary masks, complete data): "
                 + ("done" if cohort.voxels_checked else "not run (headers only)"))
    if cohort.ignored_files:
        lines.append(f"non-NIfTI files ignored in image folders: {len(cohort.ignored_files)} "
                     f"(e.g. {_few(sorted({p.suffix or p.name for p in cohort.ignored_files}), 5)})")
    lines.append("missing / unknown per attribute:")
    for col in ("age", "menopause", "breast_density"):
        miss = int(meta[col].isna().sum()) if col == "age" else int((meta[col] == UNKNOWN).sum())
        pct = 100.0 * miss / n if n else 0.0
        lines.append(f"  {col}: {miss} ({pct:.1f} %)")
    lines.append("group sizes:")
    lines.append(f"  age_group: {_counts(meta['age_group'], (*AGE_GROUPS, UNKNOWN))}")
    lines.append(f"  menopause: {_counts(meta['menopause'], (*MENOPAUSE_GROUPS, UNKNOWN))}")
    lines.append(f"  breast_density: {_counts(meta['breast_density'], (*DENSITY_GROUPS, UNKNOWN))}")
    lines.append(f"problems: {len(cohort.problems)}" + ("" if cohort.problems else " (none)"))
    lines.extend(f"  - {p}" for p in cohort.problems)
    return "\n".join(lines)
