"""Use divaware's per-case weights in someone else's training loop.

``divaware weights --audit AUDIT --out weights.csv`` (or :func:`divaware.audit.audit_weights`) writes one
weight per training case, mean 1 over the training cases. Two ways to apply them elsewhere:

* **Sampling** (any PyTorch / MONAI loop, no change to the loss): draw cases with probability proportional
  to their weight, so a case of weight 3 is seen about three times as often as one of weight 1::

      from divaware.external import read_weights, weighted_sampler
      weights = read_weights("weights.csv")
      ids = [record["patient_id"] for record in train_files]          # the dataset's order
      sampler = weighted_sampler(weights, ids, generator=torch.Generator().manual_seed(0))
      loader = monai.data.DataLoader(dataset, batch_size=2, sampler=sampler)   # no shuffle=True

  In expectation this is the weighted loss (1/N) Σ wᵢ ℓᵢ that divaware trains with at α = 0 (its default
  α = 0.5 mixes in the plain loss; :func:`mixed_weights` gives the weights of that mixture).
* **Loss scaling** (nnU-Net v2): :mod:`divaware.nnunet` ships a trainer that multiplies each case's loss by
  its weight (``pip install divaware[nnunet]``).

Weights are looked up by ``patient_id`` (case-insensitive), never by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

__all__ = ["read_weights", "weights_for", "mixed_weights", "weighted_sampler"]


def read_weights(path: str | Path) -> pd.Series:
    """The ``weight`` column of a ``divaware weights`` CSV, indexed by ``patient_id``."""
    p = Path(path).expanduser()
    table = pd.read_csv(p, dtype={"patient_id": str})
    missing = [c for c in ("patient_id", "weight") if c not in table.columns]
    if missing:
        raise ValueError(f"{p} lacks column(s) {missing}; write it with `divaware weights`")
    w = table.set_index("patient_id")["weight"].astype(float)
    bad = w.index[~np.isfinite(w.to_numpy()) | (w.to_numpy() <= 0)]
    if len(bad):
        raise ValueError(f"{p}: weights must be finite and > 0; case(s) {list(bad[:10])} are not")
    return w


def weights_for(weights: pd.Series | Mapping[str, float], patient_ids: Sequence[str]) -> np.ndarray:
    """The weights of ``patient_ids`` in that order (case-insensitive lookup); an error names absent ids."""
    series = weights if isinstance(weights, pd.Series) else pd.Series(dict(weights), dtype=float)
    lookup = {str(k).lower(): float(v) for k, v in series.items()}
    absent = [str(i) for i in patient_ids if str(i).lower() not in lookup]
    if absent:
        raise ValueError(f"no weight for case(s) {absent[:10]} ({len(absent)} in all); the weights CSV must "
                         "cover every training case (`divaware weights --train ...`)")
    return np.array([lookup[str(i).lower()] for i in patient_ids], dtype=float)


def mixed_weights(weights: pd.Series, alpha: float) -> pd.Series:
    """α + (1 − α)·w: the per-case weight of divaware's objective α·mean(ℓ) + (1 − α)·mean(w ℓ)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha + (1.0 - alpha) * weights


def weighted_sampler(weights: pd.Series | Mapping[str, float], patient_ids: Sequence[str], *,
                     num_samples: int | None = None, replacement: bool = True,
                     generator: torch.Generator | None = None) -> Any:
    """A :class:`torch.utils.data.WeightedRandomSampler` over a dataset whose i-th case is ``patient_ids[i]``.

    Each draw picks case i with probability wᵢ / Σw. ``num_samples`` defaults to the number of cases (one
    "epoch"); ``generator`` makes the draws reproducible.
    """
    import torch
    from torch.utils.data import WeightedRandomSampler

    w = weights_for(weights, patient_ids)
    return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double),
                                 num_samples=len(w) if num_samples is None else int(num_samples),
                                 replacement=replacement, generator=generator)
