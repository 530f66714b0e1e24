"""The synthetic MAMA-MIA stand-in: layout, spellings, causal story, determinism, presets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from scipy.stats import spearmanr

from divaware.cli import main
from divaware.cohort import load_cohort
from divaware.synthetic import (
    MENOPAUSE_PERI_LONG,
    MENOPAUSE_PRE_LONG,
    REAL_COUNTS,
    SPREADSHEET_COLUMNS,
    TRUTH_FILE,
    make_cohort,
    plan_cohort,
    read_truth,
)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


# ------------------------------------------------------------------------------------------------
# Layout and spellings of the written cohort
# ------------------------------------------------------------------------------------------------


def test_layout_is_the_real_one(synthetic_root: Path) -> None:
    top = sorted(p.name for p in synthetic_root.iterdir())
    assert top == sorted(["images", "segmentations", "patient_info_files", "clinical_and_imaging_info.xlsx",
                          "train_test_splits.csv", TRUTH_FILE])
    truth = read_truth(synthetic_root)
    folders = sorted(p.name for p in (synthetic_root / "images").iterdir())
    assert folders == sorted(truth.index) and all(f == f.upper() for f in folders)
    n_phases, tsv = [], 0
    for folder in (synthetic_root / "images").iterdir():
        low = folder.name.lower()
        names = sorted(p.name for p in folder.iterdir())
        phases = [n for n in names if n.endswith(".nii.gz")]
        assert phases == [f"{low}_{k:04d}.nii.gz" for k in range(len(phases))]  # lower-case, no gaps
        n_phases.append(len(phases))
        tsv += sum(n.endswith(".tsv") for n in names)
        assert (synthetic_root / "segmentations" / "expert" / f"{folder.name}.nii.gz").is_file()
        assert (synthetic_root / "segmentations" / "automatic" / f"{low}.nii.gz").is_file()
        assert (synthetic_root / "patient_info_files" / f"{low}.json").is_file()
    assert min(n_phases) >= 3 and max(n_phases) == 6
    assert tsv > 0  # the stray-tsv quirk is present


def test_spreadsheet_columns_and_spellings(synthetic_root: Path) -> None:
    book = pd.ExcelFile(synthetic_root / "clinical_and_imaging_info.xlsx")
    assert book.sheet_names == ["dataset_info"]
    sheet = book.parse("dataset_info")
    assert tuple(sheet.columns) == SPREADSHEET_COLUMNS and len(SPREADSHEET_COLUMNS) == 50  # 49 + density
    assert set(sheet["dataset"]) <= set(REAL_COUNTS)
    spellings = set(sheet["menopause"].dropna())
    assert spellings <= {"pre", "post", MENOPAUSE_PRE_LONG, MENOPAUSE_PERI_LONG}
    ispy2 = sheet[sheet["dataset"] == "ISPY2"]["menopause"].dropna()
    assert MENOPAUSE_PRE_LONG in set(ispy2)  # I-SPY2 uses the long forms
    for name in ("ISPY1", "NACT"):  # unknown for whole collections, as in the real data
        assert sheet[sheet["dataset"] == name]["menopause"].isna().all()
    assert set(sheet["breast_density"].dropna()) <= set("abcd")
    assert sheet["pixel_spacing"].str.match(r"^\[\d+\.\d+, \d+\.\d+\]$").all()
    assert sheet["patient_id"].str.match(r"^(DUKE_\d{3}|ISPY1_1\d{3}|ISPY2_\d{6}|NACT_\d{2})$").all()


def test_split_file_is_nan_padded(synthetic_root: Path) -> None:
    split = pd.read_csv(synthetic_root / "train_test_splits.csv")
    assert list(split.columns) == ["train_split", "test_split"]
    train, test = split["train_split"].dropna(), split["test_split"].dropna()
    assert len(train) == len(split) and split["test_split"].isna().sum() == len(split) - len(test) > 0
    assert not set(train) & set(test)
    assert len(test) == pytest.approx(0.2 * (len(train) + len(test)), abs=2)


def test_patient_info_json(synthetic_root: Path) -> None:
    truth = read_truth(synthetic_root)
    for pid in truth.index[:10]:
        info = json.loads((synthetic_root / "patient_info_files" / f"{pid.lower()}.json").read_text())
        assert info["patient_id"] == pid
        assert set(info["clinical_data"]) >= {"age", "menopausal_status", "breast_density"}
        assert set(info["primary_lesion"]) >= {"pcr", "tumor_subtype", "breast_coordinates"}
        assert set(info["imaging_data"]) >= {"dataset", "site", "scanner_manufacturer", "field_strength"}
        box = info["primary_lesion"]["breast_coordinates"]
        mask = _array(synthetic_root / "segmentations" / "expert" / f"{pid}.nii.gz")
        # organisers' convention: x indexes NIfTI axis k, y axis j, z axis i; upper bounds exclusive
        cropped = mask[box["z_min"]:box["z_max"], box["y_min"]:box["y_max"], box["x_min"]:box["x_max"]]
        assert cropped.sum() == mask.sum() > 0
        assert cropped.size < mask.size  # a real crop, not the whole volume


def test_images_and_masks(synthetic_root: Path) -> None:
    truth = read_truth(synthetic_root)
    vendors_max: dict[str, int] = {}
    for pid in truth.index:
        low = pid.lower()
        img = nib.load(str(synthetic_root / "images" / pid / f"{low}_0001.nii.gz"))
        assert img.shape == (48, 48, 32) and img.get_data_dtype() == np.int16  # <= ~64k voxels, raw ints
        mask_img = nib.load(str(synthetic_root / "segmentations" / "expert" / f"{pid}.nii.gz"))
        mask = np.asanyarray(mask_img.dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert np.allclose(mask_img.affine, img.affine)
        assert mask.sum() == truth.loc[pid, "tumour_voxels"]
        data = np.asanyarray(img.dataobj)
        vendors_max[truth.loc[pid, "manufacturer"]] = max(vendors_max.get(truth.loc[pid, "manufacturer"], 0),
                                                          int(data.max()))
    # Tumours are learnable at this size: a few hundred voxels typically, never tiny.
    assert truth["tumour_voxels"].min() >= 40 and 150 <= truth["tumour_voxels"].median() <= 600
    # Vendor-dependent raw scale: GE values run far higher than Siemens'.
    assert vendors_max["GE"] > 1.5 * vendors_max["SIEMENS"]


def test_truth_file_is_ignored_by_the_loader(cohort) -> None:
    assert cohort.problems == []
    assert not any(TRUTH_FILE in p for p in cohort.problems)
    truth = read_truth(cohort.root)
    assert list(cohort.metadata.index) == list(truth.index)
    assert (cohort.metadata["dataset"] == truth["dataset"]).all()
    assert (cohort.metadata["age"] == truth["age"]).all()
    # reported menopause is the truth where it is known
    known = cohort.metadata["menopause"] != "unknown"
    assert (cohort.metadata.loc[known, "menopause"] == truth.loc[known, "menopause_true"]).all()
    dens = cohort.metadata["breast_density"] != "unknown"
    assert (cohort.metadata.loc[dens, "breast_density"] == truth.loc[dens, "density_true"]).all()
    assert (cohort.metadata["split"] == truth["split"]).all()


def test_read_truth_refuses_a_non_synthetic_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a synthetic cohort"):
        read_truth(tmp_path)


# ------------------------------------------------------------------------------------------------
# The causal story, measured from the images
# ------------------------------------------------------------------------------------------------


def test_bpe_is_stronger_in_the_hard_subgroup_in_the_images(synthetic_root: Path) -> None:
    truth = read_truth(synthetic_root)
    assert truth["hard_subgroup"].sum() >= 2
    measured = {}
    for pid in truth.index:
        low = pid.lower()
        pre = ndi.uniform_filter(_array(synthetic_root / "images" / pid / f"{low}_0000.nii.gz").astype(float), 3)
        post = ndi.uniform_filter(_array(synthetic_root / "images" / pid / f"{low}_0001.nii.gz").astype(float), 3)
        mask = _array(synthetic_root / "segmentations" / "expert" / f"{pid}.nii.gz") > 0
        tissue = (pre > 0.25 * np.percentile(pre, 99)) & ~ndi.binary_dilation(mask, iterations=3)
        enhancement = (post - pre) / np.maximum(pre, 1.0)
        measured[pid] = np.percentile(enhancement[tissue], 90)  # how bright the non-tumour tissue gets
    bpe = pd.Series(measured)
    hard = truth["hard_subgroup"]
    assert bpe[hard].mean() > 1.5 * bpe[~hard].mean()
    assert spearmanr(truth["bpe_strength"], bpe[truth.index])[0] > 0.4


def test_fgt_follows_density_and_tumour_enhances_fast(synthetic_root: Path) -> None:
    truth = read_truth(synthetic_root)
    order = truth["density_true"].map("abcd".index)
    assert spearmanr(order, truth["fgt_fraction"])[0] > 0.8
    by_density = truth.groupby("density_true")["fgt_fraction"].median()
    assert list(by_density.sort_index()) == sorted(by_density)  # monotone a < b < c < d
    # The tumour enhances strongly at the first post-contrast phase (fast uptake).
    for pid in truth.index[:10]:
        low = pid.lower()
        mask = _array(synthetic_root / "segmentations" / "expert" / f"{pid}.nii.gz") > 0
        pre = _array(synthetic_root / "images" / pid / f"{low}_0000.nii.gz")[mask].mean()
        post = _array(synthetic_root / "images" / pid / f"{low}_0001.nii.gz")[mask].mean()
        assert post > 1.4 * pre


# ------------------------------------------------------------------------------------------------
# Metadata distributions (from the plan: many cases, no voxels)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_plan() -> pd.DataFrame:
    return plan_cohort(n_cases=3000, seed=7)


def test_collection_proportions_are_the_real_ones() -> None:
    plan = plan_cohort(n_cases=1506, seed=0)
    assert plan["dataset"].value_counts().to_dict() == REAL_COUNTS
    assert plan.index.is_unique
    small = plan_cohort(n_cases=40, seed=0)
    assert small["dataset"].value_counts().to_dict() == {"DUKE": 8, "ISPY1": 4, "ISPY2": 26, "NACT": 2}


def test_hard_subgroup_is_a_realistic_minority(big_plan: pd.DataFrame) -> None:
    hard = big_plan["hard_subgroup"]
    assert 0.10 <= hard.mean() <= 0.16
    assert (big_plan.loc[hard, "age"] <= 40).all()
    assert (big_plan.loc[hard, "menopause_true"] == "pre").all()
    assert big_plan.loc[hard, "density_true"].isin(["c", "d"]).all()
    assert big_plan.loc[hard, "bpe_strength"].mean() > 0.8 > 0.4 > big_plan.loc[~hard, "bpe_strength"].mean()
    assert big_plan.loc[hard, "n_foci"].mean() > 2 > 0.5 > big_plan.loc[~hard, "n_foci"].mean()


def test_density_and_menopause_follow_age(big_plan: pd.DataFrame) -> None:
    density = big_plan["density_true"].map("abcd".index)
    assert spearmanr(big_plan["age"], density)[0] < -0.2
    shares = big_plan["density_true"].value_counts(normalize=True)
    assert 0.05 < shares["a"] < 0.15 and 0.3 < shares["b"] < 0.5 and 0.3 < shares["c"] < 0.45
    young, old = big_plan["age"] <= 40, big_plan["age"] > 60
    assert density[young].isin([2, 3]).mean() > 0.55 > 0.4 > density[old].isin([2, 3]).mean()
    pre = big_plan["menopause_true"] == "pre"
    assert pre[young].mean() > 0.95 and pre[old].mean() < 0.05
    peri = big_plan["menopause_reported"] == MENOPAUSE_PERI_LONG
    assert peri.any() and (big_plan.loc[peri, "menopause_true"] == "pre").all()


def test_teaching_missingness(big_plan: pd.DataFrame) -> None:
    density_missing = big_plan["density_reported"].isna().mean()
    assert density_missing < 0.15
    meno_unknown = big_plan["menopause_reported"].isna()
    for name in ("ISPY1", "NACT"):
        assert meno_unknown[big_plan["dataset"] == name].all()
    assert meno_unknown[big_plan["dataset"].isin(["DUKE", "ISPY2"])].mean() < 0.06
    assert big_plan["age_reported"].notna().all()


def test_realistic_missingness() -> None:
    plan = plan_cohort(n_cases=3000, seed=7, missingness="realistic")
    density_known = plan["density_reported"].notna()
    assert 0.94 <= 1 - density_known.mean() <= 0.98  # ~96 % missing
    assert set(plan.loc[density_known, "dataset"]) == {"DUKE"}
    duke = plan["dataset"] == "DUKE"
    assert density_known[duke].mean() == pytest.approx(60 / 291, abs=0.05)
    assert 0.23 <= plan["menopause_reported"].isna().mean() <= 0.31  # ~27 % unknown


def test_tumour_volumes_are_log_normal_and_duke_smallest(big_plan: pd.DataFrame) -> None:
    ml = big_plan["tumour_ml_target"]
    by = ml.groupby(big_plan["dataset"]).median()
    assert by.idxmin() == "DUKE"
    logs = np.log(ml[big_plan["dataset"] == "ISPY2"])
    assert abs(float(pd.Series(logs).skew())) < 0.3  # log-normal: log volumes are symmetric
    real = plan_cohort(n_cases=1506, seed=0, preset="realistic")["tumour_ml_target"]
    assert 7 <= real.median() <= 11 and 1 <= real.quantile(0.05) <= 3.5 and 40 <= real.quantile(0.95) <= 100


def test_realistic_preset_plans_real_geometry() -> None:
    plan = plan_cohort(n_cases=1506, seed=0, preset="realistic")
    shapes = np.array(plan["shape"].tolist())
    spacing = np.array(plan["spacing"].tolist())
    assert shapes[:, :2].min() >= 256 and shapes[:, :2].max() <= 512
    assert shapes[:, 2].min() >= 44 and shapes[:, 2].max() <= 256
    assert spacing[:, :2].min() >= 0.3 and spacing[:, :2].max() <= 1.4
    assert spacing[:, 2].min() >= 0.8 and spacing[:, 2].max() <= 3.4
    duke = plan[plan["dataset"] == "DUKE"]
    assert set(s[0] for s in duke["shape"]) <= {448, 512} and (duke["view"] == "axial").all()
    assert (plan.loc[plan["dataset"].isin(["ISPY1", "NACT"]), "view"] == "sagittal").all()


# ------------------------------------------------------------------------------------------------
# Determinism, overwrite protection, presets, CLI
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_cohort(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", n_cases=5, seed=11)
    b = make_cohort(tmp_path / "b", n_cases=5, seed=11)
    c = make_cohort(tmp_path / "c", n_cases=5, seed=12)
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) > 30 and ha == hb  # every file, the xlsx included, byte for byte
    assert _hashes(c) != ha


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    root = make_cohort(tmp_path / "cohort", n_cases=3, seed=0)
    with pytest.raises(ValueError, match="not empty"):
        make_cohort(root, n_cases=3, seed=1)
    make_cohort(root, n_cases=4, seed=1, overwrite=True)  # a folder it wrote itself may be replaced
    assert len(read_truth(root)) == 4
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="refusing to delete"):
        make_cohort(other, n_cases=3, overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="preset"):
        plan_cohort(10, preset="huge")
    with pytest.raises(ValueError, match="missingness"):
        plan_cohort(10, missingness="none")
    with pytest.raises(ValueError, match="n_cases"):
        plan_cohort(0)
    with pytest.raises(ValueError, match="collection"):
        plan_cohort(10, collections=["MAYO"])


def test_realistic_preset_writes_real_shapes(tmp_path: Path) -> None:
    # I-SPY1 has the cheapest real shape (sagittal 256 x 256 x 44-64): a few seconds for one case. The other
    # collections' geometry is checked on the plan above.
    root = make_cohort(tmp_path / "real", n_cases=1, seed=0, preset="realistic", collections=["ISPY1"])
    cohort = load_cohort(root)
    assert cohort.problems == []
    geo = cohort.geometry
    assert (geo["nx"] == 256).all() and (geo["ny"] == 256).all() and geo["nz"].between(44, 64).all()
    assert geo["spacing_x"].between(0.6, 1.0).all() and geo["spacing_z"].between(1.8, 3.4).all()
    truth = read_truth(root)
    assert truth["tumour_ml"].between(0.3, 160).all()
    assert set(cohort.metadata["view"]) == {"sagittal"}


def test_cli_synth_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--n-cases", "4", "--seed", "2"]) == 0
    assert "wrote 4 synthetic cases" in capsys.readouterr().out
    assert main(["check", str(out)]) == 0
    report = capsys.readouterr().out
    assert "problems: 0 (none)" in report and "cases: 4 usable of 4" in report
    assert main(["synth", "--out", str(out), "--n-cases", "4"]) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err


def test_check_on_the_shared_cohort_reports_no_problem(synthetic_root: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(synthetic_root)]) == 0
    report = capsys.readouterr().out
    assert "problems: 0 (none)" in report
    assert "voxel checks (binary masks, complete data): done" in report
    assert "most common shapes: 48x48x32 (40)" in report and "group sizes:" in report


# ------------------------------------------------------------------------------------------------
# Disparity mechanisms (--disparity default | representation | intrinsic)
# ------------------------------------------------------------------------------------------------


def test_mechanisms_keep_the_patients_and_change_only_the_hard_subgroups_difficulty() -> None:
    plans = {d: plan_cohort(n_cases=1500, seed=3, disparity=d) for d in ("default", "representation", "intrinsic")}
    own = ["n_foci", "hidden_fraction", "disparity"]
    for d in ("representation", "intrinsic"):
        pd.testing.assert_frame_equal(plans[d].drop(columns=own), plans["default"].drop(columns=own))
    hard = plans["default"]["hard_subgroup"]
    assert 0.10 <= hard.mean() <= 0.16
    rep, intr = plans["representation"], plans["intrinsic"]
    # representation: tumour-sized look-alike foci in the hard subgroup only, at least two per case
    assert (rep.loc[hard, "n_foci"] >= 2).all() and (rep.loc[~hard, "n_foci"] == 0).all()
    assert 3.5 <= rep.loc[hard, "n_foci"].mean() <= 4.5
    assert (rep["hidden_fraction"] == 0).all()
    # intrinsic: no foci anywhere; 35-55 % of each hard-subgroup tumour hidden
    assert (intr["n_foci"] == 0).all() and (intr.loc[~hard, "hidden_fraction"] == 0).all()
    assert intr.loc[hard, "hidden_fraction"].between(0.35, 0.55).all()
    with pytest.raises(ValueError, match="unknown disparity 'both'.*representation"):
        plan_cohort(n_cases=5, disparity="both")


def test_representation_foci_carry_a_kinetic_cue_in_the_phases_the_model_sees() -> None:
    from divaware.synthetic import _kinetics

    plan = plan_cohort(n_cases=400, seed=0, disparity="representation")
    ratios_foci, ratios_tumour, peak_foci, peak_tumour = [], [], [], []
    for index, (pid, case) in enumerate(plan[plan["hard_subgroup"]].iterrows()):
        c = {**case.to_dict(), "patient_id": pid}
        k = _kinetics(c, np.random.default_rng(index))
        t1, t2 = c["acquisition_times"][1], c["acquisition_times"][2]
        ratios_foci.append(k["foci"](t2) / k["foci"](t1))
        ratios_tumour.append(k["tumour"](t2) / k["tumour"](t1))
        peak_foci.append(k["foci"](t2))
        peak_tumour.append(k["tumour"](t2))
    # foci keep rising (phase 2 >= 1.5x phase 1, median ~2x); tumours have (nearly) peaked by then
    assert min(ratios_foci) >= 1.5 and np.median(ratios_foci) >= 1.8
    assert max(ratios_tumour) < 1.45 and np.median(ratios_tumour) < 1.15
    # ... and at phase 2 a focus enhances about as much as a tumour (not a vessel-bright outlier)
    assert 0.5 <= np.median(peak_foci) / np.median(peak_tumour) <= 1.0


def test_mechanisms_are_byte_deterministic_and_differ_only_where_they_should(tmp_path: Path) -> None:
    base = make_cohort(tmp_path / "default", n_cases=8, seed=4)
    roots = {d: make_cohort(tmp_path / d, n_cases=8, seed=4, disparity=d) for d in ("representation", "intrinsic")}
    again = make_cohort(tmp_path / "again", n_cases=8, seed=4, disparity="intrinsic")
    assert _hashes(again) == _hashes(roots["intrinsic"])  # byte for byte
    truth = read_truth(base)
    hard = truth.index[truth["hard_subgroup"]]
    assert len(hard) == 2 and (read_truth(roots["intrinsic"]).loc[hard, "hidden_fraction"] > 0.3).all()
    quiet = [p for p in truth.index if not truth.loc[p, "hard_subgroup"] and truth.loc[p, "n_foci"] == 0]
    assert len(quiet) >= 4
    hb = _hashes(base)
    for d, root in roots.items():
        h = _hashes(root)
        # a case with no foci outside the hard subgroup is the same case in every mechanism
        for p in quiet:
            files = [k for k in hb if f"/{p}/" in k or f"/{p.lower()}_" in k or k.endswith(f"/{p}.nii.gz")]
            assert files and all(h[k] == hb[k] for k in files), (d, p)
        # the hard cases' images differ, their masks do not (labels are never tampered with)
        for p in hard:
            assert h[f"images/{p}/{p.lower()}_0001.nii.gz"] != hb[f"images/{p}/{p.lower()}_0001.nii.gz"]
            assert h[f"segmentations/expert/{p}.nii.gz"] == hb[f"segmentations/expert/{p}.nii.gz"]
    # intrinsic: part of the tumour enhances like parenchyma, so the mean enhancement inside the mask drops
    for p in hard:
        mask = _array(base / "segmentations" / "expert" / f"{p}.nii.gz") > 0

        def enhancement(root: Path, p: str = p, mask: np.ndarray = mask) -> float:
            pre, post = (_array(root / "images" / p / f"{p.lower()}_{k:04d}.nii.gz").astype(float) for k in (0, 1))
            return float((post[mask] - pre[mask]).mean() / pre[mask].mean())

        assert enhancement(roots["intrinsic"]) < 0.85 * enhancement(base)


def test_cli_synth_disparity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "c"), "--n-cases", "3", "--disparity", "intrinsic"]) == 0
    assert "intrinsic disparity" in capsys.readouterr().out
    assert set(read_truth(tmp_path / "c")["disparity"]) == {"intrinsic"}


# ------------------------------------------------------------------------------------------------
# The generator's refactor keeps every existing cohort; look-alike positive control, counterfactual, dose
# control, balanced cohorts, tumour appearance
# ------------------------------------------------------------------------------------------------

# Content hashes (NIfTI: header + voxels, gunzipped; xlsx: every zip member; the rest: bytes) of cohorts written
# by the generator before the scene was split into pieces and mechanisms became objects (commit 2bda46b).
RECORDED = json.loads((Path(__file__).with_name("synthetic_hashes.json")).read_text())
RECORDED_COHORTS = {
    "default12": {"n_cases": 12, "seed": 0},
    "intrinsic12": {"n_cases": 12, "seed": 0, "disparity": "intrinsic"},
    "representation12": {"n_cases": 12, "seed": 0, "disparity": "representation"},
    "realistic2": {"n_cases": 2, "seed": 0, "preset": "realistic", "collections": ("ISPY1", "NACT")},
}


def _content_hashes(root: Path) -> dict[str, str]:
    import gzip
    import io
    import zipfile

    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name.endswith(".nii.gz"):
            data = gzip.decompress(data)  # the voxels and header, whatever zlib's version compresses them to
        elif p.suffix == ".xlsx":
            h = hashlib.sha256()
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for name in sorted(z.namelist()):
                    h.update(name.encode())
                    h.update(z.read(name))
            out[str(p.relative_to(root))] = h.hexdigest()[:16]
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()[:16]
    return out


@pytest.mark.parametrize("name", sorted(RECORDED_COHORTS))
def test_existing_cohorts_are_byte_identical_to_the_original_generator(name: str, tmp_path: Path) -> None:
    root = make_cohort(tmp_path / name, **RECORDED_COHORTS[name])
    got, want = _content_hashes(root), RECORDED[name]
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not changed, f"{len(changed)} files differ from the original generator's, e.g. {changed[:5]}"


def test_lookalike_plans_keep_the_patients_and_calm_the_hard_groups_bpe() -> None:
    base = plan_cohort(n_cases=1500, seed=3)
    look = plan_cohort(n_cases=1500, seed=3, disparity="lookalike")
    weak = plan_cohort(n_cases=1500, seed=3, disparity="lookalike_weak")
    cf = plan_cohort(n_cases=1500, seed=3, disparity="lookalike", counterfactual=True)
    hard = base["hard_subgroup"]
    own = ["disparity", "n_lesions", "counterfactual"]
    # the weak variant and the counterfactual have the same patients, BPE, foci and lesion counts
    pd.testing.assert_frame_equal(weak.drop(columns=own), look.drop(columns=own))
    pd.testing.assert_frame_equal(cf.drop(columns=own), look.drop(columns=own))
    assert (cf["n_lesions"] == look["n_lesions"]).all() and cf["counterfactual"].all() and not look["counterfactual"].any()
    # the rest are the default cohort's patients, unchanged
    pd.testing.assert_frame_equal(look.loc[~hard].drop(columns=own), base.loc[~hard].drop(columns=["disparity"]))
    # lesions only in the hard subgroup: 4 + Poisson(3)
    assert (look.loc[~hard, "n_lesions"] == 0).all() and (look.loc[hard, "n_lesions"] >= 4).all()
    assert 6.4 <= look.loc[hard, "n_lesions"].mean() <= 7.6
    # the hard group's BPE at the level of other dense premenopausal women (41-50), well below the default's
    dense_pre = (~hard) & base["density_true"].isin(["c", "d"]) & (base["menopause_true"] == "pre") & base["age"].between(41, 50)
    assert abs(look.loc[hard, "bpe_strength"].mean() - base.loc[dense_pre, "bpe_strength"].mean()) < 0.06
    assert base.loc[hard, "bpe_strength"].mean() - look.loc[hard, "bpe_strength"].mean() > 0.3
    with pytest.raises(ValueError, match="counterfactual applies to look-alike mechanisms"):
        plan_cohort(n_cases=5, disparity="intrinsic", counterfactual=True)


def test_lookalike_lesions_are_placed_in_parenchyma_clear_of_the_tumour() -> None:
    from divaware.synthetic import MECHANISMS, _Grid

    grid = _Grid((40, 40, 30), (2.5, 2.5, 3.0))
    fgt = np.zeros(grid.shape, np.float32)
    fgt[5:35, 5:35, 4:26] = 1.0  # a slab of parenchyma
    tum = np.zeros(grid.shape, np.float32)
    tum[16:24, 16:24, 12:18] = 1.0  # the tumour in its middle
    foci = np.zeros(grid.shape, np.float32)
    radii = []
    for seed in range(6):
        les = MECHANISMS["lookalike"].draw_lesions({"n_lesions": 7}, grid, fgt, tum, foci, np.random.default_rng(seed))
        labels = les["labels"]
        assert labels.max() == len(les["radii"]) >= 5  # most of the planned lesions fit
        assert not ((les["fraction"] > 0) & (tum > 0)).any()  # never overlapping the tumour
        for k in range(1, labels.max() + 1):
            centre = np.round(np.argwhere(labels == k).mean(axis=0)).astype(int)
            assert fgt[tuple(centre)] == 1.0  # centred in parenchyma
        drops = np.unique(les["drop"][les["fraction"] > 0])
        assert ((drops >= 0.5) & (drops <= 0.7)).all()
        radii += les["radii"]
    assert 4.0 <= min(radii) and max(radii) <= 9.0 and max(radii) - min(radii) > 3.0
    weak = MECHANISMS["lookalike_weak"].draw_lesions({"n_lesions": 7}, grid, fgt, tum, foci, np.random.default_rng(0))
    strong = MECHANISMS["lookalike"].draw_lesions({"n_lesions": 7}, grid, fgt, tum, foci, np.random.default_rng(0))
    assert (weak["labels"] == strong["labels"]).all()  # the dose control: same sites, weaker drop
    drops = np.unique(weak["drop"][weak["fraction"] > 0])
    assert ((drops >= 0.3) & (drops <= 0.45)).all()


def test_lookalike_kinetics_match_the_tumour_until_phase_1_and_drop_by_phase_2() -> None:
    from divaware.synthetic import _kinetics

    plan = plan_cohort(n_cases=400, seed=0, disparity="lookalike")
    for index, (pid, case) in enumerate(plan[plan["hard_subgroup"]].iterrows()):
        c = {**case.to_dict(), "patient_id": pid}
        k = _kinetics(c, np.random.default_rng(index))
        t0, t1, t2 = c["acquisition_times"][:3]
        assert k["lesion"](t0) == k["tumour"](t0) == 0.0 and k["lesion"](t1) == k["tumour"](t1)
        for drop in (0.5, 0.7):
            kept = (k["lesion"](t2) - drop * k["lesion_loss"](t2)) / k["lesion"](t1)
            assert kept == pytest.approx(1 - drop)
        assert k["tumour"](t2) / k["tumour"](t1) >= 0.7  # tumours lose <= 30 %


def test_lookalike_cohort_counterfactual_and_dose_control_files(tmp_path: Path) -> None:
    from divaware.synthetic import LESION_DIR

    base = make_cohort(tmp_path / "default", n_cases=8, seed=4)
    look = make_cohort(tmp_path / "look", n_cases=8, seed=4, disparity="lookalike")
    cf = make_cohort(tmp_path / "cf", n_cases=8, seed=4, disparity="lookalike", counterfactual=True)
    weak = make_cohort(tmp_path / "weak", n_cases=8, seed=4, disparity="lookalike_weak")
    truth, truth_cf = read_truth(look), read_truth(cf)
    hard = list(truth.index[truth["hard_subgroup"]])
    rest = list(truth.index[~truth["hard_subgroup"]])
    assert len(hard) == 2 and len(rest) == 6
    hb, hl, hc = _hashes(base), _hashes(look), _hashes(cf)
    # the rest's images are the default cohort's; the counterfactual differs from the lesion cohort in the hard
    # cases only; masks are never touched
    for p in rest:
        files = [k for k in hb if k.startswith(f"images/{p}/") or k.endswith(f"/{p}.nii.gz")]
        assert files and all(hl[k] == hb[k] == hc[k] for k in files), p
        assert not (look / LESION_DIR / f"{p}.nii.gz").exists()
    assert (truth.loc[rest, "n_lesions"] == 0).all()
    assert (truth_cf["n_lesions"] == truth["n_lesions"]).all() and truth_cf["counterfactual"].all()
    for p in hard:
        low = p.lower()
        labels = _array(look / LESION_DIR / f"{p}.nii.gz")
        assert (labels == _array(cf / LESION_DIR / f"{p}.nii.gz")).all()
        n = int(truth.loc[p, "n_lesions"])
        assert n >= 4 and labels.max() == n and len(np.unique(labels)) == n + 1
        radii = [float(x) for x in truth.loc[p, "lesion_radii_mm"].split(";")]
        assert len(radii) == n and all(4.0 <= r <= 9.0 for r in radii)
        mask = _array(look / "segmentations" / "expert" / f"{p}.nii.gz") > 0
        assert hl[f"segmentations/expert/{p}.nii.gz"] == hc[f"segmentations/expert/{p}.nii.gz"]
        assert not (mask & (labels > 0)).any()
        # counterfactual: identical voxels outside the lesions (plus partial volume: one voxel in-plane, the
        # slice blur's reach across slices)
        lesion = labels > 0
        near = ndi.binary_dilation(lesion, structure=np.ones((3, 3, 7), bool))
        img = {root: [_array(root / "images" / p / f"{low}_{k:04d}.nii.gz").astype(float) for k in range(3)]
               for root in (look, cf, weak)}
        for k in range(3):
            differ = img[look][k] != img[cf][k]
            assert differ[lesion].mean() > 0.9 and not differ[~near].any()

        def kept(root: Path, region: np.ndarray, img: dict[Path, list[np.ndarray]] = img) -> float:
            ph = img[root]
            return float((ph[2][region] - ph[0][region]).mean() / (ph[1][region] - ph[0][region]).mean())

        core = ndi.binary_erosion(lesion)  # away from partial volume with the surrounding tissue
        # lesions keep 30-50 % of their phase-1 enhancement at phase 2 (weak: 55-70 %), tumours >= 70 %
        assert 0.25 <= kept(look, core) <= 0.55 and 0.5 <= kept(weak, core) <= 0.75 and kept(look, mask) >= 0.7
        # ... and look like the tumour before and at phase 1 (same signal, within the bias field's spread)
        for k in (0, 1):
            assert 0.75 <= img[look][k][core].mean() / img[look][k][mask].mean() <= 1.33


def test_hard_fraction_draws_more_distinct_hard_patients() -> None:
    plan = plan_cohort(n_cases=200, seed=1, hard_fraction=0.5, disparity="lookalike")
    assert len(plan) == 200 and plan.index.is_unique and plan["hard_subgroup"].sum() == 100
    assert (plan.loc[plan["hard_subgroup"], "n_lesions"] >= 4).all()
    assert set(plan["split"]) == {"train", "test"} and 0.15 <= (plan["split"] == "test").mean() <= 0.25
    assert plan.equals(plan_cohort(n_cases=200, seed=1, hard_fraction=0.5, disparity="lookalike"))
    with pytest.raises(ValueError, match="hard_fraction must be between 0 and 1"):
        plan_cohort(n_cases=20, hard_fraction=1.0)


@pytest.mark.parametrize("appearance", ["necrotic", "rim"])
def test_tumour_appearance_changes_the_hard_tumours_only(appearance: str, tmp_path: Path) -> None:
    base = make_cohort(tmp_path / "default", n_cases=8, seed=4)
    root = make_cohort(tmp_path / appearance, n_cases=8, seed=4, tumour_appearance=appearance)
    truth = read_truth(root)
    hard = truth.index[truth["hard_subgroup"]]
    assert (truth.loc[hard, "tumour_appearance"] == appearance).all()
    assert truth.loc[hard, "core_fraction"].between(0.25, 0.45).all()
    assert (truth.loc[~truth["hard_subgroup"], "core_fraction"] == 0).all()
    hb, ha = _hashes(base), _hashes(root)
    for p in truth.index:
        low = p.lower()
        assert ha[f"segmentations/expert/{p}.nii.gz"] == hb[f"segmentations/expert/{p}.nii.gz"]  # labels untouched
        same = ha[f"images/{p}/{low}_0001.nii.gz"] == hb[f"images/{p}/{low}_0001.nii.gz"]
        assert same == (p not in hard), p
    for p in hard:  # the tumour's core enhances less (necrotic: not at all), its rim as before
        mask = _array(root / "segmentations" / "expert" / f"{p}.nii.gz") > 0
        depth = ndi.distance_transform_edt(mask)
        core = depth >= np.quantile(depth[mask], 0.8)

        def enhancement(r: Path, p: str = p, core: np.ndarray = core) -> float:
            pre, post = (_array(r / "images" / p / f"{p.lower()}_{k:04d}.nii.gz").astype(float) for k in (0, 1))
            return float((post[core] - pre[core]).mean() / pre[core].mean())

        assert enhancement(root) < 0.5 * enhancement(base)


def test_cli_synth_counterfactual_and_hard_fraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "c"), "--n-cases", "10", "--disparity", "lookalike",
                 "--counterfactual", "--hard-fraction", "0.5"]) == 0
    assert "lookalike counterfactual disparity" in capsys.readouterr().out
    truth = read_truth(tmp_path / "c")
    assert truth["hard_subgroup"].sum() == 5 and truth["counterfactual"].all() and (truth["n_lesions"] >= 0).all()
    assert main(["synth", "--out", str(tmp_path / "n"), "--n-cases", "10", "--hard-fraction", "0.3",
                 "--tumour-appearance", "necrotic"]) == 0
    capsys.readouterr()
    truth = read_truth(tmp_path / "n")
    assert set(truth.loc[truth["hard_subgroup"], "tumour_appearance"]) == {"necrotic"} and truth["hard_subgroup"].sum() == 3
    assert main(["synth", "--out", str(tmp_path / "d"), "--n-cases", "3", "--disparity", "intrinsic",
                 "--counterfactual"]) == 2
    assert "counterfactual applies to look-alike mechanisms" in capsys.readouterr().err
