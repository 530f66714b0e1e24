"""One fairness report (FairnessReport) from per-case scores and one set of analysis settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from divaware import audit as A
from divaware import evaluate as E
from divaware.report import AnalysisSettings, FairnessReport, ReportFolder, analysis_defaults
from divaware.subgroups import is_significant


def _scores(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.choice(["0-40", "41-50", "51-60", "61-70"], n)
    meno = np.where(age == "0-40", "pre", rng.choice(["pre", "post"], n))
    density = rng.choice(["a", "b", "c", "d"], n)
    dice = np.clip(0.8 + 0.05 * rng.normal(size=n) - 0.3 * ((age == "0-40") & np.isin(density, ["c", "d"])), 0, 1)
    index = pd.Index([f"C{i:03d}" for i in range(n)], name="patient_id")
    norm_hd = np.clip(1 - dice + 0.02 * rng.normal(size=n), 0, 1)
    return pd.DataFrame({"dice": dice, "norm_hd": norm_hd, "age_group": age, "menopause": meno, "breast_density": density}, index=index)


def test_report_holds_overall_groups_worst_gaps_and_flagged_itemsets() -> None:
    per_case = _scores()
    settings = AnalysisSettings.from_strategy(n_boot=200)
    report = FairnessReport.from_scores(per_case, settings)
    assert {k: getattr(settings, k) for k in ("min_support", "max_length", "fdr", "min_count")} == analysis_defaults()
    overall = report.overall()
    assert overall["n"] == 120 and overall["mean_dice"] == pytest.approx(per_case["dice"].mean())
    age = report.per_group[report.per_group["attribute"] == "age_group"].set_index("group")
    assert age.loc["0-40", "n"] == (per_case["age_group"] == "0-40").sum()
    assert age.loc["0-40", "mean"] == pytest.approx(per_case.loc[per_case["age_group"] == "0-40", "dice"].mean())
    worst = report.worst_group()
    assert worst is not None and (worst["attribute"], worst["group"]) == ("age_group", "0-40")
    assert worst["n"] == age.loc["0-40", "n"]
    means = per_case.groupby("age_group")["dice"].mean()
    assert report.gaps()["age_group"] == pytest.approx(means.max() - means.min())
    assert report.divergent["flagged"].equals(is_significant(report.divergent, settings.fdr))
    assert len(report.flagged) >= 1 and report.flagged["divergence"].max() < 0  # the planted subgroup fails


def test_report_folder_round_trip_and_one_file_name_per_analysis(tmp_path: Path) -> None:
    report = FairnessReport.from_scores(_scores(), AnalysisSettings.from_strategy(n_boot=50))
    folder = ReportFolder(tmp_path / "audit", "audit")
    folder.begin()
    folder.write_report(report)
    assert not folder.is_complete()
    folder.finish(report.settings.to_dict())
    back = folder.read_report(("age_group", "menopause", "breast_density"))
    pd.testing.assert_frame_equal(back.divergent.drop(columns="items"), report.divergent.drop(columns="items"),
                                  check_dtype=False)
    assert list(back.divergent["items"]) == list(report.divergent["items"])
    assert back.settings == report.settings
    # evaluate and audit write the same analysis under the same names; only their manifests differ
    shared = set(E.FILES) & set(A.FILES) - {"manifest"}
    assert {k: E.FILES[k] for k in shared} == {k: A.FILES[k] for k in shared}
    assert E.FILES["divergent"] == A.FILES["divergent"] == ReportFolder.ITEMSETS
    assert E.FILES["manifest"] != A.FILES["manifest"]


def test_analysis_settings_refuse_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown analysis setting"):
        AnalysisSettings.from_strategy(min_suport=0.1)
    with pytest.raises(ValueError, match="at least one"):
        AnalysisSettings.from_strategy(())


def test_epoch_val_scores_reads_each_case_once_respecting_kind(tmp_path: Path) -> None:
    """With val_patches > 0 the last epoch holds window (patches) and full scores for every case; notebook 02
    reads one row per case, the full one (before, it read both: every case twice)."""
    from divaware.runfolder import RunFolder

    run = RunFolder(tmp_path)
    rows = [{"epoch": e, "patient_id": p, "kind": k, "dice": d}
            for e, k, d in ((1, "patches", 0.5), (2, "patches", 0.6), (2, "full", 0.7)) for p in ("A", "B")]
    pd.DataFrame(rows).to_csv(run.val_scores, index=False)
    last = run.epoch_val_scores()
    assert list(last.index) == ["A", "B"] and (last["dice"] == 0.7).all()
    pd.DataFrame([r for r in rows if r["kind"] == "full"]).drop(columns="kind").to_csv(run.val_scores, index=False)
    assert list(run.epoch_val_scores(2)["dice"]) == [0.7, 0.7]  # run folders without the column read as before
