"""Write the experiment report (``benchmarks/EXPERIMENT.md`` and one figure per mechanism) from experiment folders.

    divaware experiment --config configs/experiment_lookalike.yaml --out runs/experiment/lookalike
    divaware experiment --config configs/experiment_lookalike_weak.yaml --out runs/experiment/lookalike_weak
    divaware experiment --config configs/experiment_intrinsic.yaml --out runs/experiment/intrinsic
    python benchmarks/experiment_report.py runs/experiment/lookalike runs/experiment/lookalike_weak runs/experiment/intrinsic

(Older folders -- runs/experiment/representation, no arms, no ladder -- are read as before.)

One section per experiment folder (= per disparity mechanism), each opening with the mechanism's **ladder** when
the experiment has the data arms (``arms: [counterfactual, balanced]``): the counterfactual arm's hard-group Dice
against the rest's on the counterfactual held-out cohort (the same patients without lesions); ERM's hard-group
loss to the lesions (counterfactual arm on the counterfactual cohort − ERM on the lesion cohort, paired by
held-out case) and the share of it due to false positives inside the lesions (ERM's Dice recomputed with its
predicted voxels inside the lesion label maps removed); then balanced, oracle and every strategy as the share of
that loss they recover, with their mean-Dice cost. Then the strategies. Every number is read from the run folders:
each run's evaluation on the held-out synthetic cohort (``evaluation_all_heldout``: per-case Dice, challenge
and fairness figures) and the held-out cohort's ``synthetic_truth.csv`` (which cases are truly hard).
Nothing is typed by hand. A run with fewer than the planned seeds or strategies is labelled a PARTIAL run in
the title and in every section (write it to another file, e.g. ``--out benchmarks/EXPERIMENT_preliminary.md``).

Statistics. Per strategy: mean ± 95 % t-interval over seeds. Paired comparisons with ERM: for every held-out
case, the Dice difference (strategy − ERM, same seed) averaged over the seeds both have; the 95 % CI is a
percentile bootstrap over cases (the unit that was sampled), so seeds are pooled without counting a case
twice. "Worst group" is ERM's worst known group (over age group, menopause, breast density; pooled over
seeds), held fixed for every strategy so that the differences are paired; "hard subgroup" is the truly hard
subgroup of the synthetic truth. Fraction of the oracle's gain = Δ(strategy) / Δ(oracle) on the worst group.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from _common import markdown_table, markers, rewrite_section
from scipy import stats

from divaware import evaluate as ev
from divaware import metrics
from divaware.experiment import ARMS, HELDOUT_CF_TAG, HELDOUT_SPLIT, HELDOUT_TAG
from divaware.plots import save_figure
from divaware.runfolder import RunFolder
from divaware.synthetic import LESION_DIR, read_truth

ATTRIBUTES = ("age_group", "menopause", "breast_density")
ORDER = ("erm", "inverse_frequency", "group_dro", "paper", "divaware", "oracle")
FULL_SEEDS = 5  # the bar: >= 5 seeds per strategy
BAR_GAIN, BAR_COST, BAR_FRACTION, NULL_GAIN = 0.05, 0.01, 0.5, 0.02
README = Path(__file__).resolve().parents[1] / "README.md"
README_BEGIN, README_END = markers("experiment")


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval (nan half-width for one value)."""
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def fmt(mean: float, half: float = math.nan, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    s = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return s if math.isnan(half) else f"{s} ± {half:.4f}"


markdown = markdown_table


def load_mechanism(folder: Path) -> dict[str, Any]:
    """Everything the report needs from one experiment folder (raises naming what is missing)."""
    plan_path = folder / "experiment.yaml"
    if not plan_path.is_file():
        raise SystemExit(f"{plan_path} not found: {folder} is not a `divaware experiment` folder")
    plan = yaml.safe_load(plan_path.read_text())
    table = ev.collect(folder / "runs", split=HELDOUT_SPLIT, tag=HELDOUT_TAG)
    if table.empty:
        raise SystemExit(f"no run under {folder / 'runs'} has been evaluated on the held-out cohort yet")
    table["seed"] = table["seed"].astype(int)
    # an arm trains with strategy erm: its name is the run folder's (<arm>_seed<seed>)
    table["method"] = table["run"].astype(str).str.replace(r"_seed\d+$", "", regex=True)
    cases, roots = {}, set()
    for run in table["run"]:
        out = ev.evaluation_dir(folder / "runs" / run, HELDOUT_SPLIT, tag=HELDOUT_TAG)
        roots.add(ev._read_json(out / ev.FILES["manifest"])["data_root"])
        cases[run] = pd.read_csv(out / ev.FILES["per_case"], dtype={"patient_id": str}).set_index("patient_id")
    if len(roots) != 1:
        raise SystemExit(f"runs under {folder} were evaluated on different held-out cohorts: {sorted(roots)}")
    truth = read_truth(next(iter(roots)))
    first = table["run"][~table["method"].isin(list(ARMS))]
    config = RunFolder(folder / "runs" / (first.iloc[0] if len(first) else table["run"].iloc[0])).read_config()
    counterfactual = {}  # the counterfactual arm on the counterfactual held-out cohort
    for run in table.loc[table["method"] == "counterfactual", "run"]:
        out = ev.evaluation_dir(folder / "runs" / run, HELDOUT_SPLIT, tag=HELDOUT_CF_TAG)
        if (out / ev.FILES["per_case"]).is_file():
            counterfactual[int(table.loc[table["run"] == run, "seed"].iloc[0])] = pd.read_csv(
                out / ev.FILES["per_case"], dtype={"patient_id": str}).set_index("patient_id")
    return {"folder": folder, "plan": plan, "table": table, "cases": cases, "truth": truth, "config": config,
            "heldout_root": next(iter(roots)), "weights": training_weights(folder / "runs", table),
            "counterfactual": counterfactual}


def training_weights(runs: Path, table: pd.DataFrame) -> pd.DataFrame:
    """What each run's strategy did to the training cases: one row per run, from ``weights_history.csv``.

    A refresh at epoch e sets the weights of the epochs from e to the next refresh (a refresh at the last epoch
    trains nothing). ``reweighted_epochs`` counts training epochs whose weights were not all equal;
    ``hard_over_rest`` is the mean weight of the truly hard training cases over that of the rest, averaged over
    the training epochs (1 = no re-weighting). GroupDRO adapts its weights per batch, so its history (the
    starting weights) is not a summary of it.
    """
    rows, truths = [], {}  # every run of a mechanism trains on the same cohort: read its truth once
    for r in table.itertuples():
        run = RunFolder(runs / r.run)
        if not run.weights_history.is_file():
            continue
        history = run.read_weights_history()
        config = run.read_config()
        try:
            root = config.get("data_root") or ""
            if root not in truths:
                truths[root] = read_truth(root)["hard_subgroup"]
            hard = truths[root]
        except (FileNotFoundError, ValueError):
            continue  # the training cohort is gone from the cache: no diagnostic, the report still stands
        starts = sorted(history["epoch"].unique())
        ends = [*starts[1:], int(config["epochs"])]
        ratios, spans, reweighted = [], [], 0
        for start, end in zip(starts, ends, strict=True):
            span = max(0, min(end, int(config["epochs"])) - int(start))
            if span == 0:
                continue
            part = history[history["epoch"] == start]
            is_hard = hard.reindex(part["patient_id"]).fillna(False).to_numpy(bool)
            w = part["weight"].to_numpy(float)
            ratios.append(w[is_hard].mean() / w[~is_hard].mean() if is_hard.any() else math.nan)
            spans.append(span)
            reweighted += span if w.max() - w.min() > 1e-9 else 0
        rows.append({"run": r.run, "method": r.method, "seed": int(r.seed), "epochs": int(sum(spans)),
                     "reweighted_epochs": reweighted,
                     "hard_over_rest": float(np.average(ratios, weights=spans)) if spans else math.nan})
    return pd.DataFrame(rows, columns=["run", "method", "seed", "epochs", "reweighted_epochs", "hard_over_rest"])


def weight_summary(mech: dict[str, Any], method: str) -> str:
    """The weights column of the report: epoch-averaged hard/rest weight ratio and re-weighted epochs, over seeds."""
    if method == "group_dro":
        return "adaptive (per batch)"
    w = mech["weights"]
    w = w[w["method"] == method]
    if w.empty:
        return "n/a"
    return f"{w['hard_over_rest'].mean():.2f} ({w['reweighted_epochs'].mean():.0f} of {w['epochs'].mean():.0f} epochs)"


def dice_matrix(mech: dict[str, Any], method: str) -> pd.DataFrame:
    """Per-case held-out Dice of ``method``: rows patient_id, one column per seed."""
    t = mech["table"][mech["table"]["method"] == method]
    return pd.DataFrame({int(r.seed): mech["cases"][r.run]["dice"] for r in t.itertuples()})


def erm_worst_group(mech: dict[str, Any], reference: str) -> tuple[str, str]:
    """ERM's worst known group over the attributes, pooled over seeds: (attribute, group)."""
    ref_runs = mech["table"].loc[mech["table"]["method"] == reference, "run"]
    pooled = pd.concat([mech["cases"][r] for r in ref_runs])
    best: tuple[float, str, str] | None = None
    for attr in ATTRIBUTES:
        if attr not in pooled.columns:
            continue
        known = pooled[pooled[attr].astype(str) != "unknown"]
        for group, dice in known.groupby(known[attr].astype(str))["dice"]:
            if best is None or dice.mean() < best[0]:
                best = (float(dice.mean()), attr, str(group))
    if best is None:
        raise SystemExit(f"no known group in {mech['folder']}")
    return best[1], best[2]


def paired(mech: dict[str, Any], method: str, reference: str, cases: pd.Index) -> tuple[float, float, float, int]:
    """Δ Dice (method − reference) on ``cases``: per-case mean over shared seeds, bootstrap CI over cases."""
    a, b = dice_matrix(mech, reference), dice_matrix(mech, method)
    seeds = sorted(set(a.columns) & set(b.columns))
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    d = (b.loc[cases, seeds] - a.loc[cases, seeds]).mean(axis=1).to_numpy(float)
    lo, hi = metrics.bootstrap_ci(d, seed=0)
    return float(d.mean()), lo, hi, len(seeds)


def analyse(mech: dict[str, Any], reference: str = "erm") -> dict[str, Any]:
    """The numbers of one mechanism's section (also used by the tests)."""
    table, truth = mech["table"], mech["truth"]
    present = set(table["method"]) - set(ARMS)
    methods = [m for m in ORDER if m in present] + sorted(present - set(ORDER))
    attr, group = erm_worst_group(mech, reference)
    some = mech["cases"][table["run"].iloc[0]]
    ids = some.index
    worst_ids = ids[some[attr].astype(str) == group]
    hard = truth["hard_subgroup"].reindex(ids).fillna(False).astype(bool)
    hard_ids, easy_ids = ids[hard.to_numpy()], ids[~hard.to_numpy()]

    rows = []
    for m in methods:
        t = table[table["method"] == m]
        dm = dice_matrix(mech, m)
        per_seed_worst = dm.loc[worst_ids].mean(axis=0)
        per_seed_hard = dm.loc[hard_ids].mean(axis=0)
        rows.append({"strategy": m, "seeds": sorted(t["seed"].tolist()),
                     **{k: mean_ci(t[k].tolist()) for k in ("mean_dice", "worst_group_dice", "gap", "es_dice",
                                                            "P", "F", "ranking")},
                     "erm_worst_group_dice": mean_ci(per_seed_worst.tolist()),
                     "hard_dice": mean_ci(per_seed_hard.tolist()),
                     "easy_dice": mean_ci(dm.loc[easy_ids].mean(axis=0).tolist())})
    summary = {r["strategy"]: r for r in rows}
    comps = {}
    for m in methods:
        if m == reference:
            continue
        comps[m] = {"method": m, "mean": paired(mech, m, reference, ids),
                    "worst": paired(mech, m, reference, worst_ids),
                    "hard": paired(mech, m, reference, hard_ids)}
    oracle = comps.get("oracle")
    for c in comps.values():
        for key in ("worst", "hard"):
            o = oracle[key][0] if oracle else math.nan
            c[f"fraction_{key}"] = c[key][0] / o if oracle and o > 0 else math.nan
    erm = summary.get(reference)
    erm_gap = erm["easy_dice"][0] - erm["hard_dice"][0] if erm else math.nan
    for c in comps.values():  # the share of the oracle's gain on the hard subgroup, with its CI over cases
        c["fraction_hard_ci"] = (ratio_ci(mech, c["method"], "oracle", reference, hard_ids)
                                 if oracle and c["method"] != "oracle" else (math.nan, math.nan))
    return {"methods": methods, "summary": summary, "comparisons": comps, "worst_group": (attr, group),
            "weights": mech["weights"], "ladder": ladder(mech, reference),
            "n_cases": len(ids), "n_worst": len(worst_ids), "n_hard": len(hard_ids), "erm_hard_gap": erm_gap,
            "oracle_closes": (oracle["hard"][0] / erm_gap if oracle and erm_gap > 0 else math.nan)}


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap CI over cases of mean(num) / mean(den) (the cases resampled jointly)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if len(num) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    d = den[idx].mean(axis=1)
    r = np.where(d != 0, num[idx].mean(axis=1) / np.where(d != 0, d, 1.0), np.nan)
    r = r[~np.isnan(r)]
    return (float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))) if len(r) else (math.nan, math.nan)


def _diff(mech: dict[str, Any], method: str, reference: str, cases: pd.Index,
          seeds: Sequence[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Per-case Dice difference (method − reference) on ``cases``, averaged over the shared seeds."""
    a, b = dice_matrix(mech, reference), dice_matrix(mech, method)
    shared = sorted(set(a.columns) & set(b.columns) & (set(seeds) if seeds is not None else set(a.columns)))
    if not shared:
        return np.full(len(cases), np.nan), []
    return (b.loc[cases, shared] - a.loc[cases, shared]).mean(axis=1).to_numpy(float), shared


def ratio_ci(mech: dict[str, Any], method: str, denominator: str, reference: str,
             cases: pd.Index) -> tuple[float, float]:
    """CI of Δ(method) / Δ(denominator) on ``cases`` (both vs ``reference``), over the seeds all three share."""
    seeds = sorted(set(dice_matrix(mech, method).columns) & set(dice_matrix(mech, denominator).columns))
    num, _ = _diff(mech, method, reference, cases, seeds)
    den, _ = _diff(mech, denominator, reference, cases, seeds)
    return _ratio_ci(num, den)


def _read_mask(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def lesion_fp_gain(mech: dict[str, Any], run: str, cases: Sequence[str]) -> pd.Series:
    """Per case: the run's held-out Dice with its predicted voxels inside the lesion label maps removed, minus
    its Dice as predicted (both computed here from the files): what its false positives in lesions cost it."""
    out = ev.evaluation_dir(mech["folder"] / "runs" / run, HELDOUT_SPLIT, tag=HELDOUT_TAG)
    pred_dir = Path(ev._read_json(out / ev.FILES["manifest"]).get("predictions") or out / "pred_segmentations")
    root = Path(mech["heldout_root"])
    gains = {}
    for pid in cases:
        lesion_path = root / LESION_DIR / f"{pid}.nii.gz"
        pred_path = next((p for p in (pred_dir / f"{pid}.nii.gz", pred_dir / f"{pid.lower()}.nii.gz") if p.is_file()),
                         None)
        if pred_path is None:
            raise SystemExit(f"{pred_dir} holds no prediction of {pid}; re-run the experiment's evaluation")
        if not lesion_path.is_file():
            gains[pid] = 0.0
            continue
        pred = _read_mask(pred_path) > 0
        true = _read_mask(root / "segmentations" / "expert" / f"{pid}.nii.gz") > 0
        lesion = _read_mask(lesion_path) > 0

        def dice(p: np.ndarray, t: np.ndarray = true) -> float:
            s = p.sum() + t.sum()
            return 1.0 if s == 0 else 2.0 * float((p & t).sum()) / float(s)

        gains[pid] = dice(pred & ~lesion) - dice(pred)
    return pd.Series(gains, dtype=float)


def ladder(mech: dict[str, Any], reference: str = "erm") -> dict[str, Any] | None:
    """The mechanism's ladder (module docstring), or None without a counterfactual arm evaluated on its cohort.

    Paired differences are per held-out case, averaged over the seeds both runs share (the held-out cohort and
    its counterfactual have the same patients); CIs are percentile bootstraps over cases.
    """
    cf = mech["counterfactual"]
    if not cf or reference not in set(mech["table"]["method"]):
        return None
    cfm = pd.DataFrame({s: d["dice"] for s, d in sorted(cf.items())})
    ids = cfm.index
    hard = mech["truth"]["hard_subgroup"].reindex(ids).fillna(False).to_numpy(bool)
    hard_ids, rest_ids = ids[hard], ids[~hard]
    per_seed_gap = [cfm.loc[rest_ids, s].mean() - cfm.loc[hard_ids, s].mean() for s in cfm.columns]
    rng = np.random.default_rng(0)
    h, r = cfm.loc[hard_ids].mean(axis=1).to_numpy(float), cfm.loc[rest_ids].mean(axis=1).to_numpy(float)
    boot = [r[rng.integers(0, len(r), len(r))].mean() - h[rng.integers(0, len(h), len(h))].mean() for _ in range(2000)]
    erm = dice_matrix(mech, reference)
    seeds = sorted(set(cfm.columns) & set(erm.columns))
    if not seeds:
        return None
    loss = (cfm.loc[hard_ids, seeds] - erm.loc[hard_ids, seeds]).mean(axis=1).to_numpy(float)
    erm_runs = mech["table"][(mech["table"]["method"] == reference) & mech["table"]["seed"].isin(seeds)]
    fp = pd.concat([lesion_fp_gain(mech, run, list(hard_ids)) for run in erm_runs["run"]], axis=1).mean(axis=1)
    fp = fp.reindex(hard_ids).to_numpy(float)
    res: dict[str, Any] = {
        "seeds": seeds, "n_hard": len(hard_ids), "n_rest": len(rest_ids),
        "cf_hard": float(h.mean()), "cf_rest": float(r.mean()),
        "cf_gap": (float(np.mean(per_seed_gap)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
        "erm_hard": float(erm.loc[hard_ids, seeds].mean(axis=1).mean()),
        "loss": (float(loss.mean()), *metrics.bootstrap_ci(loss, seed=0)),
        "fp_share": (float(fp.mean() / loss.mean()) if loss.mean() > 0 else math.nan, *_ratio_ci(fp, loss)),
        "rungs": {},
    }
    for m in [x for x in ("balanced", "oracle", *ORDER) if x != reference]:
        if m in res["rungs"] or m not in set(mech["table"]["method"]):
            continue
        d = dice_matrix(mech, m)
        shared = sorted(set(seeds) & set(d.columns))
        if not shared:
            continue
        gain = (d.loc[hard_ids, shared] - erm.loc[hard_ids, shared]).mean(axis=1).to_numpy(float)
        den = (cfm.loc[hard_ids, shared] - erm.loc[hard_ids, shared]).mean(axis=1).to_numpy(float)
        res["rungs"][m] = {"seeds": shared, "hard": (float(gain.mean()), *metrics.bootstrap_ci(gain, seed=0)),
                           "recovered": (float(gain.mean() / den.mean()) if den.mean() > 0 else math.nan,
                                         *_ratio_ci(gain, den)),
                           "mean": paired(mech, m, reference, ids)[:3]}
    return res


LADDER_BAR = {"cf_gap": 0.01, "loss": 0.08, "fp_share": 0.6, "balanced": 0.8, "oracle": 0.5, "cost": 0.01}


def ladder_text(lad: dict[str, Any], mechanism: str = "lookalike") -> str:
    """The ladder's table and its rung-by-rung check against the issue's bar (the dose control's oracle: ≤ 25 %)."""
    def pct(x: tuple[float, ...]) -> str:
        return "n/a" if math.isnan(x[0]) else f"{100 * x[0]:.0f} % [{100 * x[1]:.0f}, {100 * x[2]:.0f}]"

    def ci(x: tuple[float, ...]) -> str:
        return "n/a" if math.isnan(x[0]) else f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]"

    rows = [{"rung": "counterfactual (no lesions)", "seeds": len(lad["seeds"]),
             "hard-group Dice": f"{lad['cf_hard']:.4f}", "vs the rest": f"rest {lad['cf_rest']:.4f}, gap "
             f"{ci(lad['cf_gap'])}", "share of ERM's loss recovered": "–", "Δ mean Dice vs ERM": "–"},
            {"rung": "ERM (lesions)", "seeds": len(lad["seeds"]), "hard-group Dice": f"{lad['erm_hard']:.4f}",
             "vs the rest": f"loss to the lesions {ci(lad['loss'])}; false positives in lesions "
             f"{pct(lad['fp_share'])} of it", "share of ERM's loss recovered": "0 %", "Δ mean Dice vs ERM": "0"}]
    for m, x in lad["rungs"].items():
        rows.append({"rung": m, "seeds": len(x["seeds"]), "hard-group Dice": f"{lad['erm_hard'] + x['hard'][0]:.4f}",
                     "vs the rest": f"Δ hard {ci(x['hard'])}", "share of ERM's loss recovered": pct(x["recovered"]),
                     "Δ mean Dice vs ERM": ci(x["mean"])})
    b = LADDER_BAR
    checks = [
        (f"counterfactual hard Dice within {b['cf_gap']} of the rest", abs(lad["cf_gap"][0]) <= b["cf_gap"]),
        (f"ERM loses ≥ {b['loss']} to the lesions", lad["loss"][0] >= b["loss"]),
        (f"≥ {100 * b['fp_share']:.0f} % of it false positives in lesions", lad["fp_share"][0] >= b["fp_share"]),
    ]
    if "balanced" in lad["rungs"]:
        checks.append((f"balanced recovers ≥ {100 * b['balanced']:.0f} %",
                       lad["rungs"]["balanced"]["recovered"][0] >= b["balanced"]))
    if "oracle" in lad["rungs"] and mechanism == "lookalike_weak":
        checks.append(("the weak cue's oracle recovers ≤ 25 %", lad["rungs"]["oracle"]["recovered"][0] <= 0.25))
    elif "oracle" in lad["rungs"]:
        o = lad["rungs"]["oracle"]
        checks.append((f"oracle recovers ≥ {100 * b['oracle']:.0f} % at a mean-Dice cost ≤ {b['cost']}",
                       o["recovered"][0] >= b["oracle"] and o["mean"][0] >= -b["cost"]))
    verdict_ = "; ".join(f"{name}: {'holds' if ok else 'FAILS'}" for name, ok in checks)
    return f"""### Ladder

{lad['n_hard']} hard and {lad['n_rest']} other held-out cases. The counterfactual arm is ERM trained and evaluated
on the same patients rendered without lesions; ERM's loss to the lesions is counterfactual − ERM per hard case
(paired, mean over the seeds both share); the false-positive share is ERM's Dice gain when its predicted voxels
inside the lesion label maps are removed, over that loss; the other rungs' share is their hard-group gain over
ERM divided by that loss (95 % bootstrap CIs over cases, the ratio's numerator and denominator resampled together).

{markdown(pd.DataFrame(rows))}

Rungs against the bar: {verdict_}.
"""


def verdict(mechanism: str, res: dict[str, Any], partial: bool) -> str:
    """The plain-words conclusion of one section, computed from the numbers."""
    c = res["comparisons"]
    lines = []
    o = c.get("oracle")
    if o is None:
        lines.append("No oracle run: the ceiling of re-weighting on this cohort is unknown.")
    else:
        gain, lo, hi, _ = o["hard"]
        lines.append(f"The oracle (perfect knowledge of the hard subgroup) changes the hard subgroup's Dice by "
                     f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}], closing {100 * res['oracle_closes']:.0f} % of ERM's "
                     f"hard-vs-rest gap of {res['erm_hard_gap']:.3f}; on ERM's worst group "
                     f"({res['worst_group'][0]}={res['worst_group'][1]}) by {o['worst'][0]:+.3f} "
                     f"[{o['worst'][1]:+.3f}, {o['worst'][2]:+.3f}].")
        if mechanism == "intrinsic":
            ok = abs(o["hard"][0]) < NULL_GAIN and abs(o["worst"][0]) < NULL_GAIN
            lines.append("As a negative control this behaves as designed: re-weighting cannot recover what the "
                         "images do not show." if ok else
                         f"Not the negative control intended: the oracle moves the hard subgroup by ≥ {NULL_GAIN}.")
        else:
            ok = res["oracle_closes"] >= 0.5 and o["hard"][1] > 0
            lines.append("Re-weighting the right cases closes at least half of the gap: the disparity is "
                         "learnable (a representation disparity)." if ok else
                         "Even perfect re-weighting closes less than half of the gap (or its CI includes 0): on "
                         "this cohort the disparity is mostly not fixable by re-weighting.")
            if mechanism == "default":
                kind = ("like `representation` (learnable)" if ok else
                        "like `intrinsic` (re-weighting cannot close it)" if abs(o["hard"][0]) < NULL_GAIN else
                        "between the two controls: partly learnable")
                lines.append(f"The original synthetic cohort therefore behaves {kind}.")
    d = c.get("divaware")
    if d is not None:
        gain, lo, hi, _ = d["worst"]
        cost = d["mean"][0]
        if mechanism == "intrinsic":
            claims = [m for m, x in c.items() if m != "oracle" and x["worst"][1] > 0]
            lines.append(("No strategy claims a worst-group gain its CI does not support" if not claims else
                          f"{', '.join(claims)} show a worst-group gain whose CI excludes 0") +
                         f"; divaware's mean-Dice change is {cost:+.4f} (bar: ≥ −{BAR_COST}).")
        else:
            frac = d["fraction_worst"]
            bar = gain >= BAR_GAIN and lo > 0 and cost >= -BAR_COST and frac >= BAR_FRACTION
            w = res["weights"]
            w = w[w["method"] == "divaware"]
            if len(w) and w["reweighted_epochs"].sum() < 0.5 * w["epochs"].sum():
                lines.append(f"divaware re-weighted only {w['reweighted_epochs'].sum()} of {w['epochs'].sum()} "
                             f"training epochs over its {len(w)} runs (hard/rest weight ratio "
                             f"{w['hard_over_rest'].mean():.2f} on average): at most refreshes no subgroup passed "
                             "its false-discovery control on the fairness-validation split, and those epochs are "
                             "ERM.")
            lines.append(f"divaware: worst-group Δ {gain:+.4f} [{lo:+.4f}, {hi:+.4f}], mean Dice Δ {cost:+.4f}, "
                         f"{'n/a' if math.isnan(frac) else f'{100 * frac:.0f} %'} of the oracle's gain — the bar "
                         f"(Δ ≥ {BAR_GAIN} with CI > 0, cost ≤ {BAR_COST}, ≥ {100 * BAR_FRACTION:.0f} % of the "
                         f"oracle) is {'met' if bar else 'NOT met'}.")
    if partial:
        lines.append("These are preliminary numbers from a partial run; read the intervals, not the verdicts.")
    return " ".join(lines)


def figure(mech: dict[str, Any], res: dict[str, Any], path: Path) -> None:
    import seaborn as sns
    from matplotlib.figure import Figure

    methods = res["methods"]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    sns.scatterplot(data=mech["table"], x="mean_dice", y="worst_group_dice", hue="method", hue_order=methods,
                    style="method", s=70, ax=ax1)
    ax1.set_xlabel("mean held-out Dice")
    ax1.set_ylabel("worst-group held-out Dice")
    ax1.set_title("one point per run (strategy × seed)")
    comp = [(m, res["comparisons"][m]["worst"]) for m in methods if m in res["comparisons"]]
    y = np.arange(len(comp))
    for i, (_, (mean, lo, hi, _n)) in enumerate(comp):
        ax2.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]] if not math.isnan(lo) else None, fmt="o", capsize=4)
    ax2.axvline(0, color="grey", lw=1)
    ax2.set_yticks(y, [m for m, _ in comp])
    attr, group = res["worst_group"]
    ax2.set_xlabel(f"Δ Dice vs ERM on {attr}={group} (paired, 95 % CI)")
    ax2.set_title("gain on ERM's worst group")
    fig.suptitle(f"{mech['plan']['disparity']} mechanism, held-out synthetic cohort ({res['n_cases']} cases)")
    save_figure(fig, path)


def section(mech: dict[str, Any], res: dict[str, Any], fig_rel: str, partial: bool) -> str:
    plan, cfg = mech["plan"], mech["config"]
    mechanism = plan["disparity"]
    s = res["summary"]
    rows = []
    for m in res["methods"]:
        r = s[m]
        rows.append({"strategy": m, "seeds": len(r["seeds"]), "mean Dice": fmt(*r["mean_dice"]),
                     "worst-group Dice": fmt(*r["worst_group_dice"]), "gap": fmt(*r["gap"]),
                     "ES-Dice": fmt(*r["es_dice"]), "ranking": fmt(*r["ranking"]),
                     "hard-subgroup Dice": fmt(*r["hard_dice"]),
                     "weight hard / rest": weight_summary(mech, m)})
    attr, group = res["worst_group"]
    comp_rows = []
    for m, c in res["comparisons"].items():
        def ci(x: tuple[float, float, float, int]) -> str:
            return f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]" if not math.isnan(x[0]) else "n/a"
        comp_rows.append({"strategy": m, "seed pairs": c["mean"][3], "Δ mean Dice": ci(c["mean"]),
                          f"Δ {attr}={group}": ci(c["worst"]), "Δ hard subgroup": ci(c["hard"]),
                          "fraction of the oracle's gain": "n/a" if math.isnan(c["fraction_worst"])
                          else f"{100 * c['fraction_worst']:.0f} %",
                          "… on the hard subgroup [CI]": "n/a" if math.isnan(c["fraction_hard"]) else
                          f"{100 * c['fraction_hard']:.0f} %" + ("" if math.isnan(c["fraction_hard_ci"][0]) else
                          f" [{100 * c['fraction_hard_ci'][0]:.0f}, {100 * c['fraction_hard_ci'][1]:.0f}]")})
    planned = f"{len(plan['strategies'])} strategies × seeds {plan['seeds']}"
    if plan.get("arms"):
        planned += f", arms {plan['arms']}"
    done = f"{len(res['methods'])} strategies × seeds {sorted(set(mech['table']['seed']))}"
    head = f"## Mechanism `{mechanism}`{' — PARTIAL RUN' if partial else ''}\n\n"
    if res.get("ladder"):
        head += ladder_text(res["ladder"], mechanism) + "\n### Strategies\n\n"
    return head + f"""Runs: {done} (planned: {planned}); {cfg['epochs']} epochs, UNet channels {cfg['channels']},
α = {cfg['alpha']}, batch {cfg['batch_size']}, training cohort {cfg['synthetic_cases']} cases (seed
{cfg['synthetic_seed']}). Held-out test cohort: {res['n_cases']} cases (seed {plan['heldout']['seed']}), of which
{res['n_hard']} in the truly hard subgroup and {res['n_worst']} in ERM's worst group {attr}={group}.

{markdown(pd.DataFrame(rows))}

Mean ± 95 % t-interval over seeds. Worst group, gap and ES-Dice over the known groups of age group, menopausal
status and breast density (worst across the three); ranking = the challenge's ½P + ½F on the held-out cohort;
hard subgroup = the synthetic truth's (age ≤ 40, premenopausal, density c/d). Weight hard / rest: mean
training weight of the truly hard cases over the rest's, averaged over training epochs and seeds (1 = no
re-weighting), with the mean number of epochs whose weights were not all equal (divaware's weights return to
1 at a refresh where no itemset passes its false-discovery control).

Paired with ERM (per-case Dice difference averaged over the shared seeds; 95 % bootstrap CI over cases):

{markdown(pd.DataFrame(comp_rows)) if comp_rows else "(no strategy besides ERM)"}

ERM's hard-vs-rest gap: {fmt(res['erm_hard_gap'])}; the oracle closes
{'n/a' if math.isnan(res['oracle_closes']) else f"{100 * res['oracle_closes']:.0f} %"} of it.

**Verdict.** {verdict(mechanism, res, partial)}

![{mechanism}](../figures/{fig_rel})
"""


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="experiment folders (one per mechanism)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("EXPERIMENT.md"))
    parser.add_argument("--figures", type=Path, default=Path(__file__).parents[1] / "figures",
                        help="folder for the figures experiment_<mechanism>[_<out stem suffix>].png")
    parser.add_argument("--reference", default="erm")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README whose experiment section to rewrite (default: the checkout's README when "
                             "writing a complete EXPERIMENT.md; never for other --out files unless given)")
    args = parser.parse_args(argv)

    mechs = [load_mechanism(f) for f in args.folders]
    results = [analyse(m, args.reference) for m in mechs]
    partial_any = False
    sections = []
    suffix = "" if args.out.stem == "EXPERIMENT" else "_" + args.out.stem.lower().replace("experiment_", "")
    for mech, res in zip(mechs, results, strict=True):
        seeds_done = {m: len(res["summary"][m]["seeds"]) for m in res["methods"]}
        arms_done = set(mech["table"]["method"]) & set(ARMS)
        partial = (set(mech["plan"]["strategies"]) - set(res["methods"])) != set() or \
            (set(mech["plan"].get("arms") or []) - arms_done) != set() or \
            min(seeds_done.values()) < len(mech["plan"]["seeds"])
        # the bar's >= 5 seeds applies to the two controls; the default cohort's placement is a side question
        if mech["plan"]["disparity"] != "default":
            partial |= len(mech["plan"]["seeds"]) < FULL_SEEDS
        partial_any |= partial
        name = f"experiment_{mech['plan']['disparity']}{suffix}.png"
        figure(mech, res, args.figures / name)
        sections.append(section(mech, res, name, partial))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    title = "# Experiment: when does divergence-aware training close the gap? (synthetic cohorts)"
    if partial_any:
        title += " — PRELIMINARY, PARTIAL RUN"
    command = "python benchmarks/experiment_report.py " + " ".join(str(f) for f in args.folders)
    if args.out.name != "EXPERIMENT.md":
        command += f" --out {args.out.as_posix()}"
    text = f"""{title}

Generated by `{command}` on {machine}. Synthetic cohorts only: these are **not** MAMA-MIA results.
Each run trains on its cohort's challenge train split (model selection and weights on the fairness-validation
split carved from it) and is evaluated once on a large held-out cohort from the same generator and mechanism
(another seed, every case a test case), never used for training or selection.
{"" if not partial_any else chr(10) + "**Partial run**: fewer seeds and/or strategies than planned (see each section); the numbers are preliminary." + chr(10)}
The `oracle` up-weights the truly hard cases (from the synthetic truth) with divaware's mean-1 normalisation
and clip: its gain is what subgroup re-weighting could achieve on that cohort.

{chr(10).join(sections)}"""
    args.out.write_text(text)
    print(text)
    if args.readme is None and args.out.name == "EXPERIMENT.md" and not partial_any:
        args.readme = README
    if args.readme is not None:
        rewrite_readme(args.readme, readme_section(mechs, results, command))
        print(f"rewrote the experiment section of {args.readme}")
    return text


def readme_section(mechs: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]], command: str) -> str:
    """The README's headline tables: one compact table and the verdict per mechanism."""
    def ci(x: tuple[float, float, float, int]) -> str:
        return "–" if math.isnan(x[0]) else f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"

    lines = [README_BEGIN, f"Written by `{command}` from the same runs as "
             "[`benchmarks/EXPERIMENT.md`](benchmarks/EXPERIMENT.md) (held-out cohort; mean over seeds; "
             "Δ = paired per-case difference vs ERM pooled over seeds, 95 % bootstrap CI over cases).", ""]
    for mech, res in zip(mechs, results, strict=True):
        attr, group = res["worst_group"]
        lines += [f"**`{mech['plan']['disparity']}`** ({res['n_cases']} held-out cases, {res['n_hard']} truly hard, "
                  f"{res['n_worst']} in ERM's worst group {attr}={group}):", "",
                  f"| strategy | seeds | mean Dice | hard-subgroup Dice | Δ mean Dice | Δ hard subgroup | "
                  f"Δ {attr}={group} | share of the oracle's gain |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in res["methods"]:
            r, c = res["summary"][m], res["comparisons"].get(m)
            frac = c["fraction_worst"] if c else math.nan
            lines.append(f"| {m} | {len(r['seeds'])} | {r['mean_dice'][0]:.3f} | {r['hard_dice'][0]:.3f} | "
                         f"{ci(c['mean']) if c else '–'} | {ci(c['hard']) if c else '–'} | "
                         f"{ci(c['worst']) if c else '–'} | {'–' if math.isnan(frac) else f'{100 * frac:.0f} %'} |")
        lines += ["", f"*{verdict(mech['plan']['disparity'], res, False)}*", ""]
    lines.append(README_END)
    return "\n".join(lines)


def rewrite_readme(readme: Path, text: str) -> None:
    rewrite_section(readme, "experiment", text.strip().removeprefix(README_BEGIN).removesuffix(README_END))


if __name__ == "__main__":
    main()
