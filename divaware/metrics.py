"""Segmentation metrics, the MAMA-MIA Task-1 score and per-group fairness reports.

Everything here is numpy/scipy/pandas: no torch, so evaluation runs anywhere and stays fast on CPU.

Per case (:func:`case_metrics`), with the challenge's conventions (organisers' ``metrics.py``):

* **Dice** = 2TP / (2TP + FP + FN). When prediction and truth are both empty the ratio is 0/0; the
  organisers return 0 and so do we by default (``both_empty=0.0``), so that our numbers reproduce theirs.
  Every MAMA-MIA case has a tumour, so this never fires on the real data; pass ``both_empty=1.0`` (MONAI's
  ``ignore_empty=False`` convention) when scoring patches or crops that may legitimately be empty.
* **HD95** (``hd95``, voxels) = max of the two *directed* 95th-percentile distances between the surface
  voxels of prediction and truth, measured on voxel indices (spacing ignored) -- as the challenge does.
  Surface voxels are foreground voxels with a background face-neighbour; outside the image counts as
  foreground, which is what ITK's ``LabelContour`` (used by the organisers) does, so a mask touching the
  image edge has no surface on that edge. Percentiles use numpy's default linear interpolation.
* Empty masks: empty prediction and non-empty truth -> ``hd95 = inf`` and ``norm_hd = 1``; empty truth and
  non-empty prediction -> the same (the organisers' rule is symmetric); both empty -> ``hd95 = 0`` and
  ``norm_hd = 0``. (A mask filling the whole image has no surface and is treated as empty, as in ITK.)
* **NormHD** = HD95 / 150, *not* clipped (an HD95 of 300 voxels gives 2.0), 1 when HD95 is infinite.
* **HD95 in mm** (``hd95_mm``): the same surfaces, distances in millimetres using the voxel spacing
  (anisotropic spacing handled exactly by the distance transform). NaN when exactly one mask is empty
  (undefined, and left out of group means), 0 when both are.
* **Volumes** in ml: voxel count x voxel volume (mm^3) / 1000.

``spacing`` is given per array axis, in the array's axis order (nibabel: x, y, z; SimpleITK arrays: z, y, x).

Cohort-level tables take a *per-case table*: a DataFrame indexed by ``patient_id`` (or with a
``patient_id`` column) with the columns of :func:`case_metrics`, plus the cohort metadata (index
``patient_id``). Rows are always matched by ``patient_id``, never by position.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

HD_MAX = 150.0
"""The challenge's normalisation constant for HD95 (voxels)."""

PER_CASE_COLUMNS = ("dice", "hd95", "hd95_mm", "norm_hd", "pred_volume_ml", "true_volume_ml")
"""Keys of :func:`case_metrics`, and so the columns of a per-case table."""

CHALLENGE_AGE_GROUPS = ("0-40", "41-50", "51-60", "61-70", "71+")
CHALLENGE_MENOPAUSE = ("pre", "post", "unknown")
CHALLENGE_DENSITY = ("a", "b", "c", "d")
# The challenge bins raw ages with pd.cut(bins=[0, 40, 50, 60, 70, 100]) (right-closed).
_AGE_BINS = (0, 40, 50, 60, 70, 100)

UNKNOWN = "unknown"
MIN_GROUP_SIZE = 10
"""Groups smaller than this are flagged ``small``: their means and bootstrap CIs are unreliable."""

# Display/sort order for the values the cohort module produces; anything else sorts alphabetically after.
_VALUE_ORDER = {
    v: i for i, v in enumerate(CHALLENGE_AGE_GROUPS + ("pre", "peri", "post") + CHALLENGE_DENSITY)
}
_LOWER_IS_BETTER = {"hd95", "hd95_mm", "norm_hd"}


# --------------------------------------------------------------------------------------------------
# per case
# --------------------------------------------------------------------------------------------------


def _as_mask(x: Any, name: str) -> np.ndarray:
    """A boolean foreground mask: nonzero voxels. Refuses soft (probability) maps, which need a threshold."""
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.any((arr != 0) & (arr != 1)):
        raise ValueError(
            f"{name} has values other than 0 and 1; threshold probabilities (e.g. p > 0.5) before scoring"
        )
    return arr != 0


def _check_pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}; resample pred onto truth")
    return p, t


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(sp) == 1:
        sp = sp * ndim
    if len(sp) != ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per array axis), got {spacing!r}")
    return sp


def dice(
    pred: Any, truth: Any, *, spatial_dims: int | None = None, both_empty: float = 0.0
) -> float | np.ndarray:
    """Dice = 2TP / (2TP + FP + FN) of binary masks.

    With ``spatial_dims=None`` the whole arrays are one case and a float is returned. With
    ``spatial_dims=k`` the last ``k`` axes are spatial and the leading axes index cases (e.g. a batch
    ``(N, X, Y, Z)`` with ``k=3``): an array of the leading shape is returned. ``both_empty`` is the value
    for cases where both masks are empty (challenge: 0).
    """
    p, t = _check_pair(pred, truth)
    if spatial_dims is not None and not 0 < spatial_dims <= p.ndim:
        raise ValueError(f"spatial_dims must be in 1..{p.ndim}, got {spatial_dims}")
    axes = None if spatial_dims is None else tuple(range(p.ndim - spatial_dims, p.ndim))
    inter = np.count_nonzero(p & t, axis=axes)
    total = np.count_nonzero(p, axis=axes) + np.count_nonzero(t, axis=axes)
    # 2TP / (2TP + FP + FN) == 2|P & T| / (|P| + |T|); guard the 0/0 case explicitly.
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), float(both_empty))
    return float(out) if axes is None else out


def _surface(mask: np.ndarray) -> np.ndarray:
    # Face connectivity and border_value=1 reproduce ITK's LabelContour (fullyConnected=False), which the
    # organisers use: image-edge voxels are surface only if they touch background inside the image.
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the union's bounding box plus one voxel (clipped to the image).

    Distances and surfaces are unchanged: every surface voxel lies in the box, the one-voxel margin is
    background wherever the box is inside the image, and where it meets the image edge the erosion's
    border value applies exactly as on the full image. This makes HD95 cost O(tumour), not O(volume).
    """
    union = a | b
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    box = tuple(slices)
    return a[box], b[box]


def surface_distances(
    pred: Any, truth: Any, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred -> truth, truth -> pred)``.

    For each surface voxel of one mask, the Euclidean distance to the nearest surface voxel of the other,
    in voxel units when ``spacing`` is None, else in the units of ``spacing`` (mm). A mask without
    surface voxels gives an empty array, and the other mask's distances are then all ``inf``.
    """
    p, t = _check_pair(pred, truth)
    sp = _check_spacing(spacing, p.ndim)
    if p.any() or t.any():
        p, t = _crop_to_union(p, t)
    return _directed(_surface(p), _surface(t), sp)


def _directed(
    sp_: np.ndarray, st: np.ndarray, spacing: tuple[float, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    if not sp_.any() or not st.any():
        # Nothing to measure against: a surface voxel is infinitely far from an empty surface.
        return (np.full(np.count_nonzero(sp_), np.inf), np.full(np.count_nonzero(st), np.inf))
    # Exact EDT of the complement of one surface gives, at every voxel, the distance to its nearest
    # surface voxel -- the same numbers as an all-pairs / KD-tree nearest-neighbour search.
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp_, sampling=spacing)
    return to_truth[sp_], to_pred[st]


def _hd_from_distances(d_pt: np.ndarray, d_tp: np.ndarray, percentile: float) -> float:
    if d_pt.size == 0 and d_tp.size == 0:
        return 0.0  # both empty: the organisers' hausdorff_distance returns 0
    if d_pt.size == 0 or d_tp.size == 0:
        return math.inf  # exactly one empty
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def hd95(
    pred: Any, truth: Any, spacing: Sequence[float] | None = None, *, percentile: float = 95.0
) -> float:
    """Symmetric percentile Hausdorff distance: max of the two directed ``percentile`` surface distances.

    ``spacing=None`` measures on voxel indices (the challenge's HD95); with a spacing it is in mm.
    Returns 0 when both masks are empty and ``inf`` when exactly one is.
    """
    return _hd_from_distances(*surface_distances(pred, truth, spacing), percentile)


def volume_ml(mask: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Foreground volume in millilitres (spacing in mm)."""
    m = _as_mask(mask, "mask")
    sp = _check_spacing(spacing, m.ndim)
    return float(np.count_nonzero(m) * float(np.prod(sp)) / 1000.0)


def case_metrics(
    pred: Any,
    truth: Any,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    both_empty: float = 0.0,
    hd_max: float = HD_MAX,
) -> dict[str, float]:
    """All per-case metrics of one prediction, with the challenge's conventions (see the module docstring).

    Returns ``dice, hd95`` (voxels), ``hd95_mm, norm_hd, pred_volume_ml, true_volume_ml``.
    """
    p, t = _check_pair(pred, truth)
    sp = _check_spacing(spacing, p.ndim)
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    out = {
        "dice": dice(p, t, both_empty=both_empty),
        "pred_volume_ml": n_p * float(np.prod(sp)) / 1000.0,
        "true_volume_ml": n_t * float(np.prod(sp)) / 1000.0,
    }
    if n_p or n_t:
        p, t = _crop_to_union(p, t)
    surf_p, surf_t = _surface(p), _surface(t)
    hd_vox = _hd_from_distances(*_directed(surf_p, surf_t, None), 95.0)
    if math.isinf(hd_vox):
        hd_mm = math.nan  # undefined; NormHD carries the penalty
    elif all(s == 1.0 for s in sp):
        hd_mm = hd_vox  # skip the second pair of distance transforms
    else:
        hd_mm = _hd_from_distances(*_directed(surf_p, surf_t, sp), 95.0)
    out["hd95"] = hd_vox
    out["hd95_mm"] = hd_mm
    out["norm_hd"] = 1.0 if math.isinf(hd_vox) else hd_vox / hd_max
    return {k: float(out[k]) for k in PER_CASE_COLUMNS}


# --------------------------------------------------------------------------------------------------
# tables keyed by patient_id
# --------------------------------------------------------------------------------------------------


def _per_case_frame(per_case: pd.DataFrame, required: Sequence[str]) -> pd.DataFrame:
    """The per-case table indexed by patient_id, checked for the columns a computation needs."""
    df = per_case
    if "patient_id" in df.columns:
        df = df.set_index("patient_id")
    elif df.index.name != "patient_id":
        raise ValueError("per-case table needs a 'patient_id' index or column")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"per-case table lacks column(s) {missing}; it has {list(df.columns)}")
    dup = df.index[df.index.duplicated()].unique()
    if len(dup):
        raise ValueError(f"per-case table has duplicate patient_id(s): {_few(dup)}")
    for c in required:
        bad = df.index[df[c].isna()]
        if len(bad):
            raise ValueError(f"per-case column {c!r} is missing for case(s) {_few(bad)}")
    return df


def few(ids: Any, k: int = 10) -> str:
    ids = [str(i) for i in ids]
    more = f" and {len(ids) - k} more" if len(ids) > k else ""
    return ", ".join(ids[:k]) + more


_few = few  # the former private name


def _metadata_for(ids: pd.Index, metadata: pd.DataFrame, columns: Sequence[str] = ()) -> pd.DataFrame:
    """Metadata rows of the given cases, looked up by patient_id (error naming any case it lacks)."""
    meta = metadata.set_index("patient_id") if "patient_id" in metadata.columns else metadata
    missing_cols = [c for c in columns if c not in meta.columns]
    if missing_cols:
        raise ValueError(f"metadata lacks column(s) {missing_cols}; it has {list(meta.columns)}")
    absent = ids.difference(meta.index)
    if len(absent):
        raise ValueError(f"metadata has no row for case(s) {_few(absent)}; pass the cohort's metadata")
    return meta.loc[ids]


def _labels(values: pd.Series) -> pd.Series:
    """Group labels as plain strings, missing values as 'unknown' (without pandas' 'nan' strings)."""
    out = values.astype(object).where(values.notna(), UNKNOWN)
    return out.map(lambda v: UNKNOWN if str(v).strip() == "" else str(v))


def _order_key(v: str) -> tuple[int, int, str]:
    if v == UNKNOWN:
        return (2, 0, v)
    if v in _VALUE_ORDER:
        return (0, _VALUE_ORDER[v], v)
    return (1, 0, v)


def group_order(values: Any) -> list[str]:
    """Distinct group labels in the cohort's natural order (age groups ascending, pre < post, density
    a-d, other labels alphabetically, ``unknown`` last): the order tables and figures use."""
    return sorted({str(v) for v in values}, key=_order_key)


# --------------------------------------------------------------------------------------------------
# the MAMA-MIA Task-1 score
# --------------------------------------------------------------------------------------------------


def _challenge_menopause(value: Any) -> str:
    # The organisers' mapping: 'peri...' -> pre, '...post...' -> post, '...pre...' -> pre, missing ->
    # unknown (its own group). Anything else we also call unknown rather than invent a fourth group.
    if not isinstance(value, str):
        return UNKNOWN  # NaN / None / pd.NA
    s = value.strip().lower()
    if "peri" in s:
        return "pre"
    if "post" in s:
        return "post"
    if "pre" in s:
        return "pre"
    return UNKNOWN


def challenge_groups(metadata: pd.DataFrame) -> pd.DataFrame:
    """The challenge's three fairness variables per case, index ``patient_id``.

    Columns ``age`` (0-40, 41-50, 51-60, 61-70, 71+; NaN = unknown, dropped by the challenge),
    ``menopause`` (pre incl. peri, post, unknown) and ``breast_density`` (a-d; NaN = missing, dropped).
    Uses the cohort's normalised ``age_group`` when present, else bins a raw ``age`` column as the
    organisers do; accepts ``menopause`` or ``menopausal_status`` in short or long form.
    """
    meta = metadata.set_index("patient_id") if "patient_id" in metadata.columns else metadata
    out = pd.DataFrame(index=meta.index)
    if "age_group" in meta.columns:
        age = meta["age_group"].astype(object)
        out["age"] = age.where(age.isin(CHALLENGE_AGE_GROUPS))
    elif "age" in meta.columns:
        cut = pd.cut(pd.to_numeric(meta["age"], errors="coerce"), bins=list(_AGE_BINS),
                     labels=list(CHALLENGE_AGE_GROUPS))
        out["age"] = cut.astype(object).where(cut.notna())
    else:
        raise ValueError("metadata needs an 'age_group' (or raw 'age') column for the challenge score")
    meno_col = next((c for c in ("menopause", "menopausal_status") if c in meta.columns), None)
    if meno_col is None:
        raise ValueError("metadata needs a 'menopause' (or 'menopausal_status') column for the challenge score")
    out["menopause"] = meta[meno_col].astype(object).map(_challenge_menopause)
    if "breast_density" not in meta.columns:
        raise ValueError("metadata needs a 'breast_density' column (a-d, missing allowed) for the challenge score")
    dens = meta["breast_density"].astype(object).map(
        lambda v: str(v).strip().lower() if isinstance(v, str) else None
    )
    out["breast_density"] = dens.where(dens.isin(CHALLENGE_DENSITY))
    return out


def challenge_score(per_case: pd.DataFrame, metadata: pd.DataFrame) -> dict[str, Any]:
    """The MAMA-MIA Task-1 ranking score of a set of predictions.

    * P = ½ (mean Dice + 1 − mean NormHD) over all cases of ``per_case``;
    * for each of age group, menopausal status and breast density:
      F_a = 1 − ½ [(max − min of group-mean Dice) + (max − min of group-mean NormHD)],
      over the groups present (unknown age and missing density dropped; unknown menopause is a group);
    * F = mean of the F_a; ranking = ½ P + ½ F.

    Group means are taken over cases matched by ``patient_id`` (the organisers' public script assigned
    scores to new rows and got NaN group means). A variable with a single group present scores F_a = 1,
    as in the challenge; one with *no* known group (e.g. no density recorded in the split) has F_a = NaN
    and F averages the remaining variables -- listed under ``undefined`` -- instead of becoming NaN.

    Returns ``P, F_age, F_menopause, F_density, F, ranking``, the means behind them (``mean_dice``,
    ``mean_norm_hd``, ``mean_hd95_mm`` and ``n_hd95_mm``, the cases it covers, when available), ``n_cases``,
    ``undefined`` and ``groups``
    ({variable: {group: {n, dice, norm_hd}}}).
    """
    pc = _per_case_frame(per_case, ("dice", "norm_hd"))
    if pc.empty:
        raise ValueError("per-case table is empty: nothing to score")
    groups = challenge_groups(_metadata_for(pc.index, metadata))
    mean_dice, mean_nhd = float(pc["dice"].mean()), float(pc["norm_hd"].mean())
    perf = 0.5 * (mean_dice + 1.0 - mean_nhd)
    result: dict[str, Any] = {"P": perf}
    detail: dict[str, dict[str, dict[str, float]]] = {}
    undefined = []
    for var, key in (("age", "F_age"), ("menopause", "F_menopause"), ("breast_density", "F_density")):
        g = groups[var]
        known = g.notna()
        # groupby aligns on the patient_id index: each score lands in its own case's group.
        stats = pc.loc[known, ["dice", "norm_hd"]].groupby(g[known]).agg(["mean", "size"])
        detail[var] = {
            str(name): {"n": int(row[("dice", "size")]), "dice": float(row[("dice", "mean")]),
                        "norm_hd": float(row[("norm_hd", "mean")])}
            for name, row in sorted(stats.iterrows(), key=lambda kv: _order_key(str(kv[0])))
        }
        if stats.empty:
            result[key] = math.nan
            undefined.append(key)
            continue
        d, h = stats[("dice", "mean")], stats[("norm_hd", "mean")]
        result[key] = float(1.0 - 0.5 * ((d.max() - d.min()) + (h.max() - h.min())))
    defined = [result[k] for k in ("F_age", "F_menopause", "F_density") if not math.isnan(result[k])]
    result["F"] = float(np.mean(defined)) if defined else math.nan
    result["ranking"] = 0.5 * perf + 0.5 * result["F"]
    result["mean_dice"] = mean_dice
    result["mean_norm_hd"] = mean_nhd
    if "hd95_mm" in pc.columns:
        mm = pd.to_numeric(pc["hd95_mm"], errors="coerce")
        mm = mm[np.isfinite(mm)]
        result["mean_hd95_mm"] = float(mm.mean()) if len(mm) else math.nan
        result["n_hd95_mm"] = int(len(mm))  # the cases that mean covers (an empty prediction has no distance)
    result["n_cases"] = len(pc)
    result["undefined"] = undefined
    result["groups"] = detail
    return result


# --------------------------------------------------------------------------------------------------
# per-group tables, bootstrap, fairness figures
# --------------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Any, *, n_boot: int = 2000, ci: float = 0.95, seed: int | Sequence[int] = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, reproducible for a given ``seed``.

    Returns ``(nan, nan)`` for fewer than two values (a single case has no sampling spread to resample)
    and when ``n_boot`` is 0 (no interval wanted).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if x.size < 2 or n_boot == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    # Resample in chunks so that memory stays bounded for large cohorts (n_boot x n indices).
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def _group_seed(seed: int, label: str) -> list[int]:
    # A group's CI depends on the seed and its own label only, not on which other groups are in the table.
    return [int(seed), zlib.crc32(label.encode("utf-8"))]


def _as_list(by: str | Sequence[str]) -> list[str]:
    cols = [by] if isinstance(by, str) else list(by)
    if not cols:
        raise ValueError("by must name at least one metadata column")
    return cols


def _grouped(per_case: pd.DataFrame, metadata: pd.DataFrame, by: list[str], metric: str,
             drop_unknown: bool) -> tuple[pd.DataFrame, pd.Series]:
    """Per-case table joined with string group labels; also the 'group' label per case."""
    pc = _per_case_frame(per_case, (metric,))
    meta = _metadata_for(pc.index, metadata, by)
    df = pc.copy()
    for col in by:
        df[col] = _labels(meta[col])
    if drop_unknown:
        df = df[~(df[by] == UNKNOWN).any(axis=1)]
    label = df[by[0]] if len(by) == 1 else df[by].agg(" / ".join, axis=1)
    return df, label


def group_table(
    per_case: pd.DataFrame,
    metadata: pd.DataFrame,
    by: str | Sequence[str],
    *,
    metric: str = "dice",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    min_n: int = MIN_GROUP_SIZE,
    drop_unknown: bool = False,
) -> pd.DataFrame:
    """One row per group of ``by`` (a metadata column, or a list of columns for their intersection).

    Columns: the ``by`` columns, ``group`` (their values joined by " / "), ``n``, ``mean`` of ``metric``,
    ``ci_low``/``ci_high`` (seeded percentile bootstrap; NaN when n < 2 or ``n_boot=0``), ``gap`` (group mean − mean over
    all cases of ``per_case``), ``hd95_mm`` (mean over cases where it is defined) and ``norm_hd`` when the
    per-case table has them, and ``small`` (n < ``min_n``: read with caution). Missing metadata values
    form an ``unknown`` group unless ``drop_unknown``. Rows are in the cohort's natural order.
    """
    cols = _as_list(by)
    df, label = _grouped(per_case, metadata, cols, metric, drop_unknown)
    overall = float(_per_case_frame(per_case, (metric,))[metric].mean())
    rows = []
    for name, members in df.groupby(label, sort=False):
        name = str(name)
        vals = members[metric].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(vals, n_boot=n_boot, ci=ci, seed=_group_seed(seed, name))
        row: dict[str, Any] = {c: members[c].iloc[0] for c in cols}
        row.update(group=name, n=len(vals), mean=float(vals.mean()), ci_low=lo, ci_high=hi,
                   gap=float(vals.mean()) - overall)
        if "hd95_mm" in members.columns:
            mm = pd.to_numeric(members["hd95_mm"], errors="coerce")
            mm = mm[np.isfinite(mm)]
            row["hd95_mm"] = float(mm.mean()) if len(mm) else math.nan
        if "norm_hd" in members.columns:
            row["norm_hd"] = float(members["norm_hd"].mean())
        row["small"] = len(vals) < min_n
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=[*cols, "group", "n", "mean", "ci_low", "ci_high", "gap", "small"])
    order = sorted(range(len(table)), key=lambda i: [_order_key(str(table.at[i, c])) for c in cols])
    return table.iloc[order].reset_index(drop=True)


def _higher_is_better(metric: str) -> bool:
    return metric not in _LOWER_IS_BETTER


def _fairness_from_means(means: pd.Series, overall: float, metric: str) -> dict[str, Any]:
    """Fairness figures from group means (index = group label) and the overall mean."""
    if means.empty:
        nan = math.nan
        return {"metric": metric, "overall": overall, "n_groups": 0, "worst_group": nan,
                "worst_group_label": None, "best_group": nan, "best_group_label": None,
                "gap": nan, "std": nan, "es": nan}
    hib = _higher_is_better(metric)
    worst_label = means.idxmin() if hib else means.idxmax()
    best_label = means.idxmax() if hib else means.idxmin()
    # ES (FairSeg 2024): overall / (1 + sum of absolute group deviations from the overall score). It is
    # defined for scores where higher is better; for distances it would reward a worse overall, so NaN.
    es = overall / (1.0 + float((means - overall).abs().sum())) if hib else math.nan
    return {
        "metric": metric,
        "overall": overall,
        "n_groups": len(means),
        "worst_group": float(means[worst_label]),
        "worst_group_label": str(worst_label),
        "best_group": float(means[best_label]),
        "best_group_label": str(best_label),
        "gap": float(means.max() - means.min()),
        "std": float(means.std(ddof=0)),
        "es": float(es),
    }


def fairness_summary(
    per_case: pd.DataFrame,
    metadata: pd.DataFrame,
    by: str | Sequence[str],
    *,
    metric: str = "dice",
    min_n: int = 1,
    drop_unknown: bool = False,
) -> dict[str, Any]:
    """Summary fairness figures of ``metric`` across the groups of ``by``.

    ``overall`` (mean over all cases), ``worst_group`` / ``best_group`` (group means, with their labels;
    "worst" is the lowest for Dice and the highest for distance metrics), ``gap`` (max − min of group
    means), ``std`` (population standard deviation of the group means, each group counted once) and ``es``
    (equity-scaled score, ES-Dice for Dice: overall / (1 + Σ_g |mean_g − overall|), FairSeg 2024).
    Groups with fewer than ``min_n`` cases are left out of the figures (default: none are).
    """
    cols = _as_list(by)
    df, label = _grouped(per_case, metadata, cols, metric, drop_unknown)
    overall = float(_per_case_frame(per_case, (metric,))[metric].mean())
    stats = df[metric].groupby(label).agg(["mean", "size"])
    means = stats.loc[stats["size"] >= min_n, "mean"]
    return _fairness_from_means(means, overall, metric)


# --------------------------------------------------------------------------------------------------
# divergent subgroups of the test results
# --------------------------------------------------------------------------------------------------

DEFAULT_ATTRIBUTES = ("age_group", "menopause", "breast_density")

# -- the worst group: one definition for model selection, fairness.json, the reports and the plots ---------
UNKNOWN_IS_GROUP: frozenset[str] = frozenset({"menopause"})
"""Attributes whose missing value (``unknown``) is a group of its own. Following the challenge's fairness
score F (DESIGN.md): unknown menopausal status is a group (27 % of MAMA-MIA; its cases are real patients
with something in common, e.g. their source datasets), while cases of unknown age or missing breast
density are dropped (missing density is the rule, not a subgroup). Every other attribute drops
``unknown`` too."""


def counts_unknown(attribute: str) -> bool:
    """Whether ``unknown`` values of ``attribute`` form a group (see :data:`UNKNOWN_IS_GROUP`)."""
    return attribute in UNKNOWN_IS_GROUP


def worst_group(scores: pd.Series, groups: pd.DataFrame, min_size: int = 1) -> tuple[float, str]:
    """The lowest group mean of ``scores`` (higher is better) and its label ``attribute=value``.

    ``groups`` holds one column per attribute (index patient_id, values as strings); every value of every
    attribute with at least ``min_size`` cases is a group, ``unknown`` only where :func:`counts_unknown`.
    Ties keep the first attribute (column order) and value (sorted). ``(nan, "")`` when no group qualifies.
    Training's model selection calls it; fairness.json (divaware.evaluate) applies the same rule per
    attribute through :func:`fairness_summary` with ``drop_unknown=not counts_unknown(attribute)``.
    """
    worst, label = math.nan, ""
    for attr in groups.columns:
        joined = pd.DataFrame({"g": groups.loc[scores.index, attr].astype(str), "s": scores.to_numpy()})
        if not counts_unknown(attr):
            joined = joined[joined["g"] != UNKNOWN]
        stats = joined.groupby("g")["s"].agg(["mean", "size"])
        stats = stats[stats["size"] >= min_size]
        for value, row in stats.iterrows():
            if math.isnan(worst) or row["mean"] < worst:
                worst, label = float(row["mean"]), f"{attr}={value}"
    return worst, label


def divergent_subgroups(
    per_case: pd.DataFrame,
    metadata: pd.DataFrame,
    attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
    *,
    metric: str = "dice",
    min_support: float = 0.05,
    max_length: int | None = 3,
    bins: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Which subgroups does this model fail? DivExplorer itemsets over the evaluated cases.

    A thin wrapper over :mod:`divaware.subgroups`: the attribute table of the cases in ``per_case``
    (``bins`` as in ``subgroups.attribute_table``) and their ``metric`` scores, matched by patient_id, go to
    ``subgroups.divergent_itemsets``. Columns ``label, items, length, support, count, mean, divergence, t,
    p, q``, most negative divergence first. Divergence is mean − overall, so for a distance metric
    (``norm_hd``) the *positive* end holds the failing subgroups; ``p``/``q`` test for *lower* scores, so
    they flag failing subgroups of a score such as Dice only.
    """
    from divaware import subgroups  # lazily: the analysis module pulls in DivExplorer

    pc = _per_case_frame(per_case, (metric,))
    meta = _metadata_for(pc.index, metadata, attributes)
    table = subgroups.attribute_table(meta, list(attributes), bins=bins)
    return subgroups.divergent_itemsets(
        table, pc[metric].astype(float), min_support=min_support, max_length=max_length
    )


# --------------------------------------------------------------------------------------------------
# comparing two runs
# --------------------------------------------------------------------------------------------------


@dataclass
class RunComparison:
    """Paired comparison of run ``b`` against run ``a`` (differences are b − a)."""

    labels: tuple[str, str]
    metric: str
    per_case: pd.DataFrame
    """Index patient_id; columns ``a``, ``b``, ``diff`` and the ``by`` columns when grouped."""
    overall: dict[str, Any]
    """``n, mean_a, mean_b, mean_diff, ci_low, ci_high, n_better, n_worse`` (better = improved metric)."""
    per_group: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per group: the ``by`` columns, ``group, n, mean_a, mean_b, mean_diff, ci_low, ci_high, small``."""
    fairness: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Index = fairness figure (overall, worst_group, gap, std, es); ``a, b, change, higher_is_better``."""


def compare_runs(
    per_case_a: pd.DataFrame,
    per_case_b: pd.DataFrame,
    metadata: pd.DataFrame | None = None,
    by: str | Sequence[str] | None = None,
    *,
    metric: str = "dice",
    labels: tuple[str, str] = ("a", "b"),
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    min_n: int = MIN_GROUP_SIZE,
    drop_unknown: bool = False,
) -> RunComparison:
    """Per-case paired differences of ``metric`` between two runs on the same cases, with bootstrap CIs.

    Cases are matched by patient_id; both runs must have scored exactly the same cases (the error names
    the ones present in only one). Pairing removes case difficulty from the comparison, so the CI of the
    mean difference is far narrower than comparing two group means. With ``metadata`` and ``by`` the
    differences are also broken down per group, and each fairness figure of :func:`fairness_summary` is
    reported for both runs with its change.
    """
    a = _per_case_frame(per_case_a, (metric,))
    b = _per_case_frame(per_case_b, (metric,))
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        parts = []
        if len(only_a):
            parts.append(f"only in {labels[0]}: {_few(only_a)}")
        if len(only_b):
            parts.append(f"only in {labels[1]}: {_few(only_b)}")
        raise ValueError("the two runs scored different cases (" + "; ".join(parts)
                         + "); evaluate both on the same split")
    ids = a.index
    paired = pd.DataFrame({"a": a[metric].astype(float), "b": b.loc[ids, metric].astype(float)}, index=ids)
    paired["diff"] = paired["b"] - paired["a"]
    sign = 1.0 if _higher_is_better(metric) else -1.0
    lo, hi = bootstrap_ci(paired["diff"], n_boot=n_boot, ci=ci, seed=_group_seed(seed, "__overall__"))
    overall = {
        "n": len(paired),
        "mean_a": float(paired["a"].mean()),
        "mean_b": float(paired["b"].mean()),
        "mean_diff": float(paired["diff"].mean()),
        "ci_low": lo,
        "ci_high": hi,
        "n_better": int((sign * paired["diff"] > 0).sum()),
        "n_worse": int((sign * paired["diff"] < 0).sum()),
    }
    result = RunComparison(labels=tuple(labels), metric=metric, per_case=paired, overall=overall)
    if by is None:
        return result
    if metadata is None:
        raise ValueError("compare_runs: 'by' needs the cohort metadata")
    cols = _as_list(by)
    diff_table = paired.rename(columns={"diff": "_diff"})
    df, label = _grouped(diff_table, metadata, cols, "_diff", drop_unknown)
    for c in cols:
        result.per_case[c] = df[c].reindex(result.per_case.index)
    rows = []
    for name, members in df.groupby(label, sort=False):
        name = str(name)
        d = members["_diff"].to_numpy(dtype=float)
        glo, ghi = bootstrap_ci(d, n_boot=n_boot, ci=ci, seed=_group_seed(seed, name))
        row: dict[str, Any] = {c: members[c].iloc[0] for c in cols}
        row.update(group=name, n=len(d), mean_a=float(members["a"].mean()), mean_b=float(members["b"].mean()),
                   mean_diff=float(d.mean()), ci_low=glo, ci_high=ghi, small=len(d) < min_n)
        rows.append(row)
    per_group = pd.DataFrame(rows)
    if not per_group.empty:
        order = sorted(range(len(per_group)),
                       key=lambda i: [_order_key(str(per_group.at[i, c])) for c in cols])
        per_group = per_group.iloc[order].reset_index(drop=True)
    result.per_group = per_group
    figs = {}
    for key, col in (("a", "a"), ("b", "b")):
        means = df[col].groupby(label).mean()
        figs[key] = _fairness_from_means(means, float(paired[col].mean()), metric)
    names = ["overall", "worst_group", "best_group", "gap", "std", "es"]
    # Direction of "better" per figure, so a reader does not have to remember that a smaller gap is good.
    hib = _higher_is_better(metric)
    better_up = {"overall": hib, "worst_group": hib, "best_group": hib, "gap": False, "std": False,
                 "es": True}
    result.fairness = pd.DataFrame(
        {
            "a": [figs["a"][n] for n in names],
            "b": [figs["b"][n] for n in names],
            "change": [figs["b"][n] - figs["a"][n] for n in names],
            "higher_is_better": [better_up[n] for n in names],
        },
        index=pd.Index(names, name="figure"),
    )
    return result


# --------------------------------------------------------------------------------------------------
# reading a comparison: what its interval supports
# --------------------------------------------------------------------------------------------------

VERDICTS = ("improved", "worse", "no clear change", "too few cases")


def change_verdict(ci_low: float, ci_high: float, n: int | None = None, *, metric: str = "dice",
                   min_n: int = MIN_GROUP_SIZE) -> str:
    """What a paired change (b − a) with this confidence interval supports, in words.

    ``"too few cases"`` when ``n`` < ``min_n`` (a group of 2 can swing by 0.1 on one case, whatever its
    interval says), ``"no clear change"`` when the interval is missing or includes 0, else ``"improved"`` or
    ``"worse"`` according to the metric's direction (a lower HD95 is an improvement). The one rule behind
    notebook 04's verdicts and the README's description of the default run: never a direction the interval
    does not support.
    """
    if n is not None and int(n) < int(min_n):
        return "too few cases"
    lo, hi = float(ci_low), float(ci_high)
    if math.isnan(lo) or math.isnan(hi) or lo <= 0 <= hi:
        return "no clear change"
    up = lo > 0
    return "improved" if up == _higher_is_better(metric) else "worse"


def comparison_verdicts(per_group: pd.DataFrame, *, metric: str = "dice", min_n: int = MIN_GROUP_SIZE) -> pd.Series:
    """:func:`change_verdict` of every row of a :class:`RunComparison` ``per_group`` table (same index)."""
    missing = [c for c in ("n", "ci_low", "ci_high") if c not in per_group.columns]
    if missing:
        raise ValueError(f"comparison_verdicts: the per-group table lacks column(s) {missing}; pass "
                         "compare_runs(...).per_group")
    return pd.Series([change_verdict(lo, hi, n, metric=metric, min_n=min_n)
                      for lo, hi, n in zip(per_group["ci_low"], per_group["ci_high"], per_group["n"], strict=True)],
                     index=per_group.index, name="verdict", dtype=object)


def describe_change(mean_diff: float, ci_low: float, ci_high: float, *, what: str = "mean Dice",
                    labels: tuple[str, str] = ("a", "b"), n: int | None = None, seeds: int = 1,
                    metric: str = "dice", min_n: int = MIN_GROUP_SIZE) -> str:
    """One sentence for a paired change b − a: its size, its interval, how many seeds, and what that supports.

    E.g. ``"divaware − ERM, mean Dice: +0.005 (95 % CI −0.010 to +0.018; one seed, 61 cases): no clear change,
    the interval includes 0"``. Uses :func:`change_verdict`, so the words never claim a direction the interval
    does not support.
    """
    verdict = change_verdict(ci_low, ci_high, n, metric=metric, min_n=min_n)
    seeds_text = "one seed" if seeds == 1 else f"{seeds} seeds"
    cases = f", {n} cases" if n is not None else ""
    why = {"no clear change": ", the interval includes 0", "too few cases": f", fewer than {min_n} cases"}.get(verdict, "")
    def signed(x: float) -> str:
        return f"{x:+.3f}".replace("-", "−")

    return (f"{labels[1]} − {labels[0]}, {what}: {signed(mean_diff)} (95 % CI {signed(ci_low)} to "
            f"{signed(ci_high)}; {seeds_text}{cases}): {verdict}{why}")
