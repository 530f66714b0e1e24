"""The explorers without a browser: the subgroup explorer stays true to its selected itemset after every control
change, offers only meaningful attributes, and the viewers draw truth and prediction without pyplot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from planted import planted_cohort  # noqa: E402

from divaware import widgets  # noqa: E402


def explorer_parts(box):
    # Located by layout, not by attributes added later, so this test also runs against older explorers.
    top, _table, itemset, _members, case_pick, _viewer = box.children[:6]
    attrs, (support, metric) = top.children[0], top.children[1].children[:2]
    return attrs, support, metric, itemset, case_pick


def selected_label(itemset) -> str:
    shown = {value: text for text, value in itemset.options}[itemset.value]
    return shown.split("  (n=")[0]


def case_values(case_pick) -> list[str]:
    # options are ids, or (text, id) pairs
    return [o[1] if isinstance(o, tuple) else o for o in case_pick.options]


def expected_members(meta: pd.DataFrame, ids: pd.Index, label: str) -> list[str]:
    mask = pd.Series(True, index=ids)
    for item in label.split(" ∧ "):
        name, value = item.split("=", 1)
        mask &= meta.loc[ids, name].astype(str) == value
    return list(mask[mask].index)


@pytest.fixture
def explorer_data():
    meta, scores, _ = planted_cohort(n=300, seed=3)
    meta["split"] = "train"  # bookkeeping columns a real cohort carries; never offered as attributes
    meta["menopause_raw"] = meta["menopause"].str.upper()
    meta["high_bit"] = np.where(np.arange(len(meta)) % 2, 12, 16)
    meta["image_rows"] = 48
    meta["ethnicity"] = np.random.default_rng(0).choice(["asian", "caucasian", "african"], len(meta))
    return meta, scores.to_frame("dice")


def test_explorer_members_follow_the_selected_itemset_after_every_change(explorer_data) -> None:
    meta, scores = explorer_data
    box = widgets.subgroup_explorer(meta, scores, attributes=["age_group", "menopause", "breast_density"],
                                    min_support=0.02, max_length=2, interactive=True)
    attrs, support, metric, itemset, case_pick = explorer_parts(box)

    def check() -> str:
        label = selected_label(itemset)
        assert sorted(case_values(case_pick)) == sorted(expected_members(meta, scores.index, label)), label
        return label

    check()
    # Pick an itemset deep in the list, then move min support so the list is rebuilt and positions shift.
    itemset.value = itemset.options[6][1]
    chosen = check()
    seen = set()
    for value in (0.05, 0.1, 0.2, 0.03, 0.15):
        support.value = value
        seen.add(check())
    assert len(seen) > 1 or chosen in seen
    # Changing the attributes rebuilds the list too.
    attrs.value = ("age_group", "breast_density")
    check()
    attrs.value = ("menopause", "ethnicity")
    check()


def test_explorer_keeps_a_surviving_itemset_selected(explorer_data) -> None:
    meta, scores = explorer_data
    box = widgets.subgroup_explorer(meta, scores, min_support=0.02, max_length=2, interactive=True)
    _, support, _, itemset, case_pick = explorer_parts(box)
    planted = "age_group=0-40 ∧ breast_density=d"
    itemset.value = planted
    support.value = 0.05  # the planted subgroup (~12 %) survives: it stays selected, with its members
    assert itemset.value == planted
    assert sorted(case_values(case_pick)) == sorted(expected_members(meta, scores.index, planted))
    support.value = 0.3  # now it cannot exist: the top surviving itemset is selected instead
    assert itemset.value != planted
    assert sorted(case_values(case_pick)) == sorted(expected_members(meta, scores.index, selected_label(itemset)))


def test_explorer_offers_only_meaningful_attributes(explorer_data) -> None:
    meta, scores = explorer_data
    offered = widgets.explorer_attributes(meta)
    assert offered == ["age_group", "menopause", "breast_density", "ethnicity"]
    box = widgets.subgroup_explorer(meta, scores, interactive=True)
    attrs = explorer_parts(box)[0]
    assert set(attrs.options) == set(offered)
    assert not {"split", "menopause_raw", "high_bit", "image_rows"} & set(attrs.options)
    # An attribute asked for explicitly is offered even when it is not on the list.
    assert "high_bit" in widgets.explorer_attributes(meta, extra=["high_bit"])


def test_case_figure_overlays_truth_and_prediction_without_pyplot(cohort, tmp_path) -> None:
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.colors import to_hex

    pid = cohort.ids("train")[0]
    case = cohort.cases[pid]
    truth = nib.load(str(case.mask_path))
    pred = np.zeros(truth.shape, np.uint8)
    pred[truth.get_fdata() > 0.5] = 1
    pred = np.roll(pred, 2, axis=0)  # a prediction that differs from the truth
    nib.save(nib.Nifti1Image(pred, truth.affine), tmp_path / "pred.nii.gz")
    before = plt.get_fignums()
    fig = widgets.case_figure(case, tmp_path / "pred.nii.gz", label="young, dense breasts")
    assert plt.get_fignums() == before  # not registered with pyplot: the inline backend cannot show it again
    assert fig._suptitle.get_text() == f"{pid}: young, dense breasts"
    colours = {to_hex(c.get_edgecolor()[0]) for ax in fig.axes for c in ax.collections}
    assert colours == {"#2ecc71", "#e74c3c"}  # truth green, prediction red, in every phase panel


def option_labels(itemset) -> list[str]:
    return [value for _, value in itemset.options]


def test_explorer_lists_itemsets_in_the_q_sorted_tables_order_with_p_q_and_n(explorer_data) -> None:
    from divaware.subgroups import attribute_table, divergent_itemsets, is_significant

    meta, scores = explorer_data
    scores = scores.iloc[:90]  # small enough that min support 0.02 admits itemsets of 2-4 cases (untested)
    attrs = ["age_group", "menopause", "breast_density"]
    box = widgets.subgroup_explorer(meta, scores, attributes=attrs, min_support=0.02, max_length=2, interactive=True)
    itemset = explorer_parts(box)[3]
    found = divergent_itemsets(attribute_table(meta.loc[scores.index], attrs), scores["dice"], min_support=0.02,
                               max_length=2)
    table = widgets.itemset_table(found)
    assert option_labels(itemset) == list(table["itemset"])
    assert itemset.value == table["itemset"].iloc[0]  # the explorer opens on the top of the table
    # tested itemsets by q (then Δ), the untested (n < min_count, q NaN) after them
    tested = table["tested"].to_numpy()
    assert tested[:tested.sum()].all() and not tested[tested.sum():].any()
    assert (~table["tested"]).sum() > 0, "the fixture should produce some untested small itemsets"
    assert table.loc[table["tested"], "q"].is_monotonic_increasing
    # every option shows n, Δ, p and q (or says it was not tested)
    texts = [text for text, _ in itemset.options]
    assert all("n=" in t and "Δ mean=" in t and "ps=" in t for t in texts)
    assert all(("p=" in t and "q=" in t) == tested[i] for i, t in enumerate(texts))
    assert all("not tested" in t for t, ok in zip(texts, tested, strict=True) if not ok)
    # the static explorer is the same readable table: strings, p and q, one definition of significant
    static = widgets.subgroup_explorer(meta, scores, attributes=attrs, min_support=0.02, max_length=2,
                                       interactive=False, top=1000)
    pd.testing.assert_frame_equal(static.reset_index(drop=True), table.reset_index(drop=True))
    assert static["itemset"].map(type).eq(str).all() and {"p", "q", "significant", "z_mw", "ps"} <= set(static.columns)
    assert static["significant"].sum() == int(is_significant(found).sum()) > 0


def test_is_significant_means_q_within_fdr_and_worse_than_average() -> None:
    from divaware.subgroups import is_significant

    frame = pd.DataFrame({"q": [0.01, 0.01, 0.2, np.nan, 0.05], "divergence": [-0.2, 0.3, -0.4, -0.9, -0.1]})
    assert is_significant(frame).tolist() == [True, False, False, False, True]
    assert is_significant(frame, fdr=0.01).tolist() == [True, False, False, False, False]
    with pytest.raises(ValueError, match="lacks column"):
        is_significant(frame.drop(columns="q"))


def test_statistic_column_follows_a_renamed_statistic() -> None:
    cols = {"label": ["a=1"], "count": [5], "divergence": [-0.1], "t": [-2.0], "p": [0.03], "q": [0.04]}
    assert widgets.statistic_column(pd.DataFrame(cols)) == "t"  # a frame of the former layout
    assert widgets.statistic_column(pd.DataFrame({**cols, "z_mw": [-2.0]})) == "z_mw"
    renamed = pd.DataFrame({("welch_t" if k == "t" else k): v for k, v in cols.items()})
    assert widgets.statistic_column(renamed) == "welch_t"
    renamed.attrs["statistic"] = "p"  # an explicit declaration wins
    assert widgets.statistic_column(renamed) == "p"


def test_cases_are_listed_worst_first_in_table_and_dropdown_and_the_viewed_case_survives(explorer_data) -> None:
    meta, scores = explorer_data
    scores = scores.assign(hd95_mm=40 * (1 - scores["dice"]) + np.arange(len(scores)) % 3)
    box = widgets.subgroup_explorer(meta, scores, min_support=0.02, max_length=2, interactive=True)
    _, support, metric, itemset, case_pick = explorer_parts(box)
    assert list(metric.options) == ["dice", "hd95_mm"]
    ids = case_values(case_pick)
    dice = scores.loc[ids, "dice"].to_numpy()
    assert (np.diff(dice) >= 0).all(), "cases must be listed worst (lowest Dice) first"
    assert case_pick.value == ids[0] == scores.loc[ids, "dice"].idxmin()
    assert ids == box.state["members"]
    # keep the case being viewed when a control change leaves it a member
    keep = ids[len(ids) // 2]
    case_pick.value = keep
    support.value = 0.03
    if keep in box.state["members"]:
        assert case_pick.value == keep
    # HD95: lower is better, so the worst case is the highest HD95; an empty prediction (HD95 undefined) is
    # left out of the analysis and listed first
    empty = ids[-1]
    scores.loc[empty, "hd95_mm"] = np.nan
    metric.value = "hd95_mm"
    ids = case_values(case_pick)
    assert ids[0] == empty
    assert (np.diff(scores.loc[ids[1:], "hd95_mm"].to_numpy()) <= 0).all()
    assert box.state["result"].attrs["left_out"] == 1
    # a failing group of HD95 is one with larger distances: the top itemset's Δ is positive (worse)
    top = box.state["table"].iloc[0]
    assert top["Δ"] > 0 and not (box.state["table"]["significant"] & (box.state["table"]["Δ"] < 0)).any()


def test_disagreement_and_component_slices() -> None:
    truth = np.zeros((20, 20, 10), bool)
    truth[5:9, 5:9, 2:5] = True  # the tumour, slices 2-4
    pred = np.zeros_like(truth)
    pred[12:18, 12:18, 7:9] = True  # a false positive far away, slices 7-8 (Dice 0)
    pred[14:15, 14:15, 6] = True  # and a smaller one on slice 6
    assert widgets.disagreement_slice(truth, pred) == 7  # 36 wrong voxels, against 16 on the tumour slices
    assert widgets.disagreement_slice(truth, truth) is None
    assert widgets.largest_component_slice(truth) == 3
    assert widgets.largest_component_slice(pred) in (7, 8)
    assert widgets.largest_component_slice(np.zeros_like(truth)) is None


def test_slice_viewer_opens_on_the_error_and_jumps_between_components(cohort, tmp_path) -> None:
    import nibabel as nib

    pid = cohort.ids("train")[0]
    case = cohort.cases[pid]
    truth_img = nib.load(str(case.mask_path))
    truth = truth_img.get_fdata() > 0.5
    pred = np.zeros(truth.shape, np.uint8)
    z_truth = widgets.largest_component_slice(widgets.load_canonical(case.mask_path) > 0.5)
    # a false positive block on the slices furthest from the tumour (in the file's own axis order)
    far = 1 if z_truth > truth.shape[2] // 2 else truth.shape[2] - 3
    pred[2:10, 2:10, far:far + 2] = 1
    nib.save(nib.Nifti1Image(pred, truth_img.affine), tmp_path / "pred.nii.gz")
    canon_pred = widgets.load_canonical(tmp_path / "pred.nii.gz") > 0.5
    canon_truth = widgets.load_canonical(case.mask_path) > 0.5
    box = widgets.slice_viewer(case, tmp_path / "pred.nii.gz", scores={"dice": 0.0, "hd95_mm": 31.25})
    k = box.controls["slice"]
    assert k.value == widgets.disagreement_slice(canon_truth, canon_pred)
    assert canon_pred[:, :, k.value].any(), "a Dice-0 case must open where its prediction is"
    box.controls["jumps"]["truth"].click()
    assert k.value == z_truth and canon_truth[:, :, k.value].any()
    box.controls["jumps"]["prediction"].click()
    assert canon_pred[:, :, k.value].any()
    fig = widgets.case_figure(case, tmp_path / "pred.nii.gz", scores={"dice": 0.0, "hd95_mm": 31.25})
    assert "Dice 0.00 · HD95 31.2 mm" in fig._suptitle.get_text()


def test_lab_settings_are_installed_at_run_time_for_an_editable_install(tmp_path) -> None:
    import json
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "jupyter" / widgets.LAB_SETTINGS_FILE
    assert json.loads(shipped.read_text()) == widgets.LAB_SETTINGS  # the wheel's data file says the same
    target = widgets.install_lab_settings(tmp_path / "lab")
    assert target == tmp_path / "lab" / "settings" / "overrides.d" / widgets.LAB_SETTINGS_FILE
    assert json.loads(target.read_text()) == widgets.LAB_SETTINGS
    mtime = target.stat().st_mtime_ns
    assert widgets.install_lab_settings(tmp_path / "lab") == target and target.stat().st_mtime_ns == mtime


def test_viewer_opens_where_truth_and_prediction_both_show_with_a_legend() -> None:
    from matplotlib.figure import Figure

    truth = np.zeros((20, 20, 12), bool)
    truth[5:9, 5:9, 2:6] = True  # the tumour, slices 2-5
    pred = np.zeros_like(truth)
    pred[5:8, 5:8, 3:6] = True  # found it, a bit small: slices 3-5
    pred[12:19, 12:19, 9] = True  # and a large false positive on slice 9, where there is no tumour
    assert widgets.disagreement_slice(truth, pred) == 9  # the old opening: only red on screen
    k = widgets.opening_slice(truth, pred)
    assert k in (3, 4, 5) and truth[:, :, k].any() and pred[:, :, k].any()
    assert widgets.opening_slice(truth, np.zeros_like(truth)) == 2  # empty prediction: the truth's slices
    image = np.random.default_rng(0).normal(size=truth.shape)
    ax = Figure().subplots()
    widgets._draw_slice(ax, image, 0, truth, pred, "case")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["truth", "prediction"]
    assert "prediction empty on this slice" in [t.get_text() for t in ax.texts]
    ax = Figure().subplots()
    widgets._draw_slice(ax, image, 4, truth, pred, "case")
    assert not ax.texts  # both drawn: nothing to explain


def test_subtraction_image_in_the_viewer(cohort) -> None:
    case = cohort.cases[cohort.ids("train")[0]]
    fig = widgets.case_figure(case, show_subtraction=True)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == len(case.image_paths) + 1 and widgets.SUBTRACTION in titles[-1]
    pre, post = (widgets.load_canonical(p) for p in case.image_paths[:2])
    k = int(titles[-1].rsplit("z=", 1)[1])
    shown = fig.axes[-1].images[0].get_array()
    np.testing.assert_allclose(np.asarray(shown), (post - pre)[:, :, k].T.astype(np.float32), rtol=1e-5)
    box = widgets.slice_viewer(case, show_subtraction=True)
    labels = [label for label, _ in box.controls["phase"].options]
    assert labels[-1] == widgets.SUBTRACTION and len(labels) == len(case.image_paths) + 1
    box.controls["phase"].value = len(case.image_paths)  # redraws without error on the subtraction


def test_explorer_shapley_table_names_and_follows_the_selected_itemset(explorer_data) -> None:
    """Issue 27: the Shapley table decomposed another itemset than the one selected, without naming it."""
    meta, scores = explorer_data
    box = widgets.subgroup_explorer(meta, scores, attributes=["age_group", "menopause", "breast_density", "dense"],
                                    min_support=0.02, max_length=2, interactive=True)
    assert "dense" in box.controls["attributes"].value  # the derived attribute training uses is offered
    itemset = box.controls["itemset"]
    for k in (0, 3, 7):
        itemset.value = itemset.options[k][1]
        label = itemset.value
        table = box.state["shapley"]
        assert list(table.columns) == [f"Shapley contribution to Δ of {label}"]
        assert set(table.index) == set(label.split(" ∧ "))
        result = box.state["result"].set_index("label")
        assert table.iloc[:, 0].sum() == pytest.approx(result.loc[label, "divergence"], abs=1e-3)


def test_explorer_members_of_a_derived_attribute(explorer_data) -> None:
    """Notebook 02 analyses the derived `dense` (c/d) beside the metadata; the explorer's members of a `dense`
    itemset come from the analysis's own attribute table (the metadata has no `dense` column)."""
    meta, scores = explorer_data
    assert "dense" not in meta.columns
    box = widgets.subgroup_explorer(meta, scores, attributes=["age_group", "breast_density", "dense"],
                                    min_support=0.02, max_length=2, interactive=True)
    _, _, _, itemset, case_pick = explorer_parts(box)
    dense = [value for text, value in itemset.options if "dense=" in text]
    assert dense, "no itemset of the derived attribute to select"
    itemset.value = dense[0]
    label = selected_label(itemset)
    derived = meta.assign(dense=np.where(meta["breast_density"].astype(str).isin(["c", "d"]), "yes", "no"))
    assert sorted(case_values(case_pick)) == sorted(expected_members(derived, scores.index, label)), label
