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
    top, _table, itemset, _members, case_pick, _viewer = box.children
    attrs, (support, metric) = top.children[0], top.children[1].children
    return attrs, support, metric, itemset, case_pick


def selected_label(itemset) -> str:
    shown = {value: text for text, value in itemset.options}[itemset.value]
    return shown.split("  (n=")[0]


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
        assert list(case_pick.options) == expected_members(meta, scores.index, label), label
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
    assert list(case_pick.options) == expected_members(meta, scores.index, planted)
    support.value = 0.3  # now it cannot exist: the top surviving itemset is selected instead
    assert itemset.value != planted
    assert list(case_pick.options) == expected_members(meta, scores.index, selected_label(itemset))


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
