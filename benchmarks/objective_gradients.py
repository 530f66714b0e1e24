"""How much of the weighting reaches the gradient? Per-case gradient ratio by batch size, both objectives.

Training weights of mean 1 over 1,000 cases: 12 % up-weighted to the clip w_max = 5 (a planted subgroup
after a ``divaware`` refresh), the others 0.4545 so the mean is 1; α = 0.5. The intended ratio between an
up-weighted and a plain case's gradient is (α + (1 − α)·5)/(α + (1 − α)·0.4545) = 4.125. For batch sizes
1, 2, 4, 8 we draw random batches (without replacement, 20,000 per size), take dL/dℓ_i from autograd for
``weight_norm`` ``batch`` (Σwℓ/Σw, the former objective) and ``global`` ((1/B) Σwℓ, the default) and report
the mean gradient of up-weighted cases over the mean gradient of plain cases. Writes
``benchmarks/OBJECTIVE.md``.

    python benchmarks/objective_gradients.py [--batches 20000] [--out benchmarks/OBJECTIVE.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import torch

from divaware.losses import combine

N, SHARE, W_MAX, ALPHA = 1000, 0.12, 5.0, 0.5
BATCHES = (1, 2, 4, 8)


def gradient_ratio(norm: str, batch: int, n_batches: int, seed: int = 0) -> float:
    rng = np.random.default_rng([seed, batch])
    hi = np.zeros(N, dtype=bool)
    hi[: int(SHARE * N)] = True
    w = np.where(hi, W_MAX, (N - hi.sum() * W_MAX) / (~hi).sum())
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    for _ in range(n_batches):
        idx = rng.choice(N, batch, replace=False)
        ell = torch.ones(batch, dtype=torch.float64, requires_grad=True)
        combine(ell, w[idx], ALPHA, norm=norm).backward()
        for flag, g in zip(hi[idx], ell.grad.numpy(), strict=True):
            sums[bool(flag)] += float(g)
            counts[bool(flag)] += 1
    return (sums[True] / counts[True]) / (sums[False] / counts[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("OBJECTIVE.md"))
    args = parser.parse_args()
    w_lo = (N - SHARE * N * W_MAX) / (N - SHARE * N)
    intended = (ALPHA + (1 - ALPHA) * W_MAX) / (ALPHA + (1 - ALPHA) * w_lo)
    rows = [(b, gradient_ratio("batch", b, args.batches), gradient_ratio("global", b, args.batches)) for b in BATCHES]
    lines = [
        "# Objective: how much of the weighting reaches the gradient",
        "",
        f"Written by `benchmarks/objective_gradients.py` on {dt.date.today().isoformat()} (CPU, exact autograd, "
        f"{args.batches} random batches per size). {N} training cases, {SHARE:.0%} with weight {W_MAX:g}, "
        f"the others {w_lo:.4f} (mean 1), α = {ALPHA}. Intended gradient ratio up-weighted : plain = "
        f"{intended:.3f}. Ratio = mean dL/dℓ of up-weighted cases / mean dL/dℓ of plain cases.",
        "",
        "| cases per batch | `weight_norm: batch` Σwℓ/Σw (former) | `weight_norm: global` (1/B)Σwℓ (default) |",
        "|---:|---:|---:|",
        *[f"| {b} | {rb:.3f} | {rg:.3f} |" for b, rb, rg in rows],
        "",
        "The per-batch form dilutes the weights most when batches are small: at one case per batch (the "
        "published configuration) the weights have no effect at all, at 2 (the GPU recipe) most of it is "
        "lost. The default form gives every case the gradient (α + (1 − α) w_i)/B, the intended ratio at "
        "every batch size.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text, encoding="utf-8")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
