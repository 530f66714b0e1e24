"""Evaluate a run on a split: predict if needed, score every case, write the fairness report.

``evaluate(run_dir, data_root, split="test")`` turns a training run into evidence. Everything it writes
goes into **one folder of the run**, named by :func:`evaluation_dir`::

    <run_dir>/evaluation_<split>[_<checkpoint>][_<tag>]/
        pred_segmentations/<patient_id>.nii.gz  predictions made by evaluate() itself (absent when an
                                                existing folder was scored with ``predictions=``)
        predictions.json      how those predictions were made (checkpoint file + SHA-256, predict settings,
                              data root); evaluate() reuses them only while all of these still match
        per_case.csv          index patient_id; dice, hd95 (voxels), hd95_mm, norm_hd, pred/true_volume_ml
                              and the group attributes (age_group, menopause, breast_density, dataset, ...)
        per_group.csv         one row per (attribute, group): n, mean Dice with seeded 95 % bootstrap CI,
                              gap to overall, hd95_mm, norm_hd, small (n < 10)
        challenge.json        the MAMA-MIA Task-1 score: P, F_age, F_menopause, F_density, F, ranking, the
                              means behind them and the group means (NaN written as null)
        fairness.json         per attribute: overall, worst/best group Dice with labels, max−min gap, std,
                              ES-Dice, over the groups the challenge's F counts (``unknown`` menopause is a
                              group, unknown age and missing density are left out: see
                              :func:`divaware.metrics.worst_group`; per_group.csv shows every group)
        divergent_itemsets.csv DivExplorer itemsets of the per-case Dice with their ``flagged`` column: the
                              analysis of :class:`divaware.report.FairnessReport` with the divaware strategy's
                              settings, as ``divaware audit`` writes it (which subgroups does it fail?)
        evaluation.json       what was evaluated: run, data root, split, checkpoint, predictions folder,
                              settings; written last, so its presence marks a complete evaluation

``<checkpoint>`` appears only when it is not ``best`` and ``<tag>`` only when given, so the default
evaluation of the test split is simply ``<run>/evaluation_test`` and evaluations of different splits or
checkpoints never overwrite each other. Evaluating again into the same folder with other prediction settings
(``postprocess=...``, sliding window, ...) predicts again and replaces it; pass ``tag=`` to keep both.
Nothing is written outside the run folder, and never into the data folder (an error if the run folder lies
inside it). ``split`` is ``train``/``test`` (the challenge splits), ``val`` (the run's fairness-validation
cases from its ``splits.csv``) or ``all``.

:func:`load_evaluation` reads a written evaluation back; :func:`compare` pairs two runs' per-case results
(:func:`divaware.metrics.compare_runs`); :func:`collect` tabulates every evaluated run under a folder, one
row per run, for sweeps and the fairness-evaluation notebook.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from divaware import metrics as M
from divaware.report import AnalysisSettings, FairnessReport, ReportFolder, itemsets_csv, jsonable
from divaware.report import worst_group as report_worst_group
from divaware.runfolder import RunFolder, check_name, split_name, write_text

if TYPE_CHECKING:
    from divaware.cohort import Cohort

CASE_ATTRIBUTES = ("age_group", "menopause", "breast_density", "dataset")
"""Metadata columns every per_case.csv carries, so notebooks need no join with the cohort."""

DEFAULT_ATTRIBUTES = M.DEFAULT_ATTRIBUTES
"""Attributes of the per-group tables, fairness figures and itemsets (the challenge's three; defined once,
in :mod:`divaware.metrics`)."""

PRED_FOLDER = "pred_segmentations"
FILES = ReportFolder(".", "evaluation").files()
"""Key -> file name of an evaluation folder (the names live in :class:`divaware.report.ReportFolder`)."""

# predict() arguments that change how it runs but not what it predicts: they do not invalidate predictions.
_OPERATIONAL = frozenset({"device", "num_workers", "progress"})
# predict() arguments evaluate() sets itself.
_RESERVED = frozenset({"run_dir", "data_root", "split", "out_dir", "checkpoint", "patient_ids"})


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


_jsonable = jsonable


def _write_atomic(path: Path, text: str) -> None:
    # A reader (notebook, sweep) never sees a half-written file; an interrupted run leaves the old one.
    write_text(path, text)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (both resolved): outputs never go into the data or predictions."""
    return path.resolve().is_relative_to(folder.resolve())



_check_name = check_name
_split_name = split_name


def evaluation_dir(run_dir: str | Path, split: str | None = "test", checkpoint: str = "best",
                   tag: str | None = None) -> Path:
    """The folder an evaluation of ``run_dir`` on ``split`` is written to (see the module docstring)."""
    return RunFolder(run_dir).evaluation_dir(split, checkpoint, tag)


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as a dict ({} when the folder has none), without importing torch."""
    return RunFolder(run_dir).read_config()


def _resolve_data_root(run_dir: Path, data_root: str | Path | None) -> Path:
    if data_root is None or str(data_root) == "":
        recorded = _run_config(run_dir).get("data_root")
        if not recorded:
            raise ValueError(
                f"no data folder given and {RunFolder(run_dir).config} records none; pass data_root (--data)"
            )
        data_root = recorded
    root = Path(data_root).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"data folder {root} is a file, not a folder; pass the MAMA-MIA root (holding images/ "
                         "and clinical_and_imaging_info.xlsx)")
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist; pass the MAMA-MIA root (holding images/ and "
                         "clinical_and_imaging_info.xlsx)")
    return root


def _split_ids(cohort: Cohort, run_dir: Path, split: str | None) -> list[str]:
    if split in (None, "all"):
        return list(cohort.ids(None))
    if split == "val":
        # The fairness-validation cases are carved out by the run itself (train.py), not by the cohort.
        from divaware.split import run_val_ids

        return run_val_ids(run_dir, cohort)
    return list(cohort.ids(split))


def _checkpoint_file(run_dir: Path, checkpoint: str) -> Path:
    # The same file predict.load_run_model loads: "best" falls back to last.pt when the run never validated.
    return RunFolder(run_dir).checkpoint_to_use(checkpoint)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prediction_files(folder: Path) -> dict[str, Path]:
    """``{lower-case patient_id: file}`` of a prediction folder. Matching ignores case because real
    downloads mix ``DUKE_001`` and ``duke_001`` (e.g. the organisers' automatic segmentations)."""
    files: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii")):
            stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]
            files[stem.lower()] = p
    return files


def _nifti_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith((".nii.gz", ".nii")))


def prediction_folder(predictions: str | Path) -> Path:
    """The folder of ``<patient_id>.nii.gz`` files: ``predictions``, or its ``pred_segmentations/``."""
    p = Path(predictions).expanduser()
    sub = p / PRED_FOLDER
    if sub.is_dir():
        top, inner = _nifti_names(p), _nifti_names(sub)
        if top and inner:
            # which of the two is the model's is not ours to guess: scoring a leftover subfolder scored
            # perfect top-level predictions as Dice 0
            raise ValueError(f"{p} holds both {len(top)} prediction file(s) ({M._few(top, 3)}) and a {PRED_FOLDER}/ "
                             f"subfolder with {len(inner)} ({M._few(inner, 3)}); pass {sub} to score the "
                             f"subfolder, or move {PRED_FOLDER}/ out of {p} to score the files beside it")
        if inner or not top:
            p = sub  # the folder predict() was given, rather than its pred_segmentations/
    if not p.is_dir():
        raise ValueError(f"prediction folder {predictions} does not exist")
    return p


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------



def load_mask(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    # A trailing singleton (X, Y, Z, 1) is still one 3D mask; drop it so shapes compare as the voxel grid.
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    from divaware.cohort import voxel_spacing

    # the affine's spacing, as MONAI's loader uses it in training and prediction (load_cohort refuses files
    # whose pixdim disagrees with it), so volumes and HD95 in mm are measured as the network saw the case
    zooms = voxel_spacing(img.affine)[: arr.ndim]
    return arr, zooms, np.asarray(img.affine)


PREDICTION_LABEL = 1
"""The tumour label of a prediction. The organisers' scoring counts label 1 only, so a prediction written
with 2 or 255 scores as empty there; we follow them (and warn) rather than silently scoring it as tumour."""


def _prediction_labels(pred: np.ndarray) -> tuple[np.ndarray, str]:
    """(binary prediction with tumour = label 1, description of other labels found or '')."""
    is1 = pred == PREDICTION_LABEL
    other = ~(is1 | (pred == 0))
    if not other.any():
        return is1, ""
    vals = pred[other]
    finite = vals[np.isfinite(vals)] if np.issubdtype(vals.dtype, np.floating) else vals
    shown = [f"{v:g}" for v in np.unique(finite)[:4].tolist()]
    if finite.size < vals.size:
        shown.append("NaN/Inf")
    return is1, f"values {', '.join(shown)}"


def score_cases(
    predictions: str | Path,
    cohort: Cohort,
    patient_ids: Sequence[str],
    *,
    attributes: Sequence[str] = CASE_ATTRIBUTES,
    progress: bool = False,
    threshold: float | None = None,
) -> pd.DataFrame:
    """Per-case metrics of the prediction files in ``predictions`` against the cohort's expert masks.

    ``threshold``: the files are probability maps, tumour where the value is >= ``threshold``.

    Returns a per-case table indexed by ``patient_id`` (in ``patient_ids`` order): the columns of
    :func:`divaware.metrics.case_metrics`, then the metadata ``attributes``. The prediction of a case is
    ``<predictions>/<patient_id>.nii.gz`` (or ``.nii``; case-insensitive). Spacing for ``hd95_mm`` and the
    volumes comes from the expert mask's affine (:func:`divaware.cohort.voxel_spacing`, in the array's axis
    order), the spacing training and prediction use. Raises, naming
    the case, when a case has no mask, no prediction, or a prediction whose shape differs from the mask's.
    """
    from tqdm.auto import tqdm

    folder = prediction_folder(predictions)
    ids = [str(i) for i in patient_ids]
    unknown = [i for i in ids if i not in cohort.cases]
    if unknown:
        raise ValueError(f"case(s) {M._few(unknown)} are not in the cohort at {cohort.root}")
    no_mask = [i for i in ids if cohort.cases[i].mask_path is None]
    if no_mask:
        raise ValueError(f"case(s) {M._few(no_mask)} have no expert segmentation and cannot be scored; "
                         "leave them out (patient_ids=)")
    files = _prediction_files(folder)
    absent = [i for i in ids if i.lower() not in files]
    if absent:
        raise ValueError(f"{folder} holds no prediction for case(s) {M._few(absent)} "
                         f"(expected <patient_id>.nii.gz)")
    missing_cols = [a for a in attributes if a not in cohort.metadata.columns]
    if missing_cols:
        raise ValueError(f"cohort metadata lacks attribute column(s) {missing_cols}; it has "
                         f"{list(cohort.metadata.columns)}")

    rows: dict[str, dict[str, float]] = {}
    moved: list[str] = []
    relabelled: list[str] = []
    for pid in tqdm(ids, desc="score", unit="case", disable=not progress):
        truth, spacing, affine_t = load_mask(Path(cohort.cases[pid].mask_path))
        try:
            pred, _, affine_p = load_mask(files[pid.lower()])
        except Exception as err:
            raise ValueError(f"case {pid}: cannot read the prediction {files[pid.lower()]} ({type(err).__name__}: "
                             f"{err}); predict it again (repredict=True / --repredict)") from None
        if threshold is not None:  # probability maps: tumour where p >= threshold (audit --threshold)
            pred = (np.nan_to_num(pred.astype(np.float32), nan=0.0) >= threshold).astype(np.uint8)
        pred, other = _prediction_labels(pred)
        if other:
            relabelled.append(f"{pid} ({other})")
        if pred.shape != truth.shape:
            raise ValueError(
                f"case {pid}: prediction {files[pid.lower()]} has shape {pred.shape} but the expert mask "
                f"has {truth.shape}; predictions must be on the mask's voxel grid"
            )
        # Same shape, different placement usually means flipped/permuted axes: the score would be garbage.
        if not np.allclose(affine_p, affine_t, atol=1e-3, rtol=0):
            moved.append(pid)
        try:
            rows[pid] = M.case_metrics(pred, truth, spacing)
        except ValueError as err:
            raise ValueError(f"case {pid}: {err}") from err
    if relabelled:
        warnings.warn(f"prediction(s) hold labels other than 0/1, scored as background as the organisers' script "
                      f"does (tumour = label 1 only): {M._few(relabelled)}; write 0/1 masks", stacklevel=2)
    if moved:
        warnings.warn(f"prediction affine differs from the expert mask's for case(s) {M._few(moved)}; "
                      "check orientation (scores compare voxel arrays)", stacklevel=2)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(M.PER_CASE_COLUMNS))
    table.index.name = "patient_id"
    meta = cohort.metadata
    meta = meta.set_index("patient_id") if "patient_id" in meta.columns else meta
    for a in attributes:
        table[a] = meta.loc[ids, a].to_numpy(dtype=object)
    return table


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------


def score_text(challenge: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """One number of a :func:`divaware.metrics.challenge_score` result for a summary line ("n/a" if missing)."""
    v = challenge.get(key)
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def metric_line(challenge: Mapping[str, Any]) -> str:
    """The summary line of mean Dice, HD95 (mm) and NormHD, shared by evaluations and audits. The HD95 mean
    covers the cases with a finite distance only (an empty prediction has none): it says how many."""
    n_hd, n = challenge.get("n_hd95_mm"), challenge.get("n_cases")
    over = f" (over the {n_hd} of {n} cases with a finite HD95)" if n_hd is not None and n_hd != n else ""
    return (f"  mean Dice {score_text(challenge, 'mean_dice')}   mean HD95 {score_text(challenge, 'mean_hd95_mm', 1)} mm"
            f"{over}   mean NormHD {score_text(challenge, 'mean_norm_hd')}")


@dataclass
class EvaluationResult:
    """One evaluation of a run on a split: the tables, the scores and where they were written."""

    run_dir: Path
    split: str
    checkpoint: str
    out_dir: Path
    """The evaluation folder (see :func:`evaluation_dir`)."""
    predictions: Path
    """The prediction folder that was scored."""
    per_case: pd.DataFrame
    """Index patient_id; metric columns and the group attributes (as in per_case.csv)."""
    per_group: pd.DataFrame
    """One row per (attribute, group); columns of :func:`divaware.metrics.group_table` with ``attribute``."""
    challenge: dict[str, Any]
    """:func:`divaware.metrics.challenge_score` (P, F_a, F, ranking, ...)."""
    fairness: dict[str, dict[str, Any]]
    """Per attribute: :func:`divaware.metrics.fairness_summary` of Dice over the groups the challenge counts."""
    divergent: pd.DataFrame
    """The report's divergent subgroups (:class:`divaware.report.FairnessReport`, ``flagged`` included)."""
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    settings: dict[str, Any] = field(default_factory=dict)
    report: FairnessReport | None = None
    """The fairness report these tables belong to (overall, worst group, gaps, flagged subgroups)."""

    def groups(self, attribute: str) -> pd.DataFrame:
        """The per-group rows of one attribute (a :func:`divaware.metrics.group_table`, for the plots)."""
        if attribute not in set(self.per_group["attribute"]):
            raise ValueError(f"no per-group table for {attribute!r}; evaluated attributes: {list(self.attributes)}")
        return self.per_group[self.per_group["attribute"] == attribute].reset_index(drop=True)

    def worst_group(self) -> dict[str, Any] | None:
        """The group (as the challenge counts them) with the lowest mean Dice over all attributes: ``attribute, group, dice, n``."""
        return report_worst_group(self.fairness, self.per_group)

    def checkpoint_label(self) -> str:
        """The checkpoint asked for, and the file that was used when it is another (``best`` without best.pt)."""
        used = self.settings.get("checkpoint_file")
        if used and used != f"{self.checkpoint}.pt":
            return f"{self.checkpoint} asked, {self.checkpoint}.pt absent: {used} used"
        return str(self.checkpoint)

    def summary(self) -> str:
        """A few lines for the console and notebooks."""
        c = self.challenge
        fa = ", ".join(f"{k[2:]} {score_text(c, k)}" for k in ("F_age", "F_menopause", "F_density"))
        lines = [
            f"evaluation of {self.run_dir} on {self.split} (checkpoint {self.checkpoint_label()}): "
            f"{len(self.per_case)} cases",
            metric_line(c),
            f"  challenge: P {score_text(c, 'P')}   F {score_text(c, 'F')} ({fa})   ranking {score_text(c, 'ranking')}",
        ]
        w = self.worst_group()
        if w is not None:
            n = f" (n={w['n']})" if w.get("n") is not None else ""
            lines.append(f"  worst group: {w['attribute']}={w['group']}  Dice {w['dice']:.3f}{n}")
        lines.append(f"  written to {self.out_dir}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


divergent_to_csv = itemsets_csv  # an itemset table as CSV text (one definition: divaware.report)


def _prediction_settings(predict_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings that change predictions, with predict()'s defaults filled in; operational arguments)."""
    from divaware.predict import predict

    reserved = sorted(set(predict_kwargs) & _RESERVED)
    if reserved:
        raise ValueError(f"evaluate() sets {reserved} itself; pass split=/checkpoint=/patient_ids= to evaluate")
    sig = inspect.signature(predict)
    bound = sig.bind_partial(**predict_kwargs)  # TypeError on a misspelt keyword, before any work
    settings = {}
    for name, param in sig.parameters.items():
        if name in _RESERVED or name in _OPERATIONAL:
            continue
        settings[name] = bound.arguments.get(name, param.default)
    operational = {k: v for k, v in predict_kwargs.items() if k in _OPERATIONAL}
    return _jsonable(settings), operational


def input_fingerprint(cohort: Cohort, pid: str) -> str:
    """A fingerprint of what a case's prediction is made from: its phase images (path, size, modification
    time and, for gzip files, the stored CRC-32 and length of the content) and its patient-info JSON (the
    breast box). An image rewritten in place changes it, so its old prediction is never reused."""
    case = cohort.cases[pid]
    h = hashlib.sha256()
    for path in case.image_paths:
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        if path.name.lower().endswith(".gz") and st.st_size >= 8:
            with path.open("rb") as f:  # the gzip trailer: CRC-32 and length of the uncompressed content
                f.seek(-8, os.SEEK_END)
                h.update(f.read(8))
    h.update(json.dumps(case.info, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _ensure_predictions(run_dir: Path, data_root: Path, out: Path, ids: Sequence[str], checkpoint: str,
                        repredict: bool, verbose: bool, predict_kwargs: Mapping[str, Any],
                        cohort: Cohort | None = None) -> Path:
    """Predict the cases of ``ids`` into ``out/pred_segmentations`` unless up-to-date predictions are there.

    Up to date: made with the same checkpoint file (SHA-256), settings and data folder, and, per case, from
    inputs with the same :func:`input_fingerprint` (a case whose images changed in place is predicted again).
    """
    settings, operational = _prediction_settings(predict_kwargs)
    ckpt = _checkpoint_file(run_dir, checkpoint)
    record: dict[str, Any] = {"checkpoint": checkpoint, "checkpoint_file": ckpt.name,
                              "checkpoint_sha256": _sha256(ckpt), "data_root": str(data_root.resolve()),
                              "settings": settings}
    pred_dir = out / PRED_FOLDER
    manifest = out / FILES["predictions"]
    try:
        previous = _read_json(manifest) if manifest.is_file() else None
    except (OSError, ValueError):
        previous = None  # damaged: predict everything again
    previous_inputs = dict((previous or {}).pop("inputs", None) or {})
    if pred_dir.is_dir() and (repredict or previous != _jsonable(record)):
        if previous is not None and not repredict:
            changed = sorted(k for k in record if _jsonable(record)[k] != previous.get(k))
            warnings.warn(f"{pred_dir}: {', '.join(changed)} changed since these predictions were made; "
                          "predicting again (pass tag= to keep evaluations side by side)", stacklevel=3)
        for p in pred_dir.glob("*.nii*"):
            p.unlink()  # stale: made by another checkpoint/settings; only our own folder is touched
        previous_inputs = {}
    inputs = {i: input_fingerprint(cohort, i) for i in ids} if cohort is not None else {}
    have = _prediction_files(pred_dir) if pred_dir.is_dir() else {}
    stale = [i for i in ids if i.lower() in have and cohort is not None and previous_inputs.get(i) != inputs[i]]
    if stale:
        warnings.warn(f"{pred_dir}: the images or patient-info JSON of {len(stale)} case(s) changed since they were "
                      f"predicted (or were not recorded): {M._few(stale)}; predicting them again", stacklevel=3)
        for i in stale:
            have.pop(i.lower()).unlink()
    out.mkdir(parents=True, exist_ok=True)
    # Written before predicting: an interrupted evaluation resumes with the cases still missing.
    _write_json(manifest, {**record, "inputs": {**previous_inputs, **inputs}})
    todo = [i for i in ids if i.lower() not in have]
    if todo:
        from divaware.cohort import CohortWarning
        from divaware.predict import predict

        kwargs = {"progress": verbose, **operational}
        with warnings.catch_warnings():
            # evaluate() has loaded the same cohort and warned about its excluded cases already
            warnings.simplefilter("ignore", CohortWarning)
            predict(run_dir, data_root, split=None, out_dir=out, checkpoint=checkpoint, patient_ids=todo,
                    **settings, **kwargs)
    return pred_dir


def _evaluation_ids(cohort: Cohort, run_dir: Path, root: Path, split: str | None,
                    patient_ids: Sequence[str] | None) -> list[str]:
    """The cases to score: the split's, restricted to ``patient_ids``; all must have an expert mask."""
    ids = _split_ids(cohort, run_dir, split)
    if patient_ids is not None:
        wanted = [str(i) for i in patient_ids]
        outside = sorted(set(wanted) - set(ids))
        if outside:
            raise ValueError(f"patient_ids {M._few(outside)} are not in split {_split_name(split)!r}")
        ids = wanted
    if not ids:
        raise ValueError(f"split {_split_name(split)!r} of {root} has no cases to evaluate")
    no_mask = [i for i in ids if i in cohort.cases and cohort.cases[i].mask_path is None]
    if no_mask:
        raise ValueError(f"case(s) {M._few(no_mask)} have no expert segmentation and cannot be evaluated; "
                         "restrict the cases with patient_ids=")
    return ids


def evaluate(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    split: str | None = "test",
    predictions: str | Path | None = None,
    checkpoint: str = "best",
    *,
    tag: str | None = None,
    attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
    n_boot: int = 2000,
    seed: int = 0,
    min_support: float | None = None,
    min_group_size: int = 1,
    patient_ids: Sequence[str] | None = None,
    repredict: bool = False,
    verbose: bool = True,
    **predict_kwargs: Any,
) -> EvaluationResult:
    """Evaluate the run in ``run_dir`` on ``split`` of the cohort at ``data_root``; write and return the report.

    Without ``predictions``, the run's ``checkpoint`` predicts the split into the evaluation folder (see the
    module docstring), unless predictions made with the same checkpoint file, settings and data are already
    there; ``predict_kwargs`` go to :func:`divaware.predict.predict` (``sliding_window``, ``roi_size``,
    ``overlap``, ``postprocess``, ``device``, ``num_workers``). With ``predictions`` (a folder of
    ``<patient_id>.nii.gz``, or one holding ``pred_segmentations/``) those files are scored as they are.

    ``data_root`` defaults to the data folder recorded in the run's config.yaml. ``attributes``: metadata
    columns for per_group.csv, fairness.json and the itemsets (extra ones are added to per_case.csv).
    ``n_boot``/``seed``: the group CIs' bootstrap. ``min_support``: DivExplorer support of the itemsets (None:
    the divaware strategy's, as every setting of the analysis: :class:`divaware.report.AnalysisSettings`).
    ``min_group_size``: groups smaller than this are left out of the fairness figures. ``patient_ids``
    restricts the split's cases. ``repredict`` predicts even when up-to-date predictions exist.
    """
    run_dir = Path(run_dir).expanduser()
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if predictions is None and not RunFolder(run_dir).is_run():
        raise ValueError(f"{run_dir} is not a training run folder (no config.yaml); pass predictions= to score "
                         "an existing prediction folder")
    if predictions is not None and predict_kwargs:
        raise ValueError(f"prediction settings {sorted(predict_kwargs)} have no effect when predictions= is "
                         "given; drop them or drop predictions=")
    analysis = AnalysisSettings.from_strategy(tuple(attributes), min_support=min_support, n_boot=n_boot, seed=seed,
                                              min_group_size=min_group_size)
    attributes = analysis.attributes
    root = _resolve_data_root(run_dir, data_root)
    out = evaluation_dir(run_dir, split, checkpoint, tag)
    if is_inside(out, root):
        raise ValueError(f"run folder {run_dir} lies inside the data folder {root}; input data is read-only, "
                         "so evaluate a run kept elsewhere")
    from divaware.outputs import ensure_writable

    ensure_writable(out, "run folder")  # read-only or full: one line now, not after predicting

    from divaware.cohort import load_cohort

    # The checks of `divaware check`, voxels included (cached in the run folder): an excluded case is named
    # in a warning and never scored.
    run = RunFolder(run_dir)  # a bare prediction folder gets no cache written into it
    phases = (run.read_config().get("phases") or None) if run.is_run() else None  # the phases the run reads
    cohort = load_cohort(root, voxel_cache=run.voxel_cache(data_root=root) if run.is_run() else None,
                         phases=phases)
    ids = _evaluation_ids(cohort, run_dir, root, split, patient_ids)

    if predictions is None:
        pred_dir = _ensure_predictions(run_dir, root, out, ids, checkpoint, repredict, verbose, predict_kwargs,
                                       cohort)
    else:
        pred_dir = prediction_folder(predictions)

    case_attrs = tuple(dict.fromkeys((*CASE_ATTRIBUTES, *attributes)))
    per_case = score_cases(pred_dir, cohort, ids, attributes=case_attrs, progress=verbose)
    report = FairnessReport.from_scores(per_case, analysis)

    from divaware import __version__

    settings = {
        "divaware_version": __version__, "run_dir": str(run_dir.resolve()), "data_root": str(root.resolve()),
        "split": _split_name(split), "checkpoint": checkpoint, "tag": tag,
        # the file the predictions came from: last.pt when best.pt is absent (labelled so, not "best")
        "checkpoint_file": _checkpoint_file(run_dir, checkpoint).name if predictions is None else None,
        "predictions": str(pred_dir.resolve()), "predicted_here": predictions is None,
        "n_cases": len(per_case), **analysis.to_dict(),
        "fairness_groups": "the challenge's groups (unknown menopause a group; unknown age, density left out)",
    }
    folder = ReportFolder(out, "evaluation")
    folder.begin()
    folder.write_report(report)
    folder.finish(settings)  # written last: its presence marks a complete report
    result = EvaluationResult(
        run_dir=run_dir, split=_split_name(split), checkpoint=checkpoint, out_dir=out, predictions=pred_dir,
        per_case=per_case, per_group=report.per_group, challenge=report.challenge, fairness=report.fairness,
        divergent=report.divergent, attributes=attributes, settings=settings, report=report,
    )
    if verbose:
        print(result.summary())
    return result


# --------------------------------------------------------------------------------------------------
# reading back, comparing, collecting
# --------------------------------------------------------------------------------------------------


def _read_per_case(path: Path) -> pd.DataFrame:
    # Attribute columns stay strings ("0-40", "a"); patient ids like "NACT_01" must not become numbers.
    table = pd.read_csv(path, dtype={"patient_id": str, **{a: "object" for a in CASE_ATTRIBUTES}})
    return table.set_index("patient_id")


def _require_evaluation(run_dir: Path, split: str | None, checkpoint: str, tag: str | None) -> Path:
    out = evaluation_dir(run_dir, split, checkpoint, tag)
    if not (out / FILES["manifest"]).is_file():
        raise ValueError(f"{out} holds no complete evaluation; run `divaware evaluate --run {run_dir} "
                         f"--split {_split_name(split)}` first")
    return out


def load_evaluation(run_dir: str | Path, split: str | None = "test", checkpoint: str = "best",
                    tag: str | None = None) -> EvaluationResult:
    """Read an evaluation written by :func:`evaluate` back (NaN where the JSON holds null)."""
    run_dir = Path(run_dir)
    out = _require_evaluation(run_dir, split, checkpoint, tag)
    folder = ReportFolder(out, "evaluation")
    settings = folder.read_manifest()
    report = folder.read_report(CASE_ATTRIBUTES)
    per_case, per_group, divergent = report.per_case, report.per_group, report.divergent
    challenge, fairness = report.challenge, report.fairness
    return EvaluationResult(
        run_dir=run_dir, split=settings.get("split", _split_name(split)), checkpoint=checkpoint, out_dir=out,
        predictions=Path(settings.get("predictions", out / PRED_FOLDER)), per_case=per_case,
        per_group=per_group, challenge=challenge, fairness=fairness, divergent=divergent,
        attributes=tuple(settings.get("attributes", DEFAULT_ATTRIBUTES)), settings=settings, report=report,
    )


def compare(
    run_a: str | Path,
    run_b: str | Path,
    split: str | None = "test",
    *,
    checkpoint: str = "best",
    tag: str | None = None,
    metric: str = "dice",
    by: str | Sequence[str] | None = "age_group",
    labels: tuple[str, str] | None = None,
    metadata: pd.DataFrame | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    min_n: int = M.MIN_GROUP_SIZE,
    drop_unknown: bool = False,
    out_dir: str | Path | None = None,
) -> M.RunComparison:
    """Paired comparison of two evaluated runs (b − a) on the same cases: :func:`divaware.metrics.compare_runs`.

    Reads both runs' ``per_case.csv`` of ``split`` (evaluate them first). ``by``: an attribute, or a list for
    their intersection, for the per-group breakdown and fairness figures (None: overall only); the group
    labels come from run a's per_case.csv, or from ``metadata`` (e.g. ``cohort.metadata``) for attributes
    that per_case.csv does not carry. ``labels`` default to the run folders' names. With ``out_dir``
    the result is written there: ``comparison.json`` (labels, metric, by, overall), ``comparison_per_case.csv``,
    ``comparison_per_group.csv`` and ``comparison_fairness.csv``; otherwise nothing is written.
    """
    run_a, run_b = Path(run_a), Path(run_b)
    ev = [_require_evaluation(r, split, checkpoint, tag) for r in (run_a, run_b)]
    a, b = (_read_per_case(e / FILES["per_case"]) for e in ev)
    roots = {_read_json(e / FILES["manifest"]).get("data_root") for e in ev}
    if len(roots) > 1:
        warnings.warn(f"the two runs were evaluated on different data folders {sorted(map(str, roots))}",
                      stacklevel=2)
    if labels is None:
        labels = (run_a.name, run_b.name) if run_a.name != run_b.name else (str(run_a), str(run_b))
    meta = None if by is None else (metadata if metadata is not None else a)
    result = M.compare_runs(a, b, meta, by, metric=metric, labels=labels,
                            n_boot=n_boot, seed=seed, min_n=min_n, drop_unknown=drop_unknown)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "comparison.json", {
            "labels": list(result.labels), "metric": metric, "split": _split_name(split),
            "by": by if by is None or isinstance(by, str) else list(by), "overall": result.overall,
            "runs": [str(run_a), str(run_b)],
        })
        _write_atomic(out / "comparison_per_case.csv", result.per_case.to_csv())
        _write_atomic(out / "comparison_per_group.csv", result.per_group.to_csv(index=False))
        _write_atomic(out / "comparison_fairness.csv", result.fairness.to_csv())
    return result


COLLECT_COLUMNS = (
    "run", "method", "seed", "n_cases", "mean_dice", "mean_hd95_mm", "worst_group_dice", "worst_group",
    "gap", "es_dice", "P", "F_age", "F_menopause", "F_density", "F", "ranking",
)


def _fnum(v: Any) -> float:
    return math.nan if v is None else float(v)


def collect(runs_dir: str | Path, split: str | None = "test", checkpoint: str = "best",
            tag: str | None = None) -> pd.DataFrame:
    """One row per evaluated run folder under ``runs_dir`` (searched recursively for ``config.yaml``).

    Columns :data:`COLLECT_COLUMNS`: ``run`` (path relative to ``runs_dir``), ``method`` (the config's
    weighting strategy) and ``seed``, the challenge figures, and the fairness figures of Dice over the
    known groups, summarised across the evaluated attributes by their worst: ``worst_group_dice`` (lowest
    group mean, labelled ``attribute=group`` in ``worst_group``), ``gap`` (largest max−min gap) and
    ``es_dice`` (lowest ES-Dice). Per attribute ``worst_dice_<attr>``, ``gap_<attr>`` and ``es_dice_<attr>``
    follow. Runs without a complete evaluation of ``split`` are left out with a warning naming them.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"runs folder {runs_dir} does not exist")
    rows = []
    unevaluated = []
    for folder in RunFolder.find(runs_dir):
        run = folder.path
        out = evaluation_dir(run, split, checkpoint, tag)
        if not (out / FILES["manifest"]).is_file():
            unevaluated.append(str(run.relative_to(runs_dir)))
            continue
        cfg = _run_config(run)
        ch = _read_json(out / FILES["challenge"])
        fair = _read_json(out / FILES["fairness"])
        row: dict[str, Any] = {
            "run": run.relative_to(runs_dir).as_posix() if run != runs_dir else run.name,
            "method": cfg.get("strategy"), "seed": cfg.get("seed"), "n_cases": ch.get("n_cases"),
            "mean_dice": _fnum(ch.get("mean_dice")), "mean_hd95_mm": _fnum(ch.get("mean_hd95_mm")),
            **{k: _fnum(ch.get(k)) for k in ("P", "F_age", "F_menopause", "F_density", "F", "ranking")},
        }
        worst, worst_label, gaps, ess = math.inf, None, [], []
        per_attr: dict[str, float] = {}
        for attr, fs in fair.items():
            w, g, e = _fnum(fs.get("worst_group")), _fnum(fs.get("gap")), _fnum(fs.get("es"))
            per_attr.update({f"worst_dice_{attr}": w, f"gap_{attr}": g, f"es_dice_{attr}": e})
            if not math.isnan(w) and w < worst:
                worst, worst_label = w, f"{attr}={fs.get('worst_group_label')}"
            gaps.append(g)
            ess.append(e)
        row["worst_group_dice"] = worst if worst_label is not None else math.nan
        row["worst_group"] = worst_label
        row["gap"] = float(np.nanmax(gaps)) if any(not math.isnan(g) for g in gaps) else math.nan
        row["es_dice"] = float(np.nanmin(ess)) if any(not math.isnan(e) for e in ess) else math.nan
        row.update(per_attr)
        rows.append(row)
    if unevaluated:
        warnings.warn(f"{len(unevaluated)} run(s) under {runs_dir} have no evaluation of split "
                      f"{_split_name(split)!r} and are left out: {M._few(unevaluated)}", stacklevel=2)
    if not rows:
        return pd.DataFrame(columns=list(COLLECT_COLUMNS))
    table = pd.DataFrame(rows)
    extra = [c for c in table.columns if c not in COLLECT_COLUMNS]
    return table[[*COLLECT_COLUMNS, *extra]].reset_index(drop=True)
