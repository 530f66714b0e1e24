"""Cost of the voxel checks of ``load_cohort`` per case, beside reading the case for preprocessing.

Measures, on a synthetic cohort written here (``--preset default``: 48x48x32 crops; ``realistic``: the real
collections' shapes), the time per case of ``load_cohort(check_voxels=False)`` (headers), of the full voxel
checks, of a second load served by the voxel cache, and of the deterministic preprocessing a training run
does anyway (MONAI ``eval_transforms``: read, reorient, normalise). Prints a markdown table.

    python benchmarks/voxel_checks.py --preset realistic --cases 4
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=("default", "realistic"))
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many (a shared machine is noisy)")
    args = parser.parse_args()

    import torch

    from divaware import data as D
    from divaware.cohort import load_cohort
    from divaware.synthetic import make_cohort

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_cohort(Path(tmp) / "cohort", n_cases=args.cases, seed=args.seed, preset=args.preset)
        cache = Path(tmp) / "run" / "voxel_checks.json"
        load_cohort(root, check_voxels=False)  # warm the file-system cache and imports

        def per_case(fn, before=lambda: None) -> float:
            best = float("inf")
            for _ in range(args.repeats):
                before()
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            return best / args.cases

        headers = per_case(lambda: load_cohort(root, check_voxels=False))
        voxels = per_case(lambda: load_cohort(root, voxel_cache=cache), before=lambda: cache.unlink(missing_ok=True))
        cached = per_case(lambda: load_cohort(root, voxel_cache=cache))
        cohort = load_cohort(root, check_voxels=False)
        spec = D.DataSpec()
        records = D.make_records(cohort, cohort.ids(), spec)
        transform = D.eval_transforms(spec)
        prep = per_case(lambda: [transform(dict(r)) for r in records])
        shape = "x".join(str(int(v)) for v in cohort.geometry[["nx", "ny", "nz"]].median())

    print(f"{platform.processor() or platform.machine()}, 1 torch thread, best of {args.repeats}, synthetic "
          f"{args.preset} preset, {args.cases} cases (median shape {shape}, 3+ phases and a mask each)\n")
    print("| step | ms per case | x preprocessing |")
    print("|---|---:|---:|")
    for name, value in (("load_cohort, headers only", headers),
                        ("load_cohort with voxel checks (first time)", voxels),
                        ("load_cohort, voxel checks from the cache", cached),
                        ("preprocessing a run does anyway (eval_transforms)", prep)):
        print(f"| {name} | {1000 * value:.1f} | {value / prep:.2f} |")


if __name__ == "__main__":
    main()
