"""Weighting strategies: per-case training weights keyed by ``patient_id``.

One object per training run, with the contract of CONTRIBUTING.md::

    strategy = make_strategy(name, **params)             # name in STRATEGIES
    strategy.fit(train_groups)                           # training cases (index patient_id)
    if strategy.should_refresh(epoch):                   # warm-up, then every `update_every` epochs
        strategy.refresh(epoch, val_groups, val_scores)  # fairness-validation split, never test
    w = strategy.batch_weights(batch_ids, batch_losses)  # looked up by id, never by loader position
    strategy.weights, strategy.history, strategy.state_dict(), strategy.load_state_dict(state)

``train_groups`` / ``val_groups`` may be cohort metadata or an attribute table: each strategy builds its
own :func:`divaware.subgroups.attribute_table` from them with its ``attributes`` and ``bins``.

How the weights are used (the loss itself lives in :func:`divaware.losses.combine`), for a batch of B cases::

    L = α · (1/B) Σ_i ℓ_i + (1 − α) · (1/B) Σ_i w_i ℓ_i          (weight_norm "global", the default)

Every strategy's weights have mean 1 over the training set, so the weighted term is an unbiased estimate
of the weighted training loss (1/N) Σ_n w_n ℓ_n whatever the batch holds, and case i always receives
gradient (α + (1 − α) w_i)/B: the ratio between two cases is their weight ratio mixed by α, at every batch
size including 1. The older per-batch form Σ_i w_i ℓ_i / Σ_i w_i (``weight_norm: batch``) is invariant
to the weights' scale within a batch, so at batch size 1 (the published configuration) it has no effect
at all and at 2-8 cases per batch it dilutes the weights (benchmarks/OBJECTIVE.md). The weighted term
must carry gradient (the published code multiplied by ``loss.item()`` and so trained plain Dice-Focal).

Strategies (:data:`STRATEGIES`):

* ``erm`` — every weight 1.
* ``inverse_frequency`` — 1 / size of the case's intersectional group, mean 1 over the training set.
* ``group_dro`` — online GroupDRO (Sagawa et al. 2020) over intersectional groups.
* ``febs`` — Fair Error-Bound Scaling (Tian et al., ICLR 2024, FairSeg): groups with a larger running
  training error get a larger weight, online.
* ``paper`` — the published weighting (|Δ| of the case's worst divergent itemset) with its defects fixed.
* ``divaware`` — our default: every case of a subgroup that passes a false-discovery-rate control
  (Benjamini–Hochberg, 5 %) gets 1 + gap/τ ≥ 1, the rest one shared weight ≤ 1, mean 1, clipped.
* ``oracle`` — synthetic cohorts only: up-weights the *truly* hard cases (``synthetic_truth.csv``) with the
  same mean-1 normalisation and clip as ``divaware``; the ceiling of subgroup re-weighting on a cohort.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from divaware.subgroups import (
    AND,
    DEFAULT_ATTRIBUTES,
    DEFAULT_TEST,
    MIN_TEST_COUNT,
    TESTS,
    Bins,
    attribute_table,
    case_divergence,
    case_ids,
    divergent_itemsets,
    permutation_flag_rate,
)

__all__ = [
    "STRATEGIES",
    "HISTORY_COLUMNS",
    "WeightingStrategy",
    "ERMWeighting",
    "InverseFrequencyWeighting",
    "GroupDROWeighting",
    "FEBSWeighting",
    "PaperWeighting",
    "DivawareWeighting",
    "OracleWeighting",
    "make_strategy",
    "normalise_weights",
    "raise_flagged",
    "refresh_weights",
    "DEFAULTS",
    "REFRESH_SCHEDULE",
    "check_strategy_params",
    "run_false_alarm_rate",
]

# ``false_alarm_rate``: per refresh of a divergence strategy, the share of K permutations of that refresh's
# validation scores on which the detector flags anything (NaN for refresh 0 and other strategies); one
# value per refresh, repeated on its rows. A run's mean false-alarm rate is its mean over refreshes ≥ 1.
# ``gap``: the effect gap (divaware.subgroups.effect_gap) of the case's worst flagged subgroup, the number the
# divaware rule turns into its weight (0: in no flagged subgroup). ``clip``: "w_max" / "w_min" where that clip
# bound set the case's weight at this refresh, else "".
HISTORY_COLUMNS: tuple[str, ...] = ("refresh", "epoch", "patient_id", "weight", "worst_itemset", "divergence",
                                    "false_alarm_rate", "gap", "clip")
_HISTORY_FILL: dict[str, Any] = {"false_alarm_rate": float("nan"), "gap": float("nan"), "clip": ""}

_STATE_VERSION = 1

# -- every strategy's defaults, in one place ----------------------------------------------------------------
# The classes' signatures, TrainConfig, notebook 03 and the configs all take them from here; a config that
# deliberately differs says so in a comment.
REFRESH_SCHEDULE: dict[str, int] = {"warmup_epochs": 6, "update_every": 3}
"""The refresh schedule of the refreshing strategies (and TrainConfig's default): 6 epochs of plain training
(early Dice is uninformative), then a refresh every 3 epochs (the main job's schedule)."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "group_dro": {"eta": 0.01},
    "paper": {**REFRESH_SCHEDULE, "min_support": 0.05},
    "divaware": {**REFRESH_SCHEDULE, "tau": 1.0, "w_min": 0.2, "w_max": 5.0, "min_support": 0.05,
                 "persistence": 0.8, "null_permutations": 20},
    "febs": {"gamma": 1.0, "momentum": 0.9},
    "oracle": {"warmup_epochs": REFRESH_SCHEDULE["warmup_epochs"], "w_min": 0.2, "w_max": 5.0},
}
"""Strategy name -> its tunable parameters' defaults (the values the class uses when not given)."""


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def normalise_weights(raw: Sequence[float] | np.ndarray, w_min: float | None = None, w_max: float | None = None) -> np.ndarray:
    """Scale positive raw weights to mean 1, clipped to [w_min, w_max], keeping mean 1 after the clip.

    Clipping after normalising breaks the mean, and renormalising breaks the clip; the usual fix iterates
    clip-and-renormalise. We solve that fixed point directly: find the scale c with
    mean(clip(c·raw, w_min, w_max)) = 1 (a continuous, non-decreasing function of c) by bisection, then
    solve exactly on the final clipping pattern. Needs w_min ≤ 1 ≤ w_max (else mean 1 is impossible).
    The ranking of the raw weights is preserved (ties may appear at the bounds).
    """
    u = np.asarray(raw, dtype=float).reshape(-1)
    if u.size == 0:
        return u.copy()
    if not np.all(np.isfinite(u)) or np.any(u <= 0):
        raise ValueError("normalise_weights: raw weights must be finite and > 0")
    lo = 0.0 if w_min is None else float(w_min)
    hi = math.inf if w_max is None else float(w_max)
    if not (0.0 <= lo <= 1.0 <= hi):
        raise ValueError(f"need 0 ≤ w_min ≤ 1 ≤ w_max for weights of mean 1, got w_min={w_min}, w_max={w_max}")
    n = u.size

    def mean_at(c: float) -> float:
        return float(np.clip(c * u, lo, hi).mean())

    c_lo, c_hi = 1.0 / float(u.max()), 1.0 / float(u.min())  # mean_at(c_lo) ≤ 1 ≤ mean_at(c_hi)
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if mid in (c_lo, c_hi):
            break
        if mean_at(mid) < 1.0:
            c_lo = mid
        else:
            c_hi = mid
    c = c_hi
    # Exact solve on the clipping pattern found: n_lo·lo + n_hi·hi + c·Σ_free u = n.
    cu = c * u
    at_lo, at_hi = cu <= lo, cu >= hi
    free = ~(at_lo | at_hi)
    if free.any():
        c_exact = (n - lo * at_lo.sum() - (hi * at_hi.sum() if at_hi.any() else 0.0)) / float(u[free].sum())
        cu2 = c_exact * u
        if np.array_equal(cu2 <= lo, at_lo) and np.array_equal(cu2 >= hi, at_hi):
            c = c_exact
    return np.clip(c * u, lo, hi)


def raise_flagged(gap: Sequence[float] | np.ndarray, tau: float, w_min: float, w_max: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The ``divaware`` rule: weights ≥ 1 for flagged cases (``gap`` > 0), one shared weight ≤ 1 for the rest.

    A flagged case gets 1 + k·gap (k = 1/τ, clipped at ``w_max``); the unflagged cases share
    w₀ = (N − Σ flagged weights) / N_unflagged, which makes the mean exactly 1 and is ≤ 1 because every
    flagged weight is ≥ 1. Where w₀ would fall below ``w_min``, k is lowered (bisection) until w₀ = w_min:
    the floor binds for all unflagged cases at once, and every flagged weight is still ≥ 1. When every
    case is flagged (no one left to lower), the weights are 1 + gap/τ scaled to mean 1 within the clip
    (:func:`normalise_weights`); then not all of them can be ≥ 1.

    Returns (weights, clip): ``clip`` is ``"w_max"`` for a case at the upper clip, ``"w_min"`` for the
    unflagged cases when the floor binds, else ``""``.
    """
    g = np.maximum(np.asarray(gap, dtype=float).reshape(-1), 0.0)
    if not np.all(np.isfinite(g)):
        raise ValueError("raise_flagged: gaps must be finite")
    if not (0 < w_min <= 1 <= w_max and tau > 0):
        raise ValueError(f"raise_flagged: need tau > 0 and 0 < w_min ≤ 1 ≤ w_max, got {tau}, {w_min}, {w_max}")
    n, flag = g.size, g > 0
    clip = np.full(n, "", dtype=object)
    if not flag.any():
        return np.ones(n), clip
    if flag.all():
        w = normalise_weights(1.0 + g / tau, w_min, w_max)
        clip[np.isclose(w, w_max)] = "w_max"
        clip[np.isclose(w, w_min)] = "w_min"
        return w, clip
    n_rest = float(n - flag.sum())

    def rest_weight(k: float) -> float:
        return (n - float(np.minimum(1.0 + k * g[flag], w_max).sum())) / n_rest

    k = 1.0 / tau
    floor = rest_weight(k) < w_min
    if floor:  # rest_weight falls with k and is 1 at k = 0: find the k at which it reaches w_min
        lo, hi = 0.0, k
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if rest_weight(mid) >= w_min else (lo, mid)
        k = lo
    w = np.where(flag, np.minimum(1.0 + k * g, w_max), rest_weight(k))  # mean exactly 1 (up to rounding)
    clip[flag & (1.0 + k * g >= w_max)] = "w_max"
    if floor:
        clip[~flag] = "w_min"
    return w, clip


def refresh_weights(train_groups: pd.DataFrame, val_groups: pd.DataFrame, scores: pd.Series,
                    **params: Any) -> pd.DataFrame:
    """One refresh of the ``divaware`` strategy itself: the weights training would assign for these scores.

    The one function behind notebook 02's preview, the audit's and ``divaware weights``' tables, and (being
    ``DivawareWeighting.refresh`` with ``warmup_epochs`` 0) a training refresh: ``train_groups`` are the
    training cases' metadata, ``val_groups``/``scores`` the fairness-validation cases and their per-case
    score (higher is better), ``params`` the strategy's (default: :data:`DEFAULTS`, the method's
    ``DEFAULT_ATTRIBUTES``). Returns, per training case (index ``patient_id``): ``weight``, ``divergence``
    (Δ of its worst flagged subgroup), ``gap`` (that subgroup's effect gap, which set the weight),
    ``worst_itemset`` and ``clip``; ``attrs["line"]`` is the refresh's one-line summary and
    ``attrs["itemsets"]`` the analysis.
    """
    strategy = make_strategy("divaware", **{"warmup_epochs": 0, "null_permutations": 0, **params})
    strategy.fit(train_groups)
    weights = strategy.refresh(0, val_groups, scores)
    table = strategy.case_divergence.join(weights)
    table.index.name = "patient_id"
    table = table[["weight", "divergence", "gap", "worst_itemset", "clip"]]
    table.attrs.update(line=strategy.refresh_line(), itemsets=strategy.last_itemsets)
    return table


def run_false_alarm_rate(history: pd.DataFrame) -> float:
    """A run's false-alarm rate: the mean of its refreshes' ``false_alarm_rate`` (weights history rows).

    Each refresh ≥ 1 of a divergence strategy with ``null_permutations`` > 0 records the share of K
    permutations of its validation scores that the detector flagged; this averages them over the run's
    refreshes (one value per refresh, not per row). NaN when none was measured (other strategies, old runs).
    """
    if "false_alarm_rate" not in history.columns or "refresh" not in history.columns:
        return float("nan")
    per_refresh = history.groupby("refresh")["false_alarm_rate"].first()
    per_refresh = per_refresh[per_refresh.index > 0].dropna()
    return float(per_refresh.mean()) if len(per_refresh) else float("nan")


def _jsonable(value: Any) -> Any:
    """Parameters and state in plain JSON types, so ``json.dumps(state_dict())`` works and compares."""
    if isinstance(value, Bins):
        return {"edges": list(value.edges), "labels": None if value.labels is None else list(value.labels)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, pd.Index, np.ndarray)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        return [_jsonable(v) for v in items]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _losses_array(losses: Any, n: int, ids: Sequence[str]) -> np.ndarray:
    if hasattr(losses, "detach"):  # a torch tensor; weights never carry gradient
        losses = losses.detach().cpu().numpy()
    arr = np.asarray(losses, dtype=float).reshape(-1)
    if arr.size != n:
        raise ValueError(f"batch_weights: {n} patient_ids but {arr.size} losses")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"batch_weights: non-finite losses for {[ids[i] for i in np.flatnonzero(bad)][:10]}")
    return arr


def _group_index(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The intersectional groups of ``table``'s cases: sorted group names, each case's group index, group sizes."""
    names, inverse, sizes = np.unique(_group_labels(table).astype(str), return_inverse=True, return_counts=True)
    return names, np.asarray(inverse).reshape(-1), sizes


def _group_labels(table: pd.DataFrame) -> np.ndarray:
    """Intersectional group of each case: all its attribute values, e.g. ``age_group=0-40 ∧ ...``."""
    cols = list(table.columns)
    values = table.to_numpy(dtype=str)
    return np.array([AND.join(f"{a}={v}" for a, v in zip(cols, row, strict=True)) for row in values], dtype=object)


# --------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------


class WeightingStrategy:
    """Common machinery: ids, lookup by id, weights, history, state.

    Subclasses set ``name`` and implement :meth:`_fit`; refreshing strategies override
    :meth:`should_refresh` and :meth:`refresh` (the divergence-based ones only ``_weights_from``, the map
    from case divergences to weights); online ones override :meth:`_batch`.
    """

    name: ClassVar[str] = ""
    uses_groups: ClassVar[bool] = True  # whether fit() needs attribute columns

    def __init__(
        self,
        *,
        attributes: Sequence[str] | None = None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None = None,
    ) -> None:
        self.attributes: tuple[str, ...] = tuple(DEFAULT_ATTRIBUTES if attributes is None else attributes)
        self.bins = dict(bins or {})
        self._params: dict[str, Any] = {"attributes": list(self.attributes), "bins": _jsonable(self.bins)}
        self._clear()

    # -- state ---------------------------------------------------------------------------------------
    def _clear(self) -> None:
        self._ids: pd.Index | None = None
        self._table: pd.DataFrame | None = None
        self._w = np.zeros(0)
        self._div = np.zeros(0)
        self._worst = np.zeros(0, dtype=object)
        self._gap = np.zeros(0)
        self._clip = np.zeros(0, dtype=object)
        self._refresh_count = 0
        self._last_epoch: int | None = None
        self._hist: dict[str, list] = {c: [] for c in HISTORY_COLUMNS}

    @property
    def params(self) -> dict[str, Any]:
        """Constructor parameters (JSON types); ``make_strategy(name, **params)`` rebuilds the strategy."""
        return dict(self._params)

    def _require_fit(self) -> None:
        if self._ids is None:
            raise RuntimeError(f"{self.name}: call fit(train_groups) first")

    def _groups_table(self, groups: pd.DataFrame, what: str) -> pd.DataFrame:
        if not isinstance(groups, pd.DataFrame):
            raise TypeError(f"{what} must be a DataFrame indexed by patient_id, got {type(groups).__name__}")
        if not self.uses_groups:
            # ERM needs only the ids; build an empty table on them.
            return pd.DataFrame(index=case_ids(groups, what))
        return attribute_table(groups, self.attributes, bins=self.bins)

    # -- contract ------------------------------------------------------------------------------------
    def fit(self, train_groups: pd.DataFrame) -> WeightingStrategy:
        """Set up on the training cases; weights start as the strategy's initial weights (refresh 0)."""
        table = self._groups_table(train_groups, "train_groups")
        # Internal order is sorted by id, so results never depend on the order of the training table.
        table = table.iloc[np.argsort(table.index.to_numpy(dtype=str), kind="stable")]
        if len(table) == 0:
            raise ValueError(f"{self.name}: train_groups holds no cases")
        self._clear()
        self._table = table
        self._ids = table.index
        n = len(table)
        self._w = np.ones(n)
        self._div = np.zeros(n)
        self._worst = np.full(n, "", dtype=object)
        self._gap = np.zeros(n)
        self._clip = np.full(n, "", dtype=object)
        self._fit()
        self._record(epoch=0)
        return self

    def _fit(self) -> None:
        """Initial weights (default: all ones)."""

    def should_refresh(self, epoch: int) -> bool:
        """Whether ``refresh`` should run at this (0-based) epoch. Static strategies never refresh."""
        return False

    def refresh(self, epoch: int, val_groups: pd.DataFrame, val_scores: pd.Series) -> pd.Series:
        """Recompute weights from per-case validation scores; static strategies return them unchanged."""
        self._require_fit()
        return self.weights

    def batch_weights(self, patient_ids: Iterable[str], losses: Any = None) -> np.ndarray:
        """Weights of one batch, in the batch's order, looked up by ``patient_id``.

        Raises KeyError naming any id that was not among the training cases given to :meth:`fit`.
        ``losses`` (per-case, same order; tensors are detached) is needed by online strategies only.
        """
        self._require_fit()
        ids = [str(i) for i in (patient_ids.tolist() if hasattr(patient_ids, "tolist") else patient_ids)]
        pos = self._ids.get_indexer(ids)
        if (pos < 0).any():
            unknown = sorted({ids[k] for k in np.flatnonzero(pos < 0)})
            raise KeyError(
                f"{self.name}: unknown patient_id(s) {unknown[:10]} — not among the {len(self._ids)} "
                f"training cases given to fit()"
            )
        arr = None if losses is None else _losses_array(losses, len(ids), ids)
        return self._batch(pos, arr, ids)

    def _batch(self, pos: np.ndarray, losses: np.ndarray | None, ids: list[str]) -> np.ndarray:
        return self._w[pos].copy()

    @property
    def weights(self) -> pd.Series:
        """Current weight of every training case (index ``patient_id``, sorted)."""
        self._require_fit()
        return pd.Series(self._w.copy(), index=self._ids.copy(), name="weight")

    @property
    def case_divergence(self) -> pd.DataFrame:
        """Per training case: ``divergence``, ``gap``, ``worst_itemset`` and ``clip`` behind the current weights."""
        self._require_fit()
        return pd.DataFrame({"divergence": self._div.copy(), "gap": self._gap.copy(),
                             "worst_itemset": self._worst.astype(str), "clip": self._clip.astype(str)},
                            index=self._ids.copy())

    @property
    def history(self) -> pd.DataFrame:
        """One row per training case and refresh (refresh 0 = the weights set by fit)."""
        h = self._hist
        return pd.DataFrame(
            {
                "refresh": np.asarray(h["refresh"], dtype=np.int64),
                "epoch": np.asarray(h["epoch"], dtype=np.int64),
                "patient_id": pd.Series(h["patient_id"], dtype=object).astype(str),
                "weight": np.asarray(h["weight"], dtype=float),
                "worst_itemset": pd.Series(h["worst_itemset"], dtype=object).astype(str),
                "divergence": np.asarray(h["divergence"], dtype=float),
                "false_alarm_rate": np.asarray(h["false_alarm_rate"], dtype=float),
                "gap": np.asarray(h["gap"], dtype=float),
                "clip": pd.Series(h["clip"], dtype=object).astype(str),
            }
        )

    def _record(self, epoch: int, false_alarm_rate: float = float("nan")) -> None:
        n = len(self._ids)
        self._hist["false_alarm_rate"].extend([float(false_alarm_rate)] * n)
        self._hist["refresh"].extend([self._refresh_count] * n)
        self._hist["epoch"].extend([int(epoch)] * n)
        self._hist["patient_id"].extend(self._ids.tolist())
        self._hist["weight"].extend(self.weights.tolist())
        self._hist["worst_itemset"].extend(self._worst.astype(str).tolist())
        self._hist["divergence"].extend(self._div.tolist())
        self._hist["gap"].extend(self._gap.tolist())
        self._hist["clip"].extend(self._clip.astype(str).tolist())

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, in JSON types (``json.dumps`` works; floats round-trip)."""
        fitted = self._ids is not None
        return {
            "version": _STATE_VERSION,
            "strategy": self.name,
            "params": self.params,
            "fitted": fitted,
            "train_groups": (
                {"index": self._ids.tolist(), "columns": [str(c) for c in self._table.columns],
                 "data": self._table.to_numpy(dtype=str).tolist()}
                if fitted else None
            ),
            "weights": self._w.tolist(),
            "divergence": self._div.tolist(),
            "worst_itemset": self._worst.astype(str).tolist(),
            "gap": self._gap.tolist(),
            "clip": self._clip.astype(str).tolist(),
            "refresh_count": self._refresh_count,
            "last_epoch": self._last_epoch,
            "history": {c: list(v) for c, v in self._hist.items()},
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the strategy must have been built with the same name and params.

        If :meth:`fit` was called before, the saved training cases must be the same.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} not supported (expected {_STATE_VERSION})")
        if state.get("strategy") != self.name:
            raise ValueError(f"state is for strategy {state.get('strategy')!r}, this is {self.name!r}")
        mine, theirs = self.params, _jsonable(state.get("params", {}))
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"state was saved with different parameters {diff}: "
                             f"saved {[theirs.get(k) for k in diff]}, here {[mine.get(k) for k in diff]}")
        if not state["fitted"]:
            self._clear()
            return
        tg = state["train_groups"]
        table = pd.DataFrame(tg["data"], index=pd.Index(tg["index"], name="patient_id"), columns=tg["columns"])
        if not len(table.columns):
            table = pd.DataFrame(index=pd.Index(tg["index"], name="patient_id"))
        table = table.astype(str)
        if self._ids is not None and not self._ids.equals(table.index):
            raise ValueError(f"{self.name}: the saved state is for other training cases than those given to fit()")
        self._clear()
        self._table, self._ids = table, table.index
        self._w = np.asarray(state["weights"], dtype=float)
        self._div = np.asarray(state["divergence"], dtype=float)
        self._worst = np.asarray(state["worst_itemset"], dtype=object)
        # states saved before gap/clip existed resume with gap 0 and no clip
        self._gap = np.asarray(state.get("gap", np.zeros(len(self._w))), dtype=float)
        self._clip = np.asarray(state.get("clip", [""] * len(self._w)), dtype=object)
        self._refresh_count = int(state["refresh_count"])
        self._last_epoch = state["last_epoch"]
        saved = state["history"]
        rows = len(saved["refresh"])
        # states saved before a column existed resume with it empty (false_alarm_rate, gap: NaN, not measured
        # then; clip: "")
        self._hist = {c: list(saved[c]) if c in saved else [_HISTORY_FILL[c]] * rows for c in HISTORY_COLUMNS}
        self._fit_structures()
        self._load_extra(state.get("extra") or {})

    def _fit_structures(self) -> None:
        """Rebuild derived, non-state structures (group indices) after loading."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, extra: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------------


class ERMWeighting(WeightingStrategy):
    """Empirical risk minimisation: every weight is 1 (the baseline every mitigation is compared with)."""

    name = "erm"
    uses_groups = False

    def __init__(self) -> None:
        super().__init__(attributes=(), bins=None)
        self._params = {}


class InverseFrequencyWeighting(WeightingStrategy):
    """Weight 1 / n_g, n_g the size of the case's intersectional group among the training cases.

    The intersectional group is the combination of all ``attributes`` (e.g. ``age_group=0-40 ∧
    menopause=pre ∧ breast_density=unknown``); ``unknown`` is a value like any other. Weights are
    normalised to mean 1 over the training set, i.e. every group gets the same total weight N/G. A group of
    one case therefore gets weight N/G, which can be large: ``w_min``/``w_max`` clip (keeping mean 1, see
    :func:`normalise_weights`). Static: computed once by :meth:`fit`.
    """

    name = "inverse_frequency"

    def __init__(
        self,
        *,
        attributes: Sequence[str] | None = None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None = None,
        w_min: float | None = None,
        w_max: float | None = None,
    ) -> None:
        super().__init__(attributes=attributes, bins=bins)
        normalise_weights([1.0], w_min, w_max)  # validates the bounds now rather than at fit
        self.w_min, self.w_max = w_min, w_max
        self._params.update(w_min=w_min, w_max=w_max)

    def _fit(self) -> None:
        labels = _group_labels(self._table)
        _, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
        self._w = normalise_weights(1.0 / counts[np.asarray(inverse).reshape(-1)], self.w_min, self.w_max)

    @property
    def groups(self) -> pd.Series:
        """Intersectional group label of every training case."""
        self._require_fit()
        return pd.Series(_group_labels(self._table), index=self._ids.copy(), name="group", dtype=object)


class GroupDROWeighting(WeightingStrategy):
    """Online GroupDRO (Sagawa et al. 2020, Algorithm 1) over intersectional groups of the training cases.

    Keeps a distribution q over the G groups (uniform at fit). Each :meth:`batch_weights` call is one
    training step: with L_g the mean loss of group g in the batch (0 for groups absent from it),

        q_g ← q_g · exp(η · (L_g + C/√n_g)),   q ← q / Σ_g q_g        (in log space)

    and the step's objective is Σ_g q_g L_g over all G groups: groups absent from the batch contribute 0,
    and q is *not* renormalised over the groups present (so a batch without the high-q group gets little
    gradient, as in the algorithm). C is ``adjustment``, Sagawa et al.'s group adjustment (0 = off), added
    to every group's loss as in their code; n_g the group's training size.

    The returned per-case weights w_i = B · q_g / b_g (case i in group g, b_g its count in the batch, B the
    batch size) make the weighted term of :func:`divaware.losses.combine` (default ``global`` form)
    exactly that objective: (1/B) Σ_i w_i ℓ_i = Σ_g q_g L_g. With ``alpha`` 0 training is GroupDRO; with
    ``alpha`` > 0 it is mixed with the plain mean. (The former weights were rescaled to mean 1 within the
    batch, i.e. renormalised q over the groups present: in the 3-group stream of
    tests/test_weighting.py the hard group's share of the gradient was 0.35 instead of Algorithm 1's 0.89.)
    ``weight_norm: batch`` still gives that renormalised form.

    ``batch_weights`` therefore changes the state: call it once per training step with the step's per-case
    losses. ``weights`` shows N · q_g / n_g, the weights of a batch holding every training case (mean 1).
    """

    name = "group_dro"

    def __init__(
        self,
        *,
        eta: float = DEFAULTS["group_dro"]["eta"],
        adjustment: float = 0.0,
        attributes: Sequence[str] | None = None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None = None,
    ) -> None:
        super().__init__(attributes=attributes, bins=bins)
        if not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"group_dro: eta must be > 0, got {eta}")
        if not (adjustment >= 0 and math.isfinite(adjustment)):
            raise ValueError(f"group_dro: adjustment must be ≥ 0, got {adjustment}")
        self.eta, self.adjustment = float(eta), float(adjustment)
        self._params.update(eta=self.eta, adjustment=self.adjustment)
        self._steps = 0

    def _fit_structures(self) -> None:
        self._group_names, self._gidx, self._group_sizes = _group_index(self._table)

    def _fit(self) -> None:
        self._fit_structures()
        g = len(self._group_names)
        self._log_q = np.full(g, -math.log(g))
        self._steps = 0
        self._w = self._implied_weights()

    def _implied_weights(self) -> np.ndarray:
        q = np.exp(self._log_q)
        w = q[self._gidx] / self._group_sizes[self._gidx]
        return w * (len(w) / math.fsum(w))

    def _batch(self, pos: np.ndarray, losses: np.ndarray | None, ids: list[str]) -> np.ndarray:
        if losses is None:
            raise ValueError("group_dro: batch_weights needs the batch's per-case losses")
        g = self._gidx[pos]
        n_groups = len(self._group_names)
        b = np.bincount(g, minlength=n_groups)
        # Sum in id order so that the same batch in another order gives bit-identical results.
        order = np.lexsort((losses, pos))
        group_loss = np.bincount(g[order], weights=losses[order], minlength=n_groups) / np.maximum(b, 1)
        if self.adjustment > 0:
            group_loss = group_loss + self.adjustment / np.sqrt(self._group_sizes)
        log_q = self._log_q + self.eta * group_loss
        self._log_q = log_q - np.logaddexp.reduce(log_q)
        self._steps += 1
        self._w = self._implied_weights()
        q = np.exp(self._log_q)
        # no renormalisation over the groups present: (1/B) Σ w ℓ = Σ_g q_g L_g, absent groups giving 0
        return len(g) * q[g] / b[g]

    @property
    def q(self) -> pd.Series:
        """Current group distribution q (index: group label)."""
        self._require_fit()
        return pd.Series(np.exp(self._log_q), index=pd.Index(self._group_names, name="group"), name="q")

    @property
    def groups(self) -> pd.Series:
        """Intersectional group label of every training case."""
        self._require_fit()
        return pd.Series(self._group_names[self._gidx], index=self._ids.copy(), name="group", dtype=object)

    def _extra_state(self) -> dict[str, Any]:
        if self._ids is None:
            return {}
        return {"log_q": self._log_q.tolist(), "steps": self._steps}

    def _load_extra(self, extra: Mapping[str, Any]) -> None:
        self._log_q = np.asarray(extra["log_q"], dtype=float)
        self._steps = int(extra["steps"])
        if len(self._log_q) != len(self._group_names):
            raise ValueError("group_dro: saved q does not match the saved training groups")


class FEBSWeighting(WeightingStrategy):
    """Fair Error-Bound Scaling (FEBS; Tian et al., "FairSeg: a large-scale medical image segmentation dataset
    for fairness learning using Segment Anything Model with fair error-bound scaling", ICLR 2024).

    **The paper.** FEBS re-weights the segmentation loss by each identity group's training error: for
    every group a present in a training batch it takes the group's Dice loss E_a (its "error bound") and
    scales the group's samples by s_a = tanh((min_b E_b / E_a)^γ), so that the groups with the largest
    training error are treated as the hard ones; γ (default 1 in the authors' code) sets how strongly.
    Groups are the values of one sensitive attribute (race, gender, ethnicity or language there). The
    scale is applied inside the Dice term, to the predicted probabilities of the group's pixels
    (s_a · p), which raises that group's Dice loss and its gradient as s_a falls below 1.

    **Our reading, within the strategy interface** (a weight multiplies a case's whole loss; we never
    rescale predictions, and the code here is ours):

    * groups: the intersectional groups of ``attributes`` (as ``group_dro``); pass one attribute, e.g.
      ``attributes=["age_group"]``, for the paper's setting;
    * error bound: E_g, an exponential moving average (``momentum`` μ) of the mean per-case training loss
      of group g over the training steps in which it appears — a 3D batch holds 1-8 cases, far too few
      for a per-batch group Dice as in 2D batches of 24; E_g starts at the first batch mean of g;
    * scale: s_g = tanh((E_min / E_g)^γ), E_min the smallest E among the groups seen so far, exactly as
      the paper; the loss weight is its reciprocal, r_g = 1 / s_g (a scale < 1 on the predictions is an
      emphasis > 1 on the loss), so the best group gets coth(1) ≈ 1.313 and a group with twice its
      error coth(½) ≈ 2.164 (γ = 1);
    * normalisation: w_i = r_g(i) scaled to mean 1 over the training set (then clipped to
      [``w_min``, ``w_max``] when given, keeping mean 1), like every strategy here; groups not yet seen
      take the best group's r;
    * when: online, at every training step: :meth:`batch_weights` first updates E with the batch's
      losses, then returns the batch's weights (the paper also weights a batch by its own errors).

    ``weights`` shows the current weights of all training cases; the state holds E and which groups
    have been seen, so a resumed run continues exactly.
    """

    name = "febs"

    def __init__(
        self,
        *,
        gamma: float = DEFAULTS["febs"]["gamma"],
        momentum: float = DEFAULTS["febs"]["momentum"],
        w_min: float | None = None,
        w_max: float | None = None,
        attributes: Sequence[str] | None = None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None = None,
    ) -> None:
        super().__init__(attributes=attributes, bins=bins)
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"febs: gamma must be ≥ 0, got {gamma}")
        if not 0 <= momentum < 1:
            raise ValueError(f"febs: momentum must be in [0, 1), got {momentum}")
        normalise_weights([1.0], w_min, w_max)  # validates the bounds now rather than at fit
        self.gamma, self.momentum, self.w_min, self.w_max = float(gamma), float(momentum), w_min, w_max
        self._params.update(gamma=self.gamma, momentum=self.momentum, w_min=w_min, w_max=w_max)

    def _fit_structures(self) -> None:
        self._group_names, self._gidx, self._group_sizes = _group_index(self._table)

    def _fit(self) -> None:
        self._fit_structures()
        self._error = np.full(len(self._group_names), np.nan)  # NaN: group not seen yet

    def _implied_weights(self) -> np.ndarray:
        seen = np.isfinite(self._error)
        if not seen.any():
            return np.ones(len(self._gidx))
        ratio = np.ones(len(self._error))
        e_min = float(self._error[seen].min())
        with np.errstate(divide="ignore"):
            # a zero error is the best possible: ratio 1; E_min = 0 leaves every seen group at 0/E = 0
            ratio[seen] = np.where(self._error[seen] > 0, e_min / self._error[seen], 1.0)
        raw = 1.0 / np.tanh(np.maximum(ratio ** self.gamma, 1e-12))
        return normalise_weights(raw[self._gidx], self.w_min, self.w_max)

    def _batch(self, pos: np.ndarray, losses: np.ndarray | None, ids: list[str]) -> np.ndarray:
        if losses is None:
            raise ValueError("febs: batch_weights needs the batch's per-case losses")
        g = self._gidx[pos]
        n_groups = len(self._group_names)
        b = np.bincount(g, minlength=n_groups)
        order = np.lexsort((losses, pos))  # id order: the same batch in any order gives identical results
        mean = np.bincount(g[order], weights=losses[order], minlength=n_groups) / np.maximum(b, 1)
        present = b > 0
        first = present & ~np.isfinite(self._error)
        self._error[first] = mean[first]
        again = present & ~first
        self._error[again] = self.momentum * self._error[again] + (1.0 - self.momentum) * mean[again]
        self._w = self._implied_weights()
        return self._w[pos].copy()

    @property
    def error_bounds(self) -> pd.Series:
        """Current E_g per group (NaN: not seen yet), index: group label."""
        self._require_fit()
        return pd.Series(self._error.copy(), index=pd.Index(self._group_names, name="group"), name="error")

    def _extra_state(self) -> dict[str, Any]:
        if self._ids is None:
            return {}
        return {"error": [None if not math.isfinite(e) else float(e) for e in self._error]}

    def _load_extra(self, extra: Mapping[str, Any]) -> None:
        self._error = np.array([np.nan if e is None else float(e) for e in extra["error"]], dtype=float)
        if len(self._error) != len(self._group_names):
            raise ValueError("febs: saved error bounds do not match the saved training groups")


# --------------------------------------------------------------------------------------------------------
# Divergence-driven strategies
# --------------------------------------------------------------------------------------------------------


class _DivergenceStrategy(WeightingStrategy):
    """Shared schedule and refresh: itemsets on the validation split, per-case divergence of training cases.

    Schedule: weights are 1 for ``warmup_epochs`` epochs (0-based epochs 0 … warmup_epochs−1), then
    :meth:`should_refresh` is true at epoch ``warmup_epochs`` and every ``update_every`` epochs after.
    Each refresh: :func:`~divaware.subgroups.divergent_itemsets` on the validation cases' scores with
    ``min_support``/``max_length``, then :func:`~divaware.subgroups.case_divergence` of every training case
    (matched by attribute values) counting only itemsets with |statistic| ≥ ``t_min`` and, when ``fdr`` is set,
    Benjamini–Hochberg q ≤ ``fdr`` (itemsets of fewer than ``min_count`` validation cases are not tested),
    then :meth:`_weights_from`. ``test`` names the divergence test behind the q-values
    (:data:`divaware.subgroups.TESTS`; default Mann–Whitney, chosen in benchmarks/DIVERGENCE.md).
    ``test_ids`` (optional) are refused as validation cases: the test split must never drive weights.
    The last analysis is kept in ``last_itemsets`` (not part of the state).

    **Persistence** (``persistence`` γ in [0, 1]): a refresh that flags nothing for any training case is
    no evidence, not evidence that the gap closed (with 48-96 validation cases the detector misses a real
    0.08 gap in half or more of the refreshes, benchmarks/DIVERGENCE.md). Such a refresh keeps the last
    weights and moves them towards 1, w ← 1 + γ (w − 1), then w ← w / mean(w) (the map keeps mean 1 and the
    clip bounds, the division only removes rounding). γ = 0 resets to 1 at once (the former behaviour);
    γ = 1 keeps the weights until the next flag; a tilt without fresh evidence halves after
    log(½)/log(γ) refreshes. The history then shows ``divergence`` 0 and no ``worst_itemset`` (this
    refresh found nothing) beside weights ≠ 1.

    **False-alarm rate per refresh** (``null_permutations`` K > 0): after each analysis the same detector
    (same test, FDR, t_min, support) is run on K seeded permutations of the validation scores
    (:func:`divaware.subgroups.permutation_flag_rate`; seed from ``null_seed`` and the refresh number, so a
    resumed run draws the same); the share that flags anything is recorded in the history column
    ``false_alarm_rate``. It estimates how often this split would re-weight on noise; a run's mean over
    its refreshes is its false-alarm rate.
    """

    def __init__(
        self,
        *,
        warmup_epochs: int,
        update_every: int,
        min_support: float,
        max_length: int | None,
        t_min: float,
        attributes: Sequence[str] | None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None,
        test_ids: Iterable[str] = (),
        fdr: float | None = None,
        min_count: int = MIN_TEST_COUNT,
        test: str = DEFAULT_TEST,
        persistence: float = 0.0,
        null_permutations: int = 0,
        null_seed: int = 0,
    ) -> None:
        super().__init__(attributes=attributes, bins=bins)
        if test not in TESTS:
            raise ValueError(f"{self.name}: test must be one of {list(TESTS)}, got {test!r}")
        if not (isinstance(persistence, (int, float)) and 0 <= persistence <= 1):
            raise ValueError(f"{self.name}: persistence must be in [0, 1] (0: reset to 1 when nothing is flagged, "
                             f"1: keep the last weights), got {persistence!r}")
        if isinstance(null_permutations, bool) or int(null_permutations) != null_permutations or null_permutations < 0:
            raise ValueError(f"{self.name}: null_permutations must be an int ≥ 0, got {null_permutations!r}")
        self.test, self.persistence = str(test), float(persistence)
        self.null_permutations, self.null_seed = int(null_permutations), int(null_seed)
        if fdr is not None and not 0 < fdr < 1:
            raise ValueError(f"{self.name}: fdr must be in (0, 1) or None (no false-discovery control), got {fdr}")
        if isinstance(min_count, bool) or int(min_count) != min_count or min_count < 2:
            raise ValueError(f"{self.name}: min_count must be an int ≥ 2, got {min_count}")
        self.fdr = None if fdr is None else float(fdr)
        self.min_count = int(min_count)
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"{self.name}: warmup_epochs must be an int ≥ 0, got {warmup_epochs}")
        if int(update_every) != update_every or update_every < 1:
            raise ValueError(f"{self.name}: update_every must be an int ≥ 1, got {update_every}")
        if not 0 < min_support <= 1:
            raise ValueError(f"{self.name}: min_support must be in (0, 1], got {min_support}")
        if max_length is not None and (int(max_length) != max_length or max_length < 1):
            raise ValueError(f"{self.name}: max_length must be an int ≥ 1 or None, got {max_length}")
        if not (t_min >= 0 and math.isfinite(t_min)):
            raise ValueError(f"{self.name}: t_min must be ≥ 0, got {t_min}")
        self.warmup_epochs, self.update_every = int(warmup_epochs), int(update_every)
        self.min_support = float(min_support)
        self.max_length = None if max_length is None else int(max_length)
        self.t_min = float(t_min)
        self.test_ids = frozenset(str(i) for i in test_ids)
        self._params.update(
            warmup_epochs=self.warmup_epochs, update_every=self.update_every, min_support=self.min_support,
            max_length=self.max_length, t_min=self.t_min, test_ids=sorted(self.test_ids), fdr=self.fdr,
            min_count=self.min_count, test=self.test, persistence=self.persistence,
            null_permutations=self.null_permutations, null_seed=self.null_seed,
        )
        self.last_itemsets: pd.DataFrame | None = None

    # how case_divergence picks a case's worst flagged itemset: by its Δ (the paper) or its effect gap (divaware)
    select_by: ClassVar[str] = "divergence"

    def should_refresh(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.update_every == 0

    def refresh(self, epoch: int, val_groups: pd.DataFrame, val_scores: pd.Series) -> pd.Series:
        self._require_fit()
        if not isinstance(val_scores, pd.Series):
            raise TypeError(f"{self.name}: val_scores must be a pandas Series indexed by patient_id")
        if self.test_ids:
            leaked = sorted(set(map(str, val_scores.index)) & self.test_ids)
            if leaked:
                raise ValueError(
                    f"{self.name}: validation scores include test cases {leaked[:10]}; weights must be driven "
                    f"by the fairness-validation split carved from training, never by the test split"
                )
        val_table = self._groups_table(val_groups, "val_groups")
        itemsets = divergent_itemsets(val_table, val_scores, min_support=self.min_support, max_length=self.max_length,
                                      min_count=self.min_count, test=self.test)
        cd = case_divergence(self._table, itemsets, t_min=self.t_min, q_max=self.fdr, by=self.select_by)
        d = cd["divergence"].to_numpy(float)
        self._clip = np.full(len(d), "", dtype=object)
        if (cd["worst_itemset"] != "").any() or self._refresh_count == 0 or self.persistence == 0:
            self._w = self._weights_from(cd)
        else:
            # No evidence is not evidence of no gap: keep the last weights, decayed towards 1 (mean stays 1;
            # weights ≥ 1 stay ≥ 1 and the shared weight of the others stays shared and ≤ 1; no clip binds).
            w = 1.0 + self.persistence * (self._w - 1.0)
            self._w = w / w.mean()
        far = float("nan")
        if self.null_permutations:
            # the same detector on K permutations of these scores: how often this split flags noise
            far = permutation_flag_rate(
                val_table, val_scores, n_permutations=self.null_permutations,
                seed=int(np.random.default_rng([self.null_seed, self._refresh_count]).integers(2**31)),
                fdr=self.fdr, t_min=self.t_min, min_support=self.min_support, max_length=self.max_length,
                min_count=self.min_count, test=self.test)
        self._div = d
        self._gap = cd["gap"].to_numpy(float)
        self._worst = cd["worst_itemset"].to_numpy(dtype=object)
        self._refresh_count += 1
        self._last_epoch = int(epoch)
        self.last_itemsets = itemsets
        self._record(epoch, far)
        return self.weights

    def _weights_from(self, cd: pd.DataFrame) -> np.ndarray:
        """Weights from the training cases' :func:`~divaware.subgroups.case_divergence` (may set ``_clip``)."""
        raise NotImplementedError

    def refresh_line(self) -> str:
        """One line on the last refresh: what was flagged, the weights, and where a clip bound them."""
        self._require_fit()
        flagged = self._worst.astype(str) != ""
        n_sets = len(set(self._worst[flagged].astype(str)))
        w = self._w
        if flagged.any():
            text = (f"{n_sets} flagged subgroup(s), {int(flagged.sum())} training case(s) in them: weights "
                    f"{w[flagged].min():.2f}-{w[flagged].max():.2f}; the other {int((~flagged).sum())}: "
                    f"{w[~flagged].mean():.2f}" if (~flagged).any() else
                    f"{n_sets} flagged subgroup(s) cover all {len(w)} training cases: weights "
                    f"{w.min():.2f}-{w.max():.2f}")
        elif np.allclose(w, 1.0):
            text = "nothing flagged: every weight 1"
        else:
            text = (f"nothing flagged: the last weights kept, decayed towards 1 (persistence "
                    f"{self.persistence:g}; {w.min():.2f}-{w.max():.2f})")
        clipped = self._clip.astype(str)
        for bound in ("w_max", "w_min"):
            k = int((clipped == bound).sum())
            if k:
                text += f"; clip {bound}={getattr(self, bound, float('nan')):g} binds for {k} case(s) ({k / len(w):.0%})"
        return f"{self.name} refresh {self._refresh_count} (epoch {self._last_epoch}): {text}"


class PaperWeighting(_DivergenceStrategy):
    """The paper's weighting — |Δ| of the case's worst divergent itemset — with the published defects fixed.

    As described: itemsets are ranked by divergence, worst first; each training case takes the first
    (most negative) itemset it belongs to, and |Δ| of that itemset is its weight. Fixes, each pinned by a
    test:

    1. **By patient_id, not batch position.** The published code matched weights to cases by position in
       a shuffled loader; here every weight is looked up by ``patient_id``.
    2. **Unmatched cases do not out-weigh matched ones.** Published: matched cases got |Δ| (mostly
       0.01–0.03) while cases in no divergent itemset kept 1.0, inverting the intent. Here unmatched cases
       get the smallest matched |Δ|, and all weights are then scaled to mean 1 over the training set
       (the objective's weighted term is Σwℓ/B, so the weights' scale matters: mean 1 keeps it the size
       of the plain loss; see the module docstring).
    3. **The empty itemset cannot zero weights.** Published: the empty itemset (Δ = 0, matching everyone)
       could be a case's "worst" itemset and set its weight to 0 — for every case when no itemset was
       negative. Here the empty itemset is never an itemset, only Δ < 0 matches, every weight is > 0, and
       when nothing diverges all weights are 1.
    4. **Fairness-validation split, not test.** Published: the test split chose checkpoints, drove the
       weights and was reported. Here weights come only from the scores passed to :meth:`refresh`
       (the fairness-validation split) and ``test_ids`` are refused there.

    No clipping (the paper has none), so the ratio between weights can be large (|Δ| spans decades).
    Defaults: no t filter (``t_min=0``) and no false-discovery control (``fdr=None``), as in the paper, so
    it re-weights on noise; pass ``fdr=0.05`` for the control ``divaware`` uses.
    """

    name = "paper"

    def __init__(
        self,
        *,
        warmup_epochs: int = DEFAULTS["paper"]["warmup_epochs"],
        update_every: int = DEFAULTS["paper"]["update_every"],
        min_support: float = DEFAULTS["paper"]["min_support"],
        max_length: int | None = 3,
        t_min: float = 0.0,
        attributes: Sequence[str] | None = None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None = None,
        test_ids: Iterable[str] = (),
        fdr: float | None = None,
        min_count: int = MIN_TEST_COUNT,
        test: str = DEFAULT_TEST,
        persistence: float = 0.0,
        null_permutations: int = 0,
        null_seed: int = 0,
    ) -> None:
        super().__init__(warmup_epochs=warmup_epochs, update_every=update_every, min_support=min_support,
                         max_length=max_length, t_min=t_min, attributes=attributes, bins=bins, test_ids=test_ids,
                         fdr=fdr, min_count=min_count, test=test, persistence=persistence,
                         null_permutations=null_permutations, null_seed=null_seed)

    def _weights_from(self, cd: pd.DataFrame) -> np.ndarray:
        r = -np.minimum(cd["divergence"].to_numpy(float), 0.0)
        matched = r > 0
        if not matched.any():
            return np.ones_like(r)
        r = np.where(matched, r, r[matched].min())
        return r / r.mean()


class DivawareWeighting(_DivergenceStrategy):
    """Our default: raise every case of a significantly underperforming subgroup, by how much worse it is.

    Each refresh flags the validation itemsets that pass the false-alarm control below (its one-sided test,
    by default Mann–Whitney, at Benjamini–Hochberg q ≤ ``fdr``); a training case's gap g_i is the largest
    :func:`~divaware.subgroups.effect_gap` among the flagged itemsets that contain it (matched by attribute
    values; 0 if none). With the default rank test the gap is 1 − 2·ps, ps the itemset's probability of
    superiority: the share of (itemset case, other case) comparisons its cases lose minus the share they
    win, in (0, 1] for a flagged itemset, the same effect the flag was decided on. The weights
    (:func:`raise_flagged`) are

        flagged cases:  w_i = 1 + g_i / τ   (≥ 1, ERM's weight, and more for a larger gap; clipped at w_max)
        all others:     one shared w₀ = (N − Σ flagged w) / N_others ≤ 1, so the mean over the training set is 1

    **τ (``tau``), one unit:** a flagged subgroup whose gap is τ gets twice ERM's weight; with the default
    τ = 1 a subgroup whose cases lose every comparison with the others (ps 0) gets 2, one that loses 65 %
    and wins 35 % (ps 0.35, gap 0.3) gets 1.3. Chosen by measurement (benchmarks/DIVERGENCE.md, "Scale of
    the weights", 40 refreshes per cell): the smallest τ among 0.25, 0.5, 0.75, 1, 2 whose share of training
    cases at a clip, averaged over the refreshes that flag something, stays ≤ 10 % in every cell (τ 1: at
    most 5.8 %; τ 0.75: 10.8 % with a strong planted group at 48 validation cases). At τ 1 the flagged hard
    group's training cases get a median 1.6-2.1× the others' weight; at τ 2 rarely 1.5×. Smaller τ tilts
    harder and makes the floor bind more often.

    **Clip.** ``w_max`` caps a flagged weight; ``w_min`` is the floor of the shared weight w₀: where the
    flagged cases' extra weight would push w₀ below it, the scale 1/τ is lowered until w₀ = w_min (every
    flagged weight stays ≥ 1). Where a bound sets a weight the run says so: the history's ``clip`` column
    (``w_max``/``w_min``), :meth:`refresh_line` (logged by training at each refresh) and ``divaware weights``.
    With ``smoothing`` β > 0, refreshes after the first use β·w_previous + (1−β)·w_fresh (mean 1, within
    the clip; a newly flagged case may then start below 1).

    **False-alarm control.** A refresh looks at dozens of itemsets (40-80 testable ones with 48-240
    validation cases and three attributes), so some always look divergent by chance: with the former rule
    |t| ≥ 2, 35 of 40 analyses of pure noise (permuted scores) produced non-uniform weights. Only itemsets
    that survive a Benjamini–Hochberg step-up at false-discovery rate ``fdr`` count:

    1. every itemset of ≥ ``min_count`` validation cases gets a one-sided p-value for "scores lower than
       the rest" from ``test`` (default: Mann–Whitney U, valid for heavy-tailed Dice; see
       :func:`divaware.subgroups.divergent_itemsets`); itemsets holding exactly the same cases are one test;
    2. with the m p-values sorted, p_(1) ≤ … ≤ p_(m), the k smallest are discoveries for the largest k with
       p_(k) ≤ fdr · k / m (the q column of the analysis is the adjusted p-value, q ≤ fdr ⇔ discovery);
    3. g_i as above, from the discoveries that contain training case i.

    When nothing is divergent (scores exchangeable between the subgroups), the chance that anything is
    discovered is at most ``fdr``, and then every weight is exactly 1 (before ``persistence`` carries
    earlier weights over); the rank test also flags a subgroup whose cases are typically lower at an equal
    mean (benchmarks/DIVERGENCE.md, heteroscedastic nulls). ``fdr=None`` switches the control off (then
    ``t_min``, on |z|, is the only filter).

    Defaults (:data:`DEFAULTS`): τ 1, clip [0.2, 5], ``fdr`` 0.05 with ``min_count`` 5 and no statistic
    filter (``t_min`` 0), min_support 0.05 and max_length 3, the method's attributes
    (:data:`divaware.subgroups.DEFAULT_ATTRIBUTES`, with the derived ``dense``), warm-up 6 epochs, refresh
    every 3 epochs; ``persistence`` 0.8 (a refresh that flags nothing keeps the last weights, decayed
    towards 1: flagged cases stay ≥ 1, the others keep one shared weight ≤ 1) and a false-alarm rate from
    20 permutations per refresh (see the base class).

    Note: a case that shares only a marginal with a strongly divergent intersection (``age_group=0-40``
    for ``age_group=0-40 ∧ breast_density=d``) inherits that marginal's, smaller, gap when the marginal
    is itself flagged, else w₀.
    """

    name = "divaware"
    select_by = "effect"

    def __init__(
        self,
        *,
        tau: float = DEFAULTS["divaware"]["tau"],
        w_min: float = DEFAULTS["divaware"]["w_min"],
        w_max: float = DEFAULTS["divaware"]["w_max"],
        smoothing: float = 0.0,
        warmup_epochs: int = DEFAULTS["divaware"]["warmup_epochs"],
        update_every: int = DEFAULTS["divaware"]["update_every"],
        min_support: float = DEFAULTS["divaware"]["min_support"],
        max_length: int | None = 3,
        t_min: float = 0.0,
        fdr: float | None = 0.05,
        min_count: int = MIN_TEST_COUNT,
        attributes: Sequence[str] | None = None,
        bins: Mapping[str, Bins | Sequence[float] | int] | None = None,
        test_ids: Iterable[str] = (),
        test: str = DEFAULT_TEST,
        persistence: float = DEFAULTS["divaware"]["persistence"],
        null_permutations: int = DEFAULTS["divaware"]["null_permutations"],
        null_seed: int = 0,
    ) -> None:
        super().__init__(warmup_epochs=warmup_epochs, update_every=update_every, min_support=min_support,
                         max_length=max_length, t_min=t_min, attributes=attributes, bins=bins, test_ids=test_ids,
                         fdr=fdr, min_count=min_count, test=test, persistence=persistence,
                         null_permutations=null_permutations, null_seed=null_seed)
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"divaware: tau must be > 0, got {tau}")
        if not (0 < w_min <= 1 <= w_max < math.inf):
            raise ValueError(f"divaware: need 0 < w_min ≤ 1 ≤ w_max < inf, got w_min={w_min}, w_max={w_max}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"divaware: smoothing must be in [0, 1), got {smoothing}")
        self.tau, self.w_min, self.w_max, self.smoothing = float(tau), float(w_min), float(w_max), float(smoothing)
        self._params.update(tau=self.tau, w_min=self.w_min, w_max=self.w_max, smoothing=self.smoothing)

    def _weights_from(self, cd: pd.DataFrame) -> np.ndarray:
        fresh, self._clip = raise_flagged(cd["gap"].to_numpy(float), self.tau, self.w_min, self.w_max)
        if self.smoothing > 0 and self._refresh_count > 0:
            return self.smoothing * self._w + (1.0 - self.smoothing) * fresh
        return fresh


# --------------------------------------------------------------------------------------------------------
# The oracle (synthetic cohorts only)
# --------------------------------------------------------------------------------------------------------


class OracleWeighting(WeightingStrategy):
    """The ceiling of subgroup re-weighting: up-weight the cases that are *truly* hard.

    Only a synthetic cohort knows which cases those are: its ``synthetic_truth.csv`` (written by
    ``divaware synth``) marks them in ``hard_subgroup``. Any other folder is refused. The weights use the
    divaware recipe with perfect knowledge: raw weight ``ratio`` for a hard case and 1 for the others,
    scaled to mean 1 over the training set and clipped to [w_min, w_max] by :func:`normalise_weights`
    (the same helper and defaults as ``divaware``; the default ratio w_max / w_min is the largest tilt
    divaware's clip allows). Same schedule as the divergence strategies: weights 1 during the
    ``warmup_epochs``, then the oracle weights from the refresh at epoch ``warmup_epochs`` on (they do not
    change after it; validation scores are not used). With ``warmup_epochs=0`` they are set by :meth:`fit`.
    Its gain over ERM is what re-weighting the right subgroup could achieve; a method's gain is reported
    as a fraction of it.

    Give ``data_root`` (the cohort folder; training passes it) or ``hard_ids`` (the hard cases' ids, which
    is what :attr:`params` records, so a resumed run does not depend on where the cohort lives).
    """

    name = "oracle"
    uses_groups = False

    def __init__(
        self,
        *,
        data_root: str | None = None,
        hard_ids: Iterable[str] | None = None,
        ratio: float | None = None,
        w_min: float = DEFAULTS["oracle"]["w_min"],
        w_max: float = DEFAULTS["oracle"]["w_max"],
        warmup_epochs: int = DEFAULTS["oracle"]["warmup_epochs"],
    ) -> None:
        super().__init__(attributes=())
        if (data_root is None) == (hard_ids is None):
            raise ValueError("oracle: give exactly one of data_root (a synthetic cohort) or hard_ids")
        if hard_ids is None:
            hard_ids = self.read_hard_ids(data_root)
        if not (0 < w_min <= 1 <= w_max < math.inf):
            raise ValueError(f"oracle: need 0 < w_min ≤ 1 ≤ w_max < inf, got w_min={w_min}, w_max={w_max}")
        ratio = float(w_max / w_min if ratio is None else ratio)
        if not (ratio >= 1 and math.isfinite(ratio)):
            raise ValueError(f"oracle: ratio must be ≥ 1, got {ratio}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"oracle: warmup_epochs must be an int ≥ 0, got {warmup_epochs}")
        self.hard_ids = frozenset(str(i) for i in hard_ids)
        self.ratio, self.w_min, self.w_max = ratio, float(w_min), float(w_max)
        self.warmup_epochs = int(warmup_epochs)
        self._params = {"hard_ids": sorted(self.hard_ids), "ratio": self.ratio, "w_min": self.w_min,
                        "w_max": self.w_max, "warmup_epochs": self.warmup_epochs}

    @staticmethod
    def read_hard_ids(data_root: str | Path) -> list[str]:
        """Ids of the hard subgroup from ``<data_root>/synthetic_truth.csv``; a clear error for other folders."""
        path = Path(data_root).expanduser() / "synthetic_truth.csv"
        if not path.is_file():
            raise ValueError(f"oracle: {path} not found — the oracle needs a synthetic cohort written by "
                             "`divaware synth` (it knows the truly hard cases); use another strategy for this data")
        truth = pd.read_csv(path, dtype={"patient_id": str})
        if not {"patient_id", "hard_subgroup"} <= set(truth.columns):
            raise ValueError(f"oracle: {path} lacks the patient_id / hard_subgroup columns; regenerate the cohort")
        hard = truth["hard_subgroup"].astype(str).str.lower().isin(("true", "1"))
        return truth.loc[hard, "patient_id"].tolist()

    def _oracle_weights(self) -> np.ndarray:
        hard = np.isin(self._ids.to_numpy(dtype=str), sorted(self.hard_ids))
        return normalise_weights(np.where(hard, self.ratio, 1.0), self.w_min, self.w_max)

    def _fit(self) -> None:
        if self.warmup_epochs == 0:
            self._w = self._oracle_weights()

    def should_refresh(self, epoch: int) -> bool:
        return self.warmup_epochs > 0 and epoch == self.warmup_epochs

    def refresh(self, epoch: int, val_groups: pd.DataFrame, val_scores: pd.Series) -> pd.Series:
        self._require_fit()
        self._w = self._oracle_weights()
        self._refresh_count += 1
        self._last_epoch = int(epoch)
        self._record(epoch)
        return self.weights


STRATEGIES: dict[str, type[WeightingStrategy]] = {
    cls.name: cls
    for cls in (ERMWeighting, InverseFrequencyWeighting, GroupDROWeighting, PaperWeighting, DivawareWeighting,
                OracleWeighting, FEBSWeighting)
}


def check_strategy_params(name: str, params: Mapping[str, Any]) -> None:
    """A one-line ValueError naming the first key of ``params`` that strategy ``name`` does not take
    (checked by name against its constructor, before any data is read)."""
    import difflib
    import inspect

    if name not in STRATEGIES:
        raise ValueError(f"unknown weighting strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    accepted = [p for p in inspect.signature(STRATEGIES[name].__init__).parameters if p != "self"]
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key!r} is not a parameter of strategy {name!r}{hint}; valid: {', '.join(accepted)}")


def make_strategy(name: str, **params: Any) -> WeightingStrategy:
    """Build the strategy ``name`` (a key of :data:`STRATEGIES`) with keyword ``params``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown weighting strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    try:
        return cls(**params)
    except TypeError as err:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"{name}: bad parameters {sorted(params)} ({err}); accepted: {accepted}") from None
