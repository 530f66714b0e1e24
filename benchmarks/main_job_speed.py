"""The main job's training epoch before and after the speed changes, side by side in one run (ratios).

The main job (README command 1) trains UNets on whole 48x48x32 synthetic volumes, 3 phases, batch 4,
191 training and 48 fairness-validation cases per epoch, on a CPU. What this script times, each pair
interleaved in one process so that other load on the machine hits both alike:

1. **Training step** (forward, per-case Dice+CE, backward, grad clipping, AdamW) of the network before
   (MONAI UNet 16-128, 2 residual units per level) and after (UNet 8-64 with ``num_res_units: 0``, one plain
   convolution per level, as ``configs/default.yaml`` now trains it).
2. **Validation pass** over 48 cases: one case per forward pass (before) against
   :func:`divaware.train.validate`'s batches of 8 equal-shaped cases (after), for both networks.
3. **Data loading and augmentation** of one epoch from the in-memory cache (what the loop waits for
   between steps; unchanged, for scale).
4. **Threads on a busy machine**: training steps of the new network in fresh processes with torch's default
   threads (one per core) and OpenMP's default spin-waiting, with ``OMP_WAIT_POLICY=PASSIVE`` (what
   ``divaware run`` now gives its kernels), and with 1 thread; each alone and next to one competing busy
   process. The slowdown column is busy / alone.

Epoch = 48 training steps + one validation pass + loading. Results go to ``benchmarks/MAIN_JOB_SPEED.md``
(rewritten) with the machine and its load average, because on a shared machine only the ratios mean much.

    python benchmarks/main_job_speed.py [--steps 8] [--repeats 3] [--thread-steps 6]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch

from divaware import runtime

RESULTS = Path(__file__).with_name("MAIN_JOB_SPEED.md")
SHAPE = (48, 48, 32)  # the synthetic default's volume
BATCH, TRAIN_CASES, VAL_CASES = 4, 191, 48
# (channels, residual units) of the main job's network before and after (configs/default.yaml)
NETWORKS = {"before": ((16, 32, 64, 128), 2), "after": ((8, 16, 32, 64), 0)}
CHANNELS = NETWORKS["before"][0]  # the loading measurement does not depend on the network


log = _common.log


def make_net(which: str) -> torch.nn.Module:
    from divaware.model import build_model

    channels, num_res_units = NETWORKS[which]
    torch.manual_seed(0)
    return build_model("unet", in_channels=3, out_channels=2, channels=channels, strides=[2] * (len(channels) - 1),
                       num_res_units=num_res_units, dropout=0.0)


def net_label(which: str) -> str:
    channels, num_res_units = NETWORKS[which]
    return f"UNet {channels[0]}-{channels[-1]}, {num_res_units} residual units"


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, *SHAPE, generator=g)
    label = torch.zeros(n, 1, *SHAPE)
    label[..., 18:30, 18:30, 12:20] = 1  # a cube tumour
    return image, label


class Trainer:
    """One network with its optimiser; ``step()`` is the training step divaware runs
    (:meth:`divaware.engine.SegmentationTask.training_step`, ERM's objective) on a fixed batch."""

    def __init__(self, which: str) -> None:
        from divaware.engine import SegmentationTask
        from divaware.losses import make_loss

        self.net = make_net(which)
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=1e-5)
        self.task = SegmentationTask(self.net, make_loss("dice_ce"), opt, alpha=1.0, weight_norm="global",
                                     grad_clip=12.0, device=torch.device("cpu"))
        image, label = batch(BATCH)
        self.batch = {"image": image, "label": label, "patient_id": [f"case{i:03d}" for i in range(BATCH)]}
        self.weights = np.ones(BATCH)

    def step(self) -> None:
        self.net.train()
        self.task.training_step(self.batch, self.weights)


def val_loader(n: int) -> list[dict[str, Any]]:
    """What the validation loader yields: one case per item, plain tensors, with ids."""
    image, label = batch(n, seed=1)
    return [{"image": image[i:i + 1], "label": label[i:i + 1], "patient_id": [f"case{i:03d}"]} for i in range(n)]


def time_validation(net: torch.nn.Module, loader: list[dict[str, Any]], batch_cases: int) -> float:
    from divaware.train import validate

    t0 = time.perf_counter()
    validate(net, loader, torch.device("cpu"), 8, None, 0.25, False, "dice", batch_cases=batch_cases)
    return time.perf_counter() - t0


def time_loading(n_cases: int) -> tuple[float, float] | None:
    """Seconds per training batch of loading + augmentation from the memory cache, and the cache fill per
    case, on the synthetic default cohort (generated on first use); None if it cannot be made."""
    from divaware import data as D
    from divaware.cohort import load_cohort
    from divaware.train import TrainConfig, resolve_config

    try:
        cfg = resolve_config(TrainConfig(channels=list(CHANNELS), strides=[2, 2, 2]))
    except Exception as err:  # only informative: the rest of the benchmark does not need the cohort
        log(f"no cohort for the loading measurement ({err})")
        return None
    cohort = load_cohort(cfg.data_root)
    ids = cohort.ids("train")[:n_cases]
    spec = cfg.data_spec()
    t0 = time.perf_counter()
    ds = D.make_dataset(D.make_records(cohort, ids, spec), D.train_transforms(spec), cache="memory", spec=spec,
                        max_memory_bytes=2 * 1024**3, num_workers=0, progress=False)
    fill = (time.perf_counter() - t0) / len(ids)
    loader = D.make_loader(ds, BATCH, shuffle=True, seed=1, num_workers=0)
    t0 = time.perf_counter()
    n = sum(1 for _ in loader)
    return (time.perf_counter() - t0) / n, fill


# ----------------------------------------------------------------------------------------------------
# threads under load: fresh processes, because OMP_WAIT_POLICY is read when OpenMP loads
# ----------------------------------------------------------------------------------------------------

THREAD_SETUPS = (
    ("torch default threads, OpenMP default (spin) — before", {}, 0),
    ("torch default threads, OMP_WAIT_POLICY=PASSIVE — after", {"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    ("1 thread", {}, 1),
)


def worker(threads: int, steps: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer("after")
    trainer.step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.step()
    print(json.dumps({"ms": (time.perf_counter() - t0) / steps * 1000,
                      "cpu_ms": (time.process_time() - c0) / steps * 1000, "threads": torch.get_num_threads()}))


def run_worker(env_extra: dict[str, str], threads: int, steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in runtime.THREAD_VARIABLES}
    env.update(env_extra)
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--thread-steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def thread_table(steps: int) -> list[dict[str, Any]]:
    rows = []
    results: dict[tuple[str, bool], dict[str, float]] = {}
    for busy in (False, True):
        competitor = None
        if busy:  # one process that wants a whole core, like a browser tab or another job
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            for name, env_extra, threads in THREAD_SETUPS:
                log(f"threads: {name}, {'with' if busy else 'without'} a competing process")
                results[(name, busy)] = run_worker(env_extra, threads, steps)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    for name, _, _ in THREAD_SETUPS:
        alone, busy = results[(name, False)], results[(name, True)]
        rows.append({"setup": name, "threads": alone["threads"], "alone_ms": alone["ms"], "busy_ms": busy["ms"],
                     "busy_cpu_ms": busy["cpu_ms"], "slowdown": busy["ms"] / alone["ms"]})
    return rows


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed training steps per network and repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (before, after, before, ...)")
    p.add_argument("--thread-steps", type=int, default=6, help="timed steps per thread setup")
    p.add_argument("--loading-cases", type=int, default=48, help="cases of the loading measurement (0: skip)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    _common.add_force_argument(p)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.thread_steps)
        return 0
    # the load before measuring (the busy-process measurement loads the machine on purpose): refuse or label
    label = _common.load_label(args.force)

    began = time.perf_counter()
    load_start = runtime.load_average()
    machine = runtime.machine_info()
    log(f"machine: {runtime.describe_machine(machine)}; load {load_start}")

    trainers = {k: Trainer(k) for k in NETWORKS}
    loader = val_loader(VAL_CASES)
    step_s = {k: 0.0 for k in trainers}
    val_s = {(k, b): 0.0 for k in trainers for b in (1, 2 * BATCH)}
    for t in trainers.values():
        t.step()  # first step allocates
    for r in range(args.repeats):
        log(f"repeat {r + 1}/{args.repeats}: training steps and validation passes")
        for k, t in trainers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t.step()
            step_s[k] += (time.perf_counter() - t0) / args.steps / args.repeats
            for b in (1, 2 * BATCH):
                val_s[(k, b)] += time_validation(t.net, loader, b) / args.repeats
    loading = time_loading(args.loading_cases) if args.loading_cases else None
    threads = thread_table(args.thread_steps)
    load_end = runtime.load_average()

    steps_per_epoch = -(-TRAIN_CASES // BATCH)
    load_epoch = loading[0] * steps_per_epoch if loading else 0.0
    before_epoch = step_s["before"] * steps_per_epoch + val_s[("before", 1)] + load_epoch
    after_epoch = step_s["after"] * steps_per_epoch + val_s[("after", 2 * BATCH)] + load_epoch
    lines = [
        "# Main job speed: before and after, side by side",
        "",
        f"Written by `python benchmarks/main_job_speed.py --steps {args.steps} --repeats {args.repeats} "
        f"--thread-steps {args.thread_steps}` on {dt.date.today().isoformat()} in "
        f"{time.perf_counter() - began:.0f} s.",
        "",
        f"Machine: {runtime.describe_machine(machine)}. Load average (1, 5, 15 min) at start {load_start}, at "
        f"end {load_end}. Other work shared the machine: absolute times are noisy, the ratios (each pair "
        "interleaved in one run) are what this measures.",
        "",
        f"Main-job step: batch {BATCH} whole volumes of "
        f"{'x'.join(map(str, SHAPE))} x 3 phases, per-case Dice+CE, AdamW, grad clipping; "
        f"{steps_per_epoch} steps and {VAL_CASES} validation cases per epoch.",
        "",
        "| part of an epoch | before | after | before / after |",
        "|---|---:|---:|---:|",
        f"| training step, {net_label('before')} -> {net_label('after')} (ms) | {step_s['before'] * 1000:.0f} | "
        f"{step_s['after'] * 1000:.0f} "
        f"| {step_s['before'] / step_s['after']:.2f} |",
    ]
    for k in NETWORKS:
        label = net_label(k)
        one, many = val_s[(k, 1)], val_s[(k, 2 * BATCH)]
        lines.append(f"| validation of {VAL_CASES} cases, {label}: batch 1 -> {2 * BATCH} (s) | {one:.2f} | "
                     f"{many:.2f} | {one / many:.2f} |")
    if loading:
        lines.append(f"| loading + augmentation, {steps_per_epoch} batches (s; unchanged) | {load_epoch:.2f} | "
                     f"{load_epoch:.2f} | 1.00 |")
    lines.append(f"| **epoch** (steps + validation + loading) (s) | **{before_epoch:.1f}** | **{after_epoch:.1f}** | "
                 f"**{before_epoch / after_epoch:.2f}** |")
    if loading:
        lines += ["", f"Cache fill (reading and preprocessing the NIfTI files once per training run): "
                      f"{loading[1] * 1000:.0f} ms per case."]
    lines += [
        "",
        "## Threads on a busy machine",
        "",
        f"Training steps of the new network ({args.thread_steps} per setup) in fresh processes, alone and next to "
        "one competing busy process (`python -c 'while True: pass'`). CPU ms is the process's CPU time per step "
        "next to the competitor: spinning threads burn CPU without progress.",
        "",
        "| setup | threads | alone (ms/step) | with a busy process (ms/step) | CPU (ms/step) | slowdown |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['setup']} | {r['threads']} | {r['alone_ms']:.0f} | {r['busy_ms']:.0f} | {r['busy_cpu_ms']:.0f} | "
              f"{r['slowdown']:.2f} |" for r in threads]
    lines += ["", "(On a machine that is already busy, \"alone\" means: with the load named above, without the "
              "extra process.)", ""]
    args.out.write_text(_common.labelled("\n".join(lines), label))
    print("\n".join(lines))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
