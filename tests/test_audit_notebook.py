"""Notebook 05 (audit any model): committed clean, and executed on the fixture cohort with a planted failure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import test_notebooks as series_tests

from divaware import pipeline
from divaware.cohort import load_cohort
from divaware.metrics import challenge_score

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_audit.ipynb"
PLANTED = "breast_density=c"  # 7 training cases of the 40-case fixture: enough to be tested (≥ 5)


def test_committed_notebook_is_clean() -> None:
    series_tests.test_committed_notebook_is_clean("05_audit")


def test_notebook_audits_the_demo_and_flags_the_planted_subgroup(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "nb05"
    pipeline.execute_notebook(NOTEBOOK, tmp_path / "05_audit.ipynb", {
        "data_root": str(synthetic_root), "split": "train", "demo_attribute": "breast_density", "demo_value": "c", "out_dir": str(out),
        "n_boot": 50, "n_permutations": 5, "min_support": 0.05,
    })
    results = json.loads((out / "results.json").read_text())
    meta = load_cohort(synthetic_root, check_voxels=False).metadata
    train = meta[meta["split"] == "train"]
    assert results["n_planted"] == int((train["breast_density"] == "c").sum())
    assert results["planted_flagged"] is True and PLANTED in results["flagged"]
    assert results["n_cases"] == len(train) and results["missing"] == []
    # the recorded challenge score is the one recomputed from the written per-case table
    per_case = pd.read_csv(out / "audit" / "per_case.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert results["challenge"]["ranking"] == challenge_score(per_case, per_case)["ranking"]
    # weights of a training-split audit: the planted cases are up-weighted, mean 1
    weights = pd.read_csv(out / "weights.csv", dtype={"patient_id": str}).set_index("patient_id")
    planted = train.index[train["breast_density"] == "c"]
    assert (weights.loc[planted, "weight"] > 1).all()
    flagged = weights["worst_itemset"].fillna("") != ""
    assert results["weights"]["n_up"] == int(flagged.sum()) and (weights.loc[flagged, "weight"] >= 1).all()
    assert results["roles"][PLANTED] in ("finding", "refinement", "overlap")
    assert abs(weights["weight"].mean() - 1) < 1e-9
