"""Subgroups of the cohort: discretised attribute tables, divergence analysis, per-case divergence.

Three steps of the method (DESIGN.md, "The method") live here:

1. :func:`attribute_table` turns cohort metadata into a table of *discrete* attribute values, one row per
   ``patient_id``. ``unknown`` is a value like any other (missing menopause or density is itself a
   subgroup worth looking at), so nothing is dropped.
2. :func:`divergent_itemsets` finds every frequent itemset (a conjunction such as
   ``age_group=0-40 ∧ breast_density=d``) with support ≥ ``min_support`` and reports its mean score, its
   divergence Δ = mean over the itemset − mean overall (DivExplorer's), and a one-sided test of "lower than
   the other cases": by default the Mann–Whitney U (its z in ``z_mw``, its p-value and BH q-value) with the
   rank effect it decides on, the probability of superiority ``ps`` and its CI. A flag (:func:`is_significant`)
   and its effect always agree in sign; Δ, a mean, may not. :func:`prune_redundant`,
   :func:`shapley_contributions` and the finding helpers (:func:`findings`) help read the result.
3. :func:`case_divergence` gives every case — of *any* set of cases, matched by attribute values, so
   training cases need not be in the analysed set — the most negative Δ among the itemsets it belongs to.

DivExplorer (PyPI ``divexplorer``) does the frequent-itemset mining. Its quirks are handled here and only
here (see :func:`_mine_itemsets`):

* items are one-hot column names ``attr=value`` and itemsets are ``frozenset``\\ s of them, so attribute
  names must not contain ``=``;
* its result includes the empty itemset (the whole data set, Δ = 0); we drop it from what we return,
  because it matches every case and would otherwise swamp anything keyed on "the itemsets a case is in";
* its public API has no maximum itemset length, so ``max_length`` is applied after mining;
* its ``t`` is **not** an adequate Welch t: it uses the population variance (ddof=0), compares the
  itemset with the *whole* data set that contains it (the two samples are not independent), drops the
  sign, and computes the variance as E[x²]−mean², which on (near-)constant scores gives spurious
  values or NaN with a RuntimeWarning. We discard it and test the itemset against its complement
  ourselves (:data:`TESTS`), from the membership of the itemsets DivExplorer mines.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "AGE_GROUPS",
    "UNKNOWN",
    "DEFAULT_ATTRIBUTES",
    "DEFAULT_BINS",
    "ITEMSET_COLUMNS",
    "Bins",
    "attribute_table",
    "case_ids",
    "divergent_itemsets",
    "case_divergence",
    "prune_redundant",
    "shapley_contributions",
    "itemset_label",
    "is_significant",
    "effect_gap",
    "findings",
    "with_findings",
    "findings_order",
    "untested_gaps",
    "FINDING_COLUMNS",
    "UNTESTED_GAP",
    "benjamini_hochberg",
    "MIN_TEST_COUNT",
    "TESTS",
    "DEFAULT_TEST",
    "STATISTICS",
    "STAT_COLUMNS",
    "EFFECT_COLUMNS",
    "itemset_columns",
    "statistic_column",
    "effect_column",
    "is_worse",
    "superiority",
    "permutation_flag_rate",
    "DERIVED_ATTRIBUTES",
    "method_attributes",
    "parse_item",
]

# These two mirror the cohort contract (CONTRIBUTING.md). They are repeated rather than imported so that the
# analysis works on any metadata frame, including hand-made ones, without the cohort loader.
AGE_GROUPS: tuple[str, ...] = ("0-40", "41-50", "51-60", "61-70", "71+")
UNKNOWN = "unknown"

# ``dense`` (BI-RADS c/d vs a/b) is derived from ``breast_density`` (DERIVED_ATTRIBUTES): with density's
# four values as separate items, "young and dense" splits into two itemsets too small to test.
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("age_group", "menopause", "breast_density", "dense")

# Joins the items of an itemset in its readable label.
AND = " ∧ "

# The tests of "an itemset scores lower than the rest" that divergent_itemsets can use; the first is the
# default, chosen by measurement (benchmarks/DIVERGENCE.md).
TESTS: tuple[str, ...] = ("mannwhitney", "welch", "pooled_t", "permutation")
DEFAULT_TEST = TESTS[0]
STATISTICS: dict[str, str] = {
    "mannwhitney": "Mann–Whitney z (continuity-corrected; p = Φ(z))",
    "welch": "Welch t",
    "pooled_t": "pooled-variance t (df n − 2)",
    "permutation": "Welch t (p from permutations of the mean difference)",
}
# The column each test's signed statistic is stored in: named for its content (never a bare ``t``).
STAT_COLUMNS: dict[str, str] = {"mannwhitney": "z_mw", "welch": "t_welch", "pooled_t": "t_pooled",
                                "permutation": "t_welch"}
# The effect each test decides the direction of, and so the column a flag is read against: the rank test's
# own effect, the probability of superiority ``ps`` (worse: < 0.5), or, for the mean-based tests, Δ (< 0).
EFFECT_COLUMNS: dict[str, str] = {"mannwhitney": "ps", "welch": "divergence", "pooled_t": "divergence",
                                  "permutation": "divergence"}


def itemset_columns(test: str = "mannwhitney") -> tuple[str, ...]:
    """The columns of a :func:`divergent_itemsets` result with ``test``, in order."""
    return ("label", "items", "length", "support", "count", "mean", "divergence", "ps", "ps_low", "ps_high",
            STAT_COLUMNS[test], "p", "q")


# The columns of a divergent_itemsets() result with the default test, in order.
ITEMSET_COLUMNS: tuple[str, ...] = itemset_columns(TESTS[0])

# Itemsets with fewer cases than this get no p-value: a mean over 2-4 cases says little, and every such
# itemset is one more hypothesis that the false-discovery control has to pay for.
MIN_TEST_COUNT = 5

# Strings that mean "not recorded" in spreadsheets and CSV round trips; all become UNKNOWN.
_MISSING_STRINGS = frozenset({"", "unknown", "nan", "none", "na", "n/a", "<na>"})


@dataclass(frozen=True)
class Bins:
    """Cut points for a continuous column.

    ``edges`` are the inner cut points, increasing; bins are right-closed: (-inf, e0], (e0, e1], ...,
    (e_last, inf). ``labels`` (one more than the edges) name the bins; by default ``≤e0``, ``(e0, e1]``,
    ..., ``>e_last``.
    """

    edges: tuple[float, ...]
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.edges)
        if not edges or any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or not all(map(math.isfinite, edges)):
            raise ValueError(f"Bins edges must be finite and strictly increasing, got {self.edges!r}")
        object.__setattr__(self, "edges", edges)
        if self.labels is not None:
            labels = tuple(str(x) for x in self.labels)
            if len(labels) != len(edges) + 1 or len(set(labels)) != len(labels):
                raise ValueError(
                    f"Bins with {len(edges)} edges need {len(edges) + 1} distinct labels, got {self.labels!r}"
                )
            object.__setattr__(self, "labels", labels)

    def names(self) -> tuple[str, ...]:
        """The bin labels, generated from the edges when none were given."""
        if self.labels is not None:
            return self.labels
        e = self.edges
        return (f"≤{e[0]:g}", *(f"({a:g}, {b:g}]" for a, b in zip(e, e[1:], strict=False)), f">{e[-1]:g}")


# Documented default bins for the continuous metadata columns we know about.
# * age: the challenge's fairness groups (DESIGN.md), right-closed on integer ages: ≤40 -> "0-40",
#   (40, 50] -> "41-50", ..., >70 -> "71+". The cohort's ``age_group`` column uses the same groups.
# * pixel_spacing (in-plane, mm; the cohort spans 0.3-1.4): fine ≤0.6, medium (0.6, 0.9], coarse >0.9.
# * slice_thickness (mm; the cohort spans 0.8-3.4): thin ≤1.5, medium (1.5, 2.5], thick >2.5.
# Any other continuous column needs bins from the caller (see attribute_table).
DEFAULT_BINS: dict[str, Bins] = {
    "age": Bins((40, 50, 60, 70), AGE_GROUPS),
    "pixel_spacing": Bins((0.6, 0.9)),
    "slice_thickness": Bins((1.5, 2.5)),
}


# --------------------------------------------------------------------------------------------------------
# Attribute tables
# --------------------------------------------------------------------------------------------------------


def _dense(density: object) -> str:
    """BI-RADS density → ``yes`` (c, d: heterogeneously or extremely dense), ``no`` (a, b), else unknown."""
    v = _format_value(density).strip().lower()
    v = {"1": "a", "2": "b", "3": "c", "4": "d"}.get(v, v[:1] if v[:1] in "abcd" and (len(v) == 1 or v[1] in " (") else v)
    return "yes" if v in ("c", "d") else "no" if v in ("a", "b") else UNKNOWN


# Attributes computed from another metadata column when the metadata has no column of that name:
# name -> (source column, value -> attribute value). attribute_table derives them, so any metadata frame
# with the source column has them.
DERIVED_ATTRIBUTES: dict[str, tuple[str, object]] = {"dense": ("breast_density", _dense)}


def method_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    """The attributes the method analyses for ``attributes``: each, followed by the :data:`DERIVED_ATTRIBUTES`
    whose source is among them (``breast_density`` brings ``dense``). Training's default
    (:data:`DEFAULT_ATTRIBUTES`) is this set for the challenge's three attributes; the audit's weights and
    notebook 02's preview use the same map, so the three agree on the same scores."""
    out = list(dict.fromkeys(str(a) for a in attributes))
    for name, (source, _) in DERIVED_ATTRIBUTES.items():
        if source in out and name not in out:
            out.insert(out.index(source) + 1, name)
    return tuple(out)


def case_ids(frame: pd.DataFrame, what: str = "table") -> pd.Index:
    """The patient ids of a frame (a ``patient_id`` column, else the index) as strings; no duplicates."""
    return _ids_of(frame, what)


def _ids_of(frame: pd.DataFrame, what: str) -> pd.Index:
    """The patient ids of a frame: a ``patient_id`` column if there is one, else the index."""
    ids = frame["patient_id"] if "patient_id" in frame.columns else frame.index.to_series()
    ids = pd.Index(ids.astype(str), name="patient_id")
    if ids.has_duplicates:
        dup = sorted(set(ids[ids.duplicated()]))
        raise ValueError(f"{what}: duplicated patient_id values {dup[:10]}; each case must appear once")
    return ids


def _is_missing_value(v: object) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    try:
        return bool(pd.isna(v))  # pd.NA, NaT, numpy NaN
    except (TypeError, ValueError):
        return False


def _format_value(v: object) -> str:
    """A categorical value as a string; integral numbers lose their ``.0`` (pcr 1.0 -> "1")."""
    if _is_missing_value(v):
        return UNKNOWN
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if float(v).is_integer() else f"{float(v):g}"
    s = str(v).strip()
    return UNKNOWN if s.lower() in _MISSING_STRINGS else s


_LIST_NUMBER = re.compile(r"^\s*[\[(]\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*[,\s]")


def _format_frame(frame: pd.DataFrame) -> pd.DataFrame:
    # Series.map rather than DataFrame.map, which needs pandas >= 2.1.
    return frame.apply(lambda col: col.map(_format_value)) if len(frame) else frame


def _coerce_bins(column: str, spec: Bins | Sequence[float] | int, values: pd.Series) -> Bins:
    if isinstance(spec, Bins):
        return spec
    if isinstance(spec, Mapping):  # the JSON form of a Bins, as stored in a weighting state_dict
        return Bins(tuple(spec["edges"]), None if spec.get("labels") is None else tuple(spec["labels"]))
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        # Quantile bins are data-dependent: two tables binned separately get different edges. Build one
        # table for the whole cohort and slice it, or pass explicit edges, when tables must match.
        if spec < 2:
            raise ValueError(f"bins[{column!r}] = {spec}: ask for at least 2 quantile bins")
        finite = values.dropna()
        if finite.empty:
            raise ValueError(f"bins[{column!r}]: column has no numeric values to take quantiles of")
        qs = np.unique(np.quantile(finite.to_numpy(float), np.linspace(0, 1, int(spec) + 1)[1:-1]))
        # Round to 3 significant digits so labels stay readable.
        edges = sorted({float(f"{q:.3g}") for q in qs})
        if not edges:
            raise ValueError(f"bins[{column!r}]: column is constant, quantile bins are meaningless")
        return Bins(tuple(edges))
    return Bins(tuple(spec))


def _first_number(value: object) -> object:
    # MAMA-MIA stores pixel_spacing as text such as "[0.7, 0.7]": bin on its first (in-plane) value.
    if isinstance(value, str):
        match = _LIST_NUMBER.match(value)
        if match:
            return float(match.group(1))
    return value


def _bin_column(column: str, raw: pd.Series, bins: Bins) -> pd.Series:
    raw = raw.map(_first_number)
    numeric = pd.to_numeric(raw, errors="coerce")
    missing = raw.map(_is_missing_value).to_numpy(bool) | raw.map(
        lambda v: isinstance(v, str) and v.strip().lower() in _MISSING_STRINGS
    ).to_numpy(bool)
    bad = numeric.isna().to_numpy() & ~missing
    as_str = raw.map(_format_value).to_numpy(dtype=object)
    if bad.any() and not set(as_str[bad]) <= set(bins.names()):
        raise ValueError(
            f"column {column!r} is binned as continuous but holds non-numeric values "
            f"{sorted(set(as_str[bad]))[:5]}; clean the column or pass bins={{{column!r}: Bins(...)}} with "
            f"labels that match them"
        )
    names = np.array(bins.names(), dtype=object)
    codes = np.searchsorted(np.asarray(bins.edges), numeric.to_numpy(float), side="left")
    out = np.where(numeric.isna().to_numpy(), UNKNOWN, names[np.minimum(codes, len(names) - 1)])
    # Values that are already bin labels (a table passed through attribute_table twice) stay as they are.
    out = np.where(bad, as_str, out)
    return pd.Series(out, index=raw.index, dtype=object)


def attribute_table(
    metadata: pd.DataFrame,
    attributes: Sequence[str] | None = None,
    *,
    bins: Mapping[str, Bins | Sequence[float] | int | Mapping] | None = None,
    max_categories: int = 12,
) -> pd.DataFrame:
    """Discrete attribute values per case, ready for the divergence analysis.

    Parameters
    ----------
    metadata
        Cohort metadata, index ``patient_id`` (or a ``patient_id`` column). Not modified.
    attributes
        Columns to use, in order (default :data:`DEFAULT_ATTRIBUTES`). Any metadata column may be used,
        and the :data:`DERIVED_ATTRIBUTES` when their source column is there: ``dense`` = ``yes`` for
        BI-RADS density c/d, ``no`` for a/b, ``unknown`` otherwise (from ``breast_density``).
    bins
        How to discretise continuous columns: a :class:`Bins`, a sequence of inner cut points, or an int
        for that many quantile bins (data-dependent, so only consistent within one table). Merged over
        :data:`DEFAULT_BINS` (``age`` -> the challenge's age groups).
    max_categories
        A numeric column without bins is used as categorical when it has at most this many distinct
        values (``num_phases``, ``field_strength``, ``pcr``); with more it counts as continuous and needs
        bins, and we raise rather than guess cut points that would differ between tables.

    Returns
    -------
    DataFrame indexed by ``patient_id`` with one string column per attribute. Missing values (NaN, None,
    empty, "nan") become ``"unknown"``, which is a value, not a drop. Integral numbers are written without
    ``.0``. Passing the result through again returns it unchanged.
    """
    attributes = list(DEFAULT_ATTRIBUTES if attributes is None else attributes)
    if not attributes:
        raise ValueError("attribute_table: give at least one attribute")
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"attribute_table: attributes listed twice in {attributes}")
    for a in attributes:
        if "=" in a:
            raise ValueError(f"attribute name {a!r} contains '=', which DivExplorer uses to join attr=value")
        if a not in metadata.columns and not (a in DERIVED_ATTRIBUTES and DERIVED_ATTRIBUTES[a][0] in metadata.columns):
            raise ValueError(
                f"attribute {a!r} is not a column of the metadata; available: {sorted(map(str, metadata.columns))}"
            )
    ids = _ids_of(metadata, "attribute_table")
    all_bins = {**DEFAULT_BINS, **(bins or {})}
    out: dict[str, np.ndarray] = {}
    for a in attributes:
        if a not in metadata.columns:  # a derived attribute (checked above)
            source, derive = DERIVED_ATTRIBUTES[a]
            out[a] = np.array([derive(v) for v in metadata[source].to_numpy(dtype=object)], dtype=object)
            continue
        raw = pd.Series(metadata[a].to_numpy(dtype=object), index=ids)
        if a in all_bins:
            spec = _coerce_bins(a, all_bins[a], pd.to_numeric(raw, errors="coerce"))
            col = _bin_column(a, raw, spec)
        else:
            numeric = pd.api.types.is_numeric_dtype(metadata[a]) and not pd.api.types.is_bool_dtype(metadata[a])
            n_distinct = raw.dropna().nunique()
            if numeric and n_distinct > max_categories:
                raise ValueError(
                    f"column {a!r} looks continuous ({n_distinct} distinct numeric values); pass "
                    f"bins={{{a!r}: [cut points]}} (or bins={{{a!r}: 4}} for quartiles of this table)"
                )
            col = raw.map(_format_value)
        out[a] = col.to_numpy(dtype=object)
    table = pd.DataFrame(out, index=ids)
    return table.astype(str)


# --------------------------------------------------------------------------------------------------------
# Items and labels
# --------------------------------------------------------------------------------------------------------


def parse_item(item: str) -> tuple[str, str]:
    """Split a DivExplorer item ``attr=value`` into ``(attr, value)`` (values may contain '=')."""
    attr, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"{item!r} is not an item of the form attr=value")
    return attr, value


def _item_key(item: str, order: Mapping[str, int]) -> tuple[int, str, str]:
    attr, value = parse_item(item)
    return (order.get(attr, len(order)), attr, value)


def itemset_label(items: Iterable[str], attribute_order: Sequence[str] | None = None) -> str:
    """Readable label such as ``age_group=0-40 ∧ breast_density=d``; attributes in table order."""
    order = {a: i for i, a in enumerate(attribute_order or ())}
    return AND.join(sorted(items, key=lambda it: _item_key(it, order)))


def _as_items(itemset: str | Iterable[str]) -> frozenset[str]:
    if isinstance(itemset, str):
        parts = [p.strip() for p in itemset.split(AND.strip())] if itemset.strip() else []
        items = frozenset(parts)
    else:
        items = frozenset(itemset)
    for it in items:
        parse_item(it)
    return items


# --------------------------------------------------------------------------------------------------------
# Divergence analysis
# --------------------------------------------------------------------------------------------------------


def _aligned(table: pd.DataFrame, scores: pd.Series) -> tuple[pd.DataFrame, np.ndarray]:
    """Table and scores on the same ids, rows sorted by id so results never depend on input order."""
    if not isinstance(scores, pd.Series):
        raise TypeError(f"scores must be a pandas Series indexed by patient_id, got {type(scores).__name__}")
    t_ids = _ids_of(table, "attribute table")
    s_ids = pd.Index(scores.index.astype(str))
    if s_ids.has_duplicates:
        raise ValueError(f"scores: duplicated patient_id values {sorted(set(s_ids[s_ids.duplicated()]))[:10]}")
    no_score = t_ids.difference(s_ids)
    no_row = s_ids.difference(t_ids)
    if len(no_score) or len(no_row):
        raise ValueError(
            "scores and attribute table must hold the same patient_ids: "
            f"{len(no_score)} table ids have no score {list(no_score[:10])}, "
            f"{len(no_row)} scored ids are not in the table {list(no_row[:10])}"
        )
    values = pd.to_numeric(pd.Series(scores.to_numpy(), index=s_ids), errors="coerce")
    bad = values.index[~np.isfinite(values.to_numpy(float))]
    if len(bad):
        raise ValueError(f"scores: {len(bad)} cases have NaN/inf or non-numeric scores {sorted(bad)[:10]}")
    table = table.set_axis(t_ids, axis=0).drop(columns=["patient_id"], errors="ignore")
    for a in table.columns:
        if "=" in str(a):
            raise ValueError(f"attribute name {a!r} contains '=', which DivExplorer uses to join attr=value")
    order = np.argsort(t_ids.to_numpy(dtype=str), kind="stable")
    table = table.iloc[order]
    table = _format_frame(table)
    return table, values.reindex(table.index).to_numpy(float)


def _mine_itemsets(table: pd.DataFrame, centred: np.ndarray, min_support: float) -> pd.DataFrame:
    """DivExplorer mining: support, count, Σc and Σc² per frequent itemset (empty itemset included).

    We hand DivExplorer the centred score c and c² as two "quantitative outcomes"; it accumulates both over
    the FP-tree and reports their means, from which we recover exact sums. Its own mean/div/t columns are
    not used (see the module docstring).
    """
    from divexplorer import DivergenceExplorer

    n = len(table)
    columns = ["items", "count", "support", "sum_c", "sum_c2"]
    # DivExplorer crashes (TypeError on an empty result frame) when no single item is frequent enough.
    best_item_support = max(table[a].value_counts().iloc[0] for a in table.columns) / n
    if best_item_support < min_support:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "items" else float) for c in columns})
    frame = pd.DataFrame({str(a): table[a].to_numpy(dtype=object) for a in table.columns})
    frame["__c__"] = centred
    frame["__c2__"] = centred**2
    with warnings.catch_warnings():
        # DivExplorer's own t on E[x²]-mean² can take sqrt of a tiny negative number; we discard that t.
        warnings.simplefilter("ignore", RuntimeWarning)
        # It also uses pandas idioms deprecated in pandas 3 (reset_index(inplace=True)): not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        raw = DivergenceExplorer(frame).get_pattern_divergence(
            min_support=min_support,
            quantitative_outcomes=["__c__", "__c2__"],
            attributes=[str(a) for a in table.columns],
        )
    count = raw["support_count"].to_numpy(float)
    # Its per-itemset "mean" is the accumulated sum divided by the rounded count: undo that exactly.
    return pd.DataFrame(
        {
            "items": [frozenset(s) for s in raw["itemset"]],
            "count": count.astype(int),
            "support": count / n,
            "sum_c": raw["__c__"].to_numpy(float) * count,
            "sum_c2": raw["__c2__"].to_numpy(float) * count,
        }
    )


def _members(table: pd.DataFrame, items: Sequence[frozenset[str]]) -> np.ndarray:
    """Boolean membership matrix (itemsets × cases) of the analysed cases, from the items' attr=value."""
    cache: dict[str, np.ndarray] = {}
    out = np.ones((len(items), len(table)), dtype=bool)
    for k, its in enumerate(items):
        for it in its:
            if it not in cache:
                attr, value = parse_item(it)
                cache[it] = table[attr].to_numpy(dtype=str) == value
            out[k] &= cache[it]
    return out


def _welch_t(n1: np.ndarray, s1: np.ndarray, q1: np.ndarray, n: int, s: float, q: float, tol: float) -> np.ndarray:
    """Signed Welch t of itemset vs complement from counts, sums and sums of squares of centred scores.

    NaN where a side has fewer than 2 cases (its sample variance is undefined); 0 for an itemset covering
    every case (no complement, Δ = 0); ±inf when both sides have zero variance but different means.
    """
    n2 = n - n1
    s2, q2 = s - s1, q - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m2 = s1 / n1, s2 / n2
        v1 = np.maximum(q1 - n1 * m1**2, 0.0) / (n1 - 1)
        v2 = np.maximum(q2 - n2 * m2**2, 0.0) / (n2 - 1)
        se = np.sqrt(v1 / n1 + v2 / n2)
        diff = m1 - m2
        t = diff / se
        t = np.where(se <= tol, np.where(np.abs(diff) <= tol, 0.0, np.copysign(np.inf, diff)), t)
    t = np.where((n1 < 2) | (n2 < 2), np.nan, t)
    return np.where(n2 == 0, 0.0, t)


def _welch_p(n1: np.ndarray, s1: np.ndarray, q1: np.ndarray, n: int, s: float, q: float) -> np.ndarray:
    """One-sided Welch p-value (Welch–Satterthwaite df) that the itemset scores below its complement."""
    from scipy import stats

    n2 = n - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m2 = s1 / n1, (s - s1) / n2
        a = np.maximum(q1 - n1 * m1**2, 0.0) / (n1 - 1) / n1
        b = np.maximum((q - q1) - n2 * m2**2, 0.0) / (n2 - 1) / n2
        se = np.sqrt(a + b)
        df = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1))
        p = stats.t.cdf((m1 - m2) / se, df)
        p = np.where(se > 0, p, np.where(m1 < m2, 0.0, 1.0))
    return np.where((n1 < 2) | (n2 < 2), np.nan, p)


def _pooled_stat(n1: np.ndarray, s1: np.ndarray, q1: np.ndarray, n: int, s: float, q: float) -> np.ndarray:
    """Pooled-variance t (df n − 2) of itemset vs complement; NaN where a side has < 2 cases."""
    n2 = n - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m2 = s1 / n1, (s - s1) / n2
        within = np.maximum(q1 - n1 * m1**2, 0.0) + np.maximum((q - q1) - n2 * m2**2, 0.0)
        se = np.sqrt(within / (n - 2) * (1.0 / n1 + 1.0 / n2))
        t = (m1 - m2) / se
        t = np.where(se > 0, t, np.where(m1 < m2, -np.inf, np.where(m1 > m2, np.inf, 0.0)))
    return np.where((n1 < 2) | (n2 < 2), np.nan, t)


def _pooled_p(n1: np.ndarray, s1: np.ndarray, q1: np.ndarray, n: int, s: float, q: float) -> np.ndarray:
    """One-sided p-value of "the itemset scores lower than its complement" (pooled-variance t, df n − 2).

    The former default. Liberal for a small itemset with a larger variance than the rest (its variance is
    swamped by the complement's in the pooled estimate): benchmarks/DIVERGENCE.md. NaN where a side has
    fewer than 2 cases; zero within-group variance: the sign of the difference decides (constant: p = 1).
    """
    from scipy import stats

    t = _pooled_stat(n1, s1, q1, n, s, q)
    if n <= 2:
        return np.full_like(t, np.nan)
    return np.where(np.isnan(t), np.nan, stats.t.cdf(t, n - 2))


def _rank_sums(members: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per itemset: n₁, n₂ and U = R₁ − n₁(n₁+1)/2 (R₁ its sum of mid-ranks among all n cases); and the tie
    term Σ(t³ − t)/(n(n − 1)) over tie blocks of size t. U counts the (itemset case, other case) pairs in which
    the itemset's case scores higher, ties counting ½."""
    from scipy import stats

    n = values.size
    ranks = stats.rankdata(values)  # mid-ranks for ties
    _, tie_counts = np.unique(values, return_counts=True)
    tie = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts)) / (n * (n - 1)) if n > 1 else 0.0
    n1 = members.sum(axis=1).astype(float)
    u = members.astype(float) @ ranks - n1 * (n1 + 1) / 2
    return n1, n - n1, u, tie


def _mannwhitney_z(members: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Signed z of the Mann–Whitney U of each itemset against its complement (one-sided: lower scores).

    Under exchangeability E U = n₁n₂/2 and Var U = n₁n₂/12 · (n + 1 − Σ(t³ − t)/(n(n − 1))) over tie blocks
    of size t (see :func:`_rank_sums`). The z includes a continuity correction of +½ towards the null, so
    Φ(z) is the one-sided p-value for "the itemset's scores are stochastically lower". NaN where a side has
    < 2 cases; +inf when all scores are tied (never lower).
    """
    n1, n2, u, tie = _rank_sums(members, values)
    var = n1 * n2 / 12.0 * ((values.size + 1) - tie)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (u - n1 * n2 / 2 + 0.5) / np.sqrt(var), np.inf)  # all tied: never lower
    return np.where((n1 < 2) | (n2 < 2), np.nan, z)


def superiority(members: np.ndarray, values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """Probability of superiority of each itemset over its complement, with a confidence interval.

    ``ps`` = U / (n₁n₂) = P(a case of the itemset scores higher than a case outside it) + ½ P(tie): 0.5 means
    no difference, 0.3 means its cases lose 70 % of the pairwise comparisons (ties halved); the rank-biserial
    correlation is 2·ps − 1. It is the effect the Mann–Whitney test decides on: its z is
    (ps − ½)·n₁n₂/σ_U plus a continuity correction of ½/σ_U, so a one-sided p < ½ (and so any flag) comes
    with ps < ½ by construction. ``members``: boolean (itemsets × cases); ``values``: scores, higher better.

    Returns (ps, low, high): the interval is Hanley & McNeil's (1982) normal approximation, clipped to
    [0, 1]; its variance is evaluated at ps moved at most ½/(n₁n₂) inside (0, 1), so a complete separation
    (ps 0 or 1) gets an interval of non-zero width. NaN where a side has no case.
    """
    from scipy import stats

    n1, n2, u, _ = _rank_sums(members, values)
    with np.errstate(divide="ignore", invalid="ignore"):
        ps = u / (n1 * n2)
        edge = 0.5 / (n1 * n2)
        a = np.clip(ps, edge, 1 - edge)
        q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
        var = (a * (1 - a) + (n1 - 1) * (q1 - a**2) + (n2 - 1) * (q2 - a**2)) / (n1 * n2)
        half = stats.norm.ppf(0.5 + level / 2) * np.sqrt(np.maximum(var, 0.0))
    bad = (n1 < 1) | (n2 < 1)
    return tuple(np.where(bad, np.nan, x) for x in (ps, np.clip(ps - half, 0, 1), np.clip(ps + half, 0, 1)))


def _permutation_p(members: np.ndarray, values: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """One-sided permutation p-value of the mean difference, (1 + #{Δ* ≤ Δ}) / (B + 1), seeded.

    Exact under exchangeable scores, but *not* valid when a subgroup has a different variance (the
    permutations assume the same distribution): there it behaves like the pooled t.
    """
    n = values.size
    rng = np.random.default_rng(seed)
    m = members.astype(float)
    n1 = m.sum(axis=1)
    obs = m @ values
    hits = np.zeros(len(m))
    done = 0
    while done < n_permutations:  # in blocks: bounded memory for large B
        b = min(1000, n_permutations - done)
        perm = np.stack([values[rng.permutation(n)] for _ in range(b)], axis=1)
        hits += ((m @ perm) <= obs[:, None] + 1e-12 * max(1.0, float(np.abs(values).max()))).sum(axis=1)
        done += b
    p = (1.0 + hits) / (n_permutations + 1.0)
    return np.where((n1 < 2) | (n - n1 < 2), np.nan, p)


def _test_statistics(
    members: np.ndarray, values: np.ndarray, test: str, tol: float, n_permutations: int = 4999, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(signed statistic, one-sided p-value "lower than the rest") per itemset, for the named test."""
    from scipy import stats

    n = values.size
    c = values - values.mean()  # centring keeps the sums of squares free of cancellation
    m = members.astype(float)
    n1, s1, q1 = m.sum(axis=1), m @ c, m @ (c**2)
    sum_c, sum_c2 = float(c.sum()), float((c**2).sum())
    if test == "mannwhitney":
        z = _mannwhitney_z(members, values)
        p = np.where(np.isnan(z), np.nan, stats.norm.cdf(z))
        return np.where(np.isinf(z), 0.0, z), p  # shown as 0 where every score is tied (p = 1)
    if test == "welch":
        return _welch_t(n1, s1, q1, n, sum_c, sum_c2, tol), _welch_p(n1, s1, q1, n, sum_c, sum_c2)
    if test == "pooled_t":
        return _pooled_stat(n1, s1, q1, n, sum_c, sum_c2), _pooled_p(n1, s1, q1, n, sum_c, sum_c2)
    if test == "permutation":
        return _welch_t(n1, s1, q1, n, sum_c, sum_c2, tol), _permutation_p(members, c, n_permutations, seed)
    raise ValueError(f"unknown divergence test {test!r}; choose one of {list(TESTS)}")


def _membership_keys(members: np.ndarray) -> list[str]:
    """One key per itemset that is equal exactly when two itemsets hold the same cases."""
    return [row.tobytes().hex() for row in np.packbits(members, axis=1)]


def benjamini_hochberg(p: Sequence[float] | np.ndarray, keys: Sequence[object] | None = None) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN p-values stay NaN and are not counted.

    ``keys`` (optional, one per p-value) mark duplicated hypotheses: p-values with equal keys are one test
    (two itemsets holding exactly the same cases, e.g. ``a=x`` and ``a=x ∧ b=y`` when every ``a=x`` case has
    ``b=y``) and count once in the number of tests and in the ranks. Rejecting every hypothesis with
    q ≤ level controls the false-discovery rate at that level for independent or positively dependent
    tests (overlapping itemsets' one-sided tests are positively dependent), and under the complete null
    the chance of any rejection at all is at most the level.
    """
    p = np.asarray(p, dtype=float).reshape(-1)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    if not tested.size:
        return out
    if keys is None:
        first, inverse = tested, np.arange(tested.size)
    else:
        key_arr = np.asarray(list(keys), dtype=object)[tested]
        _, first_pos, inverse = np.unique(key_arr.astype(str), return_index=True, return_inverse=True)
        first = tested[first_pos]
    pu = p[first]
    m = pu.size
    order = np.argsort(pu, kind="mergesort")
    adj = pu[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]  # step-up: q_(k) = min over j ≥ k of p_(j) m / j
    adj = np.maximum(adj, pu[order])  # q ≥ p exactly (p·m/m can round below p)
    qu = np.empty(m)
    qu[order] = np.minimum(adj, 1.0)
    out[tested] = qu[np.asarray(inverse).reshape(-1)]
    return out


def _mined(table: pd.DataFrame, scores: pd.Series, min_support: float, max_length: int | None,
           min_count: int) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]:
    """Checked inputs, then the frequent itemsets (empty one dropped) and their membership matrix."""
    if not (isinstance(min_support, (int, float)) and 0 < float(min_support) <= 1):
        raise ValueError(f"min_support must be in (0, 1], got {min_support!r}")
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 2:
        raise ValueError(f"min_count must be an int >= 2, got {min_count!r}")
    tab, s = _aligned(table, scores)
    if len(tab) == 0:
        raise ValueError("divergent_itemsets: no cases to analyse")
    if tab.shape[1] == 0:
        raise ValueError("divergent_itemsets: the attribute table has no attribute columns")
    mined = _mine_itemsets(tab, s - s.mean(), float(min_support))
    mined = mined[mined["items"].map(len) > 0]
    if max_length is not None:
        mined = mined[mined["items"].map(len) <= max_length]
    mined = mined.reset_index(drop=True)
    return tab, s, mined, _members(tab, list(mined["items"]))


def _p_and_q(members: np.ndarray, s: np.ndarray, test: str, min_count: int,
             keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Δ, statistic, p (NaN below min_count) and BH q of every itemset for the scores ``s``.

    A one-sided p < ½ implies the test's own effect points at "worse" (z < 0 for Mann–Whitney, so ps < ½;
    t < 0, so Δ < 0, for the mean tests), so ``q ≤ fdr`` (< ½) is a flag whose direction its effect shows."""
    n = s.size
    tol = 1e-12 * max(1.0, float(np.abs(s).max()))
    n1 = members.sum(axis=1).astype(float)
    c = s - s.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        div = (members.astype(float) @ c) / n1 - float(c.sum()) / n
    div = np.where(np.abs(div) <= tol, 0.0, div)  # snap rounding noise: "no divergence" must read 0
    stat, p = _test_statistics(members, s, test, tol)
    p = np.where(n1 >= int(min_count), p, np.nan)
    return div, stat, p, benjamini_hochberg(p, keys)


def divergent_itemsets(
    table: pd.DataFrame,
    scores: pd.Series,
    *,
    min_support: float = 0.05,
    max_length: int | None = None,
    min_count: int = MIN_TEST_COUNT,
    test: str = DEFAULT_TEST,
) -> pd.DataFrame:
    """Frequent itemsets of the attribute table with their score divergence, most negative Δ first.

    Parameters
    ----------
    table
        Attribute table (see :func:`attribute_table`), index ``patient_id``; every column is an attribute.
    scores
        Per-case score (higher is better, e.g. Dice), a Series indexed by ``patient_id``. It must hold
        exactly the table's ids, each with a finite score; otherwise ValueError names the offending ids.
    min_support
        Minimum fraction of cases in an itemset, in (0, 1]. Itemsets smaller than that are not reported
        at all (a 4 % subgroup is invisible at min_support 0.05), and their cases are only ever matched
        by the larger itemsets they also belong to.
    max_length
        Largest number of items per itemset (None: no limit).
    min_count
        Itemsets with fewer cases (or a complement of fewer than 2) are reported but not tested: their
        ``p`` and ``q`` are NaN.
    test
        The test of "this itemset scores lower than the other cases" behind ``t``, ``p`` and ``q``, one of
        :data:`TESTS`. The default, ``mannwhitney`` (one-sided Mann–Whitney U, normal approximation with
        tie and continuity corrections), was chosen by measurement (benchmarks/DIVERGENCE.md): with
        Dice-like scores (failures at 0.00 beside 0.9) it is the only candidate with power for a 0.08 gap
        of a 13 % subgroup (18 / 52 / 90 % at 48 / 96 / 192 validation cases, the others ≤ 15 %), and on
        exchangeable scores, heavy-tailed included, its false-alarm rate stays near 5 % where the former
        ``pooled_t`` reaches 14-22 %. It tests "typically lower" (stochastic order), not "lower mean": a
        subgroup whose scores are spread differently at the same mean can be flagged (10-32 % of such
        splits in the measured heteroscedastic null, 66-96 % when the subgroup is the narrow one and the
        others fail now and then). ``welch`` (Welch–Satterthwaite; valid for the mean, no power on Dice-like
        scores) and ``permutation`` (of the mean difference, 4,999 seeded permutations) are the other
        candidates measured; ``pooled_t`` is the former default.
    Returns
    -------
    DataFrame with columns :func:`itemset_columns` of ``test`` (:data:`ITEMSET_COLUMNS` for the default):
    ``label`` (``attr=value ∧ ...`` in table column order), ``items`` (frozenset of ``attr=value``),
    ``length``, ``support`` (fraction), ``count``, ``mean`` score, ``divergence`` Δ = mean − overall mean
    (DivExplorer's divergence, a difference of means); ``ps``, ``ps_low``, ``ps_high``: the probability of
    superiority over the other cases and its 95 % interval (:func:`superiority`; < 0.5: typically lower);
    the signed statistic of ``test`` (negative = lower than the rest) in a column named for it
    (:data:`STAT_COLUMNS`): ``z_mw`` for ``mannwhitney`` (the z of U, continuity-corrected, so p = Φ(z)),
    ``t_pooled`` for ``pooled_t``, ``t_welch`` for ``welch`` and ``permutation``; NaN where either side
    has < 2 cases. ``p``: the one-sided p-value of ``test``; ``q``: its Benjamini–Hochberg adjusted
    p-value over all tested itemsets of this table (itemsets holding the same cases count once, see
    :func:`benjamini_hochberg`). Keep ``q ≤ 0.05`` to control the false-discovery rate at 5 %; a kept
    itemset's effect (``attrs["effect"]``: ``ps`` for the rank test, ``divergence`` for the mean tests)
    always points at "worse" (:func:`is_significant`), while Δ may not for the rank test (a subgroup can
    typically score lower and still have a higher mean). Sorted by Δ, then the statistic, length and label,
    so equal inputs give identical output whatever the row order. The empty itemset is excluded. ``attrs``
    holds ``n_cases``, ``overall_mean``, ``min_support``, ``max_length``, ``attributes``, ``min_count``,
    ``n_tests``, ``test``, ``statistic`` (the statistic's column), ``statistic_text`` (what it is),
    ``effect`` (the effect's column).
    """
    if test not in TESTS:
        raise ValueError(f"unknown divergence test {test!r}; choose one of {list(TESTS)}")
    tab, s, mined, members = _mined(table, scores, min_support, max_length, min_count)
    n = len(tab)
    overall = float(s.mean())
    # Duplicate hypotheses are itemsets with the same case membership (not the same score sums: two
    # different groups can tie on those).
    keys = _membership_keys(members)
    div, stat, p, qv = _p_and_q(members, s, test, int(min_count), keys)
    ps, ps_low, ps_high = superiority(members, s)

    attrs = [str(a) for a in tab.columns]
    items = list(mined["items"])
    stat_col = STAT_COLUMNS[test]
    out = pd.DataFrame(
        {
            "label": pd.Series([itemset_label(i, attrs) for i in items], dtype=object),
            "items": pd.Series(items, dtype=object),
            "length": np.array([len(i) for i in items], dtype=int),
            "support": mined["support"].to_numpy(float),
            "count": mined["count"].to_numpy(int),
            "mean": overall + div,
            "divergence": div,
            "ps": ps,
            "ps_low": ps_low,
            "ps_high": ps_high,
            stat_col: stat,
            "p": p,
            "q": qv,
        }
    )
    out = out.sort_values(["divergence", stat_col, "length", "label"], kind="mergesort", na_position="last")
    out = out.reset_index(drop=True)
    out.attrs.update(
        n_cases=n, overall_mean=overall, min_support=float(min_support), max_length=max_length, attributes=attrs,
        min_count=int(min_count), n_tests=int(len(set(k for k, v in zip(keys, p, strict=True) if np.isfinite(v)))),
        test=test, statistic=stat_col, statistic_text=STATISTICS[test], effect=EFFECT_COLUMNS[test],
    )
    return out


def permutation_flag_rate(
    table: pd.DataFrame,
    scores: pd.Series,
    *,
    n_permutations: int = 20,
    seed: int = 0,
    fdr: float | None = 0.05,
    t_min: float = 0.0,
    min_support: float = 0.05,
    max_length: int | None = None,
    min_count: int = MIN_TEST_COUNT,
    test: str = DEFAULT_TEST,
) -> float:
    """Share of ``n_permutations`` seeded permutations of ``scores`` on which the detector flags anything.

    The detector is the analysis of :func:`divergent_itemsets` with the flag rule of the strategies: an
    itemset whose effect points at "worse" (:func:`is_worse`), q ≤ ``fdr`` (when not None) and |statistic|
    ≥ ``t_min``. Permuting the scores over the
    cases keeps their distribution and removes any link to the attributes, so every flag is a false alarm:
    the result estimates how often *this* split would re-weight on noise. The itemsets are mined once
    (membership does not depend on the scores), so K permutations cost K tests, not K minings.
    """
    if int(n_permutations) < 1:
        raise ValueError(f"permutation_flag_rate: n_permutations must be >= 1, got {n_permutations}")
    if test not in TESTS:
        raise ValueError(f"unknown divergence test {test!r}; choose one of {list(TESTS)}")
    _, s, _, members = _mined(table, scores, min_support, max_length, min_count)
    keys = _membership_keys(members)
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(int(n_permutations)):
        perm = rng.permutation(s)
        div, t, _, q = _p_and_q(members, perm, test, int(min_count), keys)
        flag = superiority(members, perm)[0] < 0.5 if EFFECT_COLUMNS[test] == "ps" else div < 0
        if fdr is not None:
            with np.errstate(invalid="ignore"):
                flag &= q <= float(fdr)
        if t_min > 0:
            with np.errstate(invalid="ignore"):
                flag &= np.abs(t) >= t_min
        flagged += bool(flag.any())
    return flagged / int(n_permutations)


def _check_itemsets(itemsets: pd.DataFrame) -> None:
    missing = [c for c in ("items", "divergence") if c not in itemsets.columns]
    if missing:
        raise ValueError(f"itemsets frame lacks columns {missing}; pass the result of divergent_itemsets()")


def _divergence_by_items(itemsets: pd.DataFrame) -> dict[frozenset[str], float]:
    d = {frozenset(i): float(v) for i, v in zip(itemsets["items"], itemsets["divergence"], strict=True)}
    d[frozenset()] = 0.0  # Δ of the whole data set is 0 by definition
    return d


def prune_redundant(itemsets: pd.DataFrame, epsilon: float = 0.01, mode: str = "redundant") -> pd.DataFrame:
    """Drop itemsets that an item-smaller itemset already explains.

    ``mode="redundant"`` (DivExplorer's redundancy pruning): I is dropped when removing some item i barely
    changes its divergence, |Δ(I) − Δ(I ∖ {i})| ≤ ε. With Δ(∅) = 0 this also drops single items with |Δ| ≤ ε.
    ``mode="worse"``: I is kept only when it is clearly *worse* than every sub-itemset with one item fewer,
    Δ(I) < Δ(I ∖ {i}) − ε for every i (single items: Δ(I) < −ε): each of its items adds to the failure. This
    is the reading for a list of under-performing subgroups, where a refinement that is no worse than its
    parent (or better) only repeats it. Needs the full result of :func:`divergent_itemsets` (every
    sub-itemset present); the order of the remaining rows is kept.
    """
    _check_itemsets(itemsets)
    if epsilon < 0:
        raise ValueError(f"epsilon must be ≥ 0, got {epsilon}")
    if mode not in ("redundant", "worse"):
        raise ValueError(f"mode must be 'redundant' or 'worse', got {mode!r}")
    div = _divergence_by_items(itemsets)
    keep = []
    for items in itemsets["items"]:
        items = frozenset(items)
        redundant = False
        for it in items:
            sub = items - {it}
            if sub not in div:
                raise ValueError(
                    f"sub-itemset {itemset_label(sub)!r} of {itemset_label(items)!r} is missing; prune the "
                    f"unfiltered result of divergent_itemsets()"
                )
            if mode == "redundant" and abs(div[items] - div[sub]) <= epsilon:
                redundant = True
                break
            if mode == "worse" and not div[items] < div[sub] - epsilon:
                redundant = True
                break
        keep.append(not redundant)
    return itemsets[np.array(keep, dtype=bool)]


def shapley_contributions(itemsets: pd.DataFrame, itemset: str | Iterable[str]) -> pd.Series:
    """Each item's Shapley contribution to the divergence of one itemset (DivExplorer's formula).

    ``itemset`` is a label (``a=x ∧ b=y``) or an iterable of items. The contributions sum to Δ(itemset)
    (Δ(∅) = 0). Needs every sub-itemset in ``itemsets`` (the unpruned result of
    :func:`divergent_itemsets`). Returns a Series indexed by item, most negative first.
    """
    from divexplorer import compute_shapley_value

    _check_itemsets(itemsets)
    items = _as_items(itemset)
    div = _divergence_by_items(itemsets)
    if items not in div or not items:
        raise ValueError(f"itemset {itemset_label(items)!r} is not among the analysed itemsets")
    by_len: dict[int, dict[frozenset[str], float]] = {}
    for k, v in div.items():
        by_len.setdefault(len(k), {})[k] = v
    for r in range(len(items)):
        # every subset must be there; compute_shapley_value would raise a bare KeyError otherwise
        from itertools import combinations

        for sub in combinations(sorted(items), r):
            if frozenset(sub) not in div:
                raise ValueError(
                    f"sub-itemset {itemset_label(sub)!r} is missing; use the unpruned divergent_itemsets() result"
                )
    values = compute_shapley_value(items, by_len)
    attrs = itemsets.attrs.get("attributes") or []
    order = sorted(items, key=lambda it: _item_key(it, {a: i for i, a in enumerate(attrs)}))
    out = pd.Series({it: float(values[frozenset([it])]) for it in order}, name="shapley", dtype=float)
    out.index.name = "item"
    return out.sort_values(kind="mergesort")


# --------------------------------------------------------------------------------------------------------
# Per-case divergence
# --------------------------------------------------------------------------------------------------------


def statistic_column(itemsets: pd.DataFrame) -> str | None:
    """The column holding the itemsets' test statistic, found rather than assumed: the one named in
    ``itemsets.attrs["statistic"]``, else a known statistic column (``z_mw``, ``t_welch``, ``t_pooled``, the
    former ``t``), else the first numeric column between ``divergence`` and ``p`` that is not an effect."""
    cols = list(itemsets.columns)
    named = itemsets.attrs.get("statistic")
    if named in cols:
        return str(named)
    for c in (*dict.fromkeys(STAT_COLUMNS.values()), "t"):
        if c in cols:
            return c
    if "divergence" in cols and "p" in cols:
        between = [c for c in cols[cols.index("divergence") + 1:cols.index("p")] if not str(c).startswith("ps")]
        numeric = [c for c in between if pd.api.types.is_numeric_dtype(itemsets[c])]
        if numeric:
            return str(numeric[0])
    return None


def effect_column(itemsets: pd.DataFrame) -> str:
    """The column of the effect whose sign a flag is read against: ``attrs["effect"]`` when present, else
    ``ps`` when the frame has it (the rank test's), else ``divergence``."""
    named = itemsets.attrs.get("effect")
    if named in itemsets.columns:
        return str(named)
    return "ps" if "ps" in itemsets.columns else "divergence"


def is_worse(itemsets: pd.DataFrame) -> pd.Series:
    """Whether each itemset's effect (:func:`effect_column`) points at "worse than the other cases":
    ``ps`` < 0.5 (its cases lose more pairwise comparisons than they win) or Δ < 0 for a mean effect."""
    col = effect_column(itemsets)
    if col not in itemsets.columns:
        raise ValueError(f"the itemsets frame lacks its effect column {col!r}; pass a divergent_itemsets() result "
                         f"(it has {list(itemsets.columns)})")
    v = pd.to_numeric(itemsets[col], errors="coerce")
    return (v.lt(0.5) if col == "ps" else v.lt(0)).rename("worse")


def effect_gap(itemsets: pd.DataFrame) -> pd.Series:
    """How much worse each itemset is, on its effect's scale, positive = worse: 1 − 2·ps (the share of
    pairwise comparisons its cases lose minus the share they win, = −rank-biserial correlation, in [−1, 1])
    for the rank effect; −Δ (score units) for a mean effect."""
    col = effect_column(itemsets)
    v = pd.to_numeric(itemsets[col], errors="coerce")
    return (1.0 - 2.0 * v if col == "ps" else -v).rename("gap")


def _first_member(tab: pd.DataFrame, cand_items: list[frozenset[str]]) -> np.ndarray:
    """Per case of ``tab``, the index of the first itemset of ``cand_items`` it belongs to (-1: none)."""
    if not cand_items or not len(tab):
        return np.full(len(tab), -1)
    vocab = sorted({it for items in cand_items for it in items})
    needed = sorted({parse_item(it)[0] for it in vocab})
    absent = [a for a in needed if a not in tab.columns]
    if absent:
        raise ValueError(
            f"case_divergence: the table lacks attributes {absent} used by the itemsets; build it with "
            f"attribute_table(..., attributes={needed})"
        )
    # Cases with identical attribute values share a result: work on the distinct combinations.
    cols = _format_frame(tab[needed])
    combos, inverse = np.unique(cols.to_numpy(dtype=str), axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    col_pos = {a: j for j, a in enumerate(needed)}
    has_item = np.zeros((len(combos), len(vocab)), dtype=np.int32)
    for k, it in enumerate(vocab):
        a, v = parse_item(it)
        has_item[:, k] = combos[:, col_pos[a]] == v
    vpos = {it: k for k, it in enumerate(vocab)}
    incidence = np.zeros((len(vocab), len(cand_items)), dtype=np.int32)
    for j, items in enumerate(cand_items):
        incidence[[vpos[i] for i in items], j] = 1
    member = (has_item @ incidence) == incidence.sum(axis=0)  # combo contains every item of the itemset
    first = np.where(member.any(axis=1), np.argmax(member, axis=1), -1)  # candidates are ordered: worst first
    return first[inverse]


def case_divergence(table: pd.DataFrame, itemsets: pd.DataFrame, t_min: float = 0.0,
                    q_max: float | None = None, by: str = "divergence") -> pd.DataFrame:
    """Per case, the worst itemset it belongs to: the most negative divergence (``by="divergence"``, the
    paper's reading) or the largest effect gap (``by="effect"``, :func:`effect_gap`, the divaware rule: the
    itemset's own effect, the one its flag is read against).

    Cases are matched to itemsets by their attribute values, so ``table`` may hold any cases (training
    cases need not be in the analysed set; a value never seen in the analysis simply matches no item).

    Parameters
    ----------
    table
        Attribute table of the cases to score (index ``patient_id``); it must have every attribute used
        by ``itemsets``.
    itemsets
        Result of :func:`divergent_itemsets` (possibly pruned or filtered). The empty itemset, if
        present, is ignored: it would match everyone.
    t_min
        Only itemsets with |statistic| ≥ t_min count (:func:`statistic_column`); an undefined statistic (NaN)
        never passes a t_min > 0. ``t_min <= 0`` uses every itemset.
    q_max
        Only itemsets whose Benjamini–Hochberg ``q`` is ≤ q_max count (NaN, i.e. untested, never does);
        None: no such filter. This is the false-alarm control; ``t_min`` alone is none (about 80 itemsets
        are looked at, and several pass |t| ≥ 2 by chance in most analyses of pure noise).

    Returns
    -------
    DataFrame indexed by ``patient_id`` (table order) with ``divergence`` (Δ of the chosen itemset; 0 when
    none qualifies), ``gap`` (its :func:`effect_gap`, > 0; 0 when none) and ``worst_itemset`` (its label,
    "" when none). Qualifying itemsets: Δ < 0 (``by="divergence"``) or an effect pointing at "worse"
    (``by="effect"``, :func:`is_worse`), plus the filters above. Ties go to the higher |statistic|, then
    the shorter, then the alphabetically first label.
    """
    _check_itemsets(itemsets)
    if by not in ("divergence", "effect"):
        raise ValueError(f"case_divergence: by must be 'divergence' or 'effect', got {by!r}")
    ids = _ids_of(table, "case_divergence table")
    tab = table.set_axis(ids, axis=0).drop(columns=["patient_id"], errors="ignore")
    cand = itemsets[itemsets["items"].map(len) > 0]
    cand.attrs.update(itemsets.attrs)
    div = cand["divergence"].to_numpy(float)
    gap = effect_gap(cand).to_numpy(float) if by == "effect" else -div
    keep = np.array(is_worse(cand).to_numpy(bool)) if by == "effect" else div < 0
    stat = statistic_column(cand)
    if t_min > 0:
        if stat is None:
            raise ValueError("itemsets frame has no test-statistic column; needed for t_min > 0")
        with np.errstate(invalid="ignore"):
            keep &= np.abs(cand[stat].to_numpy(float)) >= t_min
    if q_max is not None:
        if "q" not in cand.columns:
            raise ValueError("itemsets frame has no 'q' column; needed for q_max (use divergent_itemsets())")
        with np.errstate(invalid="ignore"):
            keep &= cand["q"].to_numpy(float) <= float(q_max)
    cand, gap = cand[keep], gap[keep]
    if "label" in cand.columns:
        labels = cand["label"].astype(str).to_list()
    else:
        labels = [itemset_label(i, [str(a) for a in tab.columns]) for i in cand["items"]]
    # Deterministic preference among candidates: the worst (most negative Δ, or largest gap), then larger
    # |statistic|, shorter, label.
    t_abs = np.abs(cand[stat].to_numpy(float)) if stat is not None else np.zeros(len(cand))
    t_abs = np.nan_to_num(t_abs, nan=-1.0)
    worst_key = -gap if by == "effect" else cand["divergence"].to_numpy(float)
    order = np.lexsort((np.array(labels, dtype=object).astype(str), cand["items"].map(len).to_numpy(), -t_abs,
                        worst_key))
    cand_items = [frozenset(cand["items"].iloc[k]) for k in order]
    cand_div = cand["divergence"].to_numpy(float)[order]
    cand_gap = gap[order]
    cand_lab = [labels[k] for k in order]

    first = _first_member(tab, cand_items)  # per case: its worst candidate (-1: none)
    hit = first >= 0
    result_div = np.where(hit, cand_div[np.maximum(first, 0)] if len(cand_div) else 0.0, 0.0)
    result_gap = np.where(hit, cand_gap[np.maximum(first, 0)] if len(cand_gap) else 0.0, 0.0)
    result_lab = np.where(hit, np.array(cand_lab + [""], dtype=object)[first], "")
    out = pd.DataFrame({"divergence": result_div.astype(float), "gap": result_gap.astype(float),
                        "worst_itemset": result_lab}, index=ids)
    out["worst_itemset"] = out["worst_itemset"].astype(str)
    return out


def is_significant(frame: pd.DataFrame, fdr: float = 0.05) -> pd.Series:
    """Which itemsets are significant failures: ``q ≤ fdr`` and the test's effect pointing at "worse"
    (:func:`is_worse`: ps < 0.5 for the rank test, Δ < 0 for a mean test; a NaN q, an untested itemset, is
    not). So no significant row can show its effect in the opposite direction.

    The one definition of "significant" that the tables, figures, explorer and README use, and the rule by
    which the ``divaware`` strategy acts (its ``fdr``). ``frame`` is a :func:`divergent_itemsets` result.
    """
    missing = [c for c in ("q", effect_column(frame)) if c not in frame.columns]
    if missing:
        raise ValueError(f"is_significant: the itemsets frame lacks column(s) {missing}; pass a divergent_itemsets() "
                         f"result (it has {list(frame.columns)})")
    if not 0 < float(fdr) <= 1:
        raise ValueError(f"is_significant: fdr must be in (0, 1], got {fdr!r}")
    q = pd.to_numeric(frame["q"], errors="coerce")
    return (q.le(float(fdr)) & is_worse(frame)).rename("significant")


# --------------------------------------------------------------------------------------------------------
# Findings: the flagged subgroups a reader should see, refinements under their roots, overlaps marked
# --------------------------------------------------------------------------------------------------------

FINDING_COLUMNS: tuple[str, ...] = ("label", "count", "mean", "divergence", "ps", "ps_low", "ps_high", "p", "q",
                                    "root", "role", "explained_by", "p_vs_parent")
"""Columns of :func:`findings`."""

# An untested itemset (fewer than min_count cases) is listed as "too few cases to test" when its cases lose at
# least this much more often than they win against the others (effect gap 1 − 2·ps ≥ 0.5, i.e. ps ≤ 0.25).
UNTESTED_GAP = 0.5


def _lower_p(low: np.ndarray, high: np.ndarray) -> float:
    """One-sided Mann–Whitney p-value that ``low`` scores below ``high`` (NaN with < 2 cases on a side)."""
    from scipy import stats

    if low.size < 2 or high.size < 2:
        return float("nan")
    return float(stats.mannwhitneyu(low, high, alternative="less", method="asymptotic", use_continuity=True).pvalue)


def findings(itemsets: pd.DataFrame, table: pd.DataFrame, scores: pd.Series, fdr: float = 0.05) -> pd.DataFrame:
    """The flagged subgroups as findings: each refinement under the root subgroup that explains it, and a
    flag explained by its overlap with a more significant flagged subgroup marked as such.

    ``itemsets`` is a :func:`divergent_itemsets` result of ``table`` (the attribute table analysed) and
    ``scores`` (higher is better, as analysed). Among the flagged itemsets (:func:`is_significant`):

    * a **root** has no flagged proper sub-itemset; a **refinement** (e.g. ``0-40 ∧ pre ∧ density c`` under
      ``age_group=0-40``) is grouped under its most significant flagged root sub-itemset, and counts as a
      separate **finding** only if its cases score lower than the rest of its parent's cases (the most
      specific flagged sub-itemset; one-sided Mann–Whitney p ≤ ``fdr``, in ``p_vs_parent``; NaN when it
      holds the parent's very cases); otherwise its role is ``refinement``;
    * a root A is **explained by overlap** with a more significant root B (smaller q) that shares cases with
      it when A's cases outside B do not score lower than the cases outside both (same test, p > ``fdr``, or
      fewer than 2 such cases): ``menopause=pre`` flagged only because a third of it is the young, dense,
      failing group. Its role is ``overlap`` and ``explained_by`` names B.

    Returns :data:`FINDING_COLUMNS`, roots by q, each followed by its refinements (by q); ``root`` is the
    root's label (its own for a root).
    """
    flagged = itemsets[is_significant(itemsets, fdr).to_numpy()].copy()
    if flagged.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in FINDING_COLUMNS})
    tab, s = _aligned(table, scores)
    flagged = flagged.sort_values(["q", "length", "label"], kind="mergesort")
    items = [frozenset(i) for i in flagged["items"]]
    member = dict(zip(items, _members(tab, items), strict=True))
    q = dict(zip(items, flagged["q"].astype(float), strict=True))
    roots = [i for i in items if not any(j < i for j in items)]
    rows: dict[frozenset[str], dict[str, Any]] = {}
    for r in roots:
        rows[r] = {"root": r, "role": "finding", "explained_by": "", "p_vs_parent": float("nan")}
        for b in roots:
            if b is r or q[b] > q[r] or (q[b] == q[r] and roots.index(b) > roots.index(r)):
                continue
            if not (member[r] & member[b]).any():
                continue
            outside = ~(member[r] | member[b])
            p = _lower_p(s[member[r] & ~member[b]], s[outside])
            if not p <= fdr:
                rows[r].update(role="overlap", explained_by=itemset_label(b, list(tab.columns)))
                break
    for i in items:
        if i in rows:
            continue
        root = min((r for r in roots if r < i), key=lambda r: (q[r], len(r), itemset_label(r)))
        # its parent: the most specific flagged sub-itemset (then the most significant); a refinement holding
        # the very same cases as its parent (parent minus it: empty) adds nothing
        parent = min((j for j in items if j < i), key=lambda j: (-len(j), q[j], itemset_label(j)))
        p = _lower_p(s[member[i]], s[member[parent] & ~member[i]])
        rows[i] = {"root": root, "role": "finding" if p <= fdr else "refinement", "explained_by": "",
                   "p_vs_parent": p}
    attrs = list(tab.columns)
    out = flagged.assign(
        root=[itemset_label(rows[i]["root"], attrs) for i in items],
        role=[rows[i]["role"] for i in items], explained_by=[rows[i]["explained_by"] for i in items],
        p_vs_parent=[rows[i]["p_vs_parent"] for i in items])
    order = {r: k for k, r in enumerate(itemset_label(r, attrs) for r in roots)}
    out = out.assign(_root=out["root"].map(order), _self=(out["label"] != out["root"]).astype(int))
    out = out.sort_values(["_root", "_self", "q", "label"], kind="mergesort")
    cols = [c for c in FINDING_COLUMNS if c in out.columns]
    return out[cols].reset_index(drop=True)


def untested_gaps(itemsets: pd.DataFrame, gap: float = UNTESTED_GAP) -> pd.DataFrame:
    """Itemsets too small to test (q NaN: fewer than ``min_count`` cases) whose cases nonetheless score far
    below the others (:func:`effect_gap` ≥ ``gap``): "too few cases to test (n < min_count)", not "fine".
    Refinements of a flagged itemset are left out (they are part of its finding). Largest gap first; columns ``label``, ``count``, ``mean``, ``divergence``, ``ps``."""
    untested = pd.to_numeric(itemsets["q"], errors="coerce").isna()
    big = untested & effect_gap(itemsets).ge(gap)
    # one that refines a flagged subgroup is already part of that finding
    flagged = [frozenset(i) for i in itemsets.loc[is_significant(itemsets), "items"]]
    big &= ~itemsets["items"].map(lambda i: any(f <= frozenset(i) for f in flagged)).astype(bool)
    cols = [c for c in ("label", "count", "mean", "divergence", "ps") if c in itemsets.columns]
    out = itemsets.loc[big, cols].copy()
    out = out.assign(_g=effect_gap(itemsets)[big]).sort_values(["_g", "label"], ascending=[False, True])
    return out.drop(columns="_g").reset_index(drop=True)


def with_findings(itemsets: pd.DataFrame, table: pd.DataFrame, scores: pd.Series, fdr: float = 0.05) -> pd.DataFrame:
    """``itemsets`` with the :func:`findings` columns ``root``, ``role``, ``explained_by`` (strings, "" for an
    itemset that is not flagged) and ``p_vs_parent``, so a table written to CSV keeps them; order and attrs kept."""
    found = findings(itemsets, table, scores, fdr).set_index("label")
    out = itemsets.copy()
    for c, fill in (("root", ""), ("role", ""), ("explained_by", ""), ("p_vs_parent", float("nan"))):
        out[c] = out["label"].map(found[c]).fillna(fill) if len(found) else fill
    out.attrs.update(itemsets.attrs)
    return out


def findings_order(divergent: pd.DataFrame) -> pd.DataFrame:
    """The flagged rows of a :func:`with_findings` table in reading order: roots by q, each followed by its
    refinements by q (rows without a ``role`` are left out)."""
    if "role" not in divergent.columns:
        return divergent.iloc[0:0]
    rows = divergent[divergent["role"].fillna("").astype(str) != ""]
    q_root = rows[rows["label"] == rows["root"]].set_index("label")["q"]
    keys = pd.DataFrame({"r": rows["root"].map(q_root), "root": rows["root"], "self": rows["label"] != rows["root"],
                         "q": rows["q"], "label": rows["label"]})
    return rows.loc[keys.sort_values(["r", "root", "self", "q", "label"], kind="mergesort").index]
