"""The training engine's parts, in the manner of Lightning (module vs trainer, callbacks) and nnU-Net
(``train_step(batch) -> dict``):

* :class:`SegmentationTask` — the model, its loss and optimiser; :meth:`~SegmentationTask.training_step` takes
  a batch and its weights (or the strategy's lookup by patient_id), takes one optimiser step on divaware's
  objective (:func:`divaware.losses.combine`) and returns what it computed. It does no I/O: a non-finite loss
  or gradient raises :class:`StepDiverged`, and the loop names the run folder in its message. Benchmarks and
  the nnU-Net adapter call this step and this objective, not copies of them;
* :class:`Callback` — what the loop (:class:`divaware.train.Trainer`, which owns epochs, ranks and mixed
  precision) calls at fixed points: weight refresh, best-checkpoint selection, run-folder writing and the loss
  watch are callbacks there, and ``train(config, callbacks=[...])`` adds more without touching the loop;
* :class:`ValidationResult` — what a validation measured, handed to the callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from divaware import data as D
from divaware.distributed import Ranks
from divaware.losses import combine

# The loop is divaware.train.Trainer; callbacks receive it untyped here so that this module (below train in
# the import graph) never imports it.
Trainer = Any

Weights = np.ndarray | Sequence[float] | Callable[[Sequence[str], np.ndarray], np.ndarray]
"""A batch's per-case weights, or a function (patient_ids, per-case losses) -> weights (online strategies
such as GroupDRO weigh a batch by its losses: ``strategy.batch_weights``)."""


class StepDiverged(RuntimeError):
    """A non-finite loss or gradient in a training step: ``what``, and the batch's ids and losses."""

    def __init__(self, what: str, ids: Sequence[str], losses: np.ndarray) -> None:
        super().__init__(what)
        self.what, self.ids, self.losses = what, list(ids), np.asarray(losses)


@dataclass
class SegmentationTask:
    """One network with its per-case loss and optimiser, and divaware's objective
    L = α·mean(ℓ) + (1 − α)·(weighted term, ``weight_norm``)."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    alpha: float
    weight_norm: str
    grad_clip: float | None
    device: torch.device
    use_amp: bool = False
    channels_last: bool = False
    ranks: Ranks = field(default_factory=Ranks)
    step_model: torch.nn.Module | None = None  # what the forward pass calls (DDP / compiled); default: model

    def objective(self, per_case: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        """The weighted objective of one batch's per-case losses."""
        return combine(per_case, weights, self.alpha, self.weight_norm)

    def training_step(self, batch: Any, weights: Weights) -> dict[str, Any]:
        """Forward, objective, backward and one optimiser step on ``batch`` (a loader's dict: image, label,
        patient_id); returns ``ids``, per-case ``losses`` and ``weights`` of the global batch (all ranks),
        ``objective`` (its value on the host copy) and ``n``."""
        ids = D.batch_ids(batch)
        image = batch[D.IMAGE].as_subclass(torch.Tensor).to(self.device, non_blocking=True)
        label = batch[D.LABEL].as_subclass(torch.Tensor).to(self.device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            logits = (self.step_model or self.model)(image)
        per_case = self.loss_fn(logits, label)
        host = per_case.detach().cpu().numpy()  # one sync per step: NaN check, weights, logging
        # the global batch over all ranks (this rank's alone in a single process): weights by id, and
        # online strategies (GroupDRO's q) step on every rank's cases, identically on every rank
        ids, host, mine = self.ranks.gather_losses(batch, ids, host)
        if not np.isfinite(host).all():
            raise StepDiverged("non-finite loss", ids, host)
        w = np.asarray(weights(ids, host) if callable(weights) else weights, dtype=float)
        loss = self.ranks.objective(per_case, partial(combine, weights=w, alpha=self.alpha, norm=self.weight_norm),
                                    host, mine)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if not math.isfinite(float(norm)):
                raise StepDiverged("non-finite gradient", ids, host)
        self.optimizer.step()
        # the same objective on the host copy: no extra device sync for logging
        value = float(combine(torch.from_numpy(host).double(), w, self.alpha, self.weight_norm))
        return {"ids": ids, "losses": host, "weights": w, "objective": value, "n": len(ids)}


@dataclass
class ValidationResult:
    """One validation after ``epoch`` (1-based): the per-case scores the metrics and selection use (fixed
    windows under cheap validation, else full sliding window), the full scores when measured (refreshes and
    the last epoch always), and the summary written to metrics.csv."""

    epoch: int
    per_case: pd.DataFrame
    full: pd.DataFrame | None
    cheap: bool
    metrics: dict[str, Any]
    best: bool = False  # set by the best-checkpoint callback

    def records(self) -> list[dict[str, Any]]:
        """Rows of ``val_scores.csv``: ``kind`` tells window scores (``patches``) from ``full`` ones; without
        cheap validation every row is a full score and the column is left out, as in run folders so far."""
        kind = {"kind": "patches"} if self.cheap else {}
        rows = [{"epoch": self.epoch, "patient_id": pid, **kind, **r} for pid, r in self.per_case.to_dict("index").items()]
        if self.cheap and self.full is not None:
            rows += [{"epoch": self.epoch, "patient_id": pid, "kind": "full", **r}
                     for pid, r in self.full.to_dict("index").items()]
        return rows


class Callback:
    """A hook into the training loop; override what you need. Callbacks run in list order: the built-in ones
    (loss watch, weight refresh, best checkpoint, run-folder writing) first, then those given to ``train``."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After set-up (and resume), before the first remaining epoch."""

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int, out: dict[str, Any]) -> None:
        """After each training step (0-based ``epoch``, 1-based ``batch``); ``out`` as ``training_step``'s."""

    def on_validation_end(self, trainer: Trainer, result: ValidationResult) -> None:
        """After each validation (``result.epoch`` 1-based)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        """After each epoch (1-based ``epoch``) with its complete metrics.csv row."""
