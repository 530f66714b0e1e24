"""Notebook 01 as a person sees it: JupyterLab in headless Chromium, Run All with interactive=True.

Skipped only when playwright or a system Chromium is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from browser import (
    REPO,
    cell_errors,
    chromium_path,
    lab_and_browser,
    open_notebook,
    parameterised_copy,
    run_all,
    wait_until_done,
)

pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no system Chromium (apt-get install chromium)")


def test_notebook_01_in_jupyterlab_shows_figures_and_live_viewers(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "lab_root"
    out = tmp_path / "out"
    parameterised_copy(REPO / "notebooks" / "01_data_exploration.ipynb", root / "01_data_exploration.ipynb",
                       {"data_root": str(synthetic_root), "out_dir": str(out), "max_cases_for_images": 12,
                        "interactive": True})
    with lab_and_browser(root, tmp_path / "jupyter", env={"DIVAWARE_RUNS": str(tmp_path / "runs"),
                                                          "OMP_NUM_THREADS": "1"}) as (lab, page):
        # The package's JupyterLab default is in force: widget state is saved with the notebook.
        setting = lab.api("/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin")
        assert setting["schema"]["properties"]["saveState"]["default"] is True

        open_notebook(lab, page, "01_data_exploration.ipynb")
        run_all(page)
        wait_until_done(page)
        assert not cell_errors(page), cell_errors(page)
        text = page.inner_text(".jp-Notebook")
        assert "Error displaying widget" not in text
        assert "<Figure size" not in text

        # Every figure is an <img>: 4 static figures in cells, one picture per slice viewer.
        images = page.eval_on_selector_all(
            ".jp-Cell .jp-RenderedImage img",
            "els => els.map(e => ({inWidget: !!e.closest('.jupyter-widgets, .widget-output'),"
            " width: e.naturalWidth, src: e.getAttribute('src').slice(0, 22)}))")
        static = [i for i in images if not i["inWidget"]]
        assert len(static) >= 4, images  # missingness, intensity, tumour volume, enhancement
        assert all(i["src"] == "data:image/png;base64," and i["width"] > 100 for i in images), images
        viewers = page.locator(".jp-OutputArea-output .widget-vbox:has(.widget-slider)")
        assert viewers.count() >= 1
        viewer = viewers.first
        picture = viewer.locator("img")
        picture.wait_for()
        before = picture.get_attribute("src")

        # Move the slice slider with the keyboard, as a reader would: the picture must be redrawn.
        readout = viewer.locator(".widget-readout").first
        start = int(readout.inner_text())
        handle = viewer.locator(".noUi-handle").first
        handle.focus()
        for _ in range(3):
            handle.press("ArrowLeft" if start > 2 else "ArrowRight")
        deadline = time.monotonic() + 60
        while viewer.locator("img").first.get_attribute("src") == before and time.monotonic() < deadline:
            time.sleep(0.5)
        after = viewer.locator("img").first.get_attribute("src")
        assert int(readout.inner_text()) != start
        assert after != before, "the slice viewer did not redraw after its slider moved"
        assert "Error displaying widget" not in page.inner_text(".jp-Notebook")
