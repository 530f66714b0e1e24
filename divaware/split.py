"""The fairness-validation split: training carves it from the challenge's train split, seeded and
stratified (:func:`split_train_val`); :func:`run_val_ids` reads it back from a run folder."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from divaware.cohort import Cohort


def run_val_ids(run_dir: str | Path, cohort: Cohort) -> list[str]:
    """The run's fairness-validation cases (its ``splits.csv``) that the cohort still holds.

    Cases excluded by the cohort's checks since training are left out with a warning naming them.
    """
    from divaware.runfolder import RunFolder

    run = RunFolder(run_dir)
    path = run.splits
    if not path.is_file():
        raise ValueError(f"split 'val' needs the run's {path} (written by training); none found")
    ids = run.split_ids("val")
    gone = [i for i in ids if i not in cohort.cases]
    if gone:
        warnings.warn(f"{len(gone)} validation case(s) of {path} are not usable in {cohort.root} and are left "
                      f"out: {', '.join(gone[:10])}", stacklevel=3)
    return [i for i in ids if i in cohort.cases]


# ------------------------------------------------------------------------------------------------
# the fairness-validation split (training carves it from the challenge's train split; see run_val_ids)
# ------------------------------------------------------------------------------------------------


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from (run seed, purpose, epoch, ...): independent streams, stable across runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# The fairness-validation split never takes more than this share of the training cases (≥ 60 % train).
MAX_VAL_SHARE = 0.4


def val_case_count(n: int, val_fraction: float, min_val_cases: int) -> int:
    """How many of ``n`` training cases form the fairness-validation split.

    round(n · val_fraction), raised to ``min_val_cases`` where that leaves ≥ 60 % of the cases for
    training, else to floor(n · 0.4), never lowered: the detector's power to flag a 0.08 Dice gap of a
    ~13 % subgroup is 18 % per refresh at 48 validation cases and 52 % at 96 (benchmarks/DIVERGENCE.md),
    so 96 is the floor where the cohort allows it. At least 1 case on each side.
    """
    base = round(n * val_fraction)
    floor = min(int(min_val_cases), math.floor(n * MAX_VAL_SHARE))
    return max(1, min(n - 1, max(base, floor)))


def split_train_val(
    metadata: pd.DataFrame,
    patient_ids: Sequence[str],
    val_fraction: float,
    stratify: Sequence[str],
    seed: int,
    min_val_cases: int,
) -> pd.DataFrame:
    """Divide ``patient_ids`` into ``train`` and ``val``, stratified by ``stratify``, seeded.

    Strata are the combinations of the stratify attributes; a case whose full combination has fewer than
    ``ceil(1 / val_fraction)`` members falls back to the combination of the first k-1 attributes, and so on
    (down to one pooled stratum), so rare intersections do not make the split degenerate. Each stratum gives
    floor(n * val_fraction) cases and the remaining slots (to reach round(N * val_fraction)) go to the strata
    with the largest remainders. Returns ``patient_id, split, stratum`` sorted by patient_id.
    ``min_val_cases`` raises the split's size by :func:`val_case_count` (the fraction used in the strata
    is then that count / N).
    """
    from divaware.subgroups import attribute_table

    ids = sorted(str(i) for i in patient_ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 training cases to carve a validation split, got {len(ids)}")
    attrs = list(stratify)
    if attrs:
        table = attribute_table(metadata.loc[ids], attrs)
    else:
        table = pd.DataFrame(index=pd.Index(ids, name="patient_id"))
    n_val = val_case_count(len(ids), val_fraction, min_val_cases)
    val_fraction = n_val / len(ids)
    min_n = math.ceil(1.0 / val_fraction)
    stratum = pd.Series("all", index=table.index, dtype=object)
    assigned = pd.Series(False, index=table.index)
    for k in range(len(attrs), 0, -1):
        keys = table[attrs[:k]].astype(str).agg("|".join, axis=1)
        counts = keys[~assigned].value_counts()
        ok = keys.map(counts).fillna(0).ge(min_n) & ~assigned
        stratum[ok] = keys[ok]
        assigned |= ok
    rng = np.random.default_rng(derived_seed(seed, "split"))
    total_val = n_val
    groups = {s: sorted(stratum.index[stratum == s]) for s in sorted(stratum.unique())}
    quota = {s: int(math.floor(len(m) * val_fraction)) for s, m in groups.items()}
    remainder = {s: len(m) * val_fraction - quota[s] for s, m in groups.items()}
    tiebreak = rng.random(len(groups))
    order = sorted(groups, key=lambda s: (-remainder[s], tiebreak[list(groups).index(s)]))
    for s in order[: max(0, total_val - sum(quota.values()))]:
        quota[s] += 1
    val: set[str] = set()
    for s, members in groups.items():
        perm = rng.permutation(len(members))
        val.update(members[i] for i in perm[: quota[s]])
    out = pd.DataFrame({"patient_id": ids, "split": ["val" if i in val else "train" for i in ids],
                        "stratum": [stratum[i] for i in ids]})
    return out
