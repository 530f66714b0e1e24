"""The notebook series: clean committed notebooks, documented parameters, and a tiny end-to-end execution
whose recorded results are checked against values recomputed here."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from divaware import pipeline
from divaware.cohort import load_cohort
from divaware.metrics import challenge_score

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Tiny settings: a handful of epochs of a small UNet on the 40-case fixture cohort.
TINY_TRAINING = {"epochs": 2, "channels": [4, 8], "warmup_epochs": 1, "update_every": 1, "batch_size": 4}


@pytest.mark.parametrize("name", pipeline.SERIES)
def test_committed_notebook_is_clean(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "papermill needs exactly one cell tagged 'parameters'"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {name[:2]} ·")
    # The parameters cell holds literals only, each with a comment (papermill --help-notebook shows them).
    params = pipeline.notebook_parameters(NOTEBOOKS / f"{name}.ipynb")
    assert {"data_root", "out_dir"} <= set(params)
    assert all(spec["help"] for spec in params.values()), [p for p, s in params.items() if not s["help"]]
    # Every assignment is a literal, and papermill sees every one of them (a comment it cannot parse would
    # silently hide a parameter from --help-notebook and from `divaware run`).
    tree = ast.parse(tagged[0].source)
    assigned = []
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), ast.dump(node)
        ast.literal_eval(node.value)
        assigned.append(node.target.id)
    assert assigned == list(params)


def test_notebook_text_cites_no_internal_issue_numbers() -> None:
    import re

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            found = re.findall(r"\bissues? #?\d+", cell.source, flags=re.IGNORECASE)
            assert not found, (path.name, found)


def test_help_notebook_lists_every_parameter() -> None:
    path = NOTEBOOKS / "03_training.ipynb"
    shown = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)],
                           capture_output=True, text=True, check=True).stdout
    for name, spec in pipeline.notebook_parameters(path).items():
        assert name in shown and spec["help"] in shown


def test_unknown_parameter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no parameter"):
        pipeline.execute_notebook(NOTEBOOKS / "01_data_exploration.ipynb", tmp_path / "x.ipynb", {"epochz": 3})


@pytest.fixture(scope="module")
def series_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("series") / "tiny"
    config = {
        "data_root": str(synthetic_root),
        "methods": ["erm", "divaware"],
        "notebooks": {
            "02_subgroup_divergence": {"baseline_epochs": 2, "baseline_channels": [4, 8], "min_support": 0.1},
            "04_fairness_evaluation": {"n_boot": 200},
        },
        "training": {**TINY_TRAINING, "min_support": 0.1},
    }
    timings = pipeline.run_series(config, out)
    return out, timings


def test_series_executes_and_records(series_run: tuple[Path, dict], synthetic_root: Path) -> None:
    out, timings = series_run
    assert set(timings) == {"01_data_exploration", "02_subgroup_divergence", "03_training_erm",
                            "03_training_divaware", "04_fairness_evaluation"}
    for label in timings:
        assert (out / "notebooks" / f"{label}.ipynb").is_file()
        assert (out / "params" / f"{label}.yaml").is_file()
    meta = load_cohort(synthetic_root).metadata

    r01 = json.loads((out / "01_data_exploration" / "results.json").read_text())
    assert r01["n_cases"] == len(meta) and r01["n_problems"] == 0
    assert r01["n_train"] + r01["n_test"] == len(meta)
    assert r01["group_sizes"]["breast_density"] == meta["breast_density"].value_counts().to_dict()
    # the three disparity mechanisms on one hard patient: intrinsic hides part of the tumour's enhancement,
    # representation adds rising look-alikes outside the mask
    executed = nbformat.read(out / "notebooks" / "04_fairness_evaluation.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "runs: erm, divaware" in printed  # the reference first, not the folders' alphabetical order
    mechanisms = r01["disparity_mechanisms"]  # each mechanism's own cue in the table
    assert mechanisms["lookalike"]["look-alike lesions per hard case"] >= 4  # the text's 4-10 lesions
    assert mechanisms["default"]["look-alike lesions per hard case"] == 0
    shown = r01["disparity_illustration"]
    enhancement = {d: shown[d]["tumour enhancement, phase 1"] for d in ("default", "representation", "intrinsic")}
    assert enhancement["intrinsic"] < 0.9 * min(enhancement["default"], enhancement["representation"])
    assert shown["representation"]["look-alike voxels"] > 2 * shown["intrinsic"]["look-alike voxels"]

    r02 = json.loads((out / "02_subgroup_divergence" / "results.json").read_text())
    itemsets = pd.read_csv(out / "02_subgroup_divergence" / "divergent_itemsets.csv")
    assert r02["top_itemset"] == itemsets.iloc[0]["label"]
    # items as sorted JSON lists, not frozenset text whose order changes between identical runs
    assert all(json.loads(i) == sorted(json.loads(i)) for i in itemsets["items"])
    assert r02["top_divergence"] == pytest.approx(itemsets["divergence"].min())
    for name, w in r02["weights"].items():
        assert w["mean"] == pytest.approx(1.0), name
    null = r02["null_check"]  # the real row of the null check is the analysis written to the csv
    assert null["real_fdr_flags"] == int(((itemsets["ps"] < 0.5) & (itemsets["q"] <= 0.05)).sum())
    # the preview is the training rule: flagged cases at or above 1, the others one weight at or below 1
    w = r02["weights"]["divaware"]
    assert w["flagged_min"] is None or w["flagged_min"] >= 1 - 1e-12
    assert w["other_mean"] is None or w["other_mean"] <= 1 + 1e-12
    assert r02["shapley_itemset"] in set(itemsets["label"])
    assert 0.0 <= null["null_share_fdr_flags"] <= 1.0 and 0.0 <= null["null_share_t_flags"] <= 1.0

    for method in ("erm", "divaware"):
        run = out / "runs" / method
        r03 = json.loads((run / "results.json").read_text())
        log = pd.read_csv(run / "metrics.csv")
        assert r03["method"] == method and r03["epochs"] == TINY_TRAINING["epochs"] == len(log)
        assert r03["final_val_dice"] == pytest.approx(log["val_dice"].iloc[-1])
    history = pd.read_csv(out / "runs" / "divaware" / "weights_history.csv")
    assert history["refresh"].nunique() >= 1

    r04 = json.loads((out / "04_fairness_evaluation" / "results.json").read_text())
    assert set(r04["runs"]) == {"erm", "divaware"}
    for method, row in r04["runs"].items():
        per_case = pd.read_csv(out / "runs" / method / "evaluation_test" / "per_case.csv",
                               dtype={"patient_id": str}).set_index("patient_id")
        assert set(per_case.index) == set(meta.index[meta["split"] == "test"])
        expected = challenge_score(per_case, meta)
        assert row["ranking"] == pytest.approx(expected["ranking"])
        assert row["mean_dice"] == pytest.approx(per_case["dice"].mean())
    # section 6 shows the headline experiment's verdict as benchmarks/EXPERIMENT.md states it (source checkout)
    report = Path(__file__).resolve().parents[1] / "benchmarks" / "EXPERIMENT.md"
    verdicts = [line.removeprefix("**Verdict.** ") for line in report.read_text().splitlines()
                if line.startswith("**Verdict.**")]
    assert r04["experiment"]["verdict"] == verdicts[0] and r04["experiment"]["figure"].endswith("experiment_lookalike.png")


def figure_outputs(notebook: Path) -> tuple[list[str], list[str]]:
    """The image/png outputs of an executed notebook, and every text output that is a figure's repr."""
    nb = nbformat.read(notebook, as_version=4)
    images, figure_texts = [], []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(data["image/png"])
            texts = [data.get("text/plain", ""), output.get("text", "")]
            figure_texts += [t for t in texts if "<Figure size" in "".join(t)]
    return images, figure_texts


def test_every_saved_figure_is_shown_inline_once(series_run: tuple[Path, dict]) -> None:
    out, timings = series_run
    # Where each executed notebook saved its figures: every PNG there is a figure the notebook made.
    figure_folders = {"01_data_exploration": out / "01_data_exploration",
                      "02_subgroup_divergence": out / "02_subgroup_divergence",
                      "03_training_erm": out / "runs" / "erm", "03_training_divaware": out / "runs" / "divaware",
                      "04_fairness_evaluation": out / "04_fairness_evaluation"}
    assert set(figure_folders) == set(timings)
    counts = {}
    for label, folder in figure_folders.items():
        made = sorted(p.name for p in folder.glob("*.png"))
        images, figure_texts = figure_outputs(out / "notebooks" / f"{label}.ipynb")
        counts[label] = (len(made), len(images))
        assert made, label
        assert len(images) >= len(made), f"{label}: {len(images)} inline images for figures {made}"
        assert len(set(images)) == len(images), f"{label} shows a figure twice"
        assert not figure_texts, f"{label} prints {figure_texts[0]} instead of showing the figure"
    assert counts["01_data_exploration"][0] >= 6  # missingness, intensity, tumour volume, enhancement, cases,
    # disparity mechanisms


def test_series_order_reuses_the_reference_run_as_baseline(tmp_path: Path) -> None:
    config = {"methods": ["erm", "divaware", "paper"], "baseline": "reference", "training": {"epochs": 3}}
    jobs = pipeline.series_jobs(config, tmp_path, NOTEBOOKS)
    labels = [label for label, _, _ in jobs]
    assert labels == ["01_data_exploration", "03_training_erm", "02_subgroup_divergence", "03_training_divaware",
                      "03_training_paper", "04_fairness_evaluation"]
    params = {label: p for label, _, p in jobs}
    assert params["02_subgroup_divergence"]["baseline_run"] == str(tmp_path / "runs" / "erm")
    assert params["03_training_paper"] == {"epochs": 3, "method": "paper", "out_dir": str(tmp_path / "runs" / "paper")}
    assert params["04_fairness_evaluation"]["reference_method"] == "erm"
    default = pipeline.load_series_config(None)
    assert default["methods"][0] == "erm" and default["baseline"] == "reference"


def test_sweep_grid_expands_methods_seeds_and_values() -> None:
    runs = pipeline.sweep_grid({"sweep": {"methods": ["erm", "divaware"], "seeds": [0, 1], "grid": {"alpha": [0.3, 0.7]}}})
    assert len(runs) == 8 and {"method": "divaware", "seed": 1, "alpha": 0.7} in runs
    with pytest.raises(ValueError, match="unknown key"):
        pipeline.sweep_grid({"sweep": {"metods": ["erm"]}})


def test_sweep_trains_evaluates_and_aggregates(synthetic_root: Path, tmp_path: Path) -> None:
    config = {"data_root": str(synthetic_root), "methods": ["erm"],
              "training": {**TINY_TRAINING, "epochs": 1},
              "sweep": {"methods": ["erm", "inverse_frequency"], "seeds": [0]}}
    out = pipeline.sweep(config, tmp_path / "sweep", n_boot=50)
    table = pd.read_csv(out / "sweep.csv")
    assert sorted(table["run"]) == ["erm_seed0", "inverse_frequency_seed0"]
    for row in table.itertuples():
        per_case = pd.read_csv(out / "runs" / row.run / "evaluation_test" / "per_case.csv")
        assert row.mean_dice == pytest.approx(per_case["dice"].mean())
    summary = pd.read_csv(out / "sweep_summary.csv")
    assert set(summary["method"]) == {"erm", "inverse_frequency"} and (summary["ranking_count"] == 1).all()


def test_series_kernels_do_not_warn_about_tcp(tmp_path: Path) -> None:
    # Every `divaware run` step used to print the kernel's "running over TCP without encryption" warning.
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    code = ("from pathlib import Path; from divaware import pipeline; "
            f"pipeline.execute_notebook(Path({str(tmp_path / 'tiny.ipynb')!r}), Path({str(tmp_path / 'out.ipynb')!r}), {{}})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "without encryption" not in run.stderr
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].execution_count == 1


def test_training_notebook_below_the_warm_up_draws_no_empty_weights_plot(synthetic_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    executed = tmp_path / "03.ipynb"
    pipeline.execute_notebook(NOTEBOOKS / "03_training.ipynb", executed, {
        "data_root": str(synthetic_root), "out_dir": str(run), "method": "divaware", "epochs": 1,
        "channels": [4, 8], "num_res_units": 0, "cpu_threads": 1})
    assert not (run / "weights.png").exists()
    text = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells
                   for o in c.get("outputs", []))
    assert "no refresh happened in 1 epoch(s) (the first comes after a warm-up of 6 epochs)" in text


def test_fairness_notebook_defines_what_it_shows() -> None:
    text = " ".join(c.source for c in nbformat.read(NOTEBOOKS / "04_fairness_evaluation.ipynb", as_version=4).cells
                    if c.cell_type == "markdown")
    text = " ".join(text.split())
    for term in ("`es_dice`, the equity-scaled Dice", "`std` is the standard deviation of the group means",
                 "`P` (performance) = ½ (mean Dice + 1 − mean NormHD)", "`F` (fairness) = the mean over age",
                 "`gap` (highest minus lowest group mean Dice)"):
        assert term in text, term
