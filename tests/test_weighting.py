"""Weighting strategies: the behaviour the published code got wrong, pinned on small planted cohorts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from planted import PLANTED, planted_cohort

from divaware.losses import combine
from divaware.weighting import (
    HISTORY_COLUMNS,
    STRATEGIES,
    make_strategy,
    normalise_weights,
)


@pytest.fixture(scope="module")
def cohorts():
    train, _, train_planted = planted_cohort(600, seed=1, prefix="T")
    val, val_scores, _ = planted_cohort(400, seed=2, prefix="V")
    return train, train_planted, val, val_scores


# The contract tests below build strategies without arguments; the oracle needs a cohort's truth, so it runs
# the same contract in tests/test_oracle.py.
CONTRACT = sorted(set(STRATEGIES) - {"oracle"})


def shuffled(frame, seed):
    return frame.iloc[np.random.default_rng(seed).permutation(len(frame))]


# ---------------------------------------------------------------------------------------------- helpers


def test_normalise_weights_mean_one_within_clip_and_order_kept():
    rng = np.random.default_rng(0)
    raw = np.exp(rng.normal(0, 2, 500))
    w = normalise_weights(raw, 0.2, 5.0)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    assert w.min() >= 0.2 and w.max() <= 5.0
    assert (w == 0.2).any() and (w == 5.0).any()  # both bounds bind here
    order = np.argsort(raw)
    assert (np.diff(w[order]) >= 0).all()
    # one dominant raw weight: clipped, everyone else scaled up, mean still 1
    w2 = normalise_weights([1000.0, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, 3.0)
    assert w2[0] == 3.0 and w2.mean() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w2[1:], 7 / 9)
    np.testing.assert_allclose(normalise_weights([2.0, 2.0, 2.0]), 1.0)
    with pytest.raises(ValueError, match="w_min ≤ 1 ≤ w_max"):
        normalise_weights([1.0, 2.0], 1.5, 3.0)
    with pytest.raises(ValueError, match="> 0"):
        normalise_weights([1.0, 0.0])


def test_make_strategy_names_and_bad_params():
    assert set(STRATEGIES) == {"erm", "inverse_frequency", "group_dro", "paper", "divaware", "oracle", "febs"}
    with pytest.raises(ValueError, match="unknown weighting strategy 'dro'.*group_dro"):
        make_strategy("dro")
    with pytest.raises(ValueError, match="taus.*accepted.*tau"):
        make_strategy("divaware", taus=0.1)
    with pytest.raises(ValueError, match="w_min"):
        make_strategy("divaware", w_min=0.0)


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", CONTRACT)
def test_unknown_ids_raise_keyerror_naming_them(name, cohorts):
    train, *_ = cohorts
    st = make_strategy(name).fit(train)
    with pytest.raises(KeyError, match="NOT_A_CASE"):
        st.batch_weights(["T0001", "NOT_A_CASE"], [0.5, 0.5])
    with pytest.raises(RuntimeError, match="fit"):
        make_strategy(name).batch_weights(["T0001"], [0.5])


@pytest.mark.parametrize("name", CONTRACT)
def test_weights_follow_patient_id_under_shuffling(name, cohorts):
    train, _, val, val_scores = cohorts
    a = make_strategy(name).fit(train)
    b = make_strategy(name).fit(shuffled(train, 3))
    if a.should_refresh(5):
        a.refresh(5, val, val_scores)
        b.refresh(5, shuffled(val, 4), val_scores.iloc[np.random.default_rng(5).permutation(len(val_scores))])
    pd.testing.assert_series_equal(a.weights, b.weights)  # exact
    ids = list(shuffled(train, 6).index[:32])
    losses = np.linspace(0.1, 0.9, len(ids))
    wa = a.batch_weights(ids, losses)
    wb = b.batch_weights(ids[::-1], losses[::-1])
    np.testing.assert_array_equal(wa, wb[::-1])
    if name != "group_dro":  # static per-case weights: the batch gets exactly its cases' weights
        np.testing.assert_array_equal(wa, a.weights.loc[ids].to_numpy())


def test_erm_is_all_ones(cohorts):
    train, *_ = cohorts
    st = make_strategy("erm").fit(train[[]])  # ERM needs no attribute columns
    np.testing.assert_array_equal(st.weights.to_numpy(), 1.0)
    assert not st.should_refresh(10)
    assert list(st.history.columns) == list(HISTORY_COLUMNS)


def test_inverse_frequency_equalises_group_totals(cohorts):
    train, *_ = cohorts
    st = make_strategy("inverse_frequency").fit(train)
    w, groups = st.weights, st.groups
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    sizes = groups.map(groups.value_counts())
    np.testing.assert_allclose(w * sizes, (w * sizes).iloc[0])  # w ∝ 1/n_g
    totals = w.groupby(groups).sum()
    np.testing.assert_allclose(totals, len(w) / groups.nunique())
    clipped = make_strategy("inverse_frequency", w_max=3.0).fit(train).weights
    assert clipped.max() <= 3.0 and clipped.mean() == pytest.approx(1.0, abs=1e-12)


def test_group_dro_raises_q_of_the_high_loss_group_and_mixes_by_q(cohorts):
    train, planted, *_ = cohorts
    st = make_strategy("group_dro", eta=0.5, attributes=["age_group"]).fit(train)
    q0 = st.q.copy()
    np.testing.assert_allclose(q0, 1 / 5)
    young = "age_group=0-40"
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = list(rng.choice(train.index, 16, replace=False))
        losses = np.where(train.loc[ids, "age_group"] == "0-40", 0.9, 0.2)
        w = st.batch_weights(ids, losses)
        assert w.mean() <= 1.0 + 1e-12  # Σ_{g in batch} q_g ≤ 1: no renormalisation over present groups
    q = st.q
    assert q.idxmax() == young and q[young] > q0[young]
    assert q.sum() == pytest.approx(1.0)
    assert st.weights.mean() == pytest.approx(1.0, abs=1e-12)  # N q_g / n_g: training-set mean 1
    # (1/B) Σ wℓ equals Σ_g q_g L_g over the groups in the batch (q after this step), absent groups 0
    ids = list(train.index[:40])
    losses = rng.uniform(0, 1, len(ids))
    w = st.batch_weights(ids, losses)
    groups = st.groups.loc[ids].to_numpy()
    q = st.q
    present = sorted(set(groups))
    mix = sum(q[g] * losses[groups == g].mean() for g in present)
    assert (w * losses).sum() / len(ids) == pytest.approx(mix, rel=1e-12)
    with pytest.raises(ValueError, match="losses"):
        st.batch_weights(ids)


def _reference_group_dro(stream, n_groups, eta, adjustment=0.0, sizes=None):
    """Sagawa et al. 2020, Algorithm 1, written out plainly: per step the objective and dObjective/dl_i.

    q starts uniform; each batch: L_g = mean loss of group g in the batch (0 if absent), q_g <- q_g *
    exp(eta * (L_g + adjustment / sqrt(n_g))), q <- q / sum(q); objective = sum_g q_g L_g, so case i of
    group g gets gradient q_g / b_g.
    """
    q = [1.0 / n_groups] * n_groups
    out = []
    for groups, losses in stream:
        count = [sum(1 for g in groups if g == k) for k in range(n_groups)]
        mean = [sum(ell for g, ell in zip(groups, losses, strict=True) if g == k) / count[k] if count[k] else 0.0
                for k in range(n_groups)]
        adj = [adjustment / math.sqrt(sizes[k]) if adjustment else 0.0 for k in range(n_groups)]
        q = [q[k] * math.exp(eta * (mean[k] + adj[k])) for k in range(n_groups)]
        total = sum(q)
        q = [x / total for x in q]
        objective = sum(q[k] * mean[k] for k in range(n_groups))
        grads = [q[g] / count[g] for g in groups]
        out.append((list(q), objective, grads))
    return out


@pytest.mark.parametrize("adjustment", [0.0, 1.0])
def test_group_dro_is_sagawa_algorithm_1_on_a_stream_of_batches(adjustment):
    """Issue 10: q, the objective and every case's gradient match the reference loop to 1e-9.

    3 groups (10 %, 30 %, 60 % of 200 cases), the small one harder; 300 batches of 1-8 cases, so many
    batches lack the hard group. Its share of the total gradient must be the reference's (≈0.9), not the
    former present-groups renormalisation's (which gave every batch full gradient).
    """
    n = 200
    values = np.array(["0-40"] * 20 + ["41-50"] * 60 + ["51-60"] * 120, dtype=object)
    train = pd.DataFrame({"age_group": values}, index=pd.Index([f"G{i:03d}" for i in range(n)], name="patient_id"))
    st = make_strategy("group_dro", eta=0.5, adjustment=adjustment, attributes=["age_group"]).fit(train)
    names = list(st.q.index)
    gidx = np.array([names.index(f"age_group={v}") for v in values])
    hard = names.index("age_group=0-40")
    rng = np.random.default_rng(7)
    stream, ids_stream = [], []
    for _ in range(300):
        b = int(rng.integers(1, 9))
        pos = rng.choice(n, b, replace=False)
        losses = rng.uniform(0.0, 0.4, b) + 0.6 * (gidx[pos] == hard)
        stream.append((gidx[pos].tolist(), losses.tolist()))
        ids_stream.append([train.index[i] for i in pos])
    ref = _reference_group_dro(stream, 3, 0.5, adjustment, sizes=np.bincount(gidx).tolist())
    grad_hard = {"ours": 0.0, "ref": 0.0}
    grad_all = {"ours": 0.0, "ref": 0.0}
    for (groups, losses), ids, (q_ref, obj_ref, g_ref) in zip(stream, ids_stream, ref, strict=True):
        w = st.batch_weights(ids, losses)
        ell = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        objective = combine(ell, w, 0.0, "global")  # alpha 0: the weighted term alone, the global norm
        objective.backward()
        np.testing.assert_allclose(st.q.to_numpy(), q_ref, rtol=0, atol=1e-12)
        assert float(objective.detach()) == pytest.approx(obj_ref, rel=0, abs=1e-9)
        np.testing.assert_allclose(ell.grad.numpy(), g_ref, rtol=0, atol=1e-9)
        is_hard = np.asarray(groups) == hard
        for key, g in (("ours", ell.grad.numpy()), ("ref", np.asarray(g_ref))):
            grad_hard[key] += g[is_hard].sum()
            grad_all[key] += g.sum()
        # the former weights: q renormalised over the groups present, so each batch got full gradient
        present_q = np.array([q_ref[g] for g in groups]) / np.bincount(groups, minlength=3)[groups]
        renorm = present_q / present_q.sum()
        grad_hard["renormalised"] = grad_hard.get("renormalised", 0.0) + renorm[is_hard].sum()
        grad_all["renormalised"] = grad_all.get("renormalised", 0.0) + renorm.sum()
    share = {k: grad_hard[k] / grad_all[k] for k in grad_hard}
    assert share["ours"] == pytest.approx(share["ref"], abs=1e-9)
    assert share["ref"] > 0.85 and share["renormalised"] < share["ref"] - 0.2, share


# ---------------------------------------------------------------------------------------------- divaware


def test_divaware_planted_cases_above_one_others_at_most_one(cohorts):
    train, planted, val, val_scores = cohorts
    # the planted group is age_group=0-40 ∧ breast_density=d; with the derived `dense` attribute the
    # coarser young ∧ dense (c or d) would also lift young density-c cases above 1. The statements below
    # are about min_support 0.02.
    st = make_strategy("divaware", warmup_epochs=2, update_every=3, min_support=0.02,
                       attributes=["age_group", "menopause", "breast_density"])
    st.fit(train)
    assert [e for e in range(10) if st.should_refresh(e)] == [2, 5, 8]
    np.testing.assert_array_equal(st.weights.to_numpy(), 1.0)  # warm-up: plain training
    w = st.refresh(2, val, val_scores)
    its = st.last_itemsets.set_index("label")
    # at min_support 0.02 noise may make a refinement (planted ∧ menopause=...) the very worst itemset;
    # the planted itemset itself is strongly significant and every top itemset lies inside it
    assert its.loc[PLANTED, "z_mw"] < -8
    assert all(set(PLANTED.split(" ∧ ")) <= items for items in its["items"].iloc[:3])
    assert (w[planted] > 1).all()
    cd = st.case_divergence
    # every case of a flagged subgroup ≥ 1 (ERM's weight); the others share one weight ≤ 1
    flagged = cd["worst_itemset"] != ""
    assert (w[flagged] >= 1).all() and w[~flagged].nunique() == 1 and (w[~flagged] <= 1).all()
    assert w[planted].min() > w[~planted & flagged].max()  # the planted group's gap is the largest
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    assert w.min() >= 0.2 and w.max() <= 5.0
    assert cd.loc[planted, "worst_itemset"].map(lambda lab: set(PLANTED.split(" ∧ ")) <= set(lab.split(" ∧ "))).all()
    # weights grow with the gap of the case's worst flagged subgroup (the effect its flag was decided on)
    order = np.argsort(-cd["gap"].to_numpy())
    assert (np.diff(w.to_numpy()[order]) <= 1e-15).all()
    h = st.history
    assert list(h.columns) == list(HISTORY_COLUMNS)
    assert sorted(h["refresh"].unique()) == [0, 1] and len(h) == 2 * len(train)
    last = h[h["refresh"] == 1].set_index("patient_id")
    pd.testing.assert_series_equal(last["weight"], w, check_names=False)


def test_divaware_marginal_sharing_cases_rank_between(cohorts):
    # A case sharing only age_group=0-40 with the planted itemset inherits that marginal's smaller Δ:
    # documented behaviour; its weight lies between the planted cases' and the unrelated cases'.
    train, planted, val, val_scores = cohorts
    w = make_strategy("divaware", warmup_epochs=0).fit(train).refresh(0, val, val_scores)
    young_not_d = (train["age_group"] == "0-40") & (train["breast_density"] != "d")
    unrelated = (train["age_group"] != "0-40") & (train["breast_density"] != "d")
    assert w[planted].min() > w[young_not_d].max()
    assert w[young_not_d].mean() > w[unrelated].mean()


def test_smoothing_is_a_convex_combination_of_refreshes(cohorts):
    train, planted, val, val_scores = cohorts
    st = make_strategy("divaware", warmup_epochs=0, smoothing=0.5, persistence=0.0).fit(train)
    fresh = make_strategy("divaware", warmup_epochs=0).fit(train)
    w1 = st.refresh(0, val, val_scores)
    pd.testing.assert_series_equal(w1, fresh.refresh(0, val, val_scores))  # first refresh: no smoothing
    flat = pd.Series(0.8, index=val_scores.index)
    w2 = st.refresh(5, val, flat)  # nothing diverges now: fresh weights are all 1
    np.testing.assert_allclose(w2, 0.5 * w1 + 0.5)
    assert w2.mean() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["divaware", "paper"])
def test_empty_itemset_never_zeroes_weights(name, cohorts):
    train, planted, val, val_scores = cohorts
    # no subgroup diverges at all: every itemset has Δ = 0, like the empty itemset
    flat = pd.Series(0.75, index=val_scores.index)
    st = make_strategy(name, warmup_epochs=0).fit(train)
    w = st.refresh(0, val, flat)
    np.testing.assert_array_equal(w.to_numpy(), 1.0)
    # only positive divergences (one group better than the rest): still nobody at zero
    better = val_scores.copy()
    better[(val["age_group"] == "71+").to_numpy()] += 0.1
    w = make_strategy(name, warmup_epochs=0, t_min=0.0).fit(train).refresh(0, val, better)
    assert (w > 0).all() and w.mean() == pytest.approx(1.0, abs=1e-12)
    # the usual case: many itemsets, every weight strictly positive
    w = make_strategy(name, warmup_epochs=0).fit(train).refresh(0, val, val_scores)
    assert (w > 0).all()


def test_paper_weighting_fixes(cohorts):
    train, planted, val, val_scores = cohorts
    st = make_strategy("paper", warmup_epochs=0, test_ids=["X0001"])  # a test id not in validation: fine
    w = st.fit(train).refresh(0, val, val_scores)
    cd = st.case_divergence
    matched = cd["divergence"] < 0
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    # |Δ| as weight: proportional to |d| among matched cases
    ratio = w[matched] / cd.loc[matched, "divergence"].abs()
    np.testing.assert_allclose(ratio, ratio.iloc[0])
    # unmatched cases do not out-weigh matched ones
    assert (~matched).any() and matched.any()
    assert w[~matched].max() <= w[matched].min()
    np.testing.assert_allclose(w[~matched], w[matched].min())
    assert w[planted].min() > w[~planted].max()
    # the test split cannot drive the weights
    with pytest.raises(ValueError, match="test cases.*V0001"):
        make_strategy("paper", warmup_epochs=0, test_ids=["V0001"]).fit(train).refresh(0, val, val_scores)


def test_train_values_unseen_in_validation_fall_back_to_other_attributes(cohorts):
    train, planted, val, val_scores = cohorts
    odd = train.copy()
    odd.loc["T0000", "breast_density"] = "zz"  # never seen in the validation split
    odd.loc["T0001", ["age_group", "menopause", "breast_density"]] = [np.nan, np.nan, np.nan]
    st = make_strategy("divaware", warmup_epochs=0).fit(odd)
    st.refresh(0, val, val_scores)
    cd = st.case_divergence
    assert "breast_density=zz" not in cd.loc["T0000", "worst_itemset"]
    assert cd.loc["T0001", "divergence"] <= 0  # all unknown: matched only by 'unknown' itemsets, if any
    assert st.weights.loc[["T0000", "T0001"]].min() >= 0.2


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", CONTRACT)
def test_state_dict_round_trip_resumes_exactly(name, cohorts):
    train, planted, val, val_scores = cohorts
    params = {"smoothing": 0.3, "warmup_epochs": 1, "update_every": 1} if name == "divaware" else {}
    a = make_strategy(name, **params).fit(train)
    rng = np.random.default_rng(1)
    noisy = val_scores + rng.normal(0, 0.01, len(val_scores))
    ids = list(train.index[:24])
    losses = rng.uniform(0, 1, len(ids))
    if a.should_refresh(1):
        a.refresh(1, val, val_scores)
    a.batch_weights(ids, losses)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    b = make_strategy(name, **json.loads(json.dumps(a.params)))
    b.load_state_dict(state)
    pd.testing.assert_series_equal(a.weights, b.weights)
    pd.testing.assert_frame_equal(a.history, b.history)
    # and both continue identically
    if a.should_refresh(2):
        pd.testing.assert_series_equal(a.refresh(2, val, noisy), b.refresh(2, val, noisy))
    np.testing.assert_array_equal(a.batch_weights(ids, losses[::-1]), b.batch_weights(ids, losses[::-1]))
    pd.testing.assert_series_equal(a.weights, b.weights)
    if name == "divaware":
        with pytest.raises(ValueError, match="tau"):
            make_strategy(name, **{**params, "tau": 0.2}).load_state_dict(state)
        other = make_strategy(name, **params).fit(train.iloc[:10])
        with pytest.raises(ValueError, match="other training cases"):
            other.load_state_dict(state)


def test_results_are_deterministic(cohorts):
    train, planted, val, val_scores = cohorts
    runs = [make_strategy("divaware", warmup_epochs=0).fit(train).refresh(0, val, val_scores) for _ in range(2)]
    pd.testing.assert_series_equal(*runs)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_has_training_set_mean_one(name, cohorts):
    """The default objective (1/B) Σ w ℓ is unbiased only if the weights average 1 over the training set."""
    train, planted, val, val_scores = cohorts
    params = {"warmup_epochs": 0} if name in ("paper", "divaware") else {}
    if name == "oracle":  # the oracle needs the truly hard cases; the planted ones stand in for them
        params = {"warmup_epochs": 0, "hard_ids": list(planted.index[planted])}
    st = make_strategy(name, **params).fit(train)
    assert st.weights.mean() == pytest.approx(1.0, abs=1e-12)
    if st.should_refresh(0):
        st.refresh(0, val, val_scores)
    if name == "group_dro":
        ids = list(train.index[:16])
        st.batch_weights(ids, np.linspace(0.1, 1.0, 16))
    assert st.weights.mean() == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------ false alarms and power


@pytest.mark.parametrize(("n_val", "support", "delta"), [(48, 0.15, -0.2), (240, 0.10, -0.1)])
def test_divaware_defaults_ignore_noise_and_find_a_planted_subgroup(n_val, support, delta):
    """Issue 10: default divaware weights stay uniform (max/min ≤ 1.5) in ≥ 90 % of null refreshes
    (permuted scores) and up-weight a planted subgroup's training cases ≥ 1.5× in ≥ 80 % of trials.

    40 seeded trials per condition (a true rate of 95 % would show ≤ 90 % about 1 time in 7; the measured
    rates are 97-100 %, benchmarks/DIVERGENCE.md). The former rule (|t| ≥ 2, no FDR control) is run on the
    same null splits and must fail, so the test shows what changed.
    """
    from divaware.calibration import weight_trials

    null = weight_trials(n_val=n_val, support=support, delta=0.0, trials=40, seed=11)
    planted = weight_trials(n_val=n_val, support=support, delta=delta, trials=40, seed=12)
    assert null["uniform"].mean() >= 0.9, null["ratio"].describe()
    assert planted["found"].mean() >= 0.8, planted["planted_ratio"].describe()
    former = weight_trials({"t_min": 2.0, "fdr": None, "test": "welch", "tau": 0.05}, n_val=n_val, support=support, delta=0.0,
                           trials=20, seed=11)
    assert former["uniform"].mean() < 0.5


# ------------------------------------------------------------------------------ persistence, false alarms


def test_persistence_keeps_the_last_weights_and_decays_them_towards_one(cohorts):
    """No evidence is not evidence of no gap: a refresh that flags nothing moves w to 1 + γ (w − 1)."""
    train, planted, val, val_scores = cohorts
    st = make_strategy("divaware", warmup_epochs=0, persistence=0.5, null_permutations=0).fit(train)
    w1 = st.refresh(0, val, val_scores)
    assert w1[planted].min() > 1.5
    flat = pd.Series(0.8, index=val_scores.index)  # nothing can be flagged
    w2 = st.refresh(3, val, flat)
    np.testing.assert_allclose(w2, 1.0 + 0.5 * (w1 - 1.0), rtol=0, atol=1e-12)
    w3 = st.refresh(6, val, flat)
    np.testing.assert_allclose(w3, 1.0 + 0.25 * (w1 - 1.0), rtol=0, atol=1e-12)
    assert w3.mean() == pytest.approx(1.0, abs=1e-12)
    h = st.history
    quiet = h[h["refresh"] == 2]
    assert (quiet["divergence"] == 0).all() and (quiet["worst_itemset"] == "").all()  # found nothing ...
    assert (quiet["weight"] != 1).any()  # ... yet the weights persist
    # evidence again: fresh weights from that refresh alone
    pd.testing.assert_series_equal(st.refresh(9, val, val_scores), w1)
    # γ = 0: the former behaviour, back to 1 at once
    reset = make_strategy("divaware", warmup_epochs=0, persistence=0.0, null_permutations=0).fit(train)
    reset.refresh(0, val, val_scores)
    np.testing.assert_array_equal(reset.refresh(3, val, flat).to_numpy(), 1.0)
    with pytest.raises(ValueError, match="persistence"):
        make_strategy("divaware", persistence=1.5)


def test_false_alarm_rate_is_recorded_per_refresh(cohorts):
    from divaware.subgroups import attribute_table, permutation_flag_rate

    train, planted, val, val_scores = cohorts
    st = make_strategy("divaware", warmup_epochs=0, null_permutations=10, null_seed=3).fit(train)
    st.refresh(0, val, val_scores)
    noise = pd.Series(np.random.default_rng(5).permutation(val_scores.to_numpy()), index=val_scores.index)
    st.refresh(3, val, noise)
    h = st.history
    assert h.loc[h["refresh"] == 0, "false_alarm_rate"].isna().all()  # fit: no analysis
    table = attribute_table(val, st.attributes)
    for refresh, scores in ((1, val_scores), (2, noise)):
        rates = h.loc[h["refresh"] == refresh, "false_alarm_rate"].unique()
        seed = int(np.random.default_rng([3, refresh - 1]).integers(2**31))
        expected = permutation_flag_rate(table, scores, n_permutations=10, seed=seed, fdr=0.05,
                                         min_support=st.min_support, max_length=st.max_length)
        assert len(rates) == 1 and rates[0] == expected
        assert rates[0] in {k / 10 for k in range(11)} and rates[0] <= 0.2  # permutations rarely flag
    from divaware.weighting import run_false_alarm_rate

    per_refresh = [h.loc[h["refresh"] == r, "false_alarm_rate"].iloc[0] for r in (1, 2)]
    assert run_false_alarm_rate(h) == pytest.approx(np.mean(per_refresh))
    assert math.isnan(run_false_alarm_rate(make_strategy("erm").fit(train).history))
    # a state saved before the column existed resumes with it NaN
    state = json.loads(json.dumps(st.state_dict()))
    del state["history"]["false_alarm_rate"]
    again = make_strategy("divaware", warmup_epochs=0, null_permutations=10, null_seed=3)
    again.load_state_dict(state)
    assert again.history["false_alarm_rate"].isna().all() and len(again.history) == len(h)


# ---------------------------------------------------------------------------------------------- FEBS


def test_febs_hand_example():
    """Two age groups, γ 1, momentum ½: s_g = tanh(E_min / E_g), weight ∝ 1 / s_g, mean 1 over training."""
    train = pd.DataFrame({"age_group": ["0-40", "0-40", "41-50"]}, index=pd.Index(["A1", "A2", "B1"], name="patient_id"))
    st = make_strategy("febs", attributes=["age_group"], gamma=1.0, momentum=0.5).fit(train)
    np.testing.assert_array_equal(st.weights.to_numpy(), 1.0)  # nothing seen yet
    # step 1: E_A = mean(0.2, 0.4) = 0.3, E_B = 0.6 -> r_A = coth(1) = 1.31304, r_B = coth(0.5) = 2.16395;
    # mean over the 3 training cases (2 r_A + r_B) / 3 = 1.59667
    w = st.batch_weights(["B1", "A2", "A1"], [0.6, 0.4, 0.2])
    np.testing.assert_allclose(w, [1.3552876273482735, 0.8223561863258634, 0.8223561863258634], rtol=1e-12)
    np.testing.assert_allclose(st.error_bounds.to_numpy(), [0.3, 0.6])
    # step 2, B alone with loss 0.2: E_B = ½ 0.6 + ½ 0.2 = 0.4, ratio 0.75, r_B = coth(0.75) = 1.57443
    w = st.batch_weights(["B1"], [0.2])
    np.testing.assert_allclose(w, [1.1244605518297348], rtol=1e-12)
    np.testing.assert_allclose(st.weights.to_numpy(), [0.9377697240851327, 0.9377697240851327, 1.1244605518297348],
                               rtol=1e-12)
    assert st.weights.mean() == pytest.approx(1.0, abs=1e-12)
    # γ 0: every group scaled alike -> all ones; losses are required
    flat = make_strategy("febs", attributes=["age_group"], gamma=0.0).fit(train)
    np.testing.assert_allclose(flat.batch_weights(["A1", "B1"], [0.1, 0.9]), 1.0)
    with pytest.raises(ValueError, match="losses"):
        flat.batch_weights(["A1"])
    with pytest.raises(ValueError, match="momentum"):
        make_strategy("febs", momentum=1.0)


# ------------------------------------------------------------------------------ weights that raise every flag


def test_raise_flagged_hand_example_floor_and_cap():
    from divaware.weighting import raise_flagged

    # 2 flagged cases (gaps 0.5, 0.25), 2 others; τ 1: 1.5 and 1.25, the others share (4 − 2.75)/2 = 0.625
    w, clip = raise_flagged([0.5, 0.25, 0.0, 0.0], tau=1.0, w_min=0.2, w_max=5.0)
    np.testing.assert_allclose(w, [1.5, 1.25, 0.625, 0.625], rtol=0, atol=1e-12)
    assert list(clip) == ["", "", "", ""]
    # τ 0.1 would give 6 and 3.5 and a negative w₀: the cap binds for the first, the scale drops until w₀ = w_min
    w, clip = raise_flagged([0.5, 0.25, 0.0, 0.0], tau=0.1, w_min=0.2, w_max=5.0)
    assert w.mean() == pytest.approx(1.0, abs=1e-12) and w[2] == pytest.approx(0.2, abs=1e-9) and w[2] == w[3]
    assert (w[:2] >= 1).all() and w[0] > w[1]
    assert list(clip[2:]) == ["w_min", "w_min"]
    w, clip = raise_flagged([0.9] + [0.0] * 99, tau=0.1, w_min=0.2, w_max=5.0)
    assert w[0] == 5.0 and clip[0] == "w_max" and (clip[1:] == "").all() and w.mean() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(raise_flagged(np.zeros(5), 1.0, 0.2, 5.0)[0], 1.0)  # nothing flagged


def test_default_refresh_raises_every_flagged_case_and_few_sit_at_a_clip():
    """Issue 27: with the default settings every training case in a flagged subgroup gets ≥ 1 (ERM's weight),
    more for a larger gap; the others share one weight ≤ 1; mean 1; ≤ 10 % of the cases at a clip.

    The former tilt exp(−Δ/0.05), clipped to [0.2, 5], put members of flagged marginals below 1 and most
    flagged cases at the clip; on these splits it fails the first assertion."""
    from divaware.calibration import scenario_split

    for seed in range(4):
        val_meta, scores, _ = scenario_split(192, "gap", seed=seed, prefix="V")
        train_meta, _, _ = scenario_split(400, "gap", seed=100 + seed, prefix="T")
        st = make_strategy("divaware", warmup_epochs=0).fit(train_meta)
        w = st.refresh(0, val_meta, scores)
        cd = st.case_divergence
        flagged = cd["worst_itemset"] != ""
        if not flagged.any():
            continue
        assert (w[flagged] >= 1 - 1e-12).all(), (seed, w[flagged].min())
        assert w[~flagged].nunique() == 1 and (w[~flagged] <= 1).all()
        assert w.mean() == pytest.approx(1.0, abs=1e-12)
        assert (cd["clip"] != "").mean() <= 0.10
        order = np.argsort(-cd.loc[flagged, "gap"].to_numpy(), kind="stable")
        assert (np.diff(w[flagged].to_numpy()[order]) <= 1e-12).all()  # a larger gap, a larger weight
        h = st.history
        assert {"gap", "clip"} <= set(h.columns)
        assert "flagged subgroup" in st.refresh_line()


def test_a_binding_clip_is_reported_in_history_and_refresh_line(cohorts):
    train, planted, val, val_scores = cohorts
    st = make_strategy("divaware", warmup_epochs=0, tau=0.05).fit(train)  # a sharp tilt: the floor binds
    st.refresh(0, val, val_scores)
    h = st.history[st.history["refresh"] == 1]
    assert (h["clip"] == "w_min").any()
    assert "clip w_min=0.2 binds" in st.refresh_line()
    # resumed from its state, the clip column comes back
    again = make_strategy("divaware", warmup_epochs=0, tau=0.05)
    again.load_state_dict(json.loads(json.dumps(st.state_dict())))
    pd.testing.assert_frame_equal(again.history, st.history)


def test_persistence_keeps_flagged_cases_at_or_above_one(cohorts):
    train, planted, val, val_scores = cohorts
    st = make_strategy("divaware", warmup_epochs=0, null_permutations=0).fit(train)
    w1 = st.refresh(0, val, val_scores)
    flagged = st.case_divergence["worst_itemset"] != ""
    w2 = st.refresh(3, val, pd.Series(0.8, index=val_scores.index))  # nothing flagged: persist and decay
    assert (w2[flagged] >= 1).all() and w2[~flagged].nunique() == 1 and (w2[~flagged] <= 1).all()
    assert (w2[flagged] < w1[flagged]).all() and w2.mean() == pytest.approx(1.0, abs=1e-12)
