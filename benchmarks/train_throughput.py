"""Training-step throughput: the published configuration against ours, and how much the data loader stalls.

Configurations timed side by side in one process (same network family, same per-case Dice+CE loss, Adam):

* ``published``        MONAI UNet 16-256, 2 residual units, 3 phases, the full 320x320x128 volume, batch 1, fp32;
* ``published+bf16``   the same with bf16 autocast (what a flag alone buys);
* ``ours``             our default GPU configuration for real data: bf16 autocast, channels_last_3d, 128^3
                       patches x 4 per step (2 cases x 2 patches, as ``patch_size: [128,128,128]``,
                       ``samples_per_case: 2``, ``batch_size: 2``);
* ``ours+compile``     the same under ``torch.compile`` (CUDA only; compilation time reported separately;
                       skipped with ``--no-compile`` or when the time budget is nearly used).

Throughput = voxels through the network per second (batch x spatial size / step time). Then the loader
stall: step time of ``ours`` fed by the real pipeline (``divaware.data``: disk cache, patch sampling,
augmentations, ``--workers`` processes) over generated NIfTI cases at the benchmark's volume size, against
the same steps on one batch already in device memory. ``stall = 1 - t_in_memory / t_with_loader``.

On a CPU (or with ``--small``) every shape shrinks (volume 64x64x32, patches 32^3) and autocast stays off,
so the script finishes in a couple of minutes; on a GPU it is the headline figure (H100: about 3-4 minutes,
most of it compilation). On a GPU it then runs the DDP path end to end (``benchmarks/scaling.py``: plain
``divaware train`` against ``torchrun`` with 1 rank, and with every GPU when there are several; skip with
``--no-ddp``). Results go to ``benchmarks/RESULTS.md``, one section per device and mode (a run replaces only
its own section).

    python benchmarks/train_throughput.py [--small] [--steps 20] [--workers 8] [--no-compile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import _common
import nibabel as nib
import numpy as np
import torch

from divaware import data as D
from divaware.config import TrainConfig
from divaware.engine import SegmentationTask
from divaware.losses import make_loss

RESULTS = Path(__file__).with_name("RESULTS.md")
RESULTS_HEADER = ("# Training throughput\n\nWritten by `benchmarks/train_throughput.py` and `benchmarks/scaling.py`; "
                  "one section per device and mode.\n")


@dataclass
class Setup:
    name: str
    spatial: tuple[int, int, int]
    batch: int
    bf16: bool
    channels_last: bool
    compile: bool = False


log = _common.log


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_net(device: torch.device, channels_last: bool) -> torch.nn.Module:
    net = TrainConfig().build_model().to(device)  # the published network: the config's default
    return net.to(memory_format=torch.channels_last_3d) if channels_last else net


def train_step_fn(net: torch.nn.Module, step_net: Any, opt: torch.optim.Optimizer, loss_fn: Any,
                  device: torch.device, bf16: bool, channels_last: bool):
    """The training step divaware runs (:meth:`divaware.engine.SegmentationTask.training_step`: ERM's
    objective, the config's gradient clip, its one host sync per step) on an (image, label) pair."""
    defaults = TrainConfig()
    task = SegmentationTask(net, loss_fn, opt, alpha=1.0, weight_norm=defaults.weight_norm,
                            grad_clip=defaults.grad_clip, device=device, use_amp=bf16, channels_last=channels_last,
                            step_model=step_net)

    def step(image: torch.Tensor, label: torch.Tensor) -> float:
        ids = [f"case{i}" for i in range(image.shape[0])]
        out = task.training_step({"image": image, "label": label, "patient_id": ids}, np.ones(len(ids)))
        return out["objective"]

    return step


def random_batch(setup: Setup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(setup.batch, 3, *setup.spatial, generator=g)
    label = torch.zeros(setup.batch, 1, *setup.spatial)
    c = [s // 2 for s in setup.spatial]
    r = max(2, min(setup.spatial) // 8)
    label[..., c[0] - r:c[0] + r, c[1] - r:c[1] + r, c[2] - r:c[2] + r] = 1  # a cube tumour
    return image.to(device), label.to(device)


def time_setup(setup: Setup, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = make_net(device, setup.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    step_net = torch.compile(net) if setup.compile else net
    step = train_step_fn(net, step_net, opt, make_loss("dice_ce"), device, setup.bf16, setup.channels_last)
    image, label = random_batch(setup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step(image, label)  # first step: cuDNN autotuning / compilation
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step(image, label)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(image, label)
    sync(device)
    dt_step = (time.perf_counter() - t0) / steps
    voxels = setup.batch * math.prod(setup.spatial)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else math.nan
    del net, opt, step_net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms": dt_step * 1000, "mvox_s": voxels / dt_step / 1e6, "peak_gib": peak, "first_s": first}


# ----------------------------------------------------------------------------------------------------
# loader stall
# ----------------------------------------------------------------------------------------------------


def write_cases(folder: Path, n: int, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """``n`` cases of 3 phases + mask as .nii.gz at ``shape``: smooth tissue, a bright blob, scanner noise."""
    rng = np.random.default_rng(0)
    records = []
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    for i in range(n):
        coarse = rng.normal(size=tuple(max(2, s // 16) for s in shape))
        tissue = np.kron(coarse, np.ones((16, 16, 16)))[: shape[0], : shape[1], : shape[2]]
        tissue = np.pad(tissue, [(0, s - t) for s, t in zip(shape, tissue.shape, strict=True)], mode="edge")
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        centre = [rng.integers(s // 4, 3 * s // 4) for s in shape]
        r2 = sum(((g - c) / (s / 12)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True))
        mask = (r2 <= 1).astype(np.uint8)
        paths = []
        for phase in range(3):
            vol = 400 + 80 * tissue + 600.0 * phase * mask + rng.normal(0, 20, size=shape)
            vol[: shape[0] // 10] = 0  # air
            path = folder / f"bench_{i:03d}_{phase:04d}.nii.gz"
            nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), path)
            paths.append(str(path))
        mpath = folder / f"bench_{i:03d}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask, affine), mpath)
        records.append({"image": paths, "label": str(mpath), "patient_id": f"BENCH_{i:03d}"})
    return records


def loader_stall(volume: tuple[int, int, int], patch: tuple[int, int, int], device: torch.device, steps: int,
                 workers: int, n_cases: int, bf16: bool, channels_last: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="divaware-bench-"))
    try:
        log(f"loader: writing {n_cases} cases of {volume} ...")
        records = write_cases(tmp, n_cases, volume)
        spec = D.DataSpec(patch_size=patch, samples_per_case=2, divisor=16)
        ds = D.make_dataset(records, D.train_transforms(spec), cache="disk", cache_dir=tmp / "cache", spec=spec,
                             max_memory_bytes=0, num_workers=0, progress=False)
        log("loader: filling the disk cache (first epoch's deterministic work) ...")
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        fill_s = time.perf_counter() - t0
        torch.manual_seed(0)
        net = make_net(device, channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        step = train_step_fn(net, net, opt, make_loss("dice_ce"), device, bf16, channels_last)

        # one long epoch over the few cached cases (repeated), so worker start-up falls in the warm-up as it
        # does in a real epoch of hundreds of batches
        repeats = math.ceil(2 * (3 + 2 * steps) / len(ds)) + 1
        epoch = torch.utils.data.Subset(ds, list(range(len(ds))) * repeats)
        it = iter(D.make_loader(epoch, batch_size=2, shuffle=True, seed=0, num_workers=workers,
                                pin_memory=device.type == "cuda", pad_batch=False))
        for _ in range(3):  # warm-up: workers started, cuDNN tuned
            b = next(it)
            step(b["image"].as_subclass(torch.Tensor).to(device, non_blocking=True),
                 b["label"].as_subclass(torch.Tensor).to(device, non_blocking=True))
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b = next(it)
            step(b["image"].as_subclass(torch.Tensor).to(device, non_blocking=True),
                 b["label"].as_subclass(torch.Tensor).to(device, non_blocking=True))
        sync(device)
        with_loader = (time.perf_counter() - t0) / steps
        image = b["image"].as_subclass(torch.Tensor).to(device)
        label = b["label"].as_subclass(torch.Tensor).to(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(image, label)
        sync(device)
        in_memory = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        loader_only = (time.perf_counter() - t0) / steps
        return {"with_loader_ms": with_loader * 1000, "in_memory_ms": in_memory * 1000,
                "loader_only_ms": loader_only * 1000, "ratio": with_loader / in_memory,
                "stall": 1.0 - in_memory / with_loader, "fill_s": fill_s, "cases": n_cases,
                "batch_shape": tuple(image.shape)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------


def section(key: str, text: str, label: str = "") -> None:
    """Replace (or add) section ``key`` of RESULTS.md, labelled when taken under load."""
    _common.rewrite_section(RESULTS, key, _common.labelled(text, label), header=RESULTS_HEADER)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small shapes (automatic on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: min(8, cores - 1))")
    parser.add_argument("--cases", type=int, default=8, help="generated cases for the loader measurement")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="skip torch.compile when this many seconds would be exceeded")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    _common.add_force_argument(parser)
    parser.add_argument("--no-ddp", action="store_true",
                        help="skip the DDP path (divaware train under torchrun against plain; GPU only here, "
                             "benchmarks/scaling.py measures it on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on a shared, busy machine)")
    args = parser.parse_args(argv)
    # the load before measuring (the benchmark's own workers load the machine): refuse or label
    label = "" if args.no_write else _common.load_label(args.force)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    volume = (64, 64, 32) if small else (320, 320, 128)
    patch = (32, 32, 32) if small else (128, 128, 128)
    steps = args.steps or (5 if not cuda else 20)
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    name = device_name(device)
    log(f"device: {name}; {'small' if small else 'full'} shapes; {steps} timed steps per configuration; "
        f"{torch.get_num_threads()} torch threads")
    command = "python benchmarks/train_throughput.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))

    setups = [Setup("published", volume, 1, bf16=False, channels_last=False)]
    if cuda:  # autocast is a GPU feature here; on a CPU this row would repeat the first
        setups.append(Setup("published+bf16", volume, 1, bf16=True, channels_last=False))
    setups.append(Setup("ours", patch, 4, bf16=cuda, channels_last=cuda))
    rows: list[tuple[Setup, dict[str, Any]]] = []

    def run(setup: Setup) -> None:
        log(f"timing {setup.name}: batch {setup.batch} x {setup.spatial}, bf16={setup.bf16}, "
            f"channels_last={setup.channels_last}, compile={setup.compile} ...")
        try:
            r = time_setup(setup, device, steps, args.warmup)
        except torch.cuda.OutOfMemoryError:
            log(f"{setup.name}: out of memory")
            torch.cuda.empty_cache()
            return
        rows.append((setup, r))
        log(f"  {r['step_ms']:.1f} ms/step, {r['mvox_s']:.1f} Mvox/s, first step {r['first_s']:.1f} s")

    for setup in setups:
        run(setup)
    log(f"loader stall with {workers} workers ...")
    stall = loader_stall(volume, patch, device, steps * 2, workers, args.cases, bf16=cuda, channels_last=cuda)
    log(f"  with loader {stall['with_loader_ms']:.1f} ms/step, in memory {stall['in_memory_ms']:.1f} ms/step, "
        f"stall {100 * stall['stall']:.0f} %")
    meta = {"name": name, "small": small, "cuda": cuda, "workers": workers, "volume": volume, "patch": patch,
            "command": command}
    report(rows, stall, meta, time.perf_counter() - start, write=not args.no_write, label=label)
    # compilation last: the slowest part, and the other numbers are already on disk if it overruns
    if cuda and not args.no_compile:
        if time.perf_counter() - start > args.budget_s - 180:
            log("skipping ours+compile: not enough of the time budget left")
        else:
            run(Setup("ours+compile", patch, 4, bf16=True, channels_last=True, compile=True))
            report(rows, stall, meta, time.perf_counter() - start, write=not args.no_write, label=label)
    if cuda and not args.no_ddp:
        # the training engine end to end: plain `divaware train` against torchrun with 1 rank per GPU
        from scaling import ddp_throughput
        from scaling import report as scaling_report

        log("DDP path: divaware train, plain and under torchrun ...")
        with tempfile.TemporaryDirectory(prefix="divaware_ddp_") as tmp:
            ddp = ddp_throughput(Path(tmp), epochs=3)
        text = scaling_report(ddp, None, command)
        print("\n" + text + "\n", flush=True)
        if not args.no_write:
            section("scaling-cuda-ddp", text, label)
    return 0


def report(rows: list[tuple[Setup, dict[str, Any]]], stall: dict[str, Any], meta: dict[str, Any], total: float,
           write: bool, label: str = "") -> None:
    mode = "small" if meta["small"] else "full"
    key = f"{'cuda' if meta['cuda'] else 'cpu'}-{mode}"
    base = rows[0][1]["mvox_s"]
    lines = [
        f"## {meta['name']} ({mode} shapes)",
        "",
        f"{dt.date.today().isoformat()} · torch {torch.__version__} · MONAI {version('monai')} · "
        f"Python {platform.python_version()} · {torch.get_num_threads()} torch threads · total {total:.0f} s · "
        f"`{meta['command']}`",
        "",
        "| configuration | input per step | precision | channels_last | step (ms) | Mvox/s | x published | "
        "peak GPU memory (GiB) | first step (s) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s, r in rows:
        shape = "x".join(map(str, s.spatial))
        peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.1f}"
        lines.append(f"| {s.name} | {s.batch} x {shape} | {'bf16' if s.bf16 else 'fp32'} | "
                     f"{'yes' if s.channels_last else 'no'} | {r['step_ms']:.1f} | {r['mvox_s']:.2f} | "
                     f"{r['mvox_s'] / base:.2f} | {peak} | {r['first_s']:.1f} |")
    lines += [
        "",
        f"Loader stall (`ours` fed by the real pipeline: disk cache of {stall['cases']} generated cases of "
        f"{'x'.join(map(str, meta['volume']))}, 2 cases x 2 patches of {'x'.join(map(str, meta['patch']))} per "
        f"batch, augmentations, {meta['workers']} workers):",
        "",
        "| step with loader (ms) | step on in-memory batch (ms) | ratio | stall | loader alone (ms/batch) | "
        "cache fill (s) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {stall['with_loader_ms']:.1f} | {stall['in_memory_ms']:.1f} | {stall['ratio']:.2f} | "
        f"{100 * stall['stall']:.0f} % | {stall['loader_only_ms']:.1f} | {stall['fill_s']:.1f} |",
    ]
    if not meta["cuda"]:
        lines += ["", "CPU run: autocast, channels_last and compile are GPU features and stay off; the loader's "
                  "workers share the CPU with the training step, so on a CPU they cannot hide behind it. Shapes "
                  "are small: the ratios describe this machine, not the GPU targets (>= 3x published, stall "
                  "<= 10 %)."]
    text = "\n".join(lines)
    print("\n" + text + "\n", flush=True)
    if write:
        section(key, text, label)
        log(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
