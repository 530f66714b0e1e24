"""Errors users cause outside the data: one line naming the cause and the fix, never a traceback."""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from divaware.cli import main as cli_main
from divaware.train import (
    DiskFullError,
    TrainConfig,
    TrainingDivergedError,
    _atomic_save,
    _LossWatch,
    check_patch_fits,
    train,
)


def _tiny(root: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data_root=str(root), out_dir=str(out), epochs=1, batch_size=4, channels=[4, 8, 16],
                strides=[2, 2], num_res_units=0, augment=False, strategy="erm", stratify=[], min_group_size=1,
                cache="memory", progress=False, cpu_threads=1, synthetic_cases=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("grad_clip", -1.0, "must be > 0"),
    ("epochs", 2.7, "not a whole number"),
    ("spacing", [-1.0, 1.0, 1.0], "positive voxel sizes"),
    ("min_group_size", -5, "must be >= 1"),
    ("val_fraction", 0.99, "(0, 0.5]"),
    ("lr", 1e6, "<= 1"),
])
def test_config_values_are_checked_for_meaning(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=field) as err:
        TrainConfig.from_dict({field: value})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_patch_larger_than_every_volume_is_refused(cohort) -> None:
    cfg = TrainConfig(patch_size=[64, 64, 64])
    with pytest.raises(ValueError, match="larger than every case along x, y, z"):
        check_patch_fits(cfg, cohort.geometry)
    check_patch_fits(TrainConfig(patch_size=[32, 32, 32]), cohort.geometry)  # fits: no error


@pytest.mark.parametrize("where", ["out_dir", "cache_dir"])
def test_train_refuses_to_write_inside_the_data_folder(cohort_copy: Path, where: str) -> None:
    out = cohort_copy / "run" if where == "out_dir" else Path("unused_run")
    kw = {"cache_dir": str(cohort_copy / "cache")} if where == "cache_dir" else {}
    with pytest.raises(ValueError, match=f"{where} .* lies inside the data folder"):
        train(_tiny(cohort_copy, out, **kw))
    assert not (cohort_copy / "run").exists() and not (cohort_copy / "cache").exists()


def test_exploding_loss_stops_with_a_message(tmp_path: Path) -> None:
    watch = _LossWatch([])
    watch.check(tmp_path, 0, 1, ["A", "B"], np.array([1.0, 1.2]))  # the first loss is the reference
    watch.check(tmp_path, 0, 2, ["A", "B"], np.array([50.0, 80.0]))  # large, but not 10^4-fold
    with pytest.raises(TrainingDivergedError, match="grew .* times above the first loss"):
        watch.check(tmp_path, 3, 7, ["A", "B"], np.array([3e12, 5e12]))
    resumed = _LossWatch([{"loss_mean": 1.1}])  # after a resume the first epoch's loss is the reference
    with pytest.raises(TrainingDivergedError, match="epoch 2, batch 1"):
        resumed.check(tmp_path, 1, 1, ["A"], np.array([1e5]))


def test_disk_full_names_the_disk_and_the_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"disk full writing .*last\.pt \(on the disk mounted at .*: .* free of .*; this file needs about"):
        _atomic_save({"w": torch.zeros(1000)}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())  # no partial file left


def test_one_line_errors_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\nlr: 0.1\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["train", "--config", str(bad_yaml)], "not valid YAML (line"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "not found"),
        (["run", "--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["sweep", "--config", str(bad_yaml)], "not valid YAML"),
        (["check", str(a_file)], "is a file, not a folder"),
        (["check", str(tmp_path / "nowhere")], "does not exist"),
        (["run", "--only", "99", "--out", str(tmp_path / "series")], "--only 99 matches no notebook"),
    ]
    for argv, words in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "series").exists()  # `run --only 99` ran and wrote nothing


def test_prediction_labels_other_than_1_score_as_background(cohort, tmp_path: Path) -> None:
    # The organisers count label 1 only: a 0/2 or 0/255 prediction of the true mask scores Dice 0 there.
    import nibabel as nib

    from divaware.evaluate import score_cases

    ids = cohort.ids("test")[:3]
    for pid, label in zip(ids, (1, 2, 255), strict=True):
        img = nib.load(str(cohort.cases[pid].mask_path))
        arr = (np.asanyarray(img.dataobj) * label).astype(np.uint8)
        nib.save(nib.Nifti1Image(arr, img.affine), str(tmp_path / f"{pid}.nii.gz"))
    with pytest.warns(UserWarning, match=rf"labels other than 0/1, scored as background .*{ids[1]} \(values 2\)"):
        table = score_cases(tmp_path, cohort, ids)
    assert table["dice"].tolist() == [1.0, 0.0, 0.0]


def test_damaged_last_pt_and_interrupted_run_folder(synthetic_root: Path, tmp_path: Path) -> None:
    from divaware.cohort import load_cohort
    from divaware.predict import predict

    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_tiny(synthetic_root, run))
        # predict --split val predicts the run's fairness-validation cases, as evaluate --split val scores them
        val = predict(run, synthetic_root, split="val", out_dir=tmp_path / "val", progress=False, cpu_threads=1)
        splits = (run / "splits.csv").read_text().splitlines()
        val_ids = sorted(line.split(",")[0] for line in splits[1:] if line.split(",")[1] == "val")
        assert sorted(p.name[:-7] for p in (val / "pred_segmentations").glob("*.nii.gz")) == val_ids
        assert set(val_ids) <= set(load_cohort(synthetic_root).ids("train"))
        (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:100])
        with pytest.raises(ValueError, match=r"last\.pt is damaged or empty .*best\.pt \(epoch 1\) holds"):
            train(_tiny(synthetic_root, run, epochs=2), resume=True)
        (run / "last.pt").write_bytes(b"")
        with pytest.raises(ValueError, match=r"damaged or empty \(0 bytes"):
            train(_tiny(synthetic_root, run, epochs=2), resume=True)
        # a kill between splits.csv and config.yaml: the folder holds splits.csv (and the cache) only
        for p in run.iterdir():
            if p.name not in ("splits.csv", "cache"):
                p.unlink()
        train(_tiny(synthetic_root, run), resume=True)
    assert (run / "config.yaml").is_file() and (run / "last.pt").is_file()
