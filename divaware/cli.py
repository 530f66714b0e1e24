"""The ``divaware`` command line.

Each subcommand is a small ``_cmd_<name>`` function that parses nothing itself and calls into the package;
heavy imports (torch, MONAI) happen inside those functions so ``divaware --help`` stays instant.
To add a subcommand: write ``_add_<name>(sub)`` registering its parser and ``set_defaults(func=_cmd_<name>)``,
and list it in ``_REGISTRARS``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TextIO


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    return [fn for name, fn in sorted(globals().items()) if name.startswith("_add_") and callable(fn)]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from divaware import __version__

    parser = argparse.ArgumentParser(
        prog="divaware",
        description="Divergence-aware training for fair breast tumour segmentation (MAMA-MIA).",
    )
    parser.add_argument("--version", action="version", version=f"divaware {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run from a YAML config (see divaware.train.TrainConfig)")
    p.add_argument("--config", required=True, help="YAML file of TrainConfig fields (missing ones take defaults)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a run folder holding a different run")
    p.add_argument("--out", default=None, help="run folder (overrides the config's out_dir)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from divaware.train import TrainConfig, train

    # the command line's values are part of the config, validated once with the rest
    overrides = {"out_dir": args.out, "epochs": args.epochs}
    config = TrainConfig.from_yaml(args.config, {k: v for k, v in overrides.items() if v is not None})
    run = train(config, resume=args.resume, overwrite=args.overwrite)
    print(run)
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="write pred_segmentations/<patient_id>.nii.gz for a split")
    p.add_argument("--run", required=True, help="training run folder (holds config.yaml and best.pt)")
    p.add_argument("--data", required=True, help="MAMA-MIA root folder to predict")
    p.add_argument("--split", default="test",
                   help="train, test, val (the run's fairness-validation, as evaluate) or all (default: test)")
    p.add_argument("--out", required=True, help="output folder; predictions go to OUT/pred_segmentations")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    window = p.add_mutually_exclusive_group()
    window.add_argument("--sliding-window", dest="sliding_window", action="store_true", default=None,
                        help="tile the volume (default when the run trained on patches)")
    window.add_argument("--whole-volume", dest="sliding_window", action="store_false",
                        help="one forward pass per volume")
    p.add_argument("--roi", type=int, nargs=3, default=None, help="sliding-window size (default: patch size)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--postprocess", nargs="*", default=[], choices=("largest_component", "breast_box"),
                   help="postprocessing steps, in order")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=None, help="torch CPU threads (default: the run's setting)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from divaware.predict import predict

    out = predict(args.run, args.data, split=None if args.split == "all" else args.split, out_dir=args.out,
                  checkpoint=args.checkpoint, sliding_window=args.sliding_window, roi_size=args.roi,
                  overlap=args.overlap, postprocess=args.postprocess, device=args.device,
                  num_workers=args.num_workers, cpu_threads=args.cpu_threads)
    print(out)
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic MAMA-MIA stand-in cohort (same layout as the real data)")
    p.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--n-cases", type=int, default=None, help="number of cases (default: 300, realistic: 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--preset", default="default", choices=("default", "realistic"),
                   help="default: 48x48x32 CPU-sized crops; realistic: the real collections' shapes")
    p.add_argument("--missingness", default="teaching", choices=("teaching", "realistic"),
                   help="teaching: density mostly known; realistic: ~96%% density and ~27%% menopause missing")
    p.add_argument("--collections", nargs="+", default=None, metavar="NAME",
                   help="only these collections (DUKE ISPY1 ISPY2 NACT), in their real proportions")
    p.add_argument("--disparity", default="default",
                   choices=("default", "representation", "intrinsic", "lookalike", "lookalike_weak"),
                   help="what makes the hard subgroup hard: default (the original BPE look-alikes), "
                        "representation (rare look-alike foci), intrinsic (part of the tumour invisible: negative "
                        "control), lookalike (look-alike lesions told apart at phase 2: positive control) or "
                        "lookalike_weak (the same with a weaker phase-2 drop: the dose control)")
    p.add_argument("--counterfactual", action="store_true",
                   help="lookalike*: the same patients and seed rendered without their lesions")
    p.add_argument("--hard-fraction", type=float, default=None,
                   help="share of hard-subgroup cases (more distinct hard patients, e.g. 0.5); default: ~13 %%")
    p.add_argument("--tumour-appearance", default="default", choices=("default", "necrotic", "rim"),
                   help="hard-subgroup tumours with a necrotic core or rim enhancement (default: solid)")
    p.add_argument("--overwrite", action="store_true", help="replace a cohort previously written by synth")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    import time

    from divaware.synthetic import make_cohort, read_truth

    start = time.perf_counter()
    root = make_cohort(args.out, n_cases=args.n_cases, seed=args.seed, preset=args.preset,
                       missingness=args.missingness, overwrite=args.overwrite, collections=args.collections,
                       disparity=args.disparity, counterfactual=args.counterfactual,
                       hard_fraction=args.hard_fraction, tumour_appearance=args.tumour_appearance)
    truth = read_truth(root)
    print(f"wrote {len(truth)} synthetic cases ({args.preset} preset, {args.missingness} missingness, "
          f"{args.disparity}{' counterfactual' if args.counterfactual else ''} disparity, seed "
          f"{args.seed}) to {root} in {time.perf_counter() - start:.1f} s; hard subgroup: "
          f"{int(truth['hard_subgroup'].sum())} cases")
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a MAMA-MIA folder and print a report (exit 0: no problem, 1: problems "
                                     "found, 2: the folder cannot be checked)")
    p.add_argument("root", help="MAMA-MIA root folder (holds images/, segmentations/, the xlsx and split csv)")
    p.add_argument("--headers-only", action="store_true",
                   help="skip reading voxels (binary masks, truncated files): much faster on the real data")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error listing every problem instead of excluding cases")
    p.add_argument("--no-masks", action="store_true", help="allow cases without expert masks (inference only)")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    import warnings

    from divaware.cohort import CohortWarning, load_cohort, validation_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CohortWarning)  # the report lists every problem anyway
        cohort = load_cohort(args.root, strict=args.strict, check_voxels=not args.headers_only,
                             require_masks=not args.no_masks)
    print(validation_report(cohort))
    return 1 if cohort.problems else 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a run on a split: per-case, per-group, challenge score, fairness",
                       description="Predict the split if needed, then write per_case.csv, per_group.csv, "
                                   "challenge.json, fairness.json and divergent_itemsets.csv into "
                                   "RUN/evaluation_<split>[_<checkpoint>][_<tag>]/ (see divaware.evaluate).")
    p.add_argument("--run", required=True, help="run folder (holds config.yaml and best.pt)")
    p.add_argument("--data", default=None, help="MAMA-MIA root folder (default: the one in the run's config.yaml)")
    p.add_argument("--split", default="test", help="test, train, val (the run's fairness-validation) or all")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--predictions", default=None,
                   help="score this existing folder of <patient_id>.nii.gz instead of predicting")
    p.add_argument("--tag", default=None, help="suffix of the evaluation folder, to keep variants side by side")
    p.add_argument("--attributes", nargs="+", default=None,
                   help="metadata columns for the per-group tables (default: age_group menopause breast_density)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the group CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--min-support", type=float, default=None,
                   help="support of the divergent itemsets (default: the divaware strategy's, as divaware audit)")
    p.add_argument("--repredict", action="store_true", help="predict again even if up-to-date predictions exist")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--sliding-window", dest="sliding_window", action="store_true", default=None,
                        help="tile the volume (default when the run trained on patches)")
    window.add_argument("--whole-volume", dest="sliding_window", action="store_false",
                        help="one forward pass per volume")
    p.add_argument("--roi", type=int, nargs=3, default=None, help="sliding-window size (default: patch size)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default 0.5)")
    p.add_argument("--postprocess", nargs="*", default=None, choices=("largest_component", "breast_box"),
                   help="postprocessing steps, in order")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--num-workers", type=int, default=None)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from divaware.evaluate import DEFAULT_ATTRIBUTES, evaluate

    # Only options the user gave go to predict(), so that scoring --predictions with no predict options works.
    given = {"sliding_window": args.sliding_window, "roi_size": args.roi, "overlap": args.overlap,
             "postprocess": args.postprocess, "device": args.device, "num_workers": args.num_workers}
    predict_kwargs = {k: v for k, v in given.items() if v is not None}
    evaluate(args.run, args.data, split=args.split, predictions=args.predictions, checkpoint=args.checkpoint,
             tag=args.tag, attributes=tuple(args.attributes or DEFAULT_ATTRIBUTES), n_boot=args.n_boot,
             seed=args.seed, min_support=args.min_support, repredict=args.repredict, verbose=True,
             **predict_kwargs)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="execute the notebook series (01-04) with papermill into one run folder",
                       description="Execute notebooks 01-04 in order (03 once per configured method) into --out; "
                                   "a failing notebook stops the run and names the failing cell and the executed copy.")
    p.add_argument("--config", default=None, help="series YAML (default: configs/default.yaml of the checkout)")
    p.add_argument("--data", default=None, help="MAMA-MIA root (overrides the config's data_root)")
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default)")
    p.add_argument("--only", nargs="+", default=None, help="run only these notebooks, e.g. 01 03")
    p.add_argument("--figures", default=None,
                   help="also copy the series' main figures into this folder (the README gallery uses figures/)")
    _executor_arguments(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import time

    from divaware import pipeline

    config = pipeline.load_series_config(args.config)
    if args.data:
        config["data_root"] = args.data
    start = time.perf_counter()
    try:
        executor = _executor(args, config) if _executor_kind(args, config) == "slurm" else None
        timings = pipeline.run_series(config, args.out, only=args.only, executor=executor)
    except pipeline.NotebookFailed as err:
        print(f"divaware run: {err}", file=sys.stderr)
        return 1
    if args.figures:
        copied = pipeline.publish_figures(args.out, args.figures)
        print(f"copied {len(copied)} figures into {args.figures}")
    print(f"series done in {time.perf_counter() - start:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train and evaluate methods x seeds x grid values; one aggregated table",
                       description="Run notebook 03 for every combination in the config's 'sweep' section, evaluate "
                                   "each run on the test split and write sweep.csv and sweep_summary.csv.")
    p.add_argument("--config", default=None, help="series YAML with a 'sweep' section (methods, seeds, grid)")
    p.add_argument("--data", default=None, help="MAMA-MIA root (overrides the config's data_root)")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default: runs/sweep)")
    p.add_argument("--status", metavar="OUT", default=None,
                   help="print the state of every run of the sweep in OUT (pending, running, done, failed with the "
                        "end of its log) and exit")
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="override the sweep's seeds (e.g. to split one sweep across processes or machines)")
    p.add_argument("--methods", nargs="+", default=None, help="override the sweep's methods")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per evaluation")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at once, one process each (default 1: one after another in this process)")
    p.add_argument("--devices", default=None,
                   help="comma-separated GPU indices the jobs are spread over, e.g. 0,1 (default: all GPUs if "
                        "any, else CPU with cores/jobs threads per job)")
    _executor_arguments(p)
    p.set_defaults(func=_cmd_sweep)


def _sweep_devices(text: str | None, jobs: int) -> list[str] | None:
    """GPU indices of ``--devices``, each checked against this machine's GPUs (on a CPU-only machine they
    would be silently ignored: every job would train on the CPU); None: all GPUs with --jobs > 1, else CPU."""
    import torch

    n = torch.cuda.device_count()
    if not text:
        return ([str(i) for i in range(n)] or None) if jobs > 1 else None
    devices = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in devices if not d.isdigit() or int(d) >= n]
    if bad:
        have = f"GPUs 0..{n - 1}" if n else "no GPU that torch can use"
        raise ValueError(f"--devices {text}: {', '.join(bad)} is not a GPU of this machine (it has {have}); "
                         "drop --devices to train on the CPU")
    return devices


def _cmd_sweep(args: argparse.Namespace) -> int:
    from divaware import executors, pipeline

    if args.status:
        print(executors.status_table(args.status))
        return 0
    if not args.config:
        raise ValueError("divaware sweep needs --config (a series YAML with a 'sweep' section), or --status OUT")
    config = pipeline.load_series_config(args.config)
    if args.data:
        config["data_root"] = args.data
    if args.epochs is not None:
        config["training"] = {**(config.get("training") or {}), "epochs": args.epochs}
    for key in ("seeds", "methods"):
        if getattr(args, key) is not None:
            config["sweep"] = {**(config.get("sweep") or {}), key: getattr(args, key)}
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    local = _executor_kind(args, config) == "local"
    devices = _sweep_devices(args.devices, args.jobs) if local else None  # GPUs of this machine, for local jobs
    executor = _executor(args, config, jobs=args.jobs, devices=devices)
    try:
        out = pipeline.sweep(config, args.out, n_boot=args.n_boot, executor=executor)
    except (pipeline.NotebookFailed, pipeline.SweepFailed) as err:
        print(f"divaware sweep: {err}", file=sys.stderr)
        return 1
    print(f"sweep table: {out / 'sweep.csv'}; summary: {out / 'sweep_summary.csv'}")
    return 0


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the decisive experiment: strategies x seeds on a synthetic mechanism",
                       description="Train every (strategy, seed) of an experiment config (configs/experiment_*.yaml), "
                                   "evaluate each run on the held-out synthetic cohort and on the challenge test "
                                   "split. Resumes: re-run to continue; split the work with --seeds/--strategies.")
    p.add_argument("--config", default=None, help="experiment YAML (see divaware.experiment)")
    p.add_argument("--out", default=None, help="experiment folder, e.g. runs/experiment/representation")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (one process per seed)")
    p.add_argument("--strategies", nargs="+", default=None,
                   help="only these strategies and/or arms (e.g. counterfactual erm balanced oracle: the ladder)")
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs of every run")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per evaluation")
    p.add_argument("--record", default=None,
                   help="write each finished run's small result files here (e.g. benchmarks/experiment/lookalike; "
                        "runs already recorded there are skipped); benchmarks/experiment_report.py reads them")
    p.add_argument("--no-challenge-test", action="store_true",
                   help="evaluate on the held-out cohort only (skip the training cohort's challenge test split)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each (default 1)")
    p.add_argument("--status", metavar="OUT", default=None,
                   help="print the state of every job of the experiment in OUT (pending, running, done, failed with "
                        "the end of its log) and exit")
    _executor_arguments(p)
    p.set_defaults(func=_cmd_experiment)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from divaware.experiment import load_experiment, run_experiment

    if args.status:
        from divaware.executors import status_table

        print(status_table(args.status))
        return 0
    if not args.config or not args.out:
        raise ValueError("divaware experiment needs --config and --out (or --status OUT)")
    config = load_experiment(args.config)
    if args.epochs is not None:
        config["training"] = {**config["training"], "epochs": args.epochs}
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    executor = _executor(args, config, jobs=args.jobs) if _executor_kind(args, config) == "slurm" else None
    out = run_experiment(config, args.out, strategies=args.strategies, seeds=args.seeds, n_boot=args.n_boot,
                         record=args.record, challenge_test=not args.no_challenge_test, jobs=args.jobs,
                         executor=executor)
    where = args.record or "--record FOLDER (the report reads recorded runs)"
    print(f"experiment folder: {out}; report: python benchmarks/experiment_report.py {where}")
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit any model's predictions: per-case and per-group scores, challenge "
                                     "score, divergent subgroups with FDR control, null check, figures",
                       description="Score a folder of <patient_id>.nii.gz predictions (from any tool) against the "
                                   "expert masks and find the subgroups it fails; no training run needed "
                                   "(see divaware.audit).")
    p.add_argument("--data", required=True, help="MAMA-MIA root folder")
    p.add_argument("--predictions", required=True,
                   help="folder of <patient_id>.nii.gz (case-insensitive; or one holding pred_segmentations/)")
    p.add_argument("--split", default="test", help="test, train, all, or a file of patient ids (default: test)")
    p.add_argument("--out", default=None,
                   help="report folder (default: runs/audits/<predictions folder>_<split>; never inside the "
                        "data or predictions folder)")
    p.add_argument("--attributes", nargs="+", default=None,
                   help="metadata columns of the groups and subgroups (default: age_group menopause breast_density); "
                        "'acquisition' stands for dataset manufacturer field_strength, and a leading + adds to the "
                        "defaults: --attributes +acquisition")
    p.add_argument("--threshold", type=float, default=None,
                   help="the predictions are probability maps: tumour where p >= this (e.g. 0.5)")
    p.add_argument("--min-support", type=float, default=None, help="smallest subgroup (default: divaware's)")
    p.add_argument("--fdr", type=float, default=None, help="false-discovery rate of the flags (default: divaware's)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the group CIs")
    p.add_argument("--permutations", type=int, default=50, help="permutations of the null check")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and permutation seed")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from divaware.audit import audit
    from divaware.evaluate import DEFAULT_ATTRIBUTES

    audit(args.data, args.predictions, split=args.split, out_dir=args.out,
          attributes=tuple(args.attributes or DEFAULT_ATTRIBUTES), min_support=args.min_support, fdr=args.fdr,
          n_boot=args.n_boot, seed=args.seed, n_permutations=args.permutations, figures=not args.no_figures,
          verbose=True, threshold=args.threshold)
    return 0


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="per-case training weights (divaware rule) from an audit or a run, as CSV",
                       description="Weights of the training cases from the divergent subgroups of an audit (or a "
                                   "run's fairness-validation scores), computed by the divaware strategy itself: "
                                   "mean 1 over the training cases, clipped to [w_min, w_max]. Use them in any "
                                   "trainer: divaware.external.weighted_sampler, or the nnU-Net trainer "
                                   "(divaware.nnunet).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audit", help="audit folder written by `divaware audit` (not of the test split)")
    source.add_argument("--run", help="divaware training run folder (its val_scores.csv)")
    p.add_argument("--out", required=True, help="CSV to write: patient_id, weight, divergence, worst_itemset")
    p.add_argument("--train", default="train",
                   help="with --audit: the training cases to weight: train, all or an ids file (default: train)")
    p.add_argument("--epoch", type=int, default=None, help="with --run: validated epoch (default: the last)")
    p.add_argument("--data", default=None, help="MAMA-MIA root (default: the one the audit or run recorded)")
    p.add_argument("--attributes", nargs="+", default=None,
                   help="with --audit: metadata columns whose subgroups set the weights (default: the audit's own; "
                        "breast_density brings the derived dense, as in training); a set that flags nothing the "
                        "audit flagged is refused")
    p.add_argument("--tau", type=float, default=None, help="scale: a flagged subgroup whose effect gap is tau gets weight 2 (default: divaware's 1)")
    p.add_argument("--w-min", type=float, default=None, help="lower clip (default: divaware's 0.2)")
    p.add_argument("--w-max", type=float, default=None, help="upper clip (default: divaware's 5)")
    p.set_defaults(func=_cmd_weights)


def _cmd_weights(args: argparse.Namespace) -> int:
    from divaware.audit import audit_weights, run_weights, write_weights

    params = {k: v for k, v in (("tau", args.tau), ("w_min", args.w_min), ("w_max", args.w_max)) if v is not None}
    if args.audit:
        table = audit_weights(args.audit, args.train, data_root=args.data, attributes=args.attributes, **params)
    else:
        if args.attributes:
            params["attributes"] = list(args.attributes)
        table = run_weights(args.run, args.epoch, data_root=args.data, **params)
    out = write_weights(table, args.out, table.attrs["data_root"])
    print(f"wrote {len(table)} weights to {out} (mean {table['weight'].mean():.3f})")
    print(table.attrs.get("line", ""))  # what was flagged, the weights, and any clip that bound them
    return 0


def _executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where the trainings run (``divaware.executors``): this machine or SLURM, and the SLURM resources."""
    g = p.add_argument_group("executor", "where the trainings run; the SLURM options may also be set in the YAML's "
                                         "'executor:' and 'slurm:' keys (the command line wins)")
    g.add_argument("--executor", choices=("local", "slurm"), default=None,
                   help="local (default: this machine) or slurm (one job per training, submitted with submitit)")
    g.add_argument("--partition", default=None, help="SLURM partition (sbatch --partition)")
    g.add_argument("--time", default=None, help="time limit per job, minutes or [D-]HH:MM:SS (sbatch --time; "
                                                "default 60); a job stopped by it is requeued and resumes")
    g.add_argument("--gpus-per-task", type=int, default=None, help="GPUs per SLURM task (sbatch --gpus-per-task)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per SLURM task (sbatch --cpus-per-task); the training uses that many threads")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 32G (sbatch --mem)")
    g.add_argument("--account", default=None, help="SLURM account (sbatch --account)")
    g.add_argument("--qos", default=None, help="quality of service (sbatch --qos)")
    g.add_argument("--ranks-per-job", type=int, default=None,
                   help="DDP ranks of each training, one SLURM task each on one node (sbatch --ntasks-per-node); "
                        "with --gpus-per-task 1 a job trains on that many GPUs")
    g.add_argument("--array-parallelism", type=int, default=None,
                   help="jobs of the array running at once (sbatch --array=...%%N; default 64)")
    g.add_argument("--slurm-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg constraint=a100 (repeatable)")
    g.add_argument("--cancel", action="store_true",
                   help="Ctrl-C while waiting cancels the submitted jobs (default: they keep running)")


def _executor_kind(args: argparse.Namespace, config: dict) -> str:
    return args.executor or str(config.get("executor") or "local")


def _executor(args: argparse.Namespace, config: dict, jobs: int = 1, devices: list[str] | None = None) -> object:
    """The executor of a batch command: the YAML's ``executor``/``slurm`` keys, overridden by the options."""
    from divaware import executors

    slurm = dict(config.get("slurm") or {})
    for key in ("partition", "time", "gpus_per_task", "cpus_per_task", "mem", "account", "qos", "ranks_per_job",
                "array_parallelism"):
        if getattr(args, key) is not None:
            slurm[key] = getattr(args, key)
    if args.slurm_arg:
        slurm["extra"] = {**dict(slurm.get("extra") or {}), **executors.parse_slurm_args(args.slurm_arg)}
    kind = _executor_kind(args, config)
    if kind == "slurm" and (jobs > 1 or devices):
        raise ValueError("--jobs/--devices choose the local executor's processes; with --executor slurm the "
                         "cluster runs the jobs (use --array-parallelism and --gpus-per-task)")
    return executors.make_executor(kind, jobs=jobs, devices=devices, slurm=slurm, cancel=args.cancel)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``divaware`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if argv is None:  # the console script (a caller passing argv, e.g. a test, keeps its own display)
                warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C is the user's own decision: one line, not a traceback of wherever the process was
        print(f"divaware {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_user_error(err):
            raise
        # CohortError, configuration errors, a diverged training, a full disk: the message says what to do.
        print(f"divaware {args.command}: error: {err}", file=sys.stderr)
        return 2


def _one_line_warning(command: str) -> Callable[..., None]:
    """Warnings on the console as one readable line (``divaware audit: warning: ...``), not Python's
    ``file:line: UserWarning`` with the source line beneath."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        text = " ".join(str(message).split())
        kind = "" if issubclass(category, UserWarning) else f" ({category.__name__})"
        print(f"divaware {command}: warning{kind}: {text}", file=file or sys.stderr)

    return show


def _is_user_error(err: BaseException) -> bool:
    """Errors whose message names the cause and the fix: printed as one line, not a traceback."""
    import errno

    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    # by name: importing divaware.train here would load torch for every command
    return type(err).__name__ in ("TrainingDivergedError", "DiskFullError", "SchedulerError", "RunFolderBusy")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
