"""Does the divergence → weight step react to noise, and does it find what is there? Null and planted checks.

A refresh of a divergence-driven strategy looks at dozens of itemsets of a small validation split, so
some look divergent by chance. Two questions decide whether its weights mean anything:

* **False alarms** — with scores that carry no subgroup effect (the validation scores randomly permuted
  over the cases, which keeps their distribution and destroys any link to the attributes), how often do
  the weights move away from uniform? :func:`null_check` asks this of *your own* validation split (used
  by notebook 02); :func:`weight_trials` measures it on simulated splits.
* **Power** — with one planted underperforming subgroup, how often are its training cases up-weighted?
  :func:`weight_trials` with ``delta < 0``, on :func:`planted_split` cohorts.

benchmarks/divergence_refresh.py writes both rates for the default and the former parameters into
benchmarks/DIVERGENCE.md; tests/test_weighting.py pins them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from divaware.subgroups import AGE_GROUPS, UNKNOWN, divergent_itemsets

__all__ = ["PLANTED_ITEMSET", "planted_split", "weight_trials", "null_check"]

# The planted subgroup of planted_split: a two-attribute intersection, as in the paper's findings.
PLANTED_ITEMSET = "age_group=0-40 ∧ breast_density=d"
_AGE_P = (0.3, 0.2, 0.2, 0.2, 0.1)
_DENSITY, _DENSITY_P = ("a", "b", "c", "d"), (0.15, 0.2, 0.25, 0.4)
_MENO, _MENO_P = ("pre", "post", UNKNOWN), (0.4, 0.4, 0.2)


def planted_split(n: int, support: float, delta: float, sd: float = 0.1, seed: int = 0,
                  prefix: str = "V", mean: float = 0.8) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """``n`` cases with age_group / menopause / breast_density metadata and per-case scores.

    Exactly round(support · n) cases form :data:`PLANTED_ITEMSET` (the others are redrawn until they
    fall outside it); scores are N(mean, sd) plus ``delta`` for the planted cases (``delta`` 0: no
    subgroup effect at all). Returns (metadata, scores, planted flag), indexed by ``patient_id``.
    """
    if not 0 <= support < 1:
        raise ValueError(f"planted_split: support must be in [0, 1), got {support}")
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"{prefix}{i:04d}" for i in range(n)], name="patient_id")
    k = int(round(support * n))
    age = rng.choice(AGE_GROUPS, n, p=_AGE_P).astype(object)
    density = rng.choice(_DENSITY, n, p=_DENSITY_P).astype(object)
    meno = rng.choice(_MENO, n, p=_MENO_P).astype(object)
    planted = np.zeros(n, dtype=bool)
    planted[rng.permutation(n)[:k]] = True
    age[planted], density[planted] = "0-40", "d"
    for j in np.flatnonzero(~planted & (age == "0-40") & (density == "d")):
        while age[j] == "0-40" and density[j] == "d":
            age[j], density[j] = rng.choice(AGE_GROUPS, p=_AGE_P), rng.choice(_DENSITY, p=_DENSITY_P)
    meta = pd.DataFrame({"age_group": age, "menopause": meno, "breast_density": density}, index=ids)
    scores = pd.Series(rng.normal(mean, sd, n) + delta * planted, index=ids, name="score")
    return meta, scores, pd.Series(planted, index=ids, name="planted")


def weight_trials(
    strategy_params: Mapping[str, Any] | None = None,
    *,
    n_val: int = 48,
    n_train: int = 192,
    support: float = 0.15,
    delta: float = 0.0,
    sd: float = 0.1,
    trials: int = 40,
    seed: int = 0,
    strategy: str = "divaware",
) -> pd.DataFrame:
    """One ``strategy`` refresh per trial on a fresh :func:`planted_split` validation split.

    The training split (``n_train`` cases, same planted subgroup) gets the weights. With ``delta`` 0 the
    scores are also permuted, a null with no subgroup effect whatever the split. One row per trial:
    ``ratio`` = max/min weight, ``uniform`` = ratio ≤ 1.5, ``planted_ratio`` = mean weight of the planted
    training cases / mean weight of the others, ``found`` = planted_ratio ≥ 1.5, ``discoveries`` = itemsets
    that drove weights (q ≤ fdr and |t| ≥ t_min, Δ < 0).
    """
    from divaware.weighting import make_strategy

    params = {"warmup_epochs": 0, **dict(strategy_params or {})}
    rows = []
    for trial in range(int(trials)):
        rng = np.random.default_rng([int(seed), trial])
        s_val, s_train, s_perm = (int(x) for x in rng.integers(0, 2**31, 3))
        val_meta, scores, _ = planted_split(n_val, support, delta, sd, seed=s_val, prefix="V")
        train_meta, _, planted = planted_split(n_train, support, 0.0, sd, seed=s_train, prefix="T")
        if delta == 0:
            scores = pd.Series(np.random.default_rng(s_perm).permutation(scores.to_numpy()), index=scores.index)
        st = make_strategy(strategy, **params)
        st.fit(train_meta)
        w = st.refresh(0, val_meta, scores).reindex(train_meta.index).to_numpy(float)
        cd = st.case_divergence
        flagged = int(cd.loc[cd["divergence"] < 0, "worst_itemset"].nunique())
        pw = planted.to_numpy(bool)
        ratio_planted = float(w[pw].mean() / w[~pw].mean()) if pw.any() and (~pw).any() else float("nan")
        rows.append({"trial": trial, "ratio": float(w.max() / w.min()), "planted_ratio": ratio_planted,
                     "discoveries": flagged})
    out = pd.DataFrame(rows)
    out["uniform"] = out["ratio"] <= 1.5
    out["found"] = out["planted_ratio"] >= 1.5
    return out


def null_check(
    table: pd.DataFrame,
    scores: pd.Series,
    *,
    n_permutations: int = 50,
    seed: int = 0,
    min_support: float = 0.02,
    max_length: int | None = 3,
    fdr: float = 0.05,
    t_min: float = 2.0,
) -> pd.DataFrame:
    """What would noise alone flag on this validation split? The analysis on permuted scores.

    ``table`` is the attribute table of the validation cases (:func:`~divaware.subgroups.attribute_table`),
    ``scores`` their per-case scores.
    Row 0 (``analysis`` = "real") is the real analysis; rows 1… permute the scores over the cases. Per
    row: ``tested`` (distinct itemsets with a p-value), ``t_flags`` (Δ < 0 and |t| ≥ ``t_min``: the
    former, uncorrected rule), ``fdr_flags`` (Δ < 0 and q ≤ ``fdr``: what the ``divaware`` strategy acts
    on), ``min_q`` and ``worst`` (the most negative Δ among the fdr flags, "" if none). On permuted rows
    any flag is a false alarm: their share estimates how often this split alone would re-weight on noise.
    """
    if not isinstance(scores, pd.Series):
        raise TypeError("null_check: scores must be a pandas Series indexed by patient_id")
    if n_permutations < 1:
        raise ValueError(f"null_check: n_permutations must be ≥ 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    values = scores.to_numpy(float)
    rows = []
    for k in range(int(n_permutations) + 1):
        s = scores if k == 0 else pd.Series(rng.permutation(values), index=scores.index)
        its = divergent_itemsets(table, s, min_support=min_support, max_length=max_length)
        neg = its["divergence"] < 0
        fdr_hit = its[neg & (its["q"] <= fdr)]
        rows.append({
            "analysis": "real" if k == 0 else "permuted",
            "permutation": k,
            "tested": int(its.attrs.get("n_tests", int(its["p"].notna().sum()))),
            "t_flags": int((neg & (its["t"].abs() >= t_min)).sum()),
            "fdr_flags": int(len(fdr_hit)),
            "min_q": float(its["q"].min()) if its["q"].notna().any() else float("nan"),
            "worst": str(fdr_hit.iloc[0]["label"]) if len(fdr_hit) else "",
        })
    return pd.DataFrame(rows)
