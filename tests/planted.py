"""A small metadata table with a planted underperforming subgroup, shared by the subgroup and weighting tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from divaware.subgroups import AGE_GROUPS, UNKNOWN

PLANTED = "age_group=0-40 ∧ breast_density=d"


def planted_cohort(n: int = 400, seed: int = 0, gap: float = 0.2,
                   prefix: str = "C") -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Independent attributes; age_group=0-40 ∧ breast_density=d (~12 %) scores `gap` lower, plus noise.

    Returns (metadata, scores, planted flag), all indexed by patient_id.
    """
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"{prefix}{i:04d}" for i in range(n)], name="patient_id")
    age = rng.choice(AGE_GROUPS, n, p=[0.3, 0.2, 0.2, 0.2, 0.1])
    density = rng.choice(["a", "b", "c", "d"], n, p=[0.15, 0.2, 0.25, 0.4])
    meno = rng.choice(["pre", "post", UNKNOWN], n, p=[0.4, 0.4, 0.2])
    meta = pd.DataFrame({"age_group": age, "menopause": meno, "breast_density": density}, index=ids)
    planted = (age == "0-40") & (density == "d")
    scores = pd.Series(np.clip(rng.normal(0.8, 0.08, n) - gap * planted, 0, 1), index=ids)
    return meta, scores, pd.Series(planted, index=ids)
