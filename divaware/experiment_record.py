"""The experiment's small result files, committed to the repository so that a sweep survives its machine.

A run of the experiment (:mod:`divaware.experiment`) leaves a run folder of checkpoints and predictions (tens of
MB, never committed). What the report needs from it fits in a few small files, written here by
:func:`record_run` under a record folder (``benchmarks/experiment/<mechanism>``)::

    <record>/cohort.json            the held-out cohort every run was evaluated on (folder name: generator
                                    version, cases, seed; a run evaluated on another cohort is refused)
    <record>/heldout_cases.csv      patient_id, age_group, menopause, breast_density (what the model saw),
                                    hard_subgroup and n_lesions (the synthetic truth) of every held-out case
    <record>/<run>/run.json         strategy or arm, seed, the TrainConfig as run (paths left out), the code
                                    commit, the selected epoch, minutes, and what the weights did
    <record>/<run>/heldout.csv      per held-out case, at the validation-selected (``best``) and the ``last``
                                    checkpoint: Dice, Dice with the predicted voxels inside look-alike lesions
                                    removed, and those voxels' count
    <record>/<run>/heldout_counterfactual.csv   the counterfactual arm only: Dice on the same patients
                                    rendered without lesions, at both checkpoints
    <record>/<run>/weights.csv      one row per weight refresh: epoch, mean weight of the truly hard and the
                                    other training cases, cases above 1, smallest/largest weight and how many
                                    cases sit there, the refresh's false-alarm rate

A run recorded with the same configuration is skipped by the next sweep (:func:`is_recorded`); one recorded
with another configuration is an error naming the fields, never silently mixed or overwritten.
:func:`load_record` reads a record folder back for ``benchmarks/experiment_report.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CHECKPOINTS = ("best", "last")
# where run_one evaluates (divaware.experiment imports these: the record is the lower layer)
HELDOUT_TAG = "heldout"
HELDOUT_SPLIT = "all"
HELDOUT_CF_TAG = "heldout_counterfactual"
COHORT, CASES, RUN, HELDOUT, HELDOUT_CF, WEIGHTS = ("cohort.json", "heldout_cases.csv", "run.json", "heldout.csv",
                                                    "heldout_counterfactual.csv", "weights.csv")
# TrainConfig fields that are where a run lived, not what it did (differ between machines)
_PLACE = ("data_root", "out_dir", "cache_dir", "progress", "device", "num_workers")
CASE_COLUMNS = ("age_group", "menopause", "breast_density")


def _config_dict(config: Any) -> dict[str, Any]:
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in _PLACE}, sort_keys=True))


def is_recorded(record: str | Path, name: str, config: Any) -> bool:
    """Whether ``<record>/<name>`` holds a finished record of this configuration; a ValueError naming the fields
    when it holds one of another configuration (delete that folder to run it again)."""
    path = Path(record) / name / RUN
    if not path.is_file():
        return False
    done = json.loads(path.read_text())["config"]
    wanted = _config_dict(config)
    changed = sorted(k for k in set(done) | set(wanted) if done.get(k) != wanted.get(k))
    if changed:
        raise ValueError(f"{path.parent} records {name} with other settings ({', '.join(changed)}); delete that "
                         "folder to re-run it with the current configuration, or restore the configuration")
    return True


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _read_mask(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj) > 0


def lesion_scores(pred_dir: Path, root: Path, ids: list[str]) -> pd.DataFrame:
    """Per case: Dice as predicted, Dice with the predicted voxels inside the lesion label maps removed, and the
    number of those voxels (false positives in look-alike lesions; 0 without a lesion map)."""
    from divaware.metrics import dice
    from divaware.synthetic import LESION_DIR

    rows = []
    for pid in ids:
        pred_path = next((p for p in (pred_dir / f"{pid}.nii.gz", pred_dir / f"{pid.lower()}.nii.gz")
                          if p.is_file()), None)
        if pred_path is None:
            raise ValueError(f"{pred_dir} holds no prediction of {pid}; evaluate the run again")
        pred = _read_mask(pred_path)
        true = _read_mask(root / "segmentations" / "expert" / f"{pid}.nii.gz")
        lesion_path = root / LESION_DIR / f"{pid}.nii.gz"
        lesion = _read_mask(lesion_path) & ~true if lesion_path.is_file() else np.zeros_like(pred)
        rows.append({"patient_id": pid, "dice": float(dice(pred, true)),
                     "dice_no_lesion_fp": float(dice(pred & ~lesion, true)),
                     "lesion_fp": int(np.count_nonzero(pred & lesion))})
    return pd.DataFrame(rows).set_index("patient_id")


def _heldout_table(run: Path, root: Path, tag: str) -> pd.DataFrame:
    """Both checkpoints' lesion scores on one held-out cohort, one row per case."""
    from divaware import evaluate as ev

    parts = []
    for checkpoint in CHECKPOINTS:
        out = ev.evaluation_dir(run, HELDOUT_SPLIT, checkpoint, tag=tag)
        manifest = json.loads((out / ev.FILES["manifest"]).read_text())
        per_case = pd.read_csv(out / ev.FILES["per_case"], dtype={"patient_id": str}).set_index("patient_id")
        scores = lesion_scores(Path(manifest["predictions"]), root, list(per_case.index))
        # the evaluation's own Dice is the one reported; ours must agree with it (same masks, same formula)
        if not np.allclose(scores["dice"], per_case["dice"].reindex(scores.index), atol=1e-9):
            raise RuntimeError(f"{out}: Dice recomputed from the predictions differs from per_case.csv")
        parts.append(scores.add_suffix(f"_{checkpoint}"))
    return pd.concat(parts, axis=1)


def weights_summary(run: Path, hard_ids: set[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per refresh of ``weights_history.csv`` and the run's summary of what its weights did.

    A refresh at epoch e sets the weights of epochs e to the next refresh (one at the last epoch trains
    nothing); ``reweighted_epochs`` counts training epochs whose weights were not all equal, ``hard_over_rest``
    averages the hard/rest mean-weight ratio over the training epochs (1 = no re-weighting)."""
    from divaware.runfolder import RunFolder
    from divaware.weighting import run_false_alarm_rate

    folder = RunFolder(run)
    config = folder.read_config()
    epochs = int(config["epochs"])
    empty = {"reweighted_epochs": 0, "hard_over_rest": 1.0, "false_alarm_rate": math.nan, "refreshes": 0}
    if not folder.weights_history.is_file():
        return pd.DataFrame(), empty
    history = folder.read_weights_history()
    rows = []
    for epoch, part in history.groupby("epoch", sort=True):
        w = part["weight"].to_numpy(float)
        hard = part["patient_id"].astype(str).isin(hard_ids).to_numpy()
        rows.append({"epoch": int(epoch), "n": len(w), "n_hard": int(hard.sum()),
                     "hard_mean": float(w[hard].mean()) if hard.any() else math.nan,
                     "rest_mean": float(w[~hard].mean()) if (~hard).any() else math.nan,
                     "n_above_1": int((w > 1 + 1e-9).sum()),
                     "w_min": float(w.min()), "n_at_w_min": int((w <= w.min() + 1e-9).sum()),
                     "w_max": float(w.max()), "n_at_w_max": int((w >= w.max() - 1e-9).sum()),
                     "false_alarm_rate": float(part["false_alarm_rate"].iloc[0])
                     if "false_alarm_rate" in part.columns else math.nan})
    table = pd.DataFrame(rows)
    starts = table["epoch"].tolist()
    ends = [*starts[1:], epochs]
    spans = [max(0, min(e, epochs) - s) for s, e in zip(starts, ends, strict=True)]
    varied = (table["w_max"] - table["w_min"] > 1e-9).to_numpy()
    ratio = (table["hard_mean"] / table["rest_mean"]).to_numpy(float)
    used = np.asarray(spans) > 0
    summary = {"reweighted_epochs": int(sum(s for s, v in zip(spans, varied, strict=True) if v)),
               "hard_over_rest": float(np.average(ratio[used], weights=np.asarray(spans)[used]))
               if used.any() and not np.isnan(ratio[used]).any() else math.nan,
               "false_alarm_rate": float(run_false_alarm_rate(history)),
               "refreshes": int(used.sum())}
    return table, summary


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = True) -> None:
    from divaware.runfolder import write_text

    write_text(path, frame.to_csv(index=index, float_format="%.6g", lineterminator="\n"))


def _cohort_files(record: Path, root: Path, cases: pd.DataFrame) -> None:
    """Write (first run) or check (later runs) the held-out cohort's files of the record folder."""
    from divaware.runfolder import write_text
    from divaware.synthetic import read_truth

    truth = read_truth(root)
    table = cases[[c for c in CASE_COLUMNS if c in cases.columns]].copy()
    table["hard_subgroup"] = truth["hard_subgroup"].reindex(table.index).astype(str).str.lower().isin(("true", "1"))
    table["n_lesions"] = (truth["n_lesions"].reindex(table.index).fillna(0).astype(int)
                          if "n_lesions" in truth.columns else 0)
    about = {"heldout": root.name, "cases": len(table), "hard": int(table["hard_subgroup"].sum())}
    if (record / COHORT).is_file():
        done = json.loads((record / COHORT).read_text())
        if done != about:
            raise ValueError(f"{record} holds runs evaluated on held-out cohort {done['heldout']}, this run on "
                             f"{about['heldout']} (another generator version or size): results of two cohorts are "
                             "never mixed; record it elsewhere or delete the old records")
        return
    record.mkdir(parents=True, exist_ok=True)
    _write_csv(table.sort_index(), record / CASES)
    write_text(record / COHORT, json.dumps(about, indent=1) + "\n")


def record_run(run: str | Path, record: str | Path, *, mechanism: str, strategy: str, arm: bool, seed: int,
               config: Any, heldout: Path, heldout_cf: Path | None, seconds: float) -> Path:
    """Write the run's record folder ``<record>/<run name>`` (module docstring); returns it. Written last:
    ``run.json``, so a folder without it is an interrupted record (written again by the next sweep)."""
    from divaware import evaluate as ev
    from divaware.runfolder import RunFolder, write_text
    from divaware.synthetic import hard_subgroup
    from divaware.train import run_summary

    run, record = Path(run), Path(record)
    out = ev.evaluation_dir(run, HELDOUT_SPLIT, "best", tag=HELDOUT_TAG)
    cases = pd.read_csv(out / ev.FILES["per_case"], dtype={"patient_id": str}).set_index("patient_id")
    _cohort_files(record, Path(heldout), cases)
    folder = record / run.name
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(_heldout_table(run, Path(heldout), HELDOUT_TAG), folder / HELDOUT)
    if heldout_cf is not None:
        cf = _heldout_table(run, Path(heldout_cf), HELDOUT_CF_TAG)
        _write_csv(cf[[f"dice_{c}" for c in CHECKPOINTS]], folder / HELDOUT_CF)
    train_root = Path(RunFolder(run).read_config()["data_root"])  # the resolved cohort folder
    hard = hard_subgroup(train_root)
    table, weights = weights_summary(run, set(hard.index[hard]) if hard is not None else set())
    if not table.empty:
        _write_csv(table, folder / WEIGHTS, index=False)
    summary = run_summary(run)
    about = {"mechanism": mechanism, "run": run.name, "strategy": strategy, "arm": bool(arm),
             "seed": int(seed), "commit": _commit(), "training_cohort": train_root.name,
             "selected_epoch": summary["best_epoch"], "epochs": summary["epochs"],
             "train_minutes": round(summary["train_minutes"], 2), "wall_minutes": round(seconds / 60, 2),
             "weights": weights, "config": _config_dict(config)}
    write_text(folder / RUN, json.dumps(about, indent=1, sort_keys=False, allow_nan=True) + "\n")
    return folder


def load_record(record: str | Path) -> dict[str, Any]:
    """A record folder read back: ``cohort`` (dict), ``cases`` (held-out cases), ``runs`` (name -> run.json),
    ``heldout`` / ``counterfactual`` (name -> per-case table), ``weights`` (name -> per-refresh table)."""
    record = Path(record)
    if not (record / COHORT).is_file():
        raise ValueError(f"{record} holds no recorded run ({COHORT} missing); run the experiment with --record")
    cases = pd.read_csv(record / CASES, dtype={"patient_id": str}).set_index("patient_id")
    runs, heldout, counterfactual, weights = {}, {}, {}, {}
    for path in sorted(record.glob(f"*/{RUN}")):
        name = path.parent.name
        runs[name] = json.loads(path.read_text())
        heldout[name] = pd.read_csv(path.parent / HELDOUT, dtype={"patient_id": str}).set_index("patient_id")
        if (path.parent / HELDOUT_CF).is_file():
            counterfactual[name] = pd.read_csv(path.parent / HELDOUT_CF,
                                               dtype={"patient_id": str}).set_index("patient_id")
        if (path.parent / WEIGHTS).is_file():
            weights[name] = pd.read_csv(path.parent / WEIGHTS)
    return {"folder": record, "cohort": json.loads((record / COHORT).read_text()), "cases": cases, "runs": runs,
            "heldout": heldout, "counterfactual": counterfactual, "weights": weights}

