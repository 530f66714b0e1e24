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


def test_notebook_defaults_are_the_clis() -> None:
    import argparse

    import papermill

    from divaware.audit import analysis_defaults
    from divaware.cli import build_parser
    from divaware.evaluate import DEFAULT_ATTRIBUTES

    params = {k: v["default"] for k, v in papermill.inspect_notebook(str(NOTEBOOK)).items()}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cli = {a.dest: a.default for a in sub.choices["audit"]._actions}
    defaults = analysis_defaults()
    assert float(params["min_support"]) == defaults["min_support"]  # the CLI's None means these
    assert float(params["fdr"]) == defaults["fdr"]
    assert int(params["n_boot"]) == cli["n_boot"] and int(params["n_permutations"]) == cli["permutations"]
    assert params["split"].strip("\"'") == cli["split"]
    assert eval(params["attributes"]) == list(DEFAULT_ATTRIBUTES)  # noqa: S307 - the notebook's own literal


def test_notebook_runs_on_every_documented_split(synthetic_root: Path, tmp_path: Path) -> None:
    ids = load_cohort(synthetic_root, check_voxels=False).ids("train")[:15]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    for split in ("all", str(tmp_path / "ids.txt")):
        out = tmp_path / f"nb05_{Path(split).stem}"
        pipeline.execute_notebook(NOTEBOOK, tmp_path / f"05_{Path(split).stem}.ipynb", {
            "data_root": str(synthetic_root), "split": split, "demo_attribute": "breast_density", "demo_value": "c",
            "out_dir": str(out), "n_boot": 20, "n_permutations": 2,
        })
        results = json.loads((out / "results.json").read_text())
        if split == "all":
            assert results["n_cases"] == 40 and results["weights"] is None  # test cases may not drive weights
        else:
            assert results["n_cases"] == len(ids) and results["weights"]["n"] > 0
