"""The training engine: ``TrainConfig`` and ``train(config) -> run folder``, resumable and observable.

One run = one folder (``TrainConfig.out_dir``) holding

* ``config.yaml``        the resolved config (data root made explicit): ``train(TrainConfig.from_yaml(...))``
                          reproduces the run;
* ``splits.csv``         ``patient_id, split, stratum``: the challenge's *train* split divided (stratified,
                          seeded) into ``train`` and ``val`` (fairness-validation). The test split is never read;
* ``metrics.csv``        one row per epoch (see ``METRIC_COLUMNS``);
* ``weights_history.csv`` the weighting strategy's history (one row per training case and refresh);
* ``val_scores.csv``     per-case validation scores of every validated epoch (``epoch, patient_id, dice, ...``);
* ``last.pt``            everything needed to resume exactly, written atomically after every epoch;
* ``best.pt``            the model with the best fairness-validation criterion (``selection`` column):
                          ½ (mean val Dice + worst-group val Dice), so selection rewards accuracy and the
                          worst subgroup alike; ties keep the earlier epoch;
* ``cache/``             the disk cache of preprocessed cases, when used.

Checkpoints are pickles (optimiser and RNG states included): load only run folders you trust.

Epochs are counted from 1 in the files (``epoch`` = epochs completed) and from 0 in the strategy's schedule
(``should_refresh(e)`` asks whether to refresh before the 0-based epoch ``e``). A refresh uses the per-case
fairness-validation scores measured right after the preceding epoch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from divaware import data as D
from divaware import distributed
from divaware import preprocess as P

# the schema and its constants live in divaware.config; re-exported here for callers of the former home
from divaware.config import (  # noqa: F401
    AMP_MODES,
    LEGACY_VALUES,
    MAX_LR,
    OPERATIONAL_FIELDS,
    OPTIMIZERS,
    SCHEDULERS,
    SCORES,
    TrainConfig,
    default,
    result_fields,
)
from divaware.engine import Callback, SegmentationTask, StepDiverged, ValidationResult
from divaware.losses import make_loss
from divaware.metrics import worst_group
from divaware.model import infer, segment
from divaware.outputs import ensure_writable
from divaware.runfolder import VOXEL_CACHE, DiskFullError, RunFolder, torch_save, write_csv, write_text  # noqa: F401

# VOXEL_CACHE, DiskFullError, split_train_val and worst_group are re-exported: callers import them from here
from divaware.split import derived_seed as _derived_seed
from divaware.split import split_train_val, val_case_count  # noqa: F401 (re-exported)

METRIC_COLUMNS = (
    "epoch", "loss", "loss_mean", "lr", "schedule_epochs", "val_dice", "val_worst_group_dice", "val_worst_group",
    "val_score", "selection", "best", "refreshed", "weight_min", "weight_max", "time_s", "train_time_s",
    "val_time_s",
)
CHECKPOINT_FORMAT = 1


class TrainingDivergedError(RuntimeError):
    """A non-finite loss or gradient; the message names epoch, batch and patient_ids."""


EXPLOSION_FACTOR = 1e4
"""Training stops when a batch's mean loss exceeds this multiple of the run's first loss (without NaN)."""


def check_patch_fits(config: TrainConfig, geometry: pd.DataFrame) -> None:
    """Refuse a patch larger than every case along some axis (it would be mostly padding, or never end)."""
    if config.patch_size is None or geometry.empty or config.spacing is not None or config.crop_to_breast:
        return  # resampling/cropping changes the sizes: checked from the headers only without them
    largest = [int(geometry[c].max()) for c in ("nx", "ny", "nz")]
    too_big = [a for a, p, n in zip("xyz", config.patch_size, largest, strict=True) if p > n]
    if too_big:
        raise ValueError(f"config field 'patch_size' = {config.patch_size!r} is larger than every case along "
                         f"{', '.join(too_big)} (largest volume {largest}); choose a patch at most that size")


def refuse_inside_data(data_root: str | Path, **folders: Path) -> None:
    """A ValueError when a folder the run writes into (run folder, cache) lies inside the input data."""
    root = Path(data_root).resolve()
    for name, folder in folders.items():
        if Path(folder).resolve().is_relative_to(root):
            raise ValueError(f"{name} {folder} lies inside the data folder {root}; input data is read-only, "
                             "choose a folder outside it")


class _LossWatch(Callback):
    """Stops training whose loss explodes without becoming NaN (e.g. an absurd lr: 3e12 -> 5e16)."""

    def __init__(self, history: Sequence[Mapping[str, Any]]) -> None:
        # The first epoch's mean loss survives a resume in the checkpointed history.
        self.reference = float(history[0]["loss_mean"]) if history else None

    def check(self, run_dir: Path, epoch: int, batch: int, ids: Sequence[str], losses: np.ndarray) -> None:
        mean = float(np.mean(losses))
        if self.reference is None:
            self.reference = max(mean, 1e-6)
            return
        if mean > EXPLOSION_FACTOR * self.reference:
            _diverged(run_dir, epoch, batch, ids, losses,
                      f"loss grew {mean / self.reference:.3g} times above the first loss "
                      f"({self.reference:.4g} -> {mean:.4g}): exploding")

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int, out: dict[str, Any]) -> None:
        assert trainer.run is not None
        self.check(trainer.run.path, epoch, batch, out["ids"], out["losses"])


class RefreshWeights(Callback):
    """New training weights from the fairness-validation scores, when the strategy's schedule asks: always on
    full sliding-window scores (measured at every refresh, also under cheap validation)."""

    def on_validation_end(self, trainer: Trainer, result: ValidationResult) -> None:
        if trainer.strategy.should_refresh(result.epoch):
            assert result.full is not None
            trainer.refresh_weights(result.epoch, result.full)


class SelectBest(Callback):
    """best.pt: the model whose selection criterion beats every earlier epoch's (ties keep the earlier)."""

    def on_validation_end(self, trainer: Trainer, result: ValidationResult) -> None:
        result.best = trainer.select(result.epoch, result.metrics["selection"])


class WriteRunFolder(Callback):
    """last.pt and the tables after every epoch (rank 0; the ranks agree)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        trainer.save(epoch)


# ------------------------------------------------------------------------------------------------
# small utilities
# ------------------------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file then rename (kept for callers of the former name)."""
    torch_save(path, obj)




def _checkpoint_epoch(path: Path) -> str:
    try:
        return str(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except Exception:
        return "unknown"


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``last.pt`` of a run; a damaged or empty file is a one-line error naming the earlier state to use."""
    run = RunFolder(run_dir)
    path = run.last
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or "epoch" not in ckpt:
            raise ValueError("not a divaware checkpoint")
    except Exception as err:
        best = run.best
        earlier = (f"best.pt (epoch {_checkpoint_epoch(best)}) holds the best earlier model weights, usable "
                   "for predict/evaluate (--checkpoint best) but not for an exact resume"
                   if best.is_file() else "no earlier state is kept")
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path} is damaged or empty ({size} bytes; {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); {earlier}. Train again with "
                         "--overwrite") from None
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')}, expected {CHECKPOINT_FORMAT}")
    return ckpt


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA request raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:  # "nonsense", "cuda:x": a one-line error, not a traceback
        raise ValueError(f"device {name!r} is not a device ({str(err).splitlines()[0][:120]}); use auto, cpu, "
                         "cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return dev


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    divisor: int,
    roi_size: Sequence[int] | None,
    overlap: float,
    amp: bool,
    score: str,
    batch_cases: int = 1,
) -> pd.DataFrame:
    """Per-case validation metrics (index ``patient_id``): ``dice`` (+ ``norm_hd``) and ``score``.

    Dice follows :func:`divaware.metrics.dice` (the challenge's definition and empty-mask convention) on
    the preprocessed grid; ``score`` is Dice or ½(Dice + 1 − NormHD).

    ``batch_cases``: up to this many consecutive cases *of the same shape* go through the network in one
    forward pass. Whole-volume validation of a small network is dominated by per-layer overhead at batch 1
    (the deepest levels hold a few hundred voxels), so batching cuts its time about 2.5x on a CPU; cases
    are never padded to a common shape (instance norm would see the padding), so the result per case is
    the same as at batch 1 up to float rounding.
    """
    from divaware import metrics

    model.eval()
    rows: list[dict[str, Any]] = []
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        image = torch.stack([p[1] for p in pending]).to(device, non_blocking=True)
        logits = infer(model, image, divisor=divisor, roi_size=roi_size, overlap=overlap, amp=amp)
        pred = segment(logits).cpu().numpy()
        for k, (pid, _, truth) in enumerate(pending):
            t = truth[0].numpy() > 0.5
            row: dict[str, Any] = {"patient_id": pid}
            if score == "challenge":
                m = metrics.case_metrics(pred[k], t)
                row.update(dice=m["dice"], norm_hd=m["norm_hd"], score=0.5 * (m["dice"] + 1.0 - m["norm_hd"]))
            else:
                d = float(metrics.dice(pred[k], t))
                row.update(dice=d, score=d)
            rows.append(row)
        pending.clear()

    for batch in loader:
        # plain tensors: MetaTensor bookkeeping costs more than a tiny network's convolutions
        images = batch[D.IMAGE].as_subclass(torch.Tensor)
        truths = batch[D.LABEL].as_subclass(torch.Tensor)
        for k, pid in enumerate(D.batch_ids(batch)):
            if pending and (pending[0][1].shape != images[k].shape or len(pending) >= max(1, batch_cases)):
                flush()
            pending.append((pid, images[k], truths[k]))
    flush()
    # a rank may hold no validation case (fewer cases than ranks): an empty frame, not a KeyError
    return pd.DataFrame(rows, columns=["patient_id", "dice", *(["norm_hd"] if score == "challenge" else []),
                                       "score"]).set_index("patient_id")


def _val_batch_cases(config: TrainConfig) -> int:
    """Cases per validation forward pass: twice the training batch for whole volumes (no gradients are
    kept, so it fits wherever training fits); 1 for sliding-window validation of large volumes."""
    return 2 * int(config.batch_size) if config.patch_size is None else 1


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def resolve_config(config: TrainConfig) -> TrainConfig:
    """A copy with the data root made explicit (generating the synthetic cohort if needed)."""
    from divaware.paths import resolve_data_root

    root = resolve_data_root(config.data_root, n_cases=config.synthetic_cases, seed=config.synthetic_seed,
                             preset=config.synthetic_preset, disparity=config.synthetic_disparity,
                             counterfactual=config.synthetic_counterfactual,
                             hard_fraction=config.synthetic_hard_fraction)
    return dataclasses.replace(config, data_root=str(Path(root).resolve()))


def _resolve_schedule(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """``schedule_epochs`` made explicit: the run folder's (a resumed run keeps its schedule), else ``epochs``.

    A folder written before the field existed scheduled over the ``epochs`` in its config.yaml.
    """
    if config.schedule_epochs is not None:
        return config
    old = RunFolder(run_dir).read_config()
    planned = old.get("schedule_epochs") or old.get("epochs") or config.epochs
    return dataclasses.replace(config, schedule_epochs=int(planned))


def _prepare_run_dir(run_dir: Path, config: TrainConfig, resume: bool, overwrite: bool) -> bool:
    """Check the folder against the config; returns whether a checkpoint is to be resumed."""
    run = RunFolder(run_dir)
    cfg_path = run.config
    if not cfg_path.is_file():
        if run_dir.exists() and not run.only_early_files() and not overwrite:
            raise ValueError(f"run folder {run_dir} is not empty and holds no config.yaml; choose another out_dir")
        return False
    old = yaml.safe_load(cfg_path.read_text()) or {}
    diff = sorted(k for k, v in result_fields(config.to_dict()).items() if old.get(k, LEGACY_VALUES.get(k, v)) != v)
    if diff and not overwrite:
        details = ", ".join(f"{k}: {old.get(k, LEGACY_VALUES.get(k))!r} -> {getattr(config, k)!r}" for k in diff)
        raise ValueError(
            f"run folder {run_dir} holds a run with a different config ({details}); choose another out_dir "
            "or pass overwrite=True (--overwrite) to replace it"
        )
    has_ckpt = run.last.is_file()
    if overwrite and not (resume and not diff):
        run.remove_results()
        return False
    if has_ckpt and not resume:
        raise ValueError(
            f"run folder {run_dir} already holds this run; pass resume=True (--resume) to continue it "
            "or overwrite=True (--overwrite) to start it again"
        )
    if has_ckpt and resume:
        _check_checkpoint_config(run, config)
    return has_ckpt and resume


def _check_checkpoint_config(run: RunFolder, config: TrainConfig) -> None:
    """Resuming continues what ``last.pt`` was trained with: a field of config.yaml edited since (channels
    gave a state-dict size mismatch, data_root a KeyError on the split's ids) is named, not a traceback."""
    saved = load_checkpoint(run.path).get("config") or {}
    current = result_fields(config.to_dict())
    diff = sorted(k for k, v in current.items() if k in saved and saved[k] != v)
    if diff:
        details = ", ".join(f"{k}: {saved[k]!r} in last.pt -> {current[k]!r} now" for k in diff)
        raise ValueError(f"cannot resume {run.path}: its checkpoint was trained with other settings than "
                         f"{run.CONFIG} now holds ({details}); restore those fields, or start again with --overwrite")


def _strategy_kwargs(config: TrainConfig, test_ids: Sequence[str]) -> dict[str, Any]:
    from divaware.weighting import STRATEGIES

    accepted = set(inspect.signature(STRATEGIES[config.strategy].__init__).parameters)
    offered = {"attributes": list(config.attributes), "warmup_epochs": int(config.warmup_epochs),
               "update_every": int(config.update_every), "test_ids": sorted(test_ids),
               "data_root": str(config.data_root)}
    kwargs = {k: v for k, v in offered.items() if k in accepted}
    kwargs.update(config.strategy_params)
    return kwargs


def _make_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.99, nesterov=True, weight_decay=config.weight_decay)


def _lr_factor(scheduler: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base lr during 0-based ``epoch`` of a schedule of ``epochs``; past its end, the
    final epoch's value (a run extended beyond its schedule neither restarts it nor drops to lr 0)."""
    epoch = min(epoch, epochs - 1)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if scheduler == "poly":
        return (1.0 - epoch / epochs) ** 0.9
    return 1.0


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> float:
    # A pure function of (epoch, schedule_epochs), and schedule_epochs is fixed for the run's life:
    # nothing to save, and raising `epochs` on resume cannot silently re-shape the epochs already planned.
    lr = config.lr * _lr_factor(config.scheduler, epoch, int(config.schedule_epochs or config.epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[Callback] = ()) -> Path:
    """Train one run and return its folder (see :mod:`divaware.runfolder` for what it holds).

    ``resume``: continue the run in the folder exactly where its last checkpoint left it (model, optimiser,
    RNG states, strategy state, epoch; later epochs replay identically because the loader order and
    augmentations of epoch e depend only on (seed, e)); a finished run returns at once; with no checkpoint
    the run starts fresh. ``overwrite``: replace a run folder holding another run. Without either, an
    existing run folder is never touched. One process owns a run folder at a time (its ``run.lock``): a
    second ``train`` into the same folder refuses with a message naming the owner. ``callbacks``
    (:class:`divaware.engine.Callback`) run after the built-in ones at each point of the loop.
    """
    previous_threads = torch.get_num_threads()
    if config.cpu_threads > 0:
        torch.set_num_threads(int(config.cpu_threads))
    # under torchrun: one rank of a data-parallel run (see divaware.distributed); else a single process
    ranks, device_name = distributed.setup(config.device)
    trainer = Trainer(config, ranks, device_name, resume=resume, overwrite=overwrite, callbacks=callbacks)
    try:
        return trainer.fit()
    finally:
        trainer.close()
        ranks.close()
        torch.set_num_threads(previous_threads)  # a process-wide setting: leave it as found


class Trainer:
    """One training run as named steps, in the manner of Lightning's trainer and nnU-Net's:

    :meth:`setup` (config, run folder and its lock, cohort, split, strategy, data, model, resume), then per
    epoch :meth:`train_epoch`, :meth:`validate` (when due), :meth:`refresh_weights` (when the strategy asks),
    :meth:`select` (best.pt) and :meth:`save` (last.pt and the tables). Which rank does what stays in
    :class:`divaware.distributed.Ranks`: files are written by rank 0 only (``ranks.on_main``).
    """

    def __init__(self, config: TrainConfig, ranks: distributed.Ranks, device_name: str, resume: bool = False,
                 overwrite: bool = False, callbacks: Sequence[Callback] = ()) -> None:
        self.config, self.ranks, self.device_name = config, ranks, device_name
        self.resume, self.overwrite = resume, overwrite
        self.run: RunFolder | None = None
        self._locked = False
        self.history: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "selection": -math.inf}
        self.start_epoch = 0
        self.extra_callbacks = list(callbacks)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Set up, then train the remaining epochs; returns the run folder."""
        from tqdm.auto import tqdm

        self.setup()
        config, run = self.config, self.run
        assert run is not None
        if self.start_epoch >= config.epochs:
            return run.path
        self.watch = _LossWatch(self.history)
        self.callbacks: list[Callback] = [self.watch, RefreshWeights(), SelectBest(), WriteRunFolder(),
                                          *self.extra_callbacks]
        self._wrap_model()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        epochs_bar = tqdm(range(self.start_epoch, config.epochs), desc=f"train {run.path.name}", unit="epoch",
                          initial=self.start_epoch, total=config.epochs,
                          disable=not (config.progress and self.ranks.is_main))
        for epoch in epochs_bar:  # 0-based
            row = self.epoch(epoch)
            epochs_bar.set_postfix(loss=f"{row['loss']:.4f}", val_dice=f"{row['val_dice']:.3f}")
        return run.path

    def epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch: train, validate when due (then the callbacks: refresh, best checkpoint), and the epoch's
        callbacks (run-folder writing); returns its metrics row."""
        config = self.config
        t0 = time.perf_counter()
        row = self.train_epoch(epoch)
        train_time = time.perf_counter() - t0
        next_epoch = epoch + 1
        # the schedule must not depend on `epochs`, or a run extended by resuming would differ from one
        # trained to the new length at once; a refresh after the final epoch is merely unused
        refresh_due = self.strategy.should_refresh(next_epoch)
        validate_now = refresh_due or next_epoch == config.epochs or next_epoch % config.val_every == 0
        t1 = time.perf_counter()
        is_best = False
        if validate_now:
            result = self.validate(next_epoch, full=refresh_due or next_epoch == config.epochs)
            row.update(result.metrics)
            self.val_records += result.records()
            for cb in self.callbacks:
                cb.on_validation_end(self, result)
            is_best = result.best
        else:
            row.update(val_dice=math.nan, val_worst_group_dice=math.nan, val_worst_group="",
                       val_score=math.nan, selection=math.nan)
        w = self.strategy.weights.to_numpy()
        row.update(best=is_best, refreshed=refresh_due, weight_min=float(w.min()), weight_max=float(w.max()),
                   val_time_s=time.perf_counter() - t1, train_time_s=train_time,
                   time_s=time.perf_counter() - t0)
        self.history.append(row)
        for cb in self.callbacks:
            cb.on_epoch_end(self, next_epoch, row)
        return row

    # -- set up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first epoch: the run folder (locked), cohort, split, strategy, data, model."""
        self._setup_run_folder()
        self._setup_device()
        self._setup_data()
        self._setup_model()
        if self.resuming:
            self._load_checkpoint()

    def _setup_run_folder(self) -> None:
        config, ranks = self.config, self.ranks
        config = ranks.on_main(resolve_config, config)  # the config was validated when it was made  # rank 0 generates a missing synthetic cohort
        run = self.run = RunFolder(config.run_dir())
        self.cache_dir = run.cache_dir(config.cache_dir)
        refuse_inside_data(config.data_root, out_dir=run.path, cache_dir=self.cache_dir)
        ranks.on_main(ensure_writable, run.path, "out_dir")  # read-only/forbidden/full: one line, path named
        ranks.on_main(run.acquire)  # one process owns the folder (rank 0 for all ranks under torchrun)
        self._locked = True
        planned = config.schedule_epochs
        config = ranks.on_main(_resolve_schedule, config, run.path)  # before rank 0 rewrites config.yaml
        self.resuming = ranks.on_main(_prepare_run_dir, run.path, config, self.resume, self.overwrite)
        if not self.resuming and planned is None:  # a fresh start: its own epochs, whatever the folder held
            config = dataclasses.replace(config, schedule_epochs=config.epochs)
        if config.epochs > int(config.schedule_epochs):
            warnings.warn(
                f"epochs {config.epochs} > schedule_epochs {config.schedule_epochs}: the lr schedule of this "
                f"run spans {config.schedule_epochs} epochs and epochs past it keep its final lr (recorded in "
                "config.yaml and metrics.csv); to plan a longer schedule, start a run with schedule_epochs set",
                stacklevel=4,
            )
        ranks.on_main(run.path.mkdir, parents=True, exist_ok=True)
        self.config = config

    def _setup_device(self) -> None:
        config = self.config
        self.device = resolve_device(self.device_name)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = not config.deterministic
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.use_amp = self.cuda and config.amp in ("auto", "bf16")
        if config.amp == "bf16" and not self.cuda:
            warnings.warn("amp: bf16 autocast is used on CUDA only; training in fp32 on CPU", stacklevel=4)
        self.channels_last = self.cuda if config.channels_last is None else bool(config.channels_last)

    def _setup_data(self) -> None:
        """Cohort, split (the challenge test split is never loaded here), strategy and datasets."""
        from divaware.cohort import load_cohort
        from divaware.subgroups import attribute_table
        from divaware.weighting import make_strategy

        config, ranks, run = self.config, self.ranks, self.run
        assert run is not None
        # the same validation as `divaware check`, voxels included; results cached beside the preprocessed cases
        if config.cache in ("auto", "preprocessed"):  # voxel checks once per data folder, shared by runs and ranks
            # only the phases this run reads are checked: a defect in another excludes no case
            cohort = self.cohort = P.load_cohort_once(config.data_root, config.cache_dir or None,
                                                      phases=config.phases)
        else:
            cohort = self.cohort = load_cohort(config.data_root, voxel_cache=run.voxel_cache(config.cache_dir),
                                               phases=config.phases)
        check_patch_fits(config, cohort.geometry)
        self.train_ids, self.val_ids, test_ids = self._split(cohort)
        ranks.on_main(config.to_yaml, run.config)
        seed_everything(config.seed)
        self.strategy = make_strategy(config.strategy, **_strategy_kwargs(config, test_ids))
        self.strategy.fit(cohort.metadata.loc[self.train_ids])
        self.val_groups = attribute_table(cohort.metadata.loc[self.val_ids], list(config.attributes))
        spec = self.spec = config.data_spec()
        ds_args = {"cache": config.cache, "cache_dir": self.cache_dir, "spec": spec,
                   "max_memory_bytes": config.cache_max_gb * 1024**3, "num_workers": config.num_workers}
        train_recs = D.make_records(cohort, self.train_ids, spec)
        # each rank validates its own share of the cases; the scores are gathered in validate()
        val_recs = D.make_records(cohort, ranks.shard(self.val_ids), spec)
        cache_mode = D.resolve_cache(config.cache, train_recs, spec, ds_args["max_memory_bytes"])
        self.entries: dict[str, Path] = {}
        if cache_mode == "preprocessed":  # the store shared by every run (divaware.preprocess)
            self.train_ds, self.val_ds, self.entries = P.make_datasets(
                train_recs, val_recs, spec, config.cache_dir or None, workers=config.num_workers,
                progress=config.progress, precision=config.store_precision)
        else:
            self.train_ds = D.make_dataset(train_recs, D.train_transforms(spec), **ds_args)
            self.val_ds = D.make_dataset(val_recs, D.eval_transforms(spec), **ds_args)
        self.cheap_val = config.val_patches > 0 and cache_mode == "preprocessed"
        unused = [n for n in ("store_precision", "val_patches") if getattr(config, n) != default(n)]
        if cache_mode != "preprocessed" and unused:  # cache: auto chose memory or disk for these cases
            warnings.warn(f"{', '.join(unused)} set, but cache: auto keeps these cases in {cache_mode} (they fit "
                          f"cache_max_gb = {config.cache_max_gb}), not in the preprocessed store where they act; set "
                          "cache: preprocessed to use them", stacklevel=4)

    def _split(self, cohort: Any) -> tuple[list[str], list[str], list[str]]:
        """(train, val, test) ids: splits.csv of a resumed run, else a fresh stratified split (written)."""
        config, run = self.config, self.run
        assert run is not None
        challenge_train = [i for i in cohort.ids("train") if cohort.cases[i].mask_path is not None]
        dropped = sorted(set(cohort.ids("train")) - set(challenge_train))
        if dropped:
            warnings.warn(f"{len(dropped)} training case(s) without expert mask left out: {dropped[:10]}",
                          stacklevel=5)
        test_ids = cohort.ids("test")
        if self.resuming and run.splits.is_file():
            splits = run.read_splits()
        else:
            splits = split_train_val(cohort.metadata, challenge_train, config.val_fraction, config.stratify,
                                     config.seed, min_val_cases=int(config.min_val_cases))
        train_ids = splits.loc[splits["split"] == "train", "patient_id"].tolist()
        val_ids = splits.loc[splits["split"] == "val", "patient_id"].tolist()
        leaked = sorted(set(train_ids + val_ids) & set(test_ids))
        if leaked:
            raise ValueError(f"split holds test-split cases {leaked[:10]}; the test split is for evaluation only")
        if not self.resuming:
            self.ranks.on_main(write_csv, run.splits, splits)
        return train_ids, val_ids, test_ids

    def _setup_model(self) -> None:
        config = self.config
        model = self.model = config.build_model().to(self.device)
        if self.channels_last:
            self.model = model = model.to(memory_format=torch.channels_last_3d)
        self.optimizer = _make_optimizer(config, model.parameters())
        self.loss_fn = make_loss(config.loss, **config.loss_params)
        self.task = SegmentationTask(model, self.loss_fn, self.optimizer, alpha=config.alpha,
                                     weight_norm=config.weight_norm, grad_clip=config.grad_clip, device=self.device,
                                     use_amp=self.use_amp, channels_last=self.channels_last, ranks=self.ranks)

    def _wrap_model(self) -> None:
        """The module the training steps call: DDP on several ranks, compiled when asked (CUDA)."""
        self.step_model: torch.nn.Module = self.ranks.wrap(self.model, self.device)
        if self.config.compile:
            if self.cuda:
                self.step_model = torch.compile(self.step_model)  # type: ignore[assignment]
            else:
                warnings.warn("compile: torch.compile is used on CUDA only", stacklevel=4)
        self.task.step_model = self.step_model

    def _load_checkpoint(self) -> None:
        assert self.run is not None
        ckpt = load_checkpoint(self.run.path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.strategy.load_state_dict(ckpt["strategy"])
        self.history, self.val_records = list(ckpt["history"]), list(ckpt["val_records"])
        self.best = dict(ckpt["best"])
        self.start_epoch = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"], self.device)

    # -- train an epoch ---------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training cases (0-based ``epoch``); the start of the epoch's metrics row."""
        from tqdm.auto import tqdm

        config, ranks = self.config, self.ranks
        lr = _set_lr(self.optimizer, config, epoch)
        distributed.seed_rank(ranks.rank, config.seed, epoch)  # dropout differs between ranks; rank 0 as before
        loader = ranks.train_loader(self.train_ds, config.batch_size,
                                    seed=_derived_seed(config.seed, "loader", epoch),
                                    rank_seed=_derived_seed(config.seed, "loader", epoch, "rank", ranks.rank),
                                    num_workers=config.num_workers, pin_memory=self.cuda,
                                    pad_batch=self.spec.patch_size is None)
        self.model.train()
        sums = {"loss": 0.0, "mean": 0.0, "n": 0}
        batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False,
                       disable=not (config.progress and ranks.is_main))
        for b, batch in enumerate(batches, start=1):
            try:
                out = self.task.training_step(batch, self.strategy.batch_weights)
            except StepDiverged as err:
                assert self.run is not None
                _diverged(self.run.path, epoch, b, err.ids, err.losses, err.what)
            for cb in self.callbacks:
                cb.on_batch_end(self, epoch, b, out)
            sums["loss"] += out["objective"] * out["n"]
            sums["mean"] += float(out["losses"].mean()) * out["n"]
            sums["n"] += out["n"]
            batches.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}")
        n = max(sums["n"], 1)
        return {"epoch": epoch + 1, "loss": sums["loss"] / n, "loss_mean": sums["mean"] / n, "lr": lr,
                "schedule_epochs": int(config.schedule_epochs)}

    # -- validate, refresh, select, save --------------------------------------------------------------
    def validate(self, epoch: int, full: bool = True) -> ValidationResult:
        """Per-case fairness-validation scores after ``epoch`` (1-based) on every rank, as a result object.

        Full sliding-window scores on whole volumes, unless cheap validation is on (``val_patches`` with the
        preprocessed store): then the metrics and selection use fixed windows per case, and ``full`` epochs
        (refreshes, the last one) also score whole volumes (``result.full``, which the refresh uses);
        ``val_scores.csv`` tells them apart by its ``kind`` column."""
        config, spec = self.config, self.spec
        roi = None if spec.patch_size is None else list(spec.patch_size)
        per_case_full = None
        if not self.cheap_val or full:
            val_loader = D.make_loader(self.val_ds, 1, shuffle=False, seed=0, num_workers=config.num_workers,
                                       pin_memory=self.cuda, pad_batch=False)
            per_case_full = self.ranks.gather_frame(
                validate(self.model, val_loader, self.device, spec.divisor, roi, config.sw_overlap, self.use_amp,
                         config.score, batch_cases=_val_batch_cases(config)),
                self.val_ids)
        per_case_val = per_case_full if not self.cheap_val else self.ranks.gather_frame(
            P.patch_scores(self.model, self.entries, self.ranks.shard(self.val_ids), roi or [], config.val_patches,
                           config.seed, self.device, spec.divisor, self.use_amp, config.score), self.val_ids)
        assert per_case_val is not None
        worst, worst_label = worst_group(per_case_val["dice"], self.val_groups, config.min_group_size)
        mean_dice = float(per_case_val["dice"].mean())
        metrics = {"val_dice": mean_dice, "val_worst_group_dice": worst, "val_worst_group": worst_label,
                   "val_score": float(per_case_val["score"].mean()), "selection": selection_score(mean_dice, worst)}
        return ValidationResult(epoch, per_case_val, per_case_full, self.cheap_val, metrics)

    def refresh_weights(self, epoch: int, per_case_val: pd.DataFrame) -> None:
        """New training weights from the fairness-validation scores just measured."""
        self.strategy.refresh(epoch, self.cohort.metadata.loc[self.val_ids], per_case_val["score"])
        line = getattr(self.strategy, "refresh_line", None)
        if line is not None and self.config.progress and self.ranks.is_main:
            # what the refresh flagged and whether a clip bound the weights (also in weights_history.csv)
            from tqdm.auto import tqdm

            tqdm.write(line())

    def select(self, epoch: int, selection: float) -> bool:
        """Keep the model as best.pt when its selection criterion beats every earlier epoch's (ties: earlier)."""
        if selection <= self.best["selection"]:
            return False
        assert self.run is not None
        self.best = {"epoch": epoch, "selection": selection}
        self.ranks.on_main(torch_save, self.run.best, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "selection": selection,
            "model": self.model.state_dict(), "config": self.config.to_dict()})
        return True

    def save(self, epoch: int) -> None:
        """Checkpoint first, then the tables rebuilt from it (rank 0; the ranks agree)."""
        assert self.run is not None
        self.ranks.check_same("weighting strategy state", self.strategy.state_dict())
        self.ranks.on_main(_persist, self.run, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "strategy": self.strategy.state_dict(),
            "rng": _rng_state(self.device), "history": self.history, "val_records": self.val_records,
            "best": self.best, "config": self.config.to_dict(),
        }, self.strategy.history)

    def close(self) -> None:
        """Release the run folder (also after an error)."""
        if self._locked and self.run is not None and self.ranks.is_main:
            self.run.release()
        self._locked = False


def selection_score(mean_dice: float, worst: float) -> float:
    """The model-selection criterion: ½ (mean val Dice + worst-group val Dice), the mean alone when no
    group qualifies; rewards accuracy and the worst subgroup alike."""
    return 0.5 * (mean_dice + (worst if not math.isnan(worst) else mean_dice))


def _persist(run: RunFolder, checkpoint: dict[str, Any], weights_history: pd.DataFrame) -> None:
    torch_save(run.last, checkpoint)
    write_csv(run.metrics, pd.DataFrame(checkpoint["history"], columns=list(METRIC_COLUMNS)))
    write_csv(run.weights_history, weights_history)
    if checkpoint["val_records"]:
        write_csv(run.val_scores, pd.DataFrame(checkpoint["val_records"]))


def _diverged(run_dir: Path, epoch: int, batch: int, ids: Sequence[str], losses: np.ndarray, what: str) -> None:
    last = RunFolder(run_dir).last
    kept = (f"the last good checkpoint {last} (epoch {_checkpoint_epoch(last)}) is kept" if last.is_file()
            else "no checkpoint was written yet")
    bad = [f"{pid}={v:.4g}" for pid, v in zip(ids, losses, strict=True)]
    raise TrainingDivergedError(
        f"{what} at epoch {epoch + 1}, batch {batch} (patient_ids {', '.join(bad)}); {kept}. "
        "Check those cases' images, lower lr, or turn amp off, then resume"
    )


# ------------------------------------------------------------------------------------------------
# the notebook series' runs (notebooks 02 and 03)
# ------------------------------------------------------------------------------------------------


def method_config(method: str, *, data_root: str | Path, out_dir: str | Path,
                  strategy_params: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """The config of one method of the notebook series: :class:`TrainConfig`'s defaults with ``overrides`` of any
    field on top, ``alpha`` 1 for ``erm``, ``strides`` of 2 between the levels of ``channels`` unless given.

    ``strategy_params`` may name parameters of several strategies (notebook 03 hands over all of its own):
    the method keeps those its strategy takes, and a ``None`` value takes the strategy's default from
    :data:`divaware.weighting.DEFAULTS`, written out so config.yaml shows every value used."""
    from divaware.weighting import DEFAULTS, STRATEGIES

    accepted = set(inspect.signature(STRATEGIES[method].__init__).parameters) if method in STRATEGIES else set()
    own = DEFAULTS.get(method, {})
    params = {k: own[k] if v is None else v for k, v in (strategy_params or {}).items()
              if k in accepted and (v is not None or k in own)}
    values: dict[str, Any] = {"strategy": method, "strategy_params": params, **overrides,
                              "data_root": str(data_root), "out_dir": str(out_dir)}
    if method == "erm":
        values["alpha"] = 1.0
    if "channels" in overrides and "strides" not in overrides:
        values["strides"] = [2] * (len(overrides["channels"]) - 1)
    # a notebook's None means "the default" for a field that cannot be null (warmup_epochs); where null is a
    # value of its own (grad_clip: no clipping) it is kept
    nullable = {f.name for f in dataclasses.fields(TrainConfig) if "None" in str(f.type)}
    return TrainConfig.from_dict({k: v for k, v in values.items() if v is not None or k in nullable})


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """What a run's metrics.csv says in a few numbers: method, alpha, epochs, final validation Dice and
    worst-group Dice, the epoch best.pt holds, training minutes and the weight refreshes training used."""
    run = RunFolder(run_dir)
    config, log = run.read_config(), run.read_metrics()
    final = log.iloc[-1]
    best = log.loc[log["selection"].idxmax()] if log["selection"].notna().any() else final
    return {"method": config.get("strategy"), "alpha": config.get("alpha"), "epochs": int(final["epoch"]),
            "final_val_dice": float(final["val_dice"]),
            "final_val_worst_group_dice": float(final["val_worst_group_dice"]),
            "best_epoch": int(best["epoch"]), "train_minutes": float(log["time_s"].sum() / 60),
            # weight refreshes training used (a refresh after the last epoch is computed but never used)
            "refreshes": int(log["refreshed"].astype(bool).iloc[:-1].sum())}
