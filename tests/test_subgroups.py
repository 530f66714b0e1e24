"""Attribute tables, the DivExplorer adapter and per-case divergence, on small hand-made cohorts."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from planted import PLANTED, planted_cohort
from scipy import stats

from divaware.subgroups import (
    ITEMSET_COLUMNS,
    UNKNOWN,
    Bins,
    attribute_table,
    case_divergence,
    divergent_itemsets,
    itemset_label,
    prune_redundant,
    shapley_contributions,
)


def members(table: pd.DataFrame, items) -> np.ndarray:
    mask = np.ones(len(table), dtype=bool)
    for it in items:
        attr, value = it.split("=", 1)
        mask &= (table[attr] == value).to_numpy()
    return mask


# ---------------------------------------------------------------------------------------------- tables


def test_attribute_table_defaults_unknown_and_formatting():
    meta = pd.DataFrame(
        {
            "patient_id": ["A", "B", "C", "D"],
            "age_group": ["0-40", None, "71+", "41-50"],
            "menopause": ["pre", np.nan, "", "post"],
            "breast_density": [np.nan, "d", "nan", "a"],
            "pcr": [1.0, 0.0, np.nan, 1.0],
        }
    )
    before = meta.copy()
    tab = attribute_table(meta)
    assert list(tab.columns) == ["age_group", "menopause", "breast_density", "dense"]
    # dense is derived from breast_density: c/d -> yes, a/b -> no, unknown stays unknown
    assert tab["dense"].tolist() == [UNKNOWN, "yes", UNKNOWN, "no"]
    assert tab.index.name == "patient_id" and list(tab.index) == ["A", "B", "C", "D"]
    assert tab.loc["B", "age_group"] == UNKNOWN
    assert tab.loc["B", "menopause"] == UNKNOWN and tab.loc["C", "menopause"] == UNKNOWN
    assert tab.loc["A", "breast_density"] == UNKNOWN and tab.loc["C", "breast_density"] == UNKNOWN
    assert not tab.isna().any().any()
    pd.testing.assert_frame_equal(meta, before)  # input untouched
    # numeric categorical column: integral values lose ".0", NaN is unknown
    tab2 = attribute_table(meta, ["pcr"])
    assert tab2["pcr"].tolist() == ["1", "0", UNKNOWN, "1"]
    # idempotent
    pd.testing.assert_frame_equal(attribute_table(tab), tab)


def test_age_is_binned_into_the_challenge_groups():
    ages = [18, 40, 40.5, 50, 51, 60, 65, 70, 71, 90, np.nan]
    meta = pd.DataFrame({"age": ages}, index=pd.Index([f"P{i}" for i in range(len(ages))], name="patient_id"))
    tab = attribute_table(meta, ["age"])
    assert tab["age"].tolist() == [
        "0-40", "0-40", "41-50", "41-50", "51-60", "51-60", "61-70", "61-70", "71+", "71+", UNKNOWN,
    ]
    # passing the binned table through again keeps the labels
    pd.testing.assert_frame_equal(attribute_table(tab, ["age"]), tab)


def test_continuous_column_needs_bins_and_bins_are_applied():
    rng = np.random.default_rng(3)
    vol = rng.lognormal(2.3, 1.0, 50)
    meta = pd.DataFrame({"tumour_ml": vol}, index=pd.Index([f"T{i}" for i in range(50)], name="patient_id"))
    with pytest.raises(ValueError, match="tumour_ml.*bins="):
        attribute_table(meta, ["tumour_ml"])
    tab = attribute_table(meta, ["tumour_ml"], bins={"tumour_ml": [5, 20]})
    expected = np.where(vol <= 5, "≤5", np.where(vol <= 20, "(5, 20]", ">20"))
    assert tab["tumour_ml"].tolist() == expected.tolist()
    labelled = attribute_table(meta, ["tumour_ml"], bins={"tumour_ml": Bins((10,), ("small", "large"))})
    assert set(labelled["tumour_ml"]) == {"small", "large"}
    quartiles = attribute_table(meta, ["tumour_ml"], bins={"tumour_ml": 4})
    assert quartiles["tumour_ml"].nunique() == 4
    assert quartiles["tumour_ml"].value_counts().min() >= 10


def test_attribute_table_errors_name_the_problem():
    meta = pd.DataFrame({"age_group": ["0-40", "71+"]}, index=pd.Index(["A", "A"], name="patient_id"))
    with pytest.raises(ValueError, match="duplicated.*'A'"):
        attribute_table(meta, ["age_group"])
    meta = pd.DataFrame({"age_group": ["0-40"]}, index=pd.Index(["A"], name="patient_id"))
    with pytest.raises(ValueError, match="'site' is not a column"):
        attribute_table(meta, ["age_group", "site"])
    with pytest.raises(ValueError, match="contains '='"):
        attribute_table(meta.rename(columns={"age_group": "a=b"}), ["a=b"])


# ---------------------------------------------------------------------------------------------- analysis


def test_planted_subgroup_is_ranked_first_with_significant_t():
    meta, scores, planted = planted_cohort()
    tab = attribute_table(meta)
    its = divergent_itemsets(tab, scores, min_support=0.05)
    assert list(its.columns) == list(ITEMSET_COLUMNS)
    top = its.iloc[0]
    assert top["label"] == PLANTED and top["items"] == frozenset({"age_group=0-40", "breast_density=d"})
    assert top["length"] == 2 and top["count"] == planted.sum()
    assert top["divergence"] < -0.15 and top["z_mw"] < -8
    # most negative first, no empty itemset
    assert (np.diff(its["divergence"].to_numpy()) >= 0).all()
    assert (its["length"] >= 1).all() and "" not in set(its["label"])
    assert its.attrs["n_cases"] == len(meta)


def test_default_test_is_a_brute_force_mann_whitney_against_the_complement():
    meta, scores, _ = planted_cohort(n=200, seed=5)
    scores = scores.round(2)  # ties: the tie correction must match scipy's
    tab = attribute_table(meta)
    its = divergent_itemsets(tab, scores, min_support=0.03, max_length=2)
    assert its.attrs["test"] == "mannwhitney" and "Mann–Whitney" in its.attrs["statistic_text"] and its.attrs["statistic"] == "z_mw"
    s = scores.reindex(tab.index).to_numpy()
    checked = 0
    for _, row in its.iterrows():
        m = members(tab, row["items"])
        if 5 <= m.sum() <= len(m) - 2:
            ref = stats.mannwhitneyu(s[m], s[~m], alternative="less", method="asymptotic", use_continuity=True)
            assert row["p"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
            assert stats.norm.cdf(row["z_mw"]) == pytest.approx(row["p"], rel=1e-9, abs=1e-300)  # Φ(z) = p
            checked += 1
    assert checked > 20


def test_welch_test_matches_a_brute_force_welch_test_against_the_complement():
    meta, scores, _ = planted_cohort(n=200, seed=5)
    tab = attribute_table(meta)
    its = divergent_itemsets(tab, scores, min_support=0.03, max_length=2, test="welch")
    assert its["length"].max() == 2
    s = scores.reindex(tab.index).to_numpy()
    for _, row in its.iterrows():
        m = members(tab, row["items"])
        assert row["count"] == m.sum()
        assert row["support"] == pytest.approx(m.mean())
        assert row["mean"] == pytest.approx(s[m].mean(), abs=1e-12)
        assert row["divergence"] == pytest.approx(s[m].mean() - s.mean(), abs=1e-12)
        if 2 <= m.sum() <= len(m) - 2:
            ref = stats.ttest_ind(s[m], s[~m], equal_var=False, alternative="less")
            assert row["t_welch"] == pytest.approx(ref.statistic, rel=1e-9)
            if m.sum() >= 5:
                assert row["p"] == pytest.approx(ref.pvalue, rel=1e-7)
        else:
            assert np.isnan(row["t_welch"]) or row["t_welch"] == 0
    # every 2-itemset with enough support is reported (nothing lost by the adapter)
    for a, b in itertools.combinations(tab.columns, 2):
        for va, vb in itertools.product(tab[a].unique(), tab[b].unique()):
            m = (tab[a] == va) & (tab[b] == vb)
            if m.sum() >= np.ceil(0.03 * len(tab)):
                assert itemset_label([f"{a}={va}", f"{b}={vb}"], list(tab.columns)) in set(its["label"])


def test_constant_scores_give_zero_divergence_without_warnings():
    meta, scores, _ = planted_cohort(n=120, seed=2)
    flat = pd.Series(0.7, index=scores.index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        its = divergent_itemsets(attribute_table(meta), flat, min_support=0.05)
    assert (its["divergence"] == 0).all()
    assert (its["z_mw"].fillna(0) == 0).all() and (its["ps"] == 0.5).all()


def test_support_threshold_decides_whether_a_small_subgroup_exists():
    meta, scores, _ = planted_cohort(n=500, seed=8, gap=0.0)
    tab = attribute_table(meta)
    small = (tab["age_group"] == "71+") & (tab["menopause"] == "post")  # ~4 %
    assert 0.02 < small.mean() < 0.05
    scores = scores - 0.25 * small
    label = "age_group=71+ ∧ menopause=post"
    low = divergent_itemsets(tab, scores, min_support=0.01, max_length=2)
    assert low.iloc[0]["label"] == label and low.iloc[0]["z_mw"] < -5
    high = divergent_itemsets(tab, scores, min_support=0.05)
    assert label not in set(high["label"])


def test_scores_must_align_with_the_table_by_id():
    meta, scores, _ = planted_cohort(n=50)
    tab = attribute_table(meta)
    with pytest.raises(ValueError, match="C0003"):
        divergent_itemsets(tab, scores.drop("C0003"))
    with pytest.raises(ValueError, match="X9"):
        divergent_itemsets(tab, pd.concat([scores, pd.Series({"X9": 0.5})]))
    bad = scores.copy()
    bad["C0007"] = np.nan
    with pytest.raises(ValueError, match="NaN.*C0007"):
        divergent_itemsets(tab, bad)
    with pytest.raises(ValueError, match="min_support"):
        divergent_itemsets(tab, scores, min_support=0)


def test_results_do_not_depend_on_row_order():
    meta, scores, _ = planted_cohort(n=300, seed=11)
    tab = attribute_table(meta)
    a = divergent_itemsets(tab, scores, min_support=0.02)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(tab))
    b = divergent_itemsets(tab.iloc[perm], scores.iloc[rng.permutation(len(scores))], min_support=0.02)
    pd.testing.assert_frame_equal(a, b)  # exact, not approximate


def test_redundancy_pruning_matches_divexplorer():
    from divexplorer import DivergencePatternProcessor

    meta, scores, _ = planted_cohort(n=300, seed=4)
    tab = attribute_table(meta)
    its = divergent_itemsets(tab, scores, min_support=0.03)
    eps = 0.01
    pruned = prune_redundant(its, eps)
    # DivExplorer's own pruning on the same divergences (its frame wants the empty itemset row)
    dx = pd.DataFrame(
        {
            "support": [1.0, *its["support"]],
            "itemset": [frozenset(), *its["items"]],
            "length": [0, *its["length"]],
            "support_count": [len(tab), *its["count"]],
            "s": [0.0, *its["mean"]],
            "s_div": [0.0, *its["divergence"]],
            "s_t": [0.0, *its["z_mw"]],
        }
    )
    kept = DivergencePatternProcessor(dx, "s").redundancy_pruning(eps)
    assert set(pruned["items"]) == set(kept["itemset"]) - {frozenset()}
    assert len(pruned) < len(its)
    # a superset with the very same cases (hence the same Δ) as its subset is redundant
    its_full = divergent_itemsets(tab, scores, min_support=0.001)
    pruned_full = prune_redundant(its_full, 0.0)
    for items in pruned_full["items"]:
        for it in items:
            assert (members(tab, items) != members(tab, items - {it})).any()
    with pytest.raises(ValueError, match="missing"):
        prune_redundant(its.iloc[:3], eps)


def test_worse_pruning_keeps_only_itemsets_clearly_worse_than_every_parent():
    meta, scores, _ = planted_cohort(n=400, seed=4)
    its = divergent_itemsets(attribute_table(meta), scores, min_support=0.03)
    eps = 0.01
    pruned = prune_redundant(its, eps, mode="worse")
    div = {frozenset(i): d for i, d in zip(its["items"], its["divergence"], strict=True)}
    div[frozenset()] = 0.0
    for items in its["items"]:
        clearly_worse = all(div[items] < div[items - {it}] - eps for it in items)
        assert (items in set(pruned["items"])) == clearly_worse, itemset_label(items)
    # The planted subgroup is worse than both of its single items, so it survives; every survivor fails.
    assert PLANTED in set(pruned["label"])
    assert all(d < 0 for d in pruned["divergence"])
    # Unlike |ΔI − Δparent| ≤ ε, this pruning changes the top of the list (which notebook 02 shows).
    assert list(pruned["label"][:10]) != list(prune_redundant(its, eps)["label"][:10])
    with pytest.raises(ValueError, match="mode"):
        prune_redundant(its, eps, mode="better")


def test_shapley_contributions_sum_to_the_divergence():
    meta, scores, _ = planted_cohort()
    its = divergent_itemsets(attribute_table(meta), scores, min_support=0.05)
    top = its.iloc[0]
    sv = shapley_contributions(its, top["label"])
    assert set(sv.index) == set(top["items"])
    assert sv.sum() == pytest.approx(top["divergence"], abs=1e-12)
    assert (sv < 0).all()
    same = shapley_contributions(its, ["breast_density=d", "age_group=0-40"])
    pd.testing.assert_series_equal(sv, same)
    with pytest.raises(ValueError, match="not among"):
        shapley_contributions(its, "age_group=0-40 ∧ breast_density=z")


# ---------------------------------------------------------------------------------------------- per case


def test_case_divergence_matches_by_attribute_values_for_any_cases():
    meta, scores, planted = planted_cohort()
    its = divergent_itemsets(attribute_table(meta), scores, min_support=0.05)
    # training cases: new ids, never analysed
    train_meta, _, train_planted = planted_cohort(n=150, seed=9, prefix="T")
    cd = case_divergence(attribute_table(train_meta), its)
    assert list(cd.columns) == ["divergence", "gap", "worst_itemset"]
    assert list(cd.index) == list(train_meta.index)
    top = its.iloc[0]
    assert (cd.loc[train_planted, "divergence"] == top["divergence"]).all()
    assert (cd.loc[train_planted, "worst_itemset"] == PLANTED).all()
    assert (cd["divergence"] <= 0).all()
    # brute force: the most negative Δ among the itemsets containing the case
    ttab = attribute_table(train_meta)
    for pid in ttab.index[:40]:
        row = ttab.loc[[pid]]
        ds = [d for items, d in zip(its["items"], its["divergence"], strict=True) if members(row, items)[0]]
        assert cd.loc[pid, "divergence"] == min([0.0, *ds])


def test_case_divergence_t_min_empty_itemset_and_unseen_values():
    tab = pd.DataFrame(
        {"age_group": ["0-40", "0-40", "71+", "41-50"], "breast_density": ["d", "a", "d", "zz"]},
        index=pd.Index(["A", "B", "C", "D"], name="patient_id"),
    )
    its = pd.DataFrame(
        {
            "label": ["", "age_group=0-40 ∧ breast_density=d", "age_group=0-40", "breast_density=d", "age_group=71+"],
            "items": [
                frozenset(),
                frozenset({"age_group=0-40", "breast_density=d"}),
                frozenset({"age_group=0-40"}),
                frozenset({"breast_density=d"}),
                frozenset({"age_group=71+"}),
            ],
            "divergence": [-1.0, -0.3, -0.1, -0.05, 0.02],
            "t": [0.0, -1.5, -4.0, -2.5, 1.0],
        }
    )
    cd = case_divergence(tab, its)
    # the empty itemset (Δ=-1 here, which DivExplorer never reports but could be passed in) is ignored
    assert cd["divergence"].tolist() == [-0.3, -0.1, -0.05, 0.0]
    assert cd["worst_itemset"].tolist() == ["age_group=0-40 ∧ breast_density=d", "age_group=0-40", "breast_density=d", ""]
    cd2 = case_divergence(tab, its, t_min=2.0)
    assert cd2["divergence"].tolist() == [-0.1, -0.1, -0.05, 0.0]
    with pytest.raises(ValueError, match="breast_density"):
        case_divergence(tab[["age_group"]], its)


def test_unknown_is_a_value_and_tiny_groups_fall_back_to_larger_itemsets():
    meta, scores, _ = planted_cohort(n=400, seed=1, gap=0.0)
    tab = attribute_table(meta)
    unknown_meno = tab["menopause"] == UNKNOWN
    tiny = tab.index[(tab["age_group"] == "71+") & (tab["breast_density"] == "a")][:3]
    scores = scores - 0.15 * unknown_meno
    scores[tiny] = 0.0  # 3 cases: far below min_support
    singles = divergent_itemsets(tab, scores, min_support=0.05, max_length=1)
    assert singles.iloc[0]["label"] == "menopause=unknown"  # unknown is analysed like any value
    assert singles.iloc[0]["z_mw"] < -5
    its = divergent_itemsets(tab, scores, min_support=0.05)
    assert not any("71+" in lab and "density=a" in lab for lab in its["label"])
    cd = case_divergence(tab, its)
    for pid in tiny:  # tiny-group cases take the worst larger itemset they belong to
        mine = [d for items, d in zip(its["items"], its["divergence"], strict=True) if members(tab.loc[[pid]], items)[0]]
        assert cd.loc[pid, "divergence"] == min([0.0, *mine])


def test_pixel_spacing_text_is_binned_on_its_first_value() -> None:
    # MAMA-MIA's spreadsheet stores pixel_spacing as text like "[0.7, 0.7]".
    meta = pd.DataFrame({"pixel_spacing": ["[0.7, 0.7]", "[1.0, 1.0]", "(0.5, 0.5)", None]},
                        index=pd.Index(["a", "b", "c", "d"], name="patient_id"))
    table = attribute_table(meta, ["pixel_spacing"])
    assert table["pixel_spacing"].tolist() == ["(0.6, 0.9]", ">0.9", "≤0.6", "unknown"]


def test_benjamini_hochberg_by_hand_with_duplicates_and_untested():
    from divaware.subgroups import benjamini_hochberg

    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20])
    # identical hypotheses (same cases under two labels) count once; NaN is untested and not counted
    q = benjamini_hochberg([0.01, 0.01, 0.5, np.nan], keys=["a", "a", "b", "c"])
    np.testing.assert_allclose(q[:3], [0.02, 0.02, 0.5])
    assert np.isnan(q[3])
    assert np.isnan(benjamini_hochberg([np.nan])).all()


def test_itemset_p_and_q_flag_the_planted_subgroup_and_not_noise():
    meta, scores, _ = planted_cohort(400, seed=3)
    its = divergent_itemsets(attribute_table(meta), scores, min_support=0.02, max_length=3)
    row = its.set_index("label").loc[PLANTED]
    assert row["p"] < 1e-6 and row["q"] < 0.05
    tested = its["count"] >= 5
    assert its.loc[~tested, ["p", "q"]].isna().all().all() and its.loc[tested, "p"].notna().all()
    assert (its.loc[tested, "q"] >= its.loc[tested, "p"]).all()
    # noise: the same attributes with permuted scores; no itemset survives at 5 %
    noise = pd.Series(np.random.default_rng(0).permutation(scores.to_numpy()), index=scores.index)
    null = divergent_itemsets(attribute_table(meta), noise, min_support=0.02, max_length=3)
    assert null["q"].min() > 0.05
    # constant scores: nothing is lower than anything, p = 1 (no NaN, no warning)
    flat = divergent_itemsets(attribute_table(meta), scores * 0 + 0.5, min_support=0.05)
    assert (flat.loc[flat["p"].notna(), "p"] == 1.0).all()


# ------------------------------------------------------------------------------ the divergence test (issue 19)


def test_heteroscedastic_sample_fools_the_pooled_t_but_not_the_default_test():
    """Same mean, much larger variance: the young ∧ dense cases score 0.00 or 0.90 (mean 0.80), the rest
    N(0.80, 0.05). On this seeded 96-case split the former pooled-variance t flags part of that group as
    lower (its variance is swamped by the rest's in the pooled estimate); Mann–Whitney flags nothing."""
    from divaware.calibration import scenario_split

    meta, scores, hard = scenario_split(96, "heteroscedastic", seed=0)
    assert hard.sum() == 14 and abs(scores[hard].mean() - scores[~hard].mean()) < 0.08
    tab = attribute_table(meta)
    pooled = divergent_itemsets(tab, scores, min_support=0.05, max_length=3, test="pooled_t")
    default = divergent_itemsets(tab, scores, min_support=0.05, max_length=3)
    flagged = pooled[(pooled["divergence"] < 0) & (pooled["q"] <= 0.05)]
    assert "age_group=0-40 ∧ breast_density=d" in set(flagged["label"])
    assert default.attrs["test"] == "mannwhitney"
    assert not ((default["divergence"] < 0) & (default["q"] <= 0.05)).any()
    assert default.set_index("label").loc["age_group=0-40 ∧ breast_density=d", "q"] > 0.5


def test_bh_counts_different_groups_with_tied_scores_as_separate_tests():
    """Issue 24 item 9: duplicates are the same *cases*, not the same (count, Σ, Σ²)."""
    ids = pd.Index([f"P{i:02d}" for i in range(30)], name="patient_id")
    group = np.array(["x"] * 6 + ["y"] * 6 + ["z"] * 18)
    # x and y hold the same six scores: equal count, sums and sums of squares, different cases
    six = [0.1, 0.2, 0.3, 0.35, 0.4, 0.45]
    rest = np.linspace(0.5, 0.95, 18)
    scores = pd.Series(np.concatenate([six, six, rest]), index=ids)
    # b=1 on exactly the x cases: "a=x" and "a=x ∧ b=1" (and "b=1") are one hypothesis
    table = pd.DataFrame({"a": group, "b": np.where(group == "x", "1", "0")}, index=ids)
    its = divergent_itemsets(table, scores, min_support=0.1).set_index("label")
    assert its.loc["a=x", "p"] == its.loc["a=y", "p"] == its.loc["a=x ∧ b=1", "p"]
    # distinct case sets with a p-value: {x}, {y}, {z}, {not x}; a=x ∧ b=1 and b=1 repeat {x},
    # a=y ∧ b=0 repeats {y}, a=z ∧ b=0 repeats {z}
    assert its.attrs["n_tests"] == 4
    # x and y tie for the smallest p: BH over 4 tests ranks them 1 and 2 -> q = p · 4 / 2 (merged: p · 3)
    assert its["p"].min() == its.loc["a=x", "p"] < 0.01
    assert its.loc["a=x", "q"] == pytest.approx(its.loc["a=x", "p"] * 4 / 2, rel=1e-12)
    assert its.loc["a=y", "q"] == its.loc["a=x", "q"] == its.loc["b=1", "q"]


def test_dense_is_derived_from_breast_density_and_young_dense_is_one_itemset():
    from divaware.subgroups import DEFAULT_ATTRIBUTES, DERIVED_ATTRIBUTES

    assert "dense" in DEFAULT_ATTRIBUTES and DERIVED_ATTRIBUTES["dense"][0] == "breast_density"
    meta = pd.DataFrame({"age_group": ["0-40"] * 6 + ["51-60"] * 6,
                         "breast_density": ["c", "d", "c", "d", "a", None, "b", "a", "c", "d", "unknown", "b"]},
                        index=pd.Index([f"C{i}" for i in range(12)], name="patient_id"))
    tab = attribute_table(meta, ["age_group", "breast_density", "dense"])
    assert tab["dense"].tolist() == ["yes", "yes", "yes", "yes", "no", UNKNOWN, "no", "no", "yes", "yes", UNKNOWN, "no"]
    # an own `dense` column wins over the derivation
    own = attribute_table(meta.assign(dense="custom"), ["dense"])
    assert (own["dense"] == "custom").all()
    with pytest.raises(ValueError, match="dense"):
        attribute_table(meta.drop(columns="breast_density"), ["dense"])
    scores = pd.Series(np.where((tab["age_group"] == "0-40") & (tab["dense"] == "yes"), 0.5, 0.9), index=tab.index)
    its = divergent_itemsets(tab, scores, min_support=0.3).set_index("label")
    assert its.loc["age_group=0-40 ∧ dense=yes", "count"] == 4  # c and d together: 4 cases, each alone 2


def test_permutation_flag_rate_is_the_detector_on_seeded_permutations():
    from divaware.subgroups import permutation_flag_rate

    meta, scores, _ = planted_cohort(n=120, seed=4)
    tab = attribute_table(meta)
    rate = permutation_flag_rate(tab, scores, n_permutations=12, seed=7, min_support=0.05, max_length=2)
    rng = np.random.default_rng(7)
    s = scores.reindex(sorted(scores.index)).to_numpy()  # the analysis sorts by id
    hits = 0
    for _ in range(12):
        perm = pd.Series(rng.permutation(s), index=sorted(scores.index))
        its = divergent_itemsets(tab, perm, min_support=0.05, max_length=2)
        hits += bool(((its["divergence"] < 0) & (its["q"] <= 0.05)).any())
    assert rate == hits / 12
    # the real scores (planted gap 0.2) are flagged; constant scores never
    assert permutation_flag_rate(tab, scores * 0 + 0.5, n_permutations=5) == 0.0
    real = divergent_itemsets(tab, scores, min_support=0.05, max_length=2)
    assert ((real["divergence"] < 0) & (real["q"] <= 0.05)).any()


# ---------------------------------------------------------------------------------------------- findings


def test_findings_group_refinements_under_their_root_and_mark_overlaps():
    """Issue 27: the headline is the root, not a 5-case refinement; a flag that only overlaps the failing group
    (menopause=pre, made mostly of its cases) is marked; tiny subgroups with a large gap are listed as untested."""
    from divaware.subgroups import findings, is_significant, untested_gaps, with_findings

    meta, scores, planted = planted_cohort(n=300, seed=3, gap=0.15)
    meta.loc[planted, "menopause"] = "pre"  # a correlated side effect
    tab = attribute_table(meta)
    its = divergent_itemsets(tab, scores, min_support=0.02, max_length=3)
    f = findings(its, tab, scores)
    assert set(f["label"]) == set(its.loc[is_significant(its), "label"])
    first = f.iloc[0]
    assert first["label"] == first["root"] and first["role"] == "finding"
    planted_row = f.set_index("label").loc[PLANTED]
    assert planted_row["root"] == "age_group=0-40" and planted_row["role"] == "finding"  # worse than its parent
    overlap = f[f["role"] == "overlap"]
    assert len(overlap) and overlap["label"].str.contains("menopause=pre").all()
    assert (overlap["explained_by"] == "age_group=0-40").all()
    # a refinement holding its parent's very cases is not a separate finding
    same = f.set_index("label").loc["age_group=0-40 ∧ breast_density=d ∧ dense=yes"]
    assert same["role"] == "refinement"
    # every root comes before its refinements
    roots = list(f["root"])
    assert all(roots.index(r) <= k for k, r in enumerate(roots))
    # round trip through the analysis table
    wf = with_findings(its, tab, scores)
    assert (wf.loc[~is_significant(its), "role"] == "").all() and wf.attrs["statistic"] == "z_mw"
    # untested: 3 cases at 0 beside everyone else
    tiny = tab.index[(tab["age_group"] == "71+") & (tab["breast_density"] == "a") & (tab["menopause"] == "post")][:3]
    low = scores.copy()
    low[tiny] = 0.0
    its2 = divergent_itemsets(tab, low, min_support=0.005, max_length=3)
    small = untested_gaps(its2)
    assert len(small) and (small["count"] < 5).all() and (small["ps"] <= 0.25).all()
    assert any(set(lab.split(" ∧ ")) >= {"age_group=71+", "breast_density=a"} for lab in small["label"])


@pytest.mark.parametrize("lower_is_better", [False, True])
def test_no_flagged_row_shows_an_effect_of_the_opposite_sign(lower_is_better):
    """Issue 27: a subgroup flagged as worse was shown "better on average" (Δ > 0 beside a flag, Dice and
    HD95). Heavy-tailed scores where ranks and means disagree: every significant row's displayed effect (ps)
    says worse; Δ, the mean, may not, and is labelled as the mean."""
    from divaware import widgets

    rng = np.random.default_rng(4)
    meta, _, planted = planted_cohort(n=240, seed=4, gap=0.0)
    # the planted group: typically a little lower, but never fails; the rest fail (0) now and then
    dice = np.where(planted, rng.normal(0.78, 0.02, len(meta)), np.where(rng.random(len(meta)) < 0.12, 0.0,
                                                                        rng.normal(0.86, 0.03, len(meta))))
    frame = pd.DataFrame({"dice": dice, "hd95_mm": np.where(dice == 0, 80.0, 30 * (1 - dice))}, index=meta.index)
    metric = "hd95_mm" if lower_is_better else "dice"
    table = widgets.subgroup_explorer(meta, frame[[metric]], interactive=False, top=10_000, min_support=0.02)
    sig = table[table["significant"]]
    assert len(sig) and (sig["ps"] < 0.5).all() and (sig["ps_low"] <= sig["ps"]).all()
    # the case the issue saw: a flagged subgroup whose mean is better than average
    better_mean = sig["Δ"] > 0 if not lower_is_better else sig["Δ"] < 0
    assert better_mean.any()
