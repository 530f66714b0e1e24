"""The MAMA-MIA loader: normalisation, real-layout quirks, every bad input with its documented outcome."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from divaware.cli import main
from divaware.cohort import (
    AGE_GROUPS,
    UNKNOWN,
    Case,
    CohortError,
    CohortWarning,
    age_group,
    load_cohort,
    normalise_density,
    normalise_menopause,
    validation_report,
)
from divaware.synthetic import MENOPAUSE_PERI_LONG, MENOPAUSE_PRE_LONG, make_cohort, read_truth

XLSX = "clinical_and_imaging_info.xlsx"
SMALL = 10


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-case cohort for the bad-input tests: each test breaks its own copy, so small keeps them fast."""
    return make_cohort(tmp_path_factory.mktemp("small") / "cohort", n_cases=SMALL, seed=5)


@pytest.fixture
def broken(small_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the small cohort, to break."""
    return Path(shutil.copytree(small_root, tmp_path / "cohort"))


# ------------------------------------------------------------------------------------------------
# helpers that break a private copy of the synthetic cohort
# ------------------------------------------------------------------------------------------------


def _sheet(root: Path) -> pd.DataFrame:
    return pd.read_excel(root / XLSX, sheet_name="dataset_info")


def _write_sheet(root: Path, frame: pd.DataFrame, sheet: str = "dataset_info") -> None:
    frame.to_excel(root / XLSX, sheet_name=sheet, index=False)


def _ids(root: Path) -> list[str]:
    return list(_sheet(root)["patient_id"])


def _phase(root: Path, pid: str, k: int) -> Path:
    return root / "images" / pid / f"{pid.lower()}_{k:04d}.nii.gz"


def _mask(root: Path, pid: str) -> Path:
    return root / "segmentations" / "expert" / f"{pid}.nii.gz"


def _save(path: Path, data: np.ndarray, like: Path) -> None:
    ref = nib.load(str(like))
    nib.save(nib.Nifti1Image(data, ref.affine), str(path))


def _load_quietly(root: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CohortWarning)
        return load_cohort(root, **kwargs)


def _excluded_with_warning(root: Path, pid: str, reason: str, **kwargs) -> None:
    """The documented 'exclude' outcome: one warning naming the case, the case gone, strict stops."""
    with pytest.warns(CohortWarning, match=pid):
        cohort = load_cohort(root, **kwargs)
    assert pid not in cohort.cases and pid not in cohort.metadata.index
    assert any(reason in r for r in cohort.excluded[pid]), cohort.excluded[pid]
    assert any(p.startswith(f"{pid}: excluded: ") and reason in p for p in cohort.problems)
    assert len(cohort.cases) == len(_ids(root)) - 1
    with pytest.raises(CohortError, match=pid):
        load_cohort(root, strict=True, **kwargs)


def _hash_listing(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------------
# normalisation of single values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("age", "group"), [
    (23, "0-40"), (40, "0-40"), (40.0, "0-40"), (40.5, "41-50"), (41, "41-50"), (50, "41-50"),
    (50.2, "51-60"), (51, "51-60"), (60, "51-60"), (61, "61-70"), (70, "61-70"), (70.01, "71+"), (71, "71+"),
    (89, "71+"), (104, "71+"), ("45", "41-50"), (np.int64(60), "51-60"), (np.float32(40.0), "0-40"),
    (None, UNKNOWN), (float("nan"), UNKNOWN), ("", UNKNOWN), ("n/a", UNKNOWN), ("forty", UNKNOWN),
    (0, UNKNOWN), (-3, UNKNOWN), (130, UNKNOWN), (True, UNKNOWN),
])
def test_age_group_uses_the_challenge_bins(age: object, group: str) -> None:
    assert age_group(age) == group


def test_age_bins_match_the_organisers_pd_cut() -> None:
    ages = np.arange(1.0, 100.0, 0.25)
    theirs = pd.cut(ages, bins=[0, 40, 50, 60, 70, 100], labels=list(AGE_GROUPS)).astype(str)
    assert [age_group(a) for a in ages] == list(theirs)


@pytest.mark.parametrize(("value", "expected"), [
    ("pre", "pre"), ("post", "post"), ("Pre", "pre"), (" POST ", "post"), ("peri", "pre"),
    (MENOPAUSE_PRE_LONG, "pre"), (MENOPAUSE_PERI_LONG, "pre"),
    ("post (prior bilateral ovariectomy OR >12 months since LMP with no prior hysterectomy)", "post"),
    ("premenopausal", "pre"), ("Pre-menopausal", "pre"), ("perimenopausal", "pre"), ("Post-menopausal", "post"),
    ("postmenopausal", "post"), (None, UNKNOWN), (float("nan"), UNKNOWN), ("", UNKNOWN), ("unknown", UNKNOWN),
    ("N/A", UNKNOWN), ("2", UNKNOWN), ("male", UNKNOWN),
])
def test_menopause_spellings(value: object, expected: str) -> None:
    assert normalise_menopause(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("a", "a"), ("B", "b"), (" c ", "c"), ("d", "d"), ("c (heterogeneously dense)", "c"), ("BI-RADS d", "d"),
    ("ACR b", "b"), (1, "a"), (4.0, "d"), ("3", "c"), ("extremely dense", "d"), ("scattered fibroglandular", "b"),
    (None, UNKNOWN), (float("nan"), UNKNOWN), ("", UNKNOWN), ("e", UNKNOWN), (5, UNKNOWN), ("dense", UNKNOWN),
])
def test_density_spellings(value: object, expected: str) -> None:
    assert normalise_density(value) == expected


# ------------------------------------------------------------------------------------------------
# the loaded synthetic cohort
# ------------------------------------------------------------------------------------------------


def test_cohort_contract(cohort) -> None:
    meta = cohort.metadata
    assert meta.index.name == "patient_id" and meta.index.is_unique
    assert list(meta.columns[:7]) == ["dataset", "age", "age_group", "menopause", "breast_density", "split",
                                      "menopause_raw"]
    assert "tcia_series_uid" in meta.columns and "pixel_spacing" in meta.columns  # raw columns follow
    assert meta["age"].dtype == float
    assert set(meta["age_group"]) <= {*AGE_GROUPS, UNKNOWN}
    assert set(meta["menopause"]) <= {"pre", "post", UNKNOWN}
    assert set(meta["breast_density"]) <= {"a", "b", "c", "d", UNKNOWN}
    assert set(meta["split"]) == {"train", "test"}
    assert cohort.ids() == list(meta.index) == list(cohort.cases)
    assert set(cohort.ids("train")) | set(cohort.ids("test")) == set(cohort.ids())
    with pytest.raises(ValueError, match="split"):
        cohort.ids("validation")
    case = cohort.cases[cohort.ids()[0]]
    assert isinstance(case, Case) and case.n_phases >= 3
    assert [p.name[-11:-7] for p in case.image_paths] == [f"{k:04d}" for k in range(case.n_phases)]
    assert case.mask_path is not None and case.mask_path.parent.name == "expert"
    assert case.info["patient_id"] == case.patient_id
    assert hash(case) == hash(Case(case.patient_id, case.image_paths, case.mask_path, {}))  # info not hashed
    geo = cohort.geometry
    assert list(geo.index) == cohort.ids() and (geo[["nx", "ny", "nz"]] == [48, 48, 32]).all().all()
    assert (geo["n_phases"] == [c.n_phases for c in cohort.cases.values()]).all()
    assert cohort.voxels_checked and "mask_voxels" in geo.columns  # voxel checks are on by default


def test_menopause_raw_keeps_the_spreadsheet_value(cohort) -> None:
    meta = cohort.metadata
    ispy2 = meta[meta["dataset"] == "ISPY2"]
    longs = ispy2[ispy2["menopause_raw"] == MENOPAUSE_PRE_LONG]
    assert len(longs) > 0 and (longs["menopause"] == "pre").all()
    assert (meta.loc[meta["menopause_raw"].isna(), "menopause"] == UNKNOWN).all()
    assert (meta.loc[meta["dataset"].isin(["ISPY1", "NACT"]), "menopause"] == UNKNOWN).all()


def test_voxel_checks_measure_tumours(synthetic_root: Path) -> None:
    cohort = load_cohort(synthetic_root, check_voxels=True)
    truth = read_truth(synthetic_root)
    assert cohort.voxels_checked and cohort.problems == []
    assert (cohort.geometry["mask_voxels"] == truth.loc[cohort.ids(), "tumour_voxels"]).all()


def test_report_sections(cohort) -> None:
    report = validation_report(cohort)
    for part in ("cases: 40 usable of 40 spreadsheet rows (0 excluded)", "split: train", "datasets: DUKE 8",
                 "phases per case: ", "shape (voxels): x 48-48", "spacing (mm): ", "image dtypes: int16 40",
                 "missing / unknown per attribute:", "  menopause: ", "group sizes:", "  age_group: 0-40",
                 "  breast_density: a ", "non-NIfTI files ignored in image folders", "problems: 0 (none)",
                 "voxel checks (binary masks, complete data): done"):
        assert part in report, part
    n_unknown = int((cohort.metadata["menopause"] == UNKNOWN).sum())
    assert f"  menopause: {n_unknown} (" in report


def test_input_folder_is_never_written(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid = _ids(broken)[0]
    _phase(broken, pid, 1).write_bytes(b"not a nifti")  # make it report and exclude something too
    before = _hash_listing(broken)
    _load_quietly(broken, check_voxels=True)
    _load_quietly(broken)
    assert main(["check", str(broken)]) == 1
    capsys.readouterr()
    assert _hash_listing(broken) == before


# ------------------------------------------------------------------------------------------------
# real-layout quirks
# ------------------------------------------------------------------------------------------------


def test_case_insensitive_names(broken: Path) -> None:
    ids = _ids(broken)
    a, b, c = ids[0], ids[1], ids[2]
    (broken / "images").rename(broken / "Images")
    (broken / "Images" / a).rename(broken / "Images" / a.lower())  # folder in lower case
    for p in (broken / "Images" / b).iterdir():  # files in upper case
        p.rename(p.with_name(p.name.upper().replace(".NII.GZ", ".nii.gz")))
    (broken / "segmentations" / "expert" / f"{c}.nii.gz").rename(
        broken / "segmentations" / "expert" / f"{c.lower()}.NII.GZ")
    (broken / XLSX).rename(broken / XLSX.upper())
    (broken / "train_test_splits.csv").rename(broken / "Train_Test_Splits.csv")
    cohort = load_cohort(broken)
    assert cohort.problems == [] and cohort.ids() == ids
    assert cohort.cases[a].image_paths[0].parent.name == a.lower()
    assert cohort.cases[c].mask_path.name == f"{c.lower()}.NII.GZ"


def test_stray_files_are_ignored(broken: Path) -> None:
    pid = _ids(broken)[0]
    folder = broken / "images" / pid
    for name in (f"{pid.lower()}_0001.tsv", ".DS_Store", "notes.txt", f"{pid.lower()}_0000.nii.gz.bak"):
        (folder / name).write_text("stray")
    (folder / "subfolder").mkdir()
    (broken / "segmentations" / "expert" / "README.txt").write_text("stray")
    (broken / "images" / "index.html").write_text("stray")
    cohort = load_cohort(broken)
    assert cohort.problems == []
    assert cohort.cases[pid].n_phases == len(list(folder.glob("*.nii.gz")))
    assert {p.name for p in cohort.ignored_files} >= {f"{pid.lower()}_0001.tsv", "notes.txt"}


def test_menopausal_status_column_and_long_forms(broken: Path) -> None:
    frame = _sheet(broken).rename(columns={"menopause": "menopausal_status"})
    frame["menopausal_status"] = frame["menopausal_status"].astype(object)
    frame.loc[0, "menopausal_status"] = MENOPAUSE_PERI_LONG
    frame.loc[1, "menopausal_status"] = "Post-menopausal"
    frame.loc[2, "menopausal_status"] = "premenopausal"
    _write_sheet(broken, frame)
    cohort = load_cohort(broken)
    ids = list(frame["patient_id"])
    meta = cohort.metadata
    assert meta.loc[ids[0], "menopause"] == "pre" and meta.loc[ids[0], "menopause_raw"] == MENOPAUSE_PERI_LONG
    assert meta.loc[ids[1], "menopause"] == "post" and meta.loc[ids[2], "menopause"] == "pre"
    assert "menopausal_status" in meta.columns  # the raw column is kept
    assert cohort.problems == []


def test_menopause_column_wins_over_menopausal_status(broken: Path) -> None:
    frame = _sheet(broken)
    frame["menopausal_status"] = "post"
    frame["menopause"] = frame["menopause"].astype(object)
    frame.loc[0, "menopause"] = "pre"
    frame.loc[1, "menopause"] = None  # empty: the other spelling fills it
    _write_sheet(broken, frame)
    meta = load_cohort(broken).metadata
    assert meta.iloc[0]["menopause"] == "pre" and meta.iloc[1]["menopause"] == "post"


def test_column_names_in_other_letter_case(broken: Path) -> None:
    frame = _sheet(broken).rename(columns={"patient_id": "Patient_ID", "age": " Age", "dataset": "DATASET"})
    _write_sheet(broken, frame)
    cohort = load_cohort(broken)
    assert cohort.problems == [] and len(cohort) == len(frame)


def test_sheet_fallback_warns(broken: Path) -> None:
    _write_sheet(broken, _sheet(broken), sheet="Sheet1")
    with pytest.warns(CohortWarning, match="no sheet 'dataset_info'.*Sheet1"):
        cohort = load_cohort(broken)
    assert cohort.sheet == "Sheet1" and len(cohort) == SMALL
    assert any("no sheet 'dataset_info'" in p for p in cohort.problems)
    with pytest.raises(CohortError, match="dataset_info"), pytest.warns(CohortWarning):
        load_cohort(broken, strict=True)


def test_nan_padded_split_and_cases_in_no_split(broken: Path) -> None:
    split = pd.read_csv(broken / "train_test_splits.csv")
    assert split["test_split"].isna().any()  # the real padding is present ...
    cohort = load_cohort(broken)
    assert cohort.problems == []  # ... and is not mistaken for an id
    dropped = split["train_split"].iloc[0]
    split.loc[0, "train_split"] = np.nan
    split.to_csv(broken / "train_test_splits.csv", index=False)
    with pytest.warns(CohortWarning, match="neither split"):
        cohort = load_cohort(broken)
    assert cohort.metadata.loc[dropped, "split"] == UNKNOWN and dropped in cohort.cases
    assert dropped not in cohort.ids("train") and cohort.ids(UNKNOWN) == [dropped]


def test_density_from_json_when_the_spreadsheet_has_no_column(broken: Path) -> None:
    frame = _sheet(broken)
    expected = frame.set_index("patient_id")["breast_density"].fillna(UNKNOWN)
    _write_sheet(broken, frame.drop(columns=["breast_density"]))
    cohort = load_cohort(broken)
    assert (cohort.metadata["breast_density"] == expected[cohort.ids()]).all()
    assert (cohort.metadata["breast_density"] != UNKNOWN).sum() > SMALL // 2


# ------------------------------------------------------------------------------------------------
# bad input: stop
# ------------------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="does not exist"):
        load_cohort(tmp_path / "nowhere")


@pytest.mark.parametrize("sub", ["images", "segmentations/expert", "segmentations"])
def test_missing_subfolder_stops(broken: Path, sub: str) -> None:
    shutil.rmtree(broken / sub)
    name = "images/" if sub == "images" else "segmentations/expert/"
    with pytest.raises(CohortError, match=name):
        load_cohort(broken)


def test_without_masks_for_inference(broken: Path) -> None:
    shutil.rmtree(broken / "segmentations")
    cohort = load_cohort(broken, require_masks=False)
    assert len(cohort) == SMALL and all(c.mask_path is None for c in cohort.cases.values())


def test_missing_patient_info_folder_is_reported_once(broken: Path) -> None:
    shutil.rmtree(broken / "patient_info_files")
    with pytest.warns(CohortWarning):
        cohort = load_cohort(broken)
    assert len(cohort) == SMALL and all(c.info == {} for c in cohort.cases.values())
    assert len(cohort.problems) == 1 and "patient_info_files" in cohort.problems[0]


@pytest.mark.parametrize("name", [XLSX, "train_test_splits.csv"])
def test_missing_spreadsheet_or_split_stops(broken: Path, name: str) -> None:
    (broken / name).unlink()
    with pytest.raises(CohortError, match=name):
        load_cohort(broken)


def test_unreadable_spreadsheet_stops(broken: Path) -> None:
    (broken / XLSX).write_bytes(b"this is not a zip file")
    with pytest.raises(CohortError, match="cannot read .*xlsx"):
        load_cohort(broken)


@pytest.mark.parametrize("column", ["patient_id", "dataset", "age"])
def test_missing_required_column_stops(broken: Path, column: str) -> None:
    _write_sheet(broken, _sheet(broken).drop(columns=[column]))
    with pytest.raises(CohortError, match=f"lacks required column.*{column}"):
        load_cohort(broken)


def test_missing_menopause_column_stops(broken: Path) -> None:
    _write_sheet(broken, _sheet(broken).drop(columns=["menopause"]))
    with pytest.raises(CohortError, match="menopausal_status"):
        load_cohort(broken)


@pytest.mark.parametrize("lower", [False, True])
def test_duplicate_ids_stop(broken: Path, lower: bool) -> None:
    frame = _sheet(broken)
    dup = frame.iloc[[3]].copy()
    if lower:
        dup["patient_id"] = dup["patient_id"].str.lower()
    _write_sheet(broken, pd.concat([frame, dup], ignore_index=True))
    with pytest.raises(CohortError, match=f"duplicate patient ids.*{frame['patient_id'].iloc[3]}"):
        load_cohort(broken)


def test_split_without_its_columns_stops(broken: Path) -> None:
    pd.DataFrame({"train": ["x"], "test": ["y"]}).to_csv(broken / "train_test_splits.csv", index=False)
    with pytest.raises(CohortError, match="train_split"):
        load_cohort(broken)


def test_id_in_both_splits_stops(broken: Path) -> None:
    split = pd.read_csv(broken / "train_test_splits.csv")
    leaked = split["train_split"].iloc[0]
    split.loc[len(split["test_split"].dropna()), "test_split"] = leaked.lower()
    split.to_csv(broken / "train_test_splits.csv", index=False)
    with pytest.raises(CohortError, match=f"both train_split and test_split.*{leaked}"):
        load_cohort(broken)


def test_no_usable_case_stops(broken: Path) -> None:
    for folder in (broken / "images").iterdir():
        shutil.rmtree(folder)
    with pytest.raises(CohortError, match="no usable case"):
        load_cohort(broken)


# ------------------------------------------------------------------------------------------------
# bad input: report and go on
# ------------------------------------------------------------------------------------------------


def test_split_naming_unknown_ids_is_reported(broken: Path) -> None:
    split = pd.read_csv(broken / "train_test_splits.csv")
    split.loc[len(split["test_split"].dropna()), "test_split"] = "DUKE_999"
    split.to_csv(broken / "train_test_splits.csv", index=False)
    with pytest.warns(CohortWarning, match="DUKE_999"):
        cohort = load_cohort(broken)
    assert len(cohort) == SMALL and "DUKE_999" not in cohort.metadata.index
    assert any("not in the spreadsheet" in p and "DUKE_999" in p for p in cohort.problems)
    with pytest.raises(CohortError, match="DUKE_999"):
        load_cohort(broken, strict=True)


def test_unrecognised_values_become_unknown(broken: Path) -> None:
    frame = _sheet(broken)
    for col in ("menopause", "breast_density", "age"):
        frame[col] = frame[col].astype(object)
    frame.loc[0, "menopause"] = "sometimes"
    frame.loc[1, "breast_density"] = "very"
    frame.loc[2, "age"] = "old"
    frame.loc[3, "age"] = None
    _write_sheet(broken, frame)
    with pytest.warns(CohortWarning, match="unrecognised menopause value 'sometimes'"):
        cohort = load_cohort(broken)
    meta, ids = cohort.metadata, list(frame["patient_id"])
    assert meta.loc[ids[0], "menopause"] == UNKNOWN and meta.loc[ids[1], "breast_density"] == UNKNOWN
    assert meta.loc[ids[2], "age_group"] == UNKNOWN and np.isnan(meta.loc[ids[2], "age"])
    assert meta.loc[ids[3], "age_group"] == UNKNOWN
    assert len(cohort.problems) == 3  # a missing age is not a problem, an unreadable one is
    assert f"age: 2 ({200 / SMALL:.1f} %)" in validation_report(cohort)


def test_missing_or_broken_json_keeps_the_case(broken: Path) -> None:
    a, b = _ids(broken)[:2]
    (broken / "patient_info_files" / f"{a.lower()}.json").unlink()
    (broken / "patient_info_files" / f"{b.lower()}.json").write_text("{not json")
    cohort = _load_quietly(broken)
    assert cohort.cases[a].info == {} and cohort.cases[b].info == {}
    assert any(p.startswith(f"{a}: no patient_info_files") for p in cohort.problems)
    assert any(p.startswith(f"{b}: cannot read") for p in cohort.problems)


def test_unmatched_folders_and_masks_are_reported(broken: Path) -> None:
    frame = _sheet(broken)
    gone = frame["patient_id"].iloc[0]
    _write_sheet(broken, frame.iloc[1:])
    split = pd.read_csv(broken / "train_test_splits.csv")
    split = split.replace({gone: np.nan})
    split.to_csv(broken / "train_test_splits.csv", index=False)
    cohort = _load_quietly(broken)
    assert len(cohort) == SMALL - 1
    assert any("image folder(s) have no spreadsheet row" in p and gone in p for p in cohort.problems)
    assert any("expert mask(s) have no spreadsheet row" in p for p in cohort.problems)


def test_fewer_than_three_phases_is_reported(broken: Path) -> None:
    pid = _ids(broken)[0]
    for p in (broken / "images" / pid).glob("*.nii.gz"):
        if not p.name.endswith(("_0000.nii.gz", "_0001.nii.gz")):
            p.unlink()
    cohort = _load_quietly(broken)
    assert cohort.cases[pid].n_phases == 2
    assert any(p.startswith(f"{pid}: only 2 phases") for p in cohort.problems)


def test_empty_mask_is_reported(broken: Path) -> None:
    pid = _ids(broken)[0]
    mask = _mask(broken, pid)
    _save(mask, np.zeros(nib.load(str(mask)).shape, np.uint8), mask)
    cohort = _load_quietly(broken, check_voxels=True)
    assert pid in cohort.cases and any(p.startswith(f"{pid}: expert mask") and "empty" in p
                                       for p in cohort.problems)


def test_different_affines_are_excluded(broken: Path) -> None:
    # MONAI refuses to stack phases with different affines: the case cannot be loaded, so it is excluded
    pid = _ids(broken)[0]
    path = _phase(broken, pid, 1)
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine * np.diag([2, 1, 1, 1])), str(path))
    _excluded_with_warning(broken, pid, "different affine", check_voxels=False)


# ------------------------------------------------------------------------------------------------
# bad input: exclude the case
# ------------------------------------------------------------------------------------------------


def test_case_without_images_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[4]
    shutil.rmtree(broken / "images" / pid)
    _excluded_with_warning(broken, pid, "no image folder")


def test_case_with_empty_image_folder_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[4]
    for p in (broken / "images" / pid).glob("*.nii.gz"):
        p.unlink()
    _excluded_with_warning(broken, pid, "holds no phase images")


def test_case_without_mask_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[5]
    _mask(broken, pid).unlink()
    _excluded_with_warning(broken, pid, "no expert mask")
    cohort = _load_quietly(broken, require_masks=False)
    assert cohort.cases[pid].mask_path is None and len(cohort) == SMALL


def test_phase_gap_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[6]
    _phase(broken, pid, 1).unlink()
    _excluded_with_warning(broken, pid, "without gaps")


def test_same_phase_twice_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[6]
    src = _phase(broken, pid, 0)
    (src.parent / src.name.replace(".nii.gz", ".nii")).write_bytes(gzip.decompress(src.read_bytes()))
    _excluded_with_warning(broken, pid, "more than once")


def test_corrupt_nifti_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[7]
    _phase(broken, pid, 2).write_bytes(b"\x00" * 100)
    _excluded_with_warning(broken, pid, "cannot read")


def test_corrupt_mask_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[7]
    _mask(broken, pid).write_bytes(gzip.compress(b"garbage" * 10))
    _excluded_with_warning(broken, pid, "cannot read")


def test_truncated_nifti_needs_voxel_checks(broken: Path) -> None:
    pid = _ids(broken)[8]
    path = _phase(broken, pid, 1)
    path.write_bytes(path.read_bytes()[:5000])  # header intact, data cut off
    cohort = load_cohort(broken, check_voxels=False)  # headers only: not detectable, by design
    assert pid in cohort.cases
    _excluded_with_warning(broken, pid, "truncated or corrupt")


def test_phases_with_different_shapes_are_excluded(broken: Path) -> None:
    pid = _ids(broken)[9]
    path = _phase(broken, pid, 2)
    _save(path, np.zeros((48, 48, 30), np.int16), path)
    _excluded_with_warning(broken, pid, "same grid")


def test_four_dimensional_image_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[9]
    path = _phase(broken, pid, 0)
    _save(path, np.zeros((48, 48, 32, 2), np.int16), path)
    _excluded_with_warning(broken, pid, "expected a 3-D volume")


def test_mask_with_another_shape_is_excluded(broken: Path) -> None:
    pid = _ids(broken)[8]
    _save(_mask(broken, pid), np.zeros((48, 48, 31), np.uint8), _mask(broken, pid))
    _excluded_with_warning(broken, pid, "must be on the image grid")


@pytest.mark.parametrize("values", [(0, 255), (0, 1, 2), (0.0, 0.5)])
def test_non_binary_mask_is_excluded_with_voxel_checks(broken: Path, values: tuple) -> None:
    pid = _ids(broken)[9]
    path = _mask(broken, pid)
    mask = np.asanyarray(nib.load(str(path)).dataobj)
    bad = mask.astype(np.float32 if isinstance(values[1], float) else np.uint8) * values[1]
    if len(values) == 3:
        bad[0, 0, 0] = 2
    _save(path, bad, path)
    assert pid in load_cohort(broken, check_voxels=False).cases  # headers only: kept (documented)
    _excluded_with_warning(broken, pid, "not binary")


def test_check_command_reports_problems(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = _ids(broken)
    shutil.rmtree(broken / "images" / ids[0])
    _mask(broken, ids[1]).unlink()
    assert main(["check", str(broken)]) == 1
    report = capsys.readouterr().out
    assert f"cases: {SMALL - 2} usable of {SMALL} spreadsheet rows (2 excluded)" in report
    assert f"  - {ids[0]}: excluded: no image folder" in report
    assert f"  - {ids[1]}: excluded: no expert mask" in report
    assert "problems: 2" in report
    assert main(["check", str(broken), "--strict"]) == 2
    assert "strict=True" in capsys.readouterr().err
    assert main(["check", str(broken / "missing")]) == 2


def test_info_json_round_trip(cohort) -> None:
    pid = cohort.ids()[0]
    path = cohort.root / "patient_info_files" / f"{pid.lower()}.json"
    assert cohort.cases[pid].info == json.loads(path.read_text())
