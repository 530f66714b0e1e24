"""The decisive experiment: config checks, and the report's numbers on runs with known per-case Dice."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from divaware.experiment import check_experiment, load_experiment, run_config
from divaware.synthetic import read_truth

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "experiment_report.py"


def _report_module():
    # the benchmark scripts import their shared helpers as `_common` (run as scripts, their folder is on sys.path)
    if str(REPORT.parent) not in sys.path:
        sys.path.insert(0, str(REPORT.parent))
    spec = importlib.util.spec_from_file_location("experiment_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_experiment_configs_are_valid_and_sized_as_the_issue_asks():
    root = Path(__file__).resolve().parents[1] / "configs"
    rep = load_experiment(root / "experiment_representation.yaml")
    assert rep["disparity"] == "representation" and len(rep["seeds"]) >= 5
    assert set(rep["strategies"]) == {"erm", "inverse_frequency", "group_dro", "paper", "divaware", "oracle"}
    assert rep["heldout"]["cases"] >= 600 and rep["heldout"]["seed"] != rep["training"]["synthetic_seed"]
    assert run_config(rep, "group_dro", 3, "runs/x").alpha == 0.0  # GroupDRO on its own objective
    c = run_config(rep, "oracle", 3, "runs/x")
    assert (c.strategy, c.seed, c.synthetic_disparity, c.cpu_threads) == ("oracle", 3, "representation", 1)
    assert c.run_dir() == Path("runs/x/runs/oracle_seed3")
    intr = load_experiment(root / "experiment_intrinsic.yaml")
    assert intr["disparity"] == "intrinsic" and {"erm", "divaware", "oracle"} <= set(intr["strategies"])


@pytest.mark.parametrize(("bad", "match"), [
    ({"disparity": "both"}, "disparity"), ({"strategies": ["erm", "orcale"]}, "orcale"),
    ({"training": {"seed": 3}}, "training.seed"), ({"heldout": {"cases": 800, "seed": 0}}, "another cohort"),
    ({"seeds": [0], "typo": 1}, "typo"), ({"training": {"epochs": 0}}, "epochs"),
])
def test_bad_experiment_configs_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        check_experiment(bad)


# ------------------------------------------------------------------------------------------------
# Look-alike experiments: the data arms (counterfactual, balanced) and the ladder
# ------------------------------------------------------------------------------------------------


def _without_unknown_strategies(path: Path) -> dict:
    """A shipped config with strategies this branch does not define (febs comes from another branch) left out."""
    from divaware.weighting import STRATEGIES

    config = yaml.safe_load(path.read_text())
    config["strategies"] = [s for s in config["strategies"] if s in STRATEGIES]
    return check_experiment(config, str(path))


def test_shipped_lookalike_configs_rung_the_ladder_at_the_issues_size():
    from divaware.synthetic import plan_cohort

    root = Path(__file__).resolve().parents[1] / "configs"
    look = load_experiment(root / "experiment_lookalike.yaml")
    assert set(look["strategies"]) == {"erm", "oracle", "divaware", "inverse_frequency", "group_dro", "febs", "paper"}
    assert look["disparity"] == "lookalike" and look["arms"] == ["counterfactual", "balanced"]
    weak = load_experiment(root / "experiment_lookalike_weak.yaml")
    intr = load_experiment(root / "experiment_intrinsic.yaml")
    assert weak["disparity"] == "lookalike_weak" and weak["arms"] == [] and intr["arms"] == []
    assert set(weak["strategies"]) == set(intr["strategies"]) == {"erm", "oracle", "divaware"}
    for cfg in (look, weak, intr):
        assert cfg["seeds"] == [0, 1, 2, 3, 4] and cfg["heldout"]["cases"] == 800
        t = cfg["training"]
        assert (t["epochs"], t["channels"], t["num_res_units"], t["cpu_threads"]) == (20, [8, 16, 32, 64], 0, 1)
        plan = plan_cohort(t["synthetic_cases"], seed=t["synthetic_seed"])
        assert (plan["split"] == "train").sum() == 239  # 300-case cohorts: 239 challenge-train cases
        oracle, diva = run_config(cfg, "oracle", 1, "runs/x"), run_config(cfg, "divaware", 1, "runs/x")
        assert oracle.warmup_epochs == 0 and oracle.alpha == 0.5  # the ceiling: weights from the first epoch
        assert (diva.warmup_epochs, diva.update_every) == (1, 1)  # divaware acts from the first epochs
    assert run_config(look, "paper", 0, "runs/x").warmup_epochs == 1
    cf = run_config(look, "counterfactual", 2, "runs/x")
    assert (cf.strategy, cf.synthetic_counterfactual, cf.synthetic_hard_fraction) == ("erm", True, None)
    assert cf.run_dir() == Path("runs/x/runs/counterfactual_seed2") and cf.synthetic_disparity == "lookalike"
    bal = run_config(look, "balanced", 2, "runs/x")
    assert (bal.strategy, bal.synthetic_counterfactual, bal.synthetic_hard_fraction) == ("erm", False, 0.5)
    erm = run_config(look, "erm", 2, "runs/x")
    assert (erm.synthetic_counterfactual, erm.synthetic_hard_fraction) == (False, None)


@pytest.mark.parametrize(("bad", "match"), [
    ({"disparity": "lookalike", "arms": ["counterfacutal"]}, "counterfacutal"),
    ({"disparity": "intrinsic", "arms": ["counterfactual"]}, "needs a look-alike mechanism"),
    ({"disparity": "lookalike", "training": {"synthetic_hard_fraction": 0.5}}, "synthetic_hard_fraction"),
])
def test_bad_arms_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        check_experiment(bad)


# ------------------------------------------------------------------------------------------------
# One run as a task, its committed record, and the report from records alone
# ------------------------------------------------------------------------------------------------


def test_run_one_records_both_checkpoints_and_skips_recorded_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real tiny run of the counterfactual arm: record files, lesion scores consistent with the evaluation, a
    recorded run skipped without training, and a changed configuration refused naming the field."""
    from divaware import experiment as ex
    from divaware import experiment_record as rec

    monkeypatch.setenv("DIVAWARE_CACHE", str(tmp_path / "cache"))
    config = {"disparity": "lookalike", "strategies": ["erm"], "arms": ["counterfactual"], "seeds": [0],
              "heldout": {"cases": 8, "seed": 7},
              "training": {"synthetic_cases": 24, "epochs": 1, "channels": [4, 8], "strides": [2],
                           "num_res_units": 0, "cpu_threads": 1, "progress": False, "min_val_cases": 4}}
    tasks = ex.experiment_tasks(config, tmp_path / "out", record=tmp_path / "rec")
    assert [t.name for t in tasks] == ["lookalike/erm_seed0", "lookalike/counterfactual_seed0"]
    assert tasks[1].function == "divaware.experiment:run_one" and json.loads(json.dumps(tasks[1].kwargs))
    done = ex.run_one(**tasks[1].kwargs)
    assert done["skipped"] is False
    folder = tmp_path / "rec" / "counterfactual_seed0"
    about = json.loads((folder / rec.RUN).read_text())
    assert (about["strategy"], about["seed"], about["arm"], about["epochs"]) == ("counterfactual", 0, True, 1)
    assert "data_root" not in about["config"] and about["config"]["synthetic_counterfactual"] is True
    held = pd.read_csv(folder / rec.HELDOUT, dtype={"patient_id": str}).set_index("patient_id")
    cases = pd.read_csv(tmp_path / "rec" / rec.CASES, dtype={"patient_id": str}).set_index("patient_id")
    assert list(held.index) == list(cases.index) and len(held) == 8
    for c in rec.CHECKPOINTS:  # removing predicted voxels inside lesions never lowers Dice; none there, no change
        gain = held[f"dice_no_lesion_fp_{c}"] - held[f"dice_{c}"]
        assert (gain >= -1e-12).all() and (gain[held[f"lesion_fp_{c}"] == 0].abs() < 1e-12).all()
    assert (cases.loc[~cases["hard_subgroup"], "n_lesions"] == 0).all()
    cf = pd.read_csv(folder / rec.HELDOUT_CF, dtype={"patient_id": str})
    assert list(cf.columns) == ["patient_id", "dice_best", "dice_last"] and len(cf) == 8

    # recorded: the next sweep skips it without training or evaluating
    monkeypatch.setattr("divaware.train.train", lambda *a, **k: pytest.fail("a recorded run was trained again"))
    assert ex.run_one(**tasks[1].kwargs)["skipped"] is True
    # another configuration under the same name is never mixed in nor overwritten
    changed = {**config, "training": {**config["training"], "epochs": 2}}
    kwargs = {**tasks[1].kwargs, "config": changed}
    with pytest.raises(ValueError, match="epochs"):
        ex.run_one(**kwargs)


def test_lesion_scores_count_false_positives_inside_lesions(tmp_path: Path):
    from divaware.experiment_record import lesion_scores
    from divaware.synthetic import LESION_DIR, make_cohort

    held = make_cohort(tmp_path / "held", n_cases=8, seed=4, disparity="lookalike", hard_fraction=0.5)
    truth = read_truth(held)
    hard = sorted(truth.index[truth["hard_subgroup"]])
    pred = tmp_path / "pred"
    pred.mkdir()
    expected = {}
    for path in sorted((held / "segmentations" / "expert").glob("*.nii.gz")):
        pid = path.name.removesuffix(".nii.gz")
        img = nib.load(path)
        mask = np.asarray(img.dataobj) > 0
        lesion = (np.asarray(nib.load(held / LESION_DIR / path.name).dataobj) > 0) & ~mask if pid in hard else \
            np.zeros_like(mask)
        nib.save(nib.Nifti1Image((mask | lesion).astype(np.uint8), img.affine), pred / path.name)
        expected[pid] = (2 * mask.sum() / (2 * mask.sum() + lesion.sum()), int(lesion.sum()))
    scores = lesion_scores(pred, held, sorted(expected))
    for pid, (d, fp) in expected.items():
        assert scores.loc[pid, "dice"] == pytest.approx(d) and scores.loc[pid, "lesion_fp"] == fp
        assert scores.loc[pid, "dice_no_lesion_fp"] == 1.0  # every error was a false positive inside a lesion
    assert (scores.loc[hard, "lesion_fp"] > 0).all()


def _write_records(root: Path, n: int = 40, n_hard: int = 10, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Record folders with known per-case Dice (``spec``: hard-case Dice and its lesion false-positive cost; the
    other cases score 0.9 everywhere, the last epoch 0.05 less on hard cases); the counterfactual arm scores 0.9
    on the cohort without lesions, so ERM loses 0.5 on hard cases, 0.4 of it to false positives in lesions."""
    from divaware import experiment_record as rec

    folder = root / "lookalike"
    folder.mkdir(parents=True)
    ids = [f"DUKE_{i:03d}" for i in range(n)]
    hard = ids[:n_hard]
    age = ["0-40" if i < n_hard else ("41-50" if i % 2 else "51-60") for i in range(n)]
    cases = pd.DataFrame({"patient_id": ids, "age_group": age, "menopause": "pre", "breast_density": "b",
                          "hard_subgroup": [i < n_hard for i in range(n)],
                          "n_lesions": [3 if i < n_hard else 0 for i in range(n)]})
    cases.to_csv(folder / rec.CASES, index=False)
    (folder / rec.COHORT).write_text(json.dumps({"heldout": "held", "cases": n, "hard": n_hard}))
    is_hard = np.arange(n) < n_hard
    # per method: (Dice of hard cases, its lesion-FP cost) at best; last = best - 0.05 on hard cases
    spec = {"erm": (0.4, 0.4), "oracle": (0.7, 0.1), "divaware": (0.55, 0.25), "balanced": (0.8, 0.0),
            "counterfactual": (0.4, 0.4)}
    for method, (dh, cost) in spec.items():
        for seed in seeds:
            run = folder / f"{method}_seed{seed}"
            run.mkdir()
            best = np.where(is_hard, dh, 0.9)
            fp = np.where(is_hard, cost, 0.0)
            last = best - np.where(is_hard, 0.05, 0.0)
            pd.DataFrame({"patient_id": ids, "dice_best": best, "dice_no_lesion_fp_best": best + fp,
                          "lesion_fp_best": (fp * 100).astype(int), "dice_last": last,
                          "dice_no_lesion_fp_last": last + fp, "lesion_fp_last": (fp * 100).astype(int)}
                         ).to_csv(run / rec.HELDOUT, index=False)
            if method == "counterfactual":
                pd.DataFrame({"patient_id": ids, "dice_best": 0.9, "dice_last": 0.85}).to_csv(run / rec.HELDOUT_CF,
                                                                                             index=False)
            w = {"reweighted_epochs": 0 if method in ("erm", "balanced", "counterfactual") else 19,
                 "hard_over_rest": {"oracle": 10.0, "divaware": 3.0}.get(method, 1.0),
                 "false_alarm_rate": 0.05 if method == "divaware" else float("nan"), "refreshes": 19}
            (run / rec.RUN).write_text(json.dumps({
                "strategy": method, "seed": seed, "arm": method in ("balanced", "counterfactual"), "epochs": 20,
                "selected_epoch": 15, "weights": w,
                "config": {"epochs": 20, "channels": [8, 16], "alpha": 0.5, "synthetic_cases": 300}}))
    return {"hard": hard, "ids": ids}


def test_report_numbers_on_records_with_known_dice(tmp_path: Path):
    _write_records(tmp_path / "records")
    rep = _report_module()
    mech = rep.load(tmp_path / "records" / "lookalike")
    mech["min_worst"] = 5
    lad = rep.ladder(mech, "best")
    # counterfactual hard 0.9 = rest 0.9; ERM loses 0.5 on hard cases, 0.4 of it false positives in lesions
    assert lad["cf_gap"][0] == pytest.approx(0.0) and lad["loss"][0] == pytest.approx(0.5)
    assert lad["fp_share"][0] == pytest.approx(0.8)
    assert lad["rungs"]["oracle"]["hard"][0] == pytest.approx(0.3)
    assert lad["rungs"]["oracle"]["recovered"][0] == pytest.approx(0.6)
    assert lad["rungs"]["oracle"]["fp_removed"][0] == pytest.approx(0.75)  # 0.4 -> 0.1
    assert lad["rungs"]["balanced"]["recovered"][0] == pytest.approx(0.8)
    assert lad["rungs"]["oracle"]["mean"][0] == pytest.approx(0.3 * 10 / 40)
    assert rep.control_holds(lad) is True  # the oracle's gain has a CI above 0 and costs nothing on the mean
    assert rep.control_holds({"rungs": {"oracle": {"hard": (0.02, -0.01, 0.05), "mean": (0.0, 0, 0)}}}) is False
    assert rep.control_holds({"rungs": {"oracle": {"hard": (0.05, 0.02, 0.08), "mean": (-0.02, 0, 0)}}}) is False
    cmp = rep.compare(mech, "best")
    d = cmp["rows"]["divaware"]
    assert cmp["worst"][:2] == ("age_group", "0-40")
    assert d["d_hard"][0] == pytest.approx(0.15) and d["of_oracle"][0] == pytest.approx(0.5)
    assert d["of_oracle_fp"][0] == pytest.approx(0.5)  # removes 0.15 of the oracle's 0.3 false-positive cost
    assert (d["reweighted"], d["hard_over_rest"], d["false_alarm"]) == (19, 3.0, 0.05)
    last = rep.compare(mech, "last")
    assert last["rows"]["divaware"]["d_hard"][0] == pytest.approx(0.15)
    out = tmp_path / "EXPERIMENT.md"
    text = rep.main(["--records", str(tmp_path / "records"), "--out", str(out), "--figures",
                     str(tmp_path / "fig"), "--min-worst", "5"])
    assert out.read_text() == text and "PARTIAL" in text  # 2 seeds of a 5-seed plan
    assert "50 % [50, 50] of the oracle's gain" in text
    assert (tmp_path / "fig" / "experiment_lookalike.png").is_file()
    assert "<!-- runs: lookalike/balanced_seed0 lookalike/balanced_seed1 lookalike/counterfactual_seed0" in text
    # a run recorded after the report is left out when regenerating that report exactly
    again = rep.main(["--records", str(tmp_path / "records"), "--out", str(tmp_path / "again.md"), "--figures",
                      str(tmp_path / "fig"), "--min-worst", "5", "--runs-from", str(out)])
    assert again == text


def test_committed_experiment_report_regenerates_from_the_committed_records(tmp_path: Path):
    """benchmarks/EXPERIMENT.md and the README's headline block are what the report script writes from the
    records under benchmarks/experiment/ (exactly the runs each names)."""
    root = Path(__file__).resolve().parents[1]
    committed = (root / "benchmarks" / "EXPERIMENT.md").read_text()
    rep = _report_module()
    assert rep.RUNS_LINE.search(committed), "EXPERIMENT.md was not written from the records"
    text = rep.main(["--out", str(tmp_path / "EXPERIMENT.md"), "--figures", str(tmp_path / "fig"),
                     "--runs-from", str(root / "benchmarks" / "EXPERIMENT.md")])
    assert text == committed
    readme = (root / "README.md").read_text()
    block = readme[readme.index("<!-- experiment:begin -->"):readme.index("<!-- experiment:end -->")]
    runs = rep.RUNS_LINE.search(block)
    assert runs, "the README's experiment block was not written from the records"
    (tmp_path / "runs.md").write_text(runs.group(0) + "\n")
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    rep.main(["--out", str(tmp_path / "E2.md"), "--figures", str(tmp_path / "fig"), "--runs-from",
              str(tmp_path / "runs.md"), "--readme", str(copy)])
    assert copy.read_text() == readme
