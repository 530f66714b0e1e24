"""Inference writes the submission layout on the source grid: affine, shape, orientation, crop undone."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import divaware.predict as P
from divaware.cli import main
from divaware.cohort import load_cohort
from divaware.train import TrainConfig


@pytest.fixture(scope="module")
def trained_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch tiny run trained through the command line."""
    folder = tmp_path_factory.mktemp("predict_run")
    cfg = TrainConfig(data_root=str(synthetic_root), spacing=[5.0, 5.0, 5.0], channels=[8, 16, 32],
                      strides=[2, 2], num_res_units=1, epochs=1, strategy="erm", progress=False, cpu_threads=1)
    cfg.to_yaml(folder / "train.yaml")
    run = folder / "run"
    assert main(["train", "--config", str(folder / "train.yaml"), "--out", str(run)]) == 0
    assert (run / "best.pt").is_file()
    return run


def _check_written(pred_dir: Path, cohort_root: Path, ids: list[str]) -> dict[str, np.ndarray]:
    cohort = load_cohort(cohort_root, require_masks=False)
    masks = {}
    assert sorted(p.name for p in pred_dir.iterdir()) == sorted(f"{pid}.nii.gz" for pid in ids)
    for pid in ids:
        pred = nib.load(str(pred_dir / f"{pid}.nii.gz"))
        src = nib.load(str(cohort.cases[pid].image_paths[0]))
        assert pred.shape == src.shape
        np.testing.assert_array_equal(pred.affine, src.affine)
        assert pred.get_data_dtype() == np.uint8
        arr = np.asarray(pred.dataobj)
        assert set(np.unique(arr)) <= {0, 1}
        masks[pid] = arr
    return masks


def test_predicted_nifti_matches_the_source_image(trained_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = P.predict(trained_run, synthetic_root, split="test", out_dir=tmp_path / "pred", progress=False)
    ids = load_cohort(synthetic_root).ids("test")
    _check_written(out / P.PRED_FOLDER, synthetic_root, ids)


def test_cli_predicts_cases_without_masks(trained_run: Path, cohort_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(cohort_copy / "segmentations" / "expert")
    out = tmp_path / "cli_pred"
    base = ["predict", "--run", str(trained_run), "--data", str(cohort_copy), "--split", "test"]
    options = ["--sliding-window", "--roi", "16", "16", "16", "--postprocess", "largest_component"]
    assert main([*base, "--out", str(out), *options]) == 0
    ids = load_cohort(cohort_copy, require_masks=False).ids("test")
    masks = _check_written(out / P.PRED_FOLDER, cohort_copy, ids)
    for arr in masks.values():  # largest_component leaves at most one component
        from scipy import ndimage

        assert ndimage.label(arr, structure=np.ones((3, 3, 3)))[1] <= 1
    # writing into the input folder is refused
    assert main([*base, "--out", str(cohort_copy / "preds")]) == 2
    assert not (cohort_copy / "preds").exists()


class _ThresholdNet(torch.nn.Module):
    """Foreground where the normalised first post-contrast channel exceeds 0.5: pointwise, so the expected
    mask can be computed on the source grid independently of the pipeline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = x[:, 1:2] - 0.5
        return torch.cat([-fg, fg], dim=1)


def test_inversion_restores_orientation_and_crop_exactly(synthetic_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(crop_to_breast=True, breast_margin=1, channels=[8, 16, 32], strides=[2, 2])
    monkeypatch.setattr(P, "load_run_model", lambda *args, **kwargs: (cfg, _ThresholdNet()))
    cohort = load_cohort(synthetic_root)
    ids = cohort.ids("test")[:3]
    whole = P.predict(tmp_path, synthetic_root, patient_ids=ids, out_dir=tmp_path / "whole", progress=False)
    tiled = P.predict(tmp_path, synthetic_root, patient_ids=ids, out_dir=tmp_path / "tiled", sliding_window=True,
                      roi_size=(16, 16, 16), progress=False)
    for pid in ids:
        case = cohort.cases[pid]
        src = nib.load(str(case.image_paths[1]))
        raw = np.asarray(src.dataobj, dtype=np.float64)
        i0, i1, j0, j1, k0, k1 = P.D.breast_box(case.info, raw.shape, margin=1)
        crop = raw[i0:i1, j0:j1, k0:k1]
        nz = crop != 0
        z = np.zeros_like(crop)
        z[nz] = (crop[nz] - crop[nz].mean()) / crop[nz].std()
        expected = np.zeros(raw.shape, dtype=np.uint8)
        expected[i0:i1, j0:j1, k0:k1] = z > 0.5
        got = np.asarray(nib.load(str(whole / P.PRED_FOLDER / f"{pid}.nii.gz")).dataobj)
        assert 0 < expected.sum() < expected.size
        np.testing.assert_array_equal(got, expected)
        got_tiled = np.asarray(nib.load(str(tiled / P.PRED_FOLDER / f"{pid}.nii.gz")).dataobj)
        assert np.mean(got_tiled != expected) < 1e-4


def test_resampled_predictions_come_back_to_the_source_grid(synthetic_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cohort = load_cohort(synthetic_root)
    pid = cohort.ids("test")[0]
    masks = {}
    for name, spacing in (("native", None), ("resampled", [1.5, 1.5, 2.0])):
        cfg = TrainConfig(spacing=spacing, channels=[8, 16, 32], strides=[2, 2])
        monkeypatch.setattr(P, "load_run_model", lambda *args, c=cfg, **kwargs: (c, _ThresholdNet()))
        out = P.predict(tmp_path, synthetic_root, patient_ids=[pid], out_dir=tmp_path / name, progress=False)
        masks[name] = _check_written(out / P.PRED_FOLDER, synthetic_root, [pid])[pid].astype(bool)
    a, b = masks["native"], masks["resampled"]
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8  # the same structures, up to interpolation


def test_postprocessing_helpers() -> None:
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[6:9, 6:9, 6:9] = 1  # 27 voxels: the largest
    kept = P.largest_component(mask)
    assert kept.sum() == 27 and kept[7, 7, 7] and not kept[1, 1, 1]
    assert P.largest_component(np.zeros((3, 3, 3))).sum() == 0
    info = {"primary_lesion": {"breast_coordinates": {"x_min": 0, "x_max": 10, "y_min": 0, "y_max": 10,
                                                      "z_min": 5, "z_max": 10}}}
    boxed = P.restrict_to_box(mask, info)  # z indexes NIfTI axis i: keeps i >= 5 only
    assert boxed.sum() == 27 and boxed[7, 7, 7] == 1
    assert P.restrict_to_box(mask, {}).sum() == mask.sum()
    with pytest.raises(ValueError, match="unknown postprocessing"):
        P.predict("nowhere", "nowhere", postprocess=["smooth"])


def test_default_prediction_folders_do_not_collide_between_checkpoints(trained_run: Path, synthetic_root: Path) -> None:
    ids = load_cohort(synthetic_root).ids("test")[:2]
    best = P.predict(trained_run, synthetic_root, split="test", patient_ids=ids, progress=False)
    last = P.predict(trained_run, synthetic_root, split="test", checkpoint="last", patient_ids=ids, progress=False)
    assert best == trained_run / "predictions_test" and last == trained_run / "predictions_test_last"
    assert sorted(p.name for p in (best / P.PRED_FOLDER).iterdir()) == sorted(f"{pid}.nii.gz" for pid in ids)
    assert sorted(p.name for p in (last / P.PRED_FOLDER).iterdir()) == sorted(f"{pid}.nii.gz" for pid in ids)
