"""Rewrite the README's timing and result tables from what a ``divaware run`` wrote.

    python benchmarks/readme_timings.py runs/default              # rewrite README.md between the markers
    python benchmarks/readme_timings.py runs/default --print      # only print the sections

The section between ``<!-- timings:begin -->`` and ``<!-- timings:end -->`` in README.md is replaced by a
table made only from the run folder's ``timings.json`` (per notebook wall time and peak memory, the total,
the training runs' own split into training steps and validation) and the machine the run recorded, so
the README never shows a number that was typed in from elsewhere. A partial run (``--only``) or a file
from an older divaware is refused.

The section between ``<!-- results:begin -->`` and ``<!-- results:end -->`` gets the test-split table of
the same run, one row per trained method, from each run's ``evaluation_test/challenge.json`` and
``fairness.json`` (the worst group is the lowest group-mean Dice over the fairness attributes), then what the
run's paired comparisons support, labelled as one seed with its 95 % CIs: the overall and per-age-group changes
of 04's ``compare_<reference>_vs_<method>/`` tables in words chosen by ``divaware.metrics.change_verdict`` (the
rule notebook 04 uses), so the README never claims a direction an interval does not support; and what 02 found
(its first itemset by q, how many itemsets are significant, what the permuted-score null check flags).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import markers, rewrite_section

from divaware.runtime import describe_machine

BEGIN, END = markers("timings")
RESULTS_BEGIN, RESULTS_END = markers("results")
# fairness.json attribute -> (label in the table, key in challenge.json's groups)
ATTRIBUTE_NAMES = {"age_group": ("age", "age"), "menopause": ("menopause", "menopause"),
                   "breast_density": ("density", "breast_density")}
README = Path(__file__).resolve().parents[1] / "README.md"
LABELS = {
    "01_data_exploration": "01 data exploration (generates the synthetic cohort on first use)",
    "02_subgroup_divergence": "02 subgroup divergence (analyses the ERM run)",
    "04_fairness_evaluation": "04 fairness evaluation (test split, bootstrap CIs)",
}


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "timings.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `divaware run --out {run_dir}` first")
    record = json.loads(path.read_text())
    if record.get("format") != 2:
        raise SystemExit(f"{path} was written by an older divaware (no machine or memory recorded); run the series again")
    if not record.get("complete") or record.get("only"):
        raise SystemExit(f"{path} records a partial run (--only {record.get('only')}); run the whole series for the README")
    return record


def section(record: dict[str, Any], run_dir: Path) -> str:
    machine = record["machine"]
    load_start, load_end = record.get("load_average_start"), record.get("load_average_end")
    lines = [
        BEGIN,
        f"Written by `python benchmarks/readme_timings.py {run_dir}` from the `timings.json` of that run "
        f"(`{record.get('command', 'divaware run')}`, {record.get('started_utc', '?')}).",
        "",
        f"Machine: {describe_machine(machine)}. Load average (1 min) at start {load_start[0] if load_start else '?'}, "
        f"at end {load_end[0] if load_end else '?'}.",
        "",
        "| step | wall time | peak memory (GB) |",
        "|---|---:|---:|",
    ]
    training = record.get("training") or {}
    for label, entry in record["notebooks"].items():
        name = LABELS.get(label)
        if name is None and label.startswith("03_training_"):
            method = label.removeprefix("03_training_")
            t = training.get(method)
            name = f"03 training `{method}`"
            if t:
                name += (f" ({t['epochs']} epochs: steps {t['train_seconds']:.0f} s, "
                         f"{t['validations']} validations {t['validation_seconds']:.0f} s)")
        lines.append(f"| {name or label} | {entry['seconds']:.0f} s | {entry['peak_memory_gb']:.2f} |")
    lines.append(f"| **total** | **{minutes(record['total_seconds'])}** | {record['peak_memory_gb']:.2f} |")
    lines.append(END)
    return "\n".join(lines)


def results_section(record: dict[str, Any], run_dir: Path) -> str:
    """The test-split table of every method the run trained (in the order it trained them)."""
    lines = [
        RESULTS_BEGIN,
        f"Test split of the run started {record.get('started_utc', '?')} (one training run per method, "
        f"{_seed_text(run_dir)}), best checkpoints chosen on the "
        f"fairness-validation split (written by "
        f"`python benchmarks/readme_timings.py {run_dir}` from each run's `evaluation_test/`):",
        "",
        "| run | n | mean Dice | HD95 (mm) | worst group | worst-group Dice | max−min gap | ES-Dice | P | F | ranking |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    methods = [label.removeprefix("03_training_") for label in record["notebooks"] if label.startswith("03_training_")]
    for method in methods:
        folder = run_dir / "runs" / method / "evaluation_test"
        try:
            challenge = json.loads((folder / "challenge.json").read_text())
            fairness = json.loads((folder / "fairness.json").read_text())
        except FileNotFoundError as err:
            raise SystemExit(f"{err.filename} not found: the run's 04_fairness_evaluation did not evaluate `{method}`") from None
        attribute, worst = min(fairness.items(), key=lambda item: item[1]["worst_group"])
        short, group_key = ATTRIBUTE_NAMES.get(attribute, (attribute, attribute))
        n = challenge.get("groups", {}).get(group_key, {}).get(worst["worst_group_label"], {}).get("n", "?")
        lines.append(
            f"| {'ERM' if method == 'erm' else method} | {challenge['n_cases']} | {challenge['mean_dice']:.3f} | "
            f"{challenge['mean_hd95_mm']:.2f} | {short} {worst['worst_group_label']} (n={n}) | "
            f"{worst['worst_group']:.3f} | {worst['gap']:.3f} | {worst['es']:.3f} | {challenge['P']:.4f} | "
            f"{challenge['F']:.4f} | {challenge['ranking']:.4f} |")
    lines += ["", *comparison_lines(run_dir, methods), RESULTS_END]
    return "\n".join(lines)


def _seed_text(run_dir: Path) -> str:
    """'seed 0' from the run's series.yaml (the training seed every method used)."""
    import yaml

    series = run_dir / "series.yaml"
    config = yaml.safe_load(series.read_text()) if series.is_file() else {}
    seed = ((config or {}).get("training") or {}).get("seed")
    return f"seed {seed}" if seed is not None else "one seed"


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def comparison_lines(run_dir: Path, methods: list[str]) -> list[str]:
    """The run's paired comparisons and 02's findings in words, every claim backed by its interval."""
    import pandas as pd

    from divaware.metrics import change_verdict, comparison_verdicts, describe_change

    reference, others = methods[0], methods[1:]
    label = {m: "ERM" if m == "erm" else m for m in methods}
    out = []
    for method in others:
        folder = run_dir / "04_fairness_evaluation" / f"compare_{reference}_vs_{method}"
        try:
            overall = json.loads((folder / "comparison.json").read_text())["overall"]
            per_group = pd.read_csv(folder / "comparison_per_group.csv")
        except FileNotFoundError as err:
            raise SystemExit(f"{err.filename} not found: the run's 04_fairness_evaluation did not compare `{method}`") from None
        sentence = describe_change(overall["mean_diff"], overall["ci_low"], overall["ci_high"],
                                   labels=(label[reference], label[method]), n=overall["n"], seeds=1)
        groups = []
        for row, verdict in zip(per_group.itertuples(index=False), comparison_verdicts(per_group), strict=True):
            ci = f"{_signed(row.ci_low)} to {_signed(row.ci_high)}" if pd.notna(row.ci_low) else "no CI"
            groups.append(f"{row.group} (n={row.n}) {_signed(row.mean_diff)} [{ci}]: {verdict}")
        overall_verdict = change_verdict(overall["ci_low"], overall["ci_high"])
        clear = [v for v in comparison_verdicts(per_group) if v in ("improved", "worse")]
        closing = (f"this run does not show that {label[method]} differs from {label[reference]} overall"
                   if overall_verdict == "no clear change" else
                   f"overall, this run's interval excludes 0 ({overall_verdict}) on this one seed")
        groups_text = ("no age group's interval excludes 0" if not clear else
                       f"{len(clear)} of {len(per_group)} age groups' intervals exclude 0 (one seed; several "
                       "intervals, so one may do so by chance)")
        out.append(
            f"**One seed, one run.** Paired test-split difference, {sentence}; "
            f"{overall['n_better']} cases better and {overall['n_worse']} worse. Per age group: "
            + "; ".join(groups) + f". So {closing}, and {groups_text}. Another seed or machine can change the sign "
            "of differences this size; whether divaware helps is answered over seeds and against an oracle in "
            "[the headline experiment](#the-headline-experiment-synthetic).")
    found = run_dir / "02_subgroup_divergence" / "results.json"
    if found.is_file():
        r02 = json.loads(found.read_text())
        null = r02.get("null_check", {})
        first = r02.get("first_itemset") or r02.get("top_itemset")
        weights = (r02.get("weights") or {}).get("divaware") or {}
        text = (f"02 (ERM on the {r02.get('n_val', '?')}-case fairness-validation split): the first itemset by q is "
                f"`{first}`; {r02.get('n_significant', null.get('real_fdr_flags', '?'))} itemsets are significant "
                f"(q ≤ 0.05 and ps < 0.5: typically lower, the rank test's effect), while {100 * null.get('null_share_fdr_flags', float('nan')):.0f} % of 50 "
                f"permuted-score replicates flag any")
        if weights.get("n_flagged"):
            text += (f"; divaware's weights from that analysis: {weights['n_flagged']} flagged training cases at "
                     f"mean {weights['flagged_mean']:.2f}, the rest at {weights['other_mean']:.2f}")
        out += ["", text + "."]
    return out


def rewrite(readme: Path, text: str, key: str = "timings") -> None:
    """Replace the README section ``key`` by ``text`` (which carries the section's markers)."""
    begin, end = markers(key)
    rewrite_section(readme, key, text.strip().removeprefix(begin).removesuffix(end))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="folder of a finished `divaware run` (holds timings.json)")
    parser.add_argument("--readme", type=Path, default=README, help="README to rewrite (default: the checkout's)")
    parser.add_argument("--print", action="store_true", help="print the section instead of rewriting the README")
    parser.add_argument("--results-only", action="store_true",
                        help="rewrite only the results section (e.g. from a run timed on a busy machine)")
    args = parser.parse_args(argv)
    record = load(args.run_dir)
    text, results = section(record, args.run_dir), results_section(record, args.run_dir)
    if args.print:
        print(text + "\n\n" + results)
    else:
        if not args.results_only:
            rewrite(args.readme, text)
        rewrite(args.readme, results, "results")
        print(f"rewrote the {'results' if args.results_only else 'timings and results'} section(s) of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
