"""The shared MONAI pipeline: records, one normalisation for train and test, patches, ids, caching."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, PersistentDataset

from divaware import data as D
from divaware.cohort import Cohort


def _ras_array(path: Path) -> np.ndarray:
    """The NIfTI voxels reoriented to RAS with nibabel alone (an independent check of the pipeline)."""
    img = nib.load(str(path))
    return np.asarray(nib.as_closest_canonical(img).get_fdata(), dtype=np.float64)


def _zscore_nonzero(a: np.ndarray) -> np.ndarray:
    nz = a != 0
    out = np.zeros_like(a)
    out[nz] = (a[nz] - a[nz].mean()) / a[nz].std()
    return out


def test_records_carry_phases_mask_and_id(cohort: Cohort) -> None:
    ids = cohort.ids("train")[:3]
    spec = D.DataSpec(phases=(0, 2), crop_to_breast=True)
    recs = D.make_records(cohort, ids, spec)
    for pid, rec in zip(ids, recs, strict=True):
        case = cohort.cases[pid]
        assert rec[D.PID] == pid
        assert rec[D.IMAGE] == [str(case.image_paths[0]), str(case.image_paths[2])]
        assert rec[D.LABEL] == str(case.mask_path)
        assert len(rec[D.BOX]) == 6


def test_records_refuse_missing_phases(cohort: Cohort) -> None:
    pid = cohort.ids("train")[0]
    too_many = cohort.cases[pid].n_phases
    with pytest.raises(ValueError, match=f"case {pid} has {too_many} phases"):
        D.make_records(cohort, [pid], D.DataSpec(phases=(0, 1, too_many)))


def test_preprocessing_matches_an_independent_computation(cohort: Cohort) -> None:
    """Load, RAS orientation, post1 - pre subtraction and per-channel nonzero z-score, checked against nibabel."""
    pid = cohort.ids("train")[0]
    case = cohort.cases[pid]
    spec = D.DataSpec(phases=(0, 1), subtraction=True)
    out = D.eval_transforms(spec)(D.make_records(cohort, [pid], spec)[0])
    pre, post = _ras_array(case.image_paths[0]), _ras_array(case.image_paths[1])
    expected = np.stack([_zscore_nonzero(pre), _zscore_nonzero(post), _zscore_nonzero(post - pre)])
    np.testing.assert_allclose(out[D.IMAGE].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(out[D.LABEL][0].numpy(), _ras_array(case.mask_path) > 0)
    assert out[D.PID] == pid


def test_normalisation_is_identical_at_train_and_test_time(cohort: Cohort) -> None:
    """Training (without random augmentation), validation and inference give the same network input."""
    pid = cohort.ids("train")[1]
    spec = D.DataSpec(augment=False, crop_to_breast=True, breast_margin=2)
    rec = D.make_records(cohort, [pid], spec)[0]
    inference_rec = {k: v for k, v in rec.items() if k != D.LABEL}
    at_test = D.eval_transforms(spec, with_label=False)(inference_rec)[D.IMAGE]
    at_val = D.eval_transforms(spec)(dict(rec))[D.IMAGE]
    at_train = D.train_transforms(spec)(dict(rec))[D.IMAGE]
    region = tuple(slice(0, s) for s in at_test.shape)  # training pads to the network stride at the end
    assert torch.equal(at_val.as_tensor(), at_test.as_tensor())
    assert torch.equal(at_train.as_tensor()[region], at_test.as_tensor())
    assert torch.all(at_train.as_tensor()[:, at_test.shape[1]:] == 0)
    values = at_test.as_tensor()
    for c in range(values.shape[0]):
        nz = values[c][values[c] != 0]
        assert abs(float(nz.mean())) < 1e-4 and abs(float(nz.std(unbiased=False)) - 1) < 1e-3


def test_breast_box_follows_the_organisers_axis_convention(cohort: Cohort) -> None:
    pid = cohort.ids("train")[2]
    case = cohort.cases[pid]
    c = case.info["primary_lesion"]["breast_coordinates"]
    shape = nib.load(str(case.image_paths[0])).shape
    box = D.breast_box(case.info, shape)
    # x indexes SimpleITK's first array axis = NIfTI axis k; z indexes NIfTI axis i
    assert box == (c["z_min"], min(c["z_max"], shape[0]), c["y_min"], min(c["y_max"], shape[1]),
                   c["x_min"], min(c["x_max"], shape[2]))
    spec = D.DataSpec(crop_to_breast=True)
    out = D.eval_transforms(spec)(D.make_records(cohort, [pid], spec)[0])
    assert tuple(out[D.IMAGE].shape[1:]) == (box[1] - box[0], box[3] - box[2], box[5] - box[4])
    mask = np.asarray(nib.load(str(case.mask_path)).dataobj) > 0
    inside = np.zeros_like(mask)
    inside[box[0]:box[1], box[2]:box[3], box[4]:box[5]] = True
    assert mask.any() and not (mask & ~inside).any(), "the tumour should lie inside the breast box"
    assert D.breast_box({"primary_lesion": {}}) is None


def test_patches_are_balanced_and_keep_their_ids(cohort: Cohort) -> None:
    ids = cohort.ids("train")[:4]
    spec = D.DataSpec(patch_size=(16, 16, 16), samples_per_case=3, pos_fraction=1.0)
    ds = D.make_dataset(D.make_records(cohort, ids, spec), D.train_transforms(spec), cache="none", spec=spec, max_memory_bytes=2 * 1024**3, num_workers=0)
    batch = next(iter(D.make_loader(ds, batch_size=2, shuffle=True, seed=3, pad_batch=False, num_workers=0)))
    assert batch[D.IMAGE].shape == (6, 3, 16, 16, 16)
    pids = D.batch_ids(batch)
    assert len(pids) == 6 and all(isinstance(p, str) for p in pids)
    assert pids[0] == pids[1] == pids[2] and pids[3] == pids[4] == pids[5]
    # pos_fraction = 1: every patch is centred on tumour, so holds tumour voxels
    assert torch.all(batch[D.LABEL].flatten(1).amax(dim=1) > 0)


def test_shuffled_batches_carry_the_ids_of_their_images(cohort: Cohort) -> None:
    ids = cohort.ids("train")[:6]
    spec = D.DataSpec(augment=False)
    recs = D.make_records(cohort, ids, spec)
    reference = {r[D.PID]: D.eval_transforms(spec)(dict(r))[D.IMAGE].as_tensor() for r in recs}
    ds = D.make_dataset(recs, D.train_transforms(spec), cache="memory", spec=spec, max_memory_bytes=2 * 1024**3, num_workers=0)
    orders = []
    for seed in (0, 1):
        seen = []
        for batch in D.make_loader(ds, batch_size=4, shuffle=True, seed=seed, num_workers=0):
            for k, pid in enumerate(D.batch_ids(batch)):
                ref = reference[pid]
                got = batch[D.IMAGE][k].as_tensor()[tuple(slice(0, s) for s in ref.shape)]
                assert torch.equal(got, ref), f"batch item {k} is not {pid}"
                seen.append(pid)
        assert sorted(seen) == sorted(ids)
        orders.append(seen)
    assert orders[0] != orders[1], "different seeds should shuffle differently"
    again = [p for b in D.make_loader(ds, batch_size=4, shuffle=True, seed=0, num_workers=0) for p in D.batch_ids(b)]
    assert again == orders[0], "the same seed must replay the same order"


def test_caching_memory_disk_and_never_into_the_input(cohort: Cohort, tmp_path: Path) -> None:
    ids = cohort.ids("train")[:3]
    spec = D.DataSpec()
    recs = D.make_records(cohort, ids, spec)
    est = D.estimate_cache_bytes(recs, spec)
    assert est == 3 * 48 * 48 * 32 * 4 * (3 + 1)
    auto_small = D.make_dataset(recs, D.eval_transforms(spec), cache="auto", spec=spec, cache_dir=tmp_path,
                                max_memory_bytes=2 * 1024**3, num_workers=0)
    assert isinstance(auto_small, CacheDataset)
    auto_large = D.make_dataset(recs, D.eval_transforms(spec), cache="auto", spec=spec, cache_dir=tmp_path,
                                max_memory_bytes=est - 1, num_workers=0)
    assert isinstance(auto_large, PersistentDataset)
    first = [auto_large[i][D.IMAGE] for i in range(3)]
    cached = list((tmp_path / spec.preprocessing_key()).glob("*.pt"))
    assert len(cached) == 3
    second = [auto_large[i][D.IMAGE] for i in range(3)]  # now read back from disk
    for a, b in zip(first, second, strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    other = D.DataSpec(phases=(0, 1))
    assert other.preprocessing_key() != spec.preprocessing_key()
    with pytest.raises(ValueError, match="cache_dir"):
        D.make_dataset(recs, D.eval_transforms(spec), cache="disk", spec=spec, max_memory_bytes=2 * 1024**3, num_workers=0)
    # (the session fixture asserts that nothing was written into the synthetic cohort folder)


def test_data_spec_validation() -> None:
    with pytest.raises(ValueError, match="needs phases 0 and 1"):
        D.DataSpec(phases=(0, 2), subtraction=True)
    with pytest.raises(ValueError, match="divisible by 16"):
        D.DataSpec(patch_size=(24, 24, 24))
    assert D.DataSpec(subtraction=True).in_channels == 4
