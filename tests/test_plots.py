"""Figures: the right number of bars/labels/panels, colours that mean something, files only where asked."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: never open a window in tests

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from divaware import metrics as M  # noqa: E402
from divaware import plots as P  # noqa: E402


def cohort(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"ISPY2_{i:06d}" for i in range(n)], name="patient_id")
    meta = pd.DataFrame(
        {
            "age_group": rng.choice(["0-40", "41-50", "51-60", "71+"], size=n),
            "menopause": rng.choice(["pre", "post", "unknown"], size=n),
            "breast_density": rng.choice(["a", "b", "unknown"], size=n),
        },
        index=ids,
    )
    meta.iloc[0, meta.columns.get_loc("age_group")] = "61-70"  # a one-case group: no CI, flagged small
    per_case = pd.DataFrame({"dice": rng.uniform(0.4, 0.95, n)}, index=ids)
    per_case["norm_hd"] = 1 - per_case["dice"]
    per_case["hd95_mm"] = 40 * per_case["norm_hd"]
    return meta, per_case


def ytick_texts(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def test_save_figure_formats_and_refusals(tmp_path):
    fig = Figure()
    fig.subplots().plot([0, 1], [0, 1])
    assert P.save_figure(fig, None) == []
    written = P.save_figure(fig, tmp_path / "sub" / "both")
    assert sorted(p.name for p in written) == ["both.png", "both.svg"]
    assert all(p.stat().st_size > 0 for p in written)
    assert P.save_figure(fig, tmp_path / "one.svg") == [tmp_path / "one.svg"]
    with pytest.raises(ValueError, match=r"\.jpg"):
        P.save_figure(fig, tmp_path / "x.jpg")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["both.png", "both.svg", "one.svg"]


def test_group_dice_bars_cis_and_n_labels(tmp_path):
    meta, pc = cohort()
    table = M.group_table(pc, meta, "age_group", n_boot=200)
    fig = P.plot_group_dice(table, path=tmp_path / "groups.png")
    assert isinstance(fig, Figure) and (tmp_path / "groups.png").stat().st_size > 0
    ax = fig.axes[0]
    assert len(ax.patches) == len(table) == 5
    labels = ytick_texts(ax)
    assert labels[0] == f"0-40 (n={table.loc[0, 'n']})"
    assert labels[3] == "61-70 * (n=1)"  # the one-case group is marked small
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == pytest.approx(sorted(table["mean"]))
    # small groups (n < 10) are drawn pale, the others in the full colour
    colours = [to_hex(p.get_facecolor()) for p in ax.patches]
    assert 0 < table["small"].sum() < len(table)
    assert [c == colours[3] for c in colours] == table["small"].tolist()
    # one error bar per group that has a CI and at least MIN_CI_CASES cases (the single-case group has none)
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    drawn = table["ci_low"].notna() & (table["n"] >= P.MIN_CI_CASES)
    assert len(bars.lines[2][0].get_segments()) == drawn.sum()


def test_no_ci_bar_for_groups_under_five_cases() -> None:
    import pandas as pd

    table = pd.DataFrame({"group": ["a", "b", "c"], "n": [3, 4, 20], "mean": [0.5, 0.6, 0.7],
                          "ci_low": [0.45, 0.55, 0.6], "ci_high": [0.55, 0.65, 0.8], "small": [True, True, False]})
    ax = P.plot_group_dice(table).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    assert len(segments) == 1 and segments[0][0][1] == 2  # only group c's bar (its row, y = 2)
    assert "no CI drawn for groups of fewer than 5 cases" in ax.get_xlabel()


def test_divergent_itemsets_top_bars_coloured_by_significance(tmp_path):
    itemsets = pd.DataFrame(
        {
            "label": [f"attr=v{i}" for i in range(12)],
            "divergence": np.linspace(-0.3, 0.25, 12),
            # |t| ≥ 2 is not what colours a bar: q ≤ 0.05 with Δ < 0 is (v1 and v4 here, not v0 with |t| = 4)
            "t": [-4.0, -1.0, -2.5, np.nan, -0.5, 1.0, 2.0, 3.0, 0.1, 0.2, 0.3, 5.0],
            "p": [0.2, 0.001, 0.3, np.nan, 0.004, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
            "q": [0.3, 0.01, 0.3, np.nan, 0.05, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.01],
            "count": np.arange(10, 22),
            "support": np.arange(10, 22) / 100,
        }
    )
    fig = P.plot_divergent_itemsets(itemsets, top=5, path=tmp_path / "items")
    assert (tmp_path / "items.png").exists() and (tmp_path / "items.svg").exists()
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_height() > 0 and p.get_width() != 0]
    assert len(bars) == 5
    labels = ytick_texts(ax)
    assert labels[0] == "attr=v0 (n=10, q=0.3)"  # most negative divergence first
    assert labels[3] == "attr=v3 (n=13, untested)"
    colours = {lab: to_hex(b.get_facecolor()) for lab, b in zip(labels, sorted(bars, key=lambda b: b.get_y()),
                                                                 strict=True)}
    red = sorted(lab.split(" ")[0] for lab, c in colours.items() if c == P._SIG_COLOR)
    assert red == ["attr=v1", "attr=v4"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["q ≤ 0.05, Δ < 0", "not significant"]
    pos = P.plot_divergent_itemsets(itemsets, top=3, which="positive")
    assert ytick_texts(pos.axes[0])[0] == "attr=v11 (n=21, q=0.01)"
    # a positive Δ is never "significant", whatever its q
    assert all(to_hex(b.get_facecolor()) == P._NONSIG_COLOR for b in pos.axes[0].patches if b.get_width() != 0)
    # with the rank effect: the flag follows ps, which every label shows (a flagged mean can be above average)
    ranked = itemsets.assign(ps=np.where(itemsets["q"] <= 0.05, 0.3, 0.6))
    fig = P.plot_divergent_itemsets(ranked, top=12, which="positive")
    texts = ytick_texts(fig.axes[0])
    assert texts[0] == "attr=v11 (n=21, ps=0.30, q=0.01)"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][0] == "q ≤ 0.05, ps < 0.5"


def test_run_comparison_dumbbell():
    meta, a = cohort()
    b = a.assign(dice=a["dice"] + np.where(meta["menopause"] == "pre", 0.1, 0.0))
    cmp = M.compare_runs(a, b, meta, "menopause", labels=("ERM", "divaware"), n_boot=200)
    fig = P.plot_run_comparison(cmp)
    ax = fig.axes[0]
    labels = ytick_texts(ax)
    assert len(labels) == 3 and labels[0].startswith("pre * ")  # 8 cases: flagged small
    assert ax.get_yticks()[0] == max(ax.get_yticks())  # first group drawn on top
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ERM", "divaware"]
    notes = [t.get_text() for t in ax.texts]
    assert "+0.100 [+0.100, +0.100]" in notes and len(notes) == 3
    with pytest.raises(ValueError, match="per-group"):
        P.plot_run_comparison(M.compare_runs(a, b))


def test_dice_heatmap_cells_annotated_with_n():
    meta, pc = cohort()
    fig = P.plot_dice_heatmap(pc, meta, "age_group", "breast_density")
    ax = fig.axes[0]
    assert ytick_texts(ax) == ["0-40", "41-50", "51-60", "61-70", "71+"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "unknown"]
    cells = [t.get_text() for t in ax.texts if "n=" in t.get_text()]
    table = M.group_table(pc, meta, ["age_group", "breast_density"], n_boot=0)
    assert len(cells) == len(table)
    assert sum(int(c.split("n=")[1]) for c in cells) == len(pc)
    first = table.iloc[0]
    assert f"{first['mean']:.2f}\nn={first['n']}" in cells


def weights_history(meta):
    rows = []
    for refresh in range(3):
        for pid, age in meta["age_group"].items():
            flagged = refresh > 0 and age == "0-40"
            rows.append(dict(refresh=refresh, epoch=10 * refresh, patient_id=pid, weight=2.0 if flagged else 0.8,
                             worst_itemset="age_group=0-40" if flagged else None,
                             divergence=-0.2 if flagged else np.nan))
    return pd.DataFrame(rows)


def test_weights_over_refreshes():
    meta, _ = cohort()
    h = weights_history(meta)
    fig = P.plot_weights(h)
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_xticklabels()] == ["0", "1", "2"]
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert legend == ["age_group=0-40", "in no flagged subgroup"]  # by flagged subgroup, by name
    flagged_line = right.get_lines()[0]
    assert list(flagged_line.get_xdata()) == [1, 2] and list(flagged_line.get_ydata()) == [2.0, 2.0]
    # two flagged subgroups with different weights: each its own line (the former plot merged them)
    two = h.copy()
    dense = (two["refresh"] > 0) & two["patient_id"].isin(meta.index[meta["breast_density"] == "a"]) & \
        two["worst_itemset"].isna()
    two.loc[dense, ["weight", "worst_itemset"]] = [1.4, "breast_density=a"]
    texts = [t.get_text() for t in P.plot_weights(two).axes[1].get_legend().get_texts()]
    assert texts[:2] == sorted(texts[:2], key=lambda t: -(two["worst_itemset"] == t).sum()) and set(texts) == {
        "age_group=0-40", "breast_density=a", "in no flagged subgroup"}
    by_group = P.plot_weights(h, meta, "menopause")
    assert [t.get_text() for t in by_group.axes[1].get_legend().get_texts()] == ["pre", "post", "unknown"]
    with pytest.raises(ValueError, match="ISPY2_999999"):
        P.plot_weights(pd.concat([h, h.iloc[:1].assign(patient_id="ISPY2_999999")]), meta, "menopause")


def test_training_curves_skip_epochs_without_validation():
    log = pd.DataFrame(
        {
            "epoch": range(1, 11),
            "loss": np.linspace(1, 0.2, 10),
            "val_dice": [np.nan, 0.5, np.nan, 0.6, np.nan, 0.65, np.nan, 0.7, np.nan, 0.72],
            "val_worst_group_dice": [np.nan, 0.3, np.nan, 0.4, np.nan, 0.45, np.nan, 0.5, np.nan, 0.55],
            "time_s": [6.0] * 10,
        }
    )
    fig = P.plot_training_curves(log)
    loss_ax, val_ax = fig.axes[:2]
    assert len(loss_ax.get_lines()[0].get_xdata()) == 10
    val_lines = val_ax.get_lines()
    assert len(val_lines) == 2 and all(len(line.get_xdata()) == 5 for line in val_lines)
    assert fig.get_suptitle() == "training (1.0 min)"


def test_tumour_slice_goes_through_the_centre():
    m = np.zeros((10, 10, 30), dtype=bool)
    m[3:6, 3:6, 10:15] = True
    assert P.tumour_slice(m) == 12
    assert P.tumour_slice(m, axis=0) == 4
    assert P.tumour_slice(np.zeros((4, 4, 8))) == 4
    ring = np.zeros((10, 10, 30), dtype=bool)
    ring[2, 2, 5] = ring[2, 2, 25] = True  # centre of mass on an empty slice: use the nearest non-empty
    assert ring[:, :, P.tumour_slice(ring)].any()


def test_case_gallery_panels_and_contours(tmp_path):
    rng = np.random.default_rng(0)
    shape = (24, 24, 12)
    truth = np.zeros(shape, dtype=bool)
    truth[8:14, 8:14, 4:8] = True
    pred = np.roll(truth, 2, axis=0)
    volume = rng.normal(size=(3, *shape))  # three phases
    slice2d = rng.normal(size=(24, 24))  # a single-phase 2D slice with no prediction
    fig = P.plot_case_gallery(
        [volume, slice2d], [truth, truth[:, :, 6]], [pred, None],
        titles=["DUKE_001", "NACT_01"], phase_names=["pre", "post 1", "post 2"], path=tmp_path / "g.svg",
    )
    assert (tmp_path / "g.svg").exists()
    axes = fig.axes
    assert len(axes) == 6  # 2 cases x 3 phase columns
    assert [a.get_title() for a in axes[:3]] == ["pre", "post 1", "post 2"]
    assert axes[0].get_ylabel() == "DUKE_001" and axes[3].get_ylabel() == "NACT_01"
    from matplotlib.contour import ContourSet

    n_contours = [sum(isinstance(c, ContourSet) for c in a.collections) for a in axes]
    assert n_contours == [2, 2, 2, 1, 0, 0]  # truth + prediction; truth only; empty phase slots
    assert not axes[4].axison and not axes[5].axison
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ground truth", "prediction"]
    with pytest.raises(ValueError, match="shape"):
        P.plot_case_gallery([volume], [truth[:-1]])
    # no prediction drawn anywhere: no legend entry for one
    alone = P.plot_case_gallery([volume], [truth])
    assert [t.get_text() for t in alone.legends[0].get_texts()] == ["ground truth"]


def test_case_gallery_grid_of_single_phase_panels():
    shape = (24, 24)
    truth = np.zeros(shape, dtype=bool)
    truth[8:14, 8:14] = True
    images = [np.random.default_rng(i).normal(size=shape) for i in range(6)]
    titles = [f"case {i // 2} · model {'ab'[i % 2]}" for i in range(6)]
    fig = P.plot_case_gallery(images, [truth] * 6, [np.roll(truth, 2, axis=0)] * 6, titles=titles, ncols=2)
    visible = [a for a in fig.axes if a.axison]
    assert len(fig.axes) == 6 and len(visible) == 6
    # three rows of two, titled in reading order: one row per case, one column per model
    rows = sorted({round(a.get_position().y0, 3) for a in fig.axes})
    cols = sorted({round(a.get_position().x0, 3) for a in fig.axes})
    assert len(rows) == 3 and len(cols) == 2
    assert [a.get_title() for a in fig.axes] == titles
    with pytest.raises(ValueError, match="single-phase"):
        P.plot_case_gallery([np.zeros((3, *shape))], [truth], ncols=2)
