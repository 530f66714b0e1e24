"""Write the experiment report (``benchmarks/EXPERIMENT.md``, one figure per mechanism, the README's headline
section) from the committed per-run records under ``benchmarks/experiment/<mechanism>/``.

    python benchmarks/experiment_sweep.py      # trains, evaluates, records and commits run by run
    python benchmarks/experiment_report.py     # this report, from the records alone (no run folder needed)

Every number is computed here from the records (:mod:`divaware.experiment_record`): per held-out case, the Dice
of each run at its validation-selected checkpoint and at its last epoch, the Dice with its predicted voxels
inside look-alike lesions removed, the counterfactual arm's Dice on the same patients without lesions, and what
each run's weights did. The report names the runs it covers in a comment line, and a test regenerates it from
exactly those records (``--runs-from benchmarks/EXPERIMENT.md``) and compares the text.

Statistics. Paired comparisons: for every held-out case, the Dice difference (run − ERM, same seed) averaged
over the seeds both have; 95 % CIs are percentile bootstraps over cases (the unit sampled), seeds pooled without
counting a case twice; a ratio (a share of ERM's loss, of the oracle's gain) resamples its numerator and
denominator together. Per-strategy levels: mean ± 95 % t-interval over seeds (the seed-to-seed noise).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from _common import markdown_table, markers, rewrite_section
from scipy import stats

from divaware import metrics
from divaware.experiment_record import CHECKPOINTS, load_record
from divaware.plots import save_figure

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "experiment"
MECHANISMS = ("lookalike", "lookalike_weak", "intrinsic")
ATTRIBUTES = ("age_group", "menopause", "breast_density")
ORDER = ("erm", "inverse_frequency", "group_dro", "febs", "paper", "divaware", "oracle")
ARMS = ("counterfactual", "balanced")
MIN_WORST = 20  # ERM's worst group is chosen among known groups of at least this many held-out cases
COST = 0.01  # the positive control's bar: the oracle's mean-Dice cost at most this
README = ROOT / "README.md"
RUNS_LINE = re.compile(r"^<!-- runs: (.*) -->$", re.M)


# -- reading --------------------------------------------------------------------------------------------------


def load(folder: Path, only: set[str] | None = None) -> dict[str, Any]:
    """One mechanism's records (``only``: ``<mechanism>/<run>`` names to keep), with its planned config."""
    rec = load_record(folder)
    mech = folder.name
    if only is not None:
        for key in ("runs", "heldout", "counterfactual", "weights"):
            rec[key] = {k: v for k, v in rec[key].items() if f"{mech}/{k}" in only}
    plan_path = ROOT / "configs" / f"experiment_{mech}.yaml"
    rec["plan"] = yaml.safe_load(plan_path.read_text()) if plan_path.is_file() else {}
    rec["mechanism"] = mech
    rec["method"] = {name: re.sub(r"_seed\d+$", "", name) for name in rec["runs"]}
    return rec


def dice(mech: dict[str, Any], method: str, checkpoint: str, column: str = "dice",
         counterfactual: bool = False) -> pd.DataFrame:
    """Per held-out case (rows) and seed (columns): ``column`` of ``method``'s runs at ``checkpoint``."""
    source = mech["counterfactual"] if counterfactual else mech["heldout"]
    cols = {int(mech["runs"][r]["seed"]): t[f"{column}_{checkpoint}"] for r, t in source.items()
            if mech["method"][r] == method}
    return pd.DataFrame(dict(sorted(cols.items())), index=mech["cases"].index) if cols else pd.DataFrame()


def methods(mech: dict[str, Any]) -> list[str]:
    present = set(mech["method"].values()) - set(ARMS)
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


# -- statistics -----------------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval over seeds (nan half-width for one value)."""
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(num) / mean(den) and its 95 % percentile bootstrap CI over cases (resampled jointly)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if len(num) < 2 or den.mean() == 0:
        return math.nan, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    d = den[idx].mean(axis=1)
    r = num[idx].mean(axis=1)[d != 0] / d[d != 0]
    return float(num.mean() / den.mean()), float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def mean_boot(d: np.ndarray) -> tuple[float, float, float]:
    d = np.asarray(d, float)
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    lo, hi = metrics.bootstrap_ci(d, seed=0)
    return float(d.mean()), lo, hi


def shared(*frames: pd.DataFrame) -> list[int]:
    if any(f.empty for f in frames):
        return []
    return sorted(set.intersection(*(set(f.columns) for f in frames)))


def per_case(frame: pd.DataFrame, cases: pd.Index, seeds: list[int]) -> np.ndarray:
    """Per case of ``cases``: the mean over ``seeds``."""
    return frame.loc[cases, seeds].mean(axis=1).to_numpy(float)


def erm_worst_group(mech: dict[str, Any]) -> tuple[str, str, pd.Index]:
    """ERM's worst known group (pooled over seeds, selected checkpoint, n ≥ MIN_WORST): attribute, group, cases."""
    erm = dice(mech, "erm", "best").mean(axis=1)
    cases = mech["cases"]
    best: tuple[float, str, str] | None = None
    for attr in ATTRIBUTES:
        values = cases[attr].astype(str)
        for group in sorted(set(values) - {"unknown", "nan"}):
            members = values.index[values == group]
            if len(members) >= mech.get("min_worst", MIN_WORST) and (best is None or erm[members].mean() < best[0]):
                best = (float(erm[members].mean()), attr, group)
    if best is None:
        raise SystemExit(f"no known group of ≥ {mech.get('min_worst', MIN_WORST)} cases in {mech['folder']}")
    return best[1], best[2], cases.index[cases[best[1]].astype(str) == best[2]]


def hard_cases(mech: dict[str, Any]) -> tuple[pd.Index, pd.Index]:
    hard = mech["cases"]["hard_subgroup"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    return mech["cases"].index[hard], mech["cases"].index[~hard]


def fp_cost(mech: dict[str, Any], method: str, checkpoint: str) -> pd.DataFrame:
    """Per case and seed: what the run's false positives inside lesions cost its Dice."""
    return dice(mech, method, checkpoint, "dice_no_lesion_fp") - dice(mech, method, checkpoint)


def ladder(mech: dict[str, Any], checkpoint: str) -> dict[str, Any] | None:
    """The look-alike ladder at one checkpoint, or None without an evaluated counterfactual arm."""
    cf, erm = dice(mech, "counterfactual", checkpoint, counterfactual=True), dice(mech, "erm", checkpoint)
    seeds = shared(cf, erm)
    if not seeds:
        return None
    hard, rest = hard_cases(mech)
    h, r = per_case(cf, hard, seeds), per_case(cf, rest, seeds)
    rng = np.random.default_rng(0)
    boot = [r[rng.integers(0, len(r), len(r))].mean() - h[rng.integers(0, len(h), len(h))].mean()
            for _ in range(2000)]
    loss = per_case(cf, hard, seeds) - per_case(erm, hard, seeds)
    fp = per_case(fp_cost(mech, "erm", checkpoint), hard, seeds)
    res: dict[str, Any] = {
        "seeds": seeds, "n_hard": len(hard), "n_rest": len(rest), "cf_hard": float(h.mean()),
        "cf_rest": float(r.mean()), "cf_gap": (float(r.mean() - h.mean()), *np.percentile(boot, [2.5, 97.5])),
        "erm_hard": float(per_case(erm, hard, seeds).mean()), "loss": mean_boot(loss),
        "fp_share": ratio_ci(fp, loss), "rungs": {}}
    for m in ("balanced", "oracle", *[x for x in methods(mech) if x not in ("erm", "oracle")]):
        d = dice(mech, m, checkpoint)
        both = shared(cf, erm, d)
        if not both:
            continue
        gain = per_case(d, hard, both) - per_case(erm, hard, both)
        den = per_case(cf, hard, both) - per_case(erm, hard, both)
        fp_e, fp_m = per_case(fp_cost(mech, "erm", checkpoint), hard, both), per_case(fp_cost(mech, m, checkpoint),
                                                                                     hard, both)
        all_ids = mech["cases"].index
        res["rungs"][m] = {"seeds": both, "hard": mean_boot(gain), "recovered": ratio_ci(gain, den),
                           "fp_removed": ratio_ci(fp_e - fp_m, fp_e),
                           "mean": mean_boot(per_case(d, all_ids, both) - per_case(erm, all_ids, both))}
    return res


def compare(mech: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """Every strategy against ERM (paired) and as a share of the oracle's gain, at one checkpoint."""
    attr, group, worst = erm_worst_group(mech)
    hard, _ = hard_cases(mech)
    ids = mech["cases"].index
    erm, oracle = dice(mech, "erm", checkpoint), dice(mech, "oracle", checkpoint)
    lesions = mech["cases"]["n_lesions"].sum() > 0
    rows = {}
    for m in methods(mech):
        d = dice(mech, m, checkpoint)
        runs = [r for r in mech["runs"] if mech["method"][r] == m]
        w = [mech["runs"][r]["weights"] for r in runs]
        row: dict[str, Any] = {
            "seeds": sorted(d.columns.tolist()), "mean": mean_ci(d.mean(axis=0).tolist()),
            "hard_level": mean_ci(d.loc[hard].mean(axis=0).tolist()),
            "reweighted": float(np.mean([x["reweighted_epochs"] for x in w])),
            "epochs": float(np.mean([mech["runs"][r]["epochs"] for r in runs])),
            "hard_over_rest": float(np.mean([x["hard_over_rest"] for x in w])),
            "false_alarm": float(np.nanmean([x["false_alarm_rate"] for x in w]))
            if any(not math.isnan(x["false_alarm_rate"]) for x in w) else math.nan,
            "selected": float(np.mean([mech["runs"][r]["selected_epoch"] for r in runs]))}
        if m != "erm":
            seeds = shared(erm, d)
            for key, cases in (("d_mean", ids), ("d_worst", worst), ("d_hard", hard)):
                row[key] = mean_boot(per_case(d, cases, seeds) - per_case(erm, cases, seeds)) if seeds \
                    else (math.nan,) * 3
            both = shared(erm, d, oracle)
            if both and m != "oracle":
                num = per_case(d, hard, both) - per_case(erm, hard, both)
                den = per_case(oracle, hard, both) - per_case(erm, hard, both)
                row["of_oracle"] = ratio_ci(num, den)
                if lesions:
                    fe = per_case(fp_cost(mech, "erm", checkpoint), hard, both)
                    row["of_oracle_fp"] = ratio_ci(fe - per_case(fp_cost(mech, m, checkpoint), hard, both),
                                                   fe - per_case(fp_cost(mech, "oracle", checkpoint), hard, both))
        rows[m] = row
    erm_gap = (erm.loc[~ids.isin(hard)].mean(axis=0) - erm.loc[hard].mean(axis=0)).mean() if not erm.empty else math.nan
    return {"rows": rows, "worst": (attr, group, len(worst)), "n_cases": len(ids), "n_hard": len(hard),
            "erm_gap": float(erm_gap)}


# -- text -----------------------------------------------------------------------------------------------------


def ci(x: Sequence[float], digits: int = 3) -> str:
    if x is None or math.isnan(x[0]):
        return "n/a"
    if math.isnan(x[1]):
        return f"{x[0]:+.{digits}f}"
    return f"{x[0]:+.{digits}f} [{x[1]:+.{digits}f}, {x[2]:+.{digits}f}]"


def pct(x: Sequence[float] | None) -> str:
    if x is None or math.isnan(x[0]):
        return "n/a"
    return f"{100 * x[0]:.0f} %" + ("" if math.isnan(x[1]) else f" [{100 * x[1]:.0f}, {100 * x[2]:.0f}]")


def level(x: tuple[float, float]) -> str:
    return "n/a" if math.isnan(x[0]) else f"{x[0]:.3f}" + ("" if math.isnan(x[1]) else f" ± {x[1]:.3f}")


def control_holds(lad: dict[str, Any] | None) -> bool | None:
    """The positive control's criterion: the oracle's hard-group gain has a CI above 0 at a mean cost ≤ COST."""
    if not lad or "oracle" not in lad["rungs"]:
        return None
    o = lad["rungs"]["oracle"]
    return bool(o["hard"][1] > 0 and o["mean"][0] >= -COST)


def ladder_text(lad: dict[str, Any], checkpoint: str) -> str:
    rows = [{"rung": "counterfactual (no lesions)", "seeds": len(lad["seeds"]), "hard-group Dice": f"{lad['cf_hard']:.3f}",
             "Δ hard vs ERM": "–", "share of ERM's loss recovered": "–", "lesion FPs removed": "–",
             "Δ mean Dice vs ERM": "–"},
            {"rung": "ERM (lesions)", "seeds": len(lad["seeds"]), "hard-group Dice": f"{lad['erm_hard']:.3f}",
             "Δ hard vs ERM": "0", "share of ERM's loss recovered": "0 %", "lesion FPs removed": "0 %",
             "Δ mean Dice vs ERM": "0"}]
    for m, x in lad["rungs"].items():
        rows.append({"rung": m, "seeds": len(x["seeds"]), "hard-group Dice": f"{lad['erm_hard'] + x['hard'][0]:.3f}",
                     "Δ hard vs ERM": ci(x["hard"]), "share of ERM's loss recovered": pct(x["recovered"]),
                     "lesion FPs removed": pct(x["fp_removed"]), "Δ mean Dice vs ERM": ci(x["mean"])})
    holds = control_holds(lad)
    where = "validation-selected checkpoint" if checkpoint == "best" else "last epoch"
    return f"""#### At the {where}

Counterfactual arm on the counterfactual cohort: hard {lad['cf_hard']:.3f} vs rest {lad['cf_rest']:.3f} (gap
{ci(lad['cf_gap'])}). ERM's loss to the lesions (counterfactual − ERM, hard cases): {ci(lad['loss'])}, of which
{pct(lad['fp_share'])} is false positives inside the lesions (the part re-weighting could teach away).

{markdown_table(pd.DataFrame(rows))}

Positive control (the oracle's hard-group gain has a CI above 0 at a mean-Dice cost ≤ {COST}):
{'n/a (no oracle)' if holds is None else 'holds' if holds else 'does NOT hold'}.
"""


def strategies_text(cmp: dict[str, Any], lesions: bool, last: dict[str, Any]) -> str:
    attr, group, n_worst = cmp["worst"]
    rows = []
    for m, r in cmp["rows"].items():
        row = {"strategy": m, "seeds": len(r["seeds"]), "mean Dice": level(r["mean"]),
               "hard Dice": level(r["hard_level"]), "Δ hard": ci(r.get("d_hard")),
               f"Δ {attr}={group}": ci(r.get("d_worst")), "Δ mean": ci(r.get("d_mean")),
               "share of the oracle's gain": pct(r.get("of_oracle"))}
        if lesions:
            row["share of the oracle's lesion-FP removal"] = pct(r.get("of_oracle_fp"))
        row["Δ hard, last epoch"] = ci(last["rows"].get(m, {}).get("d_hard"))
        row["epochs re-weighted"] = "adaptive" if m == "group_dro" else f"{r['reweighted']:.0f} of {r['epochs']:.0f}"
        row["weight hard / rest"] = "adaptive" if m == "group_dro" else f"{r['hard_over_rest']:.2f}"
        row["false alarms"] = "–" if math.isnan(r["false_alarm"]) else f"{100 * r['false_alarm']:.0f} %"
        row["selected epoch"] = f"{r['selected']:.1f}"
        rows.append(row)
    return f"""{cmp['n_cases']} held-out cases, {cmp['n_hard']} truly hard, {n_worst} in ERM's worst known group
{attr}={group}. Levels: mean ± 95 % t-interval over seeds; Δ: paired per-case difference vs ERM at the
validation-selected checkpoint (the last column at the last epoch), mean over shared seeds, 95 % bootstrap CI over
cases. Share of the oracle's gain: Δ hard / the oracle's Δ hard on the same cases and seeds. Weight hard / rest:
the truly hard training cases' mean weight over the rest's, averaged over training epochs (1 = ERM). False alarms:
each refresh's share of 20 label permutations of its validation scores on which some subgroup was flagged.

{markdown_table(pd.DataFrame(rows))}
"""


def verdict(mech: dict[str, Any], cmp: dict[str, Any], lad: dict[str, Any] | None, partial: bool) -> str:
    rows, name = cmp["rows"], mech["mechanism"]
    lines = []
    o, d = rows.get("oracle"), rows.get("divaware")
    if o is not None:
        lines.append(f"The oracle changes the hard group's held-out Dice by {ci(o['d_hard'])} "
                     f"(mean Dice {ci(o['d_mean'])}).")
    if name.startswith("lookalike") and lad is not None:
        holds = control_holds(lad)
        lines.append("The positive control holds: there is a gain for re-weighting to find." if holds else
                     "The positive control does not hold on these runs: the ceiling itself is not distinguishable "
                     "from 0 at an acceptable cost, so no strategy can be judged against it.")
    elif name == "intrinsic" and o is not None:
        lines.append("As a negative control, the oracle's interval " +
                     ("includes 0: re-weighting cannot recover what the images do not show." if o["d_hard"][1] <= 0
                      <= o["d_hard"][2] else "excludes 0: part of this gap is learnable after all."))
    if d is not None:
        dh = d["d_hard"]
        sign = ("raises" if dh[1] > 0 else "lowers" if dh[2] < 0 else "does not measurably change")
        share = d.get("of_oracle")
        fp = d.get("of_oracle_fp")
        fp_text = ("" if not fp or math.isnan(fp[0]) else
                   f", and removes {pct(fp)} of the lesion false positives the oracle removes" if fp[0] >= 0 else
                   f", but adds false positives inside lesions where the oracle removes them ({pct(fp)} of the "
                   "oracle's removal): its gain comes from elsewhere")
        lines.append(f"divaware {sign} the hard group's Dice ({ci(dh)}; mean Dice {ci(d['d_mean'])}), "
                     f"{pct(share)} of the oracle's gain" + fp_text +
                     f"; it re-weighted {d['reweighted']:.0f} of {d['epochs']:.0f} epochs on average with "
                     f"hard/rest weight {d['hard_over_rest']:.2f} (the oracle's: "
                     f"{rows['oracle']['hard_over_rest']:.2f})." if "oracle" in rows else ".")
    others = [m for m, r in rows.items() if m not in ("erm", "oracle", "divaware") and r.get("d_hard")
              and r["d_hard"][1] > 0]
    if others:
        lines.append(f"Other strategies whose hard-group gain has a CI above 0: {', '.join(others)}.")
    if partial:
        lines.append("PARTIAL: fewer runs than planned; read the intervals, not the verdict.")
    return " ".join(lines)


def figure(mech: dict[str, Any], cmp: dict[str, Any], last: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    names = [m for m in cmp["rows"] if m != "erm"]
    fig = Figure(figsize=(9, 0.5 * len(names) + 1.8), layout="constrained")
    ax = fig.subplots()
    for k, (res, label, dy) in enumerate(((cmp, "selected checkpoint", -0.15), (last, "last epoch", 0.15))):
        for i, m in enumerate(names):
            x = res["rows"].get(m, {}).get("d_hard")
            if x is None or math.isnan(x[0]):
                continue
            ax.errorbar(x[0], i + dy, xerr=[[x[0] - x[1]], [x[2] - x[0]]], fmt="o" if k == 0 else "s",
                        color=f"C{k}", capsize=3, label=label if i == 0 else None)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("Δ hard-group Dice vs ERM (paired over held-out cases, 95 % bootstrap CI)")
    if ax.get_legend_handles_labels()[0]:  # nothing to compare before a strategy besides ERM is recorded
        ax.legend(loc="lower right")
    ax.set_title(f"{mech['mechanism']}: {cmp['n_hard']} truly hard of {cmp['n_cases']} held-out cases")
    save_figure(fig, path)


def is_partial(mech: dict[str, Any]) -> bool:
    plan = mech["plan"]
    wanted = {(s, int(seed)) for s in [*plan.get("strategies", []), *(plan.get("arms") or [])]
              for seed in plan.get("seeds", [])}
    done = {(mech["method"][r], int(mech["runs"][r]["seed"])) for r in mech["runs"]}
    return bool(wanted - done)


def schedules(mech: dict[str, Any]) -> str:
    """Each strategy's weighting schedule and α, read from its runs' configurations."""
    parts = []
    for m in methods(mech):
        cfg = next(mech["runs"][r]["config"] for r in sorted(mech["runs"]) if mech["method"][r] == m)
        if m == "erm":
            continue
        when = (f"warm-up {cfg.get('warmup_epochs')}, refresh every {cfg.get('update_every')}"
                if m in ("divaware", "paper") else f"warm-up {cfg.get('warmup_epochs')}" if m == "oracle"
                else "from the first epoch")
        parts.append(f"{m} ({when}, α = {cfg.get('alpha')})")
    return "; ".join(parts) or "ERM only"


def section(mech: dict[str, Any], figures: Path) -> tuple[str, dict[str, Any]]:
    cmp = {c: compare(mech, c) for c in CHECKPOINTS}
    lads = {c: ladder(mech, c) for c in CHECKPOINTS}
    partial = is_partial(mech)
    name = mech["mechanism"]
    runs = sorted(mech["runs"])
    cfg = mech["runs"][runs[0]]["config"]
    lesions = bool(mech["cases"]["n_lesions"].sum() > 0)
    figure(mech, cmp["best"], cmp["last"], figures / f"experiment_{name}.png")
    text = [f"## Mechanism `{name}`{' — PARTIAL' if partial else ''}", "",
            f"{len(runs)} runs recorded ({', '.join(f'{m} ×{n}' for m, n in pd.Series(mech['method']).value_counts().sort_index().items())}); "
            f"{cfg['epochs']} epochs, UNet channels {cfg['channels']}, α = {cfg['alpha']}, training cohort "
            f"{cfg['synthetic_cases']} cases; held-out cohort `{mech['cohort']['heldout']}`.", ""]
    text += [f"Schedules and objectives as run: {schedules(mech)}.", ""]
    if lads["best"] is not None:
        text += ["### Ladder", "", ladder_text(lads["best"], "best"), ladder_text(lads["last"], "last")
                 if lads["last"] else ""]
    text += ["### Strategies", "", strategies_text(cmp["best"], lesions, cmp["last"]),
             f"**Verdict.** {verdict(mech, cmp['best'], lads['best'], partial)}", "",
             f"![{name}](../figures/experiment_{name}.png)", ""]
    return "\n".join(text), {"cmp": cmp, "ladder": lads, "partial": partial}


def readme_text(mechs: list[dict[str, Any]], results: list[dict[str, Any]], runs_line: str) -> str:
    lines = ["Written by `python benchmarks/experiment_report.py` from the committed records, as "
             "[`benchmarks/EXPERIMENT.md`](benchmarks/EXPERIMENT.md) (held-out cohort, selected checkpoint; Δ vs ERM "
             "paired per case over seeds, 95 % bootstrap CI over cases).", runs_line, ""]
    for mech, res in zip(mechs, results, strict=True):
        cmp = res["cmp"]["best"]
        lines += [f"**`{mech['mechanism']}`**{' (partial)' if res['partial'] else ''}: {cmp['n_hard']} truly hard of "
                  f"{cmp['n_cases']} held-out cases.", "",
                  "| strategy | seeds | mean Dice | Δ hard group | Δ mean Dice | share of the oracle's gain |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m, r in cmp["rows"].items():
            lines.append(f"| {m} | {len(r['seeds'])} | {level(r['mean'])} | {ci(r.get('d_hard')) if m != 'erm' else '–'} "
                         f"| {ci(r.get('d_mean')) if m != 'erm' else '–'} | {pct(r.get('of_oracle')) if m not in ('erm', 'oracle') else '–'} |")
        lad = res["ladder"]["best"]
        if lad is not None:
            rungs = "; ".join(f"{m} recovers {pct(x['recovered'])} of that loss" for m, x in lad["rungs"].items())
            lines += ["", f"Ladder: without the lesions (counterfactual arm) the hard group scores {lad['cf_hard']:.3f} "
                      f"(rest {lad['cf_rest']:.3f}); with them ERM's hard group loses {ci(lad['loss'])} Dice, "
                      f"{pct(lad['fp_share'])} of that as false positives inside the lesions; {rungs}."]
        lines += ["", f"*{verdict(mech, cmp, lad, res['partial'])}*", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=RECORDS, help="folder of <mechanism>/ record folders")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "EXPERIMENT.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures")
    parser.add_argument("--runs-from", type=Path, default=None,
                        help="only the runs named in this report's runs line (to regenerate it exactly)")
    parser.add_argument("--readme", type=Path, default=None, help="README whose experiment section to rewrite")
    parser.add_argument("--min-worst", type=int, default=MIN_WORST, help="smallest group ERM's worst group may be")
    args = parser.parse_args(argv)
    only = None
    if args.runs_from is not None:
        found = RUNS_LINE.search(args.runs_from.read_text())
        if not found:
            raise SystemExit(f"{args.runs_from} has no runs line")
        only = set(found.group(1).split())
    folders = [args.records / m for m in MECHANISMS if (args.records / m / "cohort.json").is_file()]
    if not folders:
        raise SystemExit(f"no recorded run under {args.records}; run python benchmarks/experiment_sweep.py")
    mechs = [load(f, only) for f in folders]
    mechs = [m for m in mechs if m["runs"] and "erm" in m["method"].values()]
    for m in mechs:
        m["min_worst"] = args.min_worst
    sections, results = [], []
    for mech in mechs:
        text, res = section(mech, args.figures)
        sections.append(text)
        results.append(res)
    names = sorted(f"{m['mechanism']}/{r}" for m in mechs for r in m["runs"])
    runs_line = f"<!-- runs: {' '.join(names)} -->"
    partial = any(r["partial"] for r in results)
    text = f"""# Experiment: can divergence-aware weighting close a subgroup gap that re-weighting can close?{' — PARTIAL' if partial else ''}

Generated by `python benchmarks/experiment_report.py` from the per-run records committed under
`benchmarks/experiment/` (written by `python benchmarks/experiment_sweep.py`). Synthetic cohorts only: these are
**not** MAMA-MIA results. Each run trains on a 300-case synthetic cohort's challenge train split (model selection
and weights on the fairness-validation split carved from it) and is evaluated on an 800-case held-out cohort of
the same generator and mechanism, never used for training, selection or weights. The `oracle` up-weights the
truly hard cases (from the synthetic truth) from the first epoch: the ceiling of re-weighting. Counterfactual
and balanced are data arms (ERM on the same patients without lesions; on a cohort whose hard group is half).
{runs_line}

{chr(10).join(sections)}"""
    args.out.write_text(text)
    if args.readme is not None:
        begin, end = markers("experiment")
        rewrite_section(args.readme, "experiment", "\n" + readme_text(mechs, results, runs_line) + "\n")
        print(f"rewrote the experiment section of {args.readme} ({begin} … {end})", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
