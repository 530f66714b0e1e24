"""Do cheap per-case validation scores (fixed patch windows) rank cases like full validation? And at what cost?

On the synthetic default cohort (300 cases, 48 x 48 x 32) a network as the main job's (UNet 8-64, whole
volumes, ERM) is trained; after ``--epochs`` (a list: the ranking matters at every refresh, early ones
included) its validation split is scored twice:

* full: the whole preprocessed volume through the network (what training's validation computes);
* cheap: :func:`divaware.preprocess.patch_scores` -- windows of ``--window`` tiling the tumour's box plus
  ``n_random`` fixed random windows per case, read from the preprocessed store.

Printed and written to ``benchmarks/CHEAP_VALIDATION.md``: Spearman rank correlation of the per-case Dice,
mean Dice of each, the fraction of each volume the windows cover, and the time of each (side by side, one
process, 1 thread).

    python benchmarks/cheap_validation.py [--epochs 2 6] [--window 24 24 16] [--random 0 2 4 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from divaware import data as D
from divaware import preprocess as P
from divaware import train as T
from divaware.cohort import load_cohort
from divaware.runfolder import RunFolder
from divaware.runtime import cpu_model


def markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---:|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--window", type=int, nargs=3, default=[24, 24, 16])
    ap.add_argument("--random", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--train-patch", action="store_true",
                    help="train on patches of --window (as cheap validation is meant for: `val_patches` needs "
                         "patch training) and validate fully by sliding window; default: whole volumes")
    ap.add_argument("--out", default=str(Path(__file__).with_name("CHEAP_VALIDATION.md")))
    ap.add_argument("--append", action="store_true", help="keep the tables already in --out below this one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="cheap_val_"))
    base = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 0, "strategy": "erm",
            "cache": "memory", "cpu_threads": 1, "progress": False, "schedule_epochs": max(args.epochs),
            "out_dir": str(tmp / "run"), "val_every": 1000}
    if args.train_patch:
        base["patch_size"] = list(args.window)
    roi = list(args.window) if args.train_patch else None
    rows = []
    load = os.getloadavg()
    for k, epochs in enumerate(sorted(args.epochs)):
        cfg = T.TrainConfig(**base, epochs=epochs)
        run = T.train(cfg, resume=k > 0)
        cfg = T.TrainConfig.from_yaml(RunFolder(run).config)
        spec = cfg.data_spec()
        model = cfg.build_model()
        model.load_state_dict(T.load_checkpoint(run)["model"])
        splits = RunFolder(run).read_splits()
        val_ids = splits.loc[splits["split"] == "val", "patient_id"].tolist()
        cohort = load_cohort(cfg.data_root, check_voxels=False)
        records = D.make_records(cohort, val_ids, spec)
        _, val_ds, entries = P.make_datasets([], records, spec, tmp / "store", progress=False, precision=cfg.store_precision)
        t0 = time.perf_counter()
        loader = D.make_loader(val_ds, 1, shuffle=False, seed=0, pad_batch=False, num_workers=0)
        full = T.validate(model, loader, torch.device("cpu"), spec.divisor, roi, 0.25, False, cfg.score)
        t_full = time.perf_counter() - t0
        for n_random in args.random:
            t0 = time.perf_counter()
            cheap = P.patch_scores(model, entries, val_ids, args.window, n_random, cfg.seed, torch.device("cpu"),
                                   spec.divisor, amp=False, score=cfg.score)
            t_cheap = time.perf_counter() - t0
            rho = cheap["dice"].rank().corr(full.loc[cheap.index, "dice"].rank())
            rows.append({"trained on": "patches" if args.train_patch else "whole volumes", "epochs trained": epochs, "random windows": n_random, "val cases": len(val_ids),
                         "Spearman": round(float(rho), 3), "mean Dice full": round(float(full["dice"].mean()), 3),
                         "mean Dice cheap": round(float(cheap["dice"].mean()), 3),
                         "covered fraction": round(float(cheap["covered_fraction"].mean()), 3),
                         "time cheap / full": round(t_cheap / t_full, 2)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    head = (f"# Cheap validation: rank agreement with full validation\n\nWritten by `benchmarks/cheap_validation.py`"
            f" · {dt.date.today()} · {cpu_model()} · 1 torch thread · load average at start "
            f"{load[0]:.1f} (shared machine: the time column is a ratio measured side by side) · "
            f"`python benchmarks/cheap_validation.py {' '.join(sys.argv[1:])}`\n\n"
            f"Synthetic default cohort (300 cases, 48x48x32), UNet 8-64 (main job's network), ERM, trained on "
            f"{'patches of the window size' if args.train_patch else 'whole volumes'}; windows "
            f"{'x'.join(map(str, args.window))} tiling each validation case's tumour box plus fixed random "
            "windows; Spearman of the per-case Dice against full validation (the whole volume at once, or by "
            "sliding window of the patch size with overlap 0.25 when trained on patches, as training validates)."
            "\n\n")
    out = Path(args.out)
    old = out.read_text() if out.is_file() and args.append else ""
    out.write_text(head + markdown(table) + "\n" + (f"\n{old}" if old else ""))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
