"""The decisive experiment: config checks, and the report's numbers on runs with known per-case Dice."""

from __future__ import annotations

import importlib.util
import shutil
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
