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


# --------------------------------------------------------------------------------------------------
# silent wrong results: caches keyed by content, a store verified on use, one prediction folder
# --------------------------------------------------------------------------------------------------


def _same_size_rewrite(path: Path, arr: np.ndarray) -> None:
    """Rewrite a .nii.gz with ``arr`` as an uncompressed (level-0) gzip stream, whose length depends only on
    the voxel count: the edited file keeps its size, and its mtime is set back, as `touch -d` would."""
    import gzip
    import os

    import nibabel as nib

    img = nib.load(str(path))
    out = nib.Nifti1Image(arr.astype(img.get_data_dtype()), img.affine, img.header)
    stat = path.stat()
    path.write_bytes(gzip.compress(out.to_bytes(), compresslevel=0, mtime=0))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_voxel_checks_see_a_file_edited_with_its_size_and_mtime_kept(cohort_copy: Path, tmp_path: Path) -> None:
    import nibabel as nib

    from divaware.cohort import load_cohort

    cache = tmp_path / "cache" / "voxel_checks.json"
    pid = load_cohort(cohort_copy, check_voxels=False).ids("train")[0]
    mask = cohort_copy / "segmentations" / "expert" / f"{pid}.nii.gz"
    _same_size_rewrite(mask, np.asanyarray(nib.load(str(mask)).dataobj))  # same voxels, a level-0 stream
    assert pid in load_cohort(cohort_copy, voxel_cache=cache).cases
    size = mask.stat().st_size
    _same_size_rewrite(mask, np.zeros(nib.load(str(mask)).shape))  # the tumour erased
    assert mask.stat().st_size == size
    with pytest.warns(UserWarning, match=f"{pid}.nii.gz is empty"):
        cohort = load_cohort(cohort_copy, voxel_cache=cache)
    assert cohort.geometry.loc[pid, "mask_voxels"] == 0  # the new voxels, not the cached check of the old


def test_store_entry_follows_a_file_edited_with_its_size_and_mtime_kept(cohort_copy: Path, tmp_path: Path) -> None:
    import nibabel as nib

    from divaware import data as D
    from divaware import preprocess as P
    from divaware.cohort import load_cohort

    cohort = load_cohort(cohort_copy, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16))
    rec = D.make_records(cohort, cohort.ids("train")[:1], spec)[0]
    mask = Path(rec[D.LABEL])
    arr = np.asanyarray(nib.load(str(mask)).dataobj)
    _same_size_rewrite(mask, arr)
    first = P.fill([rec], spec, tmp_path / "store", progress=False, precision="float16")[0]
    _same_size_rewrite(mask, np.roll(arr, 8, axis=0))  # the mask shifted by 8 voxels
    second = P.fill([rec], spec, tmp_path / "store", progress=False, precision="float16")[0]
    assert second != first

    def full_label(folder: Path) -> np.ndarray:
        entry = P.Entry.open(folder)
        return entry.read([-c for c in entry.meta["crop_start"]], entry.meta["full_shape"])[1]

    old_label, new_label = full_label(first), full_label(second)
    # the shifted mask, read anew (as many tumour voxels, elsewhere), not the stored old one
    assert new_label.sum() == old_label.sum() == np.count_nonzero(arr)
    assert not np.array_equal(new_label, old_label)


def _corrupt_middle(path: Path) -> None:
    import os

    stat = path.stat()
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 4096] = np.random.default_rng(0).integers(0, 256, min(4096, len(raw) - mid), np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "words"), [
    ("random_bytes", "image.npy's checksum differs"),
    ("half_image", "image.npy has"),
    ("bad_meta", "meta.json cannot be read"),
    ("swapped", "it holds case"),
])
def test_damaged_store_entry_is_named_and_rebuilt(synthetic_root: Path, tmp_path: Path, damage: str,
                                                 words: str) -> None:
    from divaware import data as D
    from divaware import preprocess as P
    from divaware.cohort import load_cohort

    cohort = load_cohort(synthetic_root, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16))
    records = D.make_records(cohort, cohort.ids("train")[:2], spec)
    store = tmp_path / "store"
    folders = P.fill(records, spec, store, progress=False, precision="float16")
    image = np.load(folders[0] / "image.npy").copy()
    if damage == "random_bytes":
        _corrupt_middle(folders[0] / "image.npy")
    elif damage == "half_image":
        _halve(folders[0] / "image.npy")
    elif damage == "bad_meta":
        (folders[0] / "meta.json").write_text('{"shape": [1, 2')
    else:  # the two entry folders swap places
        tmp = folders[0].with_name("swap")
        folders[0].rename(tmp)
        folders[1].rename(folders[0])
        tmp.rename(folders[1])
    with pytest.warns(UserWarning, match=f"preprocessed entry .*{folders[0].name} is damaged: {words}"):
        again = P.fill(records, spec, store, progress=False, precision="float16")
    assert again == folders
    np.testing.assert_array_equal(np.load(again[0] / "image.npy"), image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact now: verified silently
        P.fill(records, spec, store, progress=False, precision="float16")


def test_store_inside_the_data_is_refused_before_anything_is_written_there(cohort_copy: Path) -> None:
    from divaware import preprocess as P
    from divaware.cohort import CohortError

    before = sorted(p.relative_to(cohort_copy) for p in cohort_copy.rglob("*"))
    with pytest.raises(CohortError, match="lies inside the data folder"):
        P.load_cohort_once(cohort_copy, cohort_copy / "store")
    assert sorted(p.relative_to(cohort_copy) for p in cohort_copy.rglob("*")) == before


def test_prediction_folder_with_a_leftover_pred_segmentations_is_refused(synthetic_root: Path,
                                                                         tmp_path: Path) -> None:
    import shutil

    from divaware.audit import audit, demo_predictions
    from divaware.evaluate import prediction_folder

    preds, _ = demo_predictions(synthetic_root, tmp_path / "preds", erode=0)
    leftover = preds / "pred_segmentations"
    leftover.mkdir()
    for f in sorted(preds.glob("*.nii.gz"))[:3]:
        shutil.copy(f, leftover / f.name)
    with pytest.raises(ValueError, match="holds both .* prediction file.*pred_segmentations/ subfolder"):
        audit(synthetic_root, preds, out_dir=tmp_path / "audit", verbose=False)
    assert not (tmp_path / "audit").exists()
    assert prediction_folder(leftover) == leftover  # the subfolder, named explicitly, is what is scored
    empty = tmp_path / "empty_sub"
    (empty / "pred_segmentations").mkdir(parents=True)
    shutil.copy(next(preds.glob("*.nii.gz")), empty)
    assert prediction_folder(empty) == empty  # an empty subfolder is no rival to the files beside it


def test_sweep_devices_that_are_no_gpu_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    config = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    rc = cli_main(["sweep", "--config", str(config), "--out", str(tmp_path / "sweep"), "--devices", "0,1",
                   "--jobs", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a GPU of this machine" in err and err.count("\n") == 1, err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("yaml_line", "words"), [
    ("channels: 8", "field 'channels' = 8: 8 is not a list"),
    ("lr: null", "field 'lr' is null"),
    ("seed: 1e20", "field 'seed'"),
    ("seed: 100000000000000000000", "field 'seed': 100000000000000000000 is too large"),
    ("batch_size: [2]", "field 'batch_size'"),
])
def test_each_config_type_error_names_its_field(tmp_path: Path, yaml_line: str, words: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data_root: {tmp_path / 'nowhere'}\nout_dir: {tmp_path / 'run'}\n{yaml_line}\n")
    assert cli_main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "wrong type" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "sweep", "train"])
def test_ctrl_c_and_a_busy_run_folder_are_one_line(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from divaware import pipeline
    from divaware import train as T
    from divaware.runfolder import RunFolderBusy

    config = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    argv = {"run": ["run", "--config", str(config), "--out", str(tmp_path / "s")],
            "sweep": ["sweep", "--config", str(config), "--out", str(tmp_path / "s")],
            "train": ["train", "--config", str(Path(config).with_name("train_default.yaml"))]}[command]
    target = {"run": (pipeline, "run_series"), "sweep": (pipeline, "sweep"), "train": (T, "train")}[command]

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(*target, interrupted)
    assert cli_main(argv) == 130
    err = capsys.readouterr().err
    assert err == f"divaware {command}: interrupted (Ctrl-C)\n", err

    def busy(*args: object, **kwargs: object) -> None:
        raise RunFolderBusy("run folder x is in use by pid 1 on host h since now; wait for it to finish")

    monkeypatch.setattr(*target, busy)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "is in use by pid 1" in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_run_with_an_unknown_method_is_refused_before_any_notebook(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "series.yaml"
    config.write_text("methods: [erm, divaware_typo]\n")
    assert cli_main(["run", "--config", str(config), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) ['divaware_typo']" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_inference_memory_estimate_covers_what_inference_takes() -> None:
    """The estimate is generous (about twice the measured peak, see inference_memory_bytes) but not absurd:
    for a training-sized window it stays within 10x of the feature maps' own size."""
    from divaware.model import inference_memory_bytes

    small = inference_memory_bytes((3, 48, 48, 32), (32, 32, 32), [4, 8, 16], 3)
    assert 1e6 < small < 1e8
    # a window larger than the volume pads the volume up to it: the buffers grow with the window
    big = inference_memory_bytes((3, 48, 48, 32), (999, 999, 999), [4, 8, 16], 3)
    assert big > 100 * 2**30
    whole = inference_memory_bytes((3, 48, 48, 32), None, [4, 8, 16], 3)
    assert whole < small * 2


def _store_records(synthetic_root: Path, n: int = 2) -> tuple[list[dict], object]:
    from divaware import data as D
    from divaware.cohort import load_cohort

    cohort = load_cohort(synthetic_root, check_voxels=False)
    spec = D.DataSpec(patch_size=(16, 16, 16))
    return D.make_records(cohort, cohort.ids("train")[:n], spec), spec


def test_full_disk_while_filling_the_store_is_one_line(synthetic_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from divaware import preprocess as P
    from divaware.outputs import OutputError

    records, spec = _store_records(synthetic_root)
    real_save = np.save

    def save(path: object, arr: object, *args: object, **kwargs: object) -> None:
        real_save(path, arr, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(P.np, "save", save)
    with pytest.raises(OutputError, match="disk full writing .*preprocessed store") as info:
        P.fill(records, spec, tmp_path / "store", progress=False, precision="float16")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "store").rglob("*.tmp")) and not list((tmp_path / "store").rglob("meta.json"))


def test_a_filled_read_only_store_serves_reads(synthetic_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from divaware import preprocess as P

    sys.path.insert(0, str(Path(__file__).parent))
    from test_corpus import _read_only_under

    records, spec = _store_records(synthetic_root)
    store = tmp_path / "store"
    folders = P.fill(records, spec, store, progress=False, precision="float16")
    P.load_cohort_once(synthetic_root, store)  # voxel checks cached in the store
    _read_only_under(monkeypatch, store.absolute())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert P.fill(records, spec, store, progress=False, precision="float16") == folders
        cohort = P.load_cohort_once(synthetic_root, store)
    said = [str(w.message) for w in seen if "store" in str(w.message) or "cache" in str(w.message)]
    assert not said, said  # nothing to say: everything needed is there
    assert set(r["patient_id"] for r in records) <= set(cohort.cases)
    image, label = P.Entry.open(folders[0]).read([0, 0, 0], [8, 8, 8])
    assert image.shape[1:] == (8, 8, 8) and label is not None


def test_audit_on_a_full_disk_is_one_line(synthetic_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from divaware import audit as A
    from divaware.outputs import OutputError

    preds, _ = A.demo_predictions(synthetic_root, tmp_path / "preds", erode=0)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "figures" / "x.png"))

    monkeypatch.setattr(A, "write_figures", full)
    with pytest.raises(OutputError, match="disk full writing .*figures.*audit folder"):
        A.audit(synthetic_root, preds, out_dir=tmp_path / "out", n_boot=10, n_permutations=1, verbose=False)
    assert not (tmp_path / "out" / "audit.json").exists()


def _readme_commands() -> dict[str, str]:
    """The first cell of each row of the README's command table, by command."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `divaware "):
            cell = line.split("` |", 1)[0][3:]
            rows[cell.split()[1]] = cell.replace("\\|", "|")
    return rows


def test_readme_command_table_lists_every_option_of_every_command() -> None:
    import argparse
    import re

    from divaware.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = _readme_commands()
    assert sorted(rows) == sorted(sub.choices)
    for name, parser in sub.choices.items():
        cell = rows[name]
        listed = set(re.findall(r"(--[a-z][a-z0-9-]*)", cell))
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        assert listed == options, (name, sorted(options - listed), sorted(listed - options))
        for action in parser._actions:
            if action.choices and action.option_strings:
                shown = re.search(re.escape(action.option_strings[0]) + r" ([^\s\]]+)", cell)
                assert shown and set(shown.group(1).split("|")) >= set(map(str, action.choices)), (name, action.dest)


def test_check_exit_codes_are_the_documented_ones(synthetic_root: Path, cohort_copy: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    row = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    documented = "exit 0: no problem, 1: problems found (listed), 2: the folder cannot be checked"
    assert documented in row
    missing = cli_main(["check", str(tmp_path / "nowhere")])
    (cohort_copy / "images" / sorted(p.name for p in (cohort_copy / "images").iterdir())[0]).rename(
        tmp_path / "moved")  # one case's images gone: a problem, listed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = cli_main(["check", str(cohort_copy), "--headers-only"])
        strict = cli_main(["check", str(cohort_copy), "--headers-only", "--strict"])
    capsys.readouterr()
    assert (missing, problems, strict) == (2, 1, 2)


def test_resume_after_editing_config_yaml_names_the_field(synthetic_root: Path, cohort_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_tiny(synthetic_root, run))
    original = (run / "config.yaml").read_text()
    for field, value in (("channels", [4, 8, 32]), ("data_root", str(cohort_copy))):
        edited = yaml.safe_load(original)
        edited[field] = value
        (run / "config.yaml").write_text(yaml.safe_dump(edited))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli_main(["train", "--config", str(run / "config.yaml"), "--resume", "--epochs", "2"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{field}: " in err and "in last.pt" in err and "Traceback" not in err, err
        assert err.count("\n") == 1, err
    (run / "config.yaml").write_text(original)  # restored: resumes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["train", "--config", str(run / "config.yaml"), "--resume", "--epochs", "2"]) == 0


def test_speed_claim_is_measured_once_and_quoted_once() -> None:
    import re

    repo = Path(__file__).resolve().parents[1]
    bench = (repo / "benchmarks" / "MAIN_JOB_SPEED.md").read_text(encoding="utf-8")
    row = next(line for line in bench.splitlines() if line.startswith("| training step, UNet 16-128"))
    measured = row.rstrip(" |").rsplit("|", 1)[1].strip()
    readme = (repo / "README.md").read_text(encoding="utf-8")
    assert f"{measured}× faster per training step" in readme
    places = [repo / "README.md", repo / "configs" / "default.yaml", *sorted((repo / "notebooks").glob("*.ipynb"))]
    for path in places:  # no other figure for the same change (it once read 3x, 3x x 1.9 and 4.59 in 3 places)
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"about 3\s*[x×]", text), path.name


def test_no_monai_loading_bar_on_stderr(synthetic_root: Path, tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_tiny(synthetic_root, tmp_path / "run", progress=True))  # notebook 03 with interactive=True
    err = capfd.readouterr().err
    assert "Loading dataset" not in err  # MONAI's plain-text bars read as errors in Jupyter


def test_readme_audit_demo_is_the_recorded_run() -> None:
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tools"))
    import readme_audit_demo as demo

    readme = (repo / "README.md").read_text(encoding="utf-8")
    block = demo.readme_block(readme)
    assert block == demo.readme_block((repo / "benchmarks" / "AUDIT_DEMO.md").read_text(encoding="utf-8"))
    commands = [line for line in block.splitlines() if not line.startswith(("#", "```"))]
    assert commands == demo.COMMANDS  # the commands that ran are the ones shown
    assert f"flags something on this many cases; here {demo.null_share(block)} %" in " ".join(readme.split())


def test_a_defect_in_a_phase_the_run_never_reads_excludes_no_case(cohort_copy: Path, tmp_path: Path) -> None:
    import nibabel as nib

    from divaware.cohort import load_cohort

    pid = next(p.name for p in sorted((cohort_copy / "images").iterdir())
               if (p / f"{p.name.lower()}_0003.nii.gz").is_file() and p.name in
               load_cohort(cohort_copy, check_voxels=False).ids("train"))
    path = cohort_copy / "images" / pid / f"{pid.lower()}_0003.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(path))  # a blank phase 0003
    with pytest.warns(UserWarning, match=f"{pid}.*constant"):
        assert pid not in load_cohort(cohort_copy).cases  # every phase checked: excluded
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cohort = load_cohort(cohort_copy, phases=[0, 1, 2])
    assert pid in cohort.cases and len(cohort.cases[pid].image_paths) == 3
    assert not [w for w in seen if pid in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(_tiny(cohort_copy, tmp_path / "run", cache="memory"))  # phases [0, 1, 2]: the case trains
    assert pid in (run / "splits.csv").read_text()
