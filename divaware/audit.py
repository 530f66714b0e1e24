"""Audit any model: where does a folder of predictions, made by any tool, fail — and for whom?

``audit(data_root, predictions, split="test", out_dir=...)`` scores a folder of predictions against the
cohort's expert masks without a divaware run (no ``config.yaml``, no checkpoint, and no torch: this module
and ``divaware audit`` never import it), then runs the same fairness analysis as the notebooks:

* per case (``per_case.csv``): Dice, HD95 in voxels and mm, the challenge's NormHD (HD95 / 150 voxels),
  volumes, the group attributes, ``prediction_file`` and ``missing``;
* the MAMA-MIA Task-1 score (``challenge.json``: P, F_age, F_menopause, F_density, F, ranking);
* per-group tables with n and seeded 95 % bootstrap CIs (``per_group.csv``) and the fairness summary
  (``fairness.json``), exactly as :func:`divaware.evaluate.evaluate` writes them;
* divergent subgroups (``divergent_itemsets.csv``): :func:`divaware.subgroups.divergent_itemsets` of the
  per-case Dice with the ``divaware`` strategy's defaults (``min_support``, ``max_length``) and its
  false-discovery control: an itemset is *flagged* (``flagged`` column) when its Benjamini–Hochberg q ≤ ``fdr``
  and its effect ps < 0.5 (:func:`divaware.subgroups.is_significant`) — the itemsets the ``divaware`` strategy
  would act on; ``root``/``role``/``explained_by`` (:func:`divaware.subgroups.with_findings`) group refinements
  under their root and mark overlaps; ``audit.md`` lists them as findings (:func:`findings_markdown`);
* the null check (``null_check.csv``): :func:`divaware.calibration.null_check`, the same analysis on
  permuted Dice, i.e. how often noise alone flags something on this many cases;
* the figures notebook 04 makes (``figures/``): Dice by group with CIs, the age × density heatmap, the
  divergent itemsets and the hardest cases (truth green, prediction red);
* ``audit.json`` (settings, counts, the missing and unmatched files), written last: its presence marks a
  complete audit.

Matching follows the organisers' convention: the prediction of a case is ``<patient_id>.nii.gz`` (or
``.nii``), case-insensitive (``duke_001.nii.gz`` and ``DUKE_001.nii.gz`` both match ``DUKE_001``); a folder
holding ``pred_segmentations/`` (the challenge's submission layout) is read from there, and one holding both
prediction files and such a subfolder is refused (which of the two is the model's is not ours to guess).
Many missing cases beside files that match no case is a naming mismatch, refused with the look-alike names;
a folder with no prediction at all is described (``.npy`` files, ``.NII.GZ``, ``_0000`` inputs, subfolders).
Probability maps are refused with the ``>= 0.5`` hint unless ``threshold`` (``--threshold``) is given.
``attributes`` may name ``acquisition`` (:data:`ACQUISITION`) or add to the defaults with ``+``. nnU-Net v2 names
its predictions ``<case_identifier>.nii.gz`` (no ``_0000`` channel suffix, that is for inputs) and writes
``dataset.json``/``plans.json``/``*.npz`` beside them, which are ignored; with the patient id as case
identifier (as :func:`divaware.nnunet.to_nnunet_raw` writes) its output folder is audited as it is.

Checks, each a one-line error naming the file: two files for one case (``DUKE_001.nii.gz`` and
``duke_001.nii.gz``), a prediction whose shape or affine differs from the expert mask's, labels other than
0/1 (the organisers count label 1 only, so a 0/255 mask would score as empty: write 0/1 masks). A case of
the split without a prediction is listed (``audit.json`` ``missing``, ``per_case.csv`` ``missing``) and
scored as the organisers score it, as an empty prediction: Dice 0, NormHD 1, HD95 infinite (mm: NaN).
Prediction files that match no case of the split are listed as ``unmatched``.

Nothing is written into the data folder or the predictions folder (an error if ``out_dir`` lies inside
either). The voxel checks of the cohort (those of ``divaware check``) are cached in ``out_dir/cache``.

:func:`audit_weights` turns an audit into per-case training weights with the ``divaware`` strategy itself
(``divaware weights``); :func:`explorer_inputs` adapts an audit to :func:`divaware.widgets.subgroup_explorer`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from divaware import evaluate as ev
from divaware import metrics as M
from divaware.report import AnalysisSettings, FairnessReport, ReportFolder, analysis_defaults  # noqa: F401
from divaware.runfolder import write_text

if TYPE_CHECKING:
    from divaware.cohort import Case, Cohort

__all__ = [
    "FILES", "ACQUISITION", "AuditResult", "audit", "load_audit", "match_predictions", "check_predictions",
    "describe_folder", "naming_mismatch", "expand_attributes",
    "analysis_defaults", "demo_predictions", "audit_weights", "write_weights", "run_weights", "explorer_inputs", "read_ids",
    "finding_lines", "findings_markdown",
]

FILES = ReportFolder(".", "audit").files()
"""Key -> file name of an audit folder (the names live in :class:`divaware.report.ReportFolder`)."""
FIGURES = ReportFolder.FIGURES
FIGURE_PATTERNS = ("group_dice_*.png", "heatmap.png", "divergent_itemsets.png", "hardest_cases.png")
"""The figures :func:`write_figures` writes: an earlier audit's are removed before a new one starts."""
ACQUISITION = ("dataset", "manufacturer", "field_strength")
"""The acquisition attributes (collection, scanner manufacturer, field strength): a failure tied to one
collection or scanner shows only when they are analysed. ``--attributes +acquisition`` adds them."""
ATTRIBUTE_GROUPS = {"acquisition": ACQUISITION}


def expand_attributes(names: Sequence[str]) -> tuple[str, ...]:
    """The metadata columns ``names`` stand for: a column, a group of :data:`ATTRIBUTE_GROUPS`
    (``acquisition``), and, when any name starts with ``+``, the default attributes first
    (``+acquisition`` = age_group, menopause, breast_density and the acquisition attributes)."""
    names = [str(n).strip() for n in names if str(n).strip()]
    out: list[str] = list(ev.DEFAULT_ATTRIBUTES) if any(n.startswith("+") for n in names) else []
    for n in names:
        bare = n.lstrip("+")
        out += ATTRIBUTE_GROUPS.get(bare, (bare,))
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------
# cases and predictions
# --------------------------------------------------------------------------------------------------


def read_ids(path: str | Path) -> list[str]:
    """Patient ids from a text file (one per line; ``#`` comments) or a CSV with a ``patient_id`` column."""
    p = Path(path).expanduser()
    text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is not part of the first id
    if p.suffix.lower() == ".csv":
        from io import StringIO

        table = pd.read_csv(StringIO(text), dtype=str)
        if "patient_id" not in table.columns:
            raise ValueError(f"ids file {p} has no 'patient_id' column; give one, or a text file of one id per line")
        ids = table["patient_id"].dropna().str.strip().tolist()
    else:
        ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"ids file {p} names no patient ids")
    return list(dict.fromkeys(ids))


def _split_ids(cohort: Cohort, split: str) -> tuple[list[str], str]:
    """(ids of ``split``, its name): test/train/all, or a file of ids (matched case-insensitively)."""
    if split in ("test", "train"):
        return list(cohort.ids(split)), split
    if split == "all":
        return list(cohort.ids(None)), "all"
    path = Path(split).expanduser()
    if not path.is_file():
        raise ValueError(f"split {split!r} is neither test, train, all nor an ids file")
    by_lower = {i.lower(): i for i in cohort.metadata.index.astype(str)}
    wanted = read_ids(path)
    unknown = [i for i in wanted if i.lower() not in by_lower]
    if unknown:
        raise ValueError(f"ids file {path}: case(s) {M.few(unknown)} are not in the cohort at {cohort.root}")
    ids = [by_lower[i.lower()] for i in wanted]
    excluded = [i for i in ids if i not in cohort.cases]
    if excluded:
        warnings.warn(f"ids file {path}: case(s) {M.few(excluded)} were excluded by the cohort checks "
                      "(see the warning above) and are not audited", stacklevel=3)
    return [i for i in ids if i in cohort.cases], path.stem


def match_predictions(folder: str | Path, ids: Sequence[str],
                      known: Sequence[str] = ()) -> tuple[dict[str, Path], list[str], list[str]]:
    """Match ``<patient_id>.nii[.gz]`` files (case-insensitive) to ``ids``.

    Returns ``(matched {id: file}, missing ids, unmatched file names)``: unmatched files are those of no id
    in ``ids`` or ``known`` (e.g. the cohort's other cases, whose predictions are simply not audited). Two
    files for one id (differing in case or extension) raise ValueError naming both.
    """
    folder = Path(folder)
    seen: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii"))):
            continue
        stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]
        key = stem.lower()
        if key in seen:
            raise ValueError(f"{folder}: {seen[key].name} and {p.name} are both a prediction of case {stem}; "
                             "keep one")
        seen[key] = p
    wanted = {str(i).lower(): str(i) for i in ids}
    matched = {wanted[k]: p for k, p in seen.items() if k in wanted}
    missing = [str(i) for i in ids if str(i).lower() not in seen]
    others = {str(i).lower() for i in known}
    unmatched = sorted(p.name for k, p in seen.items() if k not in wanted and k not in others)
    return {str(i): matched[str(i)] for i in ids if str(i) in matched}, missing, unmatched


def describe_folder(folder: Path, limit: int = 4) -> str:
    """What a folder holds, by kind, with what each kind needs (for an error that found no prediction)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        return "it is empty"
    kinds: dict[str, list[str]] = {}
    for p in entries:
        low = p.name.lower()
        if p.is_dir():
            kind = "subfolder"
        elif low.endswith((".nii.gz", ".nii")):
            ext = p.name[-7:] if low.endswith(".nii.gz") else p.name[-4:]
            kind = "_0000 input" if low.removesuffix(".gz").removesuffix(".nii").endswith("_0000") else ext
        else:
            kind = Path(p.name).suffix or "(no extension)"
        kinds.setdefault(kind, []).append(p.name + ("/" if p.is_dir() else ""))
    hints = {
        "subfolder": "pass the subfolder that holds the predictions (e.g. an nnU-Net fold_0/)",
        "_0000 input": "<case>_0000.nii.gz is nnU-Net's name of an input channel; a prediction is <case>.nii.gz",
        ".npy": "NumPy arrays: save each as <patient_id>.nii.gz with the expert mask's affine",
        ".npz": "nnU-Net's probability files: score its .nii.gz segmentations instead",
    }
    parts = []
    for kind, names in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        hint = hints.get(kind) or ("rename the extension to lower case .nii.gz" if kind in (".NII.GZ", ".Nii.gz", ".NII")
                                   else "")
        label = f"{kind}s" if kind == "subfolder" else f"{kind} file(s)"
        parts.append(f"{len(names)} {label} ({M.few(names, limit)})" + (f": {hint}" if hint else ""))
    return "it holds " + "; ".join(parts)


def naming_mismatch(ids: Sequence[str], missing: Sequence[str], unmatched: Sequence[str]) -> str | None:
    """An error message when many cases lack a prediction while files match no case: a naming mismatch
    (scored as empty predictions it would read as a bad model), with the files that look like the missing
    cases under another name; None when the counts do not suggest one."""
    if not unmatched or len(missing) < max(2, 0.2 * len(ids)):
        return None
    guesses = []
    for name in unmatched:
        stem = name.lower().removesuffix(".gz").removesuffix(".nii")
        hit = next((m for m in missing if m.lower() in stem or (len(stem) > 3 and stem in m.lower())), None)
        if hit is not None:
            guesses.append(f"{name} ~ {hit}")
    looks = f"; these look like missing cases under another name: {M.few(guesses, 4)}" if guesses else ""
    return (f"{len(missing)} of {len(ids)} cases have no prediction while {len(unmatched)} prediction file(s) match "
            f"no case of the cohort ({M.few(unmatched, 4)}){looks}. Predictions are matched by name: "
            f"<patient_id>.nii.gz, case-insensitive (e.g. {missing[0]}.nii.gz); rename the files, or audit the "
            "cases you predicted with --split <ids file>")


def check_predictions(matched: dict[str, Path], cohort: Cohort, threshold: float | None = None) -> None:
    """Each prediction must lie on its expert mask's voxel grid (shape and affine) and hold only 0 and 1
    (any finite values with ``threshold``: probability maps).

    Raises ValueError on the first offending file, naming it, what was found and what to do.
    """
    import nibabel as nib

    for pid, path in matched.items():
        mask = nib.load(str(cohort.cases[pid].mask_path))
        try:
            pred = nib.load(str(path))
            arr = np.asanyarray(pred.dataobj)
        except Exception as err:
            raise ValueError(f"prediction {path} (case {pid}) cannot be read ({type(err).__name__}: {err}); "
                             "write it again") from None
        while arr.ndim > 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]  # a trailing singleton (X, Y, Z, 1) is still one 3D mask
        if arr.shape != tuple(mask.shape[:3]):
            raise ValueError(f"prediction {path} (case {pid}) has shape {arr.shape} but the expert mask has "
                             f"{tuple(mask.shape[:3])}; write predictions on the mask's voxel grid")
        if not np.allclose(pred.affine, mask.affine, atol=1e-3, rtol=0):
            raise ValueError(f"prediction {path} (case {pid}) has another affine than the expert mask "
                             f"{cohort.cases[pid].mask_path} (flipped or permuted axes, or a resampled grid); "
                             "write it with the mask's affine")
        values = np.unique(arr)
        if threshold is None and not np.isin(values, (0, 1)).all():
            shown = ", ".join(f"{v:g}" for v in values[:6].tolist())
            finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
            if np.issubdtype(values.dtype, np.floating) and finite.size and finite.min() >= 0 and finite.max() <= 1:
                # (pred > 0) on a probability map marks nearly every voxel: the hint must not lead there
                fix = ("they look like probabilities: pass --threshold 0.5 (threshold=0.5) to count p >= 0.5 as "
                       "tumour, or write (prob >= 0.5).astype(uint8)")
            else:
                fix = ("the organisers count label 1 only as tumour, so write binary 0/1 masks (e.g. "
                       "(labels == tumour_label).astype(uint8))")
            raise ValueError(f"prediction {path} (case {pid}) holds values {shown}; {fix}")


def _empty_prediction_metrics(case: Case) -> dict[str, float]:
    """How the organisers score a missing prediction: as an empty one (Dice 0, NormHD 1)."""
    truth, spacing, _ = ev.load_mask(Path(case.mask_path))
    return M.case_metrics(np.zeros(truth.shape, dtype=bool), truth > 0, spacing)


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """One audit: the tables, the scores and where they were written."""

    out_dir: Path
    data_root: Path
    predictions: Path
    split: str
    per_case: pd.DataFrame
    """Index patient_id; metric columns, attributes, ``prediction_file`` and ``missing``."""
    per_group: pd.DataFrame
    challenge: dict[str, Any]
    fairness: dict[str, dict[str, Any]]
    divergent: pd.DataFrame
    """:func:`divaware.subgroups.divergent_itemsets` of the per-case Dice, with a ``flagged`` column."""
    null: pd.DataFrame
    """:func:`divaware.calibration.null_check` (row 0 the real analysis, then permutations)."""
    settings: dict[str, Any] = field(default_factory=dict)
    report: FairnessReport | None = None
    """The fairness report these tables belong to (the one evaluate writes too)."""

    @property
    def flagged(self) -> pd.DataFrame:
        """The itemsets that pass the false-discovery control with ps < 0.5 (what ``divaware`` acts on)."""
        return self.divergent[self.divergent["flagged"]].reset_index(drop=True)

    @property
    def missing(self) -> list[str]:
        return list(self.settings.get("missing", []))

    def prediction_file(self, patient_id: str) -> Path | None:
        """The matched prediction of a case, None when it has none."""
        name = self.per_case.loc[patient_id, "prediction_file"] if patient_id in self.per_case.index else ""
        return self.predictions / name if isinstance(name, str) and name else None

    def summary(self) -> str:
        c, s = self.challenge, self.settings
        null = self.null.iloc[1:]
        lines = [
            f"audit of {self.predictions} on {self.split}: {len(self.per_case)} cases "
            f"({len(self.missing)} without a prediction, scored as empty)",
            ev.metric_line(c),
            f"  challenge: P {ev.score_text(c, 'P')}   F {ev.score_text(c, 'F')}   ranking {ev.score_text(c, 'ranking')}",
            *([f"  {len(s['unmatched'])} prediction file(s) match no case of the cohort (not scored): "
               f"{M.few(s['unmatched'], 5)}"] if s.get("unmatched") else []),
            f"  flagged subgroups (q <= {s.get('fdr')}, typically lower Dice than the other cases): {len(self.flagged)}",
            *finding_lines(self.divergent, int(s.get("min_count", 5))),
            f"  null check: noise alone flags something in {(null['fdr_flags'] > 0).mean():.0%} of "
            f"{len(null)} permutations",
            f"  written to {self.out_dir}",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------------
# rendering the findings (kept small and separate so a report object can take them over)
# --------------------------------------------------------------------------------------------------


def _finding_numbers(r: pd.Series, metric: str = "Dice") -> str:
    return (f"n={int(r['count'])}, mean {metric} {r['mean']:.3f}, Δ mean {r['divergence']:+.3f}, "
            f"ps {r['ps']:.2f} [{r['ps_low']:.2f}, {r['ps_high']:.2f}], p {r['p']:.2g}, q {r['q']:.2g}")


def _finding_tag(r: pd.Series) -> str:
    if r.get("role") == "overlap":
        return f" (explained by overlap with {r['explained_by']})"
    if r.get("role") == "refinement":
        return " (refinement: not significantly worse than the rest of its parent)"
    return ""


def finding_lines(divergent: pd.DataFrame, min_count: int = 5, metric: str = "Dice") -> list[str]:
    """Console lines of an analysis with :func:`divaware.subgroups.with_findings` columns: each root finding,
    its refinements indented under it, overlaps marked; then the untested subgroups with a large gap.
    ``ps``: the probability that a case of the subgroup scores better than one outside it (0.5: no difference)."""
    from divaware.subgroups import findings_order, untested_gaps

    lines = []
    for _, r in findings_order(divergent).iterrows():
        indent = "    " if r["label"] == r["root"] else "      └ "
        lines.append(f"{indent}{r['label']}: {_finding_numbers(r, metric)}{_finding_tag(r)}")
    small = untested_gaps(divergent)
    if len(small):
        lines.append(f"  too few cases to test (n < {min_count}), with a large gap:")
        lines += [f"    {r['label']}: n={int(r['count'])}, mean {metric} {r['mean']:.3f}, ps {r['ps']:.2f}"
                  for _, r in small.iterrows()]
    return lines


def findings_markdown(divergent: pd.DataFrame, min_count: int = 5, metric: str = "Dice") -> str:
    """The findings as a Markdown table (audit.md): subgroup (refinements under their root), role, n, mean,
    Δ mean, ps with its 95 % CI, p, q; then the untested subgroups with a large gap."""
    from divaware.subgroups import findings_order, untested_gaps

    rows = ["| subgroup | role | n | mean " + metric + " | Δ mean | ps [95 % CI] | p | q |",
            "|:---|:---|---:|---:|---:|:---:|---:|---:|"]
    for _, r in findings_order(divergent).iterrows():
        name = r["label"] if r["label"] == r["root"] else f"↳ {r['label']}"
        role = r["role"] + (f" with {r['explained_by']}" if r["role"] == "overlap" else "")
        rows.append(f"| {name} | {role} | {int(r['count'])} | {r['mean']:.3f} | {r['divergence']:+.3f} | "
                    f"{r['ps']:.2f} [{r['ps_low']:.2f}, {r['ps_high']:.2f}] | {r['p']:.2g} | {r['q']:.2g} |")
    text = "\n".join(rows) if len(rows) > 2 else "No subgroup is flagged."
    small = untested_gaps(divergent)
    if len(small):
        text += (f"\n\nToo few cases to test (n < {min_count}), with a large gap: "
                 + "; ".join(f"{r['label']} (n={int(r['count'])}, ps {r['ps']:.2f})" for _, r in small.iterrows()))
    return ("# Flagged subgroups\n\nps: the probability that a case of the subgroup scores better than a case "
            "outside it (0.5: no difference; the one-sided Mann–Whitney test behind p and q asks whether it is "
            "below 0.5). Δ mean: DivExplorer's divergence, mean in the subgroup − mean overall.\n\n" + text + "\n")


# --------------------------------------------------------------------------------------------------
# the audit
# --------------------------------------------------------------------------------------------------


def default_out_dir(predictions: str | Path, split: str) -> Path:
    """``<runs root>/audits/<predictions folder name>_<split>`` (see :func:`divaware.paths.resolve_output`)."""
    from divaware.paths import resolve_output

    folder = ev.prediction_folder(predictions)
    name = folder.parent.name if folder.name == ev.PRED_FOLDER else folder.name
    tag = split if split in ("test", "train", "all") else Path(split).stem
    return resolve_output(Path("audits") / f"{name}_{tag}")


def _score_predictions(cohort: Cohort, pred_dir: Path, ids: list[str], matched: dict[str, Path],
                       missing: list[str], attributes: Sequence[str], verbose: bool,
                       threshold: float | None = None) -> pd.DataFrame:
    """Per-case metrics of ``ids`` in order: the matched predictions scored, the missing ones as empty."""
    case_attrs = tuple(dict.fromkeys((*ev.CASE_ATTRIBUTES, *attributes)))
    scored = ev.score_cases(pred_dir, cohort, list(matched), attributes=case_attrs, progress=verbose,
                            threshold=threshold)
    meta = cohort.metadata
    empty = pd.DataFrame.from_dict({pid: _empty_prediction_metrics(cohort.cases[pid]) for pid in missing},
                                   orient="index", columns=list(M.PER_CASE_COLUMNS))
    for a in case_attrs:
        empty[a] = meta.loc[missing, a].to_numpy(dtype=object) if missing else []
    per_case = pd.concat([scored, empty]) if missing else scored
    per_case = per_case.loc[ids]
    per_case.index.name = "patient_id"
    per_case["prediction_file"] = [matched[i].name if i in matched else "" for i in ids]
    per_case["missing"] = [i not in matched for i in ids]
    return per_case


def _check_numbers(analysis: dict[str, Any], n_boot: int, n_permutations: int, threshold: float | None) -> None:
    """Every number of an audit checked before anything is scored (a bad --fdr once failed after scoring)."""
    checks = [
        ("fdr", analysis["fdr"], 0 < analysis["fdr"] <= 1, "a false-discovery rate in (0, 1], e.g. 0.05"),
        ("min_support", analysis["min_support"], 0 < analysis["min_support"] <= 1, "a fraction in (0, 1]"),
        ("max_length", analysis["max_length"], analysis["max_length"] >= 1, "a whole number >= 1"),
        ("n_boot", n_boot, int(n_boot) == n_boot and n_boot >= 1, "a whole number >= 1"),
        ("n_permutations", n_permutations, int(n_permutations) == n_permutations and n_permutations >= 0,
         "a whole number >= 0"),
    ]
    if threshold is not None:
        checks.append(("threshold", threshold, 0 < threshold <= 1, "a probability in (0, 1], e.g. 0.5"))
    for name, value, ok, want in checks:
        if not (np.isfinite(value) and ok):
            raise ValueError(f"{name} = {value!r}: give {want} (--{name.replace('_', '-')})")


def _remove_stale(out: Path) -> None:
    """An earlier audit's report in ``out`` goes before the new one starts (a re-audit with --no-figures
    once left the previous model's figures beside the new tables)."""
    (out / FILES["manifest"]).unlink(missing_ok=True)  # absent until the new report is complete
    for name in FILES.values():
        (out / name).unlink(missing_ok=True)
    for pattern in FIGURE_PATTERNS:
        for f in (out / FIGURES).glob(pattern):
            f.unlink(missing_ok=True)


def _check_matching(pred_dir: Path, ids: Sequence[str], missing: Sequence[str], unmatched: Sequence[str]) -> None:
    """A naming mismatch is an error (:func:`naming_mismatch`); missing cases and unmatched files are named."""
    mismatch = naming_mismatch(ids, missing, unmatched)
    if mismatch:
        raise ValueError(f"{pred_dir}: {mismatch}")
    if missing:
        warnings.warn(f"{len(missing)} of {len(ids)} case(s) have no prediction in {pred_dir} and are scored as "
                      f"empty predictions (Dice 0, NormHD 1), as the organisers do: {M.few(missing)}", stacklevel=3)
    if unmatched:
        warnings.warn(f"{len(unmatched)} prediction file(s) in {pred_dir} match no case of the cohort and are not "
                      f"scored: {M.few(unmatched)}", stacklevel=3)


def _audit_inputs(data_root: str | Path, predictions: str | Path, split: str, out_dir: str | Path | None,
                  attributes: Sequence[str], min_support: float | None, max_length: int | None,
                  fdr: float | None) -> tuple[Path, Path, Path, tuple[str, ...], dict[str, Any]]:
    """The audit's folders and settings, checked before anything is read or written."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist; pass the MAMA-MIA root (holding images/ and "
                         "clinical_and_imaging_info.xlsx)")
    pred_dir = ev.prediction_folder(predictions)
    out = Path(out_dir).expanduser() if out_dir else default_out_dir(pred_dir, split)
    for folder, what in ((root, "data"), (pred_dir, "predictions")):
        if ev.is_inside(out, folder):
            raise ValueError(f"output folder {out} lies inside the {what} folder {folder}; inputs are read-only, "
                             "so pass --out elsewhere")
    attributes = expand_attributes(attributes)
    if not attributes:
        raise ValueError("attributes: give at least one metadata column")
    defaults = analysis_defaults()
    analysis = {"min_support": defaults["min_support"] if min_support is None else float(min_support),
                "max_length": defaults["max_length"] if max_length is None else int(max_length),
                "fdr": defaults["fdr"] if fdr is None else float(fdr), "min_count": defaults["min_count"]}
    return root, pred_dir, out, attributes, analysis


def audit(
    data_root: str | Path,
    predictions: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    *,
    attributes: Sequence[str] = ev.DEFAULT_ATTRIBUTES,
    min_support: float | None = None,
    max_length: int | None = None,
    fdr: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    n_permutations: int = 50,
    figures: bool = True,
    verbose: bool = True,
    threshold: float | None = None,
) -> AuditResult:
    """Audit the predictions in ``predictions`` on ``split`` of the cohort at ``data_root`` (module docstring).

    ``split``: ``test``, ``train``, ``all`` or a file of patient ids (:func:`read_ids`). ``out_dir``: where
    the report goes (default :func:`default_out_dir`). ``attributes``: metadata columns of the per-group
    tables and the itemsets. ``min_support``/``max_length``/``fdr``: the subgroup analysis, by default the
    ``divaware`` strategy's (:func:`analysis_defaults`). ``n_boot``/``seed``: the group CIs' bootstrap and
    the null check's permutations (``n_permutations``). ``figures``: write the PNG figures. ``threshold``: the
    predictions are probability maps, tumour where p >= ``threshold``.
    """
    from divaware import calibration, subgroups
    from divaware.cohort import load_cohort

    root, pred_dir, out, attributes, analysis = _audit_inputs(data_root, predictions, split, out_dir, attributes,
                                                              min_support, max_length, fdr)
    _check_numbers(analysis, n_boot, n_permutations, threshold)

    from divaware.outputs import ensure_writable

    ensure_writable(out, "audit folder (--out)")  # read-only or full: one line now, not after scoring
    _remove_stale(out)
    folder = ReportFolder(out, "audit")
    folder.begin()  # the manifest is absent until the new report is complete
    cohort = load_cohort(root, voxel_cache=out / "cache" / "voxel_checks.json")
    missing_cols = [a for a in attributes if a not in cohort.metadata.columns]
    if missing_cols:
        raise ValueError(f"attribute column(s) {missing_cols} are not in the cohort metadata; it has "
                         f"{list(cohort.metadata.columns)}")
    ids, split_name = _split_ids(cohort, split)
    no_mask = [i for i in ids if cohort.cases[i].mask_path is None]
    ids = [i for i in ids if cohort.cases[i].mask_path is not None]
    if not ids:
        raise ValueError(f"split {split!r} of {root} has no case with an expert mask to audit")
    matched, missing, unmatched = match_predictions(pred_dir, ids, known=list(cohort.metadata.index.astype(str)))
    if not matched:
        raise ValueError(f"{pred_dir} holds no prediction for any of the {len(ids)} cases of split {split_name!r} "
                         f"(expected <patient_id>.nii.gz, e.g. {ids[0]}.nii.gz); {describe_folder(pred_dir)}")
    _check_matching(pred_dir, ids, missing, unmatched)
    check_predictions(matched, cohort, threshold)

    per_case = _score_predictions(cohort, pred_dir, ids, matched, missing, attributes, verbose, threshold)

    report = FairnessReport.from_scores(per_case, AnalysisSettings.from_strategy(
        attributes, **analysis, n_boot=n_boot, seed=seed, min_group_size=1))
    divergent = report.divergent
    table = subgroups.attribute_table(per_case[list(attributes)], list(attributes))
    dice = per_case["dice"].astype(float)
    null = calibration.null_check(table, dice, n_permutations=n_permutations, seed=seed,
                                  min_support=analysis["min_support"], max_length=analysis["max_length"],
                                  fdr=analysis["fdr"])

    from divaware import __version__

    permuted = null.iloc[1:]
    settings = {
        "divaware_version": __version__, "data_root": str(root.resolve()), "predictions": str(pred_dir.resolve()),
        "split": split_name, "split_arg": str(split), "n_cases": len(per_case), "n_predicted": len(matched),
        "missing": missing, "unmatched": unmatched, "no_mask": no_mask, "attributes": list(attributes),
        **analysis, "n_boot": n_boot, "seed": seed, "n_permutations": n_permutations, "threshold": threshold,
        "n_flagged": int(divergent["flagged"].sum()),
        "flagged": divergent.loc[divergent["flagged"], "label"].tolist(),
        "null_share_flagged": float((permuted["fdr_flags"] > 0).mean()),
        "missing_counted_as": "empty prediction: Dice 0, NormHD 1 (as the organisers)",
    }
    result = AuditResult(out_dir=out, data_root=root, predictions=pred_dir, split=split_name, per_case=per_case,
                         per_group=report.per_group, challenge=report.challenge, fairness=report.fairness,
                         divergent=divergent, null=null, settings=settings, report=report)
    _write_outputs(result, folder, cohort, figures)
    if verbose:
        print(result.summary())
    return result


def _write_outputs(result: AuditResult, folder: ReportFolder, cohort: Cohort, figures: bool) -> None:
    """The audit's tables, null check, audit.md and figures, then its manifest (written last: a complete audit)."""
    from divaware.outputs import output_error

    settings = result.settings
    folder.write_report(result.report)
    folder.write_text(folder.NULL_CHECK, result.null.to_csv(index=False))
    folder.write_text(folder.AUDIT_MD, findings_markdown(result.divergent, int(settings["min_count"])))
    if figures:
        try:
            settings["figures"] = [p.name for p in write_figures(result, cohort)]
        except OSError as err:  # a disk that fills while the figures are saved: one line naming it
            mapped = output_error(err, result.out_dir / FIGURES, "audit folder (--out)")
            if mapped is None:
                raise
            raise mapped from None
    folder.finish(settings)


def write_figures(result: AuditResult, cohort: Cohort, n_hardest: int = 3) -> list[Path]:
    """The figures notebook 04 makes, for one model, into ``<out_dir>/figures`` (:mod:`divaware.plots`)."""
    from divaware import plots
    from divaware.exploration import read_canonical

    folder = result.out_dir / FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    pc = result.per_case
    written = []
    overall = float(pc["dice"].mean())
    for attr in result.settings["attributes"]:
        path = folder / f"group_dice_{attr}.png"
        plots.plot_group_dice(result.per_group[result.per_group["attribute"] == attr].reset_index(drop=True),
                              overall=overall, title=f"Dice by {attr}", path=path)
        written.append(path)
    attrs = result.settings["attributes"]
    if "age_group" in attrs and "breast_density" in attrs:
        written.append(folder / "heatmap.png")
        plots.plot_dice_heatmap(pc, pc, path=written[-1])
    written.append(folder / "divergent_itemsets.png")
    # the tested itemsets only (≥ min_count cases): an untested 3-case itemset is not a finding
    tested = result.divergent[result.divergent["p"].notna()]
    plots.plot_divergent_itemsets(tested if len(tested) else result.divergent, top=10, path=written[-1],
                                  title=f"Top tested subgroups; flagged (q ≤ {result.settings['fdr']:g}, ps < 0.5): "
                                        f"{int(result.divergent['flagged'].sum())}")
    images, truths, preds, titles = [], [], [], []
    for pid in pc["dice"].nsmallest(n_hardest).index:
        case = cohort.cases[pid]
        image = read_canonical(case.image_paths[min(1, len(case.image_paths) - 1)])[0]
        truth = read_canonical(case.mask_path)[0] > 0.5
        file = result.prediction_file(pid)
        if file is None:
            pred = np.zeros_like(truth)
        else:  # probability maps: the rule that was scored, p >= threshold
            values, cut = read_canonical(file)[0], result.settings.get("threshold")
            pred = values >= cut if cut is not None else values > 0.5
        images.append(image)
        truths.append(truth)
        preds.append(pred)
        titles.append(f"{pid} · Dice {pc.loc[pid, 'dice']:.2f}" + (" (missing)" if file is None else ""))
    written.append(folder / "hardest_cases.png")
    plots.plot_case_gallery(images, truths, preds, titles=titles, phase_names=["post-contrast 1"],
                            path=written[-1])
    return written


def load_audit(out_dir: str | Path) -> AuditResult:
    """Read an audit written by :func:`audit` back."""
    folder = ReportFolder(out_dir, "audit")
    if not folder.is_complete():
        raise ValueError(f"{folder.path} holds no complete audit (no {folder.manifest.name}); run `divaware audit` first")
    settings = folder.read_manifest()
    report = folder.read_report(ev.CASE_ATTRIBUTES)
    per_case = report.per_case
    per_case["prediction_file"] = per_case["prediction_file"].fillna("").astype(str)
    per_case["missing"] = per_case["missing"].astype(bool)
    divergent = report.divergent
    for c in ("root", "role", "explained_by"):  # audits written before these columns read as ""
        divergent[c] = divergent[c].fillna("").astype(str) if c in divergent.columns else ""
    return AuditResult(
        out_dir=folder.path, data_root=Path(settings["data_root"]), predictions=Path(settings["predictions"]),
        split=settings["split"], per_case=per_case, per_group=report.per_group, challenge=report.challenge,
        fairness=report.fairness, divergent=report.divergent,
        null=pd.read_csv(folder.file(folder.NULL_CHECK), keep_default_na=False, dtype={"worst": str}),
        settings=settings, report=report,
    )


def demo_predictions(data_root: str | Path, dest: str | Path, *, itemset: str = "age_group=0-40",
                     erode: int = 1, split: str | None = None, leave_out: Sequence[str] = (),
                     upper_case: bool = False) -> tuple[Path, list[str]]:
    """A prediction folder with a planted failure, for demonstrations and tests: the expert masks copied
    to ``dest`` as ``<patient_id>.nii.gz`` (lower-case ids, as the organisers write them; ``upper_case`` for
    the spreadsheet's spelling), with the tumours of the cases in ``itemset`` (``attr=value ∧ ...``) eroded
    by ``erode`` voxels, so those cases score lower than the rest. ``split``: only that split's cases
    (None: all); ``leave_out``: cases given no prediction. Returns (dest, the eroded case ids)."""
    import nibabel as nib
    from scipy import ndimage

    from divaware.cohort import load_cohort
    from divaware.subgroups import AND, parse_item

    root, out = Path(data_root).expanduser(), Path(dest).expanduser()
    if ev.is_inside(out, root):
        raise ValueError(f"demo predictions folder {out} lies inside the data folder {root}; write it elsewhere")
    cohort = load_cohort(root, check_voxels=False)
    meta = cohort.metadata
    ids = [i for i in cohort.ids(split) if cohort.cases[i].mask_path is not None]
    member = pd.Series(True, index=meta.index)
    for item in itemset.split(AND.strip()):
        name, value = parse_item(item.strip())
        if name not in meta.columns:
            raise ValueError(f"itemset {itemset!r}: {name!r} is not a metadata column")
        member &= meta[name].astype(str) == value
    out.mkdir(parents=True, exist_ok=True)
    eroded = []
    for pid in ids:
        if pid in set(leave_out):
            continue
        img = nib.load(str(cohort.cases[pid].mask_path))
        mask = np.asanyarray(img.dataobj) > 0
        if member[pid]:
            mask = ndimage.binary_erosion(mask, iterations=int(erode))
            eroded.append(pid)
        name = pid if upper_case else pid.lower()
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), str(out / f"{name}.nii.gz"))
    if not eroded:
        raise ValueError(f"itemset {itemset!r} holds no case of {root} (split {split}); choose another")
    return out, eroded


# --------------------------------------------------------------------------------------------------
# the explorer and training weights
# --------------------------------------------------------------------------------------------------


def explorer_inputs(result: AuditResult, cohort: Cohort) -> dict[str, Any]:
    """Keyword arguments of :func:`divaware.widgets.subgroup_explorer` for an audit.

    ``metadata`` (the cohort's), ``scores`` (per-case ``dice`` and ``norm_hd``: the finite metrics; HD95 in mm
    is NaN for empty predictions), ``cases`` and ``predictions`` (patient_id -> its matched file; for a case
    without a prediction the organisers' expected ``<predictions>/<patient_id>.nii.gz``, which does not exist,
    so the viewer shows the truth alone).
    """
    scores = result.per_case[["dice", "norm_hd"]].astype(float)

    def lookup(pid: str) -> Path:
        return result.prediction_file(pid) or result.predictions / f"{pid}.nii.gz"

    return {"metadata": cohort.metadata, "scores": scores, "cases": cohort.cases, "predictions": lookup}


def _training_ids(cohort: Cohort, train: str) -> list[str]:
    if train in ("train", "all"):
        return list(cohort.ids(None if train == "all" else "train"))
    ids, _ = _split_ids(cohort, train)
    return ids


def _divaware_weights(train_meta: pd.DataFrame, val_meta: pd.DataFrame, scores: pd.Series,
                      params: dict[str, Any]) -> pd.DataFrame:
    """One refresh of the ``divaware`` strategy itself (:func:`divaware.weighting.refresh_weights`)."""
    from divaware.weighting import refresh_weights

    return refresh_weights(train_meta, val_meta, scores, **params)


def _refuse_silent_weights(table: pd.DataFrame, flagged: Sequence[str], attributes: Sequence[str],
                           audit_attributes: Sequence[str]) -> None:
    """A set of attributes under which nothing is flagged, where the audit flagged something, would give every
    case weight 1 without a word: refuse it, naming the audit's flags and the attributes that find them."""
    if not len(flagged) or (table["worst_itemset"] != "").any():
        return
    raise ValueError(f"with attributes {list(attributes)} the divaware rule flags no subgroup, so every weight "
                     f"would be 1, but the audit flagged {len(flagged)} ({M.few(list(flagged))}) on its attributes "
                     f"{list(audit_attributes)}: pass --attributes {' '.join(audit_attributes)} (the default), or "
                     "attributes that include the flagged subgroups'")


def write_weights(table: pd.DataFrame, path: str | Path, data_root: str | Path) -> Path:
    """Write a weights table as CSV (``patient_id, weight, divergence, worst_itemset``; floats round-trip),
    never inside the data folder."""
    out = Path(path).expanduser()
    if ev.is_inside(out, Path(data_root).expanduser()):
        raise ValueError(f"weights file {out} lies inside the data folder {data_root}; input data is read-only, "
                         "so write it elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, table.to_csv())
    return out


def audit_weights(audit_dir: str | Path, train: str = "train", *, data_root: str | Path | None = None,
                  attributes: Sequence[str] | None = None, **strategy_params: Any) -> pd.DataFrame:
    """Per-case training weights from an audit: the ``divaware`` rule, by the ``divaware`` strategy itself.

    The audit's per-case Dice plays the fairness-validation scores of a refresh
    (:func:`divaware.weighting.refresh_weights`: ``fit(training cases).refresh(audited cases, Dice)``) with
    the audit's subgroup analysis (min_support, max_length, fdr) over ``attributes`` (default: the audit's
    own, :func:`divaware.subgroups.method_attributes` of them: with ``breast_density``, the derived ``dense``
    that training adds too, so a default audit gives the weights a default training refresh gives).
    ``strategy_params`` (``tau``, ``w_min``, ``w_max``, ...) override the strategy's defaults. ``train``: the
    training cases to weight (``train``, ``all`` or an ids file). As in training, test-split cases may not
    drive the weights: an audit of the test split is refused (audit held-out training cases, e.g. nnU-Net's
    out-of-fold validation predictions, with ``--split train`` or an ids file). Attributes under which nothing
    is flagged, where the audit flagged something, are refused (every weight would silently be 1).
    Returns ``weight`` (mean 1 over the training cases), ``divergence``, ``gap``, ``worst_itemset`` and
    ``clip``, indexed by patient_id; ``attrs["line"]`` summarises them.
    """
    from divaware.cohort import load_cohort
    from divaware.subgroups import method_attributes

    result = load_audit(audit_dir)
    root = Path(data_root).expanduser() if data_root else result.data_root
    cohort = load_cohort(root, voxel_cache=result.out_dir / "cache" / "voxel_checks.json")
    s = result.settings
    audited = list(s.get("attributes") or ev.DEFAULT_ATTRIBUTES)
    chosen = method_attributes(audited if attributes is None else attributes)
    unknown = [a for a in chosen if a not in cohort.metadata.columns and a not in method_attributes(cohort.metadata.columns)]
    if unknown:
        raise ValueError(f"attribute(s) {unknown} are not metadata columns of {root}; it has "
                         f"{sorted(map(str, cohort.metadata.columns))}")
    params = {"attributes": list(chosen), "min_support": s["min_support"], "max_length": s["max_length"],
              "fdr": s["fdr"], "min_count": s["min_count"], "test_ids": cohort.ids("test"), **strategy_params}
    train_ids = _training_ids(cohort, train)
    if not train_ids:
        raise ValueError(f"no training cases in {train!r} of {root}")
    scores = result.per_case["dice"].astype(float)
    tested = sorted(set(scores.index) & set(params["test_ids"]))
    if tested:
        raise ValueError(f"audit {result.out_dir} scored {len(tested)} test-split case(s) ({M.few(tested)}); as in "
                         "training, the test split never drives weights: audit held-out training cases instead "
                         "(--split train, or an ids file, e.g. of nnU-Net's out-of-fold validation predictions)")
    meta = cohort.metadata
    table = _divaware_weights(meta.loc[train_ids], meta.loc[scores.index], scores, params)
    _refuse_silent_weights(table, s.get("flagged") or [], chosen, audited)
    table.attrs["data_root"] = str(root)
    return table


def run_weights(run_dir: str | Path, epoch: int | None = None, *, data_root: str | Path | None = None,
                **strategy_params: Any) -> pd.DataFrame:
    """The same weights from a divaware training run's fairness-validation scores (``val_scores.csv``).

    ``epoch``: the validated epoch whose scores are used (default: the last). The training cases are the
    run's (``splits.csv``), the scores its ``score`` column, and the strategy's parameters the run's own when
    it trained with ``divaware`` (its ``attributes`` and ``strategy_params``), else divaware's defaults with
    the run's attributes; ``strategy_params`` override them. For a divaware run without smoothing this
    reproduces the weights the run assigned at a refresh after ``epoch``.
    """
    from divaware.cohort import load_cohort
    from divaware.runfolder import RunFolder

    run = RunFolder(Path(run_dir).expanduser())
    for f in (run.config, run.splits, run.val_scores):
        if not f.is_file():
            raise ValueError(f"{run.path} is not a validated training run ({f.name} missing); train it, or use "
                             "`divaware weights --audit`")
    config = run.read_config()
    root = Path(data_root).expanduser() if data_root else Path(str(config.get("data_root", "")))
    cohort = load_cohort(root, check_voxels=False)
    splits = run.read_splits()
    val = run.read_val_scores()
    if "kind" in val.columns:  # cheap validation: the refresh uses the full sliding-window scores
        val = val[val["kind"].fillna("full") == "full"]
    epoch = int(val["epoch"].max()) if epoch is None else int(epoch)
    at = val[val["epoch"] == epoch]
    if at.empty:
        raise ValueError(f"{run.val_scores} has no scores of epoch {epoch}; validated epochs: "
                         f"{sorted(val['epoch'].unique().tolist())}")
    column = "score" if "score" in at.columns else "dice"
    scores = at.set_index("patient_id")[column].astype(float)
    params: dict[str, Any] = {"attributes": list(config.get("attributes") or ev.DEFAULT_ATTRIBUTES),
                              "test_ids": cohort.ids("test")}
    if config.get("strategy") == "divaware":
        params.update(config.get("strategy_params") or {})
    params.update(strategy_params)
    train_ids = splits.loc[splits["split"] == "train", "patient_id"].tolist()
    meta = cohort.metadata
    table = _divaware_weights(meta.loc[train_ids], meta.loc[scores.index], scores, params)
    table.attrs["data_root"] = str(root)
    return table
