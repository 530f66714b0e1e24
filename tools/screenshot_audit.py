"""Screenshot of notebook 05 (audit any model) in JupyterLab in headless Chromium, for the README.

    python tools/screenshot_audit.py [--out figures] [--cases 300]

Uses the browser harness of the tests (``divaware.browser``, as ``tools/screenshots.py`` does): a fresh
JupyterLab with its own folders, the system Chromium, notebook 05 run with ``interactive=True`` on a synthetic
cohort and its demo predictions (expert masks with the age 0-40 cases eroded: a planted failure), audited on
the test split. The shot centres on the subgroup explorer: the flagged subgroups, their cases and the viewer
with the prediction (dashed red) over the truth (green). Writes ``<out>/notebook_05.png``. Synthetic data.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from divaware.browser import (
    REPO,
    cell_errors,
    lab_and_browser,
    open_notebook,
    parameterised_copy,
    run_all,
    wait_until_done,
)
from divaware.synthetic import make_cohort  # noqa: E402

NAME = "05_audit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "figures"))
    parser.add_argument("--cases", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="divaware-shot05-") as tmp:
        tmp = Path(tmp)
        data = make_cohort(tmp / "cohort", n_cases=args.cases, seed=0)
        root = tmp / "lab"
        parameterised_copy(REPO / "notebooks" / f"{NAME}.ipynb", root / f"{NAME}.ipynb",
                           {"data_root": str(data), "interactive": True, "n_boot": 300, "n_permutations": 20})
        env = {"DIVAWARE_RUNS": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}
        with lab_and_browser(root, tmp / "jupyter", env=env, viewport=(1300, 1500)) as (lab, page):
            t0 = time.perf_counter()
            open_notebook(lab, page, f"{NAME}.ipynb")
            run_all(page)
            wait_until_done(page, timeout_ms=900_000)
            errors = cell_errors(page)
            if errors:
                raise SystemExit(f"{NAME}: {errors[0][:2000]}")
            page.keyboard.press("Control+b")  # more room for the notebook: hide the file browser
            # centred on the viewer's slice slider: the itemsets above, the chosen subgroup's cases and the
            # prediction over the truth below
            target = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea .widget-slider").last
            target.evaluate("e => e.scrollIntoView({block: 'center'})")
            page.wait_for_timeout(1500)
            path = out / "notebook_05.png"
            page.screenshot(path=str(path))
            print(f"{NAME}: ran in {time.perf_counter() - t0:.0f} s, screenshot {path}", flush=True)


if __name__ == "__main__":
    main()
