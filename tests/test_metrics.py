"""Metrics against hand-computed truths, MONAI where definitions coincide, and the challenge score by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from divaware import metrics as M

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def cube(shape=(20, 20, 20), lo=(5, 5, 5), size=6):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


def blob(rng, shape=(24, 26, 22), pad=3, level=0.52):
    """A random smooth blob kept ``pad`` voxels away from the image edge."""
    m = np.zeros(shape, dtype=bool)
    inner = tuple(s - 2 * pad for s in shape)
    m[pad:-pad, pad:-pad, pad:-pad] = gaussian_filter(rng.random(inner), 2) > level
    return m


def brute_surface(mask):
    """Surface by explicit neighbour checks: foreground with a background face-neighbour in the image."""
    padded = np.pad(mask, 1, constant_values=True)  # outside the image counts as foreground (ITK)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    touching_bg = np.zeros_like(mask)
    for ax in range(mask.ndim):
        for step in (-1, 1):
            touching_bg |= ~np.roll(padded, step, axis=ax)[inner]
    return mask & touching_bg


def brute_hd95(pred, truth, spacing=(1.0, 1.0, 1.0)):
    """All-pairs HD95 (max of the two directed 95th percentiles), independent of the module's EDT path."""
    a = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(brute_surface(truth)) * np.asarray(spacing)
    d = cdist(a, b)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


# --------------------------------------------------------------------------------------------------
# per case: hand-computed
# --------------------------------------------------------------------------------------------------


def test_identical_cubes_are_perfect():
    t = cube()
    m = M.case_metrics(t, t, spacing=(0.7, 0.7, 2.0))
    assert m["dice"] == 1.0
    assert m["hd95"] == 0.0 and m["hd95_mm"] == 0.0 and m["norm_hd"] == 0.0
    # 216 voxels of 0.98 mm^3
    assert m["true_volume_ml"] == pytest.approx(216 * 0.7 * 0.7 * 2.0 / 1000)
    assert m["pred_volume_ml"] == m["true_volume_ml"]


def test_shifted_cube_dice_and_hd95_by_hand():
    # 6^3 cube shifted by 3 voxels along axis 0: overlap 3*6*6 = 108, Dice = 2*108 / (216 + 216) = 0.5.
    # Surface of each cube: 216 - 4^3 = 152 voxels. Directed distances pred -> truth: 60 zeros, 32 ones,
    # 24 twos and the far face (36 voxels) at 3; the 95th percentile (position 0.95 * 151 = 143.45) is in
    # the far face, so HD95 = 3 voxels, and NormHD = 3 / 150.
    t = cube()
    p = cube(lo=(8, 5, 5))
    m = M.case_metrics(p, t)
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(3.0)
    assert m["norm_hd"] == pytest.approx(3.0 / 150)
    d_pt, d_tp = M.surface_distances(p, t)
    assert len(d_pt) == len(d_tp) == 152
    assert np.bincount(d_pt.astype(int)).tolist() == [60, 32, 24, 36]


def test_hd95_mm_uses_anisotropic_spacing_per_axis():
    t = cube()
    along0 = cube(lo=(8, 5, 5))  # shifted 3 voxels along axis 0
    along1 = cube(lo=(5, 8, 5))  # shifted 3 voxels along axis 1
    spacing = (2.0, 1.0, 1.0)
    m0 = M.case_metrics(along0, t, spacing)
    m1 = M.case_metrics(along1, t, spacing)
    # The voxel HD95 ignores spacing (challenge), the mm version scales the axis that moved.
    assert m0["hd95"] == m1["hd95"] == pytest.approx(3.0)
    assert m0["hd95_mm"] == pytest.approx(6.0)
    assert m1["hd95_mm"] == pytest.approx(3.0)
    assert m0["norm_hd"] == pytest.approx(3.0 / 150)
    assert m0["true_volume_ml"] == pytest.approx(216 * 2.0 / 1000)


def test_hd95_ignores_the_worst_five_percent():
    # One stray voxel 8 voxels away: the maximum Hausdorff distance is 8 but it is 1 of 153 surface voxels,
    # so the 95th percentile stays 0.
    t = cube()
    p = t.copy()
    p[18, 8, 8] = True  # cube spans 5..10, so 8 voxels past the face at x = 10
    d_pt, _ = M.surface_distances(p, t)
    assert d_pt.max() == pytest.approx(8.0)
    assert M.hd95(p, t) == 0.0


def test_surface_convention_matches_itk_at_the_image_edge():
    # A slab filling the first two planes of the image: under ITK's LabelContour (the organisers' code)
    # only the inner plane x = 1 is surface, because outside the image counts as foreground.
    truth = np.zeros((5, 5, 5), dtype=bool)
    truth[:2] = True
    pred = np.zeros_like(truth)
    pred[:3] = True
    d_pt, d_tp = M.surface_distances(pred, truth)
    assert len(d_pt) == len(d_tp) == 25
    assert M.hd95(pred, truth) == 1.0
    # a mask filling the whole image has no surface and counts as empty for HD95
    full = np.ones((5, 5, 5), dtype=bool)
    assert math.isinf(M.hd95(full, truth))


def test_norm_hd_is_not_clipped():
    t = np.zeros((320, 3, 3), dtype=bool)
    p = np.zeros_like(t)
    t[10, 1, 1] = True
    p[310, 1, 1] = True
    m = M.case_metrics(p, t)
    assert m["hd95"] == pytest.approx(300.0)
    assert m["norm_hd"] == pytest.approx(2.0)
    assert m["dice"] == 0.0


def test_empty_prediction():
    t = cube()
    m = M.case_metrics(np.zeros_like(t), t, spacing=(1.0, 1.0, 2.0))
    assert m["dice"] == 0.0
    assert math.isinf(m["hd95"])
    assert m["norm_hd"] == 1.0
    assert math.isnan(m["hd95_mm"])
    assert m["pred_volume_ml"] == 0.0 and m["true_volume_ml"] == pytest.approx(0.432)


def test_empty_truth():
    p = cube()
    m = M.case_metrics(p, np.zeros_like(p))
    assert m["dice"] == 0.0
    assert math.isinf(m["hd95"]) and m["norm_hd"] == 1.0 and math.isnan(m["hd95_mm"])


def test_both_empty_follows_the_documented_parameter():
    z = np.zeros((8, 8, 8), dtype=np.uint8)
    m = M.case_metrics(z, z)
    assert m["dice"] == 0.0  # the organisers' convention, our default
    assert m["hd95"] == 0.0 and m["norm_hd"] == 0.0 and m["hd95_mm"] == 0.0
    assert M.case_metrics(z, z, both_empty=1.0)["dice"] == 1.0


def test_random_blobs_match_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(5):
        t, p = blob(rng), blob(rng)
        spacing = (0.8, 0.6, 2.5)
        m = M.case_metrics(p, t, spacing)
        assert m["hd95"] == pytest.approx(brute_hd95(p, t), abs=1e-9)
        assert m["hd95_mm"] == pytest.approx(brute_hd95(p, t, spacing), abs=1e-9)
        tp = np.sum(p & t)
        assert m["dice"] == pytest.approx(2 * tp / (2 * tp + np.sum(p & ~t) + np.sum(~p & t)))


def test_vectorised_dice_matches_per_case():
    rng = np.random.default_rng(3)
    batch_p = np.stack([blob(rng), blob(rng), np.zeros((24, 26, 22), bool)])
    batch_t = np.stack([blob(rng), batch_p[1], np.zeros((24, 26, 22), bool)])
    out = M.dice(batch_p, batch_t, spatial_dims=3)
    assert out.shape == (3,)
    assert out[0] == pytest.approx(M.dice(batch_p[0], batch_t[0]))
    assert out[1] == 1.0 and out[2] == 0.0
    assert M.dice(batch_p, batch_t, spatial_dims=3, both_empty=1.0)[2] == 1.0


def test_bad_inputs_are_refused():
    t = cube()
    with pytest.raises(ValueError, match="shapes differ"):
        M.case_metrics(t[:-1], t)
    with pytest.raises(ValueError, match="threshold"):
        M.case_metrics(t * 0.7, t)
    with pytest.raises(ValueError, match="spacing"):
        M.case_metrics(t, t, spacing=(1.0, 1.0))


# --------------------------------------------------------------------------------------------------
# MONAI cross-check (definitions coincide away from the image edge; MONAI pads with background there)
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated internal argument
def test_agrees_with_monai():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_dice, compute_hausdorff_distance

    rng = np.random.default_rng(11)
    shape = (24, 26, 22)
    preds = [blob(rng, shape) for _ in range(4)] + [cube(shape, lo=(8, 5, 5))]
    truths = [blob(rng, shape) for _ in range(4)] + [cube(shape)]
    spacing = (0.7, 0.7, 2.0)

    def t5(xs):
        return torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))  # (B, 1, X, Y, Z)

    yp, yt = t5(preds), t5(truths)
    m_dice = compute_dice(yp, yt, include_background=True).numpy()[:, 0]
    # undirected (MONAI default) = the max of the two directed percentiles, as in the challenge
    m_hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95).numpy()[:, 0]
    m_hd_mm = compute_hausdorff_distance(
        yp, yt, include_background=True, percentile=95, spacing=spacing
    ).numpy()[:, 0]
    # MONAI's directed=True measures prediction -> ground truth only
    m_dir = compute_hausdorff_distance(
        yp, yt, include_background=True, percentile=95, directed=True
    ).numpy()[:, 0]
    for i, (p, t) in enumerate(zip(preds, truths, strict=True)):
        ours = M.case_metrics(p, t, spacing)
        assert ours["dice"] == pytest.approx(m_dice[i], rel=1e-5)
        assert ours["hd95"] == pytest.approx(m_hd[i], rel=1e-5)
        assert ours["hd95_mm"] == pytest.approx(m_hd_mm[i], rel=1e-5)
        d_pt, _ = M.surface_distances(p, t)
        assert np.percentile(d_pt, 95) == pytest.approx(m_dir[i], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# the challenge score, by hand
# --------------------------------------------------------------------------------------------------


def toy_metadata():
    return pd.DataFrame(
        {
            "patient_id": ["A", "B", "C", "D", "E", "F"],
            "age_group": ["0-40", "0-40", "41-50", "51-60", "unknown", "71+"],
            "menopause": ["pre", "pre", "post", "post", "unknown", "pre"],
            "breast_density": ["a", "b", np.nan, "a", "unknown", "d"],
            "dataset": ["DUKE", "DUKE", "ISPY1", "ISPY2", "NACT", "ISPY2"],
        }
    ).set_index("patient_id")


def toy_per_case():
    return pd.DataFrame(
        {
            "patient_id": ["A", "B", "C", "D", "E", "F"],
            "dice": [0.8, 0.6, 0.9, 0.7, 0.5, 0.4],
            "norm_hd": [0.1, 0.3, 0.05, 0.2, 1.0, 0.5],
            "hd95_mm": [10.0, 30.0, 5.0, 20.0, np.nan, 50.0],
        }
    ).set_index("patient_id")


def test_challenge_score_by_hand():
    s = M.challenge_score(toy_per_case(), toy_metadata())
    # P = ½ (mean Dice + 1 − mean NormHD) = ½ (3.9/6 + 1 − 2.15/6)
    P = 0.5 * (3.9 / 6 + 1 - 2.15 / 6)
    # age (E unknown, dropped): 0-40 (A,B): 0.7/0.2; 41-50: 0.9/0.05; 51-60: 0.7/0.2; 71+: 0.4/0.5
    F_age = 1 - 0.5 * ((0.9 - 0.4) + (0.5 - 0.05))
    # menopause: pre (A,B,F): 0.6/0.3; post (C,D): 0.8/0.125; unknown (E): 0.5/1.0
    F_meno = 1 - 0.5 * ((0.8 - 0.5) + (1.0 - 0.125))
    # density (C, E missing, dropped): a (A,D): 0.75/0.15; b: 0.6/0.3; d: 0.4/0.5
    F_dens = 1 - 0.5 * ((0.75 - 0.4) + (0.5 - 0.15))
    F = (F_age + F_meno + F_dens) / 3
    assert s["P"] == pytest.approx(P)
    assert s["F_age"] == pytest.approx(F_age) == pytest.approx(0.525)
    assert s["F_menopause"] == pytest.approx(F_meno) == pytest.approx(0.4125)
    assert s["F_density"] == pytest.approx(F_dens) == pytest.approx(0.65)
    assert s["F"] == pytest.approx(F)
    assert s["ranking"] == pytest.approx(0.5 * P + 0.5 * F) == pytest.approx(0.5875)
    assert s["mean_hd95_mm"] == pytest.approx(23.0)
    assert s["n_cases"] == 6 and s["undefined"] == []
    assert list(s["groups"]["menopause"]) == ["pre", "post", "unknown"]
    assert s["groups"]["breast_density"]["a"] == {"n": 2, "dice": pytest.approx(0.75),
                                                  "norm_hd": pytest.approx(0.15)}


def test_challenge_score_matches_by_patient_id_not_position():
    # The organisers' script lost the link between scores and metadata rows; ours joins on patient_id.
    pc = toy_per_case().iloc[::-1].reset_index()  # reversed, patient_id as a column
    meta = toy_metadata().iloc[[3, 0, 5, 1, 4, 2]]
    assert M.challenge_score(pc, meta)["ranking"] == pytest.approx(0.5875)


def test_challenge_groups_from_raw_spreadsheet_columns():
    raw = pd.DataFrame(
        {
            "patient_id": ["A", "B", "C", "D", "E", "F"],
            "age": [35, 40, 40.5, 60, np.nan, 88],
            "menopausal_status": ["pre (<6 months since LMP)", "peri (6-12 months)", "post", "post (>12 months)",
                                  np.nan, "pre"],
            "breast_density": ["A", "b", None, "a", "", "d"],
        }
    )
    g = M.challenge_groups(raw)
    assert g["age"].fillna("-").tolist() == ["0-40", "0-40", "41-50", "51-60", "-", "71+"]
    assert g["menopause"].tolist() == ["pre", "pre", "post", "post", "unknown", "pre"]
    assert g["breast_density"].fillna("-").tolist() == ["a", "b", "-", "a", "-", "d"]


def test_challenge_score_without_any_density_averages_the_defined_variables():
    meta = toy_metadata().assign(breast_density="unknown")
    s = M.challenge_score(toy_per_case(), meta)
    assert math.isnan(s["F_density"]) and s["undefined"] == ["F_density"]
    assert s["F"] == pytest.approx((0.525 + 0.4125) / 2)


def test_challenge_score_names_cases_without_metadata():
    with pytest.raises(ValueError, match="ZZ_9"):
        M.challenge_score(pd.concat([toy_per_case(), toy_per_case().iloc[:1].rename(index={"A": "ZZ_9"})]),
                          toy_metadata())


# --------------------------------------------------------------------------------------------------
# per-group tables, bootstrap, fairness figures
# --------------------------------------------------------------------------------------------------


def test_group_table_values_and_order():
    t = M.group_table(toy_per_case(), toy_metadata(), "menopause", n_boot=500, min_n=3)
    assert t["group"].tolist() == ["pre", "post", "unknown"]
    assert t["n"].tolist() == [3, 2, 1]
    assert t["mean"].tolist() == pytest.approx([0.6, 0.8, 0.5])
    assert t["gap"].tolist() == pytest.approx([0.6 - 0.65, 0.8 - 0.65, 0.5 - 0.65])
    assert t["hd95_mm"].tolist()[:2] == pytest.approx([30.0, 12.5])
    assert math.isnan(t["hd95_mm"].iloc[2])  # E has no defined HD95 in mm
    assert t["small"].tolist() == [False, True, True]
    # a single case has no CI
    assert math.isnan(t["ci_low"].iloc[2]) and math.isnan(t["ci_high"].iloc[2])
    # missing density (NaN) and 'unknown' are one group, last
    d = M.group_table(toy_per_case(), toy_metadata(), "breast_density", n_boot=200)
    assert d["group"].tolist() == ["a", "b", "d", "unknown"]
    assert d.loc[d["group"] == "unknown", "n"].item() == 2
    assert M.group_table(toy_per_case(), toy_metadata(), "breast_density", n_boot=200,
                         drop_unknown=True)["group"].tolist() == ["a", "b", "d"]


def test_group_table_intersections():
    t = M.group_table(toy_per_case(), toy_metadata(), ["age_group", "menopause"], n_boot=200)
    assert t["group"].tolist() == ["0-40 / pre", "41-50 / post", "51-60 / post", "71+ / pre",
                                   "unknown / unknown"]
    assert t.loc[0, "n"] == 2 and t.loc[0, "mean"] == pytest.approx(0.7)
    assert {"age_group", "menopause"} <= set(t.columns)


def test_group_order_is_the_cohorts_natural_order():
    assert M.group_order(["unknown", "71+", "0-40", "post", "pre", "d", "a", "zeta", "DUKE"]) == [
        "0-40", "71+", "pre", "post", "a", "d", "DUKE", "zeta", "unknown"]


def test_bootstrap_is_seeded_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.beta(5, 2, size=20), rng.beta(5, 2, size=500)
    ci1 = M.bootstrap_ci(small, seed=4)
    assert ci1 == M.bootstrap_ci(small, seed=4)
    assert ci1 != M.bootstrap_ci(small, seed=5)
    assert ci1[0] < small.mean() < ci1[1]
    ci2 = M.bootstrap_ci(large, seed=4)
    assert ci2[0] < large.mean() < ci2[1]
    # the width of a mean's CI falls like 1/sqrt(n): 25x the cases, about 1/5 the width
    assert (ci2[1] - ci2[0]) < 0.4 * (ci1[1] - ci1[0])
    assert all(math.isnan(v) for v in M.bootstrap_ci([0.5]))
    assert all(math.isnan(v) for v in M.bootstrap_ci(small, n_boot=0))
    # wider confidence, wider interval
    ci99 = M.bootstrap_ci(small, seed=4, ci=0.99)
    assert ci99[0] <= ci1[0] and ci99[1] >= ci1[1]


def test_group_ci_does_not_depend_on_other_groups():
    rng = np.random.default_rng(1)
    ids = [f"C{i:03d}" for i in range(60)]
    meta = pd.DataFrame({"site": rng.choice(["s1", "s2", "s3"], size=60)}, index=pd.Index(ids, name="patient_id"))
    pc = pd.DataFrame({"dice": rng.random(60)}, index=pd.Index(ids, name="patient_id"))
    full = M.group_table(pc, meta, "site", seed=3, n_boot=300).set_index("group")
    part = M.group_table(pc[meta["site"] != "s2"], meta, "site", seed=3, n_boot=300).set_index("group")
    assert full.loc["s1", ["ci_low", "ci_high"]].tolist() == part.loc["s1", ["ci_low", "ci_high"]].tolist()
    again = M.group_table(pc, meta, "site", seed=3, n_boot=300)
    pd.testing.assert_frame_equal(full, again.set_index("group"))


def test_fairness_summary_by_hand():
    ids = pd.Index(list("uvwxyz"), name="patient_id")
    meta = pd.DataFrame({"g": ["X", "X", "Y", "Z", "Z", "Z"]}, index=ids)
    pc = pd.DataFrame({"dice": [0.8, 0.6, 0.9, 0.5, 0.5, 0.5]}, index=ids)
    f = M.fairness_summary(pc, meta, "g")
    overall = 3.8 / 6
    assert f["overall"] == pytest.approx(overall)
    assert f["worst_group"] == pytest.approx(0.5) and f["worst_group_label"] == "Z"
    assert f["best_group"] == pytest.approx(0.9) and f["best_group_label"] == "Y"
    assert f["gap"] == pytest.approx(0.4)
    assert f["std"] == pytest.approx(np.std([0.7, 0.9, 0.5]))
    es = overall / (1 + abs(0.7 - overall) + abs(0.9 - overall) + abs(0.5 - overall))
    assert f["es"] == pytest.approx(es) == pytest.approx(0.431818, abs=1e-6)
    # excluding groups below min_n (Y has one case) changes the figures accordingly
    f2 = M.fairness_summary(pc, meta, "g", min_n=2)
    assert f2["n_groups"] == 2 and f2["gap"] == pytest.approx(0.2)
    # for a distance, 'worst' is the highest mean and ES is not defined
    pc_hd = pc.assign(norm_hd=[0.1, 0.1, 0.5, 0.2, 0.2, 0.2])
    fh = M.fairness_summary(pc_hd, meta, "g", metric="norm_hd")
    assert fh["worst_group_label"] == "Y" and math.isnan(fh["es"])


# --------------------------------------------------------------------------------------------------
# comparing runs
# --------------------------------------------------------------------------------------------------


def test_compare_runs_on_a_toy_pair():
    meta = toy_metadata()
    a = toy_per_case()
    b = a.assign(dice=[0.8, 0.7, 0.9, 0.7, 0.7, 0.6]).iloc[::-1]  # improves B, E, F; reversed rows
    cmp = M.compare_runs(a, b, meta, "menopause", labels=("ERM", "divaware"), n_boot=500)
    assert cmp.labels == ("ERM", "divaware")
    assert cmp.per_case.loc["F", "diff"] == pytest.approx(0.2)
    o = cmp.overall
    assert o["n"] == 6 and o["mean_diff"] == pytest.approx(0.5 / 6)
    assert o["n_better"] == 3 and o["n_worse"] == 0
    assert o["ci_low"] <= o["mean_diff"] <= o["ci_high"]
    g = cmp.per_group.set_index("group")
    assert g.loc["pre", "mean_diff"] == pytest.approx(0.3 / 3)
    assert g.loc["post", "mean_diff"] == pytest.approx(0.0)
    assert g.loc["post", "ci_low"] == g.loc["post", "ci_high"] == 0.0  # no change, no spread
    assert g.loc["unknown", "mean_b"] == pytest.approx(0.7)
    # groups: a = pre 0.6, post 0.8, unknown 0.5; b = pre 0.7, post 0.8, unknown 0.7
    fz = cmp.fairness
    assert fz.loc["worst_group", "a"] == pytest.approx(0.5) and fz.loc["worst_group", "b"] == pytest.approx(0.7)
    assert fz.loc["gap", "change"] == pytest.approx(0.1 - 0.3)
    assert fz.loc["overall", "change"] == pytest.approx(o["mean_diff"])
    assert not fz.loc["gap", "higher_is_better"]


def test_compare_runs_names_unmatched_cases():
    a = toy_per_case()
    b = a.drop(index="C").rename(index={"D": "D2"})
    with pytest.raises(ValueError, match=r"only in a: C, D.*only in b: D2"):
        M.compare_runs(a, b)


# --------------------------------------------------------------------------------------------------
# divergent subgroups of the test results
# --------------------------------------------------------------------------------------------------


def planted_cohort(n=120, seed=0):
    """Metadata for n cases (plus 10 unevaluated ones) and Dice scores 0.25 lower for young women."""
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"DUKE_{i:03d}" for i in range(n + 10)], name="patient_id")
    meta = pd.DataFrame(
        {
            "age_group": rng.choice(["0-40", "41-50", "51-60", "61-70"], size=len(ids)),
            "menopause": rng.choice(["pre", "post", "unknown"], size=len(ids)),
            "breast_density": rng.choice(["a", "b", "c", "d", "unknown"], size=len(ids)),
        },
        index=ids,
    )
    young = meta["age_group"].iloc[:n] == "0-40"
    dice = np.clip(0.8 - 0.25 * young.to_numpy() + rng.normal(0, 0.05, n), 0, 1)
    return meta, pd.DataFrame({"dice": dice}, index=ids[:n])


def test_divergent_subgroups_finds_the_planted_group():
    meta, pc = planted_cohort()
    res = M.divergent_subgroups(pc, meta, min_support=0.1, max_length=2)
    assert list(res.columns[:11]) == ["label", "items", "length", "support", "count", "mean", "divergence", "ps",
                                      "ps_low", "ps_high", "z_mw"]
    top = res.iloc[0]
    assert "age_group=0-40" in top["label"]
    assert top["divergence"] < -0.15 and top["z_mw"] <= -2 and top["ps_high"] < 0.5
    single = res[res["label"] == "age_group=0-40"].iloc[0]
    young = meta.loc[pc.index, "age_group"] == "0-40"
    assert single["count"] == young.sum()  # only evaluated cases count, matched by patient_id
    assert single["mean"] == pytest.approx(pc["dice"][young].mean())
    assert single["divergence"] == pytest.approx(pc["dice"][young].mean() - pc["dice"].mean())
