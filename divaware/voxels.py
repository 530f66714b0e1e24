"""Voxel and header checks of one case, the one rule used by check, load, train, predict and evaluate.

:func:`run_voxel_checks` reads a case's voxels and returns what is wrong with them (non-finite or absurd
intensities, an empty or over-full mask, a mask that does not sit on enhancing tissue, swapped phases);
:func:`geometry_reason` and the box helpers judge headers and breast boxes without reading voxels. The cohort
loader (:func:`divaware.cohort.load_cohort`) calls them and caches the voxel results per file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Header:
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


def read_header(path: Path) -> Header:
    """Shape, voxel sizes, dtype and affine from the NIfTI header only (no voxel data is read)."""
    import nibabel as nib

    img = nib.load(str(path))
    return Header(tuple(int(s) for s in img.shape), tuple(float(z) for z in img.header.get_zooms()),
                   str(img.get_data_dtype()), np.asarray(img.affine, dtype=float), img)




# --------------------------------------------------------------------------------------------------
# Voxel checks (one rule for check, load, train, predict and evaluate)
# --------------------------------------------------------------------------------------------------

MAX_ABS_INTENSITY = 1e10
"""Largest plausible absolute image intensity. MRI scanners write at most ~1e5; values beyond this overflow
the float32 z-score normalisation (its variance squares them: 1e36 -> inf), so the case would train on NaN."""
MAX_TUMOUR_FRACTION = 0.5
"""A mask covering more than this fraction of the volume is taken to be inverted (tumour <-> background)."""
VOXEL_CHECK_VERSION = 3  # bump when the checks change, so cached results are not reused


MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 20.0
"""Plausible voxel sizes of a breast MRI (per axis). Outside this range the header is corrupt or in other
units (a consistent 1e6 mm spacing once gave HD95 values of 1.7 km), so the case is excluded."""


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm of the array axes: the lengths of the affine's first three columns.

    The one spacing source of the package: MONAI's loader (training, prediction) orients and resamples
    with the affine nibabel reports (sform, else qform), and scoring uses this function, so all three agree.
    The header's pixdim must agree with it (checked by :func:`load_cohort`)."""
    return tuple(float(x) for x in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))  # type: ignore[return-value]


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing singleton axes: an (X, Y, Z, 1) mask is one 3-D mask."""
    out = tuple(shape)
    while len(out) > 3 and out[-1] == 1:
        out = out[:-1]
    return out


def geometry_reason(rel: str, header: Header) -> str | None:
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


def affine_diff(a: np.ndarray, b: np.ndarray) -> str:
    za, zb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(za, zb, atol=1e-3):
        return f"spacing {_fmt_vec(za)} mm vs {_fmt_vec(zb)} mm"
    if not np.allclose(a[:3, :3], b[:3, :3], atol=1e-3):
        return "orientation differs (flipped or permuted axes)"
    return f"origin {_fmt_vec(a[:3, 3])} vs {_fmt_vec(b[:3, 3])}"


def _fmt_vec(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def breast_box_problem(info: dict, shape: tuple[int, ...]) -> str | None:
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


def box_without_tumour(info: dict, tumour_box: Any) -> str | None:
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
    values, counts = np.unique(arr, return_counts=True)
    if len(values) <= 2:  # an MR phase has noise: two values are a mask or a thresholded image
        return [f"{rel} holds only the values {', '.join(f'{v:g}' for v in values.tolist())}: a binary image "
                "(a mask saved as a phase?), not an MR phase; re-convert or re-download it"]
    share = float(counts.max()) / arr.size
    if share >= NEAR_BLANK_SHARE:
        return [f"{rel} is nearly blank: {100 * share:.2f} % of its voxels are {values[counts.argmax()]:g}; "
                "re-convert or re-download it"]
    return []


NEAR_BLANK_SHARE = 0.995
"""A phase with this share of its voxels at one value is (nearly) blank, not an MR image: the synthetic
cohorts' most common value covers at most 6.4 % of a phase (40 cases measured); zero padding of real
acquisitions far less than 99.5 %."""
QFORM_SFORM_MM = 1.0
"""qform and sform placing a voxel of the grid further apart than this (mm) disagree."""


def qform_sform_problem(rel: str, header: Header) -> str | None:
    """A header whose two affines disagree (tools differ in which they use: nibabel and MONAI the sform,
    ITK-based tools such as nnU-Net's SimpleITK reader the qform) or whose sform is sheared (non-orthogonal
    axes: no voxel spacing describes it). Reported; the case is kept, read with the sform."""
    h = getattr(header.image, "header", None)
    if h is None or not hasattr(h, "get_sform"):
        return None
    sform, scode = h.get_sform(coded=True)
    qform, qcode = h.get_qform(coded=True)
    if sform is not None and scode:
        axes = sform[:3, :3] / np.maximum(np.linalg.norm(sform[:3, :3], axis=0), 1e-12)
        cosines = np.abs(axes.T @ axes - np.eye(3)).max()
        if cosines > 1e-3:
            off = 90.0 - float(np.degrees(np.arccos(min(cosines, 1.0))))
            return (f"{rel}: its sform is sheared (two axes {off:.1f} degrees off square); no voxel spacing "
                    "describes it and tools read it differently: check the conversion")
    if sform is None or qform is None or not scode or not qcode:
        return None
    shape = np.asarray(header.shape[:3], dtype=float) - 1
    corners = np.array([[x, y, z, 1.0] for x in (0, shape[0]) for y in (0, shape[1]) for z in (0, shape[2])])
    apart = float(np.linalg.norm((corners @ sform.T - corners @ qform.T)[:, :3], axis=1).max())
    if apart > QFORM_SFORM_MM:
        return (f"{rel}: its qform and sform disagree by up to {apart:.1f} mm at the grid's corners; nibabel and "
                "MONAI use the sform, ITK-based tools (nnU-Net's reader) the qform: make them agree")
    return None


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
*suspect* -- but only reported as misplaced when a relative test agrees (see :func:`tumour_placement`)."""
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


def tumour_placement(mask: np.ndarray, pre: np.ndarray, post: np.ndarray) -> dict[str, Any]:
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
    reverse = tumour_placement(mask, post, pre)
    if not reverse or reverse["flagged"] or reverse["enhancing"] < MIN_ENHANCING_FRACTION:
        return ""
    return (f"phases {rel0} and {rel1} look swapped: the tumour is brighter before contrast than after "
            f"({100 * reverse['enhancing']:.0f} % of the mask's voxels drop like the top 5 % of the rest rises); "
            "check the phase order (kept; --strict refuses it)")


def run_voxel_checks(paths: Sequence[Path], mask_path: Path | None, headers: Sequence[Header],
                  mask_header: Header | None, rel: Any) -> dict[str, Any]:
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
                    placement = tumour_placement(mask, arrays[0], arrays[1])
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
