"""Per-case losses and the alpha-mixed weighted objective (the weighted term must carry gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from divaware.losses import combine, focal_loss, make_loss


def _batch(b: int = 3, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, 6, 7, 5, generator=g)
    target = (torch.rand(b, 1, 6, 7, 5, generator=g) > 0.8).long()
    return logits, target


def test_dice_ce_is_monai_dice_ce_of_each_case_alone() -> None:
    logits, target = _batch()
    ours = make_loss("dice_ce")(logits, target)
    assert ours.shape == (3,)
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    expected = torch.stack([ref(logits[i: i + 1], target[i: i + 1]) for i in range(3)])
    torch.testing.assert_close(ours, expected)


def test_sigmoid_single_channel_is_dice_plus_bce() -> None:
    logits, target = _batch(k=1)
    ours = make_loss("dice_ce")(logits, target)
    dice = DiceLoss(sigmoid=True, reduction="none")(logits, target.float()).flatten()
    bce = torch.stack([F.binary_cross_entropy_with_logits(logits[i], target[i].float()) for i in range(3)])
    torch.testing.assert_close(ours, dice + bce)


def test_focal_with_gamma_zero_is_ce_and_focal_down_weights_easy_voxels() -> None:
    logits, target = _batch()
    ce = make_loss("ce")(logits, target)
    torch.testing.assert_close(focal_loss(logits, target[:, 0], gamma=0.0), ce)
    torch.testing.assert_close(ce, torch.stack([F.cross_entropy(logits[i: i + 1], target[i: i + 1, 0])
                                                for i in range(3)]))
    focal = make_loss("focal", gamma=2.0)(logits, target)
    assert torch.all(focal < ce) and torch.all(focal > 0)
    both = make_loss("dice_focal", gamma=2.0)(logits, target)
    torch.testing.assert_close(both, make_loss("dice")(logits, target) + focal)


def test_losses_do_not_mix_cases() -> None:
    logits, target = _batch()
    before = make_loss("dice_focal")(logits, target)
    logits2 = logits.clone()
    logits2[2] = -logits2[2]
    after = make_loss("dice_focal")(logits2, target)
    torch.testing.assert_close(after[:2], before[:2])
    assert not torch.isclose(after[2], before[2])


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="dice_ce"):
        make_loss("dice_tversky")


def test_combine_value() -> None:
    ell = torch.tensor([1.0, 2.0, 4.0])
    w = np.array([1.0, 1.0, 2.0])
    alpha = 0.25
    expected = alpha * ell.mean() + (1 - alpha) * (1 * 1 + 1 * 2 + 2 * 4) / 4
    torch.testing.assert_close(combine(ell, w, alpha, norm="batch"), expected)
    expected_global = alpha * ell.mean() + (1 - alpha) * (1 * 1 + 1 * 2 + 2 * 4) / 3
    torch.testing.assert_close(combine(ell, w, alpha, "global"), expected_global)
    torch.testing.assert_close(combine(ell, None, alpha, "global"), ell.mean())
    torch.testing.assert_close(combine(ell, w, 1.0, "global"), ell.mean())


def _grad_wrt_losses(weights: np.ndarray, alpha: float, norm: str = "batch") -> torch.Tensor:
    ell = torch.tensor([0.7, 1.3, 0.4, 2.0], requires_grad=True)
    combine(ell, weights, alpha, norm=norm).backward()
    return ell.grad


def test_doubling_a_weight_changes_that_cases_gradient_as_predicted() -> None:
    alpha = 0.3
    w = np.array([1.0, 0.5, 2.0, 1.5])
    b = len(w)
    # dL/dl_i = alpha / B + (1 - alpha) * w_i / sum(w)
    g = _grad_wrt_losses(w, alpha)
    torch.testing.assert_close(g, torch.tensor(alpha / b + (1 - alpha) * w / w.sum(), dtype=torch.float32))
    w2 = w.copy()
    w2[1] *= 2
    g2 = _grad_wrt_losses(w2, alpha)
    torch.testing.assert_close(g2, torch.tensor(alpha / b + (1 - alpha) * w2 / w2.sum(), dtype=torch.float32))
    # the doubled case's coefficient rises, every other case's falls (sum(w) grew)
    assert g2[1] > g[1] and torch.all(g2[[0, 2, 3]] < g[[0, 2, 3]])


def test_weighted_term_sends_gradient_into_the_network() -> None:
    """Through a real network: grad L = sum_i c_i grad l_i with the analytic c_i, for doubled weights too."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 2, 3, padding=1)
    logits_in, target = _batch(b=3)
    loss_fn = make_loss("dice_ce")
    params = list(net.parameters())

    def flat_grad(scalar: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(scalar, params)])

    per_case_grads = [flat_grad(loss_fn(net(logits_in), target)[i]) for i in range(3)]
    alpha = 0.0  # only the weighted term: if it sent no gradient, L would have none at all
    for w in (np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 1.0])):
        grad = flat_grad(combine(loss_fn(net(logits_in), target), w, alpha, "global"))
        coeff = alpha / 3 + (1 - alpha) * w / 3
        expected = sum(float(c) * g for c, g in zip(coeff, per_case_grads, strict=True))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
        assert grad.abs().sum() > 0


def test_alpha_zero_and_one_differ_in_gradient_with_unequal_weights() -> None:
    w = np.array([1.0, 3.0, 0.5, 1.0])
    g0, g1 = _grad_wrt_losses(w, 0.0), _grad_wrt_losses(w, 1.0)
    assert not torch.allclose(g0, g1)
    # the published bug: the weight term multiplied by loss.item() is a constant and its gradient is
    # alpha * mean's alone; our alpha=0 objective must not collapse to that (which would be zero)
    ell = torch.tensor([0.7, 1.3, 0.4, 2.0], requires_grad=True)
    weighted = (torch.tensor(w, dtype=torch.float32) * ell).sum() / float(w.sum())
    bug = 0.0 * ell.mean() + 1.0 * weighted.item()
    assert torch.all(torch.autograd.grad(bug, ell)[0] == 0)
    assert torch.all(g0 > 0)


def test_weights_are_constants() -> None:
    ell = torch.tensor([0.5, 1.5], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    combine(ell, w, 0.5, "global").backward()
    assert w.grad is None and ell.grad is not None


@pytest.mark.parametrize(
    ("weights", "alpha", "match"),
    [(np.array([1.0, -1.0]), 0.5, "non-negative"), (np.array([0.0, 0.0]), 0.5, "not all zero"),
     (np.array([1.0, 1.0, 1.0]), 0.5, "weights for"), (np.array([1.0, np.nan]), 0.5, "finite"),
     (np.array([1.0, 1.0]), 1.5, "alpha")],
)
def test_combine_rejects_bad_input(weights: np.ndarray, alpha: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        combine(torch.tensor([1.0, 2.0]), weights, alpha, norm="batch")
    with pytest.raises(ValueError, match="weight norm"):
        combine(torch.tensor([1.0, 2.0]), np.array([1.0, 1.0]), 0.5, norm="sum")


def _case_gradients(ell_values: np.ndarray, weights: np.ndarray, alpha: float, norm: str) -> np.ndarray:
    """dL/dl_i times the batch size: what one case receives per unit of its own loss gradient."""
    ell = torch.tensor(ell_values, dtype=torch.float64, requires_grad=True)
    combine(ell, weights, alpha, norm=norm).backward()
    return ell.grad.numpy() * len(ell_values)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8])
def test_gradient_ratio_is_the_weight_ratio_for_every_batch(batch: int) -> None:
    """Issue 10: the per-case gradient ratio equals the alpha-mixed weight ratio, whatever the batch holds.

    Weights of training-set mean 1 (12 % of cases up-weighted, as a divaware refresh gives); every batch
    of `batch` cases drawn from them. Case i must receive (alpha + (1 - alpha) w_i) / B in every batch, so
    the ratio between an up-weighted and a plain case is the same at batch 1 as at batch 8. The former
    per-batch normalisation (Sigma w l / Sigma w) fails: at batch 1 every case gets gradient 1.
    """
    rng = np.random.default_rng(batch)
    n, alpha = 200, 0.5
    hi = np.zeros(n, dtype=bool)
    hi[:24] = True
    w_train = np.where(hi, 5.0, (n - 24 * 5.0) / (n - 24))  # mean 1 over the training set
    assert abs(w_train.mean() - 1.0) < 1e-12
    target = alpha + (1 - alpha) * w_train
    for _ in range(50):
        idx = rng.choice(n, batch, replace=False)
        g = _case_gradients(rng.uniform(0.1, 2.0, batch), w_train[idx], alpha, "global")
        np.testing.assert_allclose(g, target[idx], rtol=1e-12)
    # the intended ratio, a plain expectation over batches, and what the per-batch form gives at batch 1
    intended = target[hi][0] / target[~hi][0]
    assert intended > 4
    if batch == 1:
        g_hi = _case_gradients(np.array([0.5]), w_train[:1], alpha, "batch")
        g_lo = _case_gradients(np.array([0.5]), w_train[-1:], alpha, "batch")
        assert g_hi[0] == g_lo[0] == 1.0  # the weights vanish
