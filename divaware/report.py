"""One fairness report: per-case scores in, one set of analysis settings, one report out.

:class:`FairnessReport` is what :func:`divaware.evaluate.evaluate` (a run's model on a split) and
:func:`divaware.audit.audit` (any model's predictions) both compute from their per-case scores, in the manner
of fairlearn's ``MetricFrame``: overall scores and the challenge's P/F, per-group tables with n and bootstrap
CIs, the worst group and the gaps per attribute, and the divergent subgroups
(:func:`divaware.subgroups.divergent_itemsets` as it is, with the ``flagged`` column of
:func:`divaware.subgroups.is_significant`). :class:`AnalysisSettings` holds the one set of analysis settings,
taken from the ``divaware`` strategy's defaults, so a report flags what training would act on.

:class:`ReportFolder` is the layout of the folder a report is written to (beside
:class:`divaware.runfolder.RunFolder`): the file names live here and nowhere else, and each file has one
meaning whichever command wrote it (``divergent_itemsets.csv``: the itemsets of this analysis, ``flagged``
included, in an evaluation and an audit alike).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from divaware import metrics as M
from divaware.metrics import DEFAULT_ATTRIBUTES
from divaware.runfolder import write_text

ANALYSIS_KEYS = ("min_support", "max_length", "fdr", "min_count")
"""The subgroup-analysis parameters shared with the ``divaware`` strategy."""


def analysis_defaults() -> dict[str, Any]:
    """The ``divaware`` strategy's subgroup-analysis defaults (min_support, max_length, fdr, min_count),
    read from its signature so reports and training can never drift apart."""
    from divaware.weighting import DivawareWeighting

    params = inspect.signature(DivawareWeighting.__init__).parameters
    return {k: params[k].default for k in ANALYSIS_KEYS}


@dataclass(frozen=True)
class AnalysisSettings:
    """The settings of one fairness analysis. Build with :meth:`from_strategy` (the strategy's defaults
    for the subgroup analysis, overridden where given)."""

    attributes: tuple[str, ...]
    min_support: float
    max_length: int | None
    fdr: float
    min_count: int
    n_boot: int = 2000
    seed: int = 0  # of the group CIs' bootstrap
    min_group_size: int = 1  # groups smaller than this are left out of the fairness figures (not the tables)

    @classmethod
    def from_strategy(cls, attributes: tuple[str, ...] | list[str] | None = None, **overrides: Any) -> AnalysisSettings:
        """The strategy's analysis defaults, with ``overrides`` where not None; unknown names raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown analysis setting(s) {unknown}; valid: {sorted(known)}")
        values = {**analysis_defaults(), **{k: v for k, v in overrides.items() if v is not None}}
        attributes = tuple(DEFAULT_ATTRIBUTES if attributes is None else attributes)
        if not attributes:
            raise ValueError("attributes: give at least one metadata column")
        return cls(attributes=attributes, **values)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "attributes": list(self.attributes)}


def worst_group(fairness: Mapping[str, Mapping[str, Any]], per_group: pd.DataFrame) -> dict[str, Any] | None:
    """The group with the lowest mean Dice over the attributes of ``fairness`` (per attribute, the challenge's
    worst group), with its size from ``per_group``: ``attribute, group, dice, n``; None when there is none."""
    best: dict[str, Any] | None = None
    for attr, fs in fairness.items():
        value = fs.get("worst_group")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or value < best["dice"]:
            best = {"attribute": attr, "group": fs["worst_group_label"], "dice": float(value)}
    if best is not None:
        g = per_group
        row = g[(g["attribute"] == best["attribute"]) & (g["group"].astype(str) == str(best["group"]))]
        best["n"] = int(row["n"].iloc[0]) if len(row) else None
    return best


@dataclass
class FairnessReport:
    """Overall, per-group (with n), worst-group, gaps and divergent subgroups of one set of per-case scores."""

    per_case: pd.DataFrame
    """Index patient_id; ``dice`` (and the other metrics), and the attribute columns."""
    per_group: pd.DataFrame
    """One row per (attribute, group): n, mean Dice with its bootstrap CI, gap to overall, ..."""
    challenge: dict[str, Any]
    """:func:`divaware.metrics.challenge_score`: P, F_age, F_menopause, F_density, F, ranking, means."""
    fairness: dict[str, dict[str, Any]]
    """Per attribute: :func:`divaware.metrics.fairness_summary` (worst/best group, gap, ES-Dice)."""
    divergent: pd.DataFrame
    """:func:`divaware.subgroups.divergent_itemsets` of the per-case Dice, as it is, plus ``flagged``."""
    settings: AnalysisSettings = field(default_factory=AnalysisSettings.from_strategy)

    @classmethod
    def from_scores(cls, per_case: pd.DataFrame, settings: AnalysisSettings) -> FairnessReport:
        """The report of ``per_case`` (it carries the attribute columns: its own metadata, so no second
        lookup can disagree)."""
        from divaware import subgroups  # lazily: the analysis pulls in DivExplorer

        attributes = list(settings.attributes)
        missing = [a for a in (*attributes, "dice") if a not in per_case.columns]
        if missing:
            raise ValueError(f"per-case scores lack column(s) {missing}; they have {list(per_case.columns)}")
        frames = []
        for attr in attributes:
            t = M.group_table(per_case, per_case, attr, metric="dice", n_boot=settings.n_boot, seed=settings.seed)
            frames.append(t.drop(columns=[attr]).assign(attribute=attr)[["attribute", *t.columns.drop(attr)]])
        per_group = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        fairness = {attr: M.fairness_summary(per_case, per_case, attr, metric="dice", min_n=settings.min_group_size,
                                             drop_unknown=not M.counts_unknown(attr)) for attr in attributes}
        table = subgroups.attribute_table(per_case[attributes], attributes)
        divergent = subgroups.divergent_itemsets(table, per_case["dice"].astype(float),
                                                 min_support=settings.min_support, max_length=settings.max_length,
                                                 min_count=settings.min_count)
        divergent["flagged"] = subgroups.is_significant(divergent, settings.fdr)  # the rule divaware acts on
        # the finding columns of issue 27 (root, role, explained_by), carried as they are
        divergent = subgroups.with_findings(divergent, table, per_case["dice"].astype(float), settings.fdr)
        return cls(per_case, per_group, M.challenge_score(per_case, per_case), fairness, divergent, settings)

    # -- what a reader asks of it ---------------------------------------------------------------------------
    def overall(self) -> dict[str, Any]:
        """n, mean Dice and the challenge's P, F and ranking."""
        c = self.challenge
        return {"n": len(self.per_case), "mean_dice": float(self.per_case["dice"].mean()),
                **{k: c.get(k) for k in ("P", "F", "ranking")}}

    def worst_group(self) -> dict[str, Any] | None:
        """The group (as the challenge counts them) with the lowest mean Dice over all attributes:
        ``attribute, group, dice, n``; None when no attribute has a group."""
        return worst_group(self.fairness, self.per_group)

    def gaps(self) -> dict[str, float]:
        """Per attribute: the max − min gap of group mean Dice (the groups the challenge counts)."""
        return {attr: float(fs["gap"]) if fs.get("gap") is not None else math.nan for attr, fs in self.fairness.items()}

    @property
    def flagged(self) -> pd.DataFrame:
        """The divergent subgroups that pass the false-discovery control (what the strategy acts on)."""
        return self.divergent[self.divergent["flagged"].astype(bool)].reset_index(drop=True)


def itemsets_csv(frame: pd.DataFrame) -> str:
    """An itemset table as CSV text, its ``items`` as sorted JSON lists (frozensets do not survive CSV, and a
    frozenset's own text follows string hashing, so two identical runs would write different bytes)."""
    out = frame.copy()
    if "items" in out.columns:
        out["items"] = out["items"].map(lambda s: json.dumps(sorted(s), ensure_ascii=False))
    return out.to_csv(index=False)


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf as None, numpy scalars as Python numbers, paths as text (strict JSON)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


class ReportFolder:
    """The layout of a folder holding one fairness report; ``kind`` names its manifest (``evaluation.json``,
    ``audit.json``), written last so that its presence marks a complete report."""

    PER_CASE = "per_case.csv"
    PER_GROUP = "per_group.csv"
    CHALLENGE = "challenge.json"
    FAIRNESS = "fairness.json"
    ITEMSETS = "divergent_itemsets.csv"
    NULL_CHECK = "null_check.csv"
    AUDIT_MD = "audit.md"
    PREDICTIONS = "predictions.json"
    FIGURES = "figures"
    MANIFESTS = {"evaluation": "evaluation.json", "audit": "audit.json"}

    def __init__(self, path: str | Path, kind: str) -> None:
        if kind not in self.MANIFESTS:
            raise ValueError(f"report kind must be one of {sorted(self.MANIFESTS)}, got {kind!r}")
        self.path, self.kind = Path(path).expanduser(), kind

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFESTS[self.kind]

    def file(self, name: str) -> Path:
        return self.path / name

    def files(self) -> dict[str, str]:
        """Key -> file name, as the former ``FILES`` tables of evaluate and audit."""
        return {"per_case": self.PER_CASE, "per_group": self.PER_GROUP, "challenge": self.CHALLENGE,
                "fairness": self.FAIRNESS, "divergent": self.ITEMSETS, "manifest": self.MANIFESTS[self.kind],
                **({"null": self.NULL_CHECK, "report": self.AUDIT_MD} if self.kind == "audit"
                   else {"predictions": self.PREDICTIONS})}

    def is_complete(self) -> bool:
        return self.manifest.is_file()

    # -- writing ------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Make the folder and remove the manifest: absent until the new report is complete."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest.unlink(missing_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        """Write one file atomically (a reader never sees a half-written file)."""
        return write_text(self.path / name, text)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def write_report(self, report: FairnessReport) -> None:
        """The report's tables (not the manifest: :meth:`finish` writes it last)."""
        self.write_text(self.PER_CASE, report.per_case.to_csv())
        self.write_text(self.PER_GROUP, report.per_group.to_csv(index=False))
        self.write_json(self.CHALLENGE, report.challenge)
        self.write_json(self.FAIRNESS, report.fairness)
        self.write_text(self.ITEMSETS, itemsets_csv(report.divergent))

    def finish(self, manifest: Mapping[str, Any]) -> None:
        self.write_json(self.MANIFESTS[self.kind], manifest)

    # -- reading ------------------------------------------------------------------------------------------
    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def read_manifest(self) -> dict[str, Any]:
        if not self.is_complete():
            raise ValueError(f"{self.path} holds no complete {self.kind} (no {self.manifest.name})")
        return self.read_json(self.manifest.name)

    def read_per_case(self, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
        """per_case.csv, index patient_id (read as text, as ``text_columns``: "0-40" stays a label)."""
        table = pd.read_csv(self.path / self.PER_CASE, dtype={"patient_id": str, **{a: "object" for a in text_columns}})
        return table.set_index("patient_id")

    def read_itemsets(self) -> pd.DataFrame:
        divergent = pd.read_csv(self.path / self.ITEMSETS)
        if "items" in divergent.columns:
            divergent["items"] = divergent["items"].map(lambda s: frozenset(json.loads(s)))
        if "flagged" in divergent.columns:
            divergent["flagged"] = divergent["flagged"].astype(bool)
        for c in ("root", "role", "explained_by"):  # text columns whose empty cells CSV reads back as NaN
            if c in divergent.columns:
                divergent[c] = divergent[c].fillna("").astype(str)
        return divergent

    def read_report(self, text_columns: tuple[str, ...] = ()) -> FairnessReport:
        """The report written here (NaN where the JSON holds null); settings from the manifest."""
        manifest = self.read_manifest()
        challenge = self.read_json(self.CHALLENGE)
        for key in ("P", "F_age", "F_menopause", "F_density", "F", "ranking", "mean_dice", "mean_norm_hd",
                    "mean_hd95_mm"):
            if key in challenge and challenge[key] is None:
                challenge[key] = math.nan
        fairness = {a: {k: (math.nan if v is None and not k.endswith("label") else v) for k, v in fs.items()}
                    for a, fs in self.read_json(self.FAIRNESS).items()}
        keys = {f.name for f in dataclasses.fields(AnalysisSettings)} - {"attributes"}
        settings = AnalysisSettings.from_strategy(manifest.get("attributes"),
                                                  **{k: manifest[k] for k in keys if k in manifest})
        return FairnessReport(self.read_per_case(text_columns), pd.read_csv(self.path / self.PER_GROUP,
                                                                          dtype={"group": str}),
                              challenge, fairness, self.read_itemsets(), settings)
