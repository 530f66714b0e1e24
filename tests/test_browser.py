"""The notebooks as a person sees them: JupyterLab in headless Chromium, Run All with interactive=True.

Skipped only when playwright or a system Chromium is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from divaware.browser import (
    REPO,
    cell_errors,
    chromium_path,
    colour_pixels,
    lab_and_browser,
    open_notebook,
    parameterised_copy,
    restart_kernel,
    run_all,
    save,
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


SAVE_STATE = "/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin"
PRED_RED = "#e74c3c"  # plots._PRED_COLOR


def dice_zero_notebook(path: Path, data_root: Path, out: Path) -> str:
    """A notebook that opens the slice viewer on a case whose prediction misses the tumour entirely (Dice 0)."""
    import nbformat

    code = f"""
import nibabel as nib
import numpy as np
from IPython.display import display

from divaware import widgets
from divaware.cohort import load_cohort

cohort = load_cohort({str(data_root)!r})
case = cohort.cases[cohort.ids("train")[0]]
truth = nib.load(str(case.mask_path))
inside = np.argwhere(truth.get_fdata() > 0.5)
pred = np.zeros(truth.shape, np.uint8)
z = 1 if inside[:, 2].mean() > truth.shape[2] / 2 else truth.shape[2] - 3  # far from the tumour's slices
pred[2:12, 2:12, z:z + 2] = 1
nib.save(nib.Nifti1Image(pred, truth.affine), {str(out / "miss.nii.gz")!r})
display(widgets.slice_viewer(case, {str(out / "miss.nii.gz")!r}, scores={{"dice": 0.0}}, label="a miss"))
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code.strip())])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path.name


def test_notebook_02_explorer_opens_the_worst_case_and_survives_a_kernel_restart(synthetic_root: Path,
                                                                                 tmp_path: Path) -> None:
    root = tmp_path / "lab_root"
    parameterised_copy(REPO / "notebooks" / "02_subgroup_divergence.ipynb", root / "02_subgroup_divergence.ipynb",
                       {"data_root": str(synthetic_root), "out_dir": str(tmp_path / "out"),
                        "baseline_dir": str(tmp_path / "erm"), "baseline_epochs": 2, "baseline_channels": [4, 8],
                        "cpu_threads": 1, "min_support": 0.1, "interactive": True})
    miss = dice_zero_notebook(root / "dice_zero.ipynb", synthetic_root, tmp_path / "miss")
    env = {"DIVAWARE_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    # The README's install is editable, which installs no data files: no JupyterLab setting saves widget state
    # until divaware installs it at run time. JupyterLab reads such settings when its server starts.
    with lab_and_browser(root, tmp_path / "jupyter", env=env, lab_settings="none") as (lab, page):
        assert lab.api(SAVE_STATE)["schema"]["properties"]["saveState"]["default"] is False
        # First use: 02 trains its ERM baseline (as `divaware run` trains the ERM run before 02 analyses it).
        # Training's progress bars are widgets it closes, which no saved state can bring back; from here on the
        # baseline is finished and 02 only analyses it, as in README command 1's run folder.
        open_notebook(lab, page, "02_subgroup_divergence.ipynb")
        run_all(page)
        wait_until_done(page)
        assert not cell_errors(page), cell_errors(page)
        open_notebook(lab, page, miss)
        run_all(page)
        wait_until_done(page)
        assert not cell_errors(page), cell_errors(page)
        # A Dice-0 case: the viewer opens where the prediction is, so its picture has prediction pixels
        picture = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .widget-output img").first
        picture.wait_for()
        assert colour_pixels(picture.get_attribute("src"), PRED_RED) > 20
    # The next JupyterLab in this environment (same app folder) has the setting the kernel installed.
    with lab_and_browser(root, tmp_path / "jupyter", env=env, lab_settings="none") as (lab, page):
        assert lab.api(SAVE_STATE)["schema"]["properties"]["saveState"]["default"] is True
        open_notebook(lab, page, "02_subgroup_divergence.ipynb")
        run_all(page)  # the baseline is trained: 02 only analyses it
        wait_until_done(page)
        assert not cell_errors(page), cell_errors(page)
        assert "Error displaying widget" not in page.inner_text(".jp-Notebook")
        nb = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        # the explorer's first itemset is the top of the q-sorted table of section 3
        table = nb.locator(".jp-OutputArea-output table:has(th:text-is('itemset'))").first
        # text_content, not inner_text: JupyterLab may not lay out cells scrolled out of view
        top_of_table = table.locator("tbody tr").first.locator("td").first.text_content().strip()
        options = nb.locator(".divaware-explorer-itemset select option")
        first = options.first.text_content().replace("\xa0", " ").split("  (n=")[0].strip()
        assert first == top_of_table
        assert nb.locator(".divaware-explorer-itemset select").evaluate("s => s.selectedIndex") == 0
        # its cases worst first, the dropdown in the member table's order, and the worst one opened
        cases = [t.replace("\xa0", " ") for t in nb.locator(".divaware-explorer-case select option").all_text_contents()]
        dice = [float(t.rsplit("dice ", 1)[1].rstrip(")")) for t in cases]
        assert dice == sorted(dice) and cases
        members = [t.strip() for t in nb.locator(".divaware-explorer-members tbody th").all_text_contents()]
        assert [t.split("  (")[0] for t in cases] == members
        assert nb.locator(".divaware-explorer-case select").evaluate("s => s.selectedIndex") == 0
        viewer_img = nb.locator(".divaware-explorer-viewer img").first
        viewer_img.wait_for()

        save(page)
        restart_kernel(page)
        open_notebook(lab, page, "02_subgroup_divergence.ipynb")  # reopened after the restart
        page.wait_for_timeout(3000)
        text = page.inner_text(".jp-Notebook")
        assert "Error displaying widget" not in text
        saved = page.eval_on_selector_all(".widget-output img", "els => els.map(e => e.naturalWidth)")
        assert saved and all(width > 100 for width in saved), saved  # the saved pictures, from the widget state

