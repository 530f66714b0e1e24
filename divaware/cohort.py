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
phase_binary           a binary (two-valued) image as phase 0002                         exclude
phase_near_blank       phase 0002 all zero but a few voxels (> 99.5 % one value)         exclude
qform_sform_30mm       phase 0001's qform 30 mm from its sform                           report
sform_sheared          a sheared sform (axes not square) in every file                   report
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
intensities below ``MAX_ABS_INTENSITY``, no constant, two-valued or nearly blank phase, a binary mask that is
neither inverted nor off the enhancing tumour -- read every file in full: on the real data that is ~1 GB of
gzip per 20 cases, so ``load_cohort(voxel_cache=...)`` remembers each case's result keyed by its files' paths
and content digests (:mod:`divaware.digests`: a file edited in place is checked again, even with its size and
modification time kept; an unchanged file is not read again). The headers are also compared: a qform and an
sform that disagree (ITK-based tools read the qform, nibabel and MONAI the sform) and a sheared sform are
reported. Training keeps that cache in the run's cache folder (next to the preprocessed cases) and
evaluation/prediction in the run folder, so a run's files are voxel-checked once and a resume or an
evaluation reads no voxels for checking. ``check_voxels=False`` (``divaware check --headers-only``) skips
them: only for a quick look, since a case that fails them breaks or corrupts every computation.
"""

from __future__ import annotations

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

from divaware import voxels as V
from divaware.voxels import (  # noqa: F401 (public names re-exported: callers import them from here)
    MAX_ABS_INTENSITY,
    MAX_TUMOUR_FRACTION,
    MIN_ENHANCING_FRACTION,
    VOXEL_CHECK_VERSION,
    Header,
    affine_diff,
    box_holds_tumour,
    box_without_tumour,
    breast_box_problem,
    geometry_reason,
    json_breast_box,
    qform_sform_problem,
    read_header,
    squeezed,
    tumour_placement,
    voxel_spacing,
)

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
                require_masks: bool = True, voxel_cache: str | Path | None = None,
                phases: Sequence[int] | None = None) -> Cohort:
    """Load a MAMA-MIA-layout cohort from ``root``.

    ``strict``: raise :class:`CohortError` on any problem instead of excluding/reporting (see the module
    docstring for what each problem does otherwise). ``check_voxels``: also read every mask and image in full
    (complete data, finite and non-constant intensities, binary plausible masks; see the module docstring);
    ``False`` checks the headers only. ``voxel_cache``: a JSON file (outside ``root``) remembering the voxel
    checks per file (path, size, modification time), so later loads of the same files read no voxels;
    training and evaluation keep it in the run's cache folder. ``require_masks=False`` allows a cohort without
    expert segmentations (inference only). ``phases``: the phase indices a run uses (its ``phases``); the
    phases after the last of them are neither checked nor listed in ``Case.image_paths``, so a defect in a
    phase the run never reads (0003 with phases [0, 1, 2]) excludes no case. None: every phase.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise CohortError(f"cohort folder {root} does not exist; pass the folder that "
                          f"holds images/, segmentations/, {SPREADSHEET} and {SPLIT_FILE}")
    if not root.is_dir():
        raise CohortError(f"cohort folder {root} is a file, not a folder; pass the folder that "
                          f"holds images/, segmentations/, {SPREADSHEET} and {SPLIT_FILE}")
    cache = VoxelCache(Path(voxel_cache), root) if (check_voxels and voxel_cache) else None
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
        result = _load_case(pid, index, check_voxels, require_masks, problems, ignored, cache,
                            n_used=max(phases) + 1 if phases else None)
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
               ignored: list[Path], voxel_cache: VoxelCache | None = None,
               n_used: int | None = None) -> tuple[Case, dict[str, Any]] | list[str]:
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
    paths = tuple(phases[k][0] for k in numbers[:n_used])  # n_used: the phases a run reads (load_cohort)

    reasons: list[str] = []
    headers = []
    for p in paths:
        try:
            headers.append(read_header(p))
        except Exception as err:
            reasons.append(f"cannot read {index.rel(p)} ({type(err).__name__}: {err}); re-download or re-convert it")
    if reasons:
        return reasons
    reasons += [r for p, h in zip(paths, headers, strict=True) if (r := geometry_reason(index.rel(p), h))]
    if reasons:
        return reasons
    problems += [f"{pid}: {q}" for p, h in zip(paths, headers, strict=True) if (q := qform_sform_problem(index.rel(p), h))]
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
                           f"0000 ({affine_diff(h.affine, affine0)}); resample it onto phase 0000's grid")
    if len(paths) < 3 and n_used is None:
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
               reasons: list[str], problems: list[str]) -> tuple[Path | None, Header | None]:
    """The case's expert mask and its header (None when absent); what makes it unusable goes to ``reasons``,
    what is reported but kept to ``problems``."""
    mask_path: Path | None = None
    mask_header: Header | None = None
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
            mask_header = read_header(mask_path)
        except Exception as err:
            reasons.append(f"cannot read {index.rel(mask_path)} ({type(err).__name__}: {err}); re-download it")
        mask_geometry = geometry_reason(index.rel(mask_path), mask_header) if mask_header is not None else None
        if mask_geometry:
            reasons.append(mask_geometry)
        elif mask_header is not None and squeezed(mask_header.shape) != shape0:
            reasons.append(f"mask {index.rel(mask_path)} has shape {mask_header.shape}, the images {shape0}; the "
                           "mask must be on the image grid")
        elif mask_header is not None and not np.allclose(mask_header.affine, affine0, atol=1e-3):
            # Same voxels, other placement (flipped axis, doubled spacing): after reorientation/resampling
            # the label would no longer cover the tumour, so training and scoring would be garbage.
            reasons.append(f"mask {index.rel(mask_path)} has a different affine from the images "
                           f"({affine_diff(mask_header.affine, affine0)}); the mask must be on the image grid "
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
            box_problem = breast_box_problem(info, shape) or box_without_tumour(info, tumour_box)
            if box_problem:
                problems.append(f"{pid}: {index.rel(info_path)}: {box_problem}")
    return info


# --------------------------------------------------------------------------------------------------
# Cached voxel checks
# --------------------------------------------------------------------------------------------------


class VoxelCache:
    """Voxel-check results per case, keyed by its files' paths and content digests (:mod:`divaware.digests`,
    remembered in ``digests/`` beside the cache): later loads read no voxels, and a file edited in place
    (even with its size and mtime kept) is checked again."""

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

    def stamp(self, files: Sequence[Path]) -> list[Any]:
        from divaware.digests import file_digest

        return [[str(p.resolve()), file_digest(p, self.path.parent / "digests")] for p in files]

    def get(self, pid: str, stamp: list[Any]) -> dict[str, Any] | None:
        entry = self.entries.get(pid)
        return entry["result"] if entry and entry.get("files") == stamp else None

    def put(self, pid: str, stamp: list[Any], result: dict[str, Any]) -> None:
        self.entries[pid] = {"files": stamp, "result": result}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        from divaware.outputs import OutputError, ensure_writable
        from divaware.runfolder import write_text

        try:
            ensure_writable(self.path.parent, "voxel-check cache")
        except OutputError as err:  # a read-only (or full) store still serves what it holds
            warnings.warn(f"voxel checks not cached, so repeated next time: {err}", stacklevel=4)
        else:
            write_text(self.path, json.dumps({"version": VOXEL_CHECK_VERSION, "cases": self.entries}))
        self.dirty = False


def _cached_voxel_check(pid: str, paths: Sequence[Path], mask_path: Path | None, headers: Sequence[Header],
                        mask_header: Header | None, index: _Index, cache: VoxelCache | None) -> dict[str, Any]:
    files = [*paths, *([mask_path] if mask_path is not None else [])]
    stamp = cache.stamp(files) if cache is not None else []
    if cache is not None:
        hit = cache.get(pid, stamp)
        if hit is not None:
            return hit
    result = V.run_voxel_checks(paths, mask_path, headers, mask_header, lambda p: index.rel(p))
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
