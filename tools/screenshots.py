"""Screenshots of the four notebooks in use, in JupyterLab in headless Chromium, for the README gallery.

    divaware run --config configs/default.yaml --out runs/default     # README command 1, once
    python tools/screenshots.py [--run runs/default] [--out figures]

Uses the browser harness of the tests (``divaware.browser``): a fresh JupyterLab on 127.0.0.1 with its own
folders and the system Chromium. Each notebook of the finished default run is run again with the parameters
that run gave it (``<run>/params/<label>.yaml``) and ``interactive=True``, on a temporary copy of the run's
training runs (the models are trained already: 03 resumes a finished run, 02 analyses the run's ERM model, 04
evaluates both), so the screenshots show the trained default models and the run folder itself is not changed.
The subgroup explorer (02) opens on its first itemset by q and that itemset's worst case, on the slice where
the prediction and the truth disagree most. Writes ``<out>/notebook_0N.png``. Synthetic data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from divaware.browser import (
    REPO,
    cell_errors,
    lab_and_browser,
    open_notebook,
    parameterised_copy,
    run_all,
    wait_until_done,
)

# label of the execution in the run -> (notebook, what the screenshot centres on: selector, which match,
# where in the window)
SHOTS = {
    "01_data_exploration": ("01_data_exploration", ".widget-vbox:has(.widget-slider)", 0, "start"),
    # the viewer at the bottom of the window: its title names the itemset and the case's Dice, and the case
    # dropdown and the worst-first member table sit above it
    "02_subgroup_divergence": ("02_subgroup_divergence", ".divaware-explorer-viewer", 0, "end"),
    "03_training_divaware": ("03_training", ".jp-RenderedImage img", -1, "end"),
    "04_fairness_evaluation": ("04_fairness_evaluation", ".widget-vbox:has(.widget-slider)", -1, "end"),
}


def shot_parameters(run: Path, label: str, tmp: Path) -> dict:
    """The parameters the run gave this notebook, with its outputs redirected into ``tmp``."""
    params = yaml.safe_load((run / "params" / f"{label}.yaml").read_text()) or {}
    runs = tmp / "runs"
    for key in ("out_dir", "runs_dir", "baseline_run", "baseline_dir"):
        value = params.get(key)
        if not value:
            continue
        path = Path(value)
        if path.is_relative_to(run / "runs"):
            params[key] = str(runs / path.relative_to(run / "runs"))
        elif key in ("out_dir", "baseline_dir"):
            params[key] = str(tmp / "outputs" / path.name)
    return {**params, "interactive": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "runs" / "default"),
                        help="a finished `divaware run` folder (default: runs/default, README command 1's)")
    parser.add_argument("--out", default=str(REPO / "figures"))
    parser.add_argument("--only", nargs="+", choices=list(SHOTS), default=list(SHOTS),
                        help="take only these screenshots (default: all four)")
    args = parser.parse_args()
    shots = {label: SHOTS[label] for label in args.only}
    run, out = Path(args.run).resolve(), Path(args.out)
    timings = run / "timings.json"
    if not timings.is_file() or not json.loads(timings.read_text()).get("complete"):
        raise SystemExit(f"{run} is not a finished run: run `divaware run --config configs/default.yaml --out {run}` "
                         "first")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="divaware-shots-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(run / "runs", tmp / "runs")  # 03 and 04 write into their run folders: use a copy
        root = tmp / "lab"
        for label, (name, *_rest) in shots.items():
            parameterised_copy(REPO / "notebooks" / f"{name}.ipynb", root / f"{label}.ipynb",
                               shot_parameters(run, label, tmp))
        env = {"DIVAWARE_RUNS": str(tmp / "outputs"), "OMP_NUM_THREADS": "1"}
        with lab_and_browser(root, tmp / "jupyter", env=env, viewport=(1300, 1150)) as (lab, page):
            first = True
            for label, (name, focus, which, block) in shots.items():
                t0 = time.perf_counter()
                open_notebook(lab, page, f"{label}.ipynb")
                run_all(page)
                wait_until_done(page, timeout_ms=1_500_000)
                errors = cell_errors(page)
                if errors:
                    raise SystemExit(f"{label}: {errors[0][:2000]}")
                if first:  # more room for the notebook: hide the file browser
                    page.keyboard.press("Control+b")
                    first = False
                targets = page.locator(f".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea {focus}")
                target = targets.nth(which if which >= 0 else targets.count() + which)
                target.evaluate(f"e => e.scrollIntoView({{block: '{block}'}})")
                page.wait_for_timeout(1500)
                path = out / f"notebook_{name[:2]}.png"
                page.screenshot(path=str(path))
                print(f"{label}: ran in {time.perf_counter() - t0:.0f} s, screenshot {path}", flush=True)
                page.keyboard.press("Control+s")
                page.wait_for_timeout(500)


if __name__ == "__main__":
    main()
