"""What a single comparison may claim: the verdict rule shared by notebook 04 and the README generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from divaware import metrics as M


@pytest.mark.parametrize(("lo", "hi", "n", "metric", "expected"), [
    (-0.010, 0.018, 61, "dice", "no clear change"),  # the interval straddles 0
    (0.0, 0.05, 61, "dice", "no clear change"),  # touching 0 is not excluding it
    (0.01, 0.05, 61, "dice", "improved"),
    (-0.05, -0.01, 61, "dice", "worse"),
    (0.02, 0.30, 2, "dice", "too few cases"),  # 71+ with n = 2 is not "improved"
    (-2.0, -0.5, 40, "hd95_mm", "improved"),  # a lower distance is better
    (float("nan"), float("nan"), 40, "dice", "no clear change"),
])
def test_change_verdict(lo, hi, n, metric, expected) -> None:
    assert M.change_verdict(lo, hi, n, metric=metric) == expected


def test_comparison_verdicts_flag_small_groups_like_the_plot() -> None:
    meta = pd.DataFrame({"age_group": ["0-40"] * 20 + ["71+"] * 2}, index=pd.Index([f"c{i}" for i in range(22)], name="patient_id"))
    a = pd.DataFrame({"dice": np.linspace(0.5, 0.9, 22)}, index=meta.index)
    b = a.assign(dice=a["dice"] + np.where(meta["age_group"] == "71+", 0.3, 0.05))
    cmp = M.compare_runs(a, b, meta, "age_group", n_boot=200)
    verdicts = dict(zip(cmp.per_group["group"], M.comparison_verdicts(cmp.per_group), strict=True))
    assert cmp.per_group.set_index("group").loc["71+", "ci_low"] > 0  # its interval alone would say improved
    assert verdicts == {"0-40": "improved", "71+": "too few cases"}
    with pytest.raises(ValueError, match="lacks column"):
        M.comparison_verdicts(cmp.per_group.drop(columns="n"))


def test_describe_change_states_seeds_interval_and_no_unsupported_direction() -> None:
    text = M.describe_change(0.005, -0.010, 0.018, labels=("ERM", "divaware"), n=61)
    assert text == ("divaware − ERM, mean Dice: +0.005 (95 % CI −0.010 to +0.018; one seed, 61 cases): "
                    "no clear change, the interval includes 0")
    assert "improved" not in text
    worse = M.describe_change(-0.03, -0.05, -0.01, what="age 0-40 Dice", labels=("ERM", "divaware"), seeds=3)
    assert worse.endswith("3 seeds): worse") and "age 0-40" in worse
