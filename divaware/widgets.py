"""ipywidgets explorers for the notebooks: a slice viewer and a subgroup explorer.

Every explorer takes ``interactive``: with ``True`` it returns a widget for JupyterLab; with ``False`` (papermill
batch runs, CI) it returns static matplotlib figures / tables of the same content, so that a batch run never
blocks on a widget and still records what a reader would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from divaware.cohort import Case


def load_canonical(path: str | Path) -> np.ndarray:
    """Voxel array of a NIfTI file reoriented to RAS (axes x, y, z), as float32."""
    from divaware.exploration import read_canonical

    return read_canonical(path)[0]


def _slice_of(mask: np.ndarray | None, image: np.ndarray) -> int:
    from divaware.plots import tumour_slice

    return tumour_slice(mask if mask is not None else np.zeros(image.shape, bool), axis=-1)


def _window(images: list[np.ndarray], k: int) -> tuple[float, float]:
    # One grey-level window for all phases, so that contrast uptake shows as brightening between panels.
    values = np.concatenate([im[:, :, k].ravel() for im in images])
    lo, hi = np.percentile(values, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _draw_slice(ax: Any, image: np.ndarray, k: int, mask: np.ndarray | None, pred: np.ndarray | None,
                title: str, window: tuple[float, float] | None = None) -> None:
    # Transpose so that x runs left-right and y bottom-top, the radiological-ish view readers expect.
    vmin, vmax = window if window is not None else (None, None)
    ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
    if mask is not None and mask[:, :, k].any():
        ax.contour(mask[:, :, k].T, levels=[0.5], colors="lime", linewidths=1.0)
    if pred is not None and pred[:, :, k].any():
        ax.contour(pred[:, :, k].T, levels=[0.5], colors="magenta", linewidths=1.0, linestyles="--")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def case_figure(case: Case, prediction: str | Path | None = None, slice_index: int | None = None,
                phases: Sequence[int] | None = None) -> Figure:
    """All (or the chosen) phases of one case at one axial slice, truth in green, prediction dashed magenta."""
    import matplotlib.pyplot as plt

    phases = list(range(len(case.image_paths))) if phases is None else list(phases)
    images = [load_canonical(case.image_paths[p]) for p in phases]
    mask = load_canonical(case.mask_path) > 0.5 if case.mask_path is not None else None
    pred = load_canonical(prediction) > 0.5 if prediction is not None else None
    k = _slice_of(mask, images[0]) if slice_index is None else int(slice_index)
    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.8), squeeze=False)
    for ax, p, image in zip(axes[0], phases, images, strict=True):
        _draw_slice(ax, image, k, mask, pred, f"{case.patient_id} phase {p:04d}, z={k}", _window(images, k))
    fig.tight_layout()
    return fig


def slice_viewer(case: Case, prediction: str | Path | None = None, interactive: bool = True) -> Any:
    """Phase / slice / overlay viewer of one case; a static :func:`case_figure` when not interactive."""
    if not interactive:
        return case_figure(case, prediction)
    import ipywidgets as w
    import matplotlib.pyplot as plt

    images = [load_canonical(p) for p in case.image_paths]
    mask = load_canonical(case.mask_path) > 0.5 if case.mask_path is not None else None
    pred = load_canonical(prediction) > 0.5 if prediction is not None else None
    depth = images[0].shape[-1]
    phase = w.Dropdown(options=[(f"{i:04d}", i) for i in range(len(images))], value=min(1, len(images) - 1),
                       description="phase")
    k = w.IntSlider(value=_slice_of(mask, images[0]), min=0, max=depth - 1, description="slice")
    overlay = w.Checkbox(value=True, description="overlay")
    out = w.Output()

    def redraw(*_: Any) -> None:
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            _draw_slice(ax, images[phase.value], k.value, mask if overlay.value else None,
                        pred if overlay.value else None, f"{case.patient_id} phase {phase.value:04d}",
                        _window(images, k.value))
            plt.show()

    for control in (phase, k, overlay):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([phase, k, overlay]), out])


def subgroup_explorer(metadata: pd.DataFrame, scores: pd.DataFrame, cases: dict[str, Case] | None = None,
                      attributes: Sequence[str] = ("age_group", "menopause", "breast_density"),
                      min_support: float = 0.05, max_length: int = 3, interactive: bool = True,
                      top: int = 15) -> Any:
    """Divergent itemsets of per-case ``scores`` (columns are metrics, index ``patient_id``).

    Interactive: choose attributes, minimum support and metric; pick an itemset to list its cases and open
    one in :func:`slice_viewer`. Static: the top itemsets table for the given settings.
    """
    from divaware.subgroups import attribute_table, divergent_itemsets

    candidates = [c for c in metadata.columns if metadata[c].nunique(dropna=False) <= 12]

    def analyse(attrs: Sequence[str], support: float, metric: str) -> pd.DataFrame:
        table = attribute_table(metadata.loc[scores.index], list(attrs))
        return divergent_itemsets(table, scores[metric], min_support=support, max_length=max_length)

    if not interactive:
        return analyse(attributes, min_support, scores.columns[0]).head(top)

    import ipywidgets as w
    from IPython.display import display

    attrs = w.SelectMultiple(options=candidates, value=tuple(a for a in attributes if a in candidates),
                             description="attributes", rows=min(8, len(candidates)))
    support = w.FloatLogSlider(value=min_support, base=10, min=-3, max=-0.5, step=0.1, description="min support",
                               readout_format=".3f")
    metric = w.Dropdown(options=list(scores.columns), description="metric")
    itemset = w.Select(description="itemset", rows=8, layout=w.Layout(width="60%"))
    case_pick = w.Dropdown(description="case")
    table_out, case_out, viewer_out = w.Output(), w.Output(), w.Output()
    state: dict[str, pd.DataFrame] = {}

    def members(row: pd.Series) -> list[str]:
        mask = pd.Series(True, index=scores.index)
        for item in row["items"]:
            name, value = item.split("=", 1)
            mask &= metadata.loc[scores.index, name].astype(str) == value
        return list(mask[mask].index)

    def rerun(*_: Any) -> None:
        if not attrs.value:
            return
        result = analyse(attrs.value, support.value, metric.value)
        state["result"] = result
        itemset.options = [(f"{r.label}  (n={r['count']}, Δ={r.divergence:+.3f}, t={r.t:.1f})", i)
                           for i, r in result.head(50).iterrows()]
        with table_out:
            table_out.clear_output(wait=True)
            display(result.head(top)[["label", "count", "support", "mean", "divergence", "t"]])

    def pick_itemset(*_: Any) -> None:
        if itemset.value is None:
            return
        ids = members(state["result"].loc[itemset.value])
        case_pick.options = ids
        with case_out:
            case_out.clear_output(wait=True)
            display(scores.loc[ids].join(metadata.loc[ids, list(attrs.value)]).sort_values(metric.value))

    def open_case(*_: Any) -> None:
        if cases is None or case_pick.value is None:
            return
        with viewer_out:
            viewer_out.clear_output(wait=True)
            display(slice_viewer(cases[case_pick.value], interactive=True))

    for control in (attrs, support, metric):
        control.observe(rerun, names="value")
    itemset.observe(pick_itemset, names="value")
    case_pick.observe(open_case, names="value")
    rerun()
    return w.VBox([w.HBox([attrs, w.VBox([support, metric])]), table_out, itemset, case_out, case_pick,
                   viewer_out])
