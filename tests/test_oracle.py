"""The oracle strategy: the truly hard cases of a synthetic cohort, up-weighted with divaware's mean 1 and clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from planted import planted_cohort

from divaware.synthetic import read_truth
from divaware.train import TrainConfig, _strategy_kwargs
from divaware.weighting import REFRESH_SCHEDULE, make_strategy, normalise_weights


@pytest.fixture(scope="module")
def planted():
    train, _, hard = planted_cohort(600, seed=1, prefix="T")
    val, val_scores, _ = planted_cohort(400, seed=2, prefix="V")
    return train, hard, val, val_scores


def test_oracle_up_weights_exactly_the_hard_cases_with_mean_one_and_clip(planted):
    train, hard, val, val_scores = planted
    st = make_strategy("oracle", hard_ids=hard.index[hard], warmup_epochs=3)
    st.fit(train)
    assert [e for e in range(12) if st.should_refresh(e)] == [3]  # once, after divaware's warm-up
    np.testing.assert_array_equal(st.weights.to_numpy(), 1.0)  # warm-up: plain training
    w = st.refresh(3, val, val_scores)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    # default ratio w_max / w_min = 25: hard cases (~12 %) hit the clip at 5, the others share the rest
    share = hard.mean()
    np.testing.assert_allclose(w[hard], 5.0)
    np.testing.assert_allclose(w[~hard], (1 - 5.0 * share) / (1 - share))
    # the same numbers as the shared helper on raw weights ratio / 1
    np.testing.assert_array_equal(w.to_numpy(), normalise_weights(np.where(hard.loc[w.index], 25.0, 1.0), 0.2, 5.0))
    # a gentler ratio stays inside the clip: hard / other = ratio exactly
    w2 = make_strategy("oracle", hard_ids=hard.index[hard], ratio=3.0, warmup_epochs=0).fit(train).weights
    assert w2[hard].iloc[0] / w2[~hard].iloc[0] == pytest.approx(3.0)
    assert w2.mean() == pytest.approx(1.0, abs=1e-12)
    h = st.history
    assert sorted(h["refresh"].unique()) == [0, 1] and len(h) == 2 * len(train)


def test_oracle_contract_ids_shuffling_and_exact_resume(planted):
    train, hard, val, val_scores = planted
    a = make_strategy("oracle", hard_ids=hard.index[hard], warmup_epochs=1).fit(train)
    with pytest.raises(KeyError, match="NOT_A_CASE"):
        a.batch_weights(["T0001", "NOT_A_CASE"], [0.5, 0.5])
    b = make_strategy("oracle", hard_ids=hard.index[hard], warmup_epochs=1)
    b.fit(train.iloc[np.random.default_rng(3).permutation(len(train))])
    a.refresh(1, val, val_scores)
    b.refresh(1, val, val_scores)
    pd.testing.assert_series_equal(a.weights, b.weights)
    ids = list(train.index[::-7][:20])
    np.testing.assert_array_equal(a.batch_weights(ids), a.weights.loc[ids].to_numpy())
    # params hold the hard ids (not a folder), so a resumed run does not depend on where the cohort lives
    state = json.loads(json.dumps(a.state_dict()))
    c = make_strategy("oracle", **json.loads(json.dumps(a.params)))
    c.load_state_dict(state)
    pd.testing.assert_series_equal(a.weights, c.weights)
    pd.testing.assert_frame_equal(a.history, c.history)
    with pytest.raises(ValueError, match="ratio"):
        make_strategy("oracle", hard_ids=hard.index[hard], warmup_epochs=1, ratio=4.0).load_state_dict(state)


def test_oracle_reads_the_synthetic_truth_and_refuses_other_folders(synthetic_root: Path, tmp_path: Path):
    truth = read_truth(synthetic_root)
    st = make_strategy("oracle", data_root=str(synthetic_root), warmup_epochs=0)
    assert set(st.hard_ids) == set(truth.index[truth["hard_subgroup"]]) and len(st.hard_ids) >= 2
    train = pd.DataFrame(index=pd.Index(truth.index, name="patient_id"))
    w = st.fit(train).weights
    assert (w[truth["hard_subgroup"]] > 1).all() and (w[~truth["hard_subgroup"]] < 1).all()
    # training hands the (resolved) data root to the oracle
    kwargs = _strategy_kwargs(TrainConfig(strategy="oracle", data_root=str(synthetic_root)), [])
    assert kwargs == {"data_root": str(synthetic_root), "warmup_epochs": REFRESH_SCHEDULE["warmup_epochs"]}
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"synthetic_truth\.csv not found.*divaware synth.*another strategy"):
        make_strategy("oracle", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        make_strategy("oracle")
