"""divaware audit / divaware weights: any model's predictions, no run folder, no torch on the audit path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from divaware import audit as A
from divaware import evaluate as ev
from divaware.cli import main
from divaware.cohort import load_cohort
from divaware.subgroups import attribute_table
from divaware.weighting import make_strategy

PLANTED = "breast_density=c"


def _members(root: Path, itemset: str = PLANTED) -> set[str]:
    meta = load_cohort(root, check_voxels=False).metadata
    name, value = itemset.split("=", 1)
    return set(meta.index[meta[name].astype(str) == value])


@pytest.fixture(scope="module")
def planted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Expert masks copied elsewhere (lower-case names), the density-c cases eroded by one voxel."""
    return A.demo_predictions(synthetic_root, tmp_path_factory.mktemp("model") / "preds", itemset=PLANTED)


@pytest.fixture(scope="module")
def planted_audit(synthetic_root: Path, planted: tuple[Path, list[str]],
                  tmp_path_factory: pytest.TempPathFactory) -> A.AuditResult:
    out = tmp_path_factory.mktemp("audits") / "all"
    return A.audit(synthetic_root, planted[0], split="all", out_dir=out, n_boot=100, n_permutations=10,
                   verbose=False)


def test_planted_failure_is_flagged(planted_audit: A.AuditResult, planted: tuple[Path, list[str]],
                                    synthetic_root: Path) -> None:
    eroded = set(planted[1])
    assert eroded == _members(synthetic_root) and len(eroded) >= 5
    pc = planted_audit.per_case
    assert (pc.loc[sorted(eroded), "dice"] < 0.9).all()
    assert (pc.drop(index=sorted(eroded))["dice"] == 1.0).all()
    flagged = planted_audit.flagged
    assert PLANTED in set(flagged["label"])
    # the most divergent flagged subgroup holds eroded cases only
    top = flagged.iloc[0]
    table = attribute_table(pc, ["age_group", "menopause", "breast_density"])
    inside = np.ones(len(table), bool)
    for item in top["items"]:
        name, value = item.split("=", 1)
        inside &= table[name].astype(str).to_numpy() == value
    assert set(table.index[inside]) <= eroded
    # the same test and false-discovery control as the divaware strategy
    defaults = A.analysis_defaults()
    assert defaults["fdr"] == make_strategy("divaware").fdr == planted_audit.settings["fdr"]
    assert (flagged["q"] <= defaults["fdr"]).all() and (flagged["divergence"] < 0).all()
    written = json.loads((planted_audit.out_dir / "audit.json").read_text())
    assert written["n_flagged"] == len(flagged) and PLANTED in written["flagged"]
    assert written["missing"] == [] and written["n_cases"] == len(pc)
    for name in ("per_case.csv", "per_group.csv", "challenge.json", "fairness.json", "divergent_itemsets.csv",
                 "null_check.csv"):
        assert (planted_audit.out_dir / name).is_file()
    figures = {p.name for p in (planted_audit.out_dir / "figures").iterdir()}
    assert {"group_dice_age_group.png", "heatmap.png", "divergent_itemsets.png", "hardest_cases.png"} <= figures
    # null check: row 0 is the real analysis and counts the same flags
    assert planted_audit.null.iloc[0]["fdr_flags"] == len(flagged)
    assert len(planted_audit.null) == 11


def test_scores_are_evaluates(planted_audit: A.AuditResult, planted: tuple[Path, list[str]],
                              synthetic_root: Path) -> None:
    cohort = load_cohort(synthetic_root)
    ids = list(planted_audit.per_case.index)
    expected = ev.score_cases(planted[0], cohort, ids)
    pd.testing.assert_frame_equal(planted_audit.per_case[expected.columns], expected)
    assert planted_audit.challenge["P"] == pytest.approx(
        0.5 * (expected["dice"].mean() + 1 - expected["norm_hd"].mean()))


def test_load_audit_round_trip(planted_audit: A.AuditResult) -> None:
    back = A.load_audit(planted_audit.out_dir)
    pd.testing.assert_frame_equal(back.per_case, planted_audit.per_case, check_dtype=False)
    assert list(back.flagged["label"]) == list(planted_audit.flagged["label"])
    assert back.challenge["ranking"] == pytest.approx(planted_audit.challenge["ranking"])


def test_missing_prediction_counts_as_empty_and_strays_are_listed(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                                  tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    shutil.copytree(planted[0], preds)
    test_ids = load_cohort(synthetic_root, check_voxels=False).ids("test")
    gone = test_ids[0]
    (preds / f"{gone.lower()}.nii.gz").unlink()
    shutil.copyfile(preds / f"{test_ids[1].lower()}.nii.gz", preds / "stranger_007.nii.gz")
    (preds / "plans.json").write_text("{}")  # nnU-Net writes these beside its predictions
    with pytest.warns(UserWarning, match=gone):
        result = A.audit(synthetic_root, preds, split="test", out_dir=tmp_path / "out", n_boot=50,
                         n_permutations=2, figures=False, verbose=False)
    row = result.per_case.loc[gone]
    assert row["missing"] and row["prediction_file"] == ""
    assert row["dice"] == 0.0 and row["norm_hd"] == 1.0 and np.isinf(row["hd95"])
    assert result.settings["missing"] == [gone]
    assert result.settings["unmatched"] == ["stranger_007.nii.gz"]
    assert list(result.per_case.index) == test_ids
    assert result.challenge["mean_norm_hd"] == pytest.approx(result.per_case["norm_hd"].mean())
    assert result.prediction_file(gone) is None and result.prediction_file(test_ids[1]).is_file()
    # the figures and the explorer cope with a case that has no prediction (the viewer shows the truth alone)
    written = A.write_figures(result, load_cohort(synthetic_root), n_hardest=len(test_ids))
    assert all(p.is_file() for p in written)
    inputs = A.explorer_inputs(result, load_cohort(synthetic_root))
    assert not inputs["predictions"](gone).is_file()


def test_organiser_and_upper_case_names_and_submission_layout(synthetic_root: Path, tmp_path: Path) -> None:
    lower, _ = A.demo_predictions(synthetic_root, tmp_path / "lower", split="test", itemset=PLANTED)
    A.demo_predictions(synthetic_root, tmp_path / "submission" / "pred_segmentations", split="test",
                       itemset=PLANTED, upper_case=True)
    a = A.audit(synthetic_root, lower, out_dir=tmp_path / "a", n_boot=20, n_permutations=1, figures=False,
                verbose=False)
    b = A.audit(synthetic_root, tmp_path / "submission", out_dir=tmp_path / "b", n_boot=20, n_permutations=1,
                figures=False, verbose=False)
    assert b.predictions.name == "pred_segmentations"
    pd.testing.assert_series_equal(a.per_case["dice"], b.per_case["dice"])
    assert (b.per_case["prediction_file"] == b.per_case.index + ".nii.gz").all() and not b.settings["missing"]
    assert (a.per_case["prediction_file"] == a.per_case.index.str.lower() + ".nii.gz").all()


def test_ids_file_split(synthetic_root: Path, planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    ids = load_cohort(synthetic_root, check_voxels=False).ids("train")[:12]
    (tmp_path / "val.txt").write_text("# my held-out cases\n" + "\n".join(i.lower() for i in ids) + "\n")
    result = A.audit(synthetic_root, planted[0], split=str(tmp_path / "val.txt"), out_dir=tmp_path / "o",
                     n_boot=20, n_permutations=1, figures=False, verbose=False)
    assert list(result.per_case.index) == ids and result.split == "val"
    (tmp_path / "bad.txt").write_text("DUKE_999999\n")
    with pytest.raises(ValueError, match="DUKE_999999"):
        A.audit(synthetic_root, planted[0], split=str(tmp_path / "bad.txt"), out_dir=tmp_path / "o2")


def _one_file(planted: Path, dest: Path, pid: str, array: np.ndarray | None = None,
              affine: np.ndarray | None = None, name: str | None = None) -> Path:
    shutil.copytree(planted, dest)
    src = nib.load(str(dest / f"{pid.lower()}.nii.gz"))
    arr = np.asanyarray(src.dataobj) if array is None else array
    path = dest / (name or f"{pid.lower()}.nii.gz")
    nib.save(nib.Nifti1Image(arr, src.affine if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("defect", ["shape", "affine", "labels", "duplicate"])
def test_bad_prediction_is_one_error_naming_the_file(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                     tmp_path: Path, defect: str) -> None:
    pid = load_cohort(synthetic_root, check_voxels=False).ids("test")[0]
    ref = nib.load(str(planted[0] / f"{pid.lower()}.nii.gz"))
    mask = np.asanyarray(ref.dataobj)
    if defect == "shape":
        path = _one_file(planted[0], tmp_path / "p", pid, array=mask[:-2])
        match = "shape"
    elif defect == "affine":
        flipped = ref.affine.copy()
        flipped[0, 0] *= -1
        path = _one_file(planted[0], tmp_path / "p", pid, affine=flipped)
        match = "affine"
    elif defect == "labels":
        path = _one_file(planted[0], tmp_path / "p", pid, array=(mask * 255).astype(np.uint8))
        match = "255"
    else:
        path = _one_file(planted[0], tmp_path / "p", pid, name=f"{pid.upper()}.nii.gz")
        match = "both a prediction"
    with pytest.raises(ValueError, match=match) as info:
        A.audit(synthetic_root, tmp_path / "p", out_dir=tmp_path / "out", verbose=False)
    assert path.name in str(info.value) and "\n" not in str(info.value)
    # the CLI prints it as one line, exit code 2
    assert main(["audit", "--data", str(synthetic_root), "--predictions", str(tmp_path / "p"),
                 "--out", str(tmp_path / "out2"), "--no-figures"]) == 2


def test_refuses_to_write_into_inputs(synthetic_root: Path, planted: tuple[Path, list[str]]) -> None:
    for inside in (planted[0] / "report", synthetic_root / "report"):
        with pytest.raises(ValueError, match="read-only"):
            A.audit(synthetic_root, planted[0], out_dir=inside, verbose=False)
        assert not inside.exists()


def test_audit_path_never_imports_torch(synthetic_root: Path, planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import divaware.audit\n"
        "after_import = sorted(m for m in ('torch', 'monai') if m in sys.modules)\n"
        "from divaware.cli import main\n"
        f"rc = main(['audit', '--data', {str(synthetic_root)!r}, '--predictions', {str(planted[0])!r},"
        f" '--split', 'all', '--out', {str(tmp_path / 'cli')!r}, '--n-boot', '20', '--permutations', '2'])\n"
        "print(json.dumps({'rc': rc, 'after_import': after_import,"
        " 'after_audit': sorted(m for m in ('torch', 'monai') if m in sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "after_import": [], "after_audit": []}
    written = json.loads((tmp_path / "cli" / "audit.json").read_text())
    assert PLANTED in written["flagged"]


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_audit(synthetic_root: Path, planted: tuple[Path, list[str]],
                tmp_path_factory: pytest.TempPathFactory) -> A.AuditResult:
    """An audit of the training split (held-out predictions of training cases), which may drive weights."""
    return A.audit(synthetic_root, planted[0], split="train", out_dir=tmp_path_factory.mktemp("audits") / "train",
                   n_boot=20, n_permutations=2, figures=False, verbose=False)


def test_weights_csv_equals_divaware_refresh(synthetic_root: Path, train_audit: A.AuditResult,
                                             planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    import divaware.train as T

    assert PLANTED in set(train_audit.flagged["label"])
    out = tmp_path / "w" / "weights.csv"
    assert main(["weights", "--audit", str(train_audit.out_dir), "--out", str(out)]) == 0
    csv = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")

    # the strategy exactly as training builds it from a default config, refreshed on the audit's scores
    cohort = load_cohort(synthetic_root)
    config = T.TrainConfig(data_root=str(synthetic_root))
    strategy = make_strategy(config.strategy, **T._strategy_kwargs(config, cohort.ids("test")))
    train_ids = cohort.ids("train")
    strategy.fit(cohort.metadata.loc[train_ids])
    scores = train_audit.per_case["dice"]
    expected = strategy.refresh(config.warmup_epochs, cohort.metadata.loc[scores.index], scores)
    assert sorted(csv.index) == sorted(train_ids)
    np.testing.assert_array_equal(csv.loc[expected.index, "weight"].to_numpy(), expected.to_numpy())
    assert csv["weight"].mean() == pytest.approx(1.0)
    assert csv["weight"].min() >= strategy.w_min and csv["weight"].max() <= strategy.w_max
    hit = sorted(set(train_ids) & set(planted[1]))
    assert (csv.loc[hit, "weight"] > 1).all()
    flagged = csv["worst_itemset"].fillna("") != ""
    assert (csv.loc[flagged, "weight"] >= 1).all() and csv.loc[~flagged, "weight"].nunique() == 1
    assert (csv.loc[~flagged, "weight"] < 1).all() and not set(hit) - set(csv.index[flagged])
    # the Python function gives the same table, and strategy parameters pass through
    table = A.audit_weights(train_audit.out_dir, tau=0.1, w_min=0.01, w_max=3.0)
    assert table["weight"].max() == pytest.approx(3.0) and table["weight"].mean() == pytest.approx(1.0)
    assert (table.loc[table["weight"] == table["weight"].max(), "clip"] == "w_max").all()


def test_preview_training_refresh_and_weights_cli_agree(synthetic_root: Path, train_audit: A.AuditResult,
                                                        tmp_path: Path) -> None:
    """Issue 27: notebook 02's preview (3 attributes) and training's refresh (with the derived dense) disagreed.
    The preview function with notebook 02's default parameters, a default training refresh and `divaware
    weights` give the same weights on the same scores (1e-12)."""
    import ast

    import nbformat

    import divaware.train as T
    from divaware.subgroups import method_attributes
    from divaware.weighting import refresh_weights

    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / "02_subgroup_divergence.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    defaults = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(params.source).body
                if isinstance(n, ast.AnnAssign)}
    cohort = load_cohort(synthetic_root)
    train_meta = cohort.metadata.loc[cohort.ids("train")]
    scores = train_audit.per_case["dice"]
    val_meta = cohort.metadata.loc[scores.index]
    # notebook 02's preview cell: refresh_weights on method_attributes(attributes), its min_support and max_length
    preview = refresh_weights(train_meta, val_meta, scores, attributes=list(method_attributes(defaults["attributes"])),
                              min_support=defaults["min_support"], max_length=defaults["max_length"])
    config = T.TrainConfig(data_root=str(synthetic_root))
    strategy = make_strategy(config.strategy, **T._strategy_kwargs(config, cohort.ids("test")))
    training = strategy.fit(train_meta).refresh(config.warmup_epochs, val_meta, scores)
    out = tmp_path / "weights.csv"
    assert main(["weights", "--audit", str(train_audit.out_dir), "--out", str(out)]) == 0
    cli = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")["weight"]
    assert preview["weight"].nunique() > 1  # something is flagged, so the comparison means something
    np.testing.assert_allclose(preview["weight"].to_numpy(), training.loc[preview.index].to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cli.loc[preview.index].to_numpy(), training.loc[preview.index].to_numpy(), rtol=0,
                               atol=1e-12)


def test_weights_refuse_a_test_split_audit(planted_audit: A.AuditResult, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test-split"):
        A.audit_weights(planted_audit.out_dir)


def test_weights_never_written_into_the_data(train_audit: A.AuditResult, synthetic_root: Path) -> None:
    assert main(["weights", "--audit", str(train_audit.out_dir), "--out", str(synthetic_root / "w.csv")]) == 2
    assert not (synthetic_root / "w.csv").exists()


def test_run_weights_equal_the_runs_own_refresh(synthetic_root: Path, tmp_path: Path) -> None:
    from test_train import tiny_config

    import divaware.train as T

    run = T.train(tiny_config(synthetic_root, tmp_path / "run", epochs=2))
    history = pd.read_csv(run / "weights_history.csv", dtype={"patient_id": str})
    first = history[history["refresh"] == 1].set_index("patient_id")
    assert first["weight"].nunique() > 1  # the refresh moved the weights, so the comparison means something
    out = tmp_path / "weights.csv"
    assert main(["weights", "--run", str(run), "--epoch", str(int(first["epoch"].iloc[0])), "--out", str(out)]) == 0
    csv = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
    np.testing.assert_allclose(csv.loc[first.index, "weight"].to_numpy(), first["weight"].to_numpy(),
                               rtol=1e-12, atol=0)
    assert (csv.loc[first.index, "worst_itemset"].fillna("") == first["worst_itemset"].fillna("")).all()


def test_weights_follow_the_audits_attributes_and_refuse_a_silent_set(synthetic_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 27: an audit on manufacturer gave every case weight 1.0 and printed "mean nan"."""
    meta = load_cohort(synthetic_root, check_voxels=False).metadata
    train = meta[meta["split"] == "train"] if "split" in meta.columns else meta
    vendor = train["manufacturer"].astype(str).value_counts().index[0]
    preds, eroded = A.demo_predictions(synthetic_root, tmp_path / "preds", itemset=f"manufacturer={vendor}", erode=2)
    result = A.audit(synthetic_root, preds, split="train", out_dir=tmp_path / "audit", n_boot=20, n_permutations=2,
                     figures=False, verbose=False, attributes=("manufacturer", "age_group"))
    assert f"manufacturer={vendor}" in set(result.flagged["label"])
    out = tmp_path / "w.csv"
    assert main(["weights", "--audit", str(result.out_dir), "--out", str(out),
                 "--attributes", "manufacturer", "age_group"]) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed and "flagged subgroup" in printed
    csv = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
    hit = sorted(set(csv.index) & set(eroded))
    assert hit and (csv.loc[hit, "weight"] > 1).all()
    assert csv["weight"].mean() == pytest.approx(1.0)
    # the default is the audit's own attributes: the same table
    default = A.audit_weights(result.out_dir)
    np.testing.assert_array_equal(default.loc[csv.index, "weight"].to_numpy(), csv["weight"].to_numpy())
    # attributes that cannot see the flagged vendor would silently give every case weight 1: refused
    assert main(["weights", "--audit", str(result.out_dir), "--out", str(tmp_path / "w2.csv"),
                 "--attributes", "menopause"]) == 2
    assert "flags no subgroup" in capsys.readouterr().err and not (tmp_path / "w2.csv").exists()


# --------------------------------------------------------------------------------------------------
# the explorer adapter
# --------------------------------------------------------------------------------------------------


def test_explorer_inputs_drive_the_subgroup_explorer(planted_audit: A.AuditResult, synthetic_root: Path) -> None:
    from divaware.widgets import subgroup_explorer

    cohort = load_cohort(synthetic_root)
    inputs = A.explorer_inputs(planted_audit, cohort)
    static = subgroup_explorer(**inputs, attributes=["age_group", "menopause", "breast_density"],
                               min_support=0.05, interactive=False)
    # the explorer's readable table (issue 21): q-sorted, labels as strings
    assert static.iloc[0]["significant"] and static.iloc[0]["Δ"] < -0.2 and PLANTED in static.iloc[0]["itemset"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        box = subgroup_explorer(**inputs, attributes=["age_group", "menopause", "breast_density"],
                                min_support=0.05, interactive=True)
    members = box.state["members"]
    assert members and set(members) <= set(_members(synthetic_root))
    pid = members[0]
    assert inputs["predictions"](pid) == planted_audit.predictions / f"{pid.lower()}.nii.gz"


# --------------------------------------------------------------------------------------------------
# what an audit found, named: unmatched files, naming mismatches, folder contents, probability maps
# --------------------------------------------------------------------------------------------------

FAST = {"n_boot": 20, "n_permutations": 2, "figures": False, "verbose": False}


def test_unmatched_files_are_listed_in_the_summary(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                   tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    shutil.copytree(planted[0], preds)
    shutil.copyfile(next(preds.glob("*.nii.gz")), preds / "stranger_007.nii.gz")
    with pytest.warns(UserWarning, match="1 prediction file.* match no case of the cohort.*stranger_007.nii.gz"):
        result = A.audit(synthetic_root, preds, out_dir=tmp_path / "out", **FAST)
    assert "1 prediction file(s) match no case of the cohort (not scored): stranger_007.nii.gz" in result.summary()


def test_many_missing_cases_beside_unmatched_files_is_a_naming_error(synthetic_root: Path,
                                                                     planted: tuple[Path, list[str]],
                                                                     tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    shutil.copytree(planted[0], preds)
    test_ids = load_cohort(synthetic_root, check_voxels=False).ids("test")
    for pid in test_ids[: len(test_ids) // 2]:  # half the test predictions under another name
        (preds / f"{pid.lower()}.nii.gz").rename(preds / f"seg_{pid.lower()}.nii.gz")
    with pytest.raises(ValueError, match="match no case of the cohort") as info:
        A.audit(synthetic_root, preds, out_dir=tmp_path / "out", **FAST)
    text = str(info.value)
    assert f"seg_{test_ids[0].lower()}.nii.gz ~ {test_ids[0]}" in text and "<patient_id>.nii.gz" in text
    assert f"{len(test_ids) // 2} of {len(test_ids)} cases have no prediction" in text


def test_no_prediction_error_says_what_the_folder_holds(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                        tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    preds.mkdir()
    ids = load_cohort(synthetic_root, check_voxels=False).ids("test")
    np.save(preds / f"{ids[0]}.npy", np.zeros(3))
    shutil.copyfile(planted[0] / f"{ids[1].lower()}.nii.gz", preds / f"{ids[1]}.NII.GZ")
    shutil.copyfile(planted[0] / f"{ids[2].lower()}.nii.gz", preds / f"{ids[2]}_0000.nii.gz")
    (preds / "fold_0").mkdir()
    with pytest.raises(ValueError, match="holds no prediction") as info:
        A.audit(synthetic_root, preds, out_dir=tmp_path / "out", **FAST)
    text = str(info.value)
    for words in (f"{ids[0]}.npy", ".NII.GZ file(s)", "lower case .nii.gz", "_0000 input", "nnU-Net",
                  "fold_0/", "pass the subfolder"):
        assert words in text, (words, text)


def test_probability_maps_get_the_threshold_hint_and_option(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                           tmp_path: Path) -> None:
    pid = load_cohort(synthetic_root, check_voxels=False).ids("test")[0]
    ref = nib.load(str(planted[0] / f"{pid.lower()}.nii.gz"))
    mask = np.asanyarray(ref.dataobj) > 0
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)  # (p > 0) would mark every voxel as tumour
    _one_file(planted[0], tmp_path / "p", pid, array=prob)
    with pytest.raises(ValueError, match=r"look like probabilities: pass --threshold 0\.5") as info:
        A.audit(synthetic_root, tmp_path / "p", out_dir=tmp_path / "out", **FAST)
    assert "(pred > 0)" not in str(info.value) and "(prob >= 0.5)" in str(info.value)
    result = A.audit(synthetic_root, tmp_path / "p", out_dir=tmp_path / "out", threshold=0.5, **FAST)
    binary = A.audit(synthetic_root, planted[0], out_dir=tmp_path / "ref", **FAST)
    assert result.per_case.loc[pid, "dice"] == binary.per_case.loc[pid, "dice"] > 0.5
    assert result.settings["threshold"] == 0.5


def test_hd95_mean_says_how_many_cases_it_covers(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                 tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    shutil.copytree(planted[0], preds)
    ids = load_cohort(synthetic_root, check_voxels=False).ids("test")
    (preds / f"{ids[0].lower()}.nii.gz").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = A.audit(synthetic_root, preds, out_dir=tmp_path / "out", **FAST)
    assert result.challenge["n_hd95_mm"] == len(ids) - 1
    assert f"(over the {len(ids) - 1} of {len(ids)} cases with a finite HD95)" in result.summary()


def test_a_new_audit_removes_the_previous_figures_and_checks_numbers_first(
        synthetic_root: Path, planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    A.audit(synthetic_root, planted[0], out_dir=out, n_boot=20, n_permutations=2, verbose=False)
    assert (out / "figures" / "hardest_cases.png").is_file()
    (out / "figures" / "my_notes.png").write_bytes(b"not ours")
    A.audit(synthetic_root, planted[0], out_dir=out, **FAST)  # --no-figures
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["my_notes.png"]
    for kwargs, words in (({"fdr": 2.0}, "fdr = 2.0"), ({"n_boot": 0}, "n_boot = 0"),
                          ({"min_support": 0.0}, "min_support = 0.0"), ({"threshold": 1.5}, "threshold = 1.5")):
        with pytest.raises(ValueError, match=words):
            A.audit(synthetic_root, planted[0], out_dir=tmp_path / "never", **{**FAST, **kwargs})
        assert not (tmp_path / "never").exists()  # refused before any case was read or anything written


def test_acquisition_attributes_with_one_flag(synthetic_root: Path, planted: tuple[Path, list[str]],
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert A.expand_attributes(["+acquisition"]) == (*ev.DEFAULT_ATTRIBUTES, *A.ACQUISITION)
    assert A.expand_attributes(["acquisition"]) == A.ACQUISITION
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "+acquisition" in help_text and "dataset manufacturer field_strength" in help_text
    result = A.audit(synthetic_root, planted[0], out_dir=tmp_path / "out", attributes=["+acquisition"], **FAST)
    assert set(result.per_group["attribute"]) == {*ev.DEFAULT_ATTRIBUTES, *A.ACQUISITION}


def test_ids_file_with_a_byte_order_mark(synthetic_root: Path, tmp_path: Path) -> None:
    ids = load_cohort(synthetic_root, check_voxels=False).ids("train")[:3]
    path = tmp_path / "ids.txt"
    path.write_bytes(("\n".join(ids) + "\n").encode("utf-8-sig"))
    assert A.read_ids(path) == ids


def test_console_warnings_are_one_readable_line(synthetic_root: Path, planted: tuple[Path, list[str]],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    preds = tmp_path / "preds"
    shutil.copytree(planted[0], preds)
    gone = load_cohort(synthetic_root, check_voxels=False).ids("test")[0]
    (preds / f"{gone.lower()}.nii.gz").unlink()
    monkeypatch.setattr(sys, "argv", ["divaware", "audit", "--data", str(synthetic_root), "--predictions",
                                      str(preds), "--out", str(tmp_path / "out"), "--no-figures", "--n-boot", "20",
                                      "--permutations", "2"])
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main() == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert any(line.startswith("divaware audit: warning: 1 of ") and gone in line for line in err), err
    assert not any("UserWarning" in line or ".py:" in line for line in err), err
