"""ipywidgets explorers for the notebooks: a slice viewer and a subgroup explorer.

Every explorer takes ``interactive``: with ``True`` it returns a widget for JupyterLab; with ``False`` (papermill
batch runs, CI) it returns static matplotlib figures / tables of the same content, so that a batch run never
blocks on a widget and still records what a reader would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    from divaware.plots import _GT_COLOR, _PRED_COLOR

    vmin, vmax = window if window is not None else (None, None)
    ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
    # Same colours as plots.plot_case_gallery and the notebooks' prose: truth green, prediction red.
    if mask is not None and mask[:, :, k].any():
        ax.contour(mask[:, :, k].T, levels=[0.5], colors=_GT_COLOR, linewidths=1.2)
    if pred is not None and pred[:, :, k].any():
        ax.contour(pred[:, :, k].T, levels=[0.5], colors=_PRED_COLOR, linewidths=1.2, linestyles="--")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _new_figure(figsize: tuple[float, float]) -> Figure:
    # Never pyplot: a pyplot figure is shown again by the inline backend at the end of the cell (the
    # "every example case twice" of notebook 01) and stays alive in pyplot's registry.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def case_figure(case: Case, prediction: str | Path | None = None, slice_index: int | None = None,
                phases: Sequence[int] | None = None, label: str | None = None) -> Figure:
    """All (or the chosen) phases of one case at one axial slice, truth in green, prediction dashed red.

    ``label`` (e.g. "young, dense breasts") is added to the title so a reader knows which case this is.
    """
    phases = list(range(len(case.image_paths))) if phases is None else list(phases)
    images = [load_canonical(case.image_paths[p]) for p in phases]
    mask = load_canonical(case.mask_path) > 0.5 if case.mask_path is not None else None
    pred = load_canonical(prediction) > 0.5 if prediction is not None else None
    k = _slice_of(mask, images[0]) if slice_index is None else int(slice_index)
    fig = _new_figure((2.6 * len(images), 3.0))
    axes = fig.subplots(1, len(images), squeeze=False)
    for ax, p, image in zip(axes[0], phases, images, strict=True):
        _draw_slice(ax, image, k, mask, pred, f"{case.patient_id} phase {p:04d}, z={k}", _window(images, k))
    if label:
        fig.suptitle(f"{case.patient_id}: {label}", fontsize=10)
    return fig


def _as_predictions(prediction: str | Path | Mapping[str, str | Path] | None) -> dict[str, Path]:
    if prediction is None:
        return {}
    if isinstance(prediction, Mapping):
        return {str(k): Path(v) for k, v in prediction.items() if v is not None}
    return {"prediction": Path(prediction)}


def slice_viewer(case: Case, prediction: str | Path | Mapping[str, str | Path] | None = None,
                 interactive: bool = True, label: str | None = None) -> Any:
    """Phase / slice / overlay viewer of one case; a static :func:`case_figure` when not interactive.

    ``prediction`` is one prediction file or a mapping model name -> file; with several, a *model* control
    chooses whose prediction (dashed red) is drawn over the truth (green). Each redraw displays a PNG inside
    the widget's output area, so the picture is an ordinary ``image/png`` output: it renders as an image in
    JupyterLab and is kept in the widget state saved with the notebook (divaware installs the JupyterLab
    setting that saves it), so a notebook reopened without a kernel still shows the last view.
    """
    predictions = _as_predictions(prediction)
    if not interactive:
        first = next(iter(predictions.values()), None)
        return case_figure(case, first, label=label)
    import ipywidgets as w

    from divaware.plots import show

    images = [load_canonical(p) for p in case.image_paths]
    mask = load_canonical(case.mask_path) > 0.5 if case.mask_path is not None else None
    preds = {name: load_canonical(path) > 0.5 for name, path in predictions.items()}
    depth = images[0].shape[-1]
    phase = w.Dropdown(options=[(f"{i:04d}", i) for i in range(len(images))], value=min(1, len(images) - 1),
                       description="phase")
    k = w.IntSlider(value=_slice_of(mask, images[0]), min=0, max=depth - 1, description="slice")
    overlay = w.Checkbox(value=True, description="overlay")
    model = w.Dropdown(options=list(preds), description="model", layout=w.Layout(display="" if len(preds) > 1
                                                                                   else "none"))
    out = w.Output()
    heading = f"{case.patient_id}: {label}" if label else case.patient_id

    def redraw(*_: Any) -> None:
        fig = _new_figure((4.5, 4.5))
        ax = fig.subplots()
        pred = preds.get(model.value) if preds else None
        who = f" · {model.value}" if preds else ""
        _draw_slice(ax, images[phase.value], k.value, mask if overlay.value else None,
                    pred if overlay.value else None, f"{heading} · phase {phase.value:04d}{who}",
                    _window(images, k.value))
        with out:
            out.clear_output(wait=True)
            show(fig)

    for control in (phase, k, overlay, model):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([phase, k, overlay, model]), out])


# Metadata columns a subgroup can sensibly be formed from: who the patient is, the tumour, and how she was
# scanned. Everything else in the spreadsheet (the split, raw spellings, identifiers, dates, DICOM
# bookkeeping such as high_bit or image_rows) is not a subgroup anyone would report.
EXPLORER_ATTRIBUTES = (
    "age_group", "menopause", "breast_density", "dataset", "ethnicity", "bmi_group", "tumor_subtype",
    "nottingham_grade", "hr", "er", "pr", "her2", "multifocal_cancer", "bilateral_breast_cancer", "pcr",
    "manufacturer", "field_strength", "fat_suppressed", "num_phases",
)


def explorer_attributes(metadata: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    """The attributes the subgroup explorer offers: the meaningful columns present with at least two values,
    plus any ``extra`` column asked for explicitly."""
    offered = [c for c in EXPLORER_ATTRIBUTES if c in metadata.columns and metadata[c].nunique(dropna=False) >= 2]
    return offered + [c for c in extra if c in metadata.columns and c not in offered]


def _itemset_members(metadata: pd.DataFrame, ids: pd.Index, items: Sequence[str]) -> list[str]:
    """The cases of ``ids`` in the itemset ``items`` (``attribute=value`` strings)."""
    mask = pd.Series(True, index=ids)
    for item in items:
        name, value = item.split("=", 1)
        mask &= metadata.loc[ids, name].astype(str) == value
    return list(mask[mask].index)


def _prediction_file(predictions: str | Path | Callable[[str], str | Path | None] | None, pid: str) -> Path | None:
    if predictions is None:
        return None
    path = Path(predictions(pid)) if callable(predictions) else Path(predictions) / f"{pid}.nii.gz"
    return path if path.is_file() else None


def _explorer_controls(candidates: Sequence[str], attributes: Sequence[str], min_support: float,
                       metrics: Sequence[str]) -> tuple[Any, Any, Any, Any, Any]:
    """The explorer's controls: attributes, min support, metric, itemset, case."""
    import ipywidgets as w

    attrs = w.SelectMultiple(options=candidates, value=tuple(a for a in attributes if a in candidates),
                             description="attributes", rows=min(8, len(candidates)))
    support = w.FloatLogSlider(value=min_support, base=10, min=-3, max=-0.5, step=0.1, description="min support",
                               readout_format=".3f")
    metric = w.Dropdown(options=list(metrics), description="metric")
    itemset = w.Select(description="itemset", rows=8, layout=w.Layout(width="60%"))
    case_pick = w.Dropdown(description="case")
    return attrs, support, metric, itemset, case_pick


def _explorer_box(attrs: Any, support: Any, metric: Any, itemset: Any, case_pick: Any, table_out: Any,
                  case_out: Any, viewer_out: Any, state: dict[str, Any]) -> Any:
    """The explorer's layout, with its controls and outputs exposed as ``controls`` (and its ``state``)."""
    import ipywidgets as w

    box = w.VBox([w.HBox([attrs, w.VBox([support, metric])]), table_out, itemset, case_out, case_pick,
                  viewer_out])
    box.controls = {"attributes": attrs, "min_support": support, "metric": metric, "itemset": itemset,
                    "case": case_pick, "table": table_out, "members": case_out, "viewer": viewer_out}
    box.state = state
    return box


def subgroup_explorer(metadata: pd.DataFrame, scores: pd.DataFrame, cases: dict[str, Case] | None = None,
                      attributes: Sequence[str] = ("age_group", "menopause", "breast_density"),
                      min_support: float = 0.05, max_length: int = 3, interactive: bool = True,
                      top: int = 15,
                      predictions: str | Path | Callable[[str], str | Path | None] | None = None) -> Any:
    """Divergent itemsets of per-case ``scores`` (columns are metrics, index ``patient_id``).

    Interactive: choose attributes, minimum support and metric; pick an itemset to list its cases and open
    one in :func:`slice_viewer`, with the model's prediction over the truth when ``predictions`` is given (a
    folder of ``<patient_id>.nii.gz`` or a function patient_id -> file). Itemsets are keyed by their label,
    never by row position, so the selection, the member table and the viewer always describe the same
    itemset after any control change (if the chosen itemset disappears, the new top one is selected).
    Static: the top itemsets table for the given settings. The widget exposes its controls and outputs as
    attributes (``controls``) for programmatic use and tests.
    """
    from divaware.subgroups import attribute_table, divergent_itemsets

    candidates = explorer_attributes(metadata, extra=attributes)

    def analyse(attrs: Sequence[str], support: float, metric: str) -> pd.DataFrame:
        table = attribute_table(metadata.loc[scores.index], list(attrs))
        return divergent_itemsets(table, scores[metric], min_support=support, max_length=max_length)

    if not interactive:
        return analyse(attributes, min_support, scores.columns[0]).head(top)

    import ipywidgets as w
    from IPython.display import display

    attrs, support, metric, itemset, case_pick = _explorer_controls(candidates, attributes, min_support,
                                                                    list(scores.columns))
    table_out, case_out, viewer_out = w.Output(), w.Output(), w.Output()
    state: dict[str, Any] = {"result": pd.DataFrame(), "members": []}

    def show_members(*_: Any) -> None:
        if state.get("busy"):
            return
        result: pd.DataFrame = state["result"]
        label = itemset.value
        if label is None or label not in set(result["label"]):
            ids: list[str] = []
        else:
            ids = _itemset_members(metadata, scores.index, result.loc[result["label"] == label, "items"].iloc[0])
        state["members"] = ids
        with case_out:
            case_out.clear_output(wait=True)
            if ids:
                display(scores.loc[ids].join(metadata.loc[ids, list(attrs.value)]).sort_values(metric.value))
        # Replacing the options may or may not fire a value event; open the first member explicitly.
        state["busy"] = True
        try:
            case_pick.options = ids
            case_pick.value = ids[0] if ids else None
        finally:
            state["busy"] = False
        open_case()

    def rerun(*_: Any) -> None:
        if not attrs.value:
            return
        result = analyse(attrs.value, support.value, metric.value)
        state["result"] = result
        previous = itemset.value
        shown = result.head(50)
        # Keyed by label: the value of a choice is the itemset itself, not its row number in this result.
        options = [(f"{r.label}  (n={r['count']}, Δ={r.divergence:+.3f}, t={r.t:.1f})", r.label)
                   for _, r in shown.iterrows()]
        labels = [v for _, v in options]
        state["busy"] = True  # one update of the members below, not one per intermediate value
        try:
            itemset.options = options
            itemset.value = previous if previous in labels else (labels[0] if labels else None)
        finally:
            state["busy"] = False
        with table_out:
            table_out.clear_output(wait=True)
            display(result.head(top)[["label", "count", "support", "mean", "divergence", "t"]])
        show_members()  # always, even when the label stayed: its members may differ under new settings

    def open_case(*_: Any) -> None:
        if state.get("busy"):
            return
        if cases is None or case_pick.value is None:
            with viewer_out:
                viewer_out.clear_output()
            return
        pid = case_pick.value
        pred = _prediction_file(predictions, pid)
        with viewer_out:
            viewer_out.clear_output(wait=True)
            display(slice_viewer(cases[pid], {"prediction": pred} if pred is not None else None,
                                 interactive=True, label=itemset.value))

    for control in (attrs, support, metric):
        control.observe(rerun, names="value")
    itemset.observe(show_members, names="value")
    case_pick.observe(open_case, names="value")
    box = _explorer_box(attrs, support, metric, itemset, case_pick, table_out, case_out, viewer_out, state)
    rerun()
    return box
