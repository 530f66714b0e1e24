"""The null and planted checks of the divergence → weight step (divaware.calibration)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from planted import PLANTED, planted_cohort

from divaware.calibration import PLANTED_ITEMSET, null_check, planted_split
from divaware.subgroups import attribute_table, divergent_itemsets


def test_planted_split_has_exact_support_and_gap():
    meta, scores, planted = planted_split(240, 0.10, -0.1, sd=0.1, seed=4)
    assert planted.sum() == 24
    in_itemset = (meta["age_group"] == "0-40") & (meta["breast_density"] == "d")
    assert (in_itemset == planted).all()  # no other case falls into the planted intersection
    assert PLANTED_ITEMSET == PLANTED
    gap = scores[planted].mean() - scores[~planted].mean()
    assert gap == pytest.approx(-0.1, abs=0.06)
    with pytest.raises(ValueError, match="support"):
        planted_split(10, 1.5, 0.0)


def test_null_check_real_row_is_the_analysis_and_noise_rarely_flags():
    meta, scores, _ = planted_cohort(200, seed=5)
    table = attribute_table(meta)
    result = null_check(table, scores, n_permutations=20, seed=1, min_support=0.02, max_length=3)
    assert len(result) == 21 and result["analysis"].tolist() == ["real"] + ["permuted"] * 20
    its = divergent_itemsets(table, scores, min_support=0.02, max_length=3)
    real = result.iloc[0]
    assert real["fdr_flags"] == int(((its["divergence"] < 0) & (its["q"] <= 0.05)).sum()) > 0
    assert real["worst"] != "" and real["min_q"] == pytest.approx(its["q"].min())
    permuted = result.iloc[1:]
    # noise: the uncorrected rule flags something in most permutations, the FDR control rarely does
    assert (permuted["t_flags"] > 0).mean() >= 0.5
    assert (permuted["fdr_flags"] > 0).mean() <= 0.15
    # seeded
    again = null_check(table, scores, n_permutations=20, seed=1, min_support=0.02, max_length=3)
    np.testing.assert_array_equal(again["fdr_flags"], result["fdr_flags"])


def test_scenario_split_draws_what_it_says():
    from divaware.calibration import HARD_ITEMSET, scenario_split

    assert HARD_ITEMSET == "age_group=0-40 ∧ dense=yes"
    meta, s, hard = scenario_split(4000, "heteroscedastic", seed=1)
    young_dense = (meta["age_group"] == "0-40") & meta["breast_density"].isin(["c", "d"])
    assert (young_dense == hard).all() and 0.12 < hard.mean() < 0.15
    assert set(np.unique(s[hard])) == {0.0, 0.9} and (s[hard] == 0).mean() == pytest.approx(1 / 9, abs=0.03)
    assert s[hard].mean() == pytest.approx(0.8, abs=0.03) and s[~hard].std() == pytest.approx(0.05, abs=0.005)
    _, s, hard = scenario_split(4000, "gap", seed=2)
    assert s[~hard].mean() - s[hard].mean() == pytest.approx(0.08, abs=0.03)
    assert (s[~hard] == 0).mean() == pytest.approx(0.08, abs=0.015)  # Dice-like failures
    _, s, hard = scenario_split(4000, "gap_failures", seed=3)
    assert s[~hard].mean() - s[hard].mean() == pytest.approx(0.08, abs=0.03)
    assert (s[hard] == 0).mean() == pytest.approx(0.08 + 0.08 / 0.86, abs=0.04)
    # seeded
    pd.testing.assert_series_equal(scenario_split(50, "gap", seed=9)[1], scenario_split(50, "gap", seed=9)[1])
    with pytest.raises(ValueError, match="scenario"):
        scenario_split(10, "nonsense")


def test_detector_trials_compare_tests_on_the_same_splits():
    from divaware.calibration import detector_trials

    gap = detector_trials("gap", n_val=192, trials=6, seed=1, tests=("mannwhitney", "welch"))
    assert len(gap) == 12 and set(gap["test"]) == {"mannwhitney", "welch"}
    by = gap.groupby("test")[["flagged", "hard_found"]].mean()
    # a 0.08 gap in Dice-like scores at 192 cases: ranks find it, Welch (failures inflate the variance) does not
    assert by.loc["mannwhitney", "hard_found"] >= 5 / 6 and by.loc["welch", "hard_found"] <= 1 / 6
    null = detector_trials("heavy_tailed", n_val=96, trials=6, seed=1, tests=("mannwhitney",))
    assert null["flagged"].sum() <= 1 and (null["hard_count"] > 0).all()
