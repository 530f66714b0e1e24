"""Per-case segmentation losses and the alpha-mixed weighted objective.

The method needs one loss value per case (so each case can be weighted by its subgroup's divergence),
which MONAI's ``DiceCELoss``/``DiceFocalLoss`` cannot give: their cross-entropy/focal term is averaged over
the whole batch. Here every term is reduced over voxels (and foreground classes) only, giving shape (B,).

Definitions (logits (B, K, *spatial), target (B, 1, *spatial) or (B, *spatial) with values 0/1):
- K >= 2: softmax; Dice over the foreground classes 1..K-1 (background Dice is ~1 for tumours that fill
  0.15 % of the volume and would only dilute the signal); CE / focal over all voxels with the true class.
- K == 1: sigmoid; Dice on the single channel; binary CE / binary focal.
- soft Dice per case = 1 - (2 sum(p t) + smooth_nr) / (sum p + sum t + smooth_dr), as MONAI's DiceLoss.
- focal (Lin et al.) = voxel mean of -(1 - p_true)^gamma log p_true; gamma = 0 is exactly CE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("dice_ce", "dice_focal", "dice", "ce", "focal")


class PerCaseSegLoss(nn.Module):
    """Segmentation loss reduced over voxels only: ``forward(logits, target) -> (B,)``."""

    def __init__(
        self,
        kind: str = "dice_ce",
        lambda_dice: float = 1.0,
        lambda_other: float = 1.0,
        gamma: float = 2.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        kind = kind.strip().lower().replace("-", "_").replace("+", "_")
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self.lambda_dice = float(lambda_dice)
        self.lambda_other = float(lambda_other)
        self.gamma = float(gamma)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in fp32 even under bf16 autocast: sums over 10^7 voxels
        if target.dim() == logits.dim():
            target = target[:, 0]
        target = target.long()
        total = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
        parts = self.kind.split("_")
        if "dice" in parts:
            total = total + self.lambda_dice * soft_dice_loss(logits, target, self.smooth_nr, self.smooth_dr)
        if "ce" in parts:
            total = total + self.lambda_other * focal_loss(logits, target, gamma=0.0)
        elif "focal" in parts:
            total = total + self.lambda_other * focal_loss(logits, target, gamma=self.gamma)
        return total


def make_loss(name: str = "dice_ce", **params: float) -> PerCaseSegLoss:
    """The per-case loss called ``name`` (one of ``LOSSES``); ``params`` go to ``PerCaseSegLoss``."""
    return PerCaseSegLoss(name, **params)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth_nr: float = 1e-5,
                   smooth_dr: float = 1e-5) -> torch.Tensor:
    """Per-case soft Dice loss (B,), averaged over foreground classes; ``target`` is (B, *spatial) int."""
    spatial = tuple(range(2, logits.dim()))
    if logits.shape[1] == 1:
        prob = torch.sigmoid(logits)
        onehot = target.unsqueeze(1).to(prob.dtype)
    else:
        prob = torch.softmax(logits, dim=1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(prob.dtype)
    inter = (prob * onehot).sum(spatial)
    denom = prob.sum(spatial) + onehot.sum(spatial)
    dice = (2.0 * inter + smooth_nr) / (denom + smooth_dr)
    return (1.0 - dice).mean(dim=1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-case focal loss (B,), the voxel mean of -(1-p_true)^gamma log p_true; gamma=0 gives CE."""
    if logits.shape[1] == 1:
        # log p_true for a sigmoid: logsigmoid(z) if t == 1 else logsigmoid(-z)
        z = logits[:, 0]
        log_pt = F.logsigmoid(torch.where(target > 0, z, -z))
    else:
        log_pt = torch.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1))[:, 0]
    term = -log_pt if gamma == 0 else -((1.0 - log_pt.exp()).clamp_min(0) ** gamma) * log_pt
    return term.flatten(1).mean(dim=1)


WEIGHT_NORMS = ("global", "batch")


def combine(
    per_case: torch.Tensor,
    weights: torch.Tensor | np.ndarray | Sequence[float] | None,
    alpha: float,
    norm: str,
) -> torch.Tensor:
    """The training objective of one batch: a scalar that carries gradient in both terms.

    ``norm="global"`` (the config's default ``weight_norm``): L = α · (1/B) Σ ℓ_i + (1 − α) · (1/B) Σ w_i ℓ_i. The weights come from a
    strategy with training-set mean 1 (every strategy in ``divaware.weighting``), so the second term is an
    unbiased estimate of the weighted training loss and case i always gets gradient (α + (1 − α) w_i)/B:
    two cases' gradients stand in the ratio of their α-mixed weights whatever else the batch holds, at
    every batch size including 1.

    ``norm="batch"``: L = α · mean ℓ + (1 − α) · Σ w_i ℓ_i / Σ w_i, the former objective, kept for
    comparison. It is invariant to the weights' scale within a batch: at batch size 1 it is plain ℓ
    whatever w is, and at 2-8 cases per batch it dilutes the weights (benchmarks/OBJECTIVE.md).

    ``weights`` are constants: they are detached (no gradient flows into them), but they multiply the
    per-case losses themselves, so the weighted term sends gradient to each case. (The published code
    multiplied its weight term by ``loss.item()``, which sent none.) ``None`` means uniform weights.
    """
    if per_case.dim() != 1:
        raise ValueError(f"per-case losses must have shape (B,), got {tuple(per_case.shape)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if norm not in WEIGHT_NORMS:
        raise ValueError(f"weight norm must be one of {WEIGHT_NORMS}, got {norm!r}")
    mean_term = per_case.mean()
    if weights is None or float(alpha) == 1.0:
        return mean_term
    # validate on the host where the weights come from (numpy from the strategy): no device sync per step
    w_host = weights.detach().cpu().double().numpy() if torch.is_tensor(weights) else np.asarray(weights, float)
    if w_host.shape != tuple(per_case.shape):
        raise ValueError(f"got {w_host.size} weights for {per_case.numel()} per-case losses")
    if not np.isfinite(w_host).all() or (w_host < 0).any() or (norm == "batch" and w_host.sum() <= 0):
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w_host.tolist()}")
    w = torch.as_tensor(w_host, dtype=per_case.dtype).to(per_case.device, non_blocking=True)
    if norm == "batch":
        weighted = (w * per_case).sum() / w.sum()
    else:
        weighted = (w * per_case).sum() / per_case.shape[0]
    return float(alpha) * mean_term + (1.0 - float(alpha)) * weighted
