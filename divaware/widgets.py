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

from divaware.metrics import DEFAULT_ATTRIBUTES

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


def disagreement_slice(truth: np.ndarray | None, pred: np.ndarray | None, axis: int = -1) -> int | None:
    """The slice along ``axis`` with the most voxels where prediction and truth disagree (false positive or
    false negative), or None when they agree everywhere (or either is missing). Ties: the first such slice.

    A Dice-0 case whose prediction lies away from the tumour opens on that prediction, not on a tumour slice
    where nothing red is drawn.
    """
    if truth is None or pred is None:
        return None
    wrong = np.asarray(truth, bool) ^ np.asarray(pred, bool)
    if not wrong.any():
        return None
    axis = axis % wrong.ndim
    profile = wrong.sum(axis=tuple(i for i in range(wrong.ndim) if i != axis))
    return int(np.argmax(profile))


def opening_slice(truth: np.ndarray | None, pred: np.ndarray | None, axis: int = -1) -> int | None:
    """The slice a viewer opens on: among the slices where truth and prediction both show, the one where they
    disagree most; when no slice holds both (an empty prediction, or one off the tumour), the slice of most
    disagreement (:func:`disagreement_slice`). None when there is nothing to compare."""
    found = disagreement_slice(truth, pred, axis)
    if found is None:
        return None
    t, p = np.asarray(truth, bool), np.asarray(pred, bool)
    axis = axis % t.ndim
    others = tuple(i for i in range(t.ndim) if i != axis)
    both = t.any(axis=others) & p.any(axis=others)
    if not both.any():
        return found
    wrong = (t ^ p).sum(axis=others)
    return int(np.argmax(np.where(both, wrong, -1)))


def largest_component_slice(mask: np.ndarray | None, axis: int = -1) -> int | None:
    """The slice along ``axis`` through the centre of the mask's largest connected component (None if empty)."""
    if mask is None or not np.any(mask):
        return None
    from scipy import ndimage

    from divaware.plots import tumour_slice

    labels, n = ndimage.label(np.asarray(mask, bool))
    sizes = np.bincount(labels.ravel())[1:]
    return tumour_slice(labels == int(np.argmax(sizes)) + 1, axis=axis)


def _score_text(scores: Mapping[str, float] | None) -> str:
    """'Dice 0.00 · HD95 12.3 mm' from a case's per-case scores (whichever are given)."""
    if not scores:
        return ""
    names = {"dice": ("Dice", "{:.2f}"), "hd95_mm": ("HD95", "{:.1f} mm"), "hd95": ("HD95", "{:.1f} vox"),
             "volume_error": ("volume error", "{:.0%}")}
    parts = []
    for key, value in scores.items():
        if value is None or not np.isfinite(float(value)):
            continue
        name, fmt = names.get(key, (key, "{:.3g}"))
        if key == "hd95" and "hd95_mm" in scores:
            continue
        parts.append(f"{name} {fmt.format(float(value))}")
    return " · ".join(parts)


def _window(images: list[np.ndarray], k: int) -> tuple[float, float]:
    # One grey-level window for all phases, so that contrast uptake shows as brightening between panels.
    values = np.concatenate([im[:, :, k].ravel() for im in images])
    lo, hi = np.percentile(values, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _draw_slice(ax: Any, image: np.ndarray, k: int, mask: np.ndarray | None, pred: np.ndarray | None,
                title: str, window: tuple[float, float] | None = None) -> None:
    # Transpose so that x runs left-right and y bottom-top, the radiological-ish view readers expect.
    from matplotlib.lines import Line2D

    from divaware.plots import _GT_COLOR, _PRED_COLOR

    vmin, vmax = window if window is not None else (None, None)
    ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
    # Same colours as plots.plot_case_gallery and the notebooks' prose: truth green, prediction red.
    handles = []
    if mask is not None:
        handles.append(Line2D([], [], color=_GT_COLOR, lw=1.2, label="truth"))
        if mask[:, :, k].any():
            ax.contour(mask[:, :, k].T, levels=[0.5], colors=_GT_COLOR, linewidths=1.2)
    if pred is not None:
        handles.append(Line2D([], [], color=_PRED_COLOR, lw=1.2, ls="--", label="prediction"))
        if pred[:, :, k].any():
            ax.contour(pred[:, :, k].T, levels=[0.5], colors=_PRED_COLOR, linewidths=1.2, linestyles="--")
        else:  # say so: an absent red contour could be a drawing problem as well as an empty prediction
            ax.text(0.5, 0.03, "prediction empty on this slice" if pred.any() else "prediction empty",
                    transform=ax.transAxes, ha="center", va="bottom", color=_PRED_COLOR, fontsize=8,
                    bbox={"facecolor": "black", "alpha": 0.6, "lw": 0})
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.6)
    import textwrap

    # wrapped, never cut: the distinguishing item of a long itemset label is often its last one
    ax.set_title("\n".join(textwrap.wrap(title, 70)) or title, fontsize=9)
    ax.axis("off")


def _new_figure(figsize: tuple[float, float]) -> Figure:
    # Never pyplot: a pyplot figure is shown again by the inline backend at the end of the cell (the
    # "every example case twice" of notebook 01) and stays alive in pyplot's registry.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


SUBTRACTION = "0001 − 0000"
"""The subtraction image's name: first post-contrast minus pre-contrast, what radiologists read DCE-MRI by
(a tumour that is darker than dense parenchyma at phase 1 is the brightest thing here)."""


def _subtraction(case: Case) -> np.ndarray:
    return load_canonical(case.image_paths[1]).astype(np.float32) - load_canonical(case.image_paths[0])


def _viewer_images(case: Case, subtraction: bool) -> tuple[list[np.ndarray], list[tuple[str, int]]]:
    """The viewer's images and phase-control options: every phase, then the subtraction when asked."""
    images = [load_canonical(p) for p in case.image_paths]
    options = [(f"{i:04d}", i) for i in range(len(images))]
    if subtraction and len(images) > 1:
        options.append((SUBTRACTION, len(images)))
        images.append(images[1].astype(np.float32) - images[0])
    return images, options


def case_figure(case: Case, prediction: str | Path | None = None, slice_index: int | None = None,
                phases: Sequence[int] | None = None, label: str | None = None,
                scores: Mapping[str, float] | None = None, show_subtraction: bool = False) -> Figure:
    """All (or the chosen) phases of one case at one axial slice, truth in green, prediction dashed red.

    ``label`` (e.g. "young, dense breasts") and the case's ``scores`` (Dice, HD95) are added to the title so a
    reader knows which case this is and how it scored. Without ``slice_index`` the slice is
    :func:`opening_slice` (truth and prediction both shown, disagreeing most), else the tumour's centre. A
    legend names the contours; a prediction with nothing on the slice says so. ``show_subtraction``: one more
    panel, phase 0001 − 0000 (:data:`SUBTRACTION`), in its own grey window.
    """
    phases = list(range(len(case.image_paths))) if phases is None else list(phases)
    images = [load_canonical(case.image_paths[p]) for p in phases]
    mask = load_canonical(case.mask_path) > 0.5 if case.mask_path is not None else None
    pred = load_canonical(prediction) > 0.5 if prediction is not None else None
    if slice_index is None:
        found = opening_slice(mask, pred)
        k = _slice_of(mask, images[0]) if found is None else found
    else:
        k = int(slice_index)
    sub = _subtraction(case) if show_subtraction and len(case.image_paths) > 1 else None
    fig = _new_figure((2.6 * (len(images) + (sub is not None)), 3.0))
    axes = fig.subplots(1, len(images) + (sub is not None), squeeze=False)
    for ax, p, image in zip(axes[0], phases, images, strict=False):
        _draw_slice(ax, image, k, mask, pred, f"{case.patient_id} phase {p:04d}, z={k}", _window(images, k))
    if sub is not None:
        _draw_slice(axes[0][-1], sub, k, mask, pred, f"{case.patient_id} {SUBTRACTION}, z={k}", _window([sub], k))
    heading = " · ".join(x for x in (label, _score_text(scores)) if x)
    if heading:
        fig.suptitle(f"{case.patient_id}: {heading}", fontsize=10)
    return fig


def _as_predictions(prediction: str | Path | Mapping[str, str | Path] | None) -> dict[str, Path]:
    if prediction is None:
        return {}
    if isinstance(prediction, Mapping):
        return {str(k): Path(v) for k, v in prediction.items() if v is not None}
    return {"prediction": Path(prediction)}


def slice_viewer(case: Case, prediction: str | Path | Mapping[str, str | Path] | None = None,
                 interactive: bool = True, label: str | None = None,
                 scores: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None = None,
                 show_subtraction: bool = False) -> Any:
    """Phase / slice / overlay viewer of one case; a static :func:`case_figure` when not interactive.

    ``prediction`` is one prediction file or a mapping model name -> file; with several, a *model* control
    chooses whose prediction (dashed red) is drawn over the truth (green); the first model of the mapping is
    shown first (pass the reference model first). ``scores`` (per-case scores such as
    ``{"dice": 0.0, "hd95_mm": 31.2}``, or model name -> such a mapping) go into the title. The viewer opens on
    :func:`opening_slice`: a slice where truth and prediction both show, disagreeing most there (else the
    slice of most disagreement: a false positive away from the tumour is where a Dice-0 case fails), and
    three buttons jump to that slice, to the centre of the truth's largest
    component and to the centre of the prediction's largest component. Each redraw displays a PNG inside the
    widget's output area, so the picture is an ordinary ``image/png`` output: it renders as an image in
    JupyterLab and is kept in the widget state saved with the notebook (see :func:`install_lab_settings`),
    so a notebook reopened without a kernel still shows the last view. ``show_subtraction``: the *phase* control
    also offers phase 0001 − 0000 (:data:`SUBTRACTION`, in its own grey window; a static figure gets a panel).
    """
    predictions = _as_predictions(prediction)
    per_model: dict[str, Mapping[str, float]] = {}
    if scores:
        nested = all(isinstance(v, Mapping) for v in scores.values())
        per_model = dict(scores) if nested else {name: scores for name in (predictions or {"": None})}  # type: ignore[misc]
    if not interactive:
        first = next(iter(predictions), None)
        return case_figure(case, predictions.get(first) if first else None, label=label,
                           scores=per_model.get(first or "", None) if per_model else None, show_subtraction=show_subtraction)
    import ipywidgets as w

    from divaware.plots import show

    install_lab_settings()
    images, options = _viewer_images(case, show_subtraction)
    n_phases = len(case.image_paths)
    mask = load_canonical(case.mask_path) > 0.5 if case.mask_path is not None else None
    preds = {name: load_canonical(path) > 0.5 for name, path in predictions.items()}
    depth = images[0].shape[-1]
    first_pred = next(iter(preds.values()), None)
    start = opening_slice(mask, first_pred)
    phase = w.Dropdown(options=options, value=min(1, n_phases - 1), description="phase")
    k = w.IntSlider(value=_slice_of(mask, images[0]) if start is None else start, min=0, max=depth - 1,
                    description="slice")
    overlay = w.Checkbox(value=True, description="overlay")
    model = w.Dropdown(options=list(preds), description="model", layout=w.Layout(display="" if len(preds) > 1
                                                                                   else "none"))
    jumps = {"disagreement": w.Button(description="most disagreement", tooltip="slice with most FP + FN voxels"),
             "truth": w.Button(description="truth's largest", tooltip="centre of the truth's largest component"),
             "prediction": w.Button(description="prediction's largest",
                                    tooltip="centre of the prediction's largest component")}
    out = w.Output()
    heading = f"{case.patient_id}: {label}" if label else case.patient_id

    def target(which: str) -> int | None:
        pred = preds.get(model.value) if preds else None
        if which == "disagreement":
            return disagreement_slice(mask, pred)
        return largest_component_slice(mask if which == "truth" else pred)

    def refresh_jumps() -> None:
        for which, button in jumps.items():
            button.disabled = target(which) is None

    def jump(which: str) -> Callable[[Any], None]:
        def go(_: Any) -> None:
            found = target(which)
            if found is not None:
                k.value = found
        return go

    def redraw(*_: Any) -> None:
        fig = _new_figure((4.5, 4.5))
        ax = fig.subplots()
        pred = preds.get(model.value) if preds else None
        who = f" · {model.value}" if preds else ""
        score = _score_text(per_model.get(model.value if preds else "", {})) if per_model else ""
        shown = SUBTRACTION if phase.value == n_phases else f"phase {phase.value:04d}"
        # the phases share one grey window (uptake shows as brightening); the subtraction has its own
        window = _window([images[-1]], k.value) if phase.value == n_phases else _window(images[:n_phases], k.value)
        _draw_slice(ax, images[phase.value], k.value, mask if overlay.value else None,
                    pred if overlay.value else None,
                    f"{heading} · {shown}{who}" + (f" · {score}" if score else ""), window)
        with out:
            out.clear_output(wait=True)
            show(fig)

    for which, button in jumps.items():
        button.on_click(jump(which))
    for control in (phase, k, overlay, model):
        control.observe(redraw, names="value")
    model.observe(lambda *_: refresh_jumps(), names="value")
    refresh_jumps()
    redraw()
    box = w.VBox([w.HBox([phase, k, overlay, model]), w.HBox(list(jumps.values())), out])
    box.controls = {"phase": phase, "slice": k, "overlay": overlay, "model": model, "jumps": jumps,
                    "picture": out}
    return box


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
    from divaware.subgroups import DERIVED_ATTRIBUTES

    offered = [c for c in EXPLORER_ATTRIBUTES if c in metadata.columns and metadata[c].nunique(dropna=False) >= 2]
    # derived attributes (dense, from breast_density) are offered when asked for and their source is there
    derivable = {a for a, (src, _) in DERIVED_ATTRIBUTES.items() if src in metadata.columns}
    return offered + [c for c in extra if (c in metadata.columns or c in derivable) and c not in offered]


# Per-case scores where a *lower* value is better: analysed with the sign flipped, so that "worse" is always
# a negative Δ and the one-sided test looks in the right direction, and shown in their own units.
LOWER_IS_BETTER = ("hd95", "hd95_mm", "norm_hd", "volume_error", "abs_volume_error")

# Settings JupyterLab needs so that a notebook's widgets still show after a kernel restart or without a kernel:
# save the widget state with the notebook. Identical to jupyter/divaware-widgets.json, which a wheel install
# puts into <prefix>/share/jupyter/lab/settings/overrides.d; an editable install (the README's) skips such
# data files, so install_lab_settings() writes the same file at run time.
LAB_SETTINGS: dict[str, Any] = {"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}
LAB_SETTINGS_FILE = "divaware-widgets.json"


def install_lab_settings(app_dir: str | Path | None = None) -> Path | None:
    """Install :data:`LAB_SETTINGS` as a JupyterLab settings override; returns the file, None if not writable.

    ``app_dir``: the JupyterLab application folder (default: the one ``jupyter lab`` of this environment uses,
    ``$JUPYTERLAB_DIR`` or ``<prefix>/share/jupyter/lab``). JupyterLab reads overrides when a page loads, so the
    file is installed by ``divaware run`` (before anyone opens JupyterLab) and by every interactive explorer
    (for the next page load). An existing identical file is left alone; a read-only prefix is not an error.
    """
    import json

    if app_dir is None:
        app_dir = _lab_app_dir()
    target = Path(app_dir) / "settings" / "overrides.d" / LAB_SETTINGS_FILE
    text = json.dumps(LAB_SETTINGS, indent=2) + "\n"
    try:
        if target.is_file() and target.read_text() == text:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError:
        return None
    return target


def _lab_app_dir() -> Path:
    """The folder `jupyter lab` of this environment reads (jupyterlab.commands.get_app_dir's rule, without the
    seconds it takes to import): ``$JUPYTERLAB_DIR``, else ``<prefix>/share/jupyter/lab``, or the user base's
    when JupyterLab itself is a ``pip install --user``."""
    import importlib.util
    import os
    import site
    import sys

    if os.environ.get("JUPYTERLAB_DIR"):
        return Path(os.environ["JUPYTERLAB_DIR"]).resolve()
    app_dir = Path(sys.prefix) / "share" / "jupyter" / "lab"
    spec = importlib.util.find_spec("jupyterlab")
    userbase = site.getuserbase() if hasattr(site, "getuserbase") else None
    if spec and spec.origin and userbase and spec.origin.startswith(userbase) and not str(app_dir).startswith(userbase):
        app_dir = Path(userbase) / "share" / "jupyter" / "lab"
    return app_dir.resolve()


def statistic_column(itemsets: pd.DataFrame) -> str | None:
    """The column holding the itemsets' test statistic (:func:`divaware.subgroups.statistic_column`)."""
    from divaware.subgroups import statistic_column as found

    return found(itemsets)


def itemset_order(itemsets: pd.DataFrame) -> pd.DataFrame:
    """Itemsets in the order a reader should see them: tested ones by q, then Δ (most negative first); the
    untested ones (below the test's minimum size, q NaN) last, by Δ. Index reset; the frame's attrs kept."""
    tested = pd.to_numeric(itemsets["q"], errors="coerce").notna()
    keys = pd.DataFrame({"untested": ~tested, "q": pd.to_numeric(itemsets["q"], errors="coerce"),
                         "divergence": itemsets["divergence"], "label": itemsets["label"].astype(str)})
    order = keys.sort_values(["untested", "q", "divergence", "label"], kind="mergesort").index
    out = itemsets.loc[order].reset_index(drop=True)
    out.attrs.update(itemsets.attrs)
    return out


def itemset_table(itemsets: pd.DataFrame, fdr: float = 0.05, top: int | None = None,
                  metric: str = "dice") -> pd.DataFrame:
    """A readable table of :func:`divaware.subgroups.divergent_itemsets` results, in :func:`itemset_order`.

    Columns: ``itemset`` (the label as a string, never a frozenset), ``n``, ``support``, mean ``metric``, ``Δ``
    (DivExplorer's divergence: mean in the itemset − mean overall), ``ps`` with ``ps_low``/``ps_high`` (the
    probability of superiority and its 95 % CI: the effect the rank test decides on, < 0.5 = typically worse),
    the test statistic (``z_mw``), ``p``, ``q`` and ``significant`` (q ≤ ``fdr`` and the effect worse,
    :func:`divaware.subgroups.is_significant`); ``tested`` is False for itemsets too small to be tested.
    """
    from divaware.subgroups import is_significant

    ordered = itemset_order(itemsets)
    stat = statistic_column(ordered)
    table = pd.DataFrame({
        "itemset": ordered["label"].astype(str),
        "n": ordered["count"].astype(int),
        "support": ordered["support"].astype(float),
        f"mean {metric}": ordered["mean"].astype(float),
        "Δ": ordered["divergence"].astype(float),
    })
    for c in ("ps", "ps_low", "ps_high"):  # the rank effect the flag is decided on, and its 95 % CI
        if c in ordered.columns:
            table[c] = ordered[c].astype(float)
    if stat is not None:
        table[stat] = ordered[stat].astype(float)
    table["p"] = ordered["p"].astype(float)
    table["q"] = ordered["q"].astype(float)
    table["significant"] = is_significant(ordered, fdr).to_numpy()
    table["tested"] = pd.to_numeric(ordered["q"], errors="coerce").notna().to_numpy()
    return table.head(top) if top is not None else table


def styled_itemsets(table: pd.DataFrame) -> Any:
    """An :func:`itemset_table` for display: labels in full (pandas cuts strings at 50 characters), numbers
    rounded, untested itemsets greyed, significant ones in bold."""
    def row_style(row: pd.Series) -> list[str]:
        if not row.get("tested", True):
            return ["color: #9a9a9a"] * len(row)
        return ["font-weight: bold" if row.get("significant", False) else ""] * len(row)

    fmt = {c: "{:.3f}" for c in table.columns if pd.api.types.is_float_dtype(table[c])}
    fmt.update({c: "{:.2g}" for c in ("p", "q") if c in table.columns})
    return (table.style.apply(row_style, axis=1).format(fmt, na_rep="–").hide(axis="index")
            .set_properties(subset=["itemset"], **{"text-align": "left", "white-space": "normal"}))


def _oriented(scores: pd.Series) -> tuple[pd.Series, bool]:
    """Scores with "higher is better" (the analysis' convention): lower-is-better metrics are negated."""
    flip = str(scores.name) in LOWER_IS_BETTER
    return (-scores if flip else scores), flip


def _worst_first(scores: pd.DataFrame, ids: Sequence[str], metric: str) -> list[str]:
    """``ids`` sorted worst first by ``metric`` (lowest Dice, highest HD95), then by id for equal scores."""
    values = scores.loc[list(ids), metric].astype(float)
    oriented, _ = _oriented(values.rename(metric))
    frame = pd.DataFrame({"v": oriented.to_numpy(), "id": [str(i) for i in ids]}, index=list(ids))
    return list(frame.sort_values(["v", "id"], kind="mergesort", na_position="first").index)


def _analyse_scores(metadata: pd.DataFrame, scores: pd.DataFrame, attrs: Sequence[str], support: float,
                    metric: str, max_length: int) -> pd.DataFrame:
    """Divergent itemsets of one per-case score column, in :func:`itemset_order`, in the metric's own units."""
    from divaware.subgroups import attribute_table, divergent_itemsets

    values = scores[metric].astype(float)
    # HD95 is undefined for an empty prediction: such cases are left out of this metric's analysis
    # (they are listed first among a group's cases) and the table's caption says how many.
    values = values[np.isfinite(values.to_numpy())]
    table = attribute_table(metadata.loc[values.index], list(attrs))
    oriented, flip = _oriented(values.rename(metric))
    found = itemset_order(divergent_itemsets(table, oriented, min_support=support, max_length=max_length))
    if flip:  # back to the metric's own units; q, the order and significance already point at "worse"
        found = found.assign(mean=-found["mean"], divergence=-found["divergence"])
    found.attrs.update(flipped=flip, left_out=int(len(scores) - len(values)))
    return found


def _readable_itemsets(result: pd.DataFrame, metric: str, fdr: float) -> pd.DataFrame:
    """:func:`itemset_table` of an :func:`_analyse_scores` result (significance judged on "worse")."""
    flip = result.attrs.get("flipped", False)
    # significance is judged on the oriented frame (Δ < 0 = worse), whatever the metric's direction
    oriented = result.assign(divergence=-result["divergence"]) if flip else result
    table = itemset_table(oriented, fdr, metric=metric)
    if flip:
        table["Δ"] = -table["Δ"]
    return table


def _shapley_table(result: pd.DataFrame, label: str) -> pd.DataFrame:
    """The Shapley contributions to Δ of the selected itemset, named in the column (follows the selection)."""
    from divaware.subgroups import shapley_contributions

    contrib = shapley_contributions(result, label)
    return contrib.to_frame(f"Shapley contribution to Δ of {label}").round(4)


def _itemset_option(r: pd.Series) -> str:
    tested = np.isfinite(r["q"])
    stats = f"p={r['p']:.2g}, q={r['q']:.2g}" if tested else "not tested: too few cases"
    return f"{r['label']}  (n={r['count']}, ps={r['ps']:.2f}, Δ mean={r['divergence']:+.3f}, {stats})"


def subgroup_explorer(metadata: pd.DataFrame, scores: pd.DataFrame, cases: dict[str, Case] | None = None,
                      attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
                      min_support: float = 0.05, max_length: int = 3, interactive: bool = True,
                      top: int = 15,
                      predictions: str | Path | Callable[[str], str | Path | None] | None = None,
                      fdr: float = 0.05) -> Any:
    """Divergent itemsets of per-case ``scores`` (columns are metrics, index ``patient_id``).

    Interactive: choose attributes, minimum support and metric (any per-case score column: Dice, HD95,
    volume error; lower-is-better ones are analysed so that a failing group has Δ < 0 and shown in their own
    units); every itemset is listed with n, Δ, p and q, tested ones by q then Δ, those under the test's
    minimum size greyed and last (:func:`itemset_order`). Picking an itemset lists its cases worst first, in
    the member table and the case dropdown alike, and opens the worst in :func:`slice_viewer` with the model's
    prediction over the truth when ``predictions`` is given (a folder of ``<patient_id>.nii.gz`` or a function
    patient_id -> file), on the slice of most disagreement, with its scores in the title. Itemsets are keyed by
    their label, never by row position, so the selection, the member table and the viewer always describe the
    same itemset after any control change (if the chosen itemset disappears, the new top one is selected); the
    case being viewed stays selected while it is still a member. Static: the :func:`itemset_table` of the
    given settings (top ``top`` rows). The widget exposes its controls (``controls``) and state (``state``).
    """
    if not interactive:
        metric0 = str(scores.columns[0])
        return _readable_itemsets(_analyse_scores(metadata, scores, attributes, min_support, metric0, max_length),
                                  metric0, fdr).head(top)
    install_lab_settings()
    return _SubgroupExplorer(metadata, scores, cases, attributes, min_support, max_length, top, predictions,
                             fdr).box


class _SubgroupExplorer:
    """The interactive explorer of :func:`subgroup_explorer`: its controls, outputs, state and callbacks."""

    def __init__(self, metadata: pd.DataFrame, scores: pd.DataFrame, cases: dict[str, Case] | None,
                 attributes: Sequence[str], min_support: float, max_length: int, top: int,
                 predictions: str | Path | Callable[[str], str | Path | None] | None, fdr: float) -> None:
        import ipywidgets as w

        self.metadata, self.scores, self.cases = metadata, scores, cases
        self.max_length, self.top, self.predictions, self.fdr = max_length, top, predictions, fdr
        candidates = explorer_attributes(metadata, extra=attributes)
        self.attrs = w.SelectMultiple(options=candidates, value=tuple(a for a in attributes if a in candidates),
                                      description="attributes", rows=min(8, len(candidates)))
        self.support = w.FloatLogSlider(value=min_support, base=10, min=-3, max=-0.5, step=0.1,
                                        description="min support", readout_format=".3f")
        self.metric = w.Dropdown(options=list(scores.columns), description="metric")
        self.itemset = w.Select(description="itemset", rows=10, layout=w.Layout(width="95%"))
        self.itemset.add_class(f"divaware-itemsets-{id(self.itemset)}")
        self.itemset.add_class("divaware-explorer-itemset")
        self.grey = w.HTML()  # a style rule that greys the untested itemsets (they are last in the list)
        self.case_pick = w.Dropdown(description="case", layout=w.Layout(width="60%"))
        self.table_out, self.case_out, self.viewer_out = w.Output(), w.Output(), w.Output()
        self.shapley_out = w.Output()  # the selected itemset's Shapley table, apart from the member table
        # class names for a reader's stylesheet and for the browser test to find the parts
        for part, name in ((self.case_pick, "case"), (self.table_out, "table"), (self.case_out, "members"),
                           (self.viewer_out, "viewer"), (self.shapley_out, "shapley")):
            part.add_class(f"divaware-explorer-{name}")
        self.state: dict[str, Any] = {"result": pd.DataFrame(), "members": [], "table": pd.DataFrame()}
        for control in (self.attrs, self.support, self.metric):
            control.observe(self.rerun, names="value")
        self.itemset.observe(self.show_members, names="value")
        self.case_pick.observe(self.open_case, names="value")
        box = self.box = w.VBox([w.HBox([self.attrs, w.VBox([self.support, self.metric])]), self.table_out,
                                 self.itemset, self.case_out, self.case_pick, self.viewer_out, self.shapley_out,
                                 self.grey])
        box.controls = {"attributes": self.attrs, "min_support": self.support, "metric": self.metric,
                        "itemset": self.itemset, "case": self.case_pick, "table": self.table_out,
                        "members": self.case_out, "viewer": self.viewer_out, "shapley": self.shapley_out}
        box.state = self.state
        self.rerun()

    def members(self, items: Sequence[str]) -> list[str]:
        from divaware.subgroups import attribute_table

        mask = pd.Series(True, index=self.scores.index)
        names = sorted({item.split("=", 1)[0] for item in items})
        # the itemsets' own table: derived attributes (dense) and binned values, as the analysis labels them
        table = attribute_table(self.metadata.loc[self.scores.index], names) if names else None
        for item in items:
            name, value = item.split("=", 1)
            mask &= table[name].astype(str) == value
        return _worst_first(self.scores, list(mask[mask].index), self.metric.value)

    def prediction_of(self, pid: str) -> Path | None:
        if self.predictions is None:
            return None
        predictions = self.predictions
        path = Path(predictions(pid)) if callable(predictions) else Path(predictions) / f"{pid}.nii.gz"
        return path if path.is_file() else None

    def show_members(self, *_: Any) -> None:
        from IPython.display import display

        state, scores = self.state, self.scores
        if state.get("busy"):
            return
        result: pd.DataFrame = state["result"]
        label = self.itemset.value
        if label is None or label not in set(result["label"]):
            ids: list[str] = []
        else:
            ids = self.members(result.loc[result["label"] == label, "items"].iloc[0])
        state["members"] = ids
        with self.case_out:
            self.case_out.clear_output(wait=True)
            if ids:
                shown = scores.loc[ids].join(self.metadata.loc[ids, [a for a in self.attrs.value
                                                                     if a in self.metadata.columns]])
                display(shown.style.format({c: "{:.3f}" for c in scores.columns}))
        state["shapley"] = _shapley_table(result, label) if ids else None
        with self.shapley_out:
            self.shapley_out.clear_output(wait=True)
            if ids:
                display(state["shapley"])
        # Replacing the options may or may not fire a value event; choose the case explicitly: the one being
        # viewed while it is still a member, else the worst.
        previous, metric = self.case_pick.value, self.metric.value
        state["busy"] = True
        try:
            scored = {pid: float(scores.at[pid, metric]) for pid in ids}
            self.case_pick.options = [(f"{pid}  ({metric} {scored[pid]:.3g})", pid) for pid in ids]
            self.case_pick.value = previous if previous in ids else (ids[0] if ids else None)
        finally:
            state["busy"] = False
        self.open_case()

    def rerun(self, *_: Any) -> None:
        from IPython.display import HTML, display

        if not self.attrs.value:
            return
        state, itemset = self.state, self.itemset
        result = _analyse_scores(self.metadata, self.scores, self.attrs.value, self.support.value,
                                 self.metric.value, self.max_length)
        state["result"] = result
        state["table"] = _readable_itemsets(result, self.metric.value, self.fdr)
        previous = itemset.value
        shown = result.head(200)
        # Keyed by label: the value of a choice is the itemset itself, not its row number in this result.
        options = [(_itemset_option(r), r["label"]) for _, r in shown.iterrows()]
        labels = [v for _, v in options]
        n_tested = int(pd.to_numeric(shown["q"], errors="coerce").notna().sum())
        cls = f"divaware-itemsets-{id(itemset)}"
        self.grey.value = (f"<style>.{cls} option:nth-child(n+{n_tested + 1}) {{ color: #9a9a9a; }}</style>"
                           if n_tested < len(options) else "")
        state["busy"] = True  # one update of the members below, not one per intermediate value
        try:
            itemset.options = options
            itemset.value = previous if previous in labels else (labels[0] if labels else None)
        finally:
            state["busy"] = False
        with self.table_out:
            self.table_out.clear_output(wait=True)
            display(styled_itemsets(state["table"].head(self.top)))
            left_out = result.attrs.get("left_out", 0)
            display(HTML(f"<small>sorted by q, then Δ; ps: the probability that a case of the itemset scores better "
                         f"than one outside it (0.5: no difference); significant (bold): q ≤ {self.fdr:g} and ps < 0.5 "
                         "(typically worse; Δ, a difference of means, may disagree); grey: fewer cases than the "
                         "test's minimum, not tested"
                         + (f"; {left_out} case(s) without a {self.metric.value} value left out" if left_out else "")
                         + "</small>"))
        self.show_members()  # always, even when the label stayed: its members may differ under new settings

    def open_case(self, *_: Any) -> None:
        from IPython.display import display

        if self.state.get("busy"):
            return
        if self.cases is None or self.case_pick.value is None:
            with self.viewer_out:
                self.viewer_out.clear_output()
            return
        pid = self.case_pick.value
        pred = self.prediction_of(pid)
        case_scores = {c: float(self.scores.at[pid, c]) for c in self.scores.columns}
        with self.viewer_out:
            self.viewer_out.clear_output(wait=True)
            display(slice_viewer(self.cases[pid], {"prediction": pred} if pred is not None else None,
                                 interactive=True, label=self.itemset.value, scores=case_scores))
