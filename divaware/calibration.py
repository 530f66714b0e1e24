"""Does the divergence → weight step react to noise, and does it find what is there? Null and planted checks.

A refresh of a divergence-driven strategy looks at dozens of itemsets of a small validation split, so
some look divergent by chance. Two questions decide whether its weights mean anything:

* **False alarms** — with scores that carry no subgroup effect (the validation scores randomly permuted
  over the cases, which keeps their distribution and destroys any link to the attributes), how often do
  the weights move away from uniform? :func:`null_check` asks this of *your own* validation split (used
  by notebook 02); :func:`weight_trials` measures it on simulated splits.
* **Power** — with one planted underperforming subgroup, how often are its training cases up-weighted?
  :func:`weight_trials` with ``delta < 0``, on :func:`planted_split` cohorts.
* **Which test** — :func:`scenario_split` draws Dice-like splits (failures at 0.00 beside ~0.86) under
  permuted, heavy-tailed and heteroscedastic nulls (a small group with the same mean and a much larger
  variance, or reversed) and with a 0.08 gap of the hard group ``age_group=0-40 ∧ dense=yes``;
  :func:`detector_trials` runs every candidate test of :data:`divaware.subgroups.TESTS` on the same splits.

benchmarks/divergence_refresh.py writes both rates for the default and the former parameters into
benchmarks/DIVERGENCE.md; tests/test_weighting.py pins them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from divaware.subgroups import (
    AGE_GROUPS,
    DEFAULT_TEST,
    MIN_TEST_COUNT,
    TESTS,
    UNKNOWN,
    divergent_itemsets,
    is_significant,
    statistic_column,
)

__all__ = ["PLANTED_ITEMSET", "HARD_ITEMSET", "SCENARIOS", "NULL_SCENARIOS", "planted_split", "scenario_split",
           "detector_trials", "weight_trials", "null_check"]

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


# The hard group of scenario_split: young and dense (BI-RADS c/d), ~13 % of cases, as in the synthetic cohort.
HARD_ITEMSET = "age_group=0-40 ∧ dense=yes"
_SC_DENSITY_P = (0.15, 0.4, 0.3, 0.15)  # P(c or d) = 0.45, so P(young ∧ dense) = 0.3 · 0.45 ≈ 0.135
# Dice-like scores: a failure (Dice 0.00) with probability _FAIL, else N(0.86, 0.07) clipped to [0, 1].
_FAIL, _DICE_MEAN, _DICE_SD = 0.08, 0.86, 0.07

# What each scenario of scenario_split draws (see there); the first four have no gap in mean score.
SCENARIOS: tuple[str, ...] = ("permuted", "heavy_tailed", "heteroscedastic", "heteroscedastic_reversed",
                              "gap", "gap_failures")
NULL_SCENARIOS: tuple[str, ...] = SCENARIOS[:4]


def _dice_like(rng: np.random.Generator, n: int, fail: float = _FAIL, shift: float = 0.0) -> np.ndarray:
    ok = np.clip(rng.normal(_DICE_MEAN - shift, _DICE_SD, n), 0.0, 1.0)
    return np.where(rng.random(n) < fail, 0.0, ok)


def scenario_split(n: int, scenario: str, seed: int = 0, gap: float = 0.08,
                   prefix: str = "V") -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """``n`` cases with age_group / menopause / breast_density metadata and per-case scores of a scenario.

    Attributes are independent: age group as :func:`planted_split`, density a/b/c/d with probabilities
    0.15/0.40/0.30/0.15, so the hard group :data:`HARD_ITEMSET` (age 0-40 and density c or d) holds
    ~13.5 % of the cases (a random number). Scores per ``scenario``:

    * ``permuted``: N(0.8, 0.1) for everyone, then permuted over the cases (the former null);
    * ``heavy_tailed``: Dice-like for everyone: 0.00 with probability 0.08, else N(0.86, 0.07) clipped;
    * ``heteroscedastic``: same mean, much larger variance in the hard group: 0.00 with probability 1/9,
      else 0.90 (mean 0.80, SD 0.28) against N(0.80, 0.05) for the others;
    * ``heteroscedastic_reversed``: the same two distributions swapped (the hard group the narrow one);
    * ``gap``: Dice-like for everyone, the hard group's non-failures shifted down by gap / 0.92, so its
      mean is ``gap`` lower;
    * ``gap_failures``: Dice-like for everyone, the hard group failing more often (probability
      0.08 + gap / 0.86), so its mean is ``gap`` lower through missed tumours only.

    Returns (metadata, scores, hard flag), indexed by ``patient_id``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario_split: unknown scenario {scenario!r}; choose one of {list(SCENARIOS)}")
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"{prefix}{i:04d}" for i in range(n)], name="patient_id")
    age = rng.choice(AGE_GROUPS, n, p=_AGE_P).astype(object)
    density = rng.choice(_DENSITY, n, p=_SC_DENSITY_P).astype(object)
    meno = rng.choice(_MENO, n, p=_MENO_P).astype(object)
    hard = (age == "0-40") & np.isin(density, ("c", "d"))
    meta = pd.DataFrame({"age_group": age, "menopause": meno, "breast_density": density}, index=ids)
    k = int(hard.sum())

    def mixture(m: int) -> np.ndarray:
        return np.where(rng.random(m) < 1 / 9, 0.0, 0.9)

    s = np.empty(n)
    if scenario == "permuted":
        s = rng.permutation(rng.normal(0.8, 0.1, n))
    elif scenario == "heavy_tailed":
        s = _dice_like(rng, n)
    elif scenario == "heteroscedastic":
        s[hard], s[~hard] = mixture(k), rng.normal(0.8, 0.05, n - k)
    elif scenario == "heteroscedastic_reversed":
        s[hard], s[~hard] = rng.normal(0.8, 0.05, k), mixture(n - k)
    elif scenario == "gap":
        s[hard], s[~hard] = _dice_like(rng, k, shift=gap / (1 - _FAIL)), _dice_like(rng, n - k)
    else:  # gap_failures
        s[hard], s[~hard] = _dice_like(rng, k, fail=_FAIL + gap / _DICE_MEAN), _dice_like(rng, n - k)
    return meta, pd.Series(s, index=ids, name="score"), pd.Series(hard, index=ids, name="hard")


def detector_trials(
    scenario: str,
    *,
    n_val: int = 96,
    trials: int = 200,
    seed: int = 0,
    tests: tuple[str, ...] = TESTS,
    fdr: float = 0.05,
    min_support: float = 0.05,
    max_length: int | None = 3,
    attributes: tuple[str, ...] | None = None,
    gap: float = 0.08,
) -> pd.DataFrame:
    """The detector alone, per test, on ``trials`` seeded :func:`scenario_split` validation splits.

    One row per trial and test: ``flagged`` (some itemset flagged as the strategies flag: q ≤ ``fdr`` and the
    test's effect pointing at "worse", ps < 0.5 for the rank test, Δ < 0 for the mean tests: under a null
    scenario a false alarm, and then the ``divaware`` weights are not uniform), ``hard_found`` (at least
    half of the hard cases lie in a flagged itemset), ``flags`` (number of flagged itemsets) and
    ``hard_count``. The itemsets are mined once per trial and every test sees the same split.
    """
    from divaware.subgroups import (
        EFFECT_COLUMNS,
        _membership_keys,
        _mined,
        _p_and_q,
        attribute_table,
        superiority,
    )

    rows = []
    for trial in range(int(trials)):
        meta, scores, hard = scenario_split(n_val, scenario, seed=int(np.random.default_rng([seed, trial]).integers(2**31)),
                                            gap=gap)
        table = attribute_table(meta, attributes)
        tab, s, _, members = _mined(table, scores, min_support, max_length, MIN_TEST_COUNT)
        keys = _membership_keys(members)
        h = hard.reindex(tab.index).to_numpy(bool)
        for test in tests:
            div, _, _, q = _p_and_q(members, s, test, MIN_TEST_COUNT, keys)
            worse = superiority(members, s)[0] < 0.5 if EFFECT_COLUMNS[test] == "ps" else div < 0
            with np.errstate(invalid="ignore"):
                flag = worse & (q <= fdr)
            covered = members[flag].any(axis=0) if flag.any() else np.zeros(len(s), dtype=bool)
            rows.append({"trial": trial, "test": test, "flagged": bool(flag.any()), "flags": int(flag.sum()),
                         "hard_found": bool(h.any() and covered[h].mean() >= 0.5), "hard_count": int(h.sum())})
    return pd.DataFrame(rows)


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
    scenario: str | None = None,
) -> pd.DataFrame:
    """One ``strategy`` refresh per trial on a fresh :func:`planted_split` validation split.

    With ``scenario`` (one of :data:`SCENARIOS`) the validation split comes from :func:`scenario_split`
    instead (``support``, ``delta`` and ``sd`` are then unused; the null scenarios have no mean gap, the
    others a gap of 0.08) and "planted" means the hard group :data:`HARD_ITEMSET`. The divergence test is
    the strategy's (``strategy_params={"test": ...}``); the per-refresh permutation false-alarm rate is
    off unless ``null_permutations`` is given.

    The training split (``n_train`` cases, same planted subgroup) gets the weights. With ``delta`` 0 the
    scores are also permuted, a null with no subgroup effect whatever the split. One row per trial:
    ``ratio`` = max/min weight, ``uniform`` = ratio ≤ 1.5, ``planted_ratio`` = mean weight of the planted
    training cases / mean weight of the others, ``found`` = planted_ratio ≥ 1.5, ``discoveries`` = itemsets
    that drove weights (flagged: q ≤ fdr, effect worse, |statistic| ≥ t_min), ``clipped`` = share of the
    training cases whose weight a clip bound set, ``flagged_below_1`` = training cases in a flagged itemset
    with weight < 1, ``planted_weight`` = mean weight of the planted training cases.
    """
    from divaware.weighting import make_strategy

    params = {"warmup_epochs": 0, **dict(strategy_params or {})}
    if strategy in ("divaware", "paper"):
        params.setdefault("null_permutations", 0)
    rows = []
    for trial in range(int(trials)):
        rng = np.random.default_rng([int(seed), trial])
        s_val, s_train, s_perm = (int(x) for x in rng.integers(0, 2**31, 3))
        if scenario is not None:
            val_meta, scores, _ = scenario_split(n_val, scenario, seed=s_val, prefix="V")
            train_meta, _, planted = scenario_split(n_train, "heavy_tailed", seed=s_train, prefix="T")
        else:
            val_meta, scores, _ = planted_split(n_val, support, delta, sd, seed=s_val, prefix="V")
            train_meta, _, planted = planted_split(n_train, support, 0.0, sd, seed=s_train, prefix="T")
        if delta == 0 and scenario is None:
            scores = pd.Series(np.random.default_rng(s_perm).permutation(scores.to_numpy()), index=scores.index)
        st = make_strategy(strategy, **params)
        st.fit(train_meta)
        w = st.refresh(0, val_meta, scores).reindex(train_meta.index).to_numpy(float)
        cd = st.case_divergence
        flagged = int(cd.loc[cd["worst_itemset"] != "", "worst_itemset"].nunique())
        in_flagged = (cd["worst_itemset"] != "").reindex(train_meta.index).to_numpy(bool)
        pw = planted.to_numpy(bool)
        ratio_planted = float(w[pw].mean() / w[~pw].mean()) if pw.any() and (~pw).any() else float("nan")
        rows.append({"trial": trial, "ratio": float(w.max() / w.min()), "planted_ratio": ratio_planted,
                     "discoveries": flagged, "clipped": float((cd["clip"] != "").mean()),
                     "flagged_below_1": int((w[in_flagged] < 1 - 1e-12).sum()),
                     "planted_weight": float(w[pw].mean()) if pw.any() else float("nan")})
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
    test: str = DEFAULT_TEST,
) -> pd.DataFrame:
    """What would noise alone flag on this validation split? The analysis on permuted scores.

    ``table`` is the attribute table of the validation cases (:func:`~divaware.subgroups.attribute_table`),
    ``scores`` their per-case scores.
    Row 0 (``analysis`` = "real") is the real analysis; rows 1… permute the scores over the cases. Per
    row: ``tested`` (distinct itemsets with a p-value), ``t_flags`` (Δ < 0 and |statistic| ≥ ``t_min``: the
    former, uncorrected rule), ``fdr_flags`` (:func:`~divaware.subgroups.is_significant` at ``fdr``: what
    the ``divaware`` strategy acts on), ``min_q`` and ``worst`` (the most negative Δ among the fdr flags,
    "" if none). On permuted rows
    any flag is a false alarm: their share estimates how often this split alone would re-weight on noise.
    ``test`` is the divergence test behind q (default: the one ``divaware`` uses); ``t_flags`` use its
    statistic. Permutations make the scores exchangeable, so they cannot show a test's behaviour when a
    subgroup's scores are *spread* differently (the heteroscedastic null); :func:`detector_trials` and
    :func:`weight_trials` measure that on simulated splits (``scenario="heteroscedastic"``).
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
        its = divergent_itemsets(table, s, min_support=min_support, max_length=max_length, test=test)
        neg = its["divergence"] < 0
        fdr_hit = its[is_significant(its, fdr)]
        stat = its[statistic_column(its)]
        rows.append({
            "analysis": "real" if k == 0 else "permuted",
            "permutation": k,
            "tested": int(its.attrs.get("n_tests", int(its["p"].notna().sum()))),
            "t_flags": int((neg & (stat.abs() >= t_min)).sum()),
            "fdr_flags": int(len(fdr_hit)),
            "min_q": float(its["q"].min()) if its["q"].notna().any() else float("nan"),
            "worst": str(fdr_hit.iloc[0]["label"]) if len(fdr_hit) else "",
        })
    return pd.DataFrame(rows)
