"""Real-size data: the MONAI disk cache (before) against the shared preprocessed store (after), in one run.

On the ``realistic`` synthetic preset (the real collections' geometry: up to 512 x 512 x 185 voxels; >= 8
cases, ``--data`` or generated in the divaware cache) with a tiny UNet, 128^3 patches, 1 thread, both paths
run the same spec (3 phases, breast crop optional) over the same cases, and the script prints and writes to
``benchmarks/PREPROCESS.md``:

* cache fill time (one process; ``--workers`` > 0 also times the store's parallel fill) and cache bytes per
  voxel of the source grid (and per stored voxel);
* bytes read per training step / bytes of the step's patches in the cache's own format. Before: the bytes
  the process read (``/proc/self/io`` rchar: ``torch.load`` of whole cached cases). After: the 4 KiB file
  pages the memory-mapped patch reads touch (:class:`divaware.preprocess.ByteCounter`);
* seconds of one epoch split into steps / data / validation (before: full sliding window on every
  validation case; after: the per-epoch patch scores, with the full sliding window timed apart, as run at
  refreshes and the end);
* a projection to MAMA-MIA (1,506 cases: 1,200 train+val preprocessed, 960 train, 240 validation) from the
  per-voxel and per-case costs measured here. On a GPU the steps shrink but the data and validation work
  per epoch is CPU-side work of the same size; the GPU step time is not measured here (pass
  ``--gpu-step-ms`` from a GPU run of ``benchmarks/train_throughput.py``).

The machine is shared: ratios measured side by side in this one run are the result; the load average is
recorded.

    python benchmarks/preprocess_realistic.py [--data ROOT] [--cases 8] [--val 2] [--patch 128]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from divaware import data as D
from divaware import preprocess as P
from divaware import train as T
from divaware.cohort import load_cohort
from divaware.config import TrainConfig, default
from divaware.engine import SegmentationTask
from divaware.losses import make_loss
from divaware.model import build_model
from divaware.runtime import cpu_model

MAMA_MIA = {"trainval": 1200, "train": 960, "val": 240}


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def source_voxels(records: list[dict[str, Any]]) -> int:
    import nibabel as nib

    return int(sum(np.prod(nib.load(r[D.IMAGE][0]).shape[:3]) for r in records))


def epoch(ds: Any, model: torch.nn.Module, batch_cases: int, read: Callable[[], int]) -> dict[str, float]:
    """One training epoch: seconds waiting for data, seconds in steps, bytes read, patches seen."""
    task = SegmentationTask(model, make_loss("dice_ce"), torch.optim.AdamW(model.parameters(), lr=1e-3), alpha=1.0,
                            weight_norm="global", grad_clip=TrainConfig().grad_clip, device=torch.device("cpu"))
    model.train()
    loader = D.make_loader(ds, batch_cases, shuffle=True, seed=1, pad_batch=False, num_workers=0)
    t_data = t_step = 0.0
    patches = steps = 0
    r0 = read()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        out = task.training_step(batch, np.ones(len(D.batch_ids(batch))))  # the step training runs
        t2 = time.perf_counter()
        t_data += t1 - t0
        t_step += t2 - t1
        patches += out["n"]
        steps += 1
    return {"data_s": t_data, "step_s": t_step, "bytes": read() - r0, "patches": patches, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="a realistic-preset cohort; empty: generate one in the cache")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--val", type=int, default=2, help="of the cases, this many validate, the rest train")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--val-windows", type=int, default=2, help="random windows per case in cheap validation")
    ap.add_argument("--workers", type=int, default=2, help="also time the store's fill with this many workers")
    ap.add_argument("--gpu-step-ms", type=float, default=None)
    ap.add_argument("--precision", default=default("store_precision"), help="store precision: float16 or uint8")
    ap.add_argument("--append", action="store_true", help="keep what --out holds below this run's section")
    ap.add_argument("--crop-to-breast", action="store_true",
                    help="crop to the breast box (default off, as configs/train_default.yaml: whole volumes)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("PREPROCESS.md")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    if args.data:
        root = Path(args.data)
    else:
        from divaware.paths import ensure_synthetic

        root = ensure_synthetic(n_cases=args.cases, preset="realistic")
    cohort = load_cohort(root, check_voxels=False)
    ids = sorted(i for i in cohort.cases if cohort.cases[i].mask_path is not None)[: args.cases]
    if len(ids) < args.cases:
        raise SystemExit(f"{root} has {len(ids)} cases with masks; need {args.cases}")
    val_ids, train_ids = ids[-args.val:], ids[: -args.val]
    patch = (args.patch,) * 3
    spec = D.DataSpec(crop_to_breast=args.crop_to_breast, patch_size=patch, samples_per_case=2, divisor=4)
    train_recs, val_recs = D.make_records(cohort, train_ids, spec), D.make_records(cohort, val_ids, spec)
    all_recs = train_recs + val_recs
    vox = source_voxels(all_recs)
    tmp = Path(tempfile.mkdtemp(prefix="preprocess_bench_"))
    batch_cases = 2
    per_patch_f32 = (spec.in_channels + 1) * int(np.prod(patch)) * 4
    per_patch_store = int(np.prod(patch)) * (spec.in_channels * (1 if args.precision == "uint8" else 2) + 1 / 8)
    res: dict[str, dict[str, float]] = {"before": {}, "after": {}}

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("unet", in_channels=spec.in_channels, out_channels=2, channels=[4, 8, 16],
                           strides=[2, 2], num_res_units=0, dropout=0.0)

    # ---- before: MONAI PersistentDataset under the run folder -----------------------------------
    b = res["before"]
    train_ds = D.make_dataset(train_recs, D.train_transforms(spec), cache="disk", cache_dir=tmp / "before", spec=spec,
                              max_memory_bytes=0, num_workers=0, progress=False)
    val_ds = D.make_dataset(val_recs, D.eval_transforms(spec), cache="disk", cache_dir=tmp / "before", spec=spec,
                            max_memory_bytes=0, num_workers=0, progress=False)
    t0 = time.perf_counter()
    for ds in (train_ds, val_ds):
        for i in range(len(ds)):
            ds[i]
    b["fill_s"] = time.perf_counter() - t0
    b["cache_bytes"] = folder_bytes(tmp / "before")
    b["stored_voxels"] = b["cache_bytes"] / ((spec.in_channels + 1) * 4)  # float32 image + label (+ indices)
    net = model()
    b.update(epoch(train_ds, net, batch_cases, rchar))
    b["patch_bytes"] = b["patches"] * per_patch_f32
    t0 = time.perf_counter()
    T.validate(net, D.make_loader(val_ds, 1, shuffle=False, seed=0, pad_batch=False, num_workers=0), torch.device("cpu"),
               spec.divisor, list(patch), 0.25, False, "dice")
    b["val_s"] = b["full_val_s"] = time.perf_counter() - t0
    print("before", {k: round(v, 3) for k, v in b.items()}, flush=True)

    # ---- after: the shared store ------------------------------------------------------------------
    a = res["after"]
    t0 = time.perf_counter()
    P.fill(all_recs, spec, tmp / "after", workers=0, progress=True, precision=args.precision)
    a["fill_s"] = time.perf_counter() - t0
    if args.workers > 0:
        t0 = time.perf_counter()
        P.fill(all_recs, spec, tmp / "after_parallel", workers=args.workers, progress=True,
               precision=args.precision)
        a["fill_parallel_s"] = time.perf_counter() - t0
        shutil.rmtree(tmp / "after_parallel")
    a["cache_bytes"] = folder_bytes(tmp / "after")
    counter = P.ByteCounter()
    train_ds, val_ds, entries = P.make_datasets(train_recs, val_recs, spec, tmp / "after", counter=counter,
                                                progress=False, precision=args.precision)
    a["stored_voxels"] = sum(int(np.prod(P.Entry.open(f).shape)) for f in entries.values())
    net = model()
    a.update(epoch(train_ds, net, batch_cases, lambda: counter.bytes))
    a["patch_bytes"] = a["patches"] * per_patch_store
    t0 = time.perf_counter()
    P.patch_scores(net, entries, val_ids, patch, args.val_windows, 0, torch.device("cpu"), spec.divisor,
                   amp=False, score="dice")
    a["val_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    T.validate(net, D.make_loader(val_ds, 1, shuffle=False, seed=0, pad_batch=False, num_workers=0), torch.device("cpu"),
               spec.divisor, list(patch), 0.25, False, "dice")
    a["full_val_s"] = time.perf_counter() - t0
    print("after", {k: round(v, 3) for k, v in a.items()}, flush=True)
    shutil.rmtree(tmp)

    # ---- table ----------------------------------------------------------------------------------------
    n_train, n_val, mvox = len(train_ids), len(val_ids), vox / 1e6

    def rows(r: dict[str, float]) -> dict[str, float]:
        train_s = r["step_s"] + r["data_s"]
        per_case_vox = vox / len(ids)
        proj = {  # MAMA-MIA on this CPU, one process
            "fill_h": r["fill_s"] / vox * per_case_vox * MAMA_MIA["trainval"] / 3600,
            "cache_gb": r["cache_bytes"] / vox * per_case_vox * MAMA_MIA["trainval"] / 1e9,
            "steps_h": r["step_s"] / n_train * MAMA_MIA["train"] / 3600,
            "data_h": r["data_s"] / n_train * MAMA_MIA["train"] / 3600,
            "val_h": r["val_s"] / n_val * MAMA_MIA["val"] / 3600,
            "read_gb": r["bytes"] / n_train * MAMA_MIA["train"] / 1e9,
        }
        return {
            "cache fill (s)": r["fill_s"], "cache fill (s per Mvox)": r["fill_s"] / mvox,
            "cache bytes per source voxel": r["cache_bytes"] / vox,
            "cache bytes per stored voxel": r["cache_bytes"] / r["stored_voxels"],
            "MB read per training step": r["bytes"] / r["steps"] / 1e6,
            "bytes read per step / patch bytes": r["bytes"] / r["patch_bytes"],
            "epoch: steps (s)": r["step_s"], "epoch: data (s)": r["data_s"],
            "epoch: validation (s)": r["val_s"], "validation / training time": r["val_s"] / train_s,
            "full sliding-window validation (s)": r["full_val_s"],
            "MAMA-MIA projected: cache fill, 1 process (h)": proj["fill_h"],
            "MAMA-MIA projected: cache size (GB)": proj["cache_gb"],
            "MAMA-MIA projected: read per epoch (GB)": proj["read_gb"],
            "MAMA-MIA projected CPU epoch: steps (h)": proj["steps_h"],
            "MAMA-MIA projected CPU epoch: data (h)": proj["data_h"],
            "MAMA-MIA projected CPU epoch: validation (h)": proj["val_h"],
            "MAMA-MIA projected GPU epoch: data + validation, CPU side (h)": proj["data_h"] + proj["val_h"],
        }

    before, after = rows(res["before"]), rows(res["after"])
    lines = ["| quantity | before: MONAI disk cache | after: preprocessed store | after / before |",
             "|---|---:|---:|---:|"]
    for key in before:
        x, y = before[key], after[key]
        lines.append(f"| {key} | {x:.3g} | {y:.3g} | {y / x if x else float('nan'):.3g} |")
    if "fill_parallel_s" in res["after"]:
        lines.append(f"| store fill with {args.workers} worker processes (s) | | "
                     f"{res['after']['fill_parallel_s']:.3g} | |")
    gpu = ("not measured: no GPU step time exists in benchmarks/RESULTS.md (pass --gpu-step-ms from a GPU run "
           "of benchmarks/train_throughput.py)" if args.gpu_step_ms is None else
           f"steps projected from benchmarks/train_throughput.py step time {args.gpu_step_ms:g} ms: "
           f"{args.gpu_step_ms / 1e3 * MAMA_MIA['train'] / batch_cases / 3600:.3g} h per epoch")
    load1 = os.getloadavg()
    shapes = ", ".join(f"{i} {tuple(int(s) for s in cohort.geometry.loc[i, ['nx', 'ny', 'nz']])}" for i in ids)
    text = (
        "# Real-size data path: before / after\n\nWritten by `benchmarks/preprocess_realistic.py` · "
        f"{dt.date.today()} · {cpu_model()} · 1 torch thread · load average {load0[0]:.1f} at start, "
        f"{load1[0]:.1f} at the end (a shared machine: read the after/before column) · total "
        f"{time.perf_counter() - t_start:.0f} s · `python benchmarks/preprocess_realistic.py "
        f"{' '.join(sys.argv[1:])}`\n\n"
        f"Realistic synthetic preset, {len(ids)} cases ({n_train} train, {n_val} validation; {mvox:.0f} Mvox "
        f"of source grid): {shapes}. Spec: phases 0-2, "
        f"{'breast crop' if args.crop_to_breast else 'no breast crop (whole volumes, the default)'}, "
        f"{args.patch}^3 patches x 2 per case, 2 cases "
        f"per step, UNet 4-16 (tiny: the steps are not the point). Before: `cache: disk` (PersistentDataset "
        "under the run folder), full sliding-window validation every epoch. After: `cache: preprocessed`, "
        f"`store_precision: {args.precision}`, "
        f"per-epoch validation on the tumour windows + {args.val_windows} random windows per case "
        "(`val_patches`), full sliding window at refreshes and the end (its time is the row below).\n\n"
        + "\n".join(lines) + "\n\n"
        f"Projections scale the per-voxel (fill, size) and per-case (read, steps, data, validation) costs "
        f"measured here to MAMA-MIA's {MAMA_MIA['trainval']} train+val cases ({MAMA_MIA['train']} train, "
        f"{MAMA_MIA['val']} validation), assuming these {len(ids)} cases' mix of collections; the store fill "
        "divides by the worker processes. GPU steps: " + gpu + ".\n"
    )
    out = Path(args.out)
    old = out.read_text() if args.append and out.is_file() else ""
    out.write_text(text + (f"\n{old}" if old else ""))
    print(text)


if __name__ == "__main__":
    main()
