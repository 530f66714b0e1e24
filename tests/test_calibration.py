"""The null and planted checks of the divergence → weight step (divaware.calibration)."""

from __future__ import annotations

import numpy as np
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
