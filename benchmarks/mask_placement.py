"""How often does the misplaced-mask heuristic flag true masks, and does it catch misplaced ones?

For synthetic cohorts of every disparity mechanism, each case's true mask is tested as it is, with a
necrotic core (post = pre over the deepest 55 % of the mask, every post-contrast phase), as a rim-enhancing
tumour (only the outer one-voxel shell enhances), transposed (axes 0 and 1), and with another case's mask
pasted on its grid. Two rules are compared: the old absolute one (fewer than half of the mask's voxels
enhance like the top 5 % of the rest -> excluded) and the new one of :func:`divaware.voxels.tumour_placement`
(relative to the mask's flipped/transposed copies, and absolute only when the mask also holds none of the
strongest enhancement -> reported). Prints and writes
``benchmarks/MASK_PLACEMENT.md``: the share of cases flagged per variant and rule. No timings.

    python benchmarks/mask_placement.py [--cases 120] [--out /tmp/mask_placement]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from divaware.cohort import load_cohort
from divaware.synthetic import DISPARITIES, make_cohort
from divaware.voxels import MIN_ENHANCING_FRACTION, tumour_placement

HERE = Path(__file__).resolve().parent


def _arr(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)


def necrotic(mask: np.ndarray, pre: np.ndarray, post: np.ndarray, fraction: float = 0.55) -> np.ndarray:
    """post with post = pre over the deepest ``fraction`` of the mask (a necrotic core)."""
    depth = ndimage.distance_transform_edt(mask)
    inside = depth[mask]
    cut = np.quantile(inside, 1.0 - fraction)
    core = mask & (depth > cut) if np.count_nonzero(mask & (depth > cut)) else mask & (depth >= cut)
    out = post.copy()
    out[core] = pre[core]
    return out


def rim(mask: np.ndarray, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """post with only the outer one-voxel shell of the mask enhancing."""
    inner = ndimage.binary_erosion(mask)
    out = post.copy()
    out[inner] = pre[inner]
    return out


def variants(root: Path) -> dict[str, list[dict]]:
    cohort = load_cohort(root, check_voxels=False)
    ids = cohort.ids()
    masks = {i: _arr(cohort.cases[i].mask_path) == 1 for i in ids}
    out: dict[str, list[dict]] = {k: [] for k in ("true", "necrotic_55", "rim", "transposed", "pasted")}
    for n, pid in enumerate(ids):
        case = cohort.cases[pid]
        pre, post = _arr(case.image_paths[0]), _arr(case.image_paths[1])
        m = masks[pid]
        if not m.any():
            continue
        out["true"].append(tumour_placement(m.astype(np.uint8), pre, post))
        out["necrotic_55"].append(tumour_placement(m.astype(np.uint8), pre, necrotic(m, pre, post)))
        out["rim"].append(tumour_placement(m.astype(np.uint8), pre, rim(m, pre, post)))
        t = m.transpose(1, 0, 2)
        if np.count_nonzero(t & m) < 0.1 * np.count_nonzero(m):  # a transpose that moves the mask at all
            out["transposed"].append(tumour_placement(t.astype(np.uint8), pre, post))
        other = masks[ids[(n + 1) % len(ids)]]
        if other.shape == m.shape and np.count_nonzero(other & m) < 0.1 * np.count_nonzero(m):
            out["pasted"].append(tumour_placement(other.astype(np.uint8), pre, post))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=120)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default="/tmp/mask_placement")
    args = parser.parse_args()
    rows = []
    for disparity in DISPARITIES:
        root = Path(args.out) / disparity
        if not root.is_dir():
            make_cohort(root, n_cases=args.cases, seed=args.seed, disparity=disparity)
        for name, results in variants(root).items():
            results = [r for r in results if r]
            old = sum(r["enhancing"] < MIN_ENHANCING_FRACTION for r in results)
            new = sum(bool(r["flagged"]) for r in results)
            rows.append((disparity, name, len(results), old, new))
    lines = ["| disparity | mask variant | cases | old rule: excluded | new rule: reported |",
             "|---|---|---|---|---|"]
    for d, name, n, old, new in rows:
        lines.append(f"| {d} | {name} | {n} | {old} ({100 * old / max(n, 1):.0f} %) | "
                     f"{new} ({100 * new / max(n, 1):.0f} %) |")
    table = "\n".join(lines)
    print(table)
    text = (f"# Misplaced-mask heuristic on synthetic cohorts\n\n{args.cases} cases per mechanism (seed "
            f"{args.seed}, default preset). true / necrotic_55 / rim: flagging is a false alarm; transposed / "
            "pasted (another case's mask): flagging is a catch. Old rule: excluded when < 50 % of the mask "
            "enhances like the top 5 % of the rest; new rule (`divaware.voxels.tumour_placement`): reported when a "
            "flipped/transposed copy enhances clearly more, or when < 50 % enhances, the mask holds none of "
            "the strongest enhancement and no more than its copies. Made by `python benchmarks/mask_placement.py --cases {args.cases}`.\n\n{table}\n")
    (HERE / "MASK_PLACEMENT.md").write_text(text)


if __name__ == "__main__":
    main()
