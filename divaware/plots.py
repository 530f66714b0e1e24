"""Seaborn figures for the fairness story: per-group Dice, divergent subgroups, run comparisons, weights,
heatmaps, a case gallery and training curves.

Every function returns a :class:`matplotlib.figure.Figure` and, given ``path``, also saves it there and
nowhere else: a path ending in ``.png``, ``.svg`` or ``.pdf`` is written in that format, a path without a
suffix is written as both ``<path>.png`` and ``<path>.svg``. Figures are created without pyplot, so they
are not kept alive by pyplot's registry (no leaks in loops) and show exactly once when returned in a
notebook cell. Styles are applied per figure, never to global matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from divaware import metrics

_STYLE = "whitegrid"
_SIG_COLOR, _NONSIG_COLOR = "#c0392b", "#a6a6a6"
_GT_COLOR, _PRED_COLOR = "#2ecc71", "#e74c3c"


def save_figure(fig: Figure, path: str | Path | None, *, dpi: int = 150) -> list[Path]:
    """Save ``fig`` to ``path`` (see the module docstring for formats); returns the files written."""
    if path is None:
        return []
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".png", ".svg", ".pdf"):
        targets = [path]
    elif suffix == "":
        targets = [path.with_suffix(".png"), path.with_suffix(".svg")]
    else:
        raise ValueError(f"cannot save a figure as {path.name!r}: use .png, .svg, .pdf or no suffix (png + svg)")
    path.parent.mkdir(parents=True, exist_ok=True)
    for t in targets:
        fig.savefig(t, dpi=dpi, bbox_inches="tight")
    return targets


def show(fig: Figure, *, dpi: int = 100) -> None:
    """Display ``fig`` in the running notebook as a PNG image, once, wherever the call sits in a cell.

    The figures here are built without pyplot, so IPython has no reason to show them: one in the middle of a
    cell or in a loop would show nothing, and one as a cell's last expression would print ``<Figure size ...>``
    unless pyplot's inline backend happened to be active. Rendering to PNG ourselves gives an ``image/png``
    output in JupyterLab and in papermill's executed copies alike, independent of the matplotlib backend.
    Outside IPython this does nothing.
    """
    import io

    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # plain Python without IPython: nothing to display to
        return
    if get_ipython() is None:
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(data=buf.getvalue(), format="png"))


def _figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize, layout="constrained")
    with sns.axes_style(_STYLE):
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")


# --------------------------------------------------------------------------------------------------
# per-group performance
# --------------------------------------------------------------------------------------------------


MIN_CI_CASES = 5
"""Groups with fewer cases get no bootstrap CI bar: resampling 2-4 values gives a deceptively narrow interval."""


def plot_group_dice(
    table: pd.DataFrame,
    *,
    overall: float | None = None,
    metric_label: str = "Dice",
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Per-group means with bootstrap CIs, one horizontal bar per group, ``n`` on the axis labels.

    ``table`` is a :func:`divaware.metrics.group_table` result. Groups flagged ``small`` are drawn pale
    and marked with ``*`` in their label; groups of fewer than :data:`MIN_CI_CASES` cases get no CI bar; a dashed line marks ``overall`` (default: the n-weighted mean
    of the groups, which equals the mean over the tabulated cases).
    """
    _require(table, ("group", "n", "mean", "ci_low", "ci_high"), "group table")
    t = table.reset_index(drop=True)
    small = t["small"].astype(bool) if "small" in t.columns else pd.Series(False, index=t.index)
    labels = [f"{g}{' *' if s else ''} (n={n})" for g, n, s in zip(t["group"], t["n"], small, strict=True)]
    fig, axes = _figure(figsize=(7.0, 0.45 * len(t) + 1.6))
    ax = axes[0, 0]
    colors = ["#9ecae1" if s else "#3182bd" for s in small]
    sns.barplot(x=t["mean"].to_numpy(float), y=labels, hue=labels, palette=colors, legend=False,
                orient="h", saturation=1, ax=ax)
    # a bootstrap CI of 2-4 cases looks deceptively tight (it resamples the same few values): not drawn
    few = t["n"].astype(int) < MIN_CI_CASES
    has_ci = t["ci_low"].notna() & t["ci_high"].notna() & ~few
    pos = np.arange(len(t))[has_ci.to_numpy()]
    mean = t.loc[has_ci, "mean"].to_numpy(float)
    err = np.vstack([mean - t.loc[has_ci, "ci_low"].to_numpy(float), t.loc[has_ci, "ci_high"].to_numpy(float) - mean])
    ax.errorbar(mean, pos, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
    if overall is None:
        overall = float(np.average(t["mean"], weights=t["n"])) if len(t) else float("nan")
    ax.axvline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.3f}")
    xlabel = f"mean {metric_label} (95 % bootstrap CI)"
    if small.any():
        xlabel += "\n* small group: few cases, read with caution"
    if few.any():
        xlabel += f"\nno CI drawn for groups of fewer than {MIN_CI_CASES} cases"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or f"{metric_label} by group")
    save_figure(fig, path)
    return fig


def plot_divergent_itemsets(
    itemsets: pd.DataFrame,
    *,
    top: int = 10,
    fdr: float = 0.05,
    which: str = "negative",
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """The ``top`` most divergent itemsets as horizontal bars of Δ, red where significant (q ≤ ``fdr`` and the
    test's effect worse: ps < 0.5 with the rank test, whose ps each label then shows beside n and q, since
    a flagged subgroup's mean can be above average; Δ < 0 for a frame without ``ps``).

    Significance is :func:`divaware.subgroups.is_significant`, the rule the ``divaware`` strategy acts on and
    every table shows. ``which``: ``"negative"`` (most negative Δ: the subgroups the model fails),
    ``"positive"`` or ``"absolute"`` (largest |Δ|). Labels carry the itemset's case count and its q
    (``untested`` for itemsets below the test's minimum size).
    """
    from divaware.subgroups import is_significant

    _require(itemsets, ("label", "divergence", "q"), "itemsets frame")
    if which not in ("negative", "positive", "absolute"):
        raise ValueError(f"which must be 'negative', 'positive' or 'absolute', got {which!r}")
    d = itemsets.copy()
    key = {"negative": d["divergence"], "positive": -d["divergence"], "absolute": -d["divergence"].abs()}[which]
    d = d.assign(_key=key).sort_values("_key", kind="stable").head(top)
    rank = "ps" in d.columns
    sig_hi, sig_lo = (f"q ≤ {fdr:g}, ps < 0.5" if rank else f"q ≤ {fdr:g}, Δ < 0"), "not significant"
    d["significance"] = np.where(is_significant(d, fdr), sig_hi, sig_lo)
    qtext = [("untested" if not np.isfinite(q) else f"q={q:.2g}") for q in d["q"].astype(float)]
    if rank:
        qtext = [f"ps={ps:.2f}, {qt}" for ps, qt in zip(d["ps"].astype(float), qtext, strict=True)]
    if "count" in d.columns:
        d["ylabel"] = [f"{lab} (n={c}, {qt})" for lab, c, qt in zip(d["label"], d["count"], qtext, strict=True)]
    else:
        d["ylabel"] = [f"{lab} ({qt})" for lab, qt in zip(d["label"], qtext, strict=True)]
    fig, axes = _figure(figsize=(8.0, 0.4 * len(d) + 1.6))
    ax = axes[0, 0]
    palette = {sig_hi: _SIG_COLOR, sig_lo: _NONSIG_COLOR}
    sns.barplot(data=d, x="divergence", y="ylabel", hue="significance", hue_order=[sig_hi, sig_lo],
                palette=palette, dodge=False, orient="h", saturation=1, ax=ax)
    ax.axvline(0, color="black", lw=0.8)
    if which == "negative" and ax.get_legend() is not None:
        sns.move_legend(ax, "lower left", title=None)  # the shortest bars are at the bottom, next to 0
    ax.set_xlabel("divergence Δ = subgroup mean − overall mean")
    ax.set_ylabel("")
    ax.set_title(title or f"Top {len(d)} divergent subgroups")
    save_figure(fig, path)
    return fig


def plot_run_comparison(
    comparison: metrics.RunComparison,
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Dumbbell chart: each group's mean under run a and run b, joined, with the paired change and CI.

    ``comparison`` is a :func:`divaware.metrics.compare_runs` result computed with ``by``.
    """
    g = comparison.per_group
    if g is None or g.empty:
        raise ValueError("the comparison has no per-group table; call compare_runs(..., metadata, by=...)")
    la, lb = comparison.labels
    labels = [f"{grp}{' *' if s else ''} (n={n})" for grp, n, s in zip(g["group"], g["n"], g["small"], strict=True)]
    y = np.arange(len(g))[::-1]  # first group on top
    fig, axes = _figure(figsize=(8.0, 0.45 * len(g) + 1.8))
    ax = axes[0, 0]
    colors = sns.color_palette("deep", 2)
    ax.hlines(y, g["mean_a"], g["mean_b"], color="#999999", lw=2, zorder=1)
    sns.scatterplot(x=g["mean_a"].to_numpy(float), y=y, color=colors[0], s=60, zorder=2, ax=ax, label=la)
    sns.scatterplot(x=g["mean_b"].to_numpy(float), y=y, color=colors[1], s=60, zorder=3, ax=ax, label=lb)
    for yi, row in zip(y, g.itertuples(index=False), strict=True):
        ci = "" if np.isnan(row.ci_low) else f" [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"
        ax.annotate(f"{row.mean_diff:+.3f}{ci}", xy=(1.01, yi), xycoords=("axes fraction", "data"),
                    va="center", fontsize="small")
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"mean {comparison.metric} per group (change {lb} − {la}, 95 % paired bootstrap CI)")
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title or f"{la} vs {lb}")
    save_figure(fig, path)
    return fig


def plot_dice_heatmap(
    per_case: pd.DataFrame,
    metadata: pd.DataFrame,
    rows: str = "age_group",
    cols: str = "breast_density",
    *,
    metric: str = "dice",
    drop_unknown: bool = False,
    cmap: str = "RdYlGn",
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Mean ``metric`` for each (rows × cols) cell, annotated with the mean and the number of cases.

    Empty cells stay blank. Missing metadata values form an ``unknown`` row/column unless
    ``drop_unknown`` (density is unknown for most cases: worth seeing).
    """
    table = metrics.group_table(per_case, metadata, [rows, cols], metric=metric, n_boot=0,
                                drop_unknown=drop_unknown)
    r_order, c_order = metrics.group_order(table[rows]), metrics.group_order(table[cols])
    means = table.pivot(index=rows, columns=cols, values="mean").reindex(index=r_order, columns=c_order)
    counts = table.pivot(index=rows, columns=cols, values="n").reindex(index=r_order, columns=c_order)
    annot = np.where(
        counts.notna().to_numpy(),
        [[f"{m:.2f}\nn={int(n)}" if not np.isnan(n) else "" for m, n in zip(mr, nr, strict=True)]
         for mr, nr in zip(means.to_numpy(float), counts.to_numpy(float), strict=True)],
        "",
    )
    fig, axes = _figure(figsize=(1.1 * len(c_order) + 2.8, 0.7 * len(r_order) + 1.6))
    ax = axes[0, 0]
    lower_better = metric in ("hd95", "hd95_mm", "norm_hd")
    sns.heatmap(means.astype(float), annot=annot, fmt="", cmap=cmap + ("_r" if lower_better else ""),
                cbar_kws={"label": f"mean {metric}"}, linewidths=0.5, linecolor="white", ax=ax)
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    ax.set_title(title or f"mean {metric} by {rows} × {cols}")
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------------------------------
# training: weights and curves
# --------------------------------------------------------------------------------------------------


def _flagged(worst_itemset: pd.Series) -> pd.Series:
    """A case is flagged at a refresh when some divergent itemset was assigned to it."""
    s = worst_itemset.astype(object)
    return s.notna() & s.map(lambda v: str(v).strip().lower() not in ("", "nan", "none", "<na>"))


def _weight_sets(worst_itemset: pd.Series, top: int) -> tuple[np.ndarray, list[str]]:
    """Each row's set for :func:`plot_weights`: its flagged subgroup (the ``top`` most frequent by name, the
    rest as "other flagged subgroups"), or "in no flagged subgroup"; and their order."""
    flagged = _flagged(worst_itemset)
    labels = worst_itemset.astype(str).where(flagged, "")
    named = list(labels[flagged].value_counts().index[:max(int(top), 0)])
    sets = np.where(~flagged, "in no flagged subgroup",
                    np.where(labels.isin(named), labels, "other flagged subgroups"))
    order = [*named, "other flagged subgroups", "in no flagged subgroup"]
    return sets, [v for v in order if v in set(sets)]


def plot_weights(
    history: pd.DataFrame,
    metadata: pd.DataFrame | None = None,
    by: str | None = None,
    *,
    title: str | None = None,
    path: str | Path | None = None,
    top_subgroups: int = 6,
) -> Figure:
    """Per-case weights over refreshes: their distribution (left) and mean weights of case sets (right).

    ``history`` is a weighting strategy's history (columns ``refresh, epoch, patient_id, weight,
    worst_itemset``, ...). The right panel shows the mean weight of the cases of each flagged subgroup (the
    one that set their weight; the ``top_subgroups`` with the most case-refreshes by name, the rest together)
    and of the cases in none, or, given ``metadata`` and ``by``, of the groups of that metadata column.
    """
    _require(history, ("refresh", "patient_id", "weight"), "weights history")
    h = history.copy()
    fig, axes = _figure(1, 2, figsize=(11.0, 4.0))
    ax0, ax1 = axes[0]
    order = sorted(h["refresh"].unique())
    sns.boxplot(data=h, x="refresh", y="weight", order=order, color="#9ecae1", fliersize=2, ax=ax0)
    ax0.axhline(1.0, color="black", ls="--", lw=0.8)
    ax0.set_title("weight distribution per refresh")
    if by is not None:
        if metadata is None:
            raise ValueError("plot_weights: 'by' needs the cohort metadata")
        meta = metadata.set_index("patient_id") if "patient_id" in metadata.columns else metadata
        missing = pd.Index(h["patient_id"].unique()).difference(meta.index)
        if len(missing):
            raise ValueError(f"metadata has no row for case(s) {', '.join(map(str, missing[:10]))}")
        if by not in meta.columns:
            raise ValueError(f"metadata lacks column {by!r}")
        raw = meta.loc[h["patient_id"], by]
        h["set"] = raw.astype(object).where(raw.notna(), metrics.UNKNOWN).astype(str).to_numpy()
        hue_order = metrics.group_order(h["set"])
        legend_title = by
    else:
        _require(history, ("worst_itemset",), "weights history")
        h["set"], hue_order = _weight_sets(h["worst_itemset"], top_subgroups)
        legend_title = "case's worst flagged subgroup"
    means = h.groupby(["refresh", "set"], as_index=False)["weight"].mean()
    sns.lineplot(data=means, x="refresh", y="weight", hue="set", hue_order=hue_order, marker="o", ax=ax1)
    ax1.axhline(1.0, color="black", ls="--", lw=0.8)
    ax1.set_ylabel("mean weight")
    ax1.set_title("mean weight per refresh")
    ax1.legend(title=legend_title, fontsize="small")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "divergence-aware weights")
    save_figure(fig, path)
    return fig


def plot_training_curves(
    log: pd.DataFrame, *, title: str | None = None, path: str | Path | None = None
) -> Figure:
    """Training loss (left) and validation Dice / worst-group Dice (right) per epoch from ``metrics.csv``.

    Columns ``epoch`` and ``loss`` are required; ``val_dice`` and ``val_worst_group_dice`` are drawn when
    present (epochs without validation are skipped, not drawn as zero); ``time_s`` sets the subtitle.
    """
    _require(log, ("epoch", "loss"), "training log")
    fig, axes = _figure(1, 2, figsize=(11.0, 3.8))
    ax0, ax1 = axes[0]
    sns.lineplot(data=log, x="epoch", y="loss", ax=ax0, color="#333333")
    ax0.set_title("training loss")
    names = {"val_dice": "validation Dice", "val_worst_group_dice": "worst-group Dice"}
    present = [c for c in names if c in log.columns and log[c].notna().any()]
    for c in present:
        v = log[["epoch", c]].dropna()
        sns.lineplot(x=v["epoch"].to_numpy(), y=v[c].to_numpy(float), marker="o", label=names[c], ax=ax1)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("Dice")
    for ax in (ax0, ax1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("validation")
    if not present:
        ax1.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=ax1.transAxes)
    sub = ""
    if "time_s" in log.columns and log["time_s"].notna().any():
        sub = f" ({float(log['time_s'].sum()) / 60:.1f} min)"
    fig.suptitle((title or "training") + sub)
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def tumour_slice(mask: np.ndarray, axis: int = -1) -> int:
    """Index along ``axis`` of the slice through the mask's centre of mass (middle slice if empty)."""
    m = np.asarray(mask) != 0
    axis = axis % m.ndim
    if not m.any():
        return m.shape[axis] // 2
    profile = m.sum(axis=tuple(i for i in range(m.ndim) if i != axis))
    com = float((profile * np.arange(len(profile))).sum() / profile.sum())
    # nearest slice to the centre; a concave mask may miss it, so fall back to the nearest non-empty one
    idx = int(np.floor(com + 0.5))
    nonempty = np.flatnonzero(profile)
    return int(nonempty[np.argmin(np.abs(nonempty - idx))])


def _window(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1)


def plot_case_gallery(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray | None],
    preds: Sequence[np.ndarray | None] | None = None,
    *,
    titles: Sequence[str] | None = None,
    phase_names: Sequence[str] | None = None,
    axis: int = -1,
    ncols: int | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Cases as rows, phases as columns, with ground-truth (green) and prediction (red) contours.

    With ``ncols`` every case must show a single phase: the cases then fill a grid of ``ncols`` panels per row
    (e.g. one row per patient, one column per model), each panel titled with its ``titles`` entry, instead of
    one tall column. The legend lists a prediction only when some prediction is drawn.

    Each image is ``(phases, *spatial)`` or a single-phase ``(*spatial)`` array, spatial being 3D volumes
    or 2D slices; masks have the spatial shape. For volumes the slice along ``axis`` through the centre of
    the ground truth (else the prediction, else the middle) is shown. Slices are drawn transposed with
    the origin at the bottom, i.e. the first spatial axis runs left to right.
    """
    n = len(images)
    if n == 0:
        raise ValueError("plot_case_gallery: no cases given")
    preds = list(preds) if preds is not None else [None] * n
    if len(truths) != n or len(preds) != n:
        raise ValueError(f"{n} images but {len(truths)} truths and {len(preds)} predictions")
    prepared = []
    for i, (img, gt, pr) in enumerate(zip(images, truths, preds, strict=True)):
        img = np.asarray(img)
        ref = gt if gt is not None else pr
        sp_ndim = np.asarray(ref).ndim if ref is not None else (3 if img.ndim == 4 else img.ndim)
        phases = img[None] if img.ndim == sp_ndim else img
        spatial = phases.shape[1:]
        for name, m in (("truth", gt), ("prediction", pr)):
            if m is not None and np.asarray(m).shape != spatial:
                raise ValueError(f"case {i}: {name} shape {np.asarray(m).shape} != image shape {spatial}")
        if len(spatial) == 3:
            ax_sp = axis % 3
            k = tumour_slice(gt if gt is not None and np.any(gt) else (pr if pr is not None else np.zeros(spatial)),
                             ax_sp)
            phases = np.take(phases, k, axis=1 + ax_sp)
            gt = None if gt is None else np.take(np.asarray(gt), k, axis=ax_sp)
            pr = None if pr is None else np.take(np.asarray(pr), k, axis=ax_sp)
        elif len(spatial) != 2:
            raise ValueError(f"case {i}: expected 2D or 3D spatial data, got shape {spatial}")
        prepared.append((phases, gt, pr))
    drawn_pred = any(pr is not None and np.any(pr) and not np.all(pr) for _, _, pr in prepared)
    handles = [Line2D([], [], color=_GT_COLOR, label="ground truth")]
    if drawn_pred:
        handles.append(Line2D([], [], color=_PRED_COLOR, label="prediction"))
    if ncols is not None:
        if ncols < 1:
            raise ValueError(f"ncols must be a positive int, got {ncols!r}")
        multi = [i for i, p in enumerate(prepared) if p[0].shape[0] != 1]
        if multi:
            raise ValueError(f"ncols lays out single-phase panels, but case(s) {multi} have several phases; "
                             "pass one phase per case")
        n_rows = -(-n // ncols)
        fig, axes = _figure(n_rows, ncols, figsize=(3.0 * ncols, 3.0 * n_rows + 0.4))
        for i in range(n_rows * ncols):
            ax = axes[i // ncols, i % ncols]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if i >= n:
                ax.set_axis_off()
                continue
            phases, gt, pr = prepared[i]
            _draw_panel(ax, phases[0], gt, pr)
            if titles is not None:
                ax.set_title(titles[i], fontsize="small")
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize="small")
        save_figure(fig, path)
        return fig
    n_cols = max(p[0].shape[0] for p in prepared)
    fig, axes = _figure(n, n_cols, figsize=(2.6 * n_cols, 2.6 * n + 0.4))
    for r, (phases, gt, pr) in enumerate(prepared):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if c >= phases.shape[0]:
                ax.set_axis_off()
                continue
            _draw_panel(ax, phases[c], gt, pr)
            if r == 0:
                ax.set_title(phase_names[c] if phase_names is not None and c < len(phase_names) else f"phase {c}")
            if c == 0 and titles is not None:
                ax.set_ylabel(titles[r])
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize="small")
    save_figure(fig, path)
    return fig


def _draw_panel(ax: Any, sl: np.ndarray, gt: np.ndarray | None, pr: np.ndarray | None) -> None:
    lo, hi = _window(sl)
    ax.imshow(sl.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
    for m, color in ((gt, _GT_COLOR), (pr, _PRED_COLOR)):
        if m is not None and np.any(m) and not np.all(m):
            ax.contour(np.asarray(m, dtype=float).T, levels=[0.5], colors=[color], linewidths=1.2)


# --------------------------------------------------------------------------------------------------
# data exploration
# --------------------------------------------------------------------------------------------------


def plot_missingness(table: pd.DataFrame, *, title: str | None = None, path: str | Path | None = None) -> Figure:
    """Heatmap of the fraction of unknown values (:func:`divaware.exploration.missingness`), n per row."""
    _require(table, ("n",), "missingness table")
    values = table.drop(columns="n")
    fig, axes = _figure(figsize=(1.6 * values.shape[1] + 2.5, 0.5 * len(values) + 1.5))
    ax = axes[0, 0]
    labels = [f"{g} (n={n})" for g, n in zip(table.index, table["n"], strict=True)]
    sns.heatmap(values.to_numpy(float), annot=True, fmt=".0%", cmap="Reds", vmin=0, vmax=1, cbar=False,
                xticklabels=list(values.columns), yticklabels=labels, ax=ax)
    ax.set_title(title or "fraction unknown")
    save_figure(fig, path)
    return fig


def plot_by_group(
    values: pd.DataFrame, column: str, by: str, *, log: bool = False, ylabel: str | None = None,
    title: str | None = None, path: str | Path | None = None,
) -> Figure:
    """Box plot of ``values[column]`` per ``by`` group (groups in :func:`metrics.group_order`), n on the axis."""
    _require(values, (column, by), "table")
    order = metrics.group_order(values[by].astype(str).unique())
    counts = values[by].astype(str).value_counts()
    fig, axes = _figure(figsize=(1.1 * len(order) + 2.5, 3.8))
    ax = axes[0, 0]
    sns.boxplot(x=values[by].astype(str), y=values[column].astype(float), order=order, color="#9ecae1",
                fliersize=2, log_scale=log, ax=ax)
    ax.set_xticks(range(len(order)), [f"{g}\n(n={counts.get(g, 0)})" for g in order])
    ax.set_xlabel(by)
    ax.set_ylabel(ylabel or column)
    ax.set_title(title or f"{column} by {by}")
    save_figure(fig, path)
    return fig


def plot_enhancement_curves(
    curves: pd.DataFrame, by: str, *, title: str | None = None, path: str | Path | None = None
) -> Figure:
    """Mean enhancement over phases (``exploration.enhancement_curves``): tumour solid, other tissue dashed."""
    _require(curves, (by, "phase", "region", "enhancement"), "enhancement table")
    order = metrics.group_order(curves[by].astype(str).unique())
    fig, axes = _figure(figsize=(6.5, 4.0))
    ax = axes[0, 0]
    sns.lineplot(data=curves.assign(**{by: curves[by].astype(str)}), x="phase", y="enhancement", hue=by,
                 hue_order=order, style="region", style_order=["tumour", "tissue"], markers=True, ax=ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean intensity / pre-contrast")
    ax.set_title(title or f"enhancement over phases by {by}")
    save_figure(fig, path)
    return fig
