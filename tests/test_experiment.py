"""The decisive experiment: config checks, and the report's numbers on runs with known per-case Dice."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from divaware import evaluate as ev
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


def _fake_run(folder: Path, method: str, seed: int, cohort: Path, good: set[str], tmp: Path) -> None:
    """A run folder whose held-out predictions are the expert mask for ``good`` cases and empty otherwise."""
    run = folder / "runs" / f"{method}_seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "strategy": method, "seed": seed, "epochs": 20, "channels": [16, 32], "alpha": 0.5, "batch_size": 4,
        "synthetic_cases": 300, "synthetic_seed": 0, "data_root": str(cohort)}))
    # training weights: uniform, hard cases x4 from epoch 5, uniform again from 10, and a refresh after the
    # last epoch that trains nothing (what divaware writes when its false-discovery control flags on and off)
    hard = set(read_truth(cohort).query("hard_subgroup").index)
    history = [{"refresh": k, "epoch": epoch, "patient_id": pid, "weight": factor if pid in hard else 1.0}
               for k, (epoch, factor) in enumerate([(0, 1.0), (5, 4.0), (10, 1.0), (20, 9.0)])
               for pid in sorted(read_truth(cohort).index)]
    pd.DataFrame(history).to_csv(run / "weights_history.csv", index=False)
    pred = tmp / f"pred_{method}_{seed}"
    pred.mkdir()
    for mask in sorted((cohort / "segmentations" / "expert").glob("*.nii.gz")):
        pid = mask.name.removesuffix(".nii.gz")
        if pid in good:
            shutil.copy(mask, pred / mask.name)
        else:
            img = nib.load(mask)
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), pred / mask.name)
    ev.evaluate(run, cohort, split="all", tag="heldout", predictions=pred, n_boot=10, verbose=False)


def test_report_values_on_runs_with_known_dice(synthetic_root: Path, tmp_path: Path):
    truth = read_truth(synthetic_root)
    ids = set(truth.index)
    hard = sorted(truth.index[truth["hard_subgroup"]])
    assert len(hard) >= 2
    half = set(hard[: len(hard) // 2])
    folder = tmp_path / "representation"
    folder.mkdir()
    (folder / "experiment.yaml").write_text(yaml.safe_dump({
        "disparity": "representation", "strategies": ["erm", "divaware", "oracle"], "seeds": [0, 1],
        "heldout": {"cases": 40, "seed": 0}}))
    # ERM misses every hard case, the oracle none, divaware half of them; the same for both seeds
    for seed in (0, 1):
        _fake_run(folder, "erm", seed, synthetic_root, ids - set(hard), tmp_path)
        _fake_run(folder, "oracle", seed, synthetic_root, ids, tmp_path)
        _fake_run(folder, "divaware", seed, synthetic_root, ids - set(hard) | half, tmp_path)

    rep = _report_module()
    res = rep.analyse(rep.load_mechanism(folder))
    assert res["methods"] == ["erm", "divaware", "oracle"] and res["n_hard"] == len(hard) and res["n_cases"] == 40
    s, c = res["summary"], res["comparisons"]
    assert s["erm"]["hard_dice"][0] == 0.0 and s["oracle"]["hard_dice"][0] == 1.0
    assert s["erm"]["mean_dice"][0] == pytest.approx(1 - len(hard) / 40)
    assert res["erm_hard_gap"] == 1.0 and res["oracle_closes"] == 1.0
    assert c["oracle"]["hard"][:3] == (1.0, 1.0, 1.0) and c["oracle"]["hard"][3] == 2
    assert c["divaware"]["hard"][0] == pytest.approx(len(half) / len(hard))
    assert c["oracle"]["mean"][0] == pytest.approx(len(hard) / 40)
    # ERM's worst group holds the largest share of hard cases; gains there are shares of its hard cases
    per_case = ev.load_evaluation(folder / "runs" / "erm_seed0", "all", tag="heldout").per_case
    attr, group = res["worst_group"]
    members = per_case.index[per_case[attr].astype(str) == group]
    share = np.isin(members, hard).mean()
    assert share > 0 and res["n_worst"] == len(members)
    assert c["oracle"]["worst"][0] == pytest.approx(share)
    assert c["divaware"]["fraction_worst"] == pytest.approx(np.isin(members, sorted(half)).sum() / np.isin(members, hard).sum())
    assert c["divaware"]["fraction_hard"] == pytest.approx(len(half) / len(hard))

    # what the strategy did to the training cases: 5 of 20 epochs re-weighted, hard/rest 4 there, 1 elsewhere
    w = res["weights"].set_index("run").loc["divaware_seed0"]
    assert (w["epochs"], w["reweighted_epochs"]) == (20, 5) and w["hard_over_rest"] == pytest.approx(35 / 20)

    out = tmp_path / "EXPERIMENT_preliminary.md"
    text = rep.main([str(folder), "--out", str(out), "--figures", str(tmp_path / "figures")])
    assert out.read_text() == text
    assert "PARTIAL RUN" in text and "closing 100 % of ERM's hard-vs-rest gap of 1.000" in text
    assert "| oracle | 2 |" in text and "[+1.0000, +1.0000]" in text
    assert (tmp_path / "figures" / "experiment_representation_preliminary.png").is_file()

    # the README's headline tables come from the same numbers; text outside the markers is kept
    readme = tmp_path / "README.md"
    readme.write_text("# title\nbefore\n<!-- experiment:begin -->\nold table\n<!-- experiment:end -->\nafter\n")
    rep.main([str(folder), "--out", str(tmp_path / "EXPERIMENT.md"), "--figures", str(tmp_path / "figures"),
              "--readme", str(readme)])
    new = readme.read_text()
    assert new.startswith("# title\nbefore\n<!-- experiment:begin -->") and new.endswith("<!-- experiment:end -->\nafter\n")
    assert "old table" not in new
    assert f"| oracle | 2 | {s['oracle']['mean_dice'][0]:.3f} | 1.000 |" in new
    assert f"| erm | 2 | {s['erm']['mean_dice'][0]:.3f} | 0.000 | – |" in new
    assert "closing 100 % of ERM's hard-vs-rest gap of 1.000" in new


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
    look = _without_unknown_strategies(root / "experiment_lookalike.yaml")
    raw = yaml.safe_load((root / "experiment_lookalike.yaml").read_text())
    assert set(raw["strategies"]) == {"erm", "oracle", "divaware", "group_dro", "febs", "paper"}
    assert look["disparity"] == "lookalike" and look["arms"] == ["counterfactual", "balanced"]
    weak = load_experiment(root / "experiment_lookalike_weak.yaml")
    intr = load_experiment(root / "experiment_intrinsic.yaml")
    assert weak["disparity"] == "lookalike_weak" and weak["arms"] == ["counterfactual"]
    assert set(weak["strategies"]) == set(intr["strategies"]) == {"erm", "oracle", "divaware"}
    for cfg in (look, weak, intr):
        assert cfg["seeds"] == [0, 1, 2, 3, 4] and cfg["heldout"]["cases"] == 800
        t = cfg["training"]
        assert (t["epochs"], t["channels"], t["num_res_units"], t["cpu_threads"]) == (20, [8, 16, 32, 64], 0, 1)
        plan = plan_cohort(t["synthetic_cases"], seed=t["synthetic_seed"])
        assert (plan["split"] == "train").sum() == 600  # ~600 training cases
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


def test_arms_train_on_their_cohorts_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """run_experiment with train/evaluate replaced by recorders: which cohorts, which evaluations, and a second
    call re-evaluates nothing (training resumes inside train())."""
    from divaware import evaluate as ev_mod
    from divaware import experiment as ex
    from divaware import train as tr

    trained, evaluated = [], []

    def fake_train(config, resume=False):
        run = Path(config.out_dir)
        run.mkdir(parents=True, exist_ok=True)
        trained.append((run.name, config.strategy, config.synthetic_counterfactual, config.synthetic_hard_fraction,
                        resume))
        if not (run / "best.pt").exists():
            (run / "best.pt").write_text("weights")
        return run

    def fake_evaluate(run, root, split="test", tag=None, n_boot=1000, verbose=True):
        out = ev_mod.evaluation_dir(run, split, tag=tag)
        out.mkdir(parents=True, exist_ok=True)
        (out / ev_mod.FILES["manifest"]).write_text(json.dumps({"data_root": str(Path(str(root)).resolve())}))
        evaluated.append((Path(run).name, str(root), tag))

    monkeypatch.setattr(tr, "train", fake_train)
    monkeypatch.setattr(tr, "resolve_config", lambda c: c)
    monkeypatch.setattr(ev_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(ex, "heldout_root", lambda cfg, counterfactual=False: Path("cf" if counterfactual else "held"))
    config = {"disparity": "lookalike", "strategies": ["erm"], "arms": ["counterfactual", "balanced"], "seeds": [0],
              "heldout": {"cases": 10, "seed": 5}, "training": {"epochs": 1}}
    ex.run_experiment(config, tmp_path / "exp", n_boot=10)
    assert sorted(trained) == [("balanced_seed0", "erm", False, 0.5, True), ("counterfactual_seed0", "erm", True, None, True),
                               ("erm_seed0", "erm", False, None, True)]
    assert sorted(evaluated) == [
        ("balanced_seed0", "None", None), ("balanced_seed0", "held", "heldout"),
        ("counterfactual_seed0", "None", None), ("counterfactual_seed0", "cf", "heldout_counterfactual"),
        ("counterfactual_seed0", "held", "heldout"),
        ("erm_seed0", "None", None), ("erm_seed0", "held", "heldout")]
    evaluated.clear()
    ex.run_experiment(config, tmp_path / "exp", strategies=["counterfactual"], n_boot=10)
    assert evaluated == []  # every evaluation is newer than its checkpoint and of the same cohort: kept
    # a new generator version writes the held-out cohort elsewhere: the runs are evaluated again, on it
    monkeypatch.setattr(ex, "heldout_root", lambda cfg, counterfactual=False: Path("cf2" if counterfactual else "held2"))
    ex.run_experiment(config, tmp_path / "exp", strategies=["counterfactual"], n_boot=10)
    assert sorted(evaluated) == [("counterfactual_seed0", "cf2", "heldout_counterfactual"),
                                 ("counterfactual_seed0", "held2", "heldout")]
    with pytest.raises(ValueError, match="not strategies or arms"):
        ex.run_experiment(config, tmp_path / "exp", strategies=["balance"])


def _fake_eval(folder: Path, name: str, seed: int, cohort: Path, tag: str, predict, tmp: Path) -> None:
    """Evaluate run ``<name>_seed<seed>`` on ``cohort`` (as ``tag``) with predictions ``predict(pid, mask)``."""
    run = folder / "runs" / f"{name}_seed{seed}"
    if not (run / "config.yaml").exists():
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({
            "strategy": "erm" if name in ("counterfactual", "balanced") else name, "seed": seed, "epochs": 20,
            "channels": [8, 16], "alpha": 0.5, "batch_size": 4, "synthetic_cases": 16, "synthetic_seed": 0,
            "data_root": str(cohort)}))
    pred = tmp / f"pred_{name}_{seed}_{tag}"
    pred.mkdir()
    for mask in sorted((cohort / "segmentations" / "expert").glob("*.nii.gz")):
        img = nib.load(mask)
        pid = mask.name.removesuffix(".nii.gz")
        out = predict(pid, np.asarray(img.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(out, img.affine), pred / mask.name)
    ev.evaluate(run, cohort, split="all", tag=tag, predictions=pred, n_boot=10, verbose=False)


def test_report_ladder_on_runs_with_known_errors(tmp_path: Path):
    from divaware.synthetic import LESION_DIR, make_cohort

    held = make_cohort(tmp_path / "held", n_cases=8, seed=4, disparity="lookalike", hard_fraction=0.5)
    held_cf = make_cohort(tmp_path / "held_cf", n_cases=8, seed=4, disparity="lookalike", hard_fraction=0.5,
                          counterfactual=True)
    truth = read_truth(held)
    hard = sorted(truth.index[truth["hard_subgroup"]])
    assert len(hard) == 4
    lesions = {p: nib.load(held / LESION_DIR / f"{p}.nii.gz").get_fdata() > 0 for p in hard}
    folder = tmp_path / "lookalike"
    folder.mkdir()
    (folder / "experiment.yaml").write_text(yaml.safe_dump({
        "disparity": "lookalike", "strategies": ["erm", "oracle"], "arms": ["counterfactual", "balanced"],
        "seeds": [0], "heldout": {"cases": 8, "seed": 4}}))

    def perfect(pid, mask):
        return mask

    def with_lesions(pid, mask):  # ERM: the tumour, plus every lesion of a hard case (false positives only)
        return mask | lesions[pid] if pid in lesions else mask

    fixed = set(hard[:2])

    def oracle(pid, mask):  # the oracle rejects the lesions of two of the four hard cases
        return mask if pid in fixed else with_lesions(pid, mask)

    _fake_eval(folder, "counterfactual", 0, held_cf, "heldout_counterfactual", perfect, tmp_path)
    _fake_eval(folder, "counterfactual", 0, held, "heldout", with_lesions, tmp_path)
    _fake_eval(folder, "erm", 0, held, "heldout", with_lesions, tmp_path)
    _fake_eval(folder, "balanced", 0, held, "heldout", perfect, tmp_path)
    _fake_eval(folder, "oracle", 0, held, "heldout", oracle, tmp_path)

    rep = _report_module()
    mech = rep.load_mechanism(folder)
    res = rep.analyse(mech)
    assert res["methods"] == ["erm", "oracle"]  # the arms are rungs of the ladder, not strategies
    lad = res["ladder"]
    masks = {p: nib.load(held / "segmentations" / "expert" / f"{p}.nii.gz").get_fdata() > 0 for p in hard}
    erm_dice = {p: 2 * masks[p].sum() / (2 * masks[p].sum() + lesions[p].sum()) for p in hard}
    loss = np.mean([1 - erm_dice[p] for p in hard])
    assert (lad["n_hard"], lad["n_rest"], lad["seeds"]) == (4, 4, [0])
    assert lad["cf_hard"] == lad["cf_rest"] == 1.0 and lad["cf_gap"][0] == 0.0
    assert lad["loss"][0] == pytest.approx(loss, abs=1e-6)
    assert lad["fp_share"][0] == pytest.approx(1.0)  # every lost voxel is a false positive inside a lesion
    assert lad["rungs"]["balanced"]["recovered"][0] == pytest.approx(1.0)
    share = np.sum([1 - erm_dice[p] for p in fixed]) / np.sum([1 - erm_dice[p] for p in hard])
    assert lad["rungs"]["oracle"]["recovered"][0] == pytest.approx(share, abs=1e-6)
    assert lad["rungs"]["oracle"]["mean"][0] == pytest.approx(np.sum([1 - erm_dice[p] for p in fixed]) / 8, abs=1e-6)
    text = rep.ladder_text(lad)
    assert "ERM loses ≥ 0.08 to the lesions: " + ("holds" if loss >= 0.08 else "FAILS") in text
    assert "≥ 60 % of it false positives in lesions: holds" in text and "balanced recovers ≥ 80 %: holds" in text
    out = tmp_path / "EXPERIMENT_pilot.md"
    written = rep.main([str(folder), "--out", str(out), "--figures", str(tmp_path / "figures")])
    assert written.index("### Ladder") < written.index("### Strategies") and "PARTIAL RUN" in written
