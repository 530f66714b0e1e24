"""The shared preprocessing store, patch reads, cheap validation, and caches shared between runs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import Compose

from divaware import data as D
from divaware import preprocess as P
from divaware import train as T
from divaware.cohort import load_cohort

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402

# patch z of 28 > the breast box of some synthetic cases (24-32 slices): those must be padded for training
CROP_PATCH = {"spacing": None, "crop_to_breast": True, "patch_size": [16, 16, 28], "samples_per_case": 2,
              "batch_size": 2, "strategy": "group_dro", "strategy_params": {}}


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").drop(columns=["time_s", "train_time_s", "val_time_s"])


@pytest.mark.parametrize("cache", ["disk", "preprocessed"])
def test_two_runs_sharing_one_cache_train_on_correct_arrays(synthetic_root: Path, tmp_path: Path, cache: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs with different seeds (so different train/val splits) share one cache folder: each must compute
    exactly what it computes with a private cache. Before the cache key named the transforms, the second
    run was served the first run's *validation* entries (unpadded, no foreground indices) for its training
    cases and crashed ("smaller than the patch") or sampled no tumour-centred patches."""
    import divaware.voxels as V

    shared = tmp_path / "shared"
    runs = {}
    for seed in (0, 3):
        cfg = tiny_config(synthetic_root, tmp_path / f"shared_{seed}", seed=seed, cache=cache,
                          cache_dir=str(shared), **CROP_PATCH)
        runs[seed] = _metrics(T.train(cfg))
        if cache == "preprocessed":  # voxel checks are shared too: the second run reads no voxel to check
            def no_voxel_reads(*args: object, **kwargs: object) -> None:
                raise AssertionError("voxel checks repeated although the store holds them")

            monkeypatch.setattr(V, "run_voxel_checks", no_voxel_reads)
    if cache == "preprocessed":
        monkeypatch.undo()
        assert len(list((shared / "voxel_checks").glob("*.json"))) == 1
    splits = [set(pd.read_csv(tmp_path / f"shared_{s}" / "splits.csv").query("split == 'val'")["patient_id"])
              for s in (0, 3)]
    assert splits[0] != splits[1]  # the scenario needs cases that validate in one run and train in the other
    private = tiny_config(synthetic_root, tmp_path / "private_3", seed=3, cache=cache,
                          cache_dir=str(tmp_path / "private"), **CROP_PATCH)
    pd.testing.assert_frame_equal(runs[3], _metrics(T.train(private)))


def test_store_entry_is_the_shared_preprocessing_cropped(synthetic_root: Path, tmp_path: Path) -> None:
    cohort = load_cohort(synthetic_root, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16), subtraction=True)
    records = D.make_records(cohort, cohort.ids("train")[:3], spec)
    folders = P.fill(records, spec, tmp_path / "store", progress=False, precision="float16")
    for rec, folder in zip(records, folders, strict=True):
        ref = Compose(D.preprocessing(spec))(dict(rec))
        image = ref[D.IMAGE].as_subclass(torch.Tensor).numpy()
        label = ref[D.LABEL].as_subclass(torch.Tensor).numpy()
        entry = P.Entry.open(folder)
        assert entry.meta["full_shape"] == list(image.shape[1:])
        assert np.load(folder / "image.npy").dtype == np.float16
        # the whole volume re-padded from the cropped entry is the preprocessing, to float16 precision
        vol = P.LoadVolumed({rec[D.PID]: folder})({D.PID: rec[D.PID]})
        np.testing.assert_allclose(vol[D.IMAGE].numpy(), image, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(vol[D.LABEL].numpy(), label)
        # a window reaching past the stored box reads zeros there, as the padded full array would
        start, size = [-3, 5, entry.shape[2] - 6], [16, 16, 16]
        got_img, got_lab = entry.read(start, size)
        c0 = entry.meta["crop_start"]
        padded = np.pad(image, [(0, 0)] + [(20, 20)] * 3)
        padded_lab = np.pad(label, [(0, 0)] + [(20, 20)] * 3)
        sl = tuple(slice(20 + c + s, 20 + c + s + p) for c, s, p in zip(c0, start, size, strict=True))
        np.testing.assert_allclose(got_img, padded[(slice(None), *sl)], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got_lab, padded_lab[(slice(None), *sl)].astype(np.uint8))
        fg = entry.fg()
        assert len(fg) == entry.meta["fg_voxels"] == int(label.sum())  # small tumours: every voxel kept
        # compact: float16 channels + one bit of mask + the small foreground list
        stored = sum(p.stat().st_size for p in folder.iterdir())
        voxels = int(np.prod(entry.shape))
        assert stored / voxels < 2 * spec.in_channels + 0.125 + 0.2


def test_store_keys_follow_files_and_settings(cohort_copy: Path, tmp_path: Path) -> None:
    """A changed setting or an edited file gives a new entry; patch size, seed and split do not."""
    cohort = load_cohort(cohort_copy, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16))
    rec = D.make_records(cohort, cohort.ids("train")[:1], spec)[0]
    root = tmp_path / "store"
    first = P.fill([rec], spec, root, progress=False, precision="float16")[0]
    assert P.fill([rec], D.DataSpec(patch_size=(32, 32, 32), samples_per_case=4), root, progress=False,
                  precision="float16")[0] == first
    assert P.entry_dir(root, rec, D.DataSpec(patch_size=(16, 16, 16), subtraction=True), "float16") != first
    assert P.entry_dir(root, rec, D.DataSpec(patch_size=(16, 16, 16), phases=(0, 1)), "float16") != first
    st = os.stat(rec[D.IMAGE][1])
    os.utime(rec[D.IMAGE][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert P.entry_dir(root, rec, spec, "float16") == first  # keyed by content: a touched file is the same file
    import nibabel as nib

    img = nib.load(rec[D.IMAGE][1])
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) + 1, img.affine, img.header), rec[D.IMAGE][1])
    assert P.entry_dir(root, rec, spec, "float16") != first


def test_uint8_store_is_within_half_a_step(synthetic_root: Path, tmp_path: Path) -> None:
    """The 1-byte store: exact zeros stay zero, every other voxel within half a quantisation step."""
    cohort = load_cohort(synthetic_root, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16))
    rec = D.make_records(cohort, cohort.ids("train")[:1], spec)[0]
    f16 = P.fill([rec], spec, tmp_path / "store", progress=False, precision="float16")[0]
    u8 = P.fill([rec], spec, tmp_path / "store", progress=False, precision="uint8")[0]
    assert u8 != f16 and np.load(u8 / "image.npy").dtype == np.uint8
    ref = Compose(D.preprocessing(spec))(dict(rec))[D.IMAGE].as_subclass(torch.Tensor).numpy()
    got = P.LoadVolumed({rec[D.PID]: u8})({D.PID: rec[D.PID]})[D.IMAGE].numpy()
    steps = np.array([q[1] for q in P.Entry.open(u8).meta["quant"]])[:, None, None, None]
    assert np.array_equal(got == 0, ref == 0)
    assert (np.abs(got - ref) <= steps / 2 + 1e-5).all()
    assert (steps < 0.1).all()  # a z-scored phase spans < 25 SD: steps below 0.1 SD
    stored = sum(p.stat().st_size for p in u8.iterdir())
    assert stored / int(np.prod(P.Entry.open(u8).shape)) < spec.in_channels + 0.125 + 0.2
    with pytest.raises(ValueError, match="precision"):
        P.settings_key(spec, "int4")


def _fill_in_child(args: tuple[list[dict], D.DataSpec, str]) -> list[str]:
    records, spec, root = args
    return [str(p) for p in P.fill(records, spec, root, progress=False, precision="float16")]


def test_concurrent_and_interrupted_fills(synthetic_root: Path, tmp_path: Path) -> None:
    cohort = load_cohort(synthetic_root, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16))
    records = D.make_records(cohort, cohort.ids("train")[:4], spec)
    root = tmp_path / "store"
    # an interrupted fill: one finished entry, one temporary left behind by a killed process
    done = P.fill(records[:1], spec, root, progress=False, precision="float16")[0]
    stale = done.parent / f".{P.entry_dir(root, records[1], spec, 'float16').name}.99999.dead.tmp"
    stale.mkdir()
    (stale / "image.npy").write_bytes(b"partial")
    mtime = (done / "image.npy").stat().st_mtime_ns
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_fill_in_child, [(records, spec, str(root))] * 2)
    assert results[0] == results[1]
    assert (done / "image.npy").stat().st_mtime_ns == mtime  # the finished case was not redone
    assert not stale.exists()
    entries = [p for p in done.parent.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 4 and all((p / "meta.json").is_file() for p in entries)
    assert not list(done.parent.glob(".*.tmp"))


def test_touched_bytes_counts_pages() -> None:
    shape, item = (2, 40, 50, 300), 2
    index = (slice(None), slice(3, 19), slice(10, 26), slice(100, 164))
    # brute force: the set of 4 KiB pages holding the selected elements
    flat = np.arange(np.prod(shape)).reshape(shape)[index].ravel() * item
    pages = set((flat // P.PAGE).tolist()) | set(((flat + item - 1) // P.PAGE).tolist())
    assert P.touched_bytes(shape, item, index) == len(pages) * P.PAGE
    # a patch of whole rows touches about the patch: rows are contiguous when the patch spans all of Z
    whole = (slice(None), slice(0, 16), slice(0, 50), slice(0, 300))
    assert P.touched_bytes(shape, item, whole) == pytest.approx(2 * 16 * 50 * 300 * item, rel=0.02)


class _Threshold(torch.nn.Module):
    """A segmenter without training: tumour where the subtraction-like contrast (post1 - pre) is high.
    It makes case-dependent errors, false positives away from the tumour included."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, 1:2] - x[:, 0:1]) - self.level
        return torch.cat([-fg, fg], dim=1)


def test_patch_scores_rank_cases_like_full_validation(synthetic_root: Path, tmp_path: Path) -> None:
    """Cheap per-case scores on fixed windows order the validation cases as the full sliding window does."""
    cohort = load_cohort(synthetic_root, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16), divisor=4)
    ids = cohort.ids("train")[:20]
    records = D.make_records(cohort, ids, spec)
    _, val_ds, entries = P.make_datasets([], records, spec, tmp_path / "store", progress=False, precision="float16")
    model = _Threshold(1.5)
    loader = D.make_loader(val_ds, 1, shuffle=False, seed=0, pad_batch=False, num_workers=0)
    full = T.validate(model, loader, torch.device("cpu"), 4, [16, 16, 16], 0.25, False, "dice")
    cheap = P.patch_scores(model, entries, ids, (16, 16, 16), 4, 0, torch.device("cpu"), 4, amp=False, score="dice")
    assert full["dice"].std() > 0.05  # the cases differ: a ranking to reproduce
    rho = cheap["dice"].rank().corr(full.loc[cheap.index, "dice"].rank())
    assert rho >= 0.8, rho
    assert (cheap["covered_fraction"] < 0.8).all()  # and it looked at part of each volume only
    # fixed windows: the same scores every epoch
    again = P.patch_scores(model, entries, ids, (16, 16, 16), 4, 0, torch.device("cpu"), 4, amp=False, score="dice")
    pd.testing.assert_frame_equal(cheap, again)


def test_cheap_validation_in_training(synthetic_root: Path, tmp_path: Path) -> None:
    """val_patches: patches every validated epoch, full sliding window at refreshes and the end."""
    cfg = tiny_config(synthetic_root, tmp_path / "run", cache="preprocessed", cache_dir=str(tmp_path / "store"),
                      epochs=2, val_patches=2, **{**CROP_PATCH, "strategy": "divaware", "strategy_params":
                                                  {"min_support": 0.1, "t_min": 0.0, "fdr": None}})
    run = T.train(cfg)
    scores = pd.read_csv(run / "val_scores.csv")
    kinds = scores.groupby("epoch")["kind"].agg(lambda k: sorted(set(k)))
    assert kinds.to_dict() == {1: ["full", "patches"], 2: ["full", "patches"]}  # refresh each epoch + last
    metrics = pd.read_csv(run / "metrics.csv")
    cheap = scores.query("kind == 'patches'").groupby("epoch")["dice"].mean()
    np.testing.assert_allclose(metrics["val_dice"].to_numpy(), cheap.to_numpy())
    assert json.loads((next((tmp_path / "store").glob("v*/*/meta.json"))).read_text())["version"] == P.STORE_VERSION


def test_auto_cache_keeps_the_small_volume_path(synthetic_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (auto) cache on CPU-sized volumes is the in-memory path: the same metrics as memory."""
    monkeypatch.setenv(P.STORE_ENV, str(tmp_path / "store"))  # auto shares voxel checks through the store
    a = _metrics(T.train(tiny_config(synthetic_root, tmp_path / "auto", cache="auto")))
    b = _metrics(T.train(tiny_config(synthetic_root, tmp_path / "memory", cache="memory")))
    pd.testing.assert_frame_equal(a, b)
    shutil.rmtree(tmp_path / "auto")
