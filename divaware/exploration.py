"""Cohort summaries for data exploration: missingness, group sizes and per-case image statistics.

Used by ``01_data_exploration``; nothing here depends on a model. Image statistics read one case at a time
(never the whole cohort into memory) and describe what the subgroup story is about: tumour size, intensity
scale per scanner, and the enhancement over phases inside the tumour versus the rest of the breast, where
background parenchymal enhancement (BPE) competes with the tumour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from divaware.cohort import UNKNOWN
from divaware.metrics import DEFAULT_ATTRIBUTES  # the one definition of the report's attributes

if TYPE_CHECKING:
    from divaware.cohort import Cohort


def missingness(metadata: pd.DataFrame, attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
                by: str = "dataset") -> pd.DataFrame:
    """Fraction of cases with an unknown value per attribute, per ``by`` group and overall (last row)."""
    missing = pd.DataFrame({a: metadata[a].isna() | (metadata[a].astype(str) == UNKNOWN) for a in attributes})
    table = missing.groupby(metadata[by]).mean()
    table.loc["all"] = missing.mean()
    table.insert(0, "n", list(metadata[by].value_counts().reindex(table.index[:-1])) + [len(metadata)])
    return table


def group_sizes(metadata: pd.DataFrame, rows: str, cols: str) -> pd.DataFrame:
    """Cross-tabulated number of cases (with margins): the support every subgroup analysis starts from."""
    return pd.crosstab(metadata[rows], metadata[cols], margins=True, margins_name="all")


def read_canonical(path: object) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxels of a NIfTI file reoriented to RAS (axes x, y, z) as float32, and the voxel spacing in mm."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])


def case_statistics(cohort: Cohort, ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per case: shape, spacing, tumour volume (ml), intensity scale and enhancement per phase.

    ``enh_tumour_k`` / ``enh_tissue_k`` are the mean intensity of phase k over the pre-contrast phase inside
    the tumour / inside the rest of the breast tissue (voxels brighter than the pre-contrast median, tumour
    excluded). A tissue curve rising like the tumour's is what makes BPE a look-alike.
    """
    rows = []
    for pid in ids if ids is not None else list(cohort.cases):
        case = cohort.cases[pid]
        pre, spacing = read_canonical(case.image_paths[0])
        mask = read_canonical(case.mask_path)[0] > 0.5 if case.mask_path is not None else np.zeros(pre.shape, bool)
        tissue = (pre > np.median(pre)) & ~mask
        row: dict[str, object] = {
            "patient_id": pid,
            "shape": "x".join(str(s) for s in pre.shape),
            "spacing": "x".join(f"{s:.2f}" for s in spacing),
            "n_phases": len(case.image_paths),
            "tumour_ml": float(mask.sum() * np.prod(spacing) / 1000.0),
            "tumour_fraction": float(mask.mean()),
            "pre_median": float(np.median(pre[tissue])) if tissue.any() else float("nan"),
        }
        base_t = float(pre[mask].mean()) if mask.any() else float("nan")
        base_s = float(pre[tissue].mean()) if tissue.any() else float("nan")
        for k, path in enumerate(case.image_paths):
            phase = pre if k == 0 else read_canonical(path)[0]
            row[f"enh_tumour_{k}"] = float(phase[mask].mean()) / base_t if mask.any() and base_t > 0 else np.nan
            row[f"enh_tissue_{k}"] = float(phase[tissue].mean()) / base_s if tissue.any() and base_s > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("patient_id")


def enhancement_curves(stats: pd.DataFrame, metadata: pd.DataFrame, by: str) -> pd.DataFrame:
    """Long table (group, phase, region, enhancement) of mean enhancement curves per ``by`` group."""
    records = []
    for region in ("tumour", "tissue"):
        cols = sorted((c for c in stats.columns if c.startswith(f"enh_{region}_")), key=lambda c: int(c.rsplit("_", 1)[1]))
        for col in cols:
            phase = int(col.rsplit("_", 1)[1])
            means = stats[col].groupby(metadata.loc[stats.index, by]).mean()
            for group, value in means.items():
                records.append({by: group, "phase": phase, "region": region, "enhancement": value})
    return pd.DataFrame(records).dropna()


# ------------------------------------------------------------------------------------------------
# the disparity mechanisms on one patient (notebook 01, synthetic cohorts)
# ------------------------------------------------------------------------------------------------


def lookalike_voxels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Voxels outside the tumour that look like it at phase 2: as bright as the tumour's median there and
    still rising (>= 1.5x phase 1). ``image`` holds phases 0, 1, 2 first (channel axis 0)."""
    return ~mask & (image[2] >= np.median(image[2][mask])) & (image[2] >= 1.5 * np.maximum(image[1], 1))


def mechanism_illustration(disparities: Sequence[str] | None = None, n_cases: int = 12, seed: int = 0
                           ) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """One hard patient rendered under each disparity mechanism: ``{disparity: (patient_id, image, mask)}``.

    Each mechanism gets a small synthetic cohort (``n_cases``, ``seed``; written to a temporary folder and
    deleted); ``image`` stacks phases 0, 1, 2 and the phase 2 − phase 1 difference, ``mask`` is the expert
    mask (the same patient and mask under every mechanism).
    """
    import tempfile
    from pathlib import Path

    from divaware.synthetic import DISPARITIES, make_cohort, read_truth

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for disparity in DISPARITIES if disparities is None else disparities:
            root = make_cohort(Path(tmp) / disparity, n_cases=n_cases, seed=seed, disparity=disparity)
            truth = read_truth(root)
            pid = truth.index[truth["hard_subgroup"]][0]  # the cohort's hard case (seed 0 has one)
            phases = [read_canonical(root / "images" / pid / f"{pid.lower()}_{k:04d}.nii.gz")[0] for k in range(3)]
            mask = read_canonical(root / "segmentations" / "expert" / f"{pid}.nii.gz")[0] > 0
            out[disparity] = (pid, np.stack(phases + [phases[2] - phases[1]]), mask)
    return out


def illustration_rows(illustration: dict[str, tuple[str, np.ndarray, np.ndarray]]
                      ) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], int]:
    """Gallery rows ``(title, image, mask)``: each mechanism through the tumour's centre, plus
    ``representation`` on the slice with the most look-alike voxels (third row); also that slice."""
    pid, rep_img, rep_mask = illustration["representation"]
    z = int(lookalike_voxels(rep_img, rep_mask).sum(axis=(0, 1)).argmax())
    rows = [(f"{d} ({pid})", img, mask) for d, (_, img, mask) in illustration.items()]
    rows.insert(2, (f"representation, slice {z}", rep_img[..., z], rep_mask[..., z]))
    return rows, z


def illustration_summary(illustration: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per mechanism: the tumour's relative enhancement at phase 1 (lower where part of it enhances like
    parenchyma) and the number of look-alike voxels."""
    summary = {}
    for d, (_, img, mask) in illustration.items():
        p0, p1 = img[0], img[1]
        summary[d] = {
            "tumour enhancement, phase 1": float(np.mean((p1[mask] - p0[mask]) / np.maximum(p0[mask], 1))),
            "look-alike voxels": int(lookalike_voxels(img, mask).sum()),
        }
    return summary
