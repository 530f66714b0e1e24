"""Evaluation of runs: numbers against hand-computed metrics on fake predictions, the written layout, the
data folder left untouched, prediction reuse, compare/collect, and the CLI on a tiny trained run."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from divaware import evaluate as E
from divaware import metrics as M

ATTRS = ("age_group", "menopause", "breast_density", "dataset")
KINDS = ("exact", "shift", "empty", "extra")
REPORT_FILES = ("per_case.csv", "per_group.csv", "challenge.json", "fairness.json", "divergent_itemsets.csv",
                "evaluation.json")


# --------------------------------------------------------------------------------------------------
# fixtures and independent reference computations
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(synthetic_root):
    """The shared tiny synthetic cohort (anisotropic spacing, all four collections) and its loaded form."""
    from divaware.cohort import load_cohort

    root = synthetic_root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cohort = load_cohort(root)
    return root, cohort


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face-neighbour inside the image (outside counts as foreground)."""
    padded = np.pad(mask, 1, constant_values=True)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    touching = np.zeros_like(mask)
    for ax in range(mask.ndim):
        for step in (-1, 1):
            touching |= ~np.roll(padded, step, axis=ax)[inner]
    return mask & touching


def brute_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    sp = np.argwhere(brute_surface(pred)) * np.asarray(spacing, float)
    st = np.argwhere(brute_surface(truth)) * np.asarray(spacing, float)
    d = cdist(sp, st)
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


def fake_prediction(truth: np.ndarray, kind: str) -> np.ndarray:
    if kind == "exact":
        return truth.copy()
    if kind == "empty":
        return np.zeros_like(truth)
    if kind == "shift":  # 2 voxels along axis 0, zero-filled
        out = np.zeros_like(truth)
        out[2:] = truth[:-2]
        return out
    if kind == "extra":  # a false-positive cube far from the tumour
        out = truth.copy()
        assert not truth[1:5, 1:5, 1:5].any()
        out[1:5, 1:5, 1:5] = True
        return out
    raise AssertionError(kind)


def write_fake_predictions(cohort, ids, folder: Path, kinds=KINDS) -> pd.DataFrame:
    """Write `<id>.nii.gz` for each case and return the hand-computed per-case metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for i, pid in enumerate(ids):
        img = nib.load(str(cohort.cases[pid].mask_path))
        truth = np.asarray(img.dataobj) > 0
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        kind = kinds[i % len(kinds)]
        pred = fake_prediction(truth, kind)
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), img.affine), str(folder / f"{pid}.nii.gz"))
        n_p, n_t, inter = int(pred.sum()), int(truth.sum()), int((pred & truth).sum())
        voxel_ml = float(np.prod(zooms)) / 1000.0
        if kind == "empty":
            hd, hd_mm, nhd = math.inf, math.nan, 1.0
        else:
            hd, hd_mm = brute_hd95(pred, truth, (1, 1, 1)), brute_hd95(pred, truth, zooms)
            nhd = hd / 150.0
        rows[pid] = {"kind": kind, "dice": 2 * inter / (n_p + n_t), "hd95": hd, "hd95_mm": hd_mm,
                     "norm_hd": nhd, "pred_volume_ml": n_p * voxel_ml, "true_volume_ml": n_t * voxel_ml}
    exp = pd.DataFrame.from_dict(rows, orient="index")
    exp.index.name = "patient_id"
    return exp.join(cohort.metadata[list(ATTRS)])


def hand_f(exp: pd.DataFrame, column: str, keep) -> float:
    sel = exp[exp[column].map(keep)]
    d = sel.groupby(column)["dice"].mean()
    h = sel.groupby(column)["norm_hd"].mean()
    return 1 - 0.5 * ((d.max() - d.min()) + (h.max() - h.min()))


# --------------------------------------------------------------------------------------------------
# fake predictions: exact numbers, layout, data untouched
# --------------------------------------------------------------------------------------------------


def test_evaluation_of_fake_predictions_matches_hand_computed_metrics(data, tmp_path):
    root, cohort = data
    ids = cohort.ids(None)
    exp = write_fake_predictions(cohort, ids, tmp_path / "preds")
    assert set(exp["kind"]) == set(KINDS)
    before = snapshot(root)
    run = tmp_path / "runs" / "fake"

    res = E.evaluate(run, root, split="all", predictions=tmp_path / "preds", n_boot=200, verbose=False)

    # -- per case: hand-computed Dice / HD95 (voxels and mm, brute force) / NormHD / volumes
    pc = res.per_case
    assert list(pc.index) == ids and pc.index.name == "patient_id"
    for col in M.PER_CASE_COLUMNS:
        np.testing.assert_allclose(pc[col].to_numpy(float), exp[col].to_numpy(float), rtol=1e-9, atol=1e-12,
                                   err_msg=col)
    assert (pc.loc[exp["kind"] == "exact", "dice"] == 1).all()
    assert (pc.loc[exp["kind"] == "empty", "norm_hd"] == 1).all()
    for a in ATTRS:  # attributes carried per case, so notebooks need no join
        assert pc[a].tolist() == cohort.metadata.loc[ids, a].tolist()

    # -- the challenge score, by hand
    p = 0.5 * (exp["dice"].mean() + 1 - exp["norm_hd"].mean())
    f_age = hand_f(exp, "age_group", lambda v: v != "unknown")
    f_meno = hand_f(exp, "menopause", lambda v: True)  # unknown menopause is its own group
    f_dens = hand_f(exp, "breast_density", lambda v: v in ("a", "b", "c", "d"))
    f = (f_age + f_meno + f_dens) / 3
    ch = json.loads((res.out_dir / "challenge.json").read_text())
    for key, want in {"P": p, "F_age": f_age, "F_menopause": f_meno, "F_density": f_dens, "F": f,
                      "ranking": 0.5 * p + 0.5 * f, "mean_dice": exp["dice"].mean()}.items():
        assert ch[key] == pytest.approx(want, abs=1e-12), key
    assert ch["mean_hd95_mm"] == pytest.approx(exp["hd95_mm"].mean(), abs=1e-9)  # NaN (empty) left out
    assert ch["n_cases"] == len(ids)

    # -- per-group table and fairness figures (the challenge's groups: unknown menopause counts, other unknowns not)
    pg = pd.read_csv(res.out_dir / "per_group.csv", dtype={"group": str})
    assert list(dict.fromkeys(pg["attribute"])) == list(E.DEFAULT_ATTRIBUTES)
    for attr in E.DEFAULT_ATTRIBUTES:
        rows = pg[pg["attribute"] == attr].set_index("group")
        by = exp.groupby(attr)["dice"]
        assert rows["n"].to_dict() == by.size().to_dict()
        np.testing.assert_allclose(rows["mean"], by.mean().reindex(rows.index), atol=1e-12)
        assert ((rows["ci_low"] <= rows["mean"] + 1e-12) | rows["ci_low"].isna()).all()
    fair = json.loads((res.out_dir / "fairness.json").read_text())
    for attr in E.DEFAULT_ATTRIBUTES:
        counted = exp if attr == "menopause" else exp[exp[attr] != "unknown"]
        known = counted.groupby(attr)["dice"].mean()
        overall = exp["dice"].mean()
        assert fair[attr]["worst_group"] == pytest.approx(known.min(), abs=1e-12)
        assert fair[attr]["worst_group_label"] == known.idxmin()
        assert fair[attr]["gap"] == pytest.approx(known.max() - known.min(), abs=1e-12)
        assert fair[attr]["es"] == pytest.approx(overall / (1 + (known - overall).abs().sum()), abs=1e-12)
    worst = res.worst_group()
    assert worst["dice"] == pytest.approx(min(fair[a]["worst_group"] for a in fair), abs=1e-12)

    # -- divergent itemsets: single items agree with the group means
    div = pd.read_csv(res.out_dir / "divergent_itemsets.csv")
    assert list(div.columns) == ["label", "items", "length", "support", "count", "mean", "divergence", "ps", "ps_low",
                                 "ps_high", "z_mw", "p", "q", "flagged", *div.columns[14:]]  # the report's analysis
    assert {"root", "role", "explained_by"} <= set(div.columns)  # issue 27's finding columns, as in an audit
    common = exp["age_group"].value_counts().index[0]
    one = div[div["label"] == f"age_group={common}"].iloc[0]
    assert one["count"] == (exp["age_group"] == common).sum()
    assert one["mean"] == pytest.approx(exp.loc[exp["age_group"] == common, "dice"].mean(), abs=1e-12)

    # -- layout: one folder in the run, nothing else written; the data folder unchanged
    assert res.out_dir == run / "evaluation_all"
    assert sorted(p.name for p in run.iterdir()) == ["evaluation_all"]
    assert sorted(p.name for p in res.out_dir.iterdir()) == sorted(REPORT_FILES)
    assert snapshot(root) == before
    manifest = json.loads((res.out_dir / "evaluation.json").read_text())
    assert manifest["predictions"] == str((tmp_path / "preds").resolve()) and manifest["n_cases"] == len(ids)

    # -- reading back gives the same report
    back = E.load_evaluation(run, "all")
    pd.testing.assert_frame_equal(back.per_case, pc, check_dtype=False)
    assert back.challenge["ranking"] == pytest.approx(res.challenge["ranking"], abs=1e-15)
    assert back.divergent["items"].iloc[0] == res.divergent["items"].iloc[0]
    assert "ranking" in res.summary() and str(res.out_dir) in res.summary()


def test_undefined_scores_are_written_as_null(data, tmp_path):
    root, cohort = data
    meta = cohort.metadata
    ids = list(meta.index[meta["breast_density"] == "unknown"])
    assert ids, "the fixture cohort should have cases without breast density"
    write_fake_predictions(cohort, ids, tmp_path / "preds", kinds=("exact",))
    res = E.evaluate(tmp_path / "run", root, split=None, predictions=tmp_path / "preds",
                     patient_ids=ids, n_boot=0, verbose=False)
    text = (res.out_dir / "challenge.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    ch = json.loads(text)
    assert ch["F_density"] is None and ch["undefined"] == ["F_density"]
    assert ch["F"] == pytest.approx(np.mean([ch["F_age"], ch["F_menopause"]]))
    fair = json.loads((res.out_dir / "fairness.json").read_text())
    assert fair["breast_density"]["worst_group"] is None and fair["breast_density"]["n_groups"] == 0
    assert math.isnan(E.load_evaluation(tmp_path / "run", "all").challenge["F_density"])


def test_splits_and_checkpoints_get_their_own_folders(tmp_path):
    run = tmp_path / "r"
    assert E.evaluation_dir(run) == run / "evaluation_test"
    assert E.evaluation_dir(run, "train", "last") == run / "evaluation_train_last"
    assert E.evaluation_dir(run, None, tag="lcc") == run / "evaluation_all_lcc"
    with pytest.raises(ValueError, match="tag"):
        E.evaluation_dir(run, tag="../escape")


def test_shape_mismatch_names_the_case(data, tmp_path):
    root, cohort = data
    ids = cohort.ids("test")
    write_fake_predictions(cohort, ids, tmp_path / "preds", kinds=("exact",))
    bad = ids[1]
    img = nib.load(str(tmp_path / "preds" / f"{bad}.nii.gz"))
    cropped = np.asarray(img.dataobj)[:, :, :-1]
    nib.save(nib.Nifti1Image(cropped, img.affine), str(tmp_path / "preds" / f"{bad}.nii.gz"))
    with pytest.raises(ValueError, match=rf"case {bad}: .*shape \(48, 48, 31\).*\(48, 48, 32\)"):
        E.evaluate(tmp_path / "run", root, predictions=tmp_path / "preds", n_boot=0, verbose=False)
    assert not (tmp_path / "run" / "evaluation_test" / "per_case.csv").exists()


def test_missing_prediction_and_bad_arguments_are_named(data, tmp_path):
    root, cohort = data
    ids = cohort.ids("test")
    write_fake_predictions(cohort, ids, tmp_path / "preds", kinds=("exact",))
    (tmp_path / "preds" / f"{ids[0]}.nii.gz").unlink()
    with pytest.raises(ValueError, match=ids[0]):
        E.evaluate(tmp_path / "run", root, predictions=tmp_path / "preds", n_boot=0, verbose=False)
    with pytest.raises(ValueError, match="no config.yaml"):
        E.evaluate(tmp_path / "run", root, verbose=False)
    with pytest.raises(ValueError, match="postprocess"):
        E.evaluate(tmp_path / "run", root, predictions=tmp_path / "preds", postprocess=["largest_component"])
    with pytest.raises(ValueError, match="inside the data folder"):
        E.evaluate(root / "runs" / "x", root, predictions=tmp_path / "preds", verbose=False)
    assert not (root / "runs").exists()


def test_prediction_file_names_match_ignoring_case(data, tmp_path):
    """The organisers' automatic segmentations are named in lower case (duke_001.nii.gz)."""
    root, cohort = data
    res = E.evaluate(tmp_path / "auto", root, predictions=root / "segmentations" / "automatic", n_boot=0,
                     verbose=False)
    assert list(res.per_case.index) == cohort.ids("test")
    assert res.per_case["dice"].between(0, 1).all()


# --------------------------------------------------------------------------------------------------
# compare and collect
# --------------------------------------------------------------------------------------------------


def make_fake_run(cohort, root, run: Path, strategy: str, seed: int, kinds) -> E.EvaluationResult:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"# a fake run\nstrategy: {strategy}\nseed: {seed}\ndata_root: {root}\n")
    write_fake_predictions(cohort, cohort.ids("test"), run / "fake_preds", kinds=kinds)
    return E.evaluate(run, None, predictions=run / "fake_preds", n_boot=50, verbose=False)


def test_compare_and_collect_two_runs(data, tmp_path):
    root, cohort = data
    runs = tmp_path / "runs"
    a = make_fake_run(cohort, root, runs / "erm_seed0", "erm", 0, ("exact", "empty"))
    b = make_fake_run(cohort, root, runs / "sweep" / "divaware_seed1", "divaware", 1, ("exact", "exact", "shift"))
    (runs / "not_evaluated").mkdir()
    (runs / "not_evaluated" / "config.yaml").write_text("strategy: erm\nseed: 2\n")

    with pytest.warns(UserWarning, match="not_evaluated"):
        table = E.collect(runs)
    assert table["run"].tolist() == ["erm_seed0", "sweep/divaware_seed1"]
    assert list(table.columns[: len(E.COLLECT_COLUMNS)]) == list(E.COLLECT_COLUMNS)
    for (_, row), res, method, seed in zip(table.iterrows(), (a, b), ("erm", "divaware"), (0, 1), strict=True):
        assert (row["method"], row["seed"], row["n_cases"]) == (method, seed, len(cohort.ids("test")))
        for key in ("P", "F", "ranking", "F_age", "mean_dice"):
            assert row[key] == pytest.approx(res.challenge[key], abs=1e-12)
        assert row["mean_dice"] == pytest.approx(res.per_case["dice"].mean(), abs=1e-12)
        fair = res.fairness
        assert row["worst_group_dice"] == pytest.approx(min(f["worst_group"] for f in fair.values()), abs=1e-12)
        assert row["gap"] == pytest.approx(max(f["gap"] for f in fair.values()), abs=1e-12)
        assert row["es_dice"] == pytest.approx(min(f["es"] for f in fair.values()), abs=1e-12)
        assert row["gap_age_group"] == pytest.approx(fair["age_group"]["gap"], abs=1e-12)
    assert table.loc[1, "mean_dice"] > table.loc[0, "mean_dice"]

    cmp = E.compare(runs / "erm_seed0", runs / "sweep" / "divaware_seed1", by="menopause", n_boot=100,
                    out_dir=tmp_path / "cmp")
    diff = b.per_case["dice"] - a.per_case["dice"]
    assert cmp.labels == ("erm_seed0", "divaware_seed1")
    assert cmp.overall["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)
    assert cmp.overall["n_better"] == int((diff > 0).sum()) and cmp.overall["n_worse"] == int((diff < 0).sum())
    by_meno = diff.groupby(a.per_case["menopause"]).mean()
    got = cmp.per_group.set_index("group")["mean_diff"]
    np.testing.assert_allclose(got.to_numpy(), by_meno.reindex(got.index).to_numpy(), atol=1e-12)
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "comparison.json", "comparison_fairness.csv", "comparison_per_case.csv", "comparison_per_group.csv"]
    with pytest.raises(ValueError, match="no complete evaluation"):
        E.compare(runs / "erm_seed0", runs / "not_evaluated")


# --------------------------------------------------------------------------------------------------
# predicting: reuse of up-to-date predictions, invalidation
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_predict(monkeypatch, data):
    """Replace predict() by one that writes the truth masks and records which cases it was asked for."""
    import divaware.predict as P

    root, cohort = data
    calls: list[list[str]] = []

    @functools.wraps(P.predict)
    def predict(run_dir, data_root, split="test", out_dir=None, checkpoint="best", patient_ids=None, **kw):
        calls.append(list(patient_ids))
        folder = Path(out_dir) / "pred_segmentations"
        folder.mkdir(parents=True, exist_ok=True)
        write_fake_predictions(cohort, patient_ids, folder, kinds=("exact",))
        return Path(out_dir)

    monkeypatch.setattr(P, "predict", predict)
    return calls


def test_predicts_only_what_is_missing_or_stale(data, tmp_path, fake_predict):
    root, cohort = data
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"strategy: erm\nseed: 0\ndata_root: {root}\n")
    (run / "best.pt").write_bytes(b"weights v1")
    ids = cohort.ids("test")

    res = E.evaluate(run, n_boot=0, verbose=False)  # data root from config.yaml
    assert fake_predict == [ids]
    assert res.predictions == run / "evaluation_test" / "pred_segmentations"
    assert (res.per_case["dice"] == 1).all()
    record = json.loads((run / "evaluation_test" / "predictions.json").read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(b"weights v1").hexdigest()

    E.evaluate(run, root, n_boot=0, verbose=False, device="cpu")  # up to date (device is operational)
    assert len(fake_predict) == 1
    (res.predictions / f"{ids[2]}.nii.gz").unlink()  # e.g. an interrupted evaluation
    E.evaluate(run, root, n_boot=0, verbose=False)
    assert fake_predict[-1] == [ids[2]]

    (run / "best.pt").write_bytes(b"weights v2")  # the run was trained further: predictions are stale
    with pytest.warns(UserWarning, match="checkpoint_sha256"):
        E.evaluate(run, root, n_boot=0, verbose=False)
    assert fake_predict[-1] == ids
    with pytest.warns(UserWarning, match="settings"):
        E.evaluate(run, root, n_boot=0, verbose=False, postprocess=["largest_component"])
    assert fake_predict[-1] == ids and len(fake_predict) == 4

    # another checkpoint and a tag go to their own folders and leave this one alone
    before = (run / "evaluation_test" / "per_case.csv").read_bytes()
    (run / "last.pt").write_bytes(b"last")
    E.evaluate(run, root, checkpoint="last", n_boot=0, verbose=False)
    E.evaluate(run, root, tag="lcc", n_boot=0, verbose=False, postprocess=["largest_component"])
    assert (run / "evaluation_test_last" / "per_case.csv").is_file()
    assert (run / "evaluation_test_lcc" / "per_case.csv").is_file()
    assert (run / "evaluation_test" / "per_case.csv").read_bytes() == before
    with pytest.raises(TypeError):
        E.evaluate(run, root, n_boot=0, verbose=False, postprocesss=["typo"])


# --------------------------------------------------------------------------------------------------
# end to end: a tiny trained run through the CLI
# --------------------------------------------------------------------------------------------------


def test_cli_evaluates_a_tiny_trained_run(data, tmp_path, capsys):
    from divaware.cli import main
    from divaware.train import TrainConfig, train

    root, cohort = data
    cfg = TrainConfig(data_root=str(root), channels=[4, 8], strides=[2], num_res_units=0, epochs=1, batch_size=4,
                      augment=False, strategy="erm", cache="memory", progress=False, out_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(cfg)
    before = snapshot(root)

    assert main(["evaluate", "--run", str(run), "--data", str(root), "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "cases" in out and "ranking" in out and "worst group" in out
    ev = run / "evaluation_test"
    assert {p.name for p in ev.iterdir()} == {*REPORT_FILES, "pred_segmentations", "predictions.json"}
    per_case = pd.read_csv(ev / "per_case.csv", index_col="patient_id")
    assert list(per_case.index) == cohort.ids("test")
    # the written numbers are the metrics of the written predictions against the expert masks
    for pid in per_case.index:
        pred = np.asarray(nib.load(str(ev / "pred_segmentations" / f"{pid}.nii.gz")).dataobj)
        img = nib.load(str(cohort.cases[pid].mask_path))
        want = M.case_metrics(pred, np.asarray(img.dataobj), img.header.get_zooms()[:3])
        assert per_case.loc[pid, "dice"] == pytest.approx(want["dice"], abs=1e-12)
        assert per_case.loc[pid, "norm_hd"] == pytest.approx(want["norm_hd"], abs=1e-12)
    assert snapshot(root) == before

    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
