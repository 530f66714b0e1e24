"""Where the data lives: one environment variable with a sensible default.

``resolve_data_root("")`` gives, in order: the argument when it is non-empty, ``$DIVAWARE_DATA`` when set, or
the synthetic stand-in cohort in the divaware cache (``$DIVAWARE_CACHE``, default ``~/.cache/divaware``),
generated on first use. Generation goes to a temporary sibling folder renamed into place at the end, so an
interrupted or concurrent first use never leaves a half-written cohort behind.

Where the notebooks write: ``resolve_output(path)`` keeps an absolute path and puts a relative one under the
*runs root*, ``$DIVAWARE_RUNS`` when set, else ``runs/`` of the repository checkout (else ``./runs``). The
notebooks' default output folders are relative, so 01 → 02 → 03 → 04 connect whatever the working directory:
JupyterLab starts kernels in ``notebooks/``, the CLI runs from the repository root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DATA_ENV = "DIVAWARE_DATA"
CACHE_ENV = "DIVAWARE_CACHE"
RUNS_ENV = "DIVAWARE_RUNS"
STORE_ENV = "DIVAWARE_PREPROCESSED"


def cache_dir() -> Path:
    """The divaware cache folder (synthetic cohorts); ``$DIVAWARE_CACHE`` or ``~/.cache/divaware``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "divaware").expanduser()


def store_root(override: str | Path | None = None) -> Path:
    """The shared preprocessing store (:mod:`divaware.preprocess`): ``override``, else ``$DIVAWARE_PREPROCESSED``,
    else ``<divaware cache>/preprocessed`` (``$DIVAWARE_CACHE`` or ``~/.cache/divaware``)."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get(STORE_ENV) or cache_dir() / "preprocessed").expanduser()


def voxel_cache_path(data_root: str | Path, root: str | Path | None = None) -> Path:
    """The voxel-check results of one data folder, kept in the shared store (one file per data root;
    entries inside are keyed by the contents of each case's files, see :func:`divaware.cohort.load_cohort`)."""
    import hashlib

    key = hashlib.sha1(str(Path(data_root).resolve()).encode()).hexdigest()[:12]
    return store_root(root) / "voxel_checks" / f"{key}.json"


def generator_tag() -> str:
    """Short hash of the synthetic generator's source: a changed generator never reuses a stale cached cohort."""
    import hashlib

    from divaware import synthetic

    return hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()[:8]


def synthetic_root(n_cases: int, seed: int, preset: str = "default", missingness: str = "teaching",
                   disparity: str = "default", counterfactual: bool = False, hard_fraction: float | None = None,
                   tumour_appearance: str = "default") -> Path:
    """Cache location of the synthetic cohort with these generation settings and this generator version."""
    # The default mechanism keeps the original folder name; the others add theirs (never a shared cache).
    mech = "" if disparity == "default" else f"-{disparity}"
    mech += "-counterfactual" if counterfactual else ""
    mech += "" if hard_fraction is None else f"-hard{float(hard_fraction):g}"
    mech += "" if tumour_appearance == "default" else f"-{tumour_appearance}"
    return cache_dir() / f"synthetic-{preset}-{missingness}{mech}-n{n_cases}-seed{seed}-{generator_tag()}"


def ensure_synthetic(n_cases: int = 300, seed: int = 0, preset: str = "default",
                     missingness: str = "teaching", disparity: str = "default", counterfactual: bool = False,
                     hard_fraction: float | None = None, tumour_appearance: str = "default") -> Path:
    """The cached synthetic cohort with these settings, generated (atomically) if it is not there yet."""
    from divaware.synthetic import make_cohort

    root = synthetic_root(n_cases, seed, preset, missingness, disparity, counterfactual, hard_fraction,
                          tumour_appearance)
    if (root / "clinical_and_imaging_info.xlsx").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        make_cohort(staging, n_cases=n_cases, seed=seed, preset=preset, missingness=missingness,
                    overwrite=True, disparity=disparity, counterfactual=counterfactual,
                    hard_fraction=hard_fraction, tumour_appearance=tumour_appearance)
        try:
            staging.rename(root)
        except OSError:
            # Another process finished first; its cohort is identical (same settings, deterministic).
            if not (root / "clinical_and_imaging_info.xlsx").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def resolve_data_root(data_root: str | Path | None, n_cases: int = 300, seed: int = 0,
                      preset: str = "default", missingness: str = "teaching", disparity: str = "default",
                      counterfactual: bool = False, hard_fraction: float | None = None) -> Path:
    """The cohort folder to use: explicit argument, else ``$DIVAWARE_DATA``, else the synthetic default."""
    if data_root:
        root = Path(data_root).expanduser()
    elif os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV]).expanduser()
    else:
        return ensure_synthetic(n_cases=n_cases, seed=seed, preset=preset, missingness=missingness,
                                disparity=disparity, counterfactual=counterfactual, hard_fraction=hard_fraction)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"data folder {root} is a file, not a folder; pass the MAMA-MIA root (the folder holding images/ and "
            f"clinical_and_imaging_info.xlsx), set ${DATA_ENV}, or leave both empty for the synthetic cohort"
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist; pass the MAMA-MIA root (the folder holding images/ and "
            f"clinical_and_imaging_info.xlsx), set ${DATA_ENV}, or leave both empty for the synthetic cohort"
        )
    return root


def repo_root() -> Path | None:
    """The repository checkout this package runs from (the folder holding ``notebooks/`` and
    ``pyproject.toml``), or None for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def runs_root() -> Path:
    """Where relative output paths go: ``$DIVAWARE_RUNS``, else ``<repository>/runs``, else ``./runs``."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV]).expanduser().resolve()
    repo = repo_root()
    return (repo / "runs") if repo is not None else (Path.cwd() / "runs").resolve()


def resolve_output(path: str | Path) -> Path:
    """An output folder: absolute paths as given, relative ones under :func:`runs_root` (never the working
    directory, which differs between JupyterLab, papermill and the CLI)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else runs_root() / path
