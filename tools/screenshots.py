"""Screenshots of the four notebooks in use, in JupyterLab in headless Chromium, for the README gallery.

    python tools/screenshots.py [--out figures] [--cases 60]

Uses the browser harness of the tests (``tests/browser.py``): a fresh JupyterLab on 127.0.0.1 with its own
folders, the system Chromium, and the notebooks run in order 01 → 02 → 03 → 04 with ``interactive=True``,
their *default* output folders (under a temporary ``$DIVAWARE_RUNS``, so 04 finds what 02 and 03 wrote) and
small settings (a small synthetic cohort, 2 epochs of a small UNet) so it finishes in a few minutes on a CPU.
Writes ``<out>/notebook_0N.png``. Synthetic data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import (  # noqa: E402
    REPO,
    cell_errors,
    lab_and_browser,
    open_notebook,
    parameterised_copy,
    run_all,
    wait_until_done,
)

from divaware.synthetic import make_cohort  # noqa: E402

TINY = {"baseline_epochs": 2, "baseline_channels": [8, 16], "epochs": 3, "channels": [8, 16], "warmup_epochs": 1,
        "update_every": 1, "cpu_threads": 1, "n_boot": 300, "max_cases_for_images": 30, "min_support": 0.1}
# What each screenshot centres on: the notebook's interactive or most telling output.
# (selector, which match, where in the window): the notebook's interactive or most telling output.
FOCUS = {
    "01_data_exploration": (".widget-vbox:has(.widget-slider)", 0, "start"),
    "02_subgroup_divergence": (".widget-select-multiple", 0, "start"),
    "03_training": (".jp-RenderedImage img", -1, "end"),
    "04_fairness_evaluation": (".widget-vbox:has(.widget-slider)", -1, "end"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "figures"))
    parser.add_argument("--cases", type=int, default=60)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="divaware-shots-") as tmp:
        tmp = Path(tmp)
        data = make_cohort(tmp / "cohort", n_cases=args.cases, seed=0)
        root = tmp / "lab"
        for name in FOCUS:
            source = REPO / "notebooks" / f"{name}.ipynb"
            from divaware.pipeline import notebook_parameters

            declared = notebook_parameters(source)
            params = {k: v for k, v in {**TINY, "data_root": str(data), "interactive": True}.items() if k in declared}
            parameterised_copy(source, root / f"{name}.ipynb", params)
        env = {"DIVAWARE_RUNS": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}
        with lab_and_browser(root, tmp / "jupyter", env=env, viewport=(1300, 1000)) as (lab, page):
            first = True
            for name, (focus, which, block) in FOCUS.items():
                t0 = time.perf_counter()
                open_notebook(lab, page, f"{name}.ipynb")
                run_all(page)
                wait_until_done(page, timeout_ms=1_500_000)
                errors = cell_errors(page)
                if errors:
                    raise SystemExit(f"{name}: {errors[0][:2000]}")
                if first:  # more room for the notebook: hide the file browser
                    page.keyboard.press("Control+b")
                    first = False
                targets = page.locator(f".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea {focus}")
                target = targets.nth(which if which >= 0 else targets.count() + which)
                target.evaluate(f"e => e.scrollIntoView({{block: '{block}'}})")
                page.wait_for_timeout(1500)
                path = out / f"notebook_{name[:2]}.png"
                page.screenshot(path=str(path))
                print(f"{name}: ran in {time.perf_counter() - t0:.0f} s, screenshot {path}", flush=True)
                page.keyboard.press("Control+s")
                page.wait_for_timeout(500)


if __name__ == "__main__":
    main()
